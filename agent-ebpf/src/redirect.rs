//! cgroup/connect4 and connect6: record the original destination, rewrite it
//! to the agent's listener.
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use warden_common::{ConnRecord, Refused, mapped_v4, refused};

use crate::{
    maps::{PeerName, WARDEN_CONFIG, WARDEN_NETNS, WARDEN_PEERS, WARDEN_PENDING, WARDEN_REFUSED},
    udp,
};

/// Let the connect() proceed (possibly rewritten).
pub const PROCEED: i32 = 1;
/// Fail the connect() or sendmsg() with EPERM.
pub const REFUSE: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn warden_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    match sa.protocol {
        IPPROTO_TCP => {
            let cfg = WARDEN_CONFIG.load();
            if is_agent_or_listener(&cfg, mapped_v4(ip), port) {
                return PROCEED;
            }
            if !served(&ctx) {
                report(&ctx, mapped_v4(ip), port, 4, refused::NETNS);
                return REFUSE;
            }
            if !remember(&ctx, mapped_v4(ip), port, 4) {
                return REFUSE;
            }
            sa.user_ip4 = u32::from_ne_bytes(cfg.listen_v4);
            sa.user_port = u32::from(cfg.listen_port.to_be());
            PROCEED
        }
        IPPROTO_UDP => udp::check(&ctx, mapped_v4(ip), port, 4),
        _ => PROCEED,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn warden_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    // Constant indexes: copying the array out is rejected by the verifier.
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    let ip = words_to_bytes(w0, w1, w2, w3);
    let port = u16::from_be(sa.user_port as u16);
    // An IPv4-mapped destination never runs connect4: treat it as IPv4 here.
    let mapped = w0 == 0 && w1 == 0 && w2 == 0xffffu32.to_be();
    let family = if mapped { 4 } else { 6 };
    match sa.protocol {
        IPPROTO_TCP => {
            let cfg = WARDEN_CONFIG.load();
            if is_agent_or_listener(&cfg, ip, port) {
                return PROCEED;
            }
            if !served(&ctx) {
                report(&ctx, ip, port, family, refused::NETNS);
                return REFUSE;
            }
            if !remember(&ctx, ip, port, family) {
                return REFUSE;
            }
            let target = if mapped {
                mapped_v4(cfg.listen_v4)
            } else {
                cfg.listen_v6
            };
            sa.user_ip6[0] = word(&target, 0);
            sa.user_ip6[1] = word(&target, 4);
            sa.user_ip6[2] = word(&target, 8);
            sa.user_ip6[3] = word(&target, 12);
            sa.user_port = u32::from(cfg.listen_port.to_be());
            PROCEED
        }
        IPPROTO_UDP => udp::check(&ctx, ip, port, family),
        _ => PROCEED,
    }
}

/// The agent's own connections, and connections already aimed at its
/// listener (by a program on a nested cgroup), are left alone.
fn is_agent_or_listener(cfg: &warden_common::AgentConfig, ip: [u8; 16], port: u16) -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == cfg.agent_tgid {
        return true;
    }
    port == cfg.listen_port && (ip == mapped_v4(cfg.listen_v4) || ip == cfg.listen_v6)
}

/// Whether the agent listens in the socket's network namespace: a connect
/// from any other would reach a loopback the agent is not on.
fn served(ctx: &SockAddrContext) -> bool {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { WARDEN_NETNS.get(&netns) }.is_some()
}

/// Tell the agent what was refused and why. A full ring loses the report,
/// never the refusal.
// Not inlined, like `remember`: each record gets a frame of its own, which
// keeps every call chain inside the verifier's 512-byte stack.
#[inline(never)]
pub fn report(ctx: &SockAddrContext, ip: [u8; 16], port: u16, family: u8, reason: u32) {
    let event = Refused {
        conn: record_for(ctx, ip, port, family),
        reason,
        _pad: 0,
    };
    let _ = WARDEN_REFUSED.output::<Refused>(&event, 0);
}

/// Store the record under the socket's cookie. Returns false when it could
/// not be stored: the connection is then refused rather than let through
/// unattributed.
#[inline(never)]
fn remember(ctx: &SockAddrContext, ip: [u8; 16], port: u16, family: u8) -> bool {
    let record = record_for(ctx, ip, port, family);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let peer = PeerName {
        addr: ip,
        port,
        _pad: [0; 6],
    };
    WARDEN_PENDING.insert(cookie, record, 0).is_ok() && WARDEN_PEERS.insert(cookie, peer, 0).is_ok()
}

/// Who is calling, from the kernel's view of the current task.
pub fn record_for(ctx: &SockAddrContext, ip: [u8; 16], port: u16, family: u8) -> ConnRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnRecord {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        orig_addr: ip,
        orig_port: port,
        family,
        _pad: 0,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        _pad2: 0,
    }
}

pub fn words_to_bytes(w0: u32, w1: u32, w2: u32, w3: u32) -> [u8; 16] {
    let (a, b, c, d) = (
        w0.to_ne_bytes(),
        w1.to_ne_bytes(),
        w2.to_ne_bytes(),
        w3.to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

pub fn word(b: &[u8; 16], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
