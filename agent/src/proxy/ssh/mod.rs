//! SSH: the agent ends the client's SSH session with a host key of its own
//! for the target ([`HostKeys`]), logs in upstream with the credential the
//! policy gives the target (the client's own credential, a placeholder, is
//! accepted and never used), verifies the real server's host key, and
//! relays channel by channel, so that each exec, shell, subsystem and
//! forward is decided and audited on its own ([`channel`]).
//!
//! A target with no SSH credential is not handled here: the agent cannot
//! sign for the client's key, so the connection is relayed opaque or
//! refused, as [`crate::proxy::Proxy`] decides from the policy.
mod channel;
mod host_keys;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use russh::{
    ChannelId, MethodKind, MethodSet,
    client::{self, Handle},
    keys::{self, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate},
    server::{self, Auth, ChannelOpenHandle, Msg, Session},
};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_util::task::TaskTracker;

pub use host_keys::{HostKeyError, HostKeys};

use super::{io::Counted, relay::Transferred};
use crate::{
    approvals::Approvals,
    audit::{AuditSink, RequestRow, SshFields},
    identity::Identity,
    lineage::Lineage,
    policy::{
        Action, Decision, LivePolicy, SshChannel, SshLogin, SshRequest, SshSecret, UpstreamHostKeys,
    },
};

/// How long the agent waits for the server's key exchange and login.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long channel tasks may take to write their rows once the client's
/// session has ended.
const DRAIN: Duration = Duration::from_secs(5);

/// What one SSH connection's relay needs from the proxy.
pub struct SshSession {
    pub session_id: String,
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: SocketAddr,
    pub audit: AuditSink,
    pub policy: Arc<LivePolicy>,
    /// What LLM answers proposed, for the commands that follow.
    pub lineage: Arc<Lineage>,
    pub approvals: Option<Arc<Approvals>>,
    pub login: Arc<SshLogin>,
    /// The key the client is shown for this target.
    pub host_key: PrivateKey,
    /// Where asciicast recordings go (`<audit dir>/recordings`); None: not
    /// recorded.
    pub recordings: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh: {0}")]
    Protocol(#[from] russh::Error),
    #[error("ssh upstream: {0}")]
    Upstream(String),
}

/// How the connection went, for its `connections` row.
pub struct Served {
    pub moved: Transferred,
    pub result: Result<(), SshError>,
}

/// What the connection's handlers and channel tasks share.
struct Shared {
    s: SshSession,
    /// Order of requests within the session, from 1.
    seq: AtomicU64,
    /// Channels opened so far, to name recordings.
    channels: AtomicU64,
    /// Why the upstream side failed, for the connection's row.
    failure: Mutex<Option<String>>,
    /// The remote forwards (address, port on the server) the policy
    /// allowed, and the client's session to open their connections on.
    remote_forwards: Mutex<Vec<(String, u32)>>,
    /// Whether a rule allowed agent forwarding on this connection.
    agent_forwarding: std::sync::atomic::AtomicBool,
    client: std::sync::OnceLock<server::Handle>,
    /// The server's side of each open session channel, by the client's
    /// channel id: where the connection's handler passes requests on.
    upstream_channels:
        Mutex<std::collections::HashMap<ChannelId, Arc<russh::ChannelWriteHalf<client::Msg>>>>,
    tasks: TaskTracker,
}

impl Shared {
    fn fail(&self, why: String) {
        tracing::warn!(session = %self.s.session_id, dst = %self.s.destination, "{why}");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    fn decide(
        &self,
        user: &str,
        channel: SshChannel,
        command: Option<&str>,
        from_llm: bool,
    ) -> Decision {
        self.s.policy.current().decide_ssh(&SshRequest {
            identity: &self.s.identity,
            destination: self.s.destination,
            user,
            channel,
            command,
            from_llm,
        })
    }

    /// A `requests` row for one channel request.
    fn row(
        &self,
        start_time: DateTime<Utc>,
        decision: &'static str,
        rule: String,
        ssh: SshFields,
    ) -> RequestRow {
        RequestRow {
            session_id: self.s.session_id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            start_time,
            end_time: Utc::now(),
            identity: self.s.identity.clone(),
            workload: self.s.workload.clone(),
            destination: self.s.destination,
            protocol: "ssh",
            database: None,
            db_user: None,
            statement: None,
            statement_class: None,
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            functions: Vec::new(),
            fingerprint: None,
            rows: None,
            masked: 0,
            decision,
            rule,
            error: None,
            sqlstate: None,
            http: None,
            llm: None,
            ssh: Some(ssh),
            caused_by: None,
            approval_id: None,
        }
    }
}

/// Relays one SSH connection whose target has an SSH login.
pub async fn serve(client: TcpStream, upstream: TcpStream, session: SshSession) -> Served {
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let host_key = session.host_key.clone();
    let shared = Arc::new(Shared {
        s: session,
        seq: AtomicU64::new(0),
        channels: AtomicU64::new(0),
        failure: Mutex::new(None),
        remote_forwards: Mutex::new(Vec::new()),
        agent_forwarding: std::sync::atomic::AtomicBool::new(false),
        client: std::sync::OnceLock::new(),
        upstream_channels: Mutex::default(),
        tasks: TaskTracker::new(),
    });

    let handshake = {
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        });
        let checker = ServerSide {
            shared: shared.clone(),
        };
        let stream = Counted::new(upstream, down.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(
                UPSTREAM_TIMEOUT,
                client::connect_stream(config, stream, checker),
            )
            .await
            {
                Ok(connected) => connected,
                Err(_) => Err(russh::Error::ConnectionTimeout),
            }
        })
    };
    let config = Arc::new(server::Config {
        keys: vec![host_key],
        methods: MethodSet::from(
            &[
                MethodKind::None,
                MethodKind::PublicKey,
                MethodKind::Password,
                MethodKind::KeyboardInteractive,
            ][..],
        ),
        // The client is known from the kernel; its SSH login is not what
        // admits it, so a refusal need not be slowed down.
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    });
    let handler = ClientSide {
        shared: shared.clone(),
        upstream: Upstream::Connecting(handshake),
        user: String::new(),
    };
    let stream = Counted::new(client, up.clone());
    let result = match server::run_stream(config, stream, handler).await {
        Ok(running) => running.await,
        Err(e) => Err(e),
    };
    shared.tasks.close();
    if tokio::time::timeout(DRAIN, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::debug!(session = %shared.s.session_id, "SSH channels still open after the session ended");
    }
    let failure = shared
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let result = match (result, failure) {
        (_, Some(why)) => Err(SshError::Upstream(why)),
        (Err(SshError::Protocol(russh::Error::Disconnect)), None) => Ok(()),
        (r, None) => r,
    };
    Served {
        moved: Transferred {
            up: up.load(Ordering::Relaxed),
            down: down.load(Ordering::Relaxed),
        },
        result,
    }
}

/// The agent's side towards the real server: verifies its host key against
/// the target's `host_keys` or `known_hosts`, and takes the channels it
/// opens back: connections to a remote forward the policy allowed, nothing
/// else.
struct ServerSide {
    shared: Arc<Shared>,
}

impl client::Handler for ServerSide {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            self.shared.fail(
                "the server presented a host certificate; the agent checks plain host keys only"
                    .into(),
            );
            return Ok(false);
        };
        let login = &self.shared.s.login;
        let dst = self.shared.s.destination;
        let verdict = match &login.host_keys {
            UpstreamHostKeys::Keys(lines) => {
                if lines.iter().any(|line| {
                    keys::PublicKey::from_openssh(line)
                        .is_ok_and(|known| known.key_data() == key.key_data())
                }) {
                    Ok(())
                } else {
                    Err(format!(
                        "is not one of the host_keys of target {:?}",
                        login.target
                    ))
                }
            }
            UpstreamHostKeys::KnownHosts(path) => {
                match keys::check_known_hosts_path(&dst.ip().to_string(), dst.port(), key, path) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "is not in {} for {} (give the server's key there, as ssh-keyscan prints it)",
                        path.display(),
                        known_hosts_name(dst)
                    )),
                    Err(keys::Error::KeyChanged { line }) => Err(format!(
                        "differs from the key on line {line} of {}: the server's key changed, or this is not the server",
                        path.display()
                    )),
                    Err(e) => Err(format!("cannot be checked against {}: {e}", path.display())),
                }
            }
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                let fingerprint = key.fingerprint(keys::HashAlg::Sha256);
                self.shared.fail(format!(
                    "refused the SSH server at {dst}: its host key {fingerprint} {why}"
                ));
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.forwarded_tcpip(
            channel,
            (connected_address, connected_port),
            (originator_address, originator_port),
            reply,
        )
        .await;
        Ok(())
    }

    /// The server reaches the program's SSH agent only where a rule
    /// allowed agent forwarding.
    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let allowed = self.shared.agent_forwarding.load(Ordering::Acquire);
        let opened = match self.shared.client.get().filter(|_| allowed) {
            Some(client) => client.channel_open_agent().await.ok(),
            None => None,
        };
        match opened {
            Some(to_client) => {
                reply.accept().await;
                self.shared.tasks.spawn(channel::pipe(to_client, channel));
            }
            None => {
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
        }
        Ok(())
    }

    // The server may not reach the program's X display: the agent never
    // asks for X11 forwarding.

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}

impl ServerSide {
    async fn forwarded_tcpip(
        &self,
        channel: russh::Channel<client::Msg>,
        connected: (&str, u32),
        originator: (&str, u32),
        reply: client::ChannelOpenHandle,
    ) {
        let allowed = self
            .shared
            .remote_forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(a, p)| a == connected.0 && *p == connected.1);
        let Some(client) = self.shared.client.get().filter(|_| allowed) else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        };
        match client
            .channel_open_forwarded_tcpip(connected.0, connected.1, originator.0, originator.1)
            .await
        {
            Ok(to_client) => {
                reply.accept().await;
                self.shared.tasks.spawn(channel::pipe(to_client, channel));
            }
            Err(_) => reply.reject(russh::ChannelOpenFailure::ConnectFailed).await,
        }
    }
}

/// How OpenSSH names a host in known_hosts: `[ip]:port` unless the port is 22.
fn known_hosts_name(dst: SocketAddr) -> String {
    if dst.port() == 22 {
        dst.ip().to_string()
    } else {
        format!("[{}]:{}", dst.ip(), dst.port())
    }
}

enum Upstream {
    Connecting(JoinHandle<Result<Handle<ServerSide>, russh::Error>>),
    LoggedIn(Arc<Handle<ServerSide>>),
    Failed,
}

/// The client's side: any login is accepted once the agent's own login
/// upstream succeeded; channels are relayed by [`channel`].
struct ClientSide {
    shared: Arc<Shared>,
    upstream: Upstream,
    /// The user the agent logged in as upstream.
    user: String,
}

impl ClientSide {
    /// Logs in upstream as the client's `user` (or the credential's), once.
    async fn login(&mut self, user: &str) -> Auth {
        let handshake = match std::mem::replace(&mut self.upstream, Upstream::Failed) {
            Upstream::LoggedIn(handle) => {
                self.upstream = Upstream::LoggedIn(handle);
                return Auth::Accept;
            }
            Upstream::Failed => return Auth::reject(),
            Upstream::Connecting(handshake) => handshake,
        };
        let mut handle = match handshake.await {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                // A refused host key is already recorded, with its reason.
                self.shared
                    .fail(format!("SSH handshake with the server failed: {e}"));
                return Auth::reject();
            }
            Err(e) => {
                self.shared.fail(format!("SSH handshake task failed: {e}"));
                return Auth::reject();
            }
        };
        let login = self.shared.s.login.clone();
        let upstream_user = login.user.clone().unwrap_or_else(|| user.to_string());
        let authenticated = match &login.secret {
            SshSecret::PrivateKey(text) => match keys::decode_secret_key(text, None) {
                Ok(key) => {
                    let hash = handle
                        .best_supported_rsa_hash()
                        .await
                        .ok()
                        .flatten()
                        .flatten();
                    handle
                        .authenticate_publickey(
                            &upstream_user,
                            PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                        )
                        .await
                }
                Err(e) => {
                    self.shared.fail(format!(
                        "the SSH key of target {:?} cannot be read: {e}; give an OpenSSH private key without a passphrase",
                        login.target
                    ));
                    return Auth::reject();
                }
            },
            SshSecret::Password(password) => {
                handle.authenticate_password(&upstream_user, password).await
            }
        };
        match authenticated {
            Ok(result) if result.success() => {
                self.user = upstream_user;
                self.upstream = Upstream::LoggedIn(Arc::new(handle));
                Auth::Accept
            }
            Ok(_) => {
                self.shared.fail(format!(
                    "the server refused the agent's login as {upstream_user:?} with the credential of target {:?}",
                    login.target
                ));
                Auth::reject()
            }
            Err(e) => {
                self.shared
                    .fail(format!("logging in as {upstream_user:?} failed: {e}"));
                Auth::reject()
            }
        }
    }

    fn upstream(&self) -> Option<Arc<Handle<ServerSide>>> {
        match &self.upstream {
            Upstream::LoggedIn(handle) => Some(handle.clone()),
            _ => None,
        }
    }

    /// Audits a request the agent refuses outright (X11 forwarding).
    fn refuse_request(&self, channel: SshChannel, command: Option<String>) {
        let decision = self
            .shared
            .decide(&self.user, channel, command.as_deref(), false);
        let mut row = self.shared.row(
            Utc::now(),
            "deny",
            decision.rule,
            SshFields {
                user: self.user.clone(),
                channel: channel.as_str(),
                command,
                exit_status: None,
                recording: None,
            },
        );
        if decision.action != Action::Deny {
            row.error = Some(format!(
                "{} requests are not relayed by the agent, whatever the policy says",
                channel.as_str()
            ));
        }
        self.shared.s.audit.record_request(row);
    }
}

impl server::Handler for ClientSide {
    type Error = SshError;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(None)
    }

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        Ok(self.login(user).await)
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.login(user).await)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.login(user).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.login(user).await)
    }

    async fn channel_open_session(
        &mut self,
        channel: russh::Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(upstream) = self.upstream() else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        match upstream.channel_open_session().await {
            Ok(upstream_channel) => {
                reply.accept().await;
                let _ = self.shared.client.set(session.handle());
                let n = self.shared.channels.fetch_add(1, Ordering::Relaxed) + 1;
                let relay = channel::SessionChannel {
                    shared: self.shared.clone(),
                    user: self.user.clone(),
                    handle: session.handle(),
                    number: n,
                };
                self.shared
                    .tasks
                    .spawn(relay.run(channel, upstream_channel));
            }
            Err(e) => {
                self.shared
                    .fail(format!("the server refused a session channel: {e}"));
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: russh::Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let target = format!("{host_to_connect}:{port_to_connect}");
        let decision = self
            .shared
            .decide(&self.user, SshChannel::Forward, Some(&target), false);
        let upstream = self.upstream();
        let allowed = decision.action == Action::Allow;
        let start = Utc::now();
        let mut row = self.shared.row(
            start,
            if allowed { "allow" } else { "deny" },
            decision.rule,
            SshFields {
                user: self.user.clone(),
                channel: SshChannel::Forward.as_str(),
                command: Some(target),
                exit_status: None,
                recording: None,
            },
        );
        let opened = match (allowed, upstream) {
            (true, Some(upstream)) => upstream
                .channel_open_direct_tcpip(
                    host_to_connect,
                    port_to_connect,
                    originator_address,
                    originator_port,
                )
                .await
                .map_err(|e| format!("the server refused the forward: {e}")),
            (true, None) => Err("not logged in upstream".into()),
            (false, _) => Err(String::new()),
        };
        match opened {
            Ok(upstream_channel) => {
                reply.accept().await;
                let audit = self.shared.s.audit.clone();
                self.shared.tasks.spawn(async move {
                    channel::pipe(channel, upstream_channel).await;
                    row.end_time = Utc::now();
                    audit.record_request(row);
                });
            }
            Err(why) => {
                if !why.is_empty() {
                    row.error = Some(why);
                }
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                self.shared.s.audit.record_request(row);
            }
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let asked = format!("{address}:{port}");
        let decision = self
            .shared
            .decide(&self.user, SshChannel::Forward, Some(&asked), false);
        let allowed = decision.action == Action::Allow;
        let mut row = self.shared.row(
            Utc::now(),
            if allowed { "allow" } else { "deny" },
            decision.rule,
            SshFields {
                user: self.user.clone(),
                channel: SshChannel::Forward.as_str(),
                command: Some(asked),
                exit_status: None,
                recording: None,
            },
        );
        let granted = match (allowed, self.upstream()) {
            (false, _) => None,
            (true, None) => {
                row.error = Some("not logged in upstream".into());
                None
            }
            (true, Some(upstream)) => match upstream.tcpip_forward(address, *port).await {
                Ok(bound) => {
                    // Port 0: the server chose one, and says which.
                    let bound = if *port == 0 { bound } else { *port };
                    let _ = self.shared.client.set(session.handle());
                    self.shared
                        .remote_forwards
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((address.to_string(), bound));
                    Some(bound)
                }
                Err(e) => {
                    row.error = Some(format!("the server refused the forward: {e}"));
                    None
                }
            },
        };
        if let Some(bound) = granted {
            *port = bound;
        } else {
            row.decision = "deny";
        }
        self.shared.s.audit.record_request(row);
        Ok(granted.is_some())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let decision = self
            .shared
            .decide(&self.user, SshChannel::Agent, None, false);
        let upstream = self
            .shared
            .upstream_channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&channel)
            .cloned();
        let granted = match (decision.action, upstream) {
            (Action::Allow, Some(upstream)) => {
                self.shared.agent_forwarding.store(true, Ordering::Release);
                upstream.agent_forward(false).await.is_ok()
            }
            _ => false,
        };
        let mut row = self.shared.row(
            Utc::now(),
            if granted { "allow" } else { "deny" },
            decision.rule,
            SshFields {
                user: self.user.clone(),
                channel: SshChannel::Agent.as_str(),
                command: None,
                exit_status: None,
                recording: None,
            },
        );
        if !granted && decision.action != Action::Deny {
            row.error = Some("agent forwarding could not be set up with the server".into());
        }
        self.shared.s.audit.record_request(row);
        Ok(granted)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_request(SshChannel::X11, None);
        session.channel_failure(channel)?;
        Ok(())
    }
}
