//! (being written)
use std::net::{IpAddr, Ipv6Addr};

/// A 16-byte address from the kernel; IPv4-mapped addresses become IPv4.
pub fn addr_from_bytes(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}
