//! The Arrow schemas of the audit tables (`connections`, `requests`,
//! `events`, `approvals`) and the conversion of rows into record batches.
//! docs/audit.md documents every column.
//!
//! Each row type implements [`Table`]; the writer and the file code only
//! know that trait. Adding a column to a table means: its field in the
//! table's schema, its array in `to_record_batch` (in the same place), a
//! bump of the table's schema version, and a line in docs/audit.md.
use std::sync::{Arc, LazyLock};

use arrow::{
    array::{
        ArrayRef, BooleanArray, Float64Array, Int16Array, Int32Array, Int64Array, ListBuilder,
        StringArray, StringBuilder, TimestampMicrosecondArray,
    },
    datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit},
    error::ArrowError,
    record_batch::RecordBatch,
};
use chrono::{DateTime, Utc};

use super::{ApprovalRow, ConnectionRow, EventRow, RequestRow};
use crate::identity::Identity;

/// The version of the `connections` schema, written in the `schema_version`
/// column and in the file's `warden.schema_version` key-value metadata.
/// Adding columns bumps it; readers should select columns by name.
pub const SCHEMA_VERSION: i16 = 2;

/// The version of the `requests` schema (see [`SCHEMA_VERSION`]); the two
/// tables' versions move independently.
pub const REQUESTS_SCHEMA_VERSION: i16 = 7;

/// The `connections` table's name: its directory under the audit directory
/// and the file's `warden.table` key-value metadata.
pub const CONNECTIONS_TABLE: &str = "connections";

/// The `requests` table's name (see [`CONNECTIONS_TABLE`]).
pub const REQUESTS_TABLE: &str = "requests";

/// The `events` table's name: what happened to the agent itself.
pub const EVENTS_TABLE: &str = "events";

/// The version of the `events` schema (see [`SCHEMA_VERSION`]).
pub const EVENTS_SCHEMA_VERSION: i16 = 1;

/// The `approvals` table's name: the steps of the requests a rule held for
/// approval.
pub const APPROVALS_TABLE: &str = "approvals";

/// The version of the `approvals` schema (see [`SCHEMA_VERSION`]).
pub const APPROVALS_SCHEMA_VERSION: i16 = 2;

/// Key-value metadata key holding the table's schema version.
pub const META_SCHEMA_VERSION: &str = "warden.schema_version";
/// Key-value metadata key holding the table name.
pub const META_TABLE: &str = "warden.table";

/// A row type the writer can buffer, partition and write as Parquet.
pub(crate) trait Table: Send + 'static + Sized {
    /// The table's directory under the audit directory, and its
    /// `warden.table` metadata.
    const NAME: &'static str;
    /// Written in the `schema_version` column and the metadata.
    const SCHEMA_VERSION: i16;
    /// The table's Arrow schema (without the `date` and `hour` partition
    /// columns, which come from the directory names).
    fn schema() -> SchemaRef;
    /// Decides the row's Hive partition.
    fn start_time(&self) -> &DateTime<Utc>;
    /// A rough size of the row once in Arrow memory, used to decide rotation.
    fn estimated_size(&self) -> u64;
    /// The rows as one record batch of [`Table::schema`].
    fn to_record_batch(rows: &[Self], host: &str) -> Result<RecordBatch, ArrowError>;
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The element field of the `List<Utf8>` columns: elements are never null.
fn string_item() -> FieldRef {
    Arc::new(Field::new_list_field(DataType::Utf8, false))
}

fn string_list() -> DataType {
    DataType::List(string_item())
}

static CONNECTIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("schema_version", DataType::Int16, false),
        Field::new("session_id", DataType::Utf8, false),
        Field::new("start_time", utc_micros(), false),
        Field::new("end_time", utc_micros(), false),
        Field::new("duration_ms", DataType::Float64, false),
        Field::new("host", DataType::Utf8, false),
        Field::new("transport", DataType::Utf8, false),
        Field::new("pid", DataType::Int64, false),
        Field::new("tid", DataType::Int64, false),
        Field::new("uid", DataType::Int64, false),
        Field::new("gid", DataType::Int64, false),
        Field::new("user", DataType::Utf8, true),
        Field::new("comm", DataType::Utf8, false),
        Field::new("exe", DataType::Utf8, true),
        Field::new("cmdline", DataType::Utf8, true),
        Field::new("cgroup_id", DataType::Int64, false),
        Field::new("cgroup_path", DataType::Utf8, true),
        Field::new("unit", DataType::Utf8, true),
        Field::new("container_id", DataType::Utf8, true),
        Field::new("workload", DataType::Utf8, true),
        Field::new("family", DataType::Utf8, false),
        Field::new("dst_addr", DataType::Utf8, false),
        Field::new("dst_port", DataType::Int32, false),
        Field::new("protocol", DataType::Utf8, false),
        Field::new("server_name", DataType::Utf8, true),
        Field::new("tls", DataType::Utf8, true),
        Field::new("decision", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("bytes_up", DataType::Int64, false),
        Field::new("bytes_down", DataType::Int64, false),
        Field::new("error", DataType::Utf8, true),
    ];
    fields.extend(pod_fields());
    Arc::new(Schema::new(fields))
});

static EVENTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("schema_version", DataType::Int16, false),
        Field::new("start_time", utc_micros(), false),
        Field::new("host", DataType::Utf8, false),
        Field::new("agent_pid", DataType::Int64, false),
        Field::new("event", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new("rows", DataType::Int64, true),
        Field::new("error", DataType::Utf8, true),
    ]))
});

/// The Arrow schema of the `events` table (without the partition columns).
pub fn events_schema() -> SchemaRef {
    EVENTS_SCHEMA.clone()
}

impl Table for EventRow {
    const NAME: &'static str = EVENTS_TABLE;
    const SCHEMA_VERSION: i16 = EVENTS_SCHEMA_VERSION;

    fn schema() -> SchemaRef {
        events_schema()
    }

    fn start_time(&self) -> &DateTime<Utc> {
        &self.time
    }

    fn estimated_size(&self) -> u64 {
        (64 + self.event.as_str().len() + self.message.len() + opt_len(&self.error)) as u64
    }

    fn to_record_batch(rows: &[Self], host: &str) -> Result<RecordBatch, ArrowError> {
        let pid = i64::from(std::process::id());
        batch(
            Self::schema(),
            vec![
                ("schema_version", versions(rows, Self::SCHEMA_VERSION)),
                ("start_time", times(rows, |r| &r.time)),
                ("host", strings(rows, |_| host)),
                ("agent_pid", ints(rows, |_| pid)),
                ("event", strings(rows, |r| r.event.as_str())),
                ("message", strings(rows, |r| &r.message)),
                ("rows", opt_ints(rows, |r| r.rows.map(saturating_i64))),
                ("error", opt_strings(rows, |r| r.error.as_deref())),
            ],
        )
    }
}

static APPROVALS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("schema_version", DataType::Int16, false),
        Field::new("start_time", utc_micros(), false),
        Field::new("host", DataType::Utf8, false),
        Field::new("agent_pid", DataType::Int64, false),
        Field::new("approval_id", DataType::Utf8, false),
        Field::new("step", DataType::Utf8, false),
        Field::new("session_id", DataType::Utf8, false),
        Field::new("protocol", DataType::Utf8, false),
    ];
    fields.extend(requester_fields());
    fields.extend([
        Field::new("workload", DataType::Utf8, true),
        Field::new("dst_addr", DataType::Utf8, false),
        Field::new("dst_port", DataType::Int32, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("request", DataType::Utf8, false),
        Field::new("reviewer", DataType::Utf8, true),
        Field::new("reviewer_email", DataType::Utf8, true),
        Field::new("reviewer_groups", string_list(), false),
        Field::new("approvals", DataType::Int64, false),
        Field::new("quorum", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("expires_at", utc_micros(), false),
    ]);
    fields.extend(pod_fields());
    Arc::new(Schema::new(fields))
});

/// The Arrow schema of the `approvals` table (without the partition columns).
pub fn approvals_schema() -> SchemaRef {
    APPROVALS_SCHEMA.clone()
}

impl Table for ApprovalRow {
    const NAME: &'static str = APPROVALS_TABLE;
    const SCHEMA_VERSION: i16 = APPROVALS_SCHEMA_VERSION;

    fn schema() -> SchemaRef {
        approvals_schema()
    }

    fn start_time(&self) -> &DateTime<Utc> {
        &self.time
    }

    fn estimated_size(&self) -> u64 {
        // Fixed-width columns (2 + 8 * 7 + 4 bytes, 4 bytes of list
        // offsets) plus string offsets (4 bytes for each of 21 strings) plus
        // the short constant strings.
        const FIXED: usize = 62 + 4 + 84 + 40;
        let variable = self.approval_id.len()
            + self.session_id.len()
            + requester_len(&self.identity)
            + opt_len(&self.workload)
            + self.rule.len()
            + self.request.len()
            + opt_len(&self.reviewer)
            + opt_len(&self.reviewer_email)
            + list_len(&self.reviewer_groups)
            + opt_len(&self.reason)
            + pod_len(&self.identity);
        (FIXED + variable) as u64
    }

    fn to_record_batch(rows: &[Self], host: &str) -> Result<RecordBatch, ArrowError> {
        let pid = i64::from(std::process::id());
        let mut columns = vec![
            ("schema_version", versions(rows, Self::SCHEMA_VERSION)),
            ("start_time", times(rows, |r| &r.time)),
            ("host", strings(rows, |_| host)),
            ("agent_pid", ints(rows, |_| pid)),
            ("approval_id", strings(rows, |r| &r.approval_id)),
            ("step", strings(rows, |r| r.step.as_str())),
            ("session_id", strings(rows, |r| &r.session_id)),
            ("protocol", strings(rows, |r| r.protocol)),
        ];
        columns.extend(requester_columns(rows, |r| &r.identity));
        columns.extend([
            ("workload", opt_strings(rows, |r| r.workload.as_deref())),
            ("dst_addr", addrs(rows, |r| r.destination.ip())),
            ("dst_port", ports(rows, |r| r.destination.port())),
            ("rule", strings(rows, |r| &r.rule)),
            ("request", strings(rows, |r| &r.request)),
            ("reviewer", opt_strings(rows, |r| r.reviewer.as_deref())),
            (
                "reviewer_email",
                opt_strings(rows, |r| r.reviewer_email.as_deref()),
            ),
            (
                "reviewer_groups",
                string_lists(rows, |r| &r.reviewer_groups),
            ),
            ("approvals", ints(rows, |r| r.approvals.into())),
            ("quorum", ints(rows, |r| r.quorum.into())),
            ("reason", opt_strings(rows, |r| r.reason.as_deref())),
            ("expires_at", times(rows, |r| &r.expires_at)),
        ]);
        columns.extend(pod_columns(rows, |r| &r.identity));
        batch(Self::schema(), columns)
    }
}

static REQUESTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("schema_version", DataType::Int16, false),
        Field::new("session_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("start_time", utc_micros(), false),
        Field::new("end_time", utc_micros(), false),
        Field::new("duration_ms", DataType::Float64, false),
        Field::new("host", DataType::Utf8, false),
    ];
    fields.extend(requester_fields());
    fields.extend([
        Field::new("workload", DataType::Utf8, true),
        Field::new("dst_addr", DataType::Utf8, false),
        Field::new("dst_port", DataType::Int32, false),
        Field::new("protocol", DataType::Utf8, false),
        Field::new("database", DataType::Utf8, true),
        Field::new("db_user", DataType::Utf8, true),
        Field::new("statement", DataType::Utf8, true),
        Field::new("statement_class", DataType::Utf8, true),
        Field::new("tables_read", string_list(), false),
        Field::new("tables_written", string_list(), false),
        Field::new("functions", string_list(), false),
        Field::new("fingerprint", DataType::Utf8, true),
        Field::new("rows", DataType::Int64, true),
        Field::new("masked", DataType::Int64, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("sqlstate", DataType::Utf8, true),
        Field::new("http_method", DataType::Utf8, true),
        Field::new("http_host", DataType::Utf8, true),
        Field::new("http_path", DataType::Utf8, true),
        Field::new("http_status", DataType::Int32, true),
        Field::new("llm_provider", DataType::Utf8, true),
        Field::new("llm_endpoint", DataType::Utf8, true),
        Field::new("llm_model", DataType::Utf8, true),
        Field::new("llm_stream", DataType::Boolean, true),
        Field::new("prompt", DataType::Utf8, true),
        Field::new("prompt_sha256", DataType::Utf8, true),
        Field::new("response", DataType::Utf8, true),
        Field::new("tool_calls", string_list(), false),
        Field::new("input_tokens", DataType::Int64, true),
        Field::new("output_tokens", DataType::Int64, true),
        Field::new("redacted", DataType::Int64, false),
        Field::new("caused_by_session_id", DataType::Utf8, true),
        Field::new("caused_by_seq", DataType::Int64, true),
        Field::new("caused_by_match", DataType::Utf8, true),
        Field::new("approval_id", DataType::Utf8, true),
        Field::new("ssh_user", DataType::Utf8, true),
        Field::new("ssh_channel", DataType::Utf8, true),
        Field::new("command", DataType::Utf8, true),
        Field::new("exit_status", DataType::Int64, true),
        Field::new("recording", DataType::Utf8, true),
    ]);
    fields.extend(pod_fields());
    fields.extend([
        Field::new("token_issuer", DataType::Utf8, true),
        Field::new("token_subject", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(fields))
});

/// The Arrow schema of the `connections` table (without the `date` and
/// `hour` partition columns, which come from the directory names).
pub fn connections_schema() -> SchemaRef {
    CONNECTIONS_SCHEMA.clone()
}

/// The Arrow schema of the `requests` table (without the `date` and `hour`
/// partition columns, which come from the directory names).
pub fn requests_schema() -> SchemaRef {
    REQUESTS_SCHEMA.clone()
}

impl Table for ConnectionRow {
    const NAME: &'static str = CONNECTIONS_TABLE;
    const SCHEMA_VERSION: i16 = SCHEMA_VERSION;

    fn schema() -> SchemaRef {
        connections_schema()
    }

    fn start_time(&self) -> &DateTime<Utc> {
        &self.start_time
    }

    fn estimated_size(&self) -> u64 {
        // Fixed-width columns (2 + 8 * 13 + 4 bytes) plus string offsets
        // (4 bytes for each of 21 strings) plus the short constant strings.
        const FIXED: usize = 110 + 84 + 40;
        let id = &self.identity;
        let variable = self.session_id.len()
            + self.rule.len()
            + id.comm.len()
            + opt_len(&id.user)
            + opt_len(&id.exe)
            + opt_len(&id.cmdline)
            + opt_len(&id.cgroup_path)
            + opt_len(&id.unit)
            + opt_len(&id.container_id)
            + opt_len(&self.workload)
            + opt_len(&self.server_name)
            + opt_len(&self.error)
            + pod_len(id);
        (FIXED + variable) as u64
    }

    fn to_record_batch(rows: &[Self], host: &str) -> Result<RecordBatch, ArrowError> {
        let mut columns = vec![
            ("schema_version", versions(rows, Self::SCHEMA_VERSION)),
            ("session_id", strings(rows, |r| &r.session_id)),
            ("start_time", times(rows, |r| &r.start_time)),
            ("end_time", times(rows, |r| &r.end_time)),
            (
                "duration_ms",
                durations_ms(rows, |r| (&r.start_time, &r.end_time)),
            ),
            ("host", strings(rows, |_| host)),
            ("transport", strings(rows, |r| r.transport)),
            ("pid", ints(rows, |r| r.identity.pid.into())),
            ("tid", ints(rows, |r| r.identity.tid.into())),
            ("uid", ints(rows, |r| r.identity.uid.into())),
            ("gid", ints(rows, |r| r.identity.gid.into())),
            ("user", opt_strings(rows, |r| r.identity.user.as_deref())),
            ("comm", strings(rows, |r| &r.identity.comm)),
            ("exe", opt_strings(rows, |r| r.identity.exe.as_deref())),
            (
                "cmdline",
                opt_strings(rows, |r| r.identity.cmdline.as_deref()),
            ),
            // Parquet has no unsigned 64-bit type that every reader maps
            // well; the id keeps its bits (ids at or above 2^63 read as
            // negative).
            ("cgroup_id", ints(rows, |r| r.identity.cgroup_id as i64)),
            (
                "cgroup_path",
                opt_strings(rows, |r| r.identity.cgroup_path.as_deref()),
            ),
            ("unit", opt_strings(rows, |r| r.identity.unit.as_deref())),
            (
                "container_id",
                opt_strings(rows, |r| r.identity.container_id.as_deref()),
            ),
            ("workload", opt_strings(rows, |r| r.workload.as_deref())),
            (
                "family",
                strings(rows, |r| {
                    if r.destination.is_ipv4() {
                        "ipv4"
                    } else {
                        "ipv6"
                    }
                }),
            ),
            ("dst_addr", addrs(rows, |r| r.destination.ip())),
            ("dst_port", ports(rows, |r| r.destination.port())),
            ("protocol", strings(rows, |r| r.protocol)),
            (
                "server_name",
                opt_strings(rows, |r| r.server_name.as_deref()),
            ),
            ("tls", opt_strings(rows, |r| r.tls)),
            ("decision", strings(rows, |r| r.decision)),
            ("rule", strings(rows, |r| &r.rule)),
            ("bytes_up", ints(rows, |r| saturating_i64(r.bytes_up))),
            ("bytes_down", ints(rows, |r| saturating_i64(r.bytes_down))),
            ("error", opt_strings(rows, |r| r.error.as_deref())),
        ];
        columns.extend(pod_columns(rows, |r| &r.identity));
        batch(Self::schema(), columns)
    }
}

impl Table for RequestRow {
    const NAME: &'static str = REQUESTS_TABLE;
    const SCHEMA_VERSION: i16 = REQUESTS_SCHEMA_VERSION;

    fn schema() -> SchemaRef {
        requests_schema()
    }

    fn start_time(&self) -> &DateTime<Utc> {
        &self.start_time
    }

    fn estimated_size(&self) -> u64 {
        // Fixed-width columns (2 + 8 * 8 + 4 bytes, and 4 bytes of list
        // offsets for each of 3 lists) plus string offsets (4 bytes for each
        // of 29 strings) plus the short constant strings.
        const FIXED: usize = 70 + 12 + 116 + 40;
        let variable = self.session_id.len()
            + self.rule.len()
            + requester_len(&self.identity)
            + pod_len(&self.identity)
            + opt_len(&self.workload)
            + opt_len(&self.approval_id)
            + opt_len(&self.database)
            + opt_len(&self.db_user)
            + opt_len(&self.statement)
            + opt_len(&self.fingerprint)
            + opt_len(&self.error)
            + opt_len(&self.sqlstate)
            + list_len(&self.tables_read)
            + list_len(&self.tables_written)
            + list_len(&self.functions)
            + self.http.as_ref().map_or(0, |h| {
                h.method.len()
                    + opt_len(&h.host)
                    + h.path.len()
                    + opt_len(&h.token_issuer)
                    + opt_len(&h.token_subject)
                    + 3 * 4
                    + 4
            })
            + self.ssh.as_ref().map_or(0, |s| {
                s.user.len() + opt_len(&s.command) + opt_len(&s.recording) + 8 + 5 * 4
            })
            + self.llm.as_ref().map_or(0, |l| {
                opt_len(&l.model)
                    + opt_len(&l.prompt)
                    + opt_len(&l.prompt_sha256)
                    + opt_len(&l.response)
                    + list_len(&l.tool_calls)
                    + 16
                    + 8 * 4
            });
        (FIXED + variable) as u64
    }

    fn to_record_batch(rows: &[Self], host: &str) -> Result<RecordBatch, ArrowError> {
        let mut columns = vec![
            ("schema_version", versions(rows, Self::SCHEMA_VERSION)),
            ("session_id", strings(rows, |r| &r.session_id)),
            ("seq", ints(rows, |r| saturating_i64(r.seq))),
            ("start_time", times(rows, |r| &r.start_time)),
            ("end_time", times(rows, |r| &r.end_time)),
            (
                "duration_ms",
                durations_ms(rows, |r| (&r.start_time, &r.end_time)),
            ),
            ("host", strings(rows, |_| host)),
        ];
        columns.extend(requester_columns(rows, |r| &r.identity));
        columns.extend([
            ("workload", opt_strings(rows, |r| r.workload.as_deref())),
            ("dst_addr", addrs(rows, |r| r.destination.ip())),
            ("dst_port", ports(rows, |r| r.destination.port())),
            ("protocol", strings(rows, |r| r.protocol)),
            ("database", opt_strings(rows, |r| r.database.as_deref())),
            ("db_user", opt_strings(rows, |r| r.db_user.as_deref())),
            ("statement", opt_strings(rows, |r| r.statement.as_deref())),
            ("statement_class", opt_strings(rows, |r| r.statement_class)),
            ("tables_read", string_lists(rows, |r| &r.tables_read)),
            ("tables_written", string_lists(rows, |r| &r.tables_written)),
            ("functions", string_lists(rows, |r| &r.functions)),
            (
                "fingerprint",
                opt_strings(rows, |r| r.fingerprint.as_deref()),
            ),
            ("rows", opt_ints(rows, |r| r.rows.map(saturating_i64))),
            ("masked", ints(rows, |r| saturating_i64(r.masked))),
            ("decision", strings(rows, |r| r.decision)),
            ("rule", strings(rows, |r| &r.rule)),
            ("error", opt_strings(rows, |r| r.error.as_deref())),
            ("sqlstate", opt_strings(rows, |r| r.sqlstate.as_deref())),
            (
                "http_method",
                opt_strings(rows, |r| r.http.as_ref().map(|h| h.method.as_str())),
            ),
            (
                "http_host",
                opt_strings(rows, |r| r.http.as_ref().and_then(|h| h.host.as_deref())),
            ),
            (
                "http_path",
                opt_strings(rows, |r| r.http.as_ref().map(|h| h.path.as_str())),
            ),
            (
                "http_status",
                Arc::new(Int32Array::from_iter(
                    rows.iter()
                        .map(|r| r.http.as_ref().and_then(|h| h.status).map(i32::from)),
                )),
            ),
            (
                "llm_provider",
                opt_strings(rows, |r| r.llm.as_ref().map(|l| l.provider)),
            ),
            (
                "llm_endpoint",
                opt_strings(rows, |r| r.llm.as_ref().map(|l| l.endpoint)),
            ),
            (
                "llm_model",
                opt_strings(rows, |r| r.llm.as_ref().and_then(|l| l.model.as_deref())),
            ),
            (
                "llm_stream",
                Arc::new(BooleanArray::from_iter(
                    rows.iter().map(|r| r.llm.as_ref().map(|l| l.stream)),
                )),
            ),
            (
                "prompt",
                opt_strings(rows, |r| r.llm.as_ref().and_then(|l| l.prompt.as_deref())),
            ),
            (
                "prompt_sha256",
                opt_strings(rows, |r| {
                    r.llm.as_ref().and_then(|l| l.prompt_sha256.as_deref())
                }),
            ),
            (
                "response",
                opt_strings(rows, |r| r.llm.as_ref().and_then(|l| l.response.as_deref())),
            ),
            (
                "tool_calls",
                string_lists(rows, |r| r.llm.as_ref().map_or(&[][..], |l| &l.tool_calls)),
            ),
            (
                "input_tokens",
                opt_ints(rows, |r| {
                    r.llm
                        .as_ref()
                        .and_then(|l| l.input_tokens)
                        .map(saturating_i64)
                }),
            ),
            (
                "output_tokens",
                opt_ints(rows, |r| {
                    r.llm
                        .as_ref()
                        .and_then(|l| l.output_tokens)
                        .map(saturating_i64)
                }),
            ),
            (
                "redacted",
                ints(rows, |r| {
                    saturating_i64(r.llm.as_ref().map_or(0, |l| l.redacted))
                }),
            ),
            (
                "caused_by_session_id",
                opt_strings(rows, |r| {
                    r.caused_by.as_ref().map(|c| c.exchange.session_id.as_str())
                }),
            ),
            (
                "caused_by_seq",
                opt_ints(rows, |r| {
                    r.caused_by.as_ref().map(|c| saturating_i64(c.exchange.seq))
                }),
            ),
            (
                "caused_by_match",
                opt_strings(rows, |r| r.caused_by.as_ref().map(|c| c.kind.as_str())),
            ),
            (
                "approval_id",
                opt_strings(rows, |r| r.approval_id.as_deref()),
            ),
            (
                "ssh_user",
                opt_strings(rows, |r| r.ssh.as_ref().map(|s| s.user.as_str())),
            ),
            (
                "ssh_channel",
                opt_strings(rows, |r| r.ssh.as_ref().map(|s| s.channel)),
            ),
            (
                "command",
                opt_strings(rows, |r| r.ssh.as_ref().and_then(|s| s.command.as_deref())),
            ),
            (
                "exit_status",
                opt_ints(rows, |r| {
                    r.ssh.as_ref().and_then(|s| s.exit_status).map(i64::from)
                }),
            ),
            (
                "recording",
                opt_strings(rows, |r| {
                    r.ssh.as_ref().and_then(|s| s.recording.as_deref())
                }),
            ),
        ]);
        columns.extend(pod_columns(rows, |r| &r.identity));
        columns.extend([
            (
                "token_issuer",
                opt_strings(rows, |r| {
                    r.http.as_ref().and_then(|h| h.token_issuer.as_deref())
                }),
            ),
            (
                "token_subject",
                opt_strings(rows, |r| {
                    r.http.as_ref().and_then(|h| h.token_subject.as_deref())
                }),
            ),
        ]);
        batch(Self::schema(), columns)
    }
}

/// The columns of the process that made a request, as `requests` and
/// `approvals` write them (`connections` has more: `tid`, `gid`,
/// `cmdline`, `cgroup_id`).
fn requester_fields() -> [Field; 8] {
    [
        Field::new("pid", DataType::Int64, false),
        Field::new("uid", DataType::Int64, false),
        Field::new("user", DataType::Utf8, true),
        Field::new("comm", DataType::Utf8, false),
        Field::new("exe", DataType::Utf8, true),
        Field::new("cgroup_path", DataType::Utf8, true),
        Field::new("unit", DataType::Utf8, true),
        Field::new("container_id", DataType::Utf8, true),
    ]
}

/// The arrays of [`requester_fields`], in their order.
fn requester_columns<R>(rows: &[R], id: impl Fn(&R) -> &Identity) -> [(&'static str, ArrayRef); 8] {
    [
        ("pid", ints(rows, |r| id(r).pid.into())),
        ("uid", ints(rows, |r| id(r).uid.into())),
        ("user", opt_strings(rows, |r| id(r).user.as_deref())),
        ("comm", strings(rows, |r| &id(r).comm)),
        ("exe", opt_strings(rows, |r| id(r).exe.as_deref())),
        (
            "cgroup_path",
            opt_strings(rows, |r| id(r).cgroup_path.as_deref()),
        ),
        ("unit", opt_strings(rows, |r| id(r).unit.as_deref())),
        (
            "container_id",
            opt_strings(rows, |r| id(r).container_id.as_deref()),
        ),
    ]
}

/// The variable part of [`requester_columns`] for one row.
fn requester_len(id: &Identity) -> usize {
    id.comm.len()
        + opt_len(&id.user)
        + opt_len(&id.exe)
        + opt_len(&id.cgroup_path)
        + opt_len(&id.unit)
        + opt_len(&id.container_id)
}

/// The Kubernetes pod of the process, last in every table that has the
/// process's columns (added in connections v2, requests v6, approvals v2).
fn pod_fields() -> [Field; 5] {
    [
        Field::new("pod_namespace", DataType::Utf8, true),
        Field::new("pod_name", DataType::Utf8, true),
        Field::new("pod_uid", DataType::Utf8, true),
        Field::new("pod_container", DataType::Utf8, true),
        Field::new("pod_service_account", DataType::Utf8, true),
    ]
}

/// The arrays of [`pod_fields`], in their order.
fn pod_columns<'a, R>(
    rows: &'a [R],
    id: impl Fn(&'a R) -> &'a Identity,
) -> [(&'static str, ArrayRef); 5] {
    let pod = |r: &'a R| id(r).pod.as_ref();
    [
        (
            "pod_namespace",
            opt_strings(rows, |r| pod(r).map(|p| p.namespace.as_str())),
        ),
        (
            "pod_name",
            opt_strings(rows, |r| pod(r).map(|p| p.name.as_str())),
        ),
        (
            "pod_uid",
            opt_strings(rows, |r| pod(r).map(|p| p.uid.as_str())),
        ),
        (
            "pod_container",
            opt_strings(rows, |r| pod(r).and_then(|p| p.container.as_deref())),
        ),
        (
            "pod_service_account",
            opt_strings(rows, |r| pod(r).and_then(|p| p.service_account.as_deref())),
        ),
    ]
}

/// The variable part of [`pod_columns`] for one row.
fn pod_len(id: &Identity) -> usize {
    id.pod.as_ref().map_or(0, |p| {
        p.namespace.len()
            + p.name.len()
            + p.uid.len()
            + opt_len(&p.container)
            + opt_len(&p.service_account)
    })
}

/// Builds the batch, checking that the arrays come in the schema's order
/// (arrays of the same type in the wrong place would otherwise go unnoticed).
fn batch(schema: SchemaRef, columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch, ArrowError> {
    let names = columns.iter().map(|(name, _)| *name);
    if !names.eq(schema.fields().iter().map(|f| f.name().as_str())) {
        return Err(ArrowError::SchemaError(format!(
            "the columns {:?} do not match the schema's",
            columns.iter().map(|(name, _)| name).collect::<Vec<_>>()
        )));
    }
    RecordBatch::try_new(schema, columns.into_iter().map(|(_, a)| a).collect())
}

fn versions<R>(rows: &[R], version: i16) -> ArrayRef {
    Arc::new(Int16Array::from_iter_values(rows.iter().map(|_| version)))
}

fn strings<'a, R>(rows: &'a [R], f: impl Fn(&'a R) -> &'a str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
}

fn opt_strings<'a, R>(rows: &'a [R], f: impl Fn(&'a R) -> Option<&'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter(rows.iter().map(f)))
}

fn ints<R>(rows: &[R], f: impl Fn(&R) -> i64) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
}

fn opt_ints<R>(rows: &[R], f: impl Fn(&R) -> Option<i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter(rows.iter().map(f)))
}

fn times<R>(rows: &[R], f: impl Fn(&R) -> &DateTime<Utc>) -> ArrayRef {
    Arc::new(
        TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| f(r).timestamp_micros()))
            .with_timezone("UTC"),
    )
}

fn durations_ms<R>(rows: &[R], f: impl Fn(&R) -> (&DateTime<Utc>, &DateTime<Utc>)) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| {
        let (start, end) = f(r);
        (end.timestamp_micros() - start.timestamp_micros()) as f64 / 1000.0
    })))
}

fn addrs<R>(rows: &[R], f: impl Fn(&R) -> std::net::IpAddr) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| f(r).to_string()),
    ))
}

fn ports<R>(rows: &[R], f: impl Fn(&R) -> u16) -> ArrayRef {
    Arc::new(Int32Array::from_iter_values(
        rows.iter().map(|r| i32::from(f(r))),
    ))
}

/// A non-null `List<Utf8>` per row (empty when the row has no element).
fn string_lists<'a, R>(rows: &'a [R], f: impl Fn(&'a R) -> &'a [String]) -> ArrayRef {
    let mut builder =
        ListBuilder::with_capacity(StringBuilder::new(), rows.len()).with_field(string_item());
    for row in rows {
        for s in f(row) {
            builder.values().append_value(s);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}

/// A list's strings and their offsets.
fn list_len(l: &[String]) -> usize {
    l.iter().map(|s| s.len() + 4).sum()
}

fn opt_len(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, String::len)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
