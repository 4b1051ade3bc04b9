//! Network namespaces: where the agent listens and connects.
//!
//! The kernel programs send a redirected connect() to the loopback of the
//! namespace the socket was made in, and a pod (or a service with
//! `PrivateNetwork=`) has a loopback of its own. So the agent listens, and
//! opens the upstream connection, in each namespace its managed processes
//! live in; the programs refuse a connect from any other. A socket stays in
//! the namespace it was made in: one thread per namespace enters it once
//! (setns) and makes sockets there for the rest of the agent.
use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs, io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::cgroup;

/// How /proc names a namespace: the device and inode of `/proc/PID/ns/net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsId {
    dev: u64,
    ino: u64,
}

impl NsId {
    fn of(path: &Path) -> io::Result<NsId> {
        let meta = fs::metadata(path)?;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    pub fn of_pid(pid: u32) -> io::Result<NsId> {
        NsId::of(Path::new(&format!("/proc/{pid}/ns/net")))
    }
}

/// As `ip netns identify` and `ls -l /proc/PID/ns` show it.
impl fmt::Display for NsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("reading the network namespace of process {pid}: {source}")]
    Proc {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "entering network namespace {ns} (process {pid}): {source}; serving processes that have \
         a network namespace of their own (pods, services with PrivateNetwork=) needs \
         CAP_SYS_ADMIN: grant it to the agent, or their connections stay refused"
    )]
    Enter {
        ns: NsId,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("listening on {addr} in network namespace {ns}: {source}")]
    Listen {
        ns: NsId,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

type Order = (Domain, Box<dyn FnOnce(io::Result<Socket>) + Send>);

/// A network namespace the agent works in.
pub struct Namespace {
    pub id: NsId,
    /// How the kernel programs name it (SO_NETNS_COOKIE).
    pub cookie: u64,
    /// Makes sockets inside it; None in the agent's own namespace.
    maker: Option<mpsc::Sender<Order>>,
}

impl Namespace {
    /// The namespace the agent runs in.
    pub fn own() -> io::Result<Namespace> {
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        Ok(Namespace {
            id: NsId::of(Path::new("/proc/self/ns/net"))?,
            cookie: cookie_of(&probe)?,
            maker: None,
        })
    }

    /// The namespace process `pid` is in, entered by a thread of its own.
    pub fn enter(pid: u32) -> Result<Namespace, NetnsError> {
        let proc_err = |source| NetnsError::Proc { pid, source };
        let handle = fs::File::open(format!("/proc/{pid}/ns/net")).map_err(proc_err)?;
        let meta = handle.metadata().map_err(proc_err)?;
        let id = NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let (orders, inbox) = mpsc::channel::<Order>();
        let (ready, entered) = mpsc::sync_channel::<io::Result<u64>>(1);
        std::thread::Builder::new()
            .name(format!("netns-{}", id.ino))
            .stack_size(128 * 1024)
            .spawn(move || {
                // SAFETY: setns only changes this thread's namespace; the
                // descriptor is open for the call.
                if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = ready.send(Err(io::Error::last_os_error()));
                    return;
                }
                drop(handle);
                let probe = Socket::new(Domain::IPV4, Type::STREAM, None);
                let _ = ready.send(probe.and_then(|s| cookie_of(&s)));
                // Ends when the Namespace, the only sender, is dropped.
                for (domain, reply) in inbox {
                    reply(Socket::new(domain, Type::STREAM, None));
                }
            })
            .map_err(|source| NetnsError::Enter {
                ns: id,
                pid,
                source,
            })?;
        let cookie = entered
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread ended")))
            .map_err(|source| NetnsError::Enter {
                ns: id,
                pid,
                source,
            })?;
        Ok(Namespace {
            id,
            cookie,
            maker: Some(orders),
        })
    }

    /// A listener on `addr` in this namespace. Needs a tokio runtime.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, NetnsError> {
        let listen_err = |source| NetnsError::Listen {
            ns: self.id,
            addr,
            source,
        };
        let socket = match &self.maker {
            None => Socket::new(Domain::for_address(addr), Type::STREAM, None),
            Some(maker) => {
                let (tx, rx) = mpsc::sync_channel(1);
                send(
                    maker,
                    Domain::for_address(addr),
                    Box::new(move |s| {
                        let _ = tx.send(s);
                    }),
                )
                .and_then(|()| rx.recv().map_err(|_| thread_gone()))
                .and_then(|s| s)
            }
        }
        .map_err(listen_err)?;
        bind_and_listen(socket, addr).map_err(listen_err)
    }

    /// Connect to `addr` from this namespace, as the managed process would.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let Some(maker) = &self.maker else {
            return TcpStream::connect(addr).await;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        send(
            maker,
            Domain::for_address(addr),
            Box::new(move |s| {
                let _ = tx.send(s);
            }),
        )?;
        let socket = rx.await.map_err(|_| thread_gone())??;
        socket.set_nonblocking(true)?;
        let socket = TcpSocket::from_std_stream(OwnedFd::from(socket).into());
        socket.connect(addr).await
    }
}

/// A listener on `addr` in the agent's own namespace. Needs a tokio runtime.
pub fn listen_here(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_and_listen(
        Socket::new(Domain::for_address(addr), Type::STREAM, None)?,
        addr,
    )
}

/// Room for a burst of connects: with the usual 1024 (or less), a thousand
/// programs connecting at once overflow the queue, and the kernel falls
/// back to SYN cookies, which can revive a connection that already ended as
/// a new one the agent has no record of. The kernel caps it at somaxconn.
const BACKLOG: i32 = 4096;

fn bind_and_listen(socket: Socket, addr: SocketAddr) -> io::Result<TcpListener> {
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

fn send(
    maker: &mpsc::Sender<Order>,
    domain: Domain,
    reply: Box<dyn FnOnce(io::Result<Socket>) + Send>,
) -> io::Result<()> {
    maker.send((domain, reply)).map_err(|_| thread_gone())
}

fn thread_gone() -> io::Error {
    io::Error::other("the agent's thread in this network namespace ended")
}

/// SO_NETNS_COOKIE (Linux 5.14): the name eBPF programs see.
fn cookie_of(socket: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Hands a new listener to the proxy, with the namespace its connections
/// come from and the token that ends its accept loop.
pub type Serve = Box<dyn Fn(TcpListener, Arc<Namespace>, CancellationToken) + Send + Sync>;

/// The namespaces the agent serves besides its own, and which managed
/// cgroups have processes in each, so that a namespace is let go (and its
/// listeners closed, which lets the kernel free it) when the last goes.
pub struct Namespaces {
    own: NsId,
    port: u16,
    serve: Serve,
    cancel: CancellationToken,
    served: Mutex<HashMap<NsId, Served>>,
}

struct Served {
    ns: Arc<Namespace>,
    stop: CancellationToken,
    cgroups: BTreeSet<PathBuf>,
}

impl Served {
    /// `cgroup` has no processes here any more. True when no managed
    /// cgroup has: the listeners are then stopped.
    fn leave(&mut self, cgroup: &Path) -> bool {
        self.cgroups.remove(cgroup);
        let unused = self.cgroups.is_empty();
        if unused {
            self.stop.cancel();
        }
        unused
    }
}

/// What changed when a cgroup's namespaces were looked at again.
#[derive(Debug, Default)]
pub struct Followed {
    /// Namespaces newly served, with their cookies for the kernel's map.
    pub added: Vec<(NsId, u64)>,
    /// Namespaces no managed process is in any more: let go.
    pub gone: Vec<(NsId, u64)>,
    /// Namespaces that could not be served: their connections stay refused.
    pub failed: Vec<NetnsError>,
}

impl Namespaces {
    pub fn new(own: NsId, port: u16, serve: Serve, cancel: CancellationToken) -> Namespaces {
        Namespaces {
            own,
            port,
            serve,
            cancel,
            served: Mutex::default(),
        }
    }

    /// Serve every namespace that the processes in `cgroup` (and below it)
    /// are in, and only those. Called when a cgroup is managed, and again
    /// when processes come into it or a connect came from a namespace not
    /// served; a namespace its processes left is let go, unless another
    /// managed cgroup still has processes there.
    pub fn follow(&self, cgroup: &Path) -> Followed {
        let mut followed = Followed::default();
        let mut served = self.served.lock().expect("netns lock");
        let found = namespaces_below(cgroup);
        served.retain(|id, entry| {
            if found.iter().any(|(f, _)| f == id) || !entry.cgroups.contains(cgroup) {
                return true;
            }
            let unused = entry.leave(cgroup);
            if unused {
                followed.gone.push((*id, entry.ns.cookie));
            }
            !unused
        });
        for (id, pid) in found {
            if id == self.own {
                continue;
            }
            if let Some(entry) = served.get_mut(&id) {
                entry.cgroups.insert(cgroup.to_path_buf());
                continue;
            }
            match self.open(pid) {
                Ok(entry) => {
                    tracing::info!(netns = %id, cgroup = %cgroup.display(), "listening in the network namespace of a managed cgroup");
                    followed.added.push((id, entry.ns.cookie));
                    let mut entry = entry;
                    entry.cgroups.insert(cgroup.to_path_buf());
                    served.insert(id, entry);
                }
                Err(e) => followed.failed.push(e),
            }
        }
        followed
    }

    fn open(&self, pid: u32) -> Result<Served, NetnsError> {
        let ns = Arc::new(Namespace::enter(pid)?);
        let stop = self.cancel.child_token();
        // Both listeners, or none: a namespace served half-way would give
        // its IPv6 connects to whatever else listens there.
        let v4 = ns.listen(SocketAddr::from(([127, 0, 0, 1], self.port)))?;
        let v6 = ns.listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.port)));
        (self.serve)(v4, ns.clone(), stop.clone());
        match v6 {
            Ok(v6) => (self.serve)(v6, ns.clone(), stop.clone()),
            // A namespace without IPv6 cannot be sent to [::1] either.
            Err(e) => {
                tracing::debug!(netns = %ns.id, error = %e, "no IPv6 loopback in a managed network namespace")
            }
        }
        Ok(Served {
            ns,
            stop,
            cgroups: BTreeSet::new(),
        })
    }

    /// `cgroup` is no longer managed: the namespaces only it used are let
    /// go. Returns their cookies, for the kernel's map.
    pub fn forget(&self, cgroup: &Path) -> Vec<(NsId, u64)> {
        let mut served = self.served.lock().expect("netns lock");
        let mut gone = Vec::new();
        served.retain(|id, entry| {
            let unused = entry.leave(cgroup);
            if unused {
                gone.push((*id, entry.ns.cookie));
            }
            !unused
        });
        gone
    }

    /// The namespaces served, and the cgroups that use each.
    pub fn served(&self) -> Vec<(NsId, Vec<PathBuf>)> {
        let served = self.served.lock().expect("netns lock");
        let mut list: Vec<_> = served
            .iter()
            .map(|(id, e)| (*id, e.cgroups.iter().cloned().collect()))
            .collect();
        list.sort();
        list
    }
}

/// Each namespace the processes in `cgroup` and below are in, with one
/// process in it (to enter it through).
fn namespaces_below(cgroup: &Path) -> Vec<(NsId, u32)> {
    let mut found: HashMap<NsId, u32> = HashMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for pid in cgroup::pids_in(&dir) {
            // A process that exited meanwhile has nothing left to serve.
            if let Ok(id) = NsId::of_pid(pid) {
                found.entry(id).or_insert(pid);
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    let mut list: Vec<_> = found.into_iter().collect();
    list.sort();
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_namespace_has_a_cookie_and_an_inode() {
        let own = Namespace::own().unwrap();
        assert_ne!(own.cookie, 0);
        assert_eq!(own.id, NsId::of_pid(std::process::id()).unwrap());
        assert!(own.id.to_string().starts_with("net:["));
    }

    #[tokio::test]
    async fn the_own_namespace_listens_and_connects() {
        let own = Namespace::own().unwrap();
        let listener = own.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(own.connect(addr), listener.accept());
        assert_eq!(client.unwrap().local_addr().unwrap(), accepted.unwrap().1);
    }

    /// Entering our own namespace through /proc works like entering any
    /// other: sockets come back from the namespace's thread.
    #[tokio::test]
    async fn an_entered_namespace_makes_sockets_in_it() {
        let entered = Namespace::enter(std::process::id()).unwrap();
        let own = Namespace::own().unwrap();
        assert_eq!(entered.id, own.id);
        assert_eq!(entered.cookie, own.cookie);
        let listener = entered.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(entered.connect(addr), listener.accept());
        assert_eq!(client.unwrap().local_addr().unwrap(), accepted.unwrap().1);
    }
}
