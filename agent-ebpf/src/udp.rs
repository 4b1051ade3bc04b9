//! UDP: allowed ports pass (DNS by default), everything else is refused with
//! EPERM and reported, so that QUIC or a home-made channel cannot go around
//! the TCP proxy.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use warden_common::{mapped_v4, refused};

use crate::{
    maps::WARDEN_UDP_ALLOW,
    redirect::{PROCEED, REFUSE, report, words_to_bytes},
};

pub fn check(ctx: &SockAddrContext, ip: [u8; 16], port: u16, family: u8) -> i32 {
    if unsafe { WARDEN_UDP_ALLOW.get(port) }.is_some() {
        return PROCEED;
    }
    report(ctx, ip, port, family, refused::UDP_PORT);
    REFUSE
}

#[cgroup_sock_addr(sendmsg4)]
pub fn warden_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let ip = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    check(&ctx, mapped_v4(ip), port, 4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn warden_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let (w0, w1, w2, w3) = (
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    );
    let port = u16::from_be(sa.user_port as u16);
    let mapped = w0 == 0 && w1 == 0 && w2 == 0xffffu32.to_be();
    check(
        &ctx,
        words_to_bytes(w0, w1, w2, w3),
        port,
        if mapped { 4 } else { 6 },
    )
}
