//! The agent: listeners, kernel programs, proxy and audit, started together
//! and stopped in the order that loses nothing. `warden run` starts one for
//! a single program; a host daemon will start the same agent for many cgroups.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use chrono::Utc;
use tokio::{io::unix::AsyncFd, net::TcpListener};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use warden_common::UdpDenied;

use crate::{
    approvals::{Approvals, Fetcher, control, review},
    audit::{AuditConfig, AuditSink, AuditWriter, ConnectionRow, Event, EventRow, RECORDINGS_DIR},
    capture::{Capture, Listener},
    identity::Origin,
    metrics::Metrics,
    policy::{ApprovalSettings, ConnectionRequest, Policy, Transport},
    proxy::{Proxy, detect::Protocol, intercept::Interceptor, ssh::HostKeys},
};

pub struct AgentOptions {
    /// Port of the loopback listeners (127.0.0.1 and ::1); 0 picks a free one.
    pub listen_port: u16,
    pub policy: Policy,
    pub audit: AuditConfig,
    /// This agent's directory in bpffs.
    pub pin_dir: PathBuf,
    /// TLS interception; None relays TLS as opaque bytes.
    pub tls: Option<Interceptor>,
    /// Extra CAs the agent trusts for its own TLS (servers, the identity
    /// provider, the approvals webhook).
    pub upstream_ca: Vec<PathBuf>,
    /// The control API's socket, served when the policy has `approvals:`.
    pub control_socket: PathBuf,
    /// Where the reviewers' web page listens (loopback), if anywhere.
    pub review_listen: Option<SocketAddr>,
    /// Where the control API also listens, with TLS (loopback), if anywhere.
    pub control_listen: Option<SocketAddr>,
    /// The host keys SSH clients are shown; None relays SSH as opaque bytes.
    pub ssh_host_keys: Option<Arc<HostKeys>>,
    /// Where Prometheus metrics are served (loopback), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

pub struct Agent {
    capture: Arc<Capture>,
    sink: AuditSink,
    audit: AuditWriter,
    tracker: TaskTracker,
    cancel: CancellationToken,
    listener: SocketAddr,
    approvals: Option<Arc<Approvals>>,
}

/// What a stop left behind, for the caller to report.
#[derive(Debug)]
pub struct StopReport {
    pub rows_written: u64,
    pub connections_cut: bool,
}

impl Agent {
    pub async fn start(options: AgentOptions) -> anyhow::Result<Agent> {
        raise_fd_limit();
        let (v4, v6) = bind_listeners(options.listen_port).await?;
        let port = v4.local_addr()?.port();
        let capture = Arc::new(
            Capture::load(
                Listener {
                    v4: Ipv4Addr::LOCALHOST,
                    v6: Ipv6Addr::LOCALHOST,
                    port,
                },
                options.pin_dir,
            )
            .context("loading the kernel programs")?,
        );
        capture.set_udp_allowed(&options.policy.udp_allowed_ports())?;
        let recordings = options.audit.dir.join(RECORDINGS_DIR);
        let metrics = options.metrics_listen.map(|_| Arc::new(Metrics::new()));
        let (sink, audit) = AuditWriter::start_with_metrics(options.audit, metrics.clone())
            .context("starting the audit writer")?;
        sink.record_event(EventRow::now(
            Event::AgentStarted,
            format!(
                "agent {} started; policy: {}",
                env!("CARGO_PKG_VERSION"),
                options.policy.summary()
            ),
        ));
        let policy = Arc::new(options.policy);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let approvals = match policy.approvals() {
            Some(settings) => Some(
                start_approvals(
                    settings,
                    &policy,
                    &sink,
                    &options.upstream_ca,
                    options.control_socket,
                    cancel.clone(),
                )
                .await?,
            ),
            None => None,
        };
        if options.review_listen.is_some() || options.control_listen.is_some() {
            let Some(approvals) = &approvals else {
                anyhow::bail!(
                    "--review-listen and --control-listen serve reviewers, and this policy holds nothing for review: add an `approvals:` section and rules with `action: approve`"
                );
            };
            let Some(tls) = &options.tls else {
                anyhow::bail!(
                    "the review page and the control port are served over TLS with the agent's CA: run without --no-tls-intercept"
                );
            };
            if let Some(addr) = options.review_listen {
                review::start(addr, tls.authority(), approvals.clone(), cancel.clone()).await?;
            }
            if let Some(addr) = options.control_listen {
                control::serve_tls(addr, tls.authority(), approvals.clone(), cancel.clone())
                    .await?;
            }
        }
        if let (Some(addr), Some(metrics)) = (options.metrics_listen, metrics) {
            crate::metrics::serve(addr, metrics, approvals.clone(), cancel.clone()).await?;
        }
        let proxy = Arc::new(Proxy {
            capture: capture.clone(),
            policy: policy.clone(),
            audit: sink.clone(),
            tls: options.tls,
            lineage: Arc::default(),
            approvals: approvals.clone(),
            ssh_host_keys: options.ssh_host_keys,
            recordings: Some(recordings),
        });
        tokio::spawn(proxy.clone().serve(v4, tracker.clone(), cancel.clone()));
        tokio::spawn(proxy.serve(v6, tracker.clone(), cancel.clone()));
        if let Some(ring) = capture.take_udp_denials() {
            tokio::spawn(audit_udp_denials(
                ring,
                policy,
                sink.clone(),
                cancel.clone(),
            ));
        }
        tracing::info!(port, "agent listening on 127.0.0.1 and [::1]");
        Ok(Agent {
            capture,
            sink,
            audit,
            tracker,
            cancel,
            listener: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            approvals,
        })
    }

    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// Redirect the connections of every process in a cgroup (and below it).
    pub fn attach(&self, cgroup: &Path) -> anyhow::Result<()> {
        self.capture
            .attach(cgroup)
            .with_context(|| format!("attaching to cgroup {}", cgroup.display()))
    }

    pub fn detach(&self, cgroup: &Path) {
        self.capture.detach(cgroup);
    }

    /// Stop: no new connections, in-flight ones get `grace` to finish, then
    /// the audit is flushed. The caller detaches cgroups first (or kills
    /// what is in them), so that nothing slips through unredirected.
    pub async fn stop(self, grace: Duration) -> anyhow::Result<StopReport> {
        self.cancel.cancel();
        // Held requests are refused now rather than cut at the end of the
        // grace: their clients get the reason.
        if let Some(approvals) = &self.approvals {
            approvals.abandon_all("the agent stopped before a reviewer decided");
        }
        self.tracker.close();
        let connections_cut = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err();
        if connections_cut {
            tracing::warn!(?grace, "connections still open at shutdown were cut");
        }
        let (pending, flows) = self.capture.records_in_flight();
        tracing::info!(pending, flows, "kernel records left at stop");
        self.capture.detach_all();
        self.sink.record_event(EventRow::now(
            Event::AgentStopped,
            if connections_cut {
                format!("agent stopped; connections still open after {grace:?} were cut")
            } else {
                "agent stopped".to_string()
            },
        ));
        let rows_written = self.audit.shutdown().await.context("flushing the audit")?;
        Ok(StopReport {
            rows_written,
            connections_cut,
        })
    }
}

/// The approvals broker and its control socket; the identity provider is
/// read now so that a wrong issuer shows at start (the agent serves on
/// without it: reviews fail until it answers).
async fn start_approvals(
    settings: &ApprovalSettings,
    policy: &Arc<Policy>,
    sink: &AuditSink,
    upstream_ca: &[PathBuf],
    socket: PathBuf,
    cancel: CancellationToken,
) -> anyhow::Result<Arc<Approvals>> {
    let tls = crate::tls::upstream_config(upstream_ca, &[b"http/1.1".to_vec()])?;
    let approvals = Approvals::new(settings, policy.clone(), sink.clone(), Fetcher::new(tls));
    if let Err(error) = approvals.verifier().discover().await {
        tracing::warn!(%error, "reviewers cannot sign in until the identity provider answers");
    }
    let listener = control::bind(&socket).await?;
    tracing::info!(socket = %socket.display(), "control API listening");
    tokio::spawn(control::serve(listener, socket, approvals.clone(), cancel));
    Ok(approvals)
}

/// Each proxied connection holds two sockets and two pipes: lift the soft
/// descriptor limit to the hard one so that thousands of connections fit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn bind_listeners(port: u16) -> anyhow::Result<(TcpListener, TcpListener)> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow::anyhow!("{addr} is already in use: another agent or program listens there; choose another port with --listen-port, or 0 for a free one")
            } else {
                anyhow::anyhow!("binding the agent's listener on {addr}: {e}")
            }
        })
    };
    if port != 0 {
        let v4 = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)).await?;
        let v6 = bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)).await?;
        return Ok((v4, v6));
    }
    // Both families must share one port: the kernel programs know only one.
    for _ in 0..32 {
        let v4 = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
        let port = v4.local_addr()?.port();
        if let Ok(v6) = TcpListener::bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)).await {
            return Ok((v4, v6));
        }
    }
    anyhow::bail!("found no port free on both 127.0.0.1 and [::1]; pass one with --listen-port")
}

/// The kernel refuses non-DNS UDP on its own; this turns its reports into audit rows.
async fn audit_udp_denials(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    policy: Arc<Policy>,
    audit: AuditSink,
    cancel: CancellationToken,
) {
    // SAFETY: the ring buffer owns its map descriptor for as long as the AsyncFd owns the ring.
    let mut ring = match unsafe {
        AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the UDP denial ring; refused UDP will not be audited");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            ready = ring.readable_mut() => match ready { Ok(g) => g, Err(_) => return },
        };
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            if item.len() < size_of::<UdpDenied>() {
                continue;
            }
            // SAFETY: the kernel wrote a UdpDenied; read_unaligned copes with the ring's alignment.
            let event: UdpDenied = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let origin = Origin::from_record(&event.conn);
            let decision = policy.decide_connection(&ConnectionRequest {
                identity: &origin.identity,
                destination: origin.destination,
                transport: Transport::Udp,
            });
            let now = Utc::now();
            audit.record(ConnectionRow {
                session_id: uuid::Uuid::now_v7().to_string(),
                start_time: now,
                end_time: now,
                transport: "udp",
                identity: origin.identity,
                workload: decision.workload,
                destination: origin.destination,
                protocol: Protocol::None.as_str(),
                server_name: None,
                tls: None,
                decision: "deny",
                rule: "udp".into(),
                bytes_up: 0,
                bytes_down: 0,
                error: Some("UDP to this port is not allowed (policy udp.allow_ports)".into()),
            });
        }
        guard.clear_ready();
    }
}
