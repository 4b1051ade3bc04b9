use std::fs::OpenOptions;

use super::*;

fn fast_journal(dir: &Path) -> AuditConfig {
    AuditConfig {
        journal_every: Duration::from_millis(20),
        ..config(dir)
    }
}

fn journals(dir: &Path) -> Vec<PathBuf> {
    all_files(dir)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(".journal-") && name.ends_with(".arrows")
        })
        .collect()
}

/// Ends the writer as a crash would: its task stops where it is, with no
/// final write; its journal stays, unlocked.
async fn crash(writer: AuditWriter) {
    writer.task.abort();
    let _ = writer.task.await;
}

/// Until the journal has taken the rows recorded so far.
async fn journaled(dir: &Path) {
    let before = journals(dir)
        .iter()
        .map(|j| fs::metadata(j).unwrap().len())
        .sum::<u64>();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = journals(dir)
            .iter()
            .map(|j| fs::metadata(j).unwrap().len())
            .sum::<u64>();
        if now > before {
            // One more interval, for the other table's append.
            tokio::time::sleep(Duration::from_millis(40)).await;
            return;
        }
    }
    panic!("nothing was journaled");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_the_rotation_loses_no_journaled_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(fast_journal(tmp.path())).unwrap();
    let start = at(2025, 5, 5, 23, 59, 59);
    for n in 0..10 {
        sink.record(row(n, start));
    }
    // One row in the next hour: recovery splits by partition.
    sink.record(row(10, at(2025, 5, 6, 0, 0, 1)));
    sink.record_request(requests::request(1, 1, start));
    journaled(tmp.path()).await;
    crash(writer).await;
    assert!(
        parquet_files(tmp.path()).is_empty(),
        "rotation is an hour away"
    );
    assert_eq!(journals(tmp.path()).len(), 4, "one per table");

    assert_eq!(
        recover(tmp.path()).unwrap(),
        Recovery {
            journals: 4,
            rows: 12
        }
    );
    assert_eq!(total_rows(tmp.path()), 11);
    assert_eq!(table_files(tmp.path(), REQUESTS_TABLE).len(), 1);
    let partitions: Vec<String> = parquet_files(tmp.path())
        .iter()
        .map(|p| {
            p.parent()
                .unwrap()
                .strip_prefix(tmp.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        partitions,
        [
            "connections/date=2025-05-05/hour=23",
            "connections/date=2025-05-06/hour=0"
        ]
    );
    let ids = strs(&read(&parquet_files(tmp.path())[0]), "session_id");
    assert_eq!(ids.len(), 10);
    assert!(journals(tmp.path()).is_empty());
    assert_no_tmp(tmp.path());
    // Nothing is written twice.
    assert_eq!(recover(tmp.path()).unwrap(), Recovery::default());
    assert_eq!(total_rows(tmp.path()), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_cut_short_by_the_crash_is_all_that_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(fast_journal(tmp.path())).unwrap();
    for n in 0..5 {
        sink.record(row(n, Utc::now()));
    }
    journaled(tmp.path()).await;
    for n in 5..8 {
        sink.record(row(n, Utc::now()));
    }
    journaled(tmp.path()).await;
    crash(writer).await;
    let journal = journals(&tmp.path().join(CONNECTIONS_TABLE)).remove(0);
    // The crash came in the middle of writing the second batch.
    let len = fs::metadata(&journal).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(len - 30)
        .unwrap();
    assert_eq!(recover(tmp.path()).unwrap().rows, 5);
    assert_eq!(total_rows(tmp.path()), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_agents_journal_is_left_alone_and_removed_at_its_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(fast_journal(tmp.path())).unwrap();
    sink.record(row(1, Utc::now()));
    journaled(tmp.path()).await;
    // Another agent on the same directory (a second `warden run`).
    let (_other_sink, other) = AuditWriter::start(fast_journal(tmp.path())).unwrap();
    assert_eq!(recover(tmp.path()).unwrap(), Recovery::default());
    assert!(parquet_files(tmp.path()).is_empty());
    other.shutdown().await.unwrap();
    assert_eq!(writer.shutdown().await.unwrap(), 1);
    assert_eq!(total_rows(tmp.path()), 1);
    assert!(journals(tmp.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_rotation_the_journal_holds_only_the_rows_since() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        rotate_every: Duration::from_millis(100),
        ..fast_journal(tmp.path())
    };
    let (sink, writer) = AuditWriter::start(cfg).unwrap();
    for n in 0..4 {
        sink.record(row(n, Utc::now()));
    }
    for _ in 0..100 {
        if total_rows(tmp.path()) == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(total_rows(tmp.path()), 4);
    sink.record(row(4, Utc::now()));
    journaled(tmp.path()).await;
    crash(writer).await;
    assert_eq!(recover(tmp.path()).unwrap().rows, 1);
    assert_eq!(total_rows(tmp.path()), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_starting_on_the_directory_writes_a_dead_agents_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(fast_journal(tmp.path())).unwrap();
    sink.record(row(1, Utc::now()));
    journaled(tmp.path()).await;
    crash(writer).await;
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    assert_eq!(total_rows(tmp.path()), 1);
    assert_eq!(writer.shutdown().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn approval_steps_are_journaled_and_recovered_in_their_partitions() {
    let tmp = tempfile::tempdir().unwrap();
    let (sink, writer) = AuditWriter::start(fast_journal(tmp.path())).unwrap();
    let held = at(2025, 5, 5, 23, 59, 30);
    sink.record_approval(approvals::approval("ap-1", ApprovalStep::Requested, held));
    // The agent dies while the request waits, after a first approval in
    // the next hour.
    sink.record_approval(approvals::approved(
        "ap-1",
        at(2025, 5, 6, 0, 0, 10),
        "bob",
        1,
    ));
    journaled(tmp.path()).await;
    crash(writer).await;
    assert!(table_files(tmp.path(), APPROVALS_TABLE).is_empty());
    assert_eq!(
        journals(&tmp.path().join(APPROVALS_TABLE)).len(),
        1,
        "the approvals table has its own journal"
    );

    // The next agent on the directory writes them, and says so.
    let (_sink, writer) = AuditWriter::start(config(tmp.path())).unwrap();
    writer.shutdown().await.unwrap();
    let files = table_files(tmp.path(), APPROVALS_TABLE);
    let partitions: Vec<String> = files
        .iter()
        .map(|p| {
            p.parent()
                .unwrap()
                .strip_prefix(tmp.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        partitions,
        [
            "approvals/date=2025-05-05/hour=23",
            "approvals/date=2025-05-06/hour=0"
        ]
    );
    let first = read(&files[0]);
    assert_eq!(strs(&first, "step"), [Some("requested".to_string())]);
    assert_eq!(
        col::<TimestampMicrosecondArray>(&first, "start_time").value(0),
        held.timestamp_micros()
    );
    let second = read(&files[1]);
    assert_eq!(strs(&second, "step"), [Some("approved".to_string())]);
    assert_eq!(strs(&second, "reviewer"), [Some("bob".to_string())]);
    assert_eq!(col::<Int64Array>(&second, "approvals").values(), &[1]);
    let events: Vec<Option<String>> = table_files(tmp.path(), EVENTS_TABLE)
        .iter()
        .flat_map(|f| strs(&read(f), "message"))
        .collect();
    assert!(
        events
            .iter()
            .flatten()
            .any(|m| m.contains("wrote 2 approvals rows")),
        "{events:?}"
    );
    assert!(journals(tmp.path()).is_empty());
    assert_no_tmp(tmp.path());
    // Nothing is written twice.
    assert_eq!(recover(tmp.path()).unwrap(), Recovery::default());
    assert_eq!(table_files(tmp.path(), APPROVALS_TABLE).len(), 2);
}
