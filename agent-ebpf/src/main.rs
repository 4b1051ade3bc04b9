//! Warden's kernel programs, attached to the cgroups of managed workloads.
//!
//! Read them in the order a connection meets them:
//! - `redirect`: cgroup/connect4 and connect6 record where a TCP connection
//!   was going and who asked, then rewrite it to the agent's listener; UDP
//!   connects are checked against the allowed ports.
//! - `track`: sock_ops moves the record, once the connection is established,
//!   to a key the agent can compute from the socket it accepts, and forgets
//!   the original peer when the socket closes.
//! - `peername`: getpeername4 and getpeername6 show the program the address
//!   it connected to, not the agent.
//! - `udp`: cgroup/sendmsg4 and sendmsg6 hold unconnected UDP to the same rule.
#![no_std]
#![no_main]

mod maps;
mod peername;
mod redirect;
mod track;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
