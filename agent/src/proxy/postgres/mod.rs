//! PostgreSQL sessions: every statement a client sends is decoded,
//! classified, paired with the server's answer and audited as its own row.
//!
//! Messages are forwarded as they arrive, except a statement the policy
//! denies: it never reaches the server. The agent sends a Sync in its place
//! and puts a PostgreSQL error (SQLSTATE 42501, naming the rule) before the
//! server's ReadyForQuery that answers it, so the client reads the error
//! exactly where the server's own would be and the session stays usable.
//! (The server saw no error, so an open transaction is not aborted.)
//!
//! A client's TLS request (SSLRequest) is answered `S` when the agent
//! intercepts TLS (`warden run` does, and points libpq at its CA through
//! `PGSSLROOTCERT`): the agent ends the client's TLS with a certificate of
//! its CA for the server's address or the name the client sent, and the
//! session goes on inside it, decoded as any other. Without interception
//! the answer is `N`, which clients with `sslmode=prefer` (the default)
//! take as plaintext. The agent's own connection to the server is
//! plaintext: the server is on this host or its network.
//!
//! When the policy has a password credential for the destination, the
//! agent logs in itself ([`login`]) and the client never sees a password
//! request.
//!
//! A statement a rule holds for approval is not sent until reviewers decide
//! ([`crate::approvals`]): the client gets a NOTICE saying so and waits for
//! its answer as for a slow statement; approved, the statement goes on as
//! the client sent it; rejected or expired, the client gets SQLSTATE 42501
//! with the reason, as for a denial. Only that message waits: what the
//! client sends meanwhile is read and kept for after.
mod login;
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use self::login::LoginError;
use super::{intercept::Interceptor, relay::Transferred};
use crate::{
    approvals::{Approvals, HoldRequest, Resolution},
    audit::{AuditSink, RequestRow},
    identity::Identity,
    lineage::{Lineage, Link},
    masking::Masker,
    policy::{Action, ApprovalRule, Credential, LivePolicy, SecretKind, StatementRequest},
    protocols::postgres::{
        Authentication, BackendFramer, BackendMessage, DataRow, FieldDescription, Frame,
        FrontendFramer, FrontendMessage, ProtocolError, Severity, Statement, StatementClass,
        Target, classify, encode, fingerprint,
    },
};

/// Who and where, for the request rows of one session.
pub struct Session<'a> {
    pub session_id: String,
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: std::net::SocketAddr,
    pub rule: String,
    pub audit: AuditSink,
    pub policy: Arc<LivePolicy>,
    pub lineage: Arc<Lineage>,
    /// Where statements a rule holds wait for reviewers.
    pub approvals: Option<Arc<Approvals>>,
    /// The password the agent logs in with, if the policy has one for
    /// this destination.
    pub login: Option<Arc<Credential>>,
    /// Ends the client's TLS when it asks for TLS; None: TLS is refused.
    pub tls: Option<&'a Interceptor>,
    /// The agent speaks TLS to the server, checking its certificate against
    /// this name (None: the server's address); None: plaintext.
    pub upstream_tls: Option<Option<String>>,
}

/// How the client's side of a session ended up, for its connection row.
pub struct Served {
    pub moved: Transferred,
    pub result: Result<(), SessionError>,
    /// `terminated` when the agent ended the client's TLS.
    pub tls: Option<&'static str>,
    /// The name the client sent in its TLS hello, if it did.
    pub server_name: Option<String>,
}

/// How a statement was decided, by which rule, and what of its result is masked.
#[derive(Clone)]
struct Verdict {
    denied: bool,
    rule: String,
    mask: Option<Arc<Masker>>,
    /// The LLM exchange that proposed the statement, if one did.
    link: Option<Link>,
    /// Held until reviewers decide, by this rule's `approve`.
    hold: Option<Arc<ApprovalRule>>,
    /// The approval that decided it, once reviewers did.
    approval_id: Option<String>,
    /// Why it was refused, when not the plain denial by `rule`.
    refusal: Option<String>,
}

impl Verdict {
    /// What the client reads when the statement does not run.
    fn refusal(&self) -> String {
        self.refusal
            .clone()
            .unwrap_or_else(|| denial_message(&self.rule))
    }
}

/// What happens to each column of the rows being returned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnAction {
    Keep,
    /// A column the policy names, of a text type: masked whole.
    Whole,
    /// A column the policy names that is not text: returned as NULL, which
    /// is valid for every type.
    Null,
    /// A text column: detector findings inside it are masked.
    Scan,
}

struct RowMasks {
    masker: Arc<Masker>,
    columns: Vec<ColumnAction>,
}

/// Types whose values are UTF-8 text in both formats: text, varchar,
/// bpchar, name, json, unknown.
const TEXT_TYPES: [u32; 6] = [25, 1043, 1042, 19, 114, 705];

/// Set by the agent when the statement did not run because of the policy.
#[derive(Clone)]
struct Outcome {
    error: String,
    sqlstate: Option<&'static str>,
}

/// A statement sent and not yet answered.
struct Pending {
    statement: Statement,
    sql: String,
    start: DateTime<Utc>,
    rows_seen: u64,
    masked: u64,
    verdict: Verdict,
    /// Known before the server answers: the statement was held back.
    outcome: Option<Outcome>,
    /// The ReadyForQuery (counted from 1) after which it is settled.
    batch: u64,
    /// How its rows are masked when no RowDescription comes before them:
    /// an Execute of a statement described in an earlier batch.
    masks: Option<RowMasks>,
}

/// What the agent does at the ReadyForQuery that ends a batch.
#[derive(Default)]
struct Injection {
    /// A denial's error, put before it.
    error: Option<Vec<u8>>,
    /// The batch's Sync came from the agent, not the client: the client
    /// gets the error alone, and its own Sync gets the next ReadyForQuery.
    swallow: bool,
}

/// What a Describe sent and not yet answered is about.
enum Described {
    Statement(String),
    Portal(String),
}

#[derive(Default)]
struct State {
    database: Option<String>,
    db_user: Option<String>,
    seq: u64,
    pending: VecDeque<Pending>,
    /// Prepared statements by name, and portals by name, for Execute, with
    /// the verdict given at Parse.
    prepared: HashMap<String, Prepared>,
    portals: HashMap<String, Prepared>,
    /// Classifications by statement text: apps repeat their statements, and
    /// parsing SQL is most of the per-statement cost.
    classified: HashMap<String, Vec<Statement>>,
    /// Messages sent that the server answers with ReadyForQuery (Query,
    /// Sync, FunctionCall), and ReadyForQuery messages seen.
    batches_sent: u64,
    batches_answered: u64,
    /// For each batch in flight, what to do at its ReadyForQuery.
    injections: VecDeque<Injection>,
    /// A denied extended-protocol statement: the client's messages are
    /// dropped until its Sync. Holds the denial's error until it is sent.
    discarding: Option<Option<Vec<u8>>>,
    /// Describes in flight, with their batch, answered in order by
    /// RowDescription or NoData.
    describing: VecDeque<(u64, Described)>,
    /// How the rows now being returned are masked, from their RowDescription.
    row_masks: Option<RowMasks>,
    /// What happens to the rows of the COPY ... TO now running.
    copy_out: Option<CopyOut>,
}

/// The output of COPY ... TO under a mask. COPY sends no column names, one
/// CopyData per row.
enum CopyOut {
    /// Text or CSV, and the mask has detectors only: each row is scanned.
    Scan(Arc<Masker>),
    /// The mask names columns, or the output is binary: the rows cannot be
    /// masked as the policy says, so none reach the client, and the COPY
    /// ends with an error.
    Withhold,
}

/// Why a COPY's output was withheld, for the client and the audit.
const COPY_WITHHELD: &str = "Warden withheld the output of this COPY: the policy masks this \
     statement's results by column name (or the output is binary), and COPY output carries no \
     column names; read these rows with SELECT, which Warden can mask";

/// A statement parsed by the client, classified and decided once.
#[derive(Clone)]
struct Prepared {
    sql: String,
    statement: Statement,
    verdict: Verdict,
    /// The result columns, once a Describe of it was answered: clients that
    /// prepare once (asyncpg) execute later without a RowDescription.
    columns: Option<Arc<Vec<FieldDescription>>>,
}

/// Bound on the per-session classification cache.
const CLASSIFIED_CAP: usize = 256;

impl State {
    fn classify(&mut self, sql: &str) -> Vec<Statement> {
        if let Some(known) = self.classified.get(sql) {
            return known.clone();
        }
        let statements = classify(sql);
        if self.classified.len() >= CLASSIFIED_CAP {
            self.classified.clear();
        }
        self.classified.insert(sql.to_string(), statements.clone());
        statements
    }

    fn pend(
        &mut self,
        statement: Statement,
        sql: String,
        verdict: Verdict,
        outcome: Option<Outcome>,
    ) {
        let batch = self.batches_sent + 1;
        let start = Utc::now();
        self.pending.push_back(Pending {
            statement,
            sql,
            start,
            rows_seen: 0,
            masked: 0,
            verdict,
            outcome,
            batch,
            masks: None,
        });
    }

    /// A message the server answers with ReadyForQuery goes out.
    fn batch_sent(&mut self, injection: Injection) {
        self.batches_sent += 1;
        self.injections.push_back(injection);
    }
}

/// What to do with a client message.
enum Forwarding {
    Forward,
    Drop,
    Replace(Vec<u8>),
    /// Wait for reviewers, then decide.
    Hold(Box<Held>),
}

/// A client message a rule holds, decided but for the held verdicts.
struct Held {
    message: HeldMessage,
    request: HoldRequest,
}

enum HeldMessage {
    Query {
        statements: Vec<Statement>,
        verdicts: Vec<Verdict>,
    },
    Parse {
        name: String,
        sql: String,
        statement: Statement,
        verdict: Verdict,
    },
    FunctionCall {
        sql: String,
        statement: Statement,
        verdict: Verdict,
    },
}

/// Bytes a client may send while one of its messages is held, kept for
/// after; beyond this the agent stops reading until reviewers decide.
const HELD_READ_AHEAD: usize = 1 << 20;

const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("malformed PostgreSQL message from the {side}: {source}")]
    Protocol {
        side: &'static str,
        source: ProtocolError,
    },
    #[error("login with the policy's credential failed: {0}")]
    Login(#[from] LoginError),
    #[error("the client's TLS: {0}")]
    Tls(String),
    #[error("TLS to the server: {0}")]
    UpstreamTls(String),
    #[error("the client sent bytes after its SSLRequest before the agent answered; refused")]
    EarlyBytes,
}

/// Serve one session until both sides are done. The byte counts are kept
/// even when the session ends with an error.
pub async fn serve(mut client: TcpStream, upstream: TcpStream, session: &Session<'_>) -> Served {
    let Some(name) = &session.upstream_tls else {
        return serve_over(client, upstream, session).await;
    };
    match upstream_tls(upstream, session, name.as_deref()).await {
        Ok(tls) => {
            let mut served = serve_over(client, tls, session).await;
            served.tls = Some(match served.tls {
                Some(_) => "intercepted",
                None => "upstream",
            });
            served
        }
        Err(error) => {
            // The client is in its startup phase: an ErrorResponse is what
            // libpq reads there, whatever it sent first.
            let message = encode::error_response(
                Severity::Fatal,
                "08006",
                &format!("Warden could not reach the database over TLS: {error}"),
                None,
                None,
            );
            let _ = client.write_all(&message).await;
            Served {
                moved: Transferred {
                    up: 0,
                    down: message.len() as u64,
                },
                result: Err(SessionError::UpstreamTls(error)),
                tls: Some("failed"),
                server_name: None,
            }
        }
    }
}

/// The agent's TLS to the server, started as PostgreSQL starts it: an
/// SSLRequest, `S`, then the handshake, with the certificate checked
/// against `name` (else the server's address).
async fn upstream_tls(
    mut upstream: TcpStream,
    session: &Session<'_>,
    name: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let Some(interceptor) = session.tls else {
        return Err(
            "the target says `tls: verify`, which needs the agent's TLS settings; run \
                    without --no-tls-intercept"
                .into(),
        );
    };
    let io = |e: io::Error| format!("asking the server for TLS: {e}");
    upstream
        .write_all(&encode::ssl_request())
        .await
        .map_err(io)?;
    let mut answer = [0u8; 1];
    upstream.read_exact(&mut answer).await.map_err(io)?;
    if answer[0] != b'S' {
        return Err(format!(
            "the server answered {:?} to the SSLRequest: it does not accept TLS; turn `ssl` on \
             in its postgresql.conf, or drop `tls: verify` from the target",
            char::from(answer[0])
        ));
    }
    interceptor
        .connect(upstream, session.destination, name, b"postgresql")
        .await
}

/// One session over `upstream`, plaintext or TLS.
async fn serve_over<U: AsyncRead + AsyncWrite + Unpin>(
    mut client: TcpStream,
    mut upstream: U,
    session: &Session<'_>,
) -> Served {
    let state = Mutex::new(State::default());
    let mut framer = FrontendFramer::new();
    let mut server_framer = BackendFramer::new();
    let mut up = 0u64;
    let mut down = 0u64;
    let mut served = Served {
        moved: Transferred::default(),
        result: Ok(()),
        tls: None,
        server_name: None,
    };
    let started = startup(
        &mut client,
        &mut upstream,
        (&mut framer, &mut server_framer),
        session,
        session.tls,
        &state,
        (&mut up, &mut down),
    )
    .await;
    served.result = match started {
        Ok(Started::Session) => {
            let (client_read, client_write) = client.into_split();
            relay(
                (client_read, client_write),
                upstream,
                (framer, server_framer),
                session,
                &state,
                (&mut up, &mut down),
            )
            .await
        }
        Ok(Started::Tls(interceptor)) => {
            served.tls = Some("terminated");
            match interceptor
                .accept(client, session.destination, b"postgresql")
                .await
            {
                Ok((mut tls, server_name)) => {
                    served.server_name = server_name;
                    // The startup again, inside TLS (a second SSLRequest is refused there).
                    let started = startup(
                        &mut tls,
                        &mut upstream,
                        (&mut framer, &mut server_framer),
                        session,
                        None,
                        &state,
                        (&mut up, &mut down),
                    )
                    .await;
                    match started {
                        Ok(Started::Session) => {
                            relay(
                                tokio::io::split(tls),
                                upstream,
                                (framer, server_framer),
                                session,
                                &state,
                                (&mut up, &mut down),
                            )
                            .await
                        }
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Err(failed) => {
                    served.server_name = failed.server_name;
                    Err(SessionError::Tls(failed.error))
                }
            }
        }
        Ok(Started::Closed) => Ok(()),
        Err(e) => Err(e),
    };
    // Whatever is still unanswered when the session ends is audited too.
    settle(
        session,
        &state,
        "the session ended before the server answered",
    );
    served.moved = Transferred { up, down };
    served
}

/// Both directions of a started session, until both are done.
async fn relay<R, W, U>(
    (client_read, client_write): (R, W),
    upstream: U,
    (framer, server_framer): (FrontendFramer, BackendFramer),
    session: &Session<'_>,
    state: &Mutex<State>,
    (up, down): (&mut u64, &mut u64),
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let (notices, notices_rx) = mpsc::unbounded_channel();
    tokio::try_join!(
        client_to_server(
            client_read,
            upstream_write,
            framer,
            session,
            state,
            &notices,
            up
        ),
        server_to_client(
            upstream_read,
            client_write,
            server_framer,
            session,
            state,
            notices_rx,
            down
        ),
    )
    .map(|_| ())
}

/// How the startup phase ended.
enum Started<'a> {
    /// Logged in (or the StartupMessage forwarded): messages flow.
    Session,
    /// The client asked for TLS and was answered `S`: its handshake comes next.
    Tls(&'a Interceptor),
    /// The client left before its StartupMessage.
    Closed,
}

/// The startup phase: a TLS request is accepted when `tls` is given (the
/// caller then does the handshake and runs the startup again inside it),
/// else refused (`N`); the StartupMessage (or a CancelRequest) goes on to
/// the server, and with a credential the agent logs in in the client's place.
async fn startup<'s, C, U>(
    client: &mut C,
    upstream: &mut U,
    (framer, server_framer): (&mut FrontendFramer, &mut BackendFramer),
    session: &Session<'_>,
    tls: Option<&'s Interceptor>,
    state: &Mutex<State>,
    (up, down): (&mut u64, &mut u64),
) -> Result<Started<'s>, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        while let Some(frame) = framer.next().map_err(from_client)? {
            match FrontendMessage::decode(&frame).map_err(from_client)? {
                FrontendMessage::SslRequest if let Some(interceptor) = tls => {
                    // Bytes sent before the answer would be read as if they
                    // came through TLS (CVE-2021-23214): refuse them.
                    if framer.buffered() > 0 {
                        return Err(SessionError::EarlyBytes);
                    }
                    client.write_all(b"S").await?;
                    *down += 1;
                    return Ok(Started::Tls(interceptor));
                }
                FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                    client.write_all(b"N").await?;
                    *down += 1;
                }
                FrontendMessage::Startup { minor, params } => {
                    let param = |name: &str| {
                        params
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v.clone())
                    };
                    let login = session.login.as_deref().map(|credential| {
                        let user = match &credential.kind {
                            SecretKind::Password { user: Some(user) } => user.clone(),
                            _ => param("user").unwrap_or_default(),
                        };
                        (credential, user)
                    });
                    let user = login
                        .as_ref()
                        .map(|(_, user)| user.clone())
                        .or(param("user"));
                    {
                        let mut st = lock(state);
                        // Without a database parameter the server uses the user's name.
                        st.database = param("database").or_else(|| user.clone());
                        st.db_user = user;
                    }
                    let Some((credential, user)) = login else {
                        forward(upstream, frame.bytes(), up).await?;
                        return Ok(Started::Session);
                    };
                    let mut rewritten: Vec<(&str, &str)> = params
                        .iter()
                        .filter(|(k, _)| k != "user")
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    rewritten.insert(0, ("user", &user));
                    forward(
                        upstream,
                        &encode::startup_message_minor(minor, &rewritten),
                        up,
                    )
                    .await?;
                    let logged_in = login::login(
                        upstream,
                        server_framer,
                        &credential.target,
                        &user,
                        &credential.secret,
                        up,
                    )
                    .await;
                    let to_client = match &logged_in {
                        Ok(done) => {
                            [done.for_client.as_slice(), &encode::authentication_ok()].concat()
                        }
                        Err(e) => encode::error_response(
                            Severity::Fatal,
                            e.sqlstate(),
                            &format!("Warden could not log in to the database for you: {e}"),
                            None,
                            Some(
                                "the Warden policy on this host holds the password for this \
                                 database; ask its owner to check the credential",
                            ),
                        ),
                    };
                    client.write_all(&to_client).await?;
                    *down += to_client.len() as u64;
                    return logged_in
                        .map(|_| Started::Session)
                        .map_err(SessionError::from);
                }
                // A cancel goes through as it is; the server closes after it.
                _ => {
                    forward(upstream, frame.bytes(), up).await?;
                    return Ok(Started::Session);
                }
            }
        }
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(Started::Closed);
        }
        framer.push(&buf[..n]);
    }
}

async fn forward(
    to: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    count: &mut u64,
) -> Result<(), SessionError> {
    to.write_all(bytes).await?;
    *count += bytes.len() as u64;
    Ok(())
}

fn from_client(source: ProtocolError) -> SessionError {
    SessionError::Protocol {
        side: "client",
        source,
    }
}

fn from_server(source: ProtocolError) -> SessionError {
    SessionError::Protocol {
        side: "server",
        source,
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Client to server: every message is seen, then forwarded as it came.
async fn client_to_server(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut framer: FrontendFramer,
    session: &Session<'_>,
    state: &Mutex<State>,
    notices: &mpsc::UnboundedSender<Vec<u8>>,
    moved: &mut u64,
) -> Result<(), SessionError> {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    loop {
        // Frames left from the startup read are handled before reading more.
        while let Some(frame) = framer.next().map_err(from_client)? {
            let mut forwarding = observe_client(&frame, session, state)?;
            if let Forwarding::Hold(held) = forwarding {
                // What came before the held message goes now.
                if !out.is_empty() {
                    to.write_all(&out).await?;
                    *moved += out.len() as u64;
                    out.clear();
                }
                let waiting = (&mut from, &mut framer, &mut buf[..]);
                match hold(*held, session, state, notices, waiting).await? {
                    Some(decided) => forwarding = decided,
                    // The client went away while it waited.
                    None => return to.shutdown().await.map_err(SessionError::from),
                }
            }
            match forwarding {
                Forwarding::Forward => out.extend_from_slice(frame.bytes()),
                Forwarding::Drop | Forwarding::Hold(_) => {}
                Forwarding::Replace(bytes) => out.extend_from_slice(&bytes),
            }
        }
        if !out.is_empty() {
            to.write_all(&out).await?;
            *moved += out.len() as u64;
            out.clear();
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await.map_err(SessionError::from);
        }
        framer.push(&buf[..n]);
    }
}

/// Holds one client message until reviewers decide, reading what the
/// client sends meanwhile into its framer. None: the client closed.
async fn hold(
    held: Held,
    session: &Session<'_>,
    state: &Mutex<State>,
    notices: &mpsc::UnboundedSender<Vec<u8>>,
    (from, framer, buf): (
        &mut (impl AsyncRead + Unpin),
        &mut FrontendFramer,
        &mut [u8],
    ),
) -> Result<Option<Forwarding>, SessionError> {
    let Some(approvals) = &session.approvals else {
        // decide() never holds without a broker; refuse rather than run.
        let resolution = Resolution::Withdrawn;
        return Ok(Some(resume(held.message, &resolution, "none", state)));
    };
    let mut ticket = approvals.submit(held.request);
    let _ = notices.send(encode::notice_response(
        Severity::Notice,
        "00000",
        ticket.notice(),
        None,
        Some("a reviewer decides with `warden approvals`; this statement runs once approved"),
    ));
    let resolution = loop {
        tokio::select! {
            resolution = ticket.wait() => break resolution,
            n = from.read(buf), if framer.buffered() < HELD_READ_AHEAD => match n {
                // Dropping the ticket audits it as abandoned.
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => framer.push(&buf[..n]),
            },
        }
    };
    let id = ticket.id().to_string();
    let forwarding = resume(held.message, &resolution, &id, state);
    if matches!(resolution, Resolution::Approved(_)) {
        ticket.executed();
    }
    Ok(Some(forwarding))
}

/// Settles the held verdicts as reviewers decided and handles the message
/// as an undelayed one would have been.
fn resume(
    message: HeldMessage,
    resolution: &Resolution,
    id: &str,
    state: &Mutex<State>,
) -> Forwarding {
    let refusal = resolution.refusal(id);
    let settle = |verdict: &mut Verdict| {
        if verdict.hold.take().is_some() {
            verdict.approval_id = Some(id.to_string());
            if let Some(why) = &refusal {
                verdict.denied = true;
                verdict.refusal = Some(format!(
                    "held by Warden policy rule \"{}\" and {why}",
                    verdict.rule
                ));
            }
        }
    };
    let mut st = lock(state);
    match message {
        HeldMessage::Query {
            statements,
            mut verdicts,
        } => {
            verdicts.iter_mut().for_each(settle);
            on_query(&mut st, statements, verdicts)
        }
        HeldMessage::Parse {
            name,
            sql,
            statement,
            mut verdict,
        } => {
            settle(&mut verdict);
            on_parse(&mut st, name, sql, statement, verdict)
        }
        HeldMessage::FunctionCall {
            sql,
            statement,
            mut verdict,
        } => {
            settle(&mut verdict);
            on_function_call(&mut st, sql, statement, verdict)
        }
    }
}

/// Server to client: answers settle the pending statements, in order; the
/// agent's own notices (a statement held) go between the server's messages.
async fn server_to_client(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut framer: BackendFramer,
    session: &Session<'_>,
    state: &Mutex<State>,
    mut notices: mpsc::UnboundedReceiver<Vec<u8>>,
    moved: &mut u64,
) -> Result<(), SessionError> {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    loop {
        // Messages left from the login are handled before reading more.
        while let Some(frame) = framer.next().map_err(from_server)? {
            let action = observe_server(&frame, session, state)?;
            if let Some(before) = action.before {
                out.extend_from_slice(&before);
            }
            out.extend_from_slice(action.replace.as_deref().unwrap_or(frame.bytes()));
        }
        if !out.is_empty() {
            to.write_all(&out).await?;
            *moved += out.len() as u64;
            out.clear();
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => n?,
            Some(notice) = notices.recv() => {
                to.write_all(&notice).await?;
                *moved += notice.len() as u64;
                continue;
            }
        };
        if n == 0 {
            return to.shutdown().await.map_err(SessionError::from);
        }
        framer.push(&buf[..n]);
    }
}

fn observe_client(
    frame: &Frame,
    session: &Session,
    state: &Mutex<State>,
) -> Result<Forwarding, SessionError> {
    let message = FrontendMessage::decode(frame).map_err(from_client)?;
    let mut st = lock(state);
    if let Some(error) = &mut st.discarding {
        match message {
            FrontendMessage::Sync | FrontendMessage::Terminate => {}
            // A client that flushes waits for the answer before it sends
            // Sync (asyncpg): the agent's own Sync brings the error now,
            // after the answers to what the server did get.
            FrontendMessage::Flush if error.is_some() => {
                let error = error.take();
                st.batch_sent(Injection {
                    error,
                    swallow: true,
                });
                return Ok(Forwarding::Replace(encode::sync()));
            }
            // The server would skip these after an error, until Sync.
            _ => return Ok(Forwarding::Drop),
        }
    }
    Ok(match message {
        FrontendMessage::Query { sql } => {
            let mut statements = st.classify(&sql);
            if statements.is_empty() {
                // An empty query string still gets an answer (EmptyQueryResponse).
                statements.push(statement_of(&sql, StatementClass::Unknown, Vec::new()));
            }
            let verdicts: Vec<Verdict> =
                statements.iter().map(|s| decide(session, &st, s)).collect();
            // A denial settles the query at once; else a hold waits for all.
            let denied = verdicts.iter().any(|v| v.denied);
            match verdicts.iter().find(|v| v.hold.is_some()) {
                Some(first) if !denied => {
                    let context = statement_context(&st, &statements);
                    let request = hold_request(session, &sql, first, context);
                    Forwarding::Hold(Box::new(Held {
                        message: HeldMessage::Query {
                            statements,
                            verdicts,
                        },
                        request,
                    }))
                }
                _ => on_query(&mut st, statements, verdicts),
            }
        }
        FrontendMessage::Parse { name, sql, .. } => {
            let statement = st
                .classify(&sql)
                .into_iter()
                .next()
                .unwrap_or_else(|| statement_of(&sql, StatementClass::Unknown, Vec::new()));
            let verdict = decide(session, &st, &statement);
            if verdict.hold.is_some() {
                let context = statement_context(&st, std::slice::from_ref(&statement));
                let request = hold_request(session, &sql, &verdict, context);
                return Ok(Forwarding::Hold(Box::new(Held {
                    message: HeldMessage::Parse {
                        name,
                        sql,
                        statement,
                        verdict,
                    },
                    request,
                })));
            }
            on_parse(&mut st, name, sql, statement, verdict)
        }
        FrontendMessage::Describe { kind, name } => {
            let batch = st.batches_sent + 1;
            st.describing.push_back((
                batch,
                match kind {
                    Target::Statement => Described::Statement(name),
                    Target::Portal => Described::Portal(name),
                },
            ));
            Forwarding::Forward
        }
        FrontendMessage::Bind {
            portal, statement, ..
        } => {
            let prepared = st.prepared.get(&statement).cloned();
            if let Some(p) = prepared {
                st.portals.insert(portal, p);
            }
            Forwarding::Forward
        }
        FrontendMessage::Execute { portal, .. } => {
            let p = st
                .portals
                .get(&portal)
                .cloned()
                .unwrap_or_else(|| Prepared {
                    sql: String::new(),
                    statement: statement_of("", StatementClass::Unknown, Vec::new()),
                    verdict: Verdict {
                        denied: false,
                        rule: session.rule.clone(),
                        mask: None,
                        link: None,
                        hold: None,
                        approval_id: None,
                        refusal: None,
                    },
                    columns: None,
                });
            let masks = p
                .verdict
                .mask
                .as_ref()
                .zip(p.columns.as_deref())
                .and_then(|(masker, columns)| row_masks(masker, columns));
            st.pend(p.statement, p.sql, p.verdict, None);
            if let Some(pending) = st.pending.back_mut() {
                pending.masks = masks;
            }
            Forwarding::Forward
        }
        FrontendMessage::Sync => {
            let error = st.discarding.take().flatten();
            st.batch_sent(Injection {
                error,
                swallow: false,
            });
            Forwarding::Forward
        }
        FrontendMessage::FunctionCall { oid, .. } => {
            let sql = format!("-- fast-path function call, oid {oid}");
            let statement =
                statement_of(&sql, StatementClass::Function, vec![format!("oid {oid}")]);
            let verdict = decide(session, &st, &statement);
            if verdict.hold.is_some() {
                let context = statement_context(&st, std::slice::from_ref(&statement));
                let request = hold_request(session, &sql, &verdict, context);
                return Ok(Forwarding::Hold(Box::new(Held {
                    message: HeldMessage::FunctionCall {
                        sql,
                        statement,
                        verdict,
                    },
                    request,
                })));
            }
            on_function_call(&mut st, sql, statement, verdict)
        }
        _ => Forwarding::Forward,
    })
}

/// A simple-protocol query, decided: sent whole, or not at all when one of
/// its statements is denied.
fn on_query(st: &mut State, statements: Vec<Statement>, verdicts: Vec<Verdict>) -> Forwarding {
    let denied = verdicts.iter().find(|v| v.denied).cloned();
    for (statement, verdict) in statements.into_iter().zip(verdicts) {
        let outcome = denied.as_ref().map(|d| held_back(verdict.denied, d));
        let sql = statement.text.clone();
        st.pend(statement, sql, verdict, outcome);
    }
    match denied {
        Some(d) => {
            st.batch_sent(Injection {
                error: Some(denial_error(&d)),
                swallow: false,
            });
            Forwarding::Replace(encode::sync())
        }
        None => {
            st.batch_sent(Injection::default());
            Forwarding::Forward
        }
    }
}

/// An extended-protocol Parse, decided: a denied one is dropped with what
/// follows it up to Sync, and answered with the denial there.
fn on_parse(
    st: &mut State,
    name: String,
    sql: String,
    statement: Statement,
    verdict: Verdict,
) -> Forwarding {
    if verdict.denied {
        st.discarding = Some(Some(denial_error(&verdict)));
        let outcome = held_back(true, &verdict);
        st.pend(statement, sql, verdict, Some(outcome));
        return Forwarding::Drop;
    }
    st.prepared.insert(
        name,
        Prepared {
            sql,
            statement,
            verdict,
            columns: None,
        },
    );
    Forwarding::Forward
}

fn on_function_call(
    st: &mut State,
    sql: String,
    statement: Statement,
    verdict: Verdict,
) -> Forwarding {
    if verdict.denied {
        let outcome = held_back(true, &verdict);
        let error = denial_error(&verdict);
        st.pend(statement, sql, verdict, Some(outcome));
        st.batch_sent(Injection {
            error: Some(error),
            swallow: false,
        });
        return Forwarding::Replace(encode::sync());
    }
    st.pend(statement, sql, verdict, None);
    st.batch_sent(Injection::default());
    Forwarding::Forward
}

/// What a reviewer reads besides the SQL: database, user, classes, tables.
fn statement_context(st: &State, statements: &[Statement]) -> BTreeMap<&'static str, String> {
    let mut context = BTreeMap::new();
    if let Some(db) = &st.database {
        context.insert("database", db.clone());
    }
    if let Some(user) = &st.db_user {
        context.insert("db_user", user.clone());
    }
    let join = |items: Vec<&str>| {
        let mut items = items;
        items.dedup();
        items.join(", ")
    };
    context.insert(
        "class",
        join(statements.iter().map(|s| s.class.as_str()).collect()),
    );
    let tables = |f: fn(&Statement) -> &Vec<String>| {
        join(
            statements
                .iter()
                .flat_map(|s| f(s).iter().map(String::as_str))
                .collect(),
        )
    };
    for (key, names) in [
        ("tables_written", tables(|s| &s.writes)),
        ("tables_read", tables(|s| &s.reads)),
    ] {
        if !names.is_empty() {
            context.insert(key, names);
        }
    }
    context
}

fn hold_request(
    session: &Session,
    sql: &str,
    verdict: &Verdict,
    context: BTreeMap<&'static str, String>,
) -> HoldRequest {
    HoldRequest {
        session_id: session.session_id.clone(),
        protocol: "postgres",
        identity: session.identity.clone(),
        workload: session.workload.clone(),
        destination: session.destination,
        rule: verdict.rule.clone(),
        request: sql.to_string(),
        context,
        caused_by: verdict.link.clone(),
        approval: verdict
            .hold
            .clone()
            .expect("hold_request is called for held verdicts"),
    }
}

fn decide(session: &Session, st: &State, statement: &Statement) -> Verdict {
    let link = session
        .lineage
        .claim_statement(session.identity.cgroup_id, &statement.text);
    let decision = session
        .policy
        .current()
        .decide_statement(&StatementRequest {
            identity: &session.identity,
            destination: session.destination,
            database: st.database.as_deref(),
            db_user: st.db_user.as_deref(),
            class: statement.class.as_str(),
            tables_read: &statement.reads,
            tables_written: &statement.writes,
            functions: &statement.functions,
            from_llm: link.is_some(),
        });
    let hold = decision
        .approval
        .filter(|_| decision.action == Action::Approve);
    // A rule holds only where reviewers can be reached (the policy makes
    // sure of it when it loads; this is for an agent built without one).
    let unreachable = hold.is_some() && session.approvals.is_none();
    Verdict {
        denied: decision.action == Action::Deny || unreachable,
        rule: decision.rule,
        mask: decision.mask,
        link,
        hold: hold.filter(|_| !unreachable),
        approval_id: None,
        refusal: unreachable
            .then(|| "held for approval, and this agent serves no approvals".to_string()),
    }
}

fn denial_message(rule: &str) -> String {
    format!("permission denied by Warden policy rule \"{rule}\"")
}

/// The outcome of a statement held back because it, or another statement of
/// the same query, was denied.
fn held_back(this_one: bool, denial: &Verdict) -> Outcome {
    if this_one {
        Outcome {
            error: denial.refusal(),
            sqlstate: Some("42501"),
        }
    } else {
        Outcome {
            error: format!(
                "not run: another statement of the same query was denied by rule \"{}\"",
                denial.rule
            ),
            sqlstate: None,
        }
    }
}

fn denial_error(denial: &Verdict) -> Vec<u8> {
    encode::error_response(
        Severity::Error,
        "42501",
        &denial.refusal(),
        None,
        Some("ask the owner of the Warden policy on this host if this statement should be allowed"),
    )
}

/// Returns bytes to put before this server message (a denial's error).
fn observe_server(
    frame: &Frame,
    session: &Session,
    state: &Mutex<State>,
) -> Result<ServerAction, SessionError> {
    let message = BackendMessage::decode(frame).map_err(from_server)?;
    let mut st = lock(state);
    let answered = |st: &mut State| st.pending.front().is_some_and(|p| p.outcome.is_none());
    match message {
        BackendMessage::RowDescription { fields } => {
            let fields = Arc::new(fields);
            // The answer to a Describe of a statement: rows come later, in
            // the answer to an Execute of a portal bound to it.
            match st.describing.pop_front().map(|(_, d)| d) {
                Some(Described::Statement(name)) => {
                    if let Some(prepared) = st.prepared.get_mut(&name) {
                        prepared.columns = Some(fields);
                    }
                    return Ok(ServerAction::default());
                }
                Some(Described::Portal(name)) => {
                    if let Some(portal) = st.portals.get_mut(&name) {
                        portal.columns = Some(fields.clone());
                    }
                }
                None => {}
            }
            let mask = st.pending.front().and_then(|p| p.verdict.mask.clone());
            st.row_masks = mask.and_then(|masker| row_masks(&masker, &fields));
        }
        BackendMessage::NoData => {
            st.describing.pop_front();
        }
        // Channel binding ties SCRAM to one TLS connection, and the agent
        // sits between two: a -PLUS mechanism could only fail, so the
        // client is offered the others.
        BackendMessage::Authentication(Authentication::Sasl { mechanisms })
            if mechanisms.iter().any(|m| m.ends_with("-PLUS")) =>
        {
            let offered: Vec<&str> = mechanisms
                .iter()
                .map(String::as_str)
                .filter(|m| !m.ends_with("-PLUS"))
                .collect();
            return Ok(ServerAction {
                before: None,
                replace: Some(encode::authentication_sasl(&offered)),
            });
        }
        BackendMessage::CopyOutResponse(response) => {
            let mask = st.pending.front().and_then(|p| p.verdict.mask.clone());
            st.copy_out = mask.and_then(|masker| {
                if masker.masks_columns() || response.format != 0 {
                    Some(CopyOut::Withhold)
                } else {
                    masker.has_detectors().then_some(CopyOut::Scan(masker))
                }
            });
        }
        BackendMessage::CopyData { .. } | BackendMessage::CopyDone if st.copy_out.is_some() => {
            let Some(CopyOut::Scan(masker)) = &st.copy_out else {
                return Ok(ServerAction {
                    before: None,
                    replace: Some(Vec::new()),
                });
            };
            let (text, n) = match std::str::from_utf8(frame.body()) {
                Ok(text) => masker.mask_text(text),
                Err(_) => (Cow::Borrowed(""), 0),
            };
            if let Some(p) = st.pending.front_mut() {
                p.masked += u64::from(n);
            }
            return Ok(ServerAction {
                before: None,
                replace: (n > 0).then(|| encode::copy_data(text.as_bytes())),
            });
        }
        BackendMessage::DataRow(row) => {
            let masks = st
                .row_masks
                .as_ref()
                .or_else(|| st.pending.front().and_then(|p| p.masks.as_ref()));
            let masked = masks.and_then(|m| mask_row(m, &row, frame));
            if let Some(p) = st.pending.front_mut() {
                p.rows_seen += 1;
                if let Some((_, n)) = &masked {
                    p.masked += u64::from(*n);
                }
            }
            return Ok(ServerAction {
                before: None,
                replace: masked.map(|(bytes, _)| bytes),
            });
        }
        BackendMessage::CommandComplete(_) if matches!(st.copy_out, Some(CopyOut::Withhold)) => {
            st.copy_out = None;
            if answered(&mut st)
                && let Some(p) = st.pending.pop_front()
            {
                emit(
                    session,
                    &mut st,
                    p,
                    Some(0),
                    Some(COPY_WITHHELD.into()),
                    Some("42501".into()),
                );
            }
            return Ok(ServerAction {
                before: None,
                replace: Some(encode::error_response(
                    Severity::Error,
                    "42501",
                    COPY_WITHHELD,
                    None,
                    None,
                )),
            });
        }
        BackendMessage::CommandComplete(tag) => {
            // The next result set has its own columns.
            st.row_masks = None;
            st.copy_out = None;
            if answered(&mut st)
                && let Some(p) = st.pending.pop_front()
            {
                let rows = tag.rows().or(Some(p.rows_seen));
                emit(session, &mut st, p, rows, None, None);
            }
        }
        BackendMessage::EmptyQueryResponse | BackendMessage::PortalSuspended => {
            if answered(&mut st)
                && let Some(p) = st.pending.pop_front()
            {
                let rows = Some(p.rows_seen);
                emit(session, &mut st, p, rows, None, None);
            }
        }
        BackendMessage::FunctionCallResponse { .. } => {
            if answered(&mut st)
                && let Some(p) = st.pending.pop_front()
            {
                emit(session, &mut st, p, None, None, None);
            }
        }
        BackendMessage::ErrorResponse(fields) => {
            st.row_masks = None;
            st.copy_out = None;
            if answered(&mut st)
                && let Some(p) = st.pending.pop_front()
            {
                let error = fields.message().map(str::to_string);
                let code = fields.code().map(str::to_string);
                emit(session, &mut st, p, None, error, code);
            }
        }
        BackendMessage::ReadyForQuery { .. } => {
            st.batches_answered += 1;
            let done = st.batches_answered;
            // What this batch left unanswered was skipped after an error, or held back.
            while st.pending.front().is_some_and(|p| p.batch <= done) {
                if let Some(p) = st.pending.pop_front() {
                    emit(
                        session,
                        &mut st,
                        p,
                        None,
                        Some("not run: an earlier statement failed".into()),
                        None,
                    );
                }
            }
            st.row_masks = None;
            // Describes of the batch that an error made the server skip.
            while st
                .describing
                .front()
                .is_some_and(|(batch, _)| *batch <= done)
            {
                st.describing.pop_front();
            }
            let injection = st.injections.pop_front().unwrap_or_default();
            return Ok(ServerAction {
                before: injection.error,
                replace: injection.swallow.then(Vec::new),
            });
        }
        _ => {}
    }
    Ok(ServerAction::default())
}

/// Bytes to put before a server message, or in its place.
#[derive(Default)]
struct ServerAction {
    before: Option<Vec<u8>>,
    replace: Option<Vec<u8>>,
}

/// What to do with each column of rows described by `fields`; None when
/// the mask leaves all of them alone.
fn row_masks(masker: &Arc<Masker>, fields: &[FieldDescription]) -> Option<RowMasks> {
    let columns: Vec<ColumnAction> = fields
        .iter()
        .map(|f| {
            let text = TEXT_TYPES.contains(&f.type_oid);
            match (masker.masks_column(&f.name), text) {
                (true, true) => ColumnAction::Whole,
                (true, false) => ColumnAction::Null,
                (false, true) if masker.has_detectors() => ColumnAction::Scan,
                _ => ColumnAction::Keep,
            }
        })
        .collect();
    columns
        .iter()
        .any(|c| *c != ColumnAction::Keep)
        .then(|| RowMasks {
            masker: masker.clone(),
            columns,
        })
}

/// The row with its masked values, and how many were masked; None when
/// nothing in it needed masking (the row goes on as it came).
fn mask_row(masks: &RowMasks, row: &DataRow, frame: &Frame) -> Option<(Vec<u8>, u32)> {
    let mut count = 0u32;
    let mut values: Vec<Option<Cow<'_, [u8]>>> = Vec::with_capacity(row.len());
    for (i, value) in row.values(frame).enumerate() {
        let action = masks.columns.get(i).copied().unwrap_or(ColumnAction::Keep);
        let new = match (action, value) {
            (_, None) | (ColumnAction::Keep, _) => value.map(Cow::Borrowed),
            (ColumnAction::Null, Some(_)) => {
                count += 1;
                None
            }
            (ColumnAction::Whole, Some(v)) => {
                count += 1;
                Some(Cow::Owned(
                    masks
                        .masker
                        .mask_value(&String::from_utf8_lossy(v))
                        .into_bytes(),
                ))
            }
            (ColumnAction::Scan, Some(v)) => match std::str::from_utf8(v) {
                Ok(text) => match masks.masker.mask_text(text) {
                    (Cow::Owned(t), n) => {
                        count += n;
                        Some(Cow::Owned(t.into_bytes()))
                    }
                    (Cow::Borrowed(_), _) => Some(Cow::Borrowed(v)),
                },
                Err(_) => Some(Cow::Borrowed(v)),
            },
        };
        values.push(new);
    }
    (count > 0).then(|| {
        let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
        (encode::data_row(&refs), count)
    })
}

/// A statement the classifier did not see: an empty query, an Execute of an
/// unknown portal, a fast-path call.
fn statement_of(text: &str, class: StatementClass, functions: Vec<String>) -> Statement {
    Statement {
        text: text.to_string(),
        class,
        reads: Vec::new(),
        writes: Vec::new(),
        functions,
        parse_error: None,
        note: None,
    }
}

fn settle(session: &Session, state: &Mutex<State>, why: &str) {
    let mut st = lock(state);
    while let Some(p) = st.pending.pop_front() {
        emit(session, &mut st, p, None, Some(why.into()), None);
    }
}

fn emit(
    session: &Session,
    st: &mut State,
    p: Pending,
    rows: Option<u64>,
    error: Option<String>,
    sqlstate: Option<String>,
) {
    st.seq += 1;
    let (error, sqlstate) = match p.outcome {
        Some(o) => (Some(o.error), o.sqlstate.map(str::to_string)),
        None => (error, sqlstate),
    };
    session.audit.record_request(RequestRow {
        session_id: session.session_id.clone(),
        seq: st.seq,
        start_time: p.start,
        end_time: Utc::now(),
        identity: session.identity.clone(),
        workload: session.workload.clone(),
        destination: session.destination,
        protocol: "postgres",
        database: st.database.clone(),
        db_user: st.db_user.clone(),
        fingerprint: Some(fingerprint(&p.sql)),
        statement: Some(p.sql),
        statement_class: Some(p.statement.class.as_str()),
        tables_read: p.statement.reads,
        tables_written: p.statement.writes,
        functions: p.statement.functions,
        rows,
        masked: p.masked,
        decision: if p.verdict.denied { "deny" } else { "allow" },
        rule: p.verdict.rule,
        error,
        sqlstate,
        http: None,
        llm: None,
        ssh: None,
        caused_by: p.verdict.link,
        approval_id: p.verdict.approval_id,
    });
}
