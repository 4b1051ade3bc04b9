use super::*;

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

fn events(dir: &Path) -> Vec<(String, Option<i64>, Option<String>)> {
    let mut out = Vec::new();
    for file in table_files(dir, EVENTS_TABLE) {
        let batch = read(&file);
        let rows = col::<Int64Array>(&batch, "rows");
        let errors = strs(&batch, "error");
        for (i, event) in strs(&batch, "event").into_iter().enumerate() {
            out.push((
                event.unwrap(),
                rows.is_valid(i).then(|| rows.value(i)),
                errors[i].clone(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_is_an_event_when_it_starts_and_when_it_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = block_partition(tmp.path(), "connections/date=2025-02-02");
    let cfg = AuditConfig {
        rotate_every: Duration::from_millis(20),
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    assert!(sink.writable());
    sink.record(row(1, at(2025, 2, 2, 2, 2, 2)));
    until("the failed write is noticed", || !sink.writable()).await;
    fs::remove_file(&blocker).unwrap();
    // The retry (after 1 s) succeeds.
    until("the audit is written again", || sink.writable()).await;
    assert_eq!(writer.shutdown().await.unwrap(), 1);
    let got = events(tmp.path());
    assert_eq!(got.len(), 2, "{got:?}");
    let (event, _, error) = &got[0];
    assert_eq!(event, "audit_unwritable");
    let error = error.as_deref().unwrap();
    assert!(
        error.contains("connections/date=2025-02-02") && error.contains("remove the file"),
        "{error}"
    );
    assert_eq!(got[1].0, "audit_writable");
    assert_eq!(got[1].1, Some(0), "nothing was dropped");
}

#[tokio::test(flavor = "multi_thread")]
async fn recovered_journals_are_an_event() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        journal_every: Duration::from_millis(10),
        ..config(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg.clone()).unwrap();
    sink.record(row(1, Utc::now()));
    sink.record(row(2, Utc::now()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer.task.abort();
    let _ = writer.task.await;
    let (_sink, writer) = AuditWriter::start(cfg).unwrap();
    writer.shutdown().await.unwrap();
    let got = events(tmp.path());
    assert_eq!(
        got,
        [("audit_recovered".to_string(), Some(2), None)],
        "{got:?}"
    );
    assert_eq!(total_rows(tmp.path()), 2);
}
