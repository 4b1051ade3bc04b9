use super::*;

pub(super) fn request(session: u32, seq: u64, start: DateTime<Utc>) -> RequestRow {
    RequestRow {
        session_id: format!("s-{session}"),
        seq,
        start_time: start,
        end_time: start + chrono::Duration::microseconds(2_500),
        identity: row(session, start).identity,
        workload: Some("bot".into()),
        destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 5432),
        protocol: "postgres",
        database: Some("crm".into()),
        db_user: Some("app".into()),
        statement: Some("SELECT * FROM crm.customers WHERE id = 42".into()),
        statement_class: Some("read"),
        tables_read: vec!["crm.customers".into()],
        tables_written: Vec::new(),
        functions: Vec::new(),
        fingerprint: Some("SELECT * FROM crm.customers WHERE id = ?".into()),
        rows: Some(1),
        masked: 0,
        decision: "allow",
        rule: "allow-crm".into(),
        error: None,
        sqlstate: None,
        http: None,
        llm: None,
        ssh: None,
        caused_by: None,
        approval_id: None,
    }
}

fn requests_files(dir: &Path) -> Vec<PathBuf> {
    table_files(dir, REQUESTS_TABLE)
}

fn rows_in(files: &[PathBuf]) -> usize {
    files.iter().map(|p| read(p).num_rows()).sum()
}

/// The `List<Utf8>` column as vectors; the lists themselves are never null.
pub(super) fn lists(batch: &RecordBatch, name: &str) -> Vec<Vec<String>> {
    let list = col::<ListArray>(batch, name);
    assert_eq!(list.null_count(), 0, "{name}");
    (0..list.len())
        .map(|i| {
            let values = list.value(i);
            let values = values.as_any().downcast_ref::<StringArray>().unwrap();
            assert_eq!(values.null_count(), 0, "{name}");
            values.iter().map(|v| v.unwrap().to_string()).collect()
        })
        .collect()
}

pub(super) fn kv_metadata(path: &Path) -> Vec<(String, Option<String>)> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect()
}

pub(super) fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[tokio::test]
async fn requests_round_trip_of_every_column_with_lists_and_nulls() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    let start = at(2025, 3, 4, 5, 6, 7) + chrono::Duration::microseconds(123_456);
    let full = RequestRow {
        statement: Some(
            "INSERT INTO crm.audit SELECT now(), * FROM crm.customers JOIN crm.orders USING (id)"
                .into(),
        ),
        statement_class: Some("write"),
        tables_read: vec!["crm.customers".into(), "crm.orders".into()],
        tables_written: vec!["crm.audit".into()],
        functions: vec!["now".into()],
        fingerprint: Some(
            "INSERT INTO crm.audit SELECT now(), * FROM crm.customers JOIN crm.orders USING (id)"
                .into(),
        ),
        rows: Some(u64::MAX),
        masked: 3,
        error: Some("duplicate key value violates unique constraint".into()),
        sqlstate: Some("23505".into()),
        approval_id: Some("ap-1".into()),
        identity: Identity {
            container_id: Some("ab".repeat(32)),
            pod: Some(a_pod(Some("agent"))),
            ..request(1, 1, start).identity
        },
        ..request(1, 1, start)
    };
    // Every nullable column null, every list empty.
    let bare = RequestRow {
        session_id: "s-2".into(),
        seq: 7,
        identity: Identity {
            pid: 7,
            uid: 0,
            comm: "psql".into(),
            ..Default::default()
        },
        workload: None,
        destination: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 6432),
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
        decision: "deny",
        rule: "default".into(),
        error: None,
        sqlstate: None,
        ..request(2, 7, start)
    };
    // Lists empty and not empty in one row, after a row of empty lists.
    let third = RequestRow {
        functions: vec!["pg_sleep".into(), "version".into()],
        tables_read: Vec::new(),
        statement_class: Some("function"),
        ssh: Some(crate::audit::SshFields {
            user: "deploy".into(),
            channel: "exec",
            command: Some("uname -a".into()),
            exit_status: Some(u32::MAX),
            recording: Some("/audit/recordings/s-3-1.cast".into()),
        }),
        ..request(3, 2, start)
    };
    sink.record_request(full);
    sink.record_request(bare);
    sink.record_request(third);
    assert_eq!(writer.shutdown().await.unwrap(), 3);

    assert!(parquet_files(tmp.path()).is_empty(), "no connection rows");
    let files = requests_files(tmp.path());
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
            .ends_with("requests/date=2025-03-04/hour=5"),
        "{files:?}"
    );

    // File metadata: zstd, key-value metadata, the documented schema.
    let kv = kv_metadata(&files[0]);
    assert!(
        kv.contains(&("warden.schema_version".into(), s("7"))),
        "{kv:?}"
    );
    assert!(
        kv.contains(&("warden.table".into(), s("requests"))),
        "{kv:?}"
    );
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0]).unwrap()).unwrap();
    let meta = builder.metadata().clone();
    for column in meta.row_group(0).columns() {
        assert!(matches!(column.compression(), Compression::ZSTD(_)));
    }
    let schema = builder.schema().clone();
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    let expected: Vec<_> = requests_schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    assert_eq!(fields, expected);
    let names: Vec<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "schema_version",
            "session_id",
            "seq",
            "start_time",
            "end_time",
            "duration_ms",
            "host",
            "pid",
            "uid",
            "user",
            "comm",
            "exe",
            "cgroup_path",
            "unit",
            "container_id",
            "workload",
            "dst_addr",
            "dst_port",
            "protocol",
            "database",
            "db_user",
            "statement",
            "statement_class",
            "tables_read",
            "tables_written",
            "functions",
            "fingerprint",
            "rows",
            "masked",
            "decision",
            "rule",
            "error",
            "sqlstate",
            "http_method",
            "http_host",
            "http_path",
            "http_status",
            "llm_provider",
            "llm_endpoint",
            "llm_model",
            "llm_stream",
            "prompt",
            "prompt_sha256",
            "response",
            "tool_calls",
            "input_tokens",
            "output_tokens",
            "redacted",
            "caused_by_session_id",
            "caused_by_seq",
            "caused_by_match",
            "approval_id",
            "ssh_user",
            "ssh_channel",
            "command",
            "exit_status",
            "recording",
            "pod_namespace",
            "pod_name",
            "pod_uid",
            "pod_container",
            "pod_service_account",
            "token_issuer",
            "token_subject",
        ]
    );

    let b = read(&files[0]);
    assert_eq!(b.num_rows(), 3);
    assert_eq!(col::<Int16Array>(&b, "schema_version").values(), &[7, 7, 7]);
    assert_eq!(strs(&b, "session_id"), [s("s-1"), s("s-2"), s("s-3")]);
    assert_eq!(col::<Int64Array>(&b, "seq").values(), &[1, 7, 2]);
    let starts = col::<TimestampMicrosecondArray>(&b, "start_time");
    assert_eq!(starts.value(0), start.timestamp_micros());
    assert_eq!(starts.timezone(), Some("UTC"));
    let ends = col::<TimestampMicrosecondArray>(&b, "end_time");
    assert_eq!(
        ends.value(1),
        (start + chrono::Duration::microseconds(2_500)).timestamp_micros()
    );
    assert_eq!(ends.timezone(), Some("UTC"));
    assert_eq!(
        col::<Float64Array>(&b, "duration_ms").values(),
        &[2.5, 2.5, 2.5]
    );
    let host = s(&files::hostname());
    assert_eq!(strs(&b, "host"), [host.clone(), host.clone(), host]);
    assert_eq!(col::<Int64Array>(&b, "pid").values(), &[1001, 7, 1003]);
    assert_eq!(col::<Int64Array>(&b, "uid").values(), &[1001, 0, 1001]);
    assert_eq!(strs(&b, "user"), [s("alice"), None, s("alice")]);
    assert_eq!(strs(&b, "comm"), [s("python3"), s("psql"), s("python3")]);
    let exe = s("/usr/bin/python3");
    assert_eq!(strs(&b, "exe"), [exe.clone(), None, exe]);
    let cgroup = s("/system.slice/bot.service");
    assert_eq!(strs(&b, "cgroup_path"), [cgroup.clone(), None, cgroup]);
    assert_eq!(strs(&b, "unit"), [s("bot.service"), None, s("bot.service")]);
    assert_eq!(
        strs(&b, "container_id"),
        [Some("ab".repeat(32)), None, None]
    );
    assert_eq!(strs(&b, "pod_namespace"), [s("ai-agents"), None, None]);
    assert_eq!(
        strs(&b, "pod_name"),
        [s("langchain-7d9f8b6c5-x2kqp"), None, None]
    );
    assert_eq!(
        strs(&b, "pod_uid"),
        [s("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None, None]
    );
    assert_eq!(strs(&b, "pod_container"), [s("agent"), None, None]);
    assert_eq!(
        strs(&b, "pod_service_account"),
        [s("langchain"), None, None]
    );
    assert_eq!(strs(&b, "workload"), [s("bot"), None, s("bot")]);
    assert_eq!(
        strs(&b, "dst_addr"),
        [s("10.0.0.5"), s("::1"), s("10.0.0.5")]
    );
    assert_eq!(
        col::<Int32Array>(&b, "dst_port").values(),
        &[5432, 6432, 5432]
    );
    let pg = s("postgres");
    assert_eq!(strs(&b, "protocol"), [pg.clone(), pg.clone(), pg]);
    assert_eq!(strs(&b, "database"), [s("crm"), None, s("crm")]);
    assert_eq!(strs(&b, "db_user"), [s("app"), None, s("app")]);
    assert_eq!(
        strs(&b, "statement"),
        [
            s(
                "INSERT INTO crm.audit SELECT now(), * FROM crm.customers JOIN crm.orders USING (id)"
            ),
            None,
            s("SELECT * FROM crm.customers WHERE id = 42"),
        ]
    );
    assert_eq!(
        strs(&b, "statement_class"),
        [s("write"), None, s("function")]
    );
    assert_eq!(
        lists(&b, "tables_read"),
        [
            vec!["crm.customers".to_string(), "crm.orders".to_string()],
            vec![],
            vec![],
        ]
    );
    assert_eq!(
        lists(&b, "tables_written"),
        [vec!["crm.audit".to_string()], vec![], vec![]]
    );
    assert_eq!(
        lists(&b, "functions"),
        [
            vec!["now".to_string()],
            vec![],
            vec!["pg_sleep".to_string(), "version".to_string()],
        ]
    );
    assert_eq!(
        strs(&b, "fingerprint"),
        [
            s(
                "INSERT INTO crm.audit SELECT now(), * FROM crm.customers JOIN crm.orders USING (id)"
            ),
            None,
            s("SELECT * FROM crm.customers WHERE id = ?"),
        ]
    );
    assert_eq!(col::<Int64Array>(&b, "masked").values(), &[3, 0, 0]);
    let rows = col::<Int64Array>(&b, "rows");
    assert_eq!(
        rows.iter().collect::<Vec<_>>(),
        [Some(i64::MAX), None, Some(1)]
    );
    assert_eq!(strs(&b, "decision"), [s("allow"), s("deny"), s("allow")]);
    assert_eq!(
        strs(&b, "rule"),
        [s("allow-crm"), s("default"), s("allow-crm")]
    );
    assert_eq!(
        strs(&b, "error"),
        [
            s("duplicate key value violates unique constraint"),
            None,
            None
        ]
    );
    assert_eq!(strs(&b, "sqlstate"), [s("23505"), None, None]);
    assert_eq!(strs(&b, "approval_id"), [s("ap-1"), None, None]);
    assert_eq!(strs(&b, "ssh_user"), [None, None, s("deploy")]);
    assert_eq!(strs(&b, "ssh_channel"), [None, None, s("exec")]);
    assert_eq!(strs(&b, "command"), [None, None, s("uname -a")]);
    assert_eq!(
        col::<Int64Array>(&b, "exit_status")
            .iter()
            .collect::<Vec<_>>(),
        [None, None, Some(i64::from(u32::MAX))]
    );
    assert_eq!(
        strs(&b, "recording"),
        [None, None, s("/audit/recordings/s-3-1.cast")]
    );
    for name in [
        "user",
        "exe",
        "cgroup_path",
        "unit",
        "workload",
        "database",
        "db_user",
        "statement",
        "statement_class",
        "fingerprint",
        "rows",
    ] {
        assert_eq!(b.column_by_name(name).unwrap().null_count(), 1, "{name}");
    }
    for field in requests_schema().fields() {
        if !field.is_nullable() {
            assert_eq!(b.column_by_name(field.name()).unwrap().null_count(), 0);
        }
    }
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn both_tables_in_one_run_land_in_their_own_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    let conn_start = at(2025, 12, 31, 23, 59, 0);
    // The session's requests run past midnight: their partition is their own
    // start time, not the connection's.
    sink.record_request(request(1, 1, at(2025, 12, 31, 23, 59, 30)));
    sink.record_request(request(1, 2, at(2026, 1, 1, 0, 0, 10)));
    sink.record(row(1, conn_start));
    sink.record_request(request(1, 3, at(2026, 1, 1, 0, 0, 20)));
    sink.record(row(2, at(2026, 1, 1, 0, 1, 0)));
    assert_eq!(writer.shutdown().await.unwrap(), 5);
    assert_eq!(sink.dropped(), 0);

    let rel = |table: &str, files: &[PathBuf]| -> Vec<PathBuf> {
        let base = tmp.path().join(table);
        files
            .iter()
            .map(|f| f.parent().unwrap().strip_prefix(&base).unwrap().into())
            .collect()
    };
    let conns = parquet_files(tmp.path());
    let reqs = requests_files(tmp.path());
    assert_eq!(
        rel("connections", &conns),
        [
            PathBuf::from("date=2025-12-31/hour=23"),
            PathBuf::from("date=2026-01-01/hour=0"),
        ]
    );
    assert_eq!(
        rel("requests", &reqs),
        [
            PathBuf::from("date=2025-12-31/hour=23"),
            PathBuf::from("date=2026-01-01/hour=0"),
        ]
    );
    for f in &conns {
        assert!(kv_metadata(f).contains(&("warden.table".into(), s("connections"))));
        assert!(read(f).column_by_name("transport").is_some());
    }
    for f in &reqs {
        assert!(kv_metadata(f).contains(&("warden.table".into(), s("requests"))));
        assert!(read(f).column_by_name("statement").is_some());
    }
    assert_eq!(rows_in(&conns), 2);
    assert_eq!(rows_in(&reqs), 3);
    assert_eq!(col::<Int64Array>(&read(&reqs[1]), "seq").values(), &[2, 3]);
    // Nothing else under the audit directory.
    let mut tables: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    tables.sort();
    assert_eq!(tables, ["approvals", "connections", "events", "requests"]);
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn no_rows_no_file_but_both_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert_eq!(writer.shutdown().await.unwrap(), 0);
    assert!(tmp.path().join("requests").is_dir());
    assert!(tmp.path().join("connections").is_dir());
    assert!(all_files(tmp.path()).is_empty());
}

#[tokio::test]
async fn rotation_by_size_counts_each_table_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let start = at(2025, 6, 1, 12, 0, 0);
    let one = request(0, 0, start).estimated_size();
    assert!(row(0, start).estimated_size() < one * 3);
    let cfg = AuditConfig {
        rotate_bytes: one * 3,
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    for n in 0..7 {
        sink.record_request(request(n, 1, start));
        // Two connection rows weigh less than the limit: had they counted
        // with the requests, the requests' files would be smaller.
        if n < 2 {
            sink.record(row(n, start));
        }
    }
    assert_eq!(writer.shutdown().await.unwrap(), 9);
    let sizes = |files: Vec<PathBuf>| files.iter().map(|f| read(f).num_rows()).collect::<Vec<_>>();
    assert_eq!(sizes(requests_files(tmp.path())), [3, 3, 1]);
    assert_eq!(sizes(parquet_files(tmp.path())), [2]);
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn requests_rotate_by_time() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        rotate_every: Duration::from_millis(100),
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    sink.record_request(request(1, 1, Utc::now()));
    let mut waited = 0;
    while requests_files(tmp.path()).is_empty() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    // Written before the connection's row exists, and before shutdown.
    assert_eq!(rows_in(&requests_files(tmp.path())), 1);
    sink.record(row(1, Utc::now()));
    sink.record_request(request(1, 2, Utc::now()));
    assert_eq!(writer.shutdown().await.unwrap(), 3);
    assert_eq!(requests_files(tmp.path()).len(), 2);
    assert_eq!(rows_in(&parquet_files(tmp.path())), 1);
}

#[tokio::test]
async fn request_drops_are_counted_like_connection_drops() {
    let tmp = tempfile::tempdir().unwrap();
    // The writer task does not run before this test awaits: the channel of 4
    // (shared by both tables) fills up.
    let (sink, writer) = AuditWriter::start_with_capacity(config(tmp.path()), 4, None).unwrap();
    let now = Utc::now();
    sink.record(row(1, now));
    for n in 0..6 {
        sink.record_request(request(1, n + 1, now));
    }
    sink.record(row(2, now));
    // 1 connection + 3 requests queued; 3 requests and 1 connection dropped.
    assert_eq!(sink.dropped(), 4);
    assert_eq!(writer.dropped(), 4);
    assert_eq!(writer.shutdown().await.unwrap(), 4);
    assert_eq!(rows_in(&parquet_files(tmp.path())), 1);
    assert_eq!(rows_in(&requests_files(tmp.path())), 3);
    // After shutdown, refused and counted.
    sink.record_request(request(1, 9, now));
    assert_eq!(sink.dropped(), 5);
}

#[tokio::test]
async fn removes_stale_tmp_files_of_requests_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("requests/date=2025-01-01/hour=03");
    fs::create_dir_all(&part).unwrap();
    fs::write(
        part.join(".part-20250101T030000-1-000000.parquet.tmp"),
        b"half",
    )
    .unwrap();
    fs::write(part.join("part-20250101T030000-1-000001.parquet"), b"kept").unwrap();
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert_no_tmp(tmp.path());
    assert!(part.join("part-20250101T030000-1-000001.parquet").exists());
    assert_eq!(writer.shutdown().await.unwrap(), 0);
}

#[tokio::test]
async fn a_failing_requests_partition_does_not_hold_back_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let start = at(2025, 2, 2, 2, 2, 2);
    block_partition(tmp.path(), "requests/date=2025-02-02");
    let cfg = AuditConfig {
        rotate_every: Duration::from_millis(20),
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    sink.record_request(request(1, 1, start));
    sink.record(row(1, start));
    let mut waited = 0;
    while parquet_files(tmp.path()).is_empty() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    // The connection's file is written although the request's keeps failing
    // (and is being retried).
    assert_eq!(rows_in(&parquet_files(tmp.path())), 1);
    assert!(requests_files(tmp.path()).is_empty());
    let err = writer.shutdown().await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("kept in") && msg.contains("requests/.journal-"),
        "{msg}"
    );
    assert!(msg.contains("1 rows were written"), "{msg}");
    assert!(msg.contains("requests/date=2025-02-02"), "{msg}");
    assert_eq!(sink.dropped(), 0);
    assert_no_tmp(tmp.path());
}

#[test]
fn the_tables_have_distinct_names_and_their_own_versions() {
    assert_eq!(CONNECTIONS_TABLE, "connections");
    assert_eq!(REQUESTS_TABLE, "requests");
    assert_eq!(<ConnectionRow as Table>::NAME, CONNECTIONS_TABLE);
    assert_eq!(<RequestRow as Table>::NAME, REQUESTS_TABLE);
    assert_eq!(<ConnectionRow as Table>::SCHEMA_VERSION, SCHEMA_VERSION);
    assert_eq!(
        <RequestRow as Table>::SCHEMA_VERSION,
        REQUESTS_SCHEMA_VERSION
    );
}

#[test]
fn estimated_size_grows_with_the_lists() {
    let start = at(2025, 6, 1, 12, 0, 0);
    let base = request(1, 1, start);
    let more = RequestRow {
        tables_written: vec!["crm.a_rather_long_table_name".into()],
        ..base.clone()
    };
    assert!(more.estimated_size() > base.estimated_size());
}

#[tokio::test]
async fn http_and_llm_columns_round_trip_and_are_null_for_statements() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    let start = at(2025, 6, 1, 12, 0, 0);
    let call = RequestRow {
        protocol: "llm",
        database: None,
        db_user: None,
        statement: None,
        statement_class: None,
        tables_read: Vec::new(),
        fingerprint: None,
        rows: None,
        masked: 2,
        http: Some(HttpFields {
            method: "POST".into(),
            host: Some("api.openai.com".into()),
            path: "/v1/chat/completions".into(),
            status: Some(200),
            token_issuer: Some("https://kubernetes.default.svc".into()),
            token_subject: Some("system:serviceaccount:crm:billing".into()),
        }),
        llm: Some(LlmFields {
            provider: "openai",
            endpoint: "chat",
            model: Some("gpt-4.1-mini".into()),
            stream: true,
            prompt: Some("user: my card is **** **** **** 1111".into()),
            prompt_sha256: Some("ab".repeat(32)),
            response: Some("Noted.".into()),
            tool_calls: vec![r#"{"name":"sql","arguments":"{}"}"#.into()],
            input_tokens: Some(12),
            output_tokens: Some(3),
            redacted: 1,
        }),
        ..request(1, 1, start)
    };
    sink.record_request(call);
    sink.record_request(RequestRow {
        caused_by: Some(crate::lineage::Link {
            exchange: crate::lineage::Exchange {
                session_id: "s-1".into(),
                seq: 1,
            },
            kind: crate::lineage::MatchKind::Normalized,
        }),
        ..request(2, 1, start)
    });
    assert_eq!(writer.shutdown().await.unwrap(), 2);

    let files = requests_files(tmp.path());
    let b = read(&files[0]);
    assert_eq!(strs(&b, "protocol"), [s("llm"), s("postgres")]);
    assert_eq!(strs(&b, "http_method"), [s("POST"), None]);
    assert_eq!(strs(&b, "http_host"), [s("api.openai.com"), None]);
    assert_eq!(strs(&b, "http_path"), [s("/v1/chat/completions"), None]);
    let status = col::<Int32Array>(&b, "http_status");
    assert_eq!((status.value(0), status.is_null(1)), (200, true));
    assert_eq!(strs(&b, "llm_provider"), [s("openai"), None]);
    assert_eq!(strs(&b, "llm_endpoint"), [s("chat"), None]);
    assert_eq!(strs(&b, "llm_model"), [s("gpt-4.1-mini"), None]);
    let stream = col::<BooleanArray>(&b, "llm_stream");
    assert_eq!((stream.value(0), stream.is_null(1)), (true, true));
    assert_eq!(
        strs(&b, "prompt"),
        [s("user: my card is **** **** **** 1111"), None]
    );
    assert_eq!(strs(&b, "prompt_sha256"), [Some("ab".repeat(32)), None]);
    assert_eq!(strs(&b, "response"), [s("Noted."), None]);
    assert_eq!(
        lists(&b, "tool_calls"),
        [
            vec![r#"{"name":"sql","arguments":"{}"}"#.to_string()],
            vec![]
        ]
    );
    let input = col::<Int64Array>(&b, "input_tokens");
    assert_eq!((input.value(0), input.is_null(1)), (12, true));
    let output = col::<Int64Array>(&b, "output_tokens");
    assert_eq!((output.value(0), output.is_null(1)), (3, true));
    assert_eq!(col::<Int64Array>(&b, "redacted").values(), &[1, 0]);
    assert_eq!(col::<Int64Array>(&b, "masked").values(), &[2, 0]);
    assert_eq!(strs(&b, "caused_by_session_id"), [None, s("s-1")]);
    let seq = col::<Int64Array>(&b, "caused_by_seq");
    assert_eq!((seq.is_null(0), seq.value(1)), (true, 1));
    assert_eq!(strs(&b, "caused_by_match"), [None, s("normalized")]);
    assert_eq!(
        strs(&b, "token_issuer"),
        [s("https://kubernetes.default.svc"), None]
    );
    assert_eq!(
        strs(&b, "token_subject"),
        [s("system:serviceaccount:crm:billing"), None]
    );
}
