//! Audit: every connection, every request in it, and the decisions become
//! Parquet rows.
//!
//! The proxy hands a [`ConnectionRow`] (when a connection ends) or a
//! [`RequestRow`] (when a request inside one completes) to an [`AuditSink`],
//! which only pushes it into a bounded channel: a full channel drops the row
//! (and counts it) rather than slow the data path. The [`AuditWriter`]'s task
//! buffers the rows per table and, at each of a table's rotations, writes
//! them as zstd Parquet files, Hive-partitioned by the rows' start time:
//! `<dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<yyyymmddThhmmss>-<pid>-<seq>.parquet`
//! where `<table>` is `connections` or `requests`.
//!
//! Both row types implement the private `schema::Table` trait; everything
//! below it (buffering, rotation, retries, files) is generic over it, so a
//! new table is a row type, its schema, and a variant of `AuditRow`.
//! docs/audit.md describes the layout and the columns for analysts.
mod files;
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
        atomic::{AtomicU64, Ordering},
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
        CONNECTIONS_TABLE, META_SCHEMA_VERSION, META_TABLE, REQUESTS_SCHEMA_VERSION,
        REQUESTS_TABLE, SCHEMA_VERSION, connections_schema, requests_schema,
    },
};
use self::{files::TableWriter, schema::Table};
use crate::identity::Identity;

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

#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The audit directory; the tables live in `<dir>/connections` and
    /// `<dir>/requests`.
    pub dir: PathBuf,
    /// Write a table's file at the latest this long after its first
    /// buffered row.
    pub rotate_every: Duration,
    /// Write a table's file as soon as its buffered rows' estimated size
    /// reaches this.
    pub rotate_bytes: u64,
}

impl AuditConfig {
    /// Default `rotate_every`: 60 s.
    pub const DEFAULT_ROTATE_EVERY: Duration = Duration::from_secs(60);
    /// Default `rotate_bytes`: 64 MiB.
    pub const DEFAULT_ROTATE_BYTES: u64 = 64 << 20;
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: PathBuf::from("/var/lib/warden/audit"),
            rotate_every: Self::DEFAULT_ROTATE_EVERY,
            rotate_bytes: Self::DEFAULT_ROTATE_BYTES,
        }
    }
}

/// Rows (of both tables together) the channel between the sinks and the
/// writer holds.
pub const CHANNEL_CAPACITY: usize = 65_536;

/// The first wait before retrying a failed write; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What goes through the channel: a row of one of the tables (boxed: the
/// channel holds many, and the two differ in size).
enum AuditRow {
    Connection(Box<ConnectionRow>),
    Request(Box<RequestRow>),
}

/// Cheap to clone; never blocks the data path.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditRow>,
    dropped: Arc<AtomicU64>,
}

impl AuditSink {
    /// Queues a `connections` row for writing. Never blocks: when the writer
    /// is behind (the channel is full) or gone, the row is dropped and
    /// counted.
    pub fn record(&self, row: ConnectionRow) {
        self.send(AuditRow::Connection(Box::new(row)));
    }

    /// Queues a `requests` row for writing, like [`AuditSink::record`]:
    /// never blocks, and a row that does not fit is dropped and counted.
    pub fn record_request(&self, row: RequestRow) {
        self.send(AuditRow::Request(Box::new(row)));
    }

    fn send(&self, row: AuditRow) {
        if self.tx.try_send(row).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Rows (of either table) dropped so far: channel full, writer shut
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
}

impl AuditWriter {
    /// Creates `<dir>/connections` and `<dir>/requests`, removes files a
    /// crash left half-written, and starts the writer task. Must be called
    /// inside a tokio runtime.
    pub fn start(config: AuditConfig) -> anyhow::Result<(AuditSink, AuditWriter)> {
        Self::start_with_capacity(config, CHANNEL_CAPACITY)
    }

    pub(crate) fn start_with_capacity(
        config: AuditConfig,
        capacity: usize,
    ) -> anyhow::Result<(AuditSink, AuditWriter)> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("the audit writer must be started inside a tokio runtime")?;
        let host = files::hostname();
        let dropped = Arc::new(AtomicU64::new(0));
        let state = WriterState {
            connections: TableState::open(&config, host.clone(), dropped.clone())?,
            requests: TableState::open(&config, host, dropped.clone())?,
            dropped: dropped.clone(),
            dropped_reported: 0,
        };

        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = runtime.spawn(state.run(rx, stop_rx));
        Ok((
            AuditSink {
                tx,
                dropped: dropped.clone(),
            },
            AuditWriter {
                stop: stop_tx,
                task,
                dropped,
            },
        ))
    }

    /// Rows dropped so far (the same counter as [`AuditSink::dropped`]).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes every row recorded before this call and stops the writer.
    /// Rows recorded afterwards are dropped. Returns how many rows the writer
    /// wrote in total, both tables together.
    pub async fn shutdown(self) -> anyhow::Result<u64> {
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
    dropped: Arc<AtomicU64>,
    dropped_reported: u64,
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
                _ = sleep_until(deadline), if deadline.is_some() => self.flush_due().await,
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
        }
    }

    /// The earliest of the tables' deadlines.
    fn deadline(&self) -> Option<Instant> {
        match (self.connections.deadline(), self.requests.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes the tables whose deadline has passed.
    async fn flush_due(&mut self) {
        self.report_drops();
        let now = Instant::now();
        if self.connections.is_due(now) {
            self.connections.flush().await;
        }
        if self.requests.is_due(now) {
            self.requests.flush().await;
        }
    }

    /// The final flush of both tables: one last attempt; what fails is lost
    /// and counted.
    async fn finish(mut self) -> anyhow::Result<u64> {
        self.report_drops();
        let mut failed = self.connections.write_buffer().await;
        failed.extend(self.requests.write_buffer().await);
        let written = self.connections.written + self.requests.written;
        let lost: usize = failed.iter().map(|(_, n, _)| n).sum();
        self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        match failed.into_iter().next() {
            None => Ok(written),
            Some((path, _, err)) => {
                let advice = err.advice();
                Err(anyhow::Error::new(err).context(format!(
                    "audit: {lost} rows were lost at shutdown (first failure at {path}; {advice}); {written} rows were written"
                )))
            }
        }
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
    dropped: Arc<AtomicU64>,
}

impl<T: Table> TableState<T> {
    /// Creates the table's directory and removes the temporary files a
    /// crash left in it.
    fn open(config: &AuditConfig, host: String, dropped: Arc<AtomicU64>) -> anyhow::Result<Self> {
        let writer = TableWriter::<T>::new(&config.dir, host);
        prepare_dir(writer.table_dir())?;
        Ok(TableState {
            writer: Arc::new(writer),
            rotate_every: config.rotate_every,
            rotate_bytes: config.rotate_bytes,
            max_pending_bytes: config.rotate_bytes.saturating_mul(2).max(1 << 20),
            buffer: Vec::new(),
            buffered_bytes: 0,
            first_row_at: None,
            retry_at: None,
            failures: 0,
            written: 0,
            dropped,
        })
    }

    /// Buffers the row; returns whether the buffer is due to be written
    /// because of its size.
    fn push(&mut self, row: T) -> bool {
        let size = row.estimated_size();
        if self.buffered_bytes.saturating_add(size) > self.max_pending_bytes {
            // Only reachable while writes fail: rows kept for the retry have
            // filled their bound.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.first_row_at.get_or_insert_with(Instant::now);
        self.buffered_bytes += size;
        self.buffer.push(row);
        self.retry_at.is_none() && self.buffered_bytes >= self.rotate_bytes
    }

    fn deadline(&self) -> Option<Instant> {
        self.retry_at
            .or_else(|| Some(self.first_row_at? + self.rotate_every))
    }

    fn is_due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|at| at <= now)
    }

    /// Writes the buffer, one file per partition; rows of a file that could
    /// not be written stay buffered and are retried later.
    async fn flush(&mut self) {
        let failed = self.write_buffer().await;
        if failed.is_empty() {
            self.failures = 0;
            self.retry_at = None;
            return;
        }
        self.failures += 1;
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
                self.dropped.fetch_add(count as u64, Ordering::Relaxed);
                tracing::error!(table = T::NAME, rows = count, error = %e, "audit: the file writer failed; rows lost");
                return Vec::new();
            }
        };
        let mut failed = Vec::new();
        for (partition, rows, result) in results {
            match result {
                Ok(path) => {
                    self.written += rows.len() as u64;
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
