//! Capture: the kernel side of the data path, seen from user space.
//!
//! Loads the embedded eBPF programs with the agent's listener baked in,
//! attaches them to cgroups, pins the links in bpffs (so that a dead agent
//! leaves its cgroups failing closed rather than open), and hands the proxy
//! the kernel's record of each redirected connection.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use warden_common::{AgentConfig, ConnRecord, FlowKey, mapped_v4, names};

/// The kernel programs, built by agent/build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warden-ebpf.o"));

const PROGRAMS: [&str; 7] = [
    names::CONNECT4,
    names::CONNECT6,
    names::SENDMSG4,
    names::SENDMSG6,
    names::GETPEERNAME4,
    names::GETPEERNAME6,
    names::SOCK_OPS,
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading the eBPF programs into the kernel failed: {0}; check that the kernel has BTF and cgroup BPF support"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "the eBPF object has no {0}; the binary was built from mismatched sources, rebuild with `cargo xtask build`"
    )]
    Missing(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "eBPF program {name}: the kernel gave no bpf link ({source}); Warden needs Linux 5.8 or newer"
    )]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning {path}: {reason}; is /sys/fs/bpf a BPF file system?")]
    Pin { path: PathBuf, reason: String },
}

/// Where the kernel sends redirected connections.
#[derive(Clone, Copy, Debug)]
pub struct Listener {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub port: u16,
}

pub struct Capture {
    ebpf: Mutex<Ebpf>,
    pending: HashMap<MapData, u64, ConnRecord>,
    flows: Mutex<HashMap<MapData, FlowKey, ConnRecord>>,
    udp_allow: Mutex<HashMap<MapData, u16, u8>>,
    netns: Mutex<HashMap<MapData, u64, u8>>,
    refused: Mutex<Option<RingBuf<MapData>>>,
    /// Where the links are pinned; None holds them by descriptor only.
    pin_dir: Option<PathBuf>,
    attached: Mutex<Vec<Attachment>>,
}

struct Attachment {
    cgroup: PathBuf,
    links: Links,
}

/// Pinned links outlive the agent, so that its cgroups fail closed when it
/// dies; held ones go with its descriptors, and its cgroups fail open.
enum Links {
    Pinned(Vec<PinnedLink>),
    Held(Vec<FdLink>),
}

impl Capture {
    /// Load the programs for this agent. `pin_dir` is this agent's own
    /// directory in bpffs, e.g. /sys/fs/bpf/warden/agent-1234; None leaves
    /// the links unpinned (fail open).
    pub fn load(listener: Listener, pin_dir: Option<PathBuf>) -> Result<Capture, CaptureError> {
        let config = AgentConfig {
            listen_v4: listener.v4.octets(),
            listen_v6: listener.v6.octets(),
            listen_port: listener.port,
            _pad: 0,
            agent_tgid: std::process::id(),
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &config, true)
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;
        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
            let loaded = match program {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => return Err(CaptureError::Missing(name)),
            };
            loaded.map_err(|source| CaptureError::Program { name, source })?;
        }
        let pending = take_map(&mut ebpf, names::PENDING)?;
        let flows = take_map(&mut ebpf, names::FLOWS)?;
        let udp_allow = take_map(&mut ebpf, names::UDP_ALLOW)?;
        let netns = take_map(&mut ebpf, names::NETNS)?;
        let refused = RingBuf::try_from(
            ebpf.take_map(names::REFUSED)
                .ok_or(CaptureError::Missing(names::REFUSED))?,
        )
        .map_err(|source| CaptureError::Map {
            name: names::REFUSED,
            source,
        })?;
        if let Some(dir) = &pin_dir {
            fs::create_dir_all(dir).map_err(|e| CaptureError::Pin {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Capture {
            ebpf: Mutex::new(ebpf),
            pending,
            flows: Mutex::new(flows),
            udp_allow: Mutex::new(udp_allow),
            netns: Mutex::new(netns),
            refused: Mutex::new(Some(refused)),
            pin_dir,
            attached: Mutex::new(Vec::new()),
        })
    }

    /// Attach every program to a cgroup. Attachments are bpf links, which
    /// the kernel always stacks (the mode's flags are for the older
    /// attach call): a `warden run` inside a unit a daemon manages keeps
    /// working, and the programs skip connections already aimed at a listener.
    pub fn attach(&self, cgroup: &Path) -> Result<(), CaptureError> {
        let dir = fs::File::open(cgroup).map_err(|source| CaptureError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let tag = cgroup_tag(cgroup);
        let mut ebpf = self.ebpf.lock().expect("capture lock");
        let mut links = Vec::new();
        let mut pinned = Vec::new();
        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
            let fd_link: FdLink = match program {
                aya::programs::Program::CgroupSockAddr(p) => attach_sock_addr(p, &dir, name)?,
                aya::programs::Program::SockOps(p) => attach_sock_ops(p, &dir, name)?,
                _ => return Err(CaptureError::Missing(name)),
            };
            match &self.pin_dir {
                Some(dir) => {
                    let path = dir.join(format!("{tag}-{name}"));
                    match fd_link.pin(&path) {
                        Ok(link) => pinned.push(link),
                        Err(e) => {
                            // The links pinned so far would keep redirecting.
                            unpin_all(pinned);
                            return Err(CaptureError::Pin {
                                path,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                None => links.push(fd_link),
            }
        }
        let links = if self.pin_dir.is_some() {
            Links::Pinned(pinned)
        } else {
            Links::Held(links)
        };
        self.attached
            .lock()
            .expect("capture lock")
            .push(Attachment {
                cgroup: cgroup.into(),
                links,
            });
        Ok(())
    }

    /// The cgroups attached now, in the order they were.
    pub fn attached(&self) -> Vec<PathBuf> {
        self.attached
            .lock()
            .expect("capture lock")
            .iter()
            .map(|a| a.cgroup.clone())
            .collect()
    }

    /// Whether this agent's links outlive it (fail closed).
    pub fn pinned(&self) -> bool {
        self.pin_dir.is_some()
    }

    /// Detach from one cgroup: its new connections are no longer redirected.
    pub fn detach(&self, cgroup: &Path) {
        let mut attached = self.attached.lock().expect("capture lock");
        let (gone, kept): (Vec<_>, Vec<_>) = attached.drain(..).partition(|a| a.cgroup == cgroup);
        *attached = kept;
        for attachment in gone {
            attachment.links.release();
        }
    }

    /// Detach from every cgroup and remove this agent's pins.
    pub fn detach_all(&self) {
        let all: Vec<_> = self
            .attached
            .lock()
            .expect("capture lock")
            .drain(..)
            .collect();
        for attachment in all {
            attachment.links.release();
        }
        if let Some(dir) = &self.pin_dir {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Stop holding the links but leave them pinned: the cgroups keep
    /// failing closed until another agent takes over or `warden cleanup`.
    pub fn leave_pinned(&self) {
        self.attached.lock().expect("capture lock").clear();
    }

    /// The agent listens in the network namespace with this cookie: its
    /// processes' connects are redirected there, no longer refused.
    pub fn serve_netns(&self, cookie: u64) -> Result<(), CaptureError> {
        let mut map = self.netns.lock().expect("capture lock");
        map.insert(cookie, 1, 0)
            .map_err(|source| CaptureError::Map {
                name: names::NETNS,
                source,
            })
    }

    /// It no longer does: connects from there are refused again.
    pub fn unserve_netns(&self, cookie: u64) {
        let _ = self.netns.lock().expect("capture lock").remove(&cookie);
    }

    /// The kernel's record of an accepted connection, removed from the map
    /// (each record is read once, so the map never fills). `netns` is the
    /// cookie of the namespace the listener that accepted it is in.
    pub fn take_flow(
        &self,
        netns: u64,
        client: SocketAddr,
        listener: SocketAddr,
    ) -> Option<ConnRecord> {
        let key = FlowKey {
            netns,
            client_addr: addr_to_bytes(client.ip()),
            proxy_addr: addr_to_bytes(listener.ip()),
            client_port: client.port(),
            proxy_port: listener.port(),
            _pad: 0,
        };
        let mut flows = self.flows.lock().expect("capture lock");
        let record = flows.get(&key, 0).ok()?;
        let _ = flows.remove(&key);
        Some(record)
    }

    /// Records still in the kernel maps: connections being set up, and
    /// connections established but not yet accepted. Both drain to zero when
    /// nothing is in flight; a count that grows means records leak.
    pub fn records_in_flight(&self) -> (usize, usize) {
        let pending = self.pending.keys().filter(Result::is_ok).count();
        let flows = self
            .flows
            .lock()
            .expect("capture lock")
            .keys()
            .filter(Result::is_ok)
            .count();
        (pending, flows)
    }

    /// Set the UDP destination ports managed processes may use.
    pub fn set_udp_allowed(&self, ports: &[u16]) -> Result<(), CaptureError> {
        let mut map = self.udp_allow.lock().expect("capture lock");
        let old: Vec<u16> = map.keys().filter_map(Result::ok).collect();
        for port in old.iter().filter(|p| !ports.contains(p)) {
            let _ = map.remove(port);
        }
        for &port in ports {
            map.insert(port, 1, 0).map_err(|source| CaptureError::Map {
                name: names::UDP_ALLOW,
                source,
            })?;
        }
        Ok(())
    }

    /// The ring of refused UDP sends; taken once, by the task that audits them.
    pub fn take_refusals(&self) -> Option<RingBuf<MapData>> {
        self.refused.lock().expect("capture lock").take()
    }
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, CaptureError> {
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    HashMap::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn attach_sock_addr(
    p: &mut CgroupSockAddr,
    cgroup: impl AsFd,
    name: &'static str,
) -> Result<FdLink, CaptureError> {
    let err = |source| CaptureError::Program { name, source };
    let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
    let link = p.take_link(id).map_err(err)?;
    FdLink::try_from(link).map_err(|source| CaptureError::Link { name, source })
}

fn attach_sock_ops(
    p: &mut SockOps,
    cgroup: impl AsFd,
    name: &'static str,
) -> Result<FdLink, CaptureError> {
    let err = |source| CaptureError::Program { name, source };
    let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
    let link = p.take_link(id).map_err(err)?;
    FdLink::try_from(link).map_err(|source| CaptureError::Link { name, source })
}

impl Links {
    /// Detach now.
    fn release(self) {
        match self {
            Links::Pinned(links) => unpin_all(links),
            Links::Held(links) => drop(links),
        }
    }
}

/// Removing the pin drops the last reference to the link: it detaches.
fn unpin_all(links: Vec<PinnedLink>) {
    for link in links {
        if let Err(e) = link.unpin() {
            tracing::warn!(error = %e, "could not unpin a link; remove it under /sys/fs/bpf/warden by hand");
        }
    }
}

/// A file-name-safe tag for a cgroup: its inode number, unique while it exists.
fn cgroup_tag(cgroup: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(cgroup)
        .map(|m| format!("cg{}", m.ino()))
        .unwrap_or_else(|_| "cg".into())
}

/// A 16-byte address from the kernel; IPv4-mapped addresses become IPv4.
pub fn addr_from_bytes(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The kernel's key form of an address: IPv4 as IPv4-mapped IPv6.
pub fn addr_to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => mapped_v4(v4.octets()),
            None => v6.octets(),
        },
    }
}

/// A daemon's pin directory is `daemon-<pid>`; a daemon that starts takes
/// over the cgroups its dead predecessors left failing closed.
pub const DAEMON_PIN_PREFIX: &str = "daemon-";

/// Pins left by agents that are gone. Their cgroups still fail closed; this
/// is what `warden cleanup` and a starting agent look at.
pub fn stale_pin_dirs(bpffs: &Path) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = fs::read_dir(bpffs.join("warden")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = name
                .strip_prefix("agent-")
                .or_else(|| name.strip_prefix(DAEMON_PIN_PREFIX))?
                .parse()
                .ok()?;
            (!Path::new(&format!("/proc/{pid}")).exists()).then(|| (e.path(), pid))
        })
        .collect()
}

/// Remove a dead agent's pins: its programs detach from its cgroups.
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        fs::remove_file(entry?.path())?;
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_kernel_form() {
        for ip in ["127.0.0.1", "::1", "10.1.2.3", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(addr_from_bytes(addr_to_bytes(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            addr_from_bytes(addr_to_bytes(mapped)),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
