//! The proxy: every redirected connection, in the order it is handled.
//!
//! 1. attribute: the kernel's record gives the original destination and the process;
//! 2. decide: the policy allows or denies the connection;
//! 3. connect: the agent opens its own connection to the original destination;
//! 4. detect: the first bytes name the protocol (decoders plug in here);
//! 5. relay: PostgreSQL, HTTP and SSH through their decoders (HTTP inside
//!    TLS once [`intercept`] has ended the client's TLS), anything else as
//!    bytes;
//! 6. log: one audit row when the connection ends (decoders add one per request).
pub mod detect;
pub mod http;
pub mod intercept;
mod io;
pub mod postgres;
pub mod relay;
pub mod ssh;
pub mod token;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use chrono::Utc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    approvals::Approvals,
    audit::{AuditSink, ConnectionRow},
    capture::Capture,
    identity::{Identity, Origin},
    lineage::Lineage,
    metrics::Metrics,
    netns::Namespace,
    policy::{Action, ConnectionRequest, LivePolicy, OnAuditFailure, Transport},
};
use bytes::Bytes;
use detect::Protocol;
use intercept::{Interceptor, Tunnel};
use tokio::io::AsyncReadExt;

/// How long the agent waits for the original destination to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel files the record before the client's connect() returns, so a
/// miss is rare; a short retry covers scheduling between the two sockets.
const RECORD_RETRIES: u32 = 5;

/// What every connection handler shares.
pub struct Proxy {
    pub capture: Arc<Capture>,
    /// Connections are decided by the policy in force when they open;
    /// the requests inside them by the one in force when each arrives.
    pub policy: Arc<LivePolicy>,
    pub audit: AuditSink,
    /// TLS interception, unless turned off.
    pub tls: Option<Interceptor>,
    /// What LLM answers proposed, for the statements that follow.
    pub lineage: Arc<Lineage>,
    /// Where requests a rule holds wait for reviewers; None when the
    /// policy has no `approvals:`.
    pub approvals: Option<Arc<Approvals>>,
    /// The keys of the issuers of workload tokens, for HTTP requests that
    /// carry one.
    pub workload_tokens: Arc<token::WorkloadTokens>,
    /// The host keys shown to SSH clients; None: SSH is relayed opaque.
    pub ssh_host_keys: Option<Arc<ssh::HostKeys>>,
    /// Where SSH sessions are recorded (asciicast); None: not recorded.
    pub recordings: Option<PathBuf>,
}

impl Proxy {
    /// Accept until cancelled; each connection runs on the tracker so that
    /// a shutdown can wait for them. `netns` is the network namespace the
    /// listener is in: its connections come from there, and their upstream
    /// connections are opened from there.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        netns: Arc<Namespace>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let proxy = self.clone();
                    let netns = netns.clone();
                    let open = proxy.audit.metrics().map(Metrics::connection_opened);
                    tracker.spawn(async move {
                        proxy.handle(stream, peer, &netns).await;
                        drop(open);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr, netns: &Namespace) {
        let start_time = Utc::now();
        let accepted = std::time::Instant::now();
        let session_id = uuid::Uuid::now_v7().to_string();
        let local = client.local_addr().unwrap_or(peer);

        // 1. attribute
        let Some(origin) = self.attribute(netns.cookie, peer, local).await else {
            tracing::warn!(%peer, "connection without a kernel record refused");
            refuse(client);
            self.audit.record(ConnectionRow {
                session_id,
                start_time,
                end_time: Utc::now(),
                transport: "tcp",
                identity: Identity::default(),
                workload: None,
                destination: local,
                protocol: Protocol::None.as_str(),
                server_name: None,
                tls: None,
                decision: "deny",
                rule: "unattributed".into(),
                bytes_up: 0,
                bytes_down: 0,
                error: Some(
                    "no kernel record for this connection: it did not come through the redirect"
                        .into(),
                ),
            });
            return;
        };

        // 2. decide
        let policy = self.policy.current();
        let decision = policy.decide_connection(&ConnectionRequest {
            identity: &origin.identity,
            destination: origin.destination,
            transport: Transport::Tcp,
        });
        let mut row = ConnectionRow {
            session_id,
            start_time,
            end_time: start_time,
            transport: "tcp",
            identity: origin.identity.clone(),
            workload: decision.workload.clone(),
            destination: origin.destination,
            protocol: Protocol::None.as_str(),
            server_name: None,
            tls: None,
            decision: "allow",
            rule: decision.rule.clone(),
            bytes_up: 0,
            bytes_down: 0,
            error: None,
        };
        if decision.action == Action::Deny {
            refuse(client);
            row.decision = "deny";
            self.finish(row);
            return;
        }
        if policy.on_audit_failure() == OnAuditFailure::FailClosed && !self.audit.writable() {
            // Kept in memory with the rest until the audit is written again.
            refuse(client);
            row.decision = "deny";
            row.rule = "audit.on_failure".into();
            row.error = Some(
                "refused: the audit cannot be written and the policy says audit.on_failure: fail_closed"
                    .into(),
            );
            self.finish(row);
            return;
        }

        // 3. connect
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, netns.connect(origin.destination))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {CONNECT_TIMEOUT:?}"),
                ))
            });
        let upstream = match connected {
            Ok(s) => s,
            Err(e) => {
                refuse(client);
                row.error = Some(format!("upstream connect: {e}"));
                self.finish(row);
                return;
            }
        };
        if let Some(m) = self.audit.metrics() {
            m.connection_set_up(accepted);
        }
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);

        // 4. detect
        let protocol = detect_protocol(&client, &upstream).await;
        row.protocol = protocol.as_str();

        // 5. relay: PostgreSQL through its decoder, TLS through the
        //    interceptor, everything else opaque
        let (moved, error) = match (protocol, &self.tls) {
            (Protocol::Postgres, _) => {
                let session = postgres::Session {
                    session_id: row.session_id.clone(),
                    identity: row.identity.clone(),
                    workload: row.workload.clone(),
                    destination: row.destination,
                    rule: row.rule.clone(),
                    audit: self.audit.clone(),
                    policy: self.policy.clone(),
                    lineage: self.lineage.clone(),
                    approvals: self.approvals.clone(),
                    login: policy.login_for(origin.destination).cloned(),
                    tls: self.tls.as_ref(),
                    upstream_tls: policy
                        .upstream_tls_for(origin.destination)
                        .map(|name| name.map(str::to_string)),
                };
                let served = postgres::serve(client, upstream, &session).await;
                row.tls = served.tls;
                row.server_name = served.server_name;
                (served.moved, served.result.err().map(|e| e.to_string()))
            }
            (Protocol::Tls, Some(interceptor)) => {
                match interceptor
                    .handshake(client, upstream, origin.destination)
                    .await
                {
                    Ok(tunnel) => {
                        row.server_name.clone_from(&tunnel.server_name);
                        row.tls = Some("intercepted");
                        let (moved, error, https) = self.inside_tls(tunnel, &row).await;
                        if https {
                            row.protocol = "https";
                        }
                        (moved, error)
                    }
                    Err(failed) => {
                        row.server_name = failed.server_name;
                        row.tls = Some("failed");
                        (relay::Transferred::default(), Some(failed.error))
                    }
                }
            }
            (Protocol::Ssh, _) => match self.ssh_session(&row) {
                Ok(session) => {
                    let served = ssh::serve(client, upstream, session).await;
                    (served.moved, served.result.err().map(|e| e.to_string()))
                }
                Err(Opaque::Relay(note)) => {
                    let (moved, result) = relay::relay(&client, &upstream).await;
                    (
                        moved,
                        Some(result.err().map_or(note, |e| format!("relay: {e}"))),
                    )
                }
                Err(Opaque::Refuse(why)) => {
                    refuse(client);
                    row.decision = "deny";
                    (relay::Transferred::default(), Some(why))
                }
            },
            (Protocol::Http, _) => {
                // h2c with prior knowledge starts with the HTTP/2 preface.
                let mut first = [0u8; 3];
                let h2 = matches!(client.peek(&mut first).await, Ok(3) if &first == b"PRI");
                let (moved, result) =
                    http::serve(client, upstream, h2, self.http_session(&row, None)).await;
                (moved, result.err().map(|e| e.to_string()))
            }
            _ => {
                let (moved, result) = relay::relay(&client, &upstream).await;
                if result.is_err() {
                    // Pass an abort on as an abort, not as a clean end.
                    refuse(client);
                    refuse(upstream);
                }
                (moved, result.err().map(|e| format!("relay: {e}")))
            }
        };
        row.bytes_up = moved.up;
        row.bytes_down = moved.down;
        row.error = error;

        // 6. log
        self.finish(row);
    }

    /// What runs inside intercepted TLS: HTTP through its decoder when the
    /// server chose h2 or http/1.1, or when the client's first bytes are
    /// HTTP; anything else as bytes. The flag says whether it was HTTP.
    async fn inside_tls(
        &self,
        tunnel: Tunnel,
        row: &ConnectionRow,
    ) -> (relay::Transferred, Option<String>, bool) {
        let Tunnel {
            mut client,
            upstream,
            server_name,
            alpn,
        } = tunnel;
        let session = self.http_session(row, server_name);
        let h2 = alpn.as_deref() == Some(b"h2");
        if h2 || alpn.as_deref() == Some(b"http/1.1") {
            let (moved, result) = http::serve(client, upstream, h2, session).await;
            return (moved, result.err().map(|e| e.to_string()), true);
        }
        // No ALPN: look at the first bytes, then hand them on.
        let mut first = Vec::with_capacity(16);
        let mut buf = [0u8; 16];
        let protocol = loop {
            match client.read(&mut buf[..16 - first.len()]).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => first.extend_from_slice(&buf[..n]),
            }
            if let Some(p) = detect::classify(&first) {
                break Some(p);
            }
            if first.len() >= 16 {
                break Some(Protocol::Unknown);
            }
        };
        let client = io::Rewind::new(Bytes::from(first), client);
        if protocol == Some(Protocol::Http) {
            let (moved, result) = http::serve(client, upstream, false, session).await;
            return (moved, result.err().map(|e| e.to_string()), true);
        }
        let (moved, result) = relay::relay_streams(client, upstream).await;
        (moved, result.err().map(|e| format!("relay: {e}")), false)
    }

    /// The SSH relay's session when the target has an SSH login; else
    /// whether to relay the bytes unseen or refuse: refused when SSH rules
    /// would apply to the connection, or when `ssh_default` is not allow.
    /// (Under `default: deny`, only connections a rule allows get here.)
    fn ssh_session(&self, row: &ConnectionRow) -> Result<ssh::SshSession, Opaque> {
        let destination = row.destination;
        let policy = self.policy.current();
        let login = policy.ssh_login_for(destination);
        let (Some(login), Some(keys)) = (login, &self.ssh_host_keys) else {
            if policy.has_ssh_rules_for(&row.identity, destination) {
                return Err(Opaque::Refuse(
                    "refused: SSH rules apply to this destination and the policy gives it no SSH \
                     credential, so the agent cannot see its commands; add one under credentials: \
                     (docs/ssh.md)"
                        .into(),
                ));
            }
            if policy.ssh_default() != Action::Allow {
                return Err(Opaque::Refuse(
                    "refused: no SSH credential for this destination, so the agent cannot see \
                     its commands, and the policy's ssh_default is not allow (docs/ssh.md)"
                        .into(),
                ));
            }
            return Err(Opaque::Relay(
                "relayed opaque: no SSH credential for this destination, so its commands were \
                 not seen (docs/ssh.md)"
                    .into(),
            ));
        };
        Ok(ssh::SshSession {
            session_id: row.session_id.clone(),
            identity: row.identity.clone(),
            workload: row.workload.clone(),
            destination,
            audit: self.audit.clone(),
            policy: self.policy.clone(),
            lineage: self.lineage.clone(),
            approvals: self.approvals.clone(),
            host_key: keys.for_target(&login.target),
            login: login.clone(),
            recordings: self.recordings.clone(),
        })
    }

    fn http_session(&self, row: &ConnectionRow, server_name: Option<String>) -> http::HttpSession {
        http::HttpSession {
            session_id: row.session_id.clone(),
            identity: row.identity.clone(),
            workload: row.workload.clone(),
            destination: row.destination,
            server_name,
            audit: self.audit.clone(),
            policy: self.policy.clone(),
            lineage: self.lineage.clone(),
            approvals: self.approvals.clone(),
            workload_tokens: self.workload_tokens.clone(),
        }
    }

    async fn attribute(&self, netns: u64, peer: SocketAddr, local: SocketAddr) -> Option<Origin> {
        for attempt in 0..RECORD_RETRIES {
            if let Some(record) = self.capture.take_flow(netns, peer, local) {
                // procfs answers from memory: reading it inline costs less
                // than a hop to the blocking pool.
                return Some(Origin::from_record(&record));
            }
            tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
        }
        None
    }

    fn finish(&self, mut row: ConnectionRow) {
        row.end_time = Utc::now();
        tracing::debug!(
            session = %row.session_id, pid = row.identity.pid, dst = %row.destination,
            decision = row.decision, rule = %row.rule, up = row.bytes_up, down = row.bytes_down,
            "connection closed"
        );
        self.audit.record(row);
    }
}

/// Why an SSH connection is not decoded.
enum Opaque {
    /// Relay its bytes; the note goes in the connection's row.
    Relay(String),
    Refuse(String),
}

/// Close with a reset, so that the client fails at once instead of reading
/// an orderly end of stream.
fn refuse(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Wait until one side speaks (or closes) and name the protocol. Nothing is
/// consumed: the relay, or a decoder, starts from the first byte.
async fn detect_protocol(client: &TcpStream, upstream: &TcpStream) -> Protocol {
    let mut buf = [0u8; 16];
    let mut seen = 0usize;
    // A client that sends a few ambiguous bytes and then waits is relayed
    // as unknown after this many short looks.
    let mut looks = 0;
    loop {
        tokio::select! {
            biased;
            peeked = client.peek(&mut buf) => match peeked {
                Ok(0) | Err(_) => return if seen == 0 { Protocol::None } else { Protocol::Unknown },
                Ok(n) => {
                    if let Some(p) = detect::classify(&buf[..n]) {
                        return p;
                    }
                    looks += 1;
                    if n == buf.len() || looks > 20 {
                        return Protocol::Unknown;
                    }
                    seen = n;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
            _ = upstream.readable(), if seen == 0 => {
                // Both sides of SSH send their version at once; the
                // server's may come first.
                let mut banner = [0u8; 4];
                return match upstream.peek(&mut banner).await {
                    Ok(4) if &banner == b"SSH-" => Protocol::Ssh,
                    _ => Protocol::ServerFirst,
                };
            }
        }
    }
}
