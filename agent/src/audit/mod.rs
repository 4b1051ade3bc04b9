//! Audit: every connection, every request in it, and the decisions become
//! Parquet rows.
//!
//! The proxy hands a [`ConnectionRow`] (when a connection ends), a
//! [`RequestRow`] (when a request inside one completes) or an
//! [`ApprovalRow`] (at each step of a request held for approval) to an
//! [`AuditSink`],
//! which only pushes it into a bounded channel: a full channel drops the row
//! (and counts it) rather than slow the data path. The [`AuditWriter`]'s task
//! buffers the rows per table and, at each of a table's rotations, writes
//! them as zstd Parquet files, Hive-partitioned by the rows' start time:
//! `<dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<yyyymmddThhmmss>-<host>-<pid>-<seq>.parquet`
//! where `<table>` is `connections`, `requests`, `approvals` or `events`.
//!
//! Every row type implements the private `schema::Table` trait; everything
//! below it (buffering, rotation, retries, files) is generic over it, so a
//! new table is a row type, its schema, and a variant of `AuditRow`.
//! docs/audit.md describes the layout and the columns for analysts.
mod files;
mod journal;
pub mod query;
pub mod recording;

/// Where session recordings go, under the audit directory ([`recording`]).
pub const RECORDINGS_DIR: &str = "recordings";
pub mod replay;
pub mod retention;
mod schema;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    mem,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

pub use self::{
    files::AuditError,
    schema::{
        APPROVALS_SCHEMA_VERSION, APPROVALS_TABLE, CONNECTIONS_TABLE, EVENTS_SCHEMA_VERSION,
        EVENTS_TABLE, META_SCHEMA_VERSION, META_TABLE, REQUESTS_SCHEMA_VERSION, REQUESTS_TABLE,
        SCHEMA_VERSION, approvals_schema, connections_schema, events_schema, requests_schema,
    },
};
use self::{files::TableWriter, journal::Journal, schema::Table};
use crate::{budget::TokenLedger, identity::Identity, lineage::Link, metrics::Metrics};

/// One row of the `connections` table.
#[derive(Clone, Debug)]
pub struct ConnectionRow {
    pub session_id: String,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// "tcp" or "udp".
    pub transport: &'static str,
    pub identity: Identity,
    /// The policy workload the process matched, if any.
    pub workload: Option<String>,
    pub destination: SocketAddr,
    /// "tls", "https" (intercepted, HTTP inside), "http", "postgres", "ssh", "unknown" (client sent bytes we do
    /// not recognise), "server-first" (the server spoke first), "none" (no byte).
    pub protocol: &'static str,
    /// The name the client asked for in its TLS hello (SNI), if any.
    pub server_name: Option<String>,
    /// "intercepted" (the agent ended the client's TLS and made its own),
    /// "failed" (one of the two handshakes failed), or none (not TLS, or
    /// relayed without interception).
    pub tls: Option<&'static str>,
    /// "allow" or "deny".
    pub decision: &'static str,
    /// The rule that decided, or "default".
    pub rule: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Why the connection ended badly (upstream refused, reset...), if it did.
    pub error: Option<String>,
}

/// One row of the `requests` table: one request inside a connection (an SQL
/// statement today; HTTP requests and LLM calls later). Its `session_id` is
/// the connection's, so the two tables join on it.
#[derive(Clone, Debug)]
pub struct RequestRow {
    pub session_id: String,
    /// Order of the request within its session, from 1.
    pub seq: u64,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// Who asked, as on the connection's row (repeated so that one table answers "who ran this").
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: SocketAddr,
    /// "postgres" today.
    pub protocol: &'static str,
    pub database: Option<String>,
    pub db_user: Option<String>,
    /// The statement as the client sent it.
    pub statement: Option<String>,
    /// "read", "write", "ddl", "privilege", "copy", "function", "transaction", "session", "unknown".
    pub statement_class: Option<&'static str>,
    pub tables_read: Vec<String>,
    pub tables_written: Vec<String>,
    pub functions: Vec<String>,
    /// The statement with literals replaced, to group statements of one shape.
    pub fingerprint: Option<String>,
    /// Rows returned or affected, from the server's completion tag.
    pub rows: Option<u64>,
    /// Values the agent masked in the result (counts only, never values).
    pub masked: u64,
    /// "allow" or "deny".
    pub decision: &'static str,
    pub rule: String,
    /// The server's error message, or why the agent failed the request.
    pub error: Option<String>,
    /// The SQLSTATE of an error, when the protocol has one.
    pub sqlstate: Option<String>,
    /// For an HTTP request (LLM calls included): what was asked and answered.
    pub http: Option<HttpFields>,
    /// For a recognised LLM API call: the model, prompt and answer.
    pub llm: Option<LlmFields>,
    /// For an SSH channel request: who, what, and how it ended.
    pub ssh: Option<SshFields>,
    /// The LLM exchange whose answer proposed this request, and how the two
    /// matched ([`crate::lineage`]).
    pub caused_by: Option<Link>,
    /// The approval that held this request, when a rule said approve: joins
    /// the `approvals` table.
    pub approval_id: Option<String>,
}

/// The HTTP columns of a `requests` row.
#[derive(Clone, Debug, Default)]
pub struct HttpFields {
    pub method: String,
    /// The host the client addressed (Host or :authority, else the TLS name).
    pub host: Option<String>,
    /// The path, without the query string (which may carry secrets).
    pub path: String,
    /// The status the client got: the server's, or the agent's own on a denial.
    pub status: Option<u16>,
    /// The verified workload token's issuer and subject, if the request
    /// carried one (in addition to the kernel's attribution).
    pub token_issuer: Option<String>,
    pub token_subject: Option<String>,
}

/// The SSH columns of a `requests` row: one row per exec, shell,
/// subsystem, forward or agent request.
#[derive(Clone, Debug, Default)]
pub struct SshFields {
    /// The user the agent logged in as upstream.
    pub user: String,
    /// "exec", "shell", "subsystem", "forward", "agent" or "x11".
    pub channel: &'static str,
    /// The exec command line, the subsystem's name, or a forward's
    /// `host:port`.
    pub command: Option<String>,
    /// The exit status the server (or the agent, on a refusal) gave.
    pub exit_status: Option<u32>,
    /// The asciicast v2 file of what the channel showed, when recorded.
    pub recording: Option<String>,
}

/// The LLM columns of a `requests` row.
#[derive(Clone, Debug, Default)]
pub struct LlmFields {
    /// "openai" or "anthropic" (the API's shape, not who serves it).
    pub provider: &'static str,
    /// "chat", "responses", "embeddings", "completions" or "messages".
    pub endpoint: &'static str,
    pub model: Option<String>,
    pub stream: bool,
    /// The prompt after redaction, when the policy keeps prompts in full.
    pub prompt: Option<String>,
    /// SHA-256 (hex) of the prompt after redaction, unless the policy keeps nothing.
    pub prompt_sha256: Option<String>,
    /// The answer's text, after masking.
    pub response: Option<String>,
    /// Tool calls the answer asked for, each as JSON `{"name":..,"arguments":..}`.
    pub tool_calls: Vec<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Findings redacted from the request before it left the host.
    pub redacted: u64,
}

/// One row of the `approvals` table: one step in the life of a request a
/// rule held for approval. Every step of one request shares its
/// `approval_id`, and the request's own `requests` row carries it too.
#[derive(Clone, Debug)]
pub struct ApprovalRow {
    pub time: DateTime<Utc>,
    pub approval_id: String,
    pub step: ApprovalStep,
    /// The held request's session: joins `connections` and `requests`.
    pub session_id: String,
    /// "postgres" or "http".
    pub protocol: &'static str,
    /// Who asked: the requesting process, from the kernel.
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: SocketAddr,
    /// The rule that held the request.
    pub rule: String,
    /// What is held: the SQL statement, or `METHOD host/path`.
    pub request: String,
    /// The reviewer of an approved, rejected or refused step: the ID
    /// token's subject, email and groups.
    pub reviewer: Option<String>,
    pub reviewer_email: Option<String>,
    pub reviewer_groups: Vec<String>,
    /// Distinct approvals so far, and how many the rule needs.
    pub approvals: u32,
    pub quorum: u32,
    /// A rejection's reason, why a reviewer was refused, why it expired.
    pub reason: Option<String>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalStep {
    /// The rule held the request; reviewers were asked.
    Requested,
    /// One reviewer approved; with the quorum reached the request is
    /// released.
    Approved,
    Rejected,
    /// Nobody decided before the rule's `expires`.
    Expired,
    /// A reviewer's decision was refused (not in the groups, a workload
    /// owner or the requester, a token that failed verification): the
    /// request still waits.
    Refused,
    /// The request was released and sent on.
    Executed,
    /// The requester went away (connection closed, agent stopped) while
    /// the request waited.
    Abandoned,
}

impl ApprovalStep {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStep::Requested => "requested",
            ApprovalStep::Approved => "approved",
            ApprovalStep::Rejected => "rejected",
            ApprovalStep::Expired => "expired",
            ApprovalStep::Refused => "refused",
            ApprovalStep::Executed => "executed",
            ApprovalStep::Abandoned => "abandoned",
        }
    }
}

/// One row of the `events` table: what happened to the agent itself (its
/// start and stop, the audit failing to write and writing again, rows
/// recovered from a dead agent's journal).
#[derive(Clone, Debug)]
pub struct EventRow {
    pub time: DateTime<Utc>,
    pub event: Event,
    /// What happened, in a sentence for people.
    pub message: String,
    /// The rows it concerns: dropped during an outage, or recovered.
    pub rows: Option<u64>,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    AgentStarted,
    AgentStopped,
    /// The audit cannot be written (disk full, permissions): rows are kept
    /// in memory, up to a bound, from now on.
    AuditUnwritable,
    /// It can again; `rows` counts what was dropped meanwhile.
    AuditWritable,
    /// Rows a dead agent left in its journal were written.
    AuditRecovered,
    /// A new policy is in force; the message says where it came from.
    PolicyReloaded,
    /// A new policy was refused (the message says why); the old one stays.
    PolicyReloadRefused,
    /// The agent's programs now redirect a cgroup's connections.
    CgroupAttached,
    /// They no longer do (the cgroup went, or the agent stopped managing it).
    CgroupDetached,
    /// The agent listens in a managed cgroup's own network namespace.
    NetnsServed,
    /// No managed cgroup has processes there any more: it stopped.
    NetnsReleased,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::AgentStarted => "agent_started",
            Event::AgentStopped => "agent_stopped",
            Event::AuditUnwritable => "audit_unwritable",
            Event::AuditWritable => "audit_writable",
            Event::AuditRecovered => "audit_recovered",
            Event::PolicyReloaded => "policy_reloaded",
            Event::PolicyReloadRefused => "policy_reload_refused",
            Event::CgroupAttached => "cgroup_attached",
            Event::NetnsServed => "netns_served",
            Event::NetnsReleased => "netns_released",
            Event::CgroupDetached => "cgroup_detached",
        }
    }
}

impl EventRow {
    pub fn now(event: Event, message: impl Into<String>) -> EventRow {
        EventRow {
            time: Utc::now(),
            event,
            message: message.into(),
            rows: None,
            error: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The audit directory; the tables live in `<dir>/connections`,
    /// `<dir>/requests`, `<dir>/approvals` and `<dir>/events`.
    pub dir: PathBuf,
    /// Write a table's file at the latest this long after its first
    /// buffered row.
    pub rotate_every: Duration,
    /// Write a table's file as soon as its buffered rows' estimated size
    /// reaches this.
    pub rotate_bytes: u64,
    /// Append the rows received since the last append to the table's
    /// journal this often: a crash of the agent loses at most the rows of
    /// this interval (see [`journal`]).
    pub journal_every: Duration,
    /// Remove partitions whose hour ended longer ago than this (see
    /// [`retention`]); `None` keeps everything.
    pub retention: Option<Duration>,
}

impl AuditConfig {
    /// Default `rotate_every`: 60 s.
    pub const DEFAULT_ROTATE_EVERY: Duration = Duration::from_secs(60);
    /// Default `rotate_bytes`: 64 MiB.
    pub const DEFAULT_ROTATE_BYTES: u64 = 64 << 20;
    /// Default `journal_every`: 200 ms.
    pub const DEFAULT_JOURNAL_EVERY: Duration = Duration::from_millis(200);
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: PathBuf::from("/var/lib/warden/audit"),
            rotate_every: Self::DEFAULT_ROTATE_EVERY,
            rotate_bytes: Self::DEFAULT_ROTATE_BYTES,
            journal_every: Self::DEFAULT_JOURNAL_EVERY,
            retention: None,
        }
    }
}

/// Rows (of all the tables together) the channel between the sinks and the
/// writer holds.
pub const CHANNEL_CAPACITY: usize = 65_536;

/// The first wait before retrying a failed write; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What goes through the channel: a row of one of the tables (boxed: the
/// channel holds many, and they differ in size).
enum AuditRow {
    Connection(Box<ConnectionRow>),
    Request(Box<RequestRow>),
    Event(Box<EventRow>),
    Approval(Box<ApprovalRow>),
}

impl AuditRow {
    fn table(&self) -> &'static str {
        match self {
            AuditRow::Connection(_) => CONNECTIONS_TABLE,
            AuditRow::Request(_) => REQUESTS_TABLE,
            AuditRow::Event(_) => EVENTS_TABLE,
            AuditRow::Approval(_) => APPROVALS_TABLE,
        }
    }
}

/// Cheap to clone; never blocks the data path.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditRow>,
    dropped: Arc<AtomicU64>,
    writable: Arc<AtomicBool>,
    /// Counts every row as it passes, dropped or not.
    metrics: Option<Arc<Metrics>>,
    /// The day's LLM tokens per workload, learnt from this audit's files
    /// at start; shared by every clone.
    tokens: Arc<TokenLedger>,
}

impl AuditSink {
    /// Queues a `connections` row for writing. Never blocks: when the writer
    /// is behind (the channel is full) or gone, the row is dropped and
    /// counted.
    pub fn record(&self, row: ConnectionRow) {
        if let Some(m) = &self.metrics {
            m.observe_connection(&row);
        }
        self.send(AuditRow::Connection(Box::new(row)));
    }

    /// Queues a `requests` row for writing, like [`AuditSink::record`]:
    /// never blocks, and a row that does not fit is dropped and counted.
    pub fn record_request(&self, row: RequestRow) {
        if let Some(m) = &self.metrics {
            m.observe_request(&row);
        }
        self.send(AuditRow::Request(Box::new(row)));
    }

    /// Queues an `approvals` row, like [`AuditSink::record`].
    pub fn record_approval(&self, row: ApprovalRow) {
        if let Some(m) = &self.metrics {
            m.observe_approval(&row);
        }
        self.send(AuditRow::Approval(Box::new(row)));
    }

    /// Queues an `events` row, like [`AuditSink::record`].
    pub fn record_event(&self, row: EventRow) {
        if let Some(m) = &self.metrics {
            m.observe_event(&row);
        }
        self.send(AuditRow::Event(Box::new(row)));
    }

    /// Whether the audit is being written: false from the first failed
    /// write (of the journal or a file) until writes succeed again. A
    /// policy with `audit.on_failure: fail_closed` refuses new connections
    /// meanwhile.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    fn send(&self, row: AuditRow) {
        let table = row.table();
        if self.tx.try_send(row).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.rows_dropped(table, 1);
            }
        }
    }

    /// The LLM tokens each workload used today, for the policy's budgets.
    pub fn tokens(&self) -> &TokenLedger {
        &self.tokens
    }

    /// The agent's metrics, when it serves them.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Rows (of any table) dropped so far: channel full, writer shut
    /// down, or a write that kept failing until the retained rows exceeded
    /// their bound.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Owns the task that writes the files.
pub struct AuditWriter {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<u64>>,
    dropped: Arc<AtomicU64>,
    retention: Option<JoinHandle<()>>,
}

impl AuditWriter {
    /// Creates the tables' directories under `<dir>`, removes files a
    /// crash left half-written, writes the rows of dead agents' journals, and starts the writer task. Must be called
    /// inside a tokio runtime.
    pub fn start(config: AuditConfig) -> anyhow::Result<(AuditSink, AuditWriter)> {
        Self::start_with_capacity(config, CHANNEL_CAPACITY, None)
    }

    /// [`AuditWriter::start`], counting the rows in `metrics` as they pass
    /// the sink and as they are written or dropped.
    pub fn start_with_metrics(
        config: AuditConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> anyhow::Result<(AuditSink, AuditWriter)> {
        Self::start_with_capacity(config, CHANNEL_CAPACITY, metrics)
    }

    pub(crate) fn start_with_capacity(
        config: AuditConfig,
        capacity: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> anyhow::Result<(AuditSink, AuditWriter)> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("the audit writer must be started inside a tokio runtime")?;
        let host = files::hostname();
        let dropped = Arc::new(AtomicU64::new(0));
        let writable = Arc::new(AtomicBool::new(true));
        let drops = Drops {
            total: dropped.clone(),
            metrics: metrics.clone(),
        };
        let (connections, recovered_connections) =
            TableState::open(&config, host.clone(), drops.clone())?;
        let (requests, recovered_requests) =
            TableState::open(&config, host.clone(), drops.clone())?;
        let (approvals, recovered_approvals) =
            TableState::open(&config, host.clone(), drops.clone())?;
        let (events, recovered_events) = TableState::open(&config, host, drops)?;
        let mut state = WriterState {
            connections,
            requests,
            approvals,
            events,
            dropped: dropped.clone(),
            dropped_reported: 0,
            journal_every: config.journal_every,
            journal_at: None,
            writable: writable.clone(),
            outage: None,
        };
        for (table, done) in [
            (CONNECTIONS_TABLE, recovered_connections),
            (REQUESTS_TABLE, recovered_requests),
            (APPROVALS_TABLE, recovered_approvals),
            (EVENTS_TABLE, recovered_events),
        ] {
            if done.rows > 0 {
                state.push_event(EventRow {
                    rows: Some(done.rows as u64),
                    ..EventRow::now(
                        Event::AuditRecovered,
                        format!(
                            "wrote {} {table} rows from {} journals of agents that died",
                            done.rows, done.journals
                        ),
                    )
                });
            }
        }

        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = runtime.spawn(state.run(rx, stop_rx));
        let retention = config
            .retention
            .map(|keep| runtime.spawn(sweep_forever(config.dir.clone(), keep)));
        Ok((
            AuditSink {
                tx,
                dropped: dropped.clone(),
                writable,
                tokens: Arc::new(TokenLedger::new(Some(config.dir.clone()), metrics.clone())),
                metrics,
            },
            AuditWriter {
                stop: stop_tx,
                task,
                dropped,
                retention,
            },
        ))
    }

    /// Rows dropped so far (the same counter as [`AuditSink::dropped`]).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes every row recorded before this call and stops the writer.
    /// Rows recorded afterwards are dropped. Returns how many rows the writer
    /// wrote in total, of `connections`, `requests` and `approvals` together
    /// (not `events`).
    pub async fn shutdown(self) -> anyhow::Result<u64> {
        if let Some(retention) = &self.retention {
            retention.abort();
        }
        // The task may have ended already (every sink dropped): fine.
        let _ = self.stop.send(());
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the audit writer task failed: {e}")),
        }
    }
}

/// A failed file: its path, its row count and the error.
type Failure = (String, usize, AuditError);

struct WriterState {
    connections: TableState<ConnectionRow>,
    requests: TableState<RequestRow>,
    approvals: TableState<ApprovalRow>,
    events: TableState<EventRow>,
    dropped: Arc<AtomicU64>,
    dropped_reported: u64,
    journal_every: Duration,
    /// When the rows received since the last journal append are due in the
    /// journals (or a broken journal is tried again); none while every row
    /// is there.
    journal_at: Option<Instant>,
    /// Shared with the sinks: no table is failing.
    writable: Arc<AtomicBool>,
    outage: Option<Outage>,
}

/// Since when the audit cannot be written, and the drop count then.
struct Outage {
    since: DateTime<Utc>,
    dropped_before: u64,
}

impl WriterState {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<AuditRow>,
        mut stop: oneshot::Receiver<()>,
    ) -> anyhow::Result<u64> {
        loop {
            let deadline = self.deadline();
            tokio::select! {
                biased;
                // A message or a dropped AuditWriter: stop either way.
                _ = &mut stop => break,
                row = rx.recv() => match row {
                    Some(row) => self.accept(row).await,
                    None => break, // every sink is gone
                },
                _ = sleep_until(deadline), if deadline.is_some() => self.on_deadline().await,
            }
        }
        // Everything recorded before the stop is in the channel: close it so
        // that later rows are refused, then take what is left.
        rx.close();
        while let Some(row) = rx.recv().await {
            self.accept(row).await;
        }
        self.finish().await
    }

    /// Buffers the row in its table, and writes that table if its buffer
    /// reached `rotate_bytes`.
    async fn accept(&mut self, row: AuditRow) {
        self.journal_at
            .get_or_insert_with(|| Instant::now() + self.journal_every);
        match row {
            AuditRow::Connection(row) => {
                if self.connections.push(*row) {
                    self.report_drops();
                    self.connections.flush().await;
                }
            }
            AuditRow::Request(row) => {
                if self.requests.push(*row) {
                    self.report_drops();
                    self.requests.flush().await;
                }
            }
            AuditRow::Approval(row) => {
                if self.approvals.push(*row) {
                    self.report_drops();
                    self.approvals.flush().await;
                }
            }
            AuditRow::Event(row) => {
                if self.events.push(*row) {
                    self.events.flush().await;
                }
            }
        }
        self.check_health();
    }

    fn push_event(&mut self, row: EventRow) {
        self.events.push(row);
        self.journal_at
            .get_or_insert_with(|| Instant::now() + self.journal_every);
    }

    /// Notes the moment the audit stops being writable, and the moment it
    /// is again, as events (written once the disk takes them).
    fn check_health(&mut self) {
        let failing = [
            self.connections.failure(),
            self.requests.failure(),
            self.approvals.failure(),
            self.events.failure(),
        ]
        .into_iter()
        .flatten()
        .next();
        match (failing, &self.outage) {
            (Some(error), None) => {
                let dropped_before = self.dropped.load(Ordering::Relaxed);
                let since = Utc::now();
                self.outage = Some(Outage {
                    since,
                    dropped_before,
                });
                self.writable.store(false, Ordering::Relaxed);
                self.push_event(EventRow {
                    error: Some(error),
                    ..EventRow::now(
                        Event::AuditUnwritable,
                        "the audit cannot be written; rows are kept in memory up to a bound, then dropped and counted",
                    )
                });
            }
            (None, Some(outage)) => {
                let dropped = self.dropped.load(Ordering::Relaxed) - outage.dropped_before;
                let seconds = (Utc::now() - outage.since).num_milliseconds() as f64 / 1000.0;
                self.outage = None;
                self.writable.store(true, Ordering::Relaxed);
                tracing::info!(dropped, seconds, "audit: written again");
                self.push_event(EventRow {
                    rows: Some(dropped),
                    ..EventRow::now(
                        Event::AuditWritable,
                        format!(
                            "the audit is written again after {seconds:.1} s; {dropped} rows were dropped meanwhile"
                        ),
                    )
                });
            }
            _ => {}
        }
    }

    /// The earliest of the journal's and the tables' deadlines.
    fn deadline(&self) -> Option<Instant> {
        [
            self.journal_at,
            self.connections.deadline(),
            self.requests.deadline(),
            self.approvals.deadline(),
            self.events.deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Journals the new rows if that is due, then writes the tables whose
    /// rotation is due.
    async fn on_deadline(&mut self) {
        let now = Instant::now();
        if self.journal_at.is_some_and(|at| at <= now) {
            self.journal_at = None;
            self.connections.journal();
            self.requests.journal();
            self.approvals.journal();
            self.events.journal();
            if self.connections.journal_broken
                || self.requests.journal_broken
                || self.approvals.journal_broken
                || self.events.journal_broken
            {
                self.journal_at = Some(now + RETRY_FIRST);
            }
        }
        self.report_drops();
        if self.connections.is_due(now) {
            self.connections.flush().await;
        }
        if self.requests.is_due(now) {
            self.requests.flush().await;
        }
        if self.approvals.is_due(now) {
            self.approvals.flush().await;
        }
        if self.events.is_due(now) {
            self.events.flush().await;
        }
        self.check_health();
    }

    /// The final flush of every table: one last attempt. Rows that fail
    /// stay in their table's journal for the next agent to write; only
    /// those that cannot be kept there either are lost (and counted).
    async fn finish(mut self) -> anyhow::Result<u64> {
        self.report_drops();
        let mut failed = self.connections.write_buffer().await;
        failed.extend(self.requests.write_buffer().await);
        failed.extend(self.approvals.write_buffer().await);
        failed.extend(self.events.write_buffer().await);
        // Events are about the agent, not the traffic: not counted here.
        let written = self.connections.written + self.requests.written + self.approvals.written;
        let kept = [
            self.connections.close_journal(),
            self.requests.close_journal(),
            self.approvals.close_journal(),
            self.events.close_journal(),
        ];
        // Each table counted its own lost rows.
        let lost: usize = kept.iter().filter_map(|k| k.as_ref().err()).sum();
        let Some((path, rows, err)) = failed.into_iter().next() else {
            return Ok(written);
        };
        let advice = err.advice();
        let kept: Vec<String> = kept
            .into_iter()
            .flatten()
            .flatten()
            .map(|p| p.display().to_string())
            .collect();
        let fate = if lost == 0 {
            format!(
                "they are kept in {} for the next agent on this audit directory, or `warden audit recover`, to write",
                kept.join(" and ")
            )
        } else {
            format!("{lost} of them are lost")
        };
        Err(anyhow::Error::new(err).context(format!(
            "audit: rows could not be written at shutdown (first failure: {rows} rows at {path}; {advice}); {fate}; {written} rows were written"
        )))
    }

    /// Logs the rows dropped since the last report, at most once per rotation.
    fn report_drops(&mut self) {
        let total = self.dropped.load(Ordering::Relaxed);
        if total > self.dropped_reported {
            tracing::warn!(
                dropped = total - self.dropped_reported,
                total,
                "audit: rows dropped: the writer fell behind or could not write"
            );
            self.dropped_reported = total;
        }
    }
}

/// One table's buffer, rotation and retry state.
struct TableState<T> {
    writer: Arc<TableWriter<T>>,
    journal: Journal,
    /// The first `journaled` rows of `buffer` are in the journal.
    journaled: usize,
    /// A journal write failed: the journal may end in a partial batch, so
    /// the next attempt rewrites it whole.
    journal_broken: bool,
    /// The latest write error, for the `audit_unwritable` event.
    last_error: Option<String>,
    rotate_every: Duration,
    rotate_bytes: u64,
    /// Rows retained across failed writes are bounded by this.
    max_pending_bytes: u64,
    buffer: Vec<T>,
    buffered_bytes: u64,
    /// When the oldest buffered row arrived: rotation is due `rotate_every` later.
    first_row_at: Option<Instant>,
    /// After a failed write, when to try again.
    retry_at: Option<Instant>,
    failures: u32,
    /// Rows of this table written so far.
    written: u64,
    drops: Drops,
}

/// Where a table counts the rows it loses: the agent's total (shared with
/// the sinks) and, when served, the metrics by table.
#[derive(Clone)]
struct Drops {
    total: Arc<AtomicU64>,
    metrics: Option<Arc<Metrics>>,
}

impl<T: Table> TableState<T> {
    /// Creates the table's directory, removes the temporary files a crash
    /// left in it, writes the rows of dead agents' journals, and starts
    /// this agent's journal.
    fn open(config: &AuditConfig, host: String, drops: Drops) -> anyhow::Result<(Self, Recovery)> {
        let writer = TableWriter::<T>::new(&config.dir, host);
        prepare_dir(writer.table_dir())?;
        let recovered = recover_table(&writer)?;
        let journal =
            Journal::create(writer.table_dir(), writer.host(), T::schema()).map_err(|e| {
                let advice = e.advice();
                anyhow::Error::new(e).context(format!("cannot start the audit journal; {advice}"))
            })?;
        let state = TableState {
            writer: Arc::new(writer),
            journal,
            journaled: 0,
            journal_broken: false,
            last_error: None,
            rotate_every: config.rotate_every,
            rotate_bytes: config.rotate_bytes,
            max_pending_bytes: config.rotate_bytes.saturating_mul(2).max(1 << 20),
            buffer: Vec::new(),
            buffered_bytes: 0,
            first_row_at: None,
            retry_at: None,
            failures: 0,
            written: 0,
            drops,
        };
        Ok((state, recovered))
    }

    /// Buffers the row; returns whether the buffer is due to be written
    /// because of its size.
    fn push(&mut self, row: T) -> bool {
        let size = row.estimated_size();
        if self.buffered_bytes.saturating_add(size) > self.max_pending_bytes {
            // Only reachable while writes fail: rows kept for the retry have
            // filled their bound.
            self.count_dropped(1);
            return false;
        }
        self.first_row_at.get_or_insert_with(Instant::now);
        self.buffered_bytes += size;
        self.buffer.push(row);
        self.retry_at.is_none() && self.buffered_bytes >= self.rotate_bytes
    }

    fn count_dropped(&self, rows: u64) {
        self.drops.total.fetch_add(rows, Ordering::Relaxed);
        if let Some(m) = &self.drops.metrics {
            m.rows_dropped(T::NAME, rows);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.retry_at
            .or_else(|| Some(self.first_row_at? + self.rotate_every))
    }

    fn is_due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|at| at <= now)
    }

    /// Why the table cannot be written right now, if it cannot.
    fn failure(&self) -> Option<String> {
        (self.journal_broken || self.retry_at.is_some())
            .then(|| self.last_error.clone().unwrap_or_default())
    }

    /// Appends the rows received since the last append to the journal
    /// (inline: a write of a few kilobytes to the page cache, no fsync), or
    /// rewrites it whole after a failure.
    fn journal(&mut self) {
        let result = if self.journal_broken {
            self.rejournal()
        } else if self.journaled < self.buffer.len() {
            T::to_record_batch(&self.buffer[self.journaled..], self.writer.host())
                .map_err(|source| AuditError::Arrow {
                    path: self.journal.path().to_path_buf(),
                    source,
                })
                .and_then(|batch| self.journal.append(&batch))
                .map(|()| self.journaled = self.buffer.len())
        } else {
            Ok(())
        };
        self.journal_result(result);
    }

    /// Replaces the journal with one holding exactly the buffered rows.
    fn rejournal(&mut self) -> Result<(), AuditError> {
        let pending = if self.buffer.is_empty() {
            Vec::new()
        } else {
            vec![
                T::to_record_batch(&self.buffer, self.writer.host()).map_err(|source| {
                    AuditError::Arrow {
                        path: self.journal.path().to_path_buf(),
                        source,
                    }
                })?,
            ]
        };
        self.journal.reset(&pending)?;
        self.journaled = self.buffer.len();
        Ok(())
    }

    fn journal_result(&mut self, result: Result<(), AuditError>) {
        match result {
            Ok(()) if self.journal_broken => {
                self.journal_broken = false;
                tracing::info!(table = T::NAME, "audit: the journal is written again");
            }
            Ok(()) => {}
            Err(err) => {
                self.last_error = Some(format!("{err}; {}", err.advice()));
                if !self.journal_broken {
                    tracing::error!(
                        table = T::NAME,
                        error = %err,
                        "audit: cannot write the journal; rows are kept in memory only until it works again: {}",
                        err.advice()
                    );
                }
                self.journal_broken = true;
            }
        }
    }

    /// At shutdown, after the last write: removes the journal when every
    /// row is in Parquet; else keeps the rows left in it and returns its
    /// path, or the number of rows it could not keep.
    fn close_journal(mut self) -> Result<Option<PathBuf>, usize> {
        if self.buffer.is_empty() {
            if let Err(err) = self.journal.remove() {
                tracing::warn!(error = %err, "audit: cannot remove the journal; the next start removes it");
            }
            return Ok(None);
        }
        if (self.journal_broken || self.journaled < self.buffer.len())
            && let Err(err) = self.rejournal()
        {
            tracing::error!(table = T::NAME, error = %err, "audit: cannot keep the rows left in the journal");
            self.count_dropped(self.buffer.len() as u64);
            return Err(self.buffer.len());
        }
        Ok(Some(self.journal.path().to_path_buf()))
    }

    /// Writes the buffer, one file per partition; rows of a file that could
    /// not be written stay buffered and are retried later.
    async fn flush(&mut self) {
        let failed = self.write_buffer().await;
        // The journal now needs only the rows still waiting.
        let rejournaled = self.rejournal();
        self.journal_result(rejournaled);
        if failed.is_empty() {
            self.failures = 0;
            self.retry_at = None;
            return;
        }
        self.failures += 1;
        if let Some((_, _, err)) = failed.first() {
            self.last_error = Some(format!("{err}; {}", err.advice()));
        }
        let wait = RETRY_FIRST
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(RETRY_MAX);
        self.retry_at = Some(Instant::now() + wait);
        for (path, rows, err) in failed {
            tracing::error!(
                table = T::NAME,
                path = %path,
                rows = rows,
                retry_in = ?wait,
                error = %err,
                "audit: cannot write a file; keeping its rows to retry: {}",
                err.advice()
            );
        }
    }

    /// Writes the buffered rows, one file per partition, on a blocking
    /// thread. Returns the failures; their rows are back in the buffer.
    async fn write_buffer(&mut self) -> Vec<Failure> {
        let rows = mem::take(&mut self.buffer);
        self.journaled = 0;
        self.buffered_bytes = 0;
        self.first_row_at = None;
        if rows.is_empty() {
            return Vec::new();
        }
        let count = rows.len();
        let mut partitions: BTreeMap<String, Vec<T>> = BTreeMap::new();
        for row in rows {
            partitions
                .entry(files::partition_of(row.start_time()))
                .or_default()
                .push(row);
        }
        let writer = self.writer.clone();
        let written = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|(partition, rows)| {
                    let result = writer.write_partition(&partition, &rows);
                    (partition, rows, result)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let results = match written {
            Ok(results) => results,
            Err(e) => {
                // The rows went with the blocking task.
                self.count_dropped(count as u64);
                tracing::error!(table = T::NAME, rows = count, error = %e, "audit: the file writer failed; rows lost");
                return Vec::new();
            }
        };
        let mut failed = Vec::new();
        for (partition, rows, result) in results {
            match result {
                Ok(path) => {
                    self.written += rows.len() as u64;
                    if let Some(m) = &self.drops.metrics {
                        m.rows_written(T::NAME, rows.len() as u64);
                    }
                    tracing::debug!(path = %path.display(), rows = rows.len(), "audit: wrote file");
                }
                Err(err) => {
                    let path = self
                        .writer
                        .table_dir()
                        .join(&partition)
                        .display()
                        .to_string();
                    failed.push((path, rows.len(), err));
                    for row in rows {
                        self.push(row);
                    }
                }
            }
        }
        failed
    }
}

/// Rows written to Parquet from the journals of agents that died.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub journals: usize,
    pub rows: usize,
}

/// Writes the journals that agents which died left under `dir` to Parquet
/// (`warden audit recover`; an agent starting on `dir` does it too).
/// Journals of running agents are left alone.
pub fn recover(dir: &Path) -> anyhow::Result<Recovery> {
    let host = files::hostname();
    let mut total = recover_table(&TableWriter::<ConnectionRow>::new(dir, host.clone()))?;
    for done in [
        recover_table(&TableWriter::<RequestRow>::new(dir, host.clone()))?,
        recover_table(&TableWriter::<ApprovalRow>::new(dir, host.clone()))?,
        recover_table(&TableWriter::<EventRow>::new(dir, host))?,
    ] {
        total.journals += done.journals;
        total.rows += done.rows;
    }
    Ok(total)
}

/// Writes each orphan journal of the table to Parquet and removes it. A
/// journal is all or nothing: if one of its files cannot be written, the
/// ones already written are removed and the journal stays for next time.
fn recover_table<T: Table>(writer: &TableWriter<T>) -> anyhow::Result<Recovery> {
    let dir = writer.table_dir();
    let orphans = journal::orphans(dir)
        .with_context(|| format!("cannot look for audit journals in {}", dir.display()))?;
    let mut done = Recovery::default();
    for orphan in orphans {
        let recovered = orphan.read().map_err(|e| {
            let advice = e.advice();
            anyhow::Error::new(e).context(format!("cannot read the audit journal; {advice}"))
        })?;
        let mut written = Vec::new();
        for (partition, batch) in &recovered.partitions {
            match writer.write_batch(partition, batch) {
                Ok(path) => written.push(path),
                Err(e) => {
                    for path in written {
                        let _ = std::fs::remove_file(path);
                    }
                    let advice = e.advice();
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot write the rows of the audit journal {} to Parquet; {advice}; it is kept for the next attempt",
                        orphan.path.display()
                    )));
                }
            }
        }
        let path = orphan.path.clone();
        orphan.remove().with_context(|| {
            format!(
                "wrote the rows of the audit journal {} but cannot remove it; remove it by hand, or its rows will be written twice",
                path.display()
            )
        })?;
        tracing::info!(
            path = %path.display(),
            rows = recovered.rows,
            cut_short = recovered.truncated.as_deref().unwrap_or("no"),
            "audit: wrote the rows an agent that died left in its journal"
        );
        done.journals += 1;
        done.rows += recovered.rows;
    }
    Ok(done)
}

/// Creates a table's directory and removes the `.*.tmp` files a crash left
/// under it.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the audit directory {}; make it writable by the agent or choose another",
            dir.display()
        )
    })?;
    let stale = files::remove_stale_tmp(dir).with_context(|| {
        format!(
            "cannot remove stale temporary files under {}",
            dir.display()
        )
    })?;
    if stale > 0 {
        tracing::info!(
            count = stale,
            dir = %dir.display(),
            "audit: removed temporary files a previous run left half-written"
        );
    }
    Ok(())
}

/// Applies the retention now and then every [`retention::SWEEP_EVERY`].
async fn sweep_forever(dir: PathBuf, keep: Duration) {
    let mut every = tokio::time::interval(retention::SWEEP_EVERY);
    loop {
        every.tick().await;
        let dir = dir.clone();
        match tokio::task::spawn_blocking(move || retention::sweep(&dir, keep, Utc::now())).await {
            Ok(Ok(swept)) if swept.partitions > 0 => tracing::info!(
                partitions = swept.partitions,
                files = swept.files,
                retention = ?keep,
                "audit: removed partitions older than the retention"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "audit: cannot apply the retention; check the audit directory's permissions"
            ),
            Err(e) => tracing::warn!(error = %e, "audit: the retention sweep failed"),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
