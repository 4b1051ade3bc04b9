use super::{
    requests::{kv_metadata, lists, request, s},
    *,
};

/// A step of approval `id`, held on session `s-1`'s DELETE.
pub(super) fn approval(id: &str, step: ApprovalStep, time: DateTime<Utc>) -> ApprovalRow {
    ApprovalRow {
        time,
        approval_id: id.into(),
        step,
        session_id: "s-1".into(),
        protocol: "postgres",
        identity: row(1, time).identity,
        workload: Some("bot".into()),
        destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 5432),
        rule: "deletes-need-review".into(),
        request: "DELETE FROM crm.customers WHERE id = 42".into(),
        reviewer: None,
        reviewer_email: None,
        reviewer_groups: Vec::new(),
        approvals: 0,
        quorum: 2,
        reason: None,
        expires_at: time + chrono::Duration::minutes(30),
    }
}

/// An approved step by `who`, the `n`th approval.
pub(super) fn approved(id: &str, time: DateTime<Utc>, who: &str, n: u32) -> ApprovalRow {
    ApprovalRow {
        reviewer: Some(who.into()),
        reviewer_email: Some(format!("{who}@example.com")),
        reviewer_groups: vec!["dba".into(), "oncall".into()],
        approvals: n,
        ..approval(id, ApprovalStep::Approved, time)
    }
}

fn approvals_files(dir: &Path) -> Vec<PathBuf> {
    table_files(dir, APPROVALS_TABLE)
}

#[tokio::test]
async fn approvals_round_trip_of_every_column_with_lists_and_nulls() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    let start = at(2025, 3, 4, 5, 6, 7) + chrono::Duration::microseconds(123_456);
    let requested = ApprovalRow {
        identity: Identity {
            container_id: Some("ab".repeat(32)),
            pod: Some(a_pod(None)),
            ..row(1, start).identity
        },
        ..approval("ap-1", ApprovalStep::Requested, start)
    };
    let approved = approved("ap-1", start + chrono::Duration::seconds(40), "bob", 1);
    // Every nullable column null, the list empty, another protocol.
    let refused = ApprovalRow {
        session_id: "s-2".into(),
        protocol: "http",
        identity: Identity {
            pid: 7,
            uid: 0,
            comm: "curl".into(),
            ..Default::default()
        },
        workload: None,
        destination: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 8443),
        request: "POST api.internal/v1/payouts".into(),
        reviewer: None,
        reviewer_email: None,
        reviewer_groups: Vec::new(),
        approvals: 0,
        quorum: 1,
        reason: None,
        ..approval(
            "ap-2",
            ApprovalStep::Refused,
            start + chrono::Duration::seconds(50),
        )
    };
    let rejected = ApprovalRow {
        reviewer: Some("carol".into()),
        reviewer_groups: vec!["dba".into()],
        reason: Some("not during the freeze".into()),
        ..approval(
            "ap-3",
            ApprovalStep::Rejected,
            start + chrono::Duration::seconds(55),
        )
    };
    sink.record_approval(requested);
    sink.record_approval(approved);
    sink.record_approval(refused);
    sink.record_approval(rejected);
    assert_eq!(writer.shutdown().await.unwrap(), 4);
    assert!(parquet_files(tmp.path()).is_empty(), "no connection rows");

    let files = approvals_files(tmp.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0]
            .parent()
            .unwrap()
            .ends_with("approvals/date=2025-03-04/hour=5"),
        "{files:?}"
    );
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("part-") && name.contains(&format!("-{}-", std::process::id())),
        "{name}"
    );
    let kv = kv_metadata(&files[0]);
    assert!(
        kv.contains(&("warden.schema_version".into(), s("2"))),
        "{kv:?}"
    );
    assert!(
        kv.contains(&("warden.table".into(), s("approvals"))),
        "{kv:?}"
    );
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0]).unwrap()).unwrap();
    for column in builder.metadata().row_group(0).columns() {
        assert!(matches!(column.compression(), Compression::ZSTD(_)));
    }
    let fields: Vec<_> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    let expected: Vec<_> = approvals_schema()
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
            "start_time",
            "host",
            "agent_pid",
            "approval_id",
            "step",
            "session_id",
            "protocol",
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
            "rule",
            "request",
            "reviewer",
            "reviewer_email",
            "reviewer_groups",
            "approvals",
            "quorum",
            "reason",
            "expires_at",
            "pod_namespace",
            "pod_name",
            "pod_uid",
            "pod_container",
            "pod_service_account",
        ]
    );
    // The requester's columns are the requests table's, name for name and
    // type for type.
    let requests = requests_schema();
    for name in [
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
        "session_id",
        "rule",
        "pod_namespace",
        "pod_name",
        "pod_uid",
        "pod_container",
        "pod_service_account",
    ] {
        assert_eq!(
            approvals_schema().field_with_name(name).unwrap(),
            requests.field_with_name(name).unwrap(),
            "{name}"
        );
    }

    let b = read(&files[0]);
    assert_eq!(b.num_rows(), 4);
    assert_eq!(
        col::<Int16Array>(&b, "schema_version").values(),
        &[2, 2, 2, 2]
    );
    let times = col::<TimestampMicrosecondArray>(&b, "start_time");
    assert_eq!(times.timezone(), Some("UTC"));
    assert_eq!(times.value(0), start.timestamp_micros());
    assert_eq!(
        times.value(1),
        (start + chrono::Duration::seconds(40)).timestamp_micros()
    );
    let host = s(&files::hostname());
    assert_eq!(strs(&b, "host"), vec![host; 4]);
    let me = i64::from(std::process::id());
    assert_eq!(col::<Int64Array>(&b, "agent_pid").values(), &[me; 4]);
    assert_eq!(
        strs(&b, "approval_id"),
        [s("ap-1"), s("ap-1"), s("ap-2"), s("ap-3")]
    );
    assert_eq!(
        strs(&b, "step"),
        [s("requested"), s("approved"), s("refused"), s("rejected")]
    );
    assert_eq!(
        strs(&b, "session_id"),
        [s("s-1"), s("s-1"), s("s-2"), s("s-1")]
    );
    assert_eq!(
        strs(&b, "protocol"),
        [s("postgres"), s("postgres"), s("http"), s("postgres")]
    );
    assert_eq!(
        col::<Int64Array>(&b, "pid").values(),
        &[1001, 1001, 7, 1001]
    );
    assert_eq!(
        col::<Int64Array>(&b, "uid").values(),
        &[1001, 1001, 0, 1001]
    );
    assert_eq!(strs(&b, "user"), [s("alice"), s("alice"), None, s("alice")]);
    assert_eq!(
        strs(&b, "comm"),
        [s("python3"), s("python3"), s("curl"), s("python3")]
    );
    let exe = s("/usr/bin/python3");
    assert_eq!(strs(&b, "exe"), [exe.clone(), exe.clone(), None, exe]);
    let cgroup = s("/system.slice/bot.service");
    assert_eq!(
        strs(&b, "cgroup_path"),
        [cgroup.clone(), cgroup.clone(), None, cgroup]
    );
    let unit = s("bot.service");
    assert_eq!(strs(&b, "unit"), [unit.clone(), unit.clone(), None, unit]);
    assert_eq!(
        strs(&b, "container_id"),
        [Some("ab".repeat(32)), None, None, None]
    );
    // A pod whose container and account the node's files did not give.
    assert_eq!(
        strs(&b, "pod_namespace"),
        [s("ai-agents"), None, None, None]
    );
    assert_eq!(
        strs(&b, "pod_uid"),
        [s("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), None, None, None]
    );
    assert_eq!(strs(&b, "pod_container"), [None, None, None, None]);
    assert_eq!(strs(&b, "pod_service_account"), [None, None, None, None]);
    assert_eq!(strs(&b, "workload"), [s("bot"), s("bot"), None, s("bot")]);
    assert_eq!(
        strs(&b, "dst_addr"),
        [s("10.0.0.5"), s("10.0.0.5"), s("::1"), s("10.0.0.5")]
    );
    assert_eq!(
        col::<Int32Array>(&b, "dst_port").values(),
        &[5432, 5432, 8443, 5432]
    );
    assert_eq!(strs(&b, "rule"), vec![s("deletes-need-review"); 4]);
    let delete = s("DELETE FROM crm.customers WHERE id = 42");
    assert_eq!(
        strs(&b, "request"),
        [
            delete.clone(),
            delete.clone(),
            s("POST api.internal/v1/payouts"),
            delete
        ]
    );
    assert_eq!(strs(&b, "reviewer"), [None, s("bob"), None, s("carol")]);
    assert_eq!(
        strs(&b, "reviewer_email"),
        [None, s("bob@example.com"), None, None]
    );
    assert_eq!(
        lists(&b, "reviewer_groups"),
        [
            vec![],
            vec!["dba".to_string(), "oncall".to_string()],
            vec![],
            vec!["dba".to_string()],
        ]
    );
    assert_eq!(col::<Int64Array>(&b, "approvals").values(), &[0, 1, 0, 0]);
    assert_eq!(col::<Int64Array>(&b, "quorum").values(), &[2, 2, 1, 2]);
    assert_eq!(
        strs(&b, "reason"),
        [None, None, None, s("not during the freeze")]
    );
    let expires = col::<TimestampMicrosecondArray>(&b, "expires_at");
    assert_eq!(expires.timezone(), Some("UTC"));
    assert_eq!(
        expires.value(0),
        (start + chrono::Duration::minutes(30)).timestamp_micros()
    );
    for field in approvals_schema().fields() {
        if !field.is_nullable() {
            assert_eq!(
                b.column_by_name(field.name()).unwrap().null_count(),
                0,
                "{}",
                field.name()
            );
        }
    }
    assert_no_tmp(tmp.path());
}

#[tokio::test]
async fn approval_steps_are_partitioned_by_their_own_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    // Held before midnight, approved and run after it: each step in its hour.
    sink.record_approval(approval(
        "ap-1",
        ApprovalStep::Requested,
        at(2025, 12, 31, 23, 55, 0),
    ));
    sink.record_approval(approved("ap-1", at(2026, 1, 1, 0, 5, 0), "bob", 1));
    sink.record_approval(approved("ap-1", at(2026, 1, 1, 0, 6, 0), "dave", 2));
    sink.record_approval(approval(
        "ap-1",
        ApprovalStep::Executed,
        at(2026, 1, 1, 0, 6, 1),
    ));
    sink.record_request(RequestRow {
        approval_id: Some("ap-1".into()),
        ..request(1, 1, at(2025, 12, 31, 23, 55, 0))
    });
    assert_eq!(writer.shutdown().await.unwrap(), 5);
    let files = approvals_files(tmp.path());
    let base = tmp.path().join(APPROVALS_TABLE);
    let dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| f.parent().unwrap().strip_prefix(&base).unwrap().into())
        .collect();
    assert_eq!(
        dirs,
        [
            PathBuf::from("date=2025-12-31/hour=23"),
            PathBuf::from("date=2026-01-01/hour=0"),
        ]
    );
    assert_eq!(strs(&read(&files[0]), "step"), [s("requested")]);
    assert_eq!(
        strs(&read(&files[1]), "step"),
        [s("approved"), s("approved"), s("executed")]
    );
    let reqs = table_files(tmp.path(), REQUESTS_TABLE);
    assert_eq!(strs(&read(&reqs[0]), "approval_id"), [s("ap-1")]);
    assert_no_tmp(tmp.path());
}

#[test]
fn every_step_has_its_name_and_the_table_its_version() {
    assert_eq!(APPROVALS_TABLE, "approvals");
    assert_eq!(<ApprovalRow as Table>::NAME, APPROVALS_TABLE);
    assert_eq!(
        <ApprovalRow as Table>::SCHEMA_VERSION,
        APPROVALS_SCHEMA_VERSION
    );
    let names: Vec<&str> = [
        ApprovalStep::Requested,
        ApprovalStep::Approved,
        ApprovalStep::Rejected,
        ApprovalStep::Expired,
        ApprovalStep::Refused,
        ApprovalStep::Executed,
        ApprovalStep::Abandoned,
    ]
    .into_iter()
    .map(ApprovalStep::as_str)
    .collect();
    assert_eq!(
        names,
        [
            "requested",
            "approved",
            "rejected",
            "expired",
            "refused",
            "executed",
            "abandoned"
        ]
    );
    let start = at(2025, 6, 1, 12, 0, 0);
    let base = approval("ap-1", ApprovalStep::Requested, start);
    assert!(approved("ap-1", start, "bob", 1).estimated_size() > base.estimated_size());
}

#[tokio::test]
async fn approval_drops_are_counted_like_the_other_tables() {
    let tmp = tempfile::tempdir().unwrap();
    // The writer task does not run before this test awaits: the channel of
    // 2 fills up.
    let (sink, writer) = AuditWriter::start_with_capacity(config(tmp.path()), 2, None).unwrap();
    let now = Utc::now();
    for _ in 0..3 {
        sink.record_approval(approval("ap-1", ApprovalStep::Requested, now));
    }
    assert_eq!(sink.dropped(), 1);
    assert_eq!(writer.shutdown().await.unwrap(), 2);
    let rows: usize = approvals_files(tmp.path())
        .iter()
        .map(|f| read(f).num_rows())
        .sum();
    assert_eq!(rows, 2);
}
