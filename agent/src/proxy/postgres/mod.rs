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
//! TLS requests are refused (`N`), so that the session stays readable;
//! clients that insist on TLS (sslmode=require) cannot connect through the
//! agent until it terminates PostgreSQL TLS itself.
use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    io,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::relay::Transferred;
use crate::{
    audit::{AuditSink, RequestRow},
    identity::Identity,
    lineage::{Lineage, Link},
    masking::Masker,
    policy::{Action, Policy, StatementRequest},
    protocols::postgres::{
        BackendFramer, BackendMessage, DataRow, Frame, FrontendFramer, FrontendMessage,
        ProtocolError, Severity, Statement, StatementClass, classify, encode, fingerprint,
    },
};

/// Who and where, for the request rows of one session.
pub struct Session {
    pub session_id: String,
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: std::net::SocketAddr,
    pub rule: String,
    pub audit: AuditSink,
    pub policy: Arc<Policy>,
    pub lineage: Arc<Lineage>,
}

/// How a statement was decided, by which rule, and what of its result is masked.
#[derive(Clone)]
struct Verdict {
    denied: bool,
    rule: String,
    mask: Option<Arc<Masker>>,
    /// The LLM exchange that proposed the statement, if one did.
    link: Option<Link>,
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
    /// For each batch in flight, the error to put before its ReadyForQuery.
    injections: VecDeque<Option<Vec<u8>>>,
    /// A denied extended-protocol statement: its messages are dropped until Sync.
    discarding: Option<Vec<u8>>,
    /// How the rows now being returned are masked, from their RowDescription.
    row_masks: Option<RowMasks>,
}

/// A statement parsed by the client, classified and decided once.
#[derive(Clone)]
struct Prepared {
    sql: String,
    statement: Statement,
    verdict: Verdict,
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
        });
    }

    /// A message the server answers with ReadyForQuery goes out.
    fn batch_sent(&mut self, injection: Option<Vec<u8>>) {
        self.batches_sent += 1;
        self.injections.push_back(injection);
    }
}

/// What to do with a client message.
enum Forwarding {
    Forward,
    Drop,
    Replace(Vec<u8>),
}

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
}

/// Serve one session until both sides are done. The byte counts are kept
/// even when the session ends with an error.
pub async fn serve(
    mut client: TcpStream,
    mut upstream: TcpStream,
    session: &Session,
) -> (Transferred, Result<(), SessionError>) {
    let state = Mutex::new(State::default());
    let mut framer = FrontendFramer::new();
    let mut up = 0u64;
    let mut down = 0u64;
    let mut result = startup(&mut client, &mut upstream, &mut framer, &state, &mut up).await;
    if result.is_ok() {
        let (client_read, client_write) = client.into_split();
        let (upstream_read, upstream_write) = upstream.into_split();
        result = tokio::try_join!(
            client_to_server(
                client_read,
                upstream_write,
                framer,
                session,
                &state,
                &mut up
            ),
            server_to_client(upstream_read, client_write, session, &state, &mut down),
        )
        .map(|_| ());
    }
    // Whatever is still unanswered when the session ends is audited too.
    settle(
        session,
        &state,
        "the session ended before the server answered",
    );
    (Transferred { up, down }, result)
}

/// The startup phase: encryption requests are refused here (`N`), the
/// StartupMessage (or a CancelRequest) goes on to the server.
async fn startup(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    framer: &mut FrontendFramer,
    state: &Mutex<State>,
    up: &mut u64,
) -> Result<(), SessionError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        while let Some(frame) = framer.next().map_err(from_client)? {
            match FrontendMessage::decode(&frame).map_err(from_client)? {
                FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                    client.write_all(b"N").await?
                }
                message @ FrontendMessage::Startup { .. } => {
                    {
                        let user = message.startup_param("user").map(str::to_string);
                        let mut st = lock(state);
                        // Without a database parameter the server uses the user's name.
                        st.database = message
                            .startup_param("database")
                            .map(str::to_string)
                            .or_else(|| user.clone());
                        st.db_user = user;
                    }
                    return forward(upstream, frame.bytes(), up).await;
                }
                // A cancel goes through as it is; the server closes after it.
                _ => return forward(upstream, frame.bytes(), up).await,
            }
        }
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        framer.push(&buf[..n]);
    }
}

async fn forward(to: &mut TcpStream, bytes: &[u8], count: &mut u64) -> Result<(), SessionError> {
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
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut framer: FrontendFramer,
    session: &Session,
    state: &Mutex<State>,
    moved: &mut u64,
) -> Result<(), SessionError> {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    loop {
        // Frames left from the startup read are handled before reading more.
        while let Some(frame) = framer.next().map_err(from_client)? {
            match observe_client(&frame, session, state)? {
                Forwarding::Forward => out.extend_from_slice(frame.bytes()),
                Forwarding::Drop => {}
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

/// Server to client: answers settle the pending statements, in order.
async fn server_to_client(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    session: &Session,
    state: &Mutex<State>,
    moved: &mut u64,
) -> Result<(), SessionError> {
    let mut framer = BackendFramer::new();
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await.map_err(SessionError::from);
        }
        framer.push(&buf[..n]);
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
    }
}

fn observe_client(
    frame: &Frame,
    session: &Session,
    state: &Mutex<State>,
) -> Result<Forwarding, SessionError> {
    let message = FrontendMessage::decode(frame).map_err(from_client)?;
    let mut st = lock(state);
    if st.discarding.is_some()
        && !matches!(message, FrontendMessage::Sync | FrontendMessage::Terminate)
    {
        // The server would skip these after an error, until Sync.
        return Ok(Forwarding::Drop);
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
            let denied = verdicts.iter().find(|v| v.denied).cloned();
            for (statement, verdict) in statements.into_iter().zip(verdicts) {
                let outcome = denied.as_ref().map(|d| held_back(verdict.denied, d));
                let sql = statement.text.clone();
                st.pend(statement, sql, verdict, outcome);
            }
            match denied {
                Some(d) => {
                    st.batch_sent(Some(denial_error(&d)));
                    Forwarding::Replace(encode::sync())
                }
                None => {
                    st.batch_sent(None);
                    Forwarding::Forward
                }
            }
        }
        FrontendMessage::Parse { name, sql, .. } => {
            let statement = st
                .classify(&sql)
                .into_iter()
                .next()
                .unwrap_or_else(|| statement_of(&sql, StatementClass::Unknown, Vec::new()));
            let verdict = decide(session, &st, &statement);
            if verdict.denied {
                st.discarding = Some(denial_error(&verdict));
                let outcome = held_back(true, &verdict);
                st.pend(statement, sql, verdict, Some(outcome));
                return Ok(Forwarding::Drop);
            }
            st.prepared.insert(
                name,
                Prepared {
                    sql,
                    statement,
                    verdict,
                },
            );
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
                    },
                });
            st.pend(p.statement, p.sql, p.verdict, None);
            Forwarding::Forward
        }
        FrontendMessage::Sync => {
            let injection = st.discarding.take();
            st.batch_sent(injection);
            Forwarding::Forward
        }
        FrontendMessage::FunctionCall { oid, .. } => {
            let sql = format!("-- fast-path function call, oid {oid}");
            let statement =
                statement_of(&sql, StatementClass::Function, vec![format!("oid {oid}")]);
            let verdict = decide(session, &st, &statement);
            if verdict.denied {
                let outcome = held_back(true, &verdict);
                let error = denial_error(&verdict);
                st.pend(statement, sql, verdict, Some(outcome));
                st.batch_sent(Some(error));
                return Ok(Forwarding::Replace(encode::sync()));
            }
            st.pend(statement, sql, verdict, None);
            st.batch_sent(None);
            Forwarding::Forward
        }
        _ => Forwarding::Forward,
    })
}

fn decide(session: &Session, st: &State, statement: &Statement) -> Verdict {
    let link = session
        .lineage
        .claim_statement(session.identity.cgroup_id, &statement.text);
    let decision = session.policy.decide_statement(&StatementRequest {
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
    Verdict {
        denied: decision.action == Action::Deny,
        rule: decision.rule,
        mask: decision.mask,
        link,
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
            error: denial_message(&denial.rule),
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
        &denial_message(&denial.rule),
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
            let mask = st.pending.front().and_then(|p| p.verdict.mask.clone());
            st.row_masks = mask.and_then(|masker| {
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
                    .then_some(RowMasks { masker, columns })
            });
        }
        BackendMessage::DataRow(row) => {
            let masked = st.row_masks.as_ref().and_then(|m| mask_row(m, &row, frame));
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
        BackendMessage::CommandComplete(tag) => {
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
            return Ok(ServerAction {
                before: st.injections.pop_front().flatten(),
                replace: None,
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
        caused_by: p.verdict.link,
    });
}
