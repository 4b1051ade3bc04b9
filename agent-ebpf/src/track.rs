//! sock_ops: once a redirected connection is established, move its record
//! from the client socket's cookie (which the agent cannot see) to the
//! connection's address pair (which the accepted socket shows).
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::sock_ops,
    programs::SockOpsContext,
};
use warden_common::{FlowKey, mapped_v4};

use crate::{
    maps::{WARDEN_FLOWS, WARDEN_PENDING},
    redirect::words_to_bytes,
};

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn warden_track_established(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = (unsafe { WARDEN_PENDING.get(cookie) }).copied() else {
        return 1;
    };
    let (client_addr, proxy_addr) = if ctx.family() == AF_INET {
        (
            mapped_v4(ctx.local_ip4().to_ne_bytes()),
            mapped_v4(ctx.remote_ip4().to_ne_bytes()),
        )
    } else {
        let l = ctx.local_ip6();
        let r = ctx.remote_ip6();
        (
            words_to_bytes(l[0], l[1], l[2], l[3]),
            words_to_bytes(r[0], r[1], r[2], r[3]),
        )
    };
    // local_port is in host order; remote_port holds the network-order port,
    // shifted into the upper half on little-endian kernels.
    let rp = ctx.remote_port();
    let proxy_port = if rp > 0xffff {
        u16::from_be((rp >> 16) as u16)
    } else {
        u16::from_be(rp as u16)
    };
    let key = FlowKey {
        client_addr,
        proxy_addr,
        client_port: ctx.local_port() as u16,
        proxy_port,
    };
    let _ = WARDEN_FLOWS.insert(key, record, 0);
    let _ = WARDEN_PENDING.remove(cookie);
    1
}
