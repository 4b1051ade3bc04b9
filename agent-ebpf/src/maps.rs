//! Maps shared by the programs, and the agent's settings.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LruHashMap, RingBuf},
};
use warden_common::{AgentConfig, ConnRecord, FlowKey, MAX_FLOWS, MAX_NETNS, MAX_PENDING};

/// Set by the agent at load time: its listener and its own process id.
#[unsafe(no_mangle)]
pub static WARDEN_CONFIG: Global<AgentConfig> = Global::new(AgentConfig {
    listen_v4: [0; 4],
    listen_v6: [0; 16],
    listen_port: 0,
    _pad: 0,
    agent_tgid: 0,
});

/// Records by socket cookie, from connect() until the connection is established.
#[map]
pub static WARDEN_PENDING: LruHashMap<u64, ConnRecord> =
    LruHashMap::with_max_entries(MAX_PENDING, 0);

/// Records by the connection's address pair, until the agent accepts it.
#[map]
pub static WARDEN_FLOWS: LruHashMap<FlowKey, ConnRecord> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// The network namespaces where the agent listens, by cookie. A connect
/// from any other is refused: its loopback has no agent, or a stranger.
#[map]
pub static WARDEN_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_NETNS, 0);

/// UDP destination ports a managed process may use (DNS by default).
#[map]
pub static WARDEN_UDP_ALLOW: HashMap<u16, u8> = HashMap::with_max_entries(256, 0);

/// Refused UDP sends and connects from unserved namespaces, for the audit.
#[map]
pub static WARDEN_REFUSED: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// The original peer of each redirected socket, by cookie, so that
/// getpeername() shows the program the address it connected to. Removed
/// when the socket closes.
#[map]
pub static WARDEN_PEERS: LruHashMap<u64, PeerName> = LruHashMap::with_max_entries(MAX_PENDING, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PeerName {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}
