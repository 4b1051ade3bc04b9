//! The records the kernel programs write and the agent reads.
//!
//! Addresses are stored as 16 bytes in network order; IPv4 is stored in its
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so that one key type serves both
//! families and a mapped connect from a dual-stack socket matches the IPv4
//! connection the agent accepts. Ports are in host order.
#![no_std]

/// Where a connection was headed and who asked, recorded at connect() time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    pub cgroup_id: u64,
    /// The network namespace the socket was made in (its cookie): loopback
    /// addresses and ports repeat across namespaces.
    pub netns: u64,
    pub orig_addr: [u8; 16],
    pub orig_port: u16,
    /// 4 or 6: the family the process used (a mapped address counts as 4).
    pub family: u8,
    pub _pad: u8,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
    /// Explicit so that no byte of the record is uninitialised padding.
    pub _pad2: u32,
}

/// The redirected connection as both ends see it: the client's local address
/// and the agent's listener address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The network namespace's cookie: the agent listens on the same
    /// loopback address and port in every namespace it serves.
    pub netns: u64,
    pub client_addr: [u8; 16],
    pub proxy_addr: [u8; 16],
    pub client_port: u16,
    pub proxy_port: u16,
    /// Explicit so that no byte of the key is uninitialised padding.
    pub _pad: u32,
}

/// A connect or datagram the kernel refused, and why, for the audit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub conn: ConnRecord,
    /// One of [`refused`].
    pub reason: u32,
    pub _pad: u32,
}

/// Why the kernel refused.
pub mod refused {
    /// UDP to a port the policy does not allow.
    pub const UDP_PORT: u32 = 1;
    /// A TCP connect from a network namespace where the agent does not listen.
    pub const NETNS: u32 = 2;
}

/// Written once by the agent before the programs run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentConfig {
    /// The agent's IPv4 listener, network order (usually 127.0.0.1).
    pub listen_v4: [u8; 4],
    /// The agent's IPv6 listener, network order (usually ::1).
    pub listen_v6: [u8; 16],
    pub listen_port: u16,
    pub _pad: u16,
    /// The agent's own process, whose connections are never redirected.
    pub agent_tgid: u32,
}

/// Map and program names, shared so that a rename breaks the build, not the agent.
pub mod names {
    pub const CONFIG: &str = "WARDEN_CONFIG";
    pub const PENDING: &str = "WARDEN_PENDING";
    pub const FLOWS: &str = "WARDEN_FLOWS";
    pub const UDP_ALLOW: &str = "WARDEN_UDP_ALLOW";
    pub const REFUSED: &str = "WARDEN_REFUSED";
    pub const NETNS: &str = "WARDEN_NETNS";
    pub const CONNECT4: &str = "warden_connect4";
    pub const CONNECT6: &str = "warden_connect6";
    pub const SENDMSG4: &str = "warden_sendmsg4";
    pub const SENDMSG6: &str = "warden_sendmsg6";
    pub const SOCK_OPS: &str = "warden_track_established";
    pub const GETPEERNAME4: &str = "warden_getpeername4";
    pub const GETPEERNAME6: &str = "warden_getpeername6";
}

/// Capacity of the per-connection maps. Both are LRU maps, so a connection
/// whose record is never consumed (a failed connect, a dead agent) is evicted
/// rather than filling the map.
pub const MAX_PENDING: u32 = 65_536;
pub const MAX_FLOWS: u32 = 65_536;
/// Network namespaces one agent serves (the host's and one per pod).
pub const MAX_NETNS: u32 = 4_096;

/// Build an IPv4-mapped address from an IPv4 address in network order.
pub const fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, and valid for any bit pattern.
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Refused {}
    unsafe impl aya::Pod for super::AgentConfig {}
}
