//! The Arrow schema of the `connections` table and the conversion of rows
//! into a record batch. docs/audit.md documents every column.
use std::sync::{Arc, LazyLock};

use arrow::{
    array::{
        ArrayRef, Float64Array, Int16Array, Int32Array, Int64Array, StringArray,
        TimestampMicrosecondArray,
    },
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
    error::ArrowError,
    record_batch::RecordBatch,
};

use super::ConnectionRow;

/// The version of the `connections` schema, written in the `schema_version`
/// column and in the file's `warden.schema_version` key-value metadata.
/// Adding columns bumps it; readers should select columns by name.
pub const SCHEMA_VERSION: i16 = 1;

/// The table's name: its directory under the audit directory and the
/// file's `warden.table` key-value metadata.
pub const CONNECTIONS_TABLE: &str = "connections";

/// Key-value metadata key holding [`SCHEMA_VERSION`].
pub const META_SCHEMA_VERSION: &str = "warden.schema_version";
/// Key-value metadata key holding the table name.
pub const META_TABLE: &str = "warden.table";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utc_micros = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
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
    ]))
});

/// The Arrow schema of the `connections` table (without the `date` and
/// `hour` partition columns, which come from the directory names).
pub fn connections_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// A rough size of a row once in Arrow memory, used to decide rotation.
pub(crate) fn estimated_size(row: &ConnectionRow) -> u64 {
    // Fixed-width columns (2 + 8 * 13 + 4 bytes) plus string offsets
    // (4 bytes for each of 16 strings) plus the short constant strings.
    const FIXED: usize = 110 + 64 + 40;
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let id = &row.identity;
    let variable = row.session_id.len()
        + row.rule.len()
        + id.comm.len()
        + opt(&id.user)
        + opt(&id.exe)
        + opt(&id.cmdline)
        + opt(&id.cgroup_path)
        + opt(&id.unit)
        + opt(&id.container_id)
        + opt(&row.workload)
        + opt(&row.server_name)
        + opt(&row.error);
    (FIXED + variable) as u64
}

/// The rows as one record batch of [`connections_schema`].
pub(crate) fn to_record_batch(
    rows: &[ConnectionRow],
    host: &str,
) -> Result<RecordBatch, ArrowError> {
    fn strings<'a>(
        rows: &'a [ConnectionRow],
        f: impl Fn(&'a ConnectionRow) -> &'a str,
    ) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    }
    fn opt_strings<'a>(
        rows: &'a [ConnectionRow],
        f: impl Fn(&'a ConnectionRow) -> &'a Option<String>,
    ) -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(|r| f(r).as_deref())))
    }
    fn ints(rows: &[ConnectionRow], f: impl Fn(&ConnectionRow) -> i64) -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
    }
    fn times(rows: &[ConnectionRow], f: impl Fn(&ConnectionRow) -> i64) -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"),
        )
    }

    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int16Array::from_iter_values(
            rows.iter().map(|_| SCHEMA_VERSION),
        )),
        strings(rows, |r| &r.session_id),
        times(rows, |r| r.start_time.timestamp_micros()),
        times(rows, |r| r.end_time.timestamp_micros()),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| {
            (r.end_time.timestamp_micros() - r.start_time.timestamp_micros()) as f64 / 1000.0
        }))),
        strings(rows, |_| host),
        strings(rows, |r| r.transport),
        ints(rows, |r| r.identity.pid.into()),
        ints(rows, |r| r.identity.tid.into()),
        ints(rows, |r| r.identity.uid.into()),
        ints(rows, |r| r.identity.gid.into()),
        opt_strings(rows, |r| &r.identity.user),
        strings(rows, |r| &r.identity.comm),
        opt_strings(rows, |r| &r.identity.exe),
        opt_strings(rows, |r| &r.identity.cmdline),
        // Parquet has no unsigned 64-bit type that every reader maps well;
        // the id keeps its bits (ids at or above 2^63 read as negative).
        ints(rows, |r| r.identity.cgroup_id as i64),
        opt_strings(rows, |r| &r.identity.cgroup_path),
        opt_strings(rows, |r| &r.identity.unit),
        opt_strings(rows, |r| &r.identity.container_id),
        opt_strings(rows, |r| &r.workload),
        strings(rows, |r| {
            if r.destination.is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            }
        }),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.destination.ip().to_string()),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| i32::from(r.destination.port())),
        )),
        strings(rows, |r| r.protocol),
        opt_strings(rows, |r| &r.server_name),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.tls))),
        strings(rows, |r| r.decision),
        strings(rows, |r| &r.rule),
        ints(rows, |r| saturating_i64(r.bytes_up)),
        ints(rows, |r| saturating_i64(r.bytes_down)),
        opt_strings(rows, |r| &r.error),
    ];
    RecordBatch::try_new(connections_schema(), columns)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
