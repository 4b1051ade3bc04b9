//! cgroup/getpeername4 and getpeername6: a redirected socket's peer is the
//! agent's listener; the program is shown the address it connected to, so
//! that nothing it can observe changes under Warden.
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    maps::WARDEN_PEERS,
    redirect::{PROCEED, word},
};

#[cgroup_sock_addr(getpeername4)]
pub fn warden_getpeername4(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(peer) = unsafe { WARDEN_PEERS.get(cookie) } {
        let (addr, port) = (peer.addr, peer.port);
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = word(&addr, 12);
        sa.user_port = u32::from(port.to_be());
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn warden_getpeername6(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(peer) = unsafe { WARDEN_PEERS.get(cookie) } {
        let (addr, port) = (peer.addr, peer.port);
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = word(&addr, 0);
        sa.user_ip6[1] = word(&addr, 4);
        sa.user_ip6[2] = word(&addr, 8);
        sa.user_ip6[3] = word(&addr, 12);
        sa.user_port = u32::from(port.to_be());
    }
    PROCEED
}
