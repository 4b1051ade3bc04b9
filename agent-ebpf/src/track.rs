//! sock_ops: once a redirected connection is established, move its record
//! from the client socket's cookie (which the agent cannot see) to the
//! connection's address pair (which the accepted socket shows).
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::sock_ops,
    programs::SockOpsContext,
};
use warden_common::{FlowKey, mapped_v4};

use crate::{
    maps::{WARDEN_FLOWS, WARDEN_PEERS, WARDEN_PENDING},
    redirect::words_to_bytes,
};

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn warden_track_established(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        // arg 1 is the new state: once closed, forget the original peer.
        if ctx.arg(1) == TCP_CLOSE {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = WARDEN_PEERS.remove(cookie);
        }
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // Read every context field up front, straight from the context: the
    // verifier rejects loads through a context pointer the compiler has
    // offset and kept in a register.
    let ops = ctx.ops;
    let (family, local_port, remote_port, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_port),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).remote_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
        )
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = (unsafe { WARDEN_PENDING.get(cookie) }).copied() else {
        return 1;
    };
    let (client_addr, proxy_addr) = if family == AF_INET {
        (mapped_v4(l4.to_ne_bytes()), mapped_v4(r4.to_ne_bytes()))
    } else {
        (
            words_to_bytes(l6[0], l6[1], l6[2], l6[3]),
            words_to_bytes(r6[0], r6[1], r6[2], r6[3]),
        )
    };
    // local_port is in host order; remote_port holds the network-order port,
    // shifted into the upper half on little-endian kernels.
    let rp = remote_port;
    let proxy_port = if rp > 0xffff {
        u16::from_be((rp >> 16) as u16)
    } else {
        u16::from_be(rp as u16)
    };
    let key = FlowKey {
        netns: record.netns,
        client_addr,
        proxy_addr,
        client_port: local_port as u16,
        proxy_port,
        _pad: 0,
    };
    let _ = WARDEN_FLOWS.insert(key, record, 0);
    let _ = WARDEN_PENDING.remove(cookie);
    // Ask for state changes of this socket, to see it close.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
    1
}
