use std::{
    fs,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use arrow::{
    array::{
        Array, BooleanArray, Float64Array, Int16Array, Int32Array, Int64Array, ListArray,
        RecordBatch, StringArray, TimestampMicrosecondArray,
    },
    compute::concat_batches,
};
use chrono::TimeZone;
use parquet::{arrow::arrow_reader::ParquetRecordBatchReaderBuilder, basic::Compression};

use super::*;

/// The `approvals` table: the steps of requests held for approval.
mod approvals;
/// The `events` table: the audit's outages, recoveries.
mod events;
/// The journal: rows on disk before their rotation, recovered after a crash.
mod journal;
/// The `requests` table, and both tables together.
mod requests;

fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        dir: dir.to_path_buf(),
        rotate_every: Duration::from_secs(3600),
        rotate_bytes: 64 << 20,
        journal_every: AuditConfig::DEFAULT_JOURNAL_EVERY,
        retention: None,
    }
}

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("valid time")
}

fn row(n: u32, start: DateTime<Utc>) -> ConnectionRow {
    ConnectionRow {
        session_id: format!("s-{n}"),
        start_time: start,
        end_time: start + chrono::Duration::milliseconds(1500),
        transport: "tcp",
        identity: Identity {
            pid: 1000 + n,
            tid: 2000 + n,
            uid: 1001,
            gid: 1002,
            user: Some("alice".into()),
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            cmdline: Some("python3 bot.py".into()),
            cgroup_id: 4242,
            cgroup_path: Some("/system.slice/bot.service".into()),
            unit: Some("bot.service".into()),
            container_id: None,
            pod: None,
        },
        workload: Some("bot".into()),
        destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 443),
        protocol: "tls",
        server_name: None,
        tls: None,
        decision: "allow",
        rule: "allow-llm".into(),
        bytes_up: 100,
        bytes_down: 2000,
        error: None,
    }
}

/// Every `.parquet` file under the `connections` table, sorted.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    table_files(dir, CONNECTIONS_TABLE)
}

/// Every `.parquet` file under the table, sorted.
fn table_files(dir: &Path, table: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&dir.join(table), &mut out);
    out.retain(|p| p.extension().is_some_and(|e| e == "parquet"));
    out.sort();
    out
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn read(path: &Path) -> RecordBatch {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    concat_batches(&schema, &batches).unwrap()
}

fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("column {name} has another type"))
}

fn strs(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    col::<StringArray>(batch, name)
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

fn total_rows(dir: &Path) -> usize {
    parquet_files(dir).iter().map(|p| read(p).num_rows()).sum()
}

/// Puts a file where `<dir>/<partition>` (a table and a date) should be a
/// directory, so that writing rows of that date fails until it goes.
fn block_partition(dir: &Path, partition: &str) -> PathBuf {
    let blocker = dir.join(partition);
    fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    fs::write(&blocker, b"in the way").unwrap();
    blocker
}

fn assert_no_tmp(dir: &Path) {
    let tmp: Vec<_> = all_files(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
}

/// A pod as the node's files describe it; `container` unknown when none.
fn a_pod(container: Option<&str>) -> crate::identity::PodIdentity {
    crate::identity::PodIdentity {
        namespace: "ai-agents".into(),
        name: "langchain-7d9f8b6c5-x2kqp".into(),
        uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
        container: container.map(str::to_string),
        service_account: container.map(|_| "langchain".to_string()),
    }
}

#[tokio::test]
async fn round_trip_of_every_column_with_nulls() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    let start = at(2025, 3, 4, 5, 6, 7) + chrono::Duration::microseconds(123_456);
    let full = ConnectionRow {
        error: Some("upstream reset".into()),
        server_name: Some("api.openai.com".into()),
        tls: Some("intercepted"),
        identity: Identity {
            container_id: Some("ab".repeat(32)),
            cgroup_id: u64::MAX,
            pod: Some(a_pod(Some("agent"))),
            ..row(1, start).identity
        },
        ..row(1, start)
    };
    let empty = ConnectionRow {
        session_id: "s-2".into(),
        identity: Identity {
            pid: 7,
            tid: 8,
            uid: 0,
            gid: 0,
            comm: "curl".into(),
            cgroup_id: 1,
            ..Default::default()
        },
        workload: None,
        destination: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 5432),
        protocol: "postgres",
        server_name: None,
        tls: None,
        decision: "deny",
        rule: "default".into(),
        bytes_up: 0,
        bytes_down: 0,
        error: None,
        transport: "tcp",
        ..row(2, start)
    };
    sink.record(full);
    sink.record(empty);
    assert_eq!(writer.shutdown().await.unwrap(), 2);

    let files = parquet_files(tmp.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("part-") && name.contains(&format!("-{}-", std::process::id())),
        "{name}"
    );
    assert!(
        files[0]
            .parent()
            .unwrap()
            .ends_with("connections/date=2025-03-04/hour=5"),
        "{files:?}"
    );

    // File metadata: zstd, key-value metadata.
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0]).unwrap()).unwrap();
    let meta = builder.metadata().clone();
    let kv: Vec<(String, Option<String>)> = meta
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    assert!(kv.contains(&("warden.schema_version".into(), Some("2".into()))));
    assert!(kv.contains(&("warden.table".into(), Some("connections".into()))));
    assert!(matches!(
        meta.row_group(0).column(0).compression(),
        Compression::ZSTD(_)
    ));
    // The schema read back is the documented one, with no partition columns.
    let schema = builder.schema().clone();
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    let expected: Vec<_> = connections_schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    assert_eq!(fields, expected);
    assert!(schema.field_with_name("date").is_err() && schema.field_with_name("hour").is_err());

    let b = read(&files[0]);
    assert_eq!(b.num_rows(), 2);
    assert_eq!(col::<Int16Array>(&b, "schema_version").values(), &[2, 2]);
    assert_eq!(
        strs(&b, "session_id"),
        [Some("s-1".into()), Some("s-2".into())]
    );
    let starts = col::<TimestampMicrosecondArray>(&b, "start_time");
    assert_eq!(starts.value(0), start.timestamp_micros());
    assert_eq!(starts.timezone(), Some("UTC"));
    assert_eq!(
        col::<TimestampMicrosecondArray>(&b, "end_time").value(1),
        (start + chrono::Duration::milliseconds(1500)).timestamp_micros()
    );
    assert_eq!(
        col::<Float64Array>(&b, "duration_ms").values(),
        &[1500.0, 1500.0]
    );
    let host = files::hostname();
    assert_eq!(strs(&b, "host"), [Some(host.clone()), Some(host)]);
    assert_eq!(
        strs(&b, "transport"),
        [Some("tcp".into()), Some("tcp".into())]
    );
    assert_eq!(col::<Int64Array>(&b, "pid").values(), &[1001, 7]);
    assert_eq!(col::<Int64Array>(&b, "tid").values(), &[2001, 8]);
    assert_eq!(col::<Int64Array>(&b, "uid").values(), &[1001, 0]);
    assert_eq!(col::<Int64Array>(&b, "gid").values(), &[1002, 0]);
    assert_eq!(strs(&b, "user"), [Some("alice".into()), None]);
    assert_eq!(
        strs(&b, "comm"),
        [Some("python3".into()), Some("curl".into())]
    );
    assert_eq!(strs(&b, "exe"), [Some("/usr/bin/python3".into()), None]);
    assert_eq!(strs(&b, "cmdline"), [Some("python3 bot.py".into()), None]);
    let cgroup_ids = col::<Int64Array>(&b, "cgroup_id");
    assert_eq!(cgroup_ids.values(), &[-1, 1]);
    assert_eq!(cgroup_ids.value(0) as u64, u64::MAX);
    assert_eq!(
        strs(&b, "cgroup_path"),
        [Some("/system.slice/bot.service".into()), None]
    );
    assert_eq!(strs(&b, "unit"), [Some("bot.service".into()), None]);
    assert_eq!(strs(&b, "container_id"), [Some("ab".repeat(32)), None]);
    assert_eq!(strs(&b, "pod_namespace"), [Some("ai-agents".into()), None]);
    assert_eq!(
        strs(&b, "pod_name"),
        [Some("langchain-7d9f8b6c5-x2kqp".into()), None]
    );
    assert_eq!(
        strs(&b, "pod_uid"),
        [Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()), None]
    );
    assert_eq!(strs(&b, "pod_container"), [Some("agent".into()), None]);
    assert_eq!(
        strs(&b, "pod_service_account"),
        [Some("langchain".into()), None]
    );
    // The pod's columns come last (appended in version 2).
    let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names[names.len() - 6..],
        [
            "error",
            "pod_namespace",
            "pod_name",
            "pod_uid",
            "pod_container",
            "pod_service_account"
        ]
    );
    assert_eq!(strs(&b, "workload"), [Some("bot".into()), None]);
    assert_eq!(
        strs(&b, "family"),
        [Some("ipv4".into()), Some("ipv6".into())]
    );
    assert_eq!(
        strs(&b, "dst_addr"),
        [Some("10.0.0.1".into()), Some("::1".into())]
    );
    assert_eq!(col::<Int32Array>(&b, "dst_port").values(), &[443, 5432]);
    assert_eq!(
        strs(&b, "protocol"),
        [Some("tls".into()), Some("postgres".into())]
    );
    assert_eq!(
        strs(&b, "decision"),
        [Some("allow".into()), Some("deny".into())]
    );
    assert_eq!(
        strs(&b, "rule"),
        [Some("allow-llm".into()), Some("default".into())]
    );
    assert_eq!(col::<Int64Array>(&b, "bytes_up").values(), &[100, 0]);
    assert_eq!(col::<Int64Array>(&b, "bytes_down").values(), &[2000, 0]);
    assert_eq!(strs(&b, "error"), [Some("upstream reset".into()), None]);
    assert_eq!(
        strs(&b, "server_name"),
        [Some("api.openai.com".into()), None]
    );
    assert_eq!(strs(&b, "tls"), [Some("intercepted".into()), None]);
    for name in ["user", "exe", "error", "workload", "server_name", "tls"] {
        assert_eq!(b.column_by_name(name).unwrap().null_count(), 1, "{name}");
    }
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn partitions_by_start_hour_across_a_day_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    sink.record(row(1, at(2025, 12, 31, 23, 59, 59)));
    sink.record(row(2, at(2026, 1, 1, 0, 0, 1)));
    sink.record(row(3, at(2025, 12, 31, 23, 0, 0)));
    sink.record(row(4, at(2026, 1, 1, 0, 30, 0)));
    assert_eq!(writer.shutdown().await.unwrap(), 4);

    let files = parquet_files(tmp.path());
    let table = tmp.path().join("connections");
    let dirs: Vec<_> = files
        .iter()
        .map(|f| {
            f.parent()
                .unwrap()
                .strip_prefix(&table)
                .unwrap()
                .to_path_buf()
        })
        .collect();
    assert_eq!(
        dirs,
        [
            PathBuf::from("date=2025-12-31/hour=23"),
            PathBuf::from("date=2026-01-01/hour=0"),
        ]
    );
    assert_eq!(
        strs(&read(&files[0]), "session_id"),
        [Some("s-1".into()), Some("s-3".into())]
    );
    assert_eq!(
        strs(&read(&files[1]), "session_id"),
        [Some("s-2".into()), Some("s-4".into())]
    );
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn rotates_by_size_into_several_files() {
    let tmp = tempfile::tempdir().unwrap();
    let start = at(2025, 6, 1, 12, 0, 0);
    let one = row(0, start).estimated_size();
    let cfg = AuditConfig {
        rotate_bytes: one * 5,
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    for n in 0..23 {
        sink.record(row(n, start));
    }
    assert_eq!(writer.shutdown().await.unwrap(), 23);
    let files = parquet_files(tmp.path());
    // 4 files of 5 rows by size, and the last 3 rows at shutdown.
    let sizes: Vec<usize> = files.iter().map(|f| read(f).num_rows()).collect();
    assert_eq!(sizes, [5, 5, 5, 5, 3], "{files:?}");
    assert_eq!(sink.dropped(), 0);
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn rotates_by_time() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        rotate_every: Duration::from_millis(100),
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    sink.record(row(1, Utc::now()));
    // Wait for the rotation, without shutting down.
    let mut waited = 0;
    while parquet_files(tmp.path()).is_empty() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert_eq!(total_rows(tmp.path()), 1);
    sink.record(row(2, Utc::now()));
    assert_eq!(writer.shutdown().await.unwrap(), 2);
    assert_eq!(parquet_files(tmp.path()).len(), 2);
    assert_eq!(total_rows(tmp.path()), 2);
}

#[tokio::test]
async fn shutdown_flushes_what_was_recorded_and_then_refuses_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    for n in 0..1000 {
        sink.record(row(n, Utc::now()));
    }
    // Nothing rotated yet: an hour and 64 MiB are far.
    assert!(parquet_files(tmp.path()).is_empty());
    assert_eq!(writer.shutdown().await.unwrap(), 1000);
    assert_eq!(total_rows(tmp.path()), 1000);
    assert_eq!(sink.dropped(), 0);
    sink.record(row(1, Utc::now()));
    assert_eq!(sink.dropped(), 1);
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn no_rows_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert_eq!(writer.shutdown().await.unwrap(), 0);
    assert!(parquet_files(tmp.path()).is_empty());
    assert!(tmp.path().join("connections").is_dir());
}

#[tokio::test]
async fn removes_stale_tmp_files_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("connections/date=2025-01-01/hour=03");
    fs::create_dir_all(&part).unwrap();
    fs::write(
        part.join(".part-20250101T030000-1-000000.parquet.tmp"),
        b"half",
    )
    .unwrap();
    fs::write(tmp.path().join("connections/.part-x.parquet.tmp"), b"half").unwrap();
    fs::write(part.join("part-20250101T030000-1-000001.parquet"), b"kept").unwrap();
    fs::write(part.join("notes.tmp"), b"not ours").unwrap();

    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert_no_tmp_named_like_ours(tmp.path());
    assert!(part.join("part-20250101T030000-1-000001.parquet").exists());
    assert!(part.join("notes.tmp").exists());
    assert_eq!(writer.shutdown().await.unwrap(), 0);
}

fn assert_no_tmp_named_like_ours(dir: &Path) {
    let left: Vec<_> = all_files(dir)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with('.') && name.ends_with(".tmp")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn counts_drops_when_the_channel_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    // On the current-thread test runtime the writer task does not run until
    // this test awaits, so the channel of 4 fills up.
    let (sink, writer) = AuditWriter::start_with_capacity(config(tmp.path()), 4, None).unwrap();
    let clone = sink.clone();
    for n in 0..10 {
        clone.record(row(n, Utc::now()));
    }
    assert_eq!(sink.dropped(), 6);
    assert_eq!(writer.dropped(), 6);
    assert_eq!(writer.shutdown().await.unwrap(), 4);
    assert_eq!(total_rows(tmp.path()), 4);
}

#[tokio::test]
async fn keeps_rows_after_a_failed_write_and_writes_them_later() {
    let tmp = tempfile::tempdir().unwrap();
    let start = at(2025, 2, 2, 2, 2, 2);
    let blocker = block_partition(tmp.path(), "connections/date=2025-02-02");
    let cfg = AuditConfig {
        rotate_every: Duration::from_millis(20),
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    sink.record(row(1, start));
    sink.record(row(2, at(2025, 2, 3, 0, 0, 0)));
    // Let the rotation fail (the second row's partition succeeds).
    let mut waited = 0;
    while parquet_files(tmp.path()).is_empty() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(total_rows(tmp.path()), 1);
    fs::remove_file(&blocker).unwrap();
    assert_eq!(writer.shutdown().await.unwrap(), 2);
    assert_eq!(total_rows(tmp.path()), 2);
    assert_eq!(sink.dropped(), 0);
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn rows_failing_at_shutdown_stay_in_the_journal_for_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = block_partition(tmp.path(), "connections/date=2025-02-02");
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    sink.record(row(1, at(2025, 2, 2, 2, 2, 2)));
    let err = format!("{:#}", writer.shutdown().await.unwrap_err());
    assert!(
        err.contains("1 rows at") && err.contains("they are kept in") && err.contains(".journal-"),
        "{err}"
    );
    assert_eq!(sink.dropped(), 0);
    assert!(parquet_files(tmp.path()).is_empty());
    // Space is back: the next agent on the directory writes them.
    fs::remove_file(&blocker).unwrap();
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert_eq!(total_rows(tmp.path()), 1);
    writer.shutdown().await.unwrap();
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(AuditWriter::start(config(tmp.path())).is_err());
}

#[tokio::test]
async fn a_running_writers_temporary_files_are_not_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("connections/date=2025-01-01/hour=03");
    fs::create_dir_all(&part).unwrap();
    let host = files::name_safe(&files::hostname());
    let me = std::process::id();
    let live = format!(".part-20250101T030000-{host}-{me}-000007.parquet.tmp");
    // Above any pid_max: no such process.
    let dead = format!(".part-20250101T030000-{host}-999999999-000001.parquet.tmp");
    let elsewhere = format!(".part-20250101T030000-otherhost-{me}-000001.parquet.tmp");
    for name in [&live, &dead, &elsewhere] {
        fs::write(part.join(name), b"half").unwrap();
    }
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert!(part.join(&live).exists());
    assert!(!part.join(&dead).exists());
    assert!(!part.join(&elsewhere).exists());
    writer.shutdown().await.unwrap();
}
