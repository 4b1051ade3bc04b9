use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use chrono::TimeZone;

use super::*;
use crate::{
    audit::{AuditConfig, AuditWriter, HttpFields, LlmFields},
    identity::Identity,
};

fn at(d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, d, h, mi, 0).unwrap()
}

/// A clock the test moves.
fn clock(start: DateTime<Utc>) -> (Arc<Mutex<DateTime<Utc>>>, Clock) {
    let now = Arc::new(Mutex::new(start));
    let read = now.clone();
    (now, Arc::new(move || *read.lock().unwrap()))
}

fn budget(workload: &str, tokens_per_day: u64, providers: Option<Vec<&'static str>>) -> Budget {
    Budget {
        workload: workload.into(),
        tokens_per_day,
        providers,
    }
}

/// An LLM call's row: `usage` as the provider reported it, `status` the
/// answer's.
fn call(
    workload: &str,
    provider: &'static str,
    usage: (Option<u64>, Option<u64>),
    status: u16,
    response: &str,
) -> RequestRow {
    let now = Utc::now();
    RequestRow {
        session_id: "s".into(),
        seq: 1,
        start_time: now,
        end_time: now,
        identity: Identity::default(),
        workload: Some(workload.into()),
        destination: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 443),
        protocol: "llm",
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
        decision: "allow",
        rule: "default".into(),
        error: None,
        sqlstate: None,
        http: Some(HttpFields {
            method: "POST".into(),
            host: Some("api.openai.com".into()),
            path: "/v1/chat/completions".into(),
            status: Some(status),
            token_issuer: None,
            token_subject: None,
        }),
        llm: Some(LlmFields {
            provider,
            endpoint: "chat",
            response: (!response.is_empty()).then(|| response.to_string()),
            input_tokens: usage.0,
            output_tokens: usage.1,
            ..LlmFields::default()
        }),
        ssh: None,
        caused_by: None,
        approval_id: None,
    }
}

#[test]
fn reported_usage_counts_and_an_answer_without_it_is_estimated() {
    let reported = call("bot", "openai", (Some(12), Some(30)), 200, "ignored text");
    assert_eq!(tokens_of(&reported, 4000), 42);
    // 9 bytes of prompt: 3 tokens (rounded up); 8 bytes of answer: 2.
    let streamed = call("bot", "openai", (None, None), 200, "12345678");
    assert_eq!(tokens_of(&streamed, 9), 5);
    // Only the missing part is estimated (embeddings report no output).
    let embeddings = call("bot", "openai", (Some(7), None), 200, "");
    assert_eq!(tokens_of(&embeddings, 400), 7);
    // A provider's error without usage used nothing.
    let refused = call("bot", "openai", (None, None), 400, "");
    assert_eq!(tokens_of(&refused, 400), 0);
}

#[tokio::test]
async fn a_spent_budget_refuses_until_the_next_utc_midnight() {
    let (now, clock) = clock(at(4, 10, 0));
    let ledger = TokenLedger::with_clock(None, None, clock);
    let b = budget("bot", 100, None);
    ledger.spend(&call("bot", "openai", (Some(40), Some(50)), 200, ""), 0);
    assert_eq!(ledger.spent(&b), 90);
    assert_eq!(ledger.check(&b, "openai").await, Ok(()));

    // The call that crosses the budget was allowed; the next is refused.
    ledger.spend(&call("bot", "anthropic", (Some(5), Some(10)), 200, ""), 0);
    let over = ledger.check(&b, "openai").await.unwrap_err();
    assert_eq!(
        over,
        OverBudget {
            spent: 105,
            resets: at(5, 0, 0)
        }
    );
    let message = over.message(&b);
    assert!(
        message.contains("\"bot\" has used 105 of its daily budget of 100 LLM tokens ("),
        "{message}"
    );
    assert!(message.contains("2026-12-05T00:00:00Z"), "{message}");

    // Another workload's spend is its own.
    assert_eq!(
        ledger.check(&budget("other", 1, None), "openai").await,
        Ok(())
    );

    // Still refused a second before midnight, allowed from midnight on.
    *now.lock().unwrap() = at(4, 23, 59) + chrono::Duration::seconds(59);
    assert!(ledger.check(&b, "openai").await.is_err());
    *now.lock().unwrap() = at(5, 0, 0);
    assert_eq!(ledger.spent(&b), 0);
    assert_eq!(ledger.check(&b, "openai").await, Ok(()));
}

#[tokio::test]
async fn a_budget_for_some_providers_counts_and_refuses_only_their_calls() {
    let (_now, clock) = clock(at(4, 10, 0));
    let ledger = TokenLedger::with_clock(None, None, clock);
    let b = budget("bot", 50, Some(vec!["openai"]));
    ledger.spend(
        &call("bot", "anthropic", (Some(500), Some(500)), 200, ""),
        0,
    );
    assert_eq!(ledger.spent(&b), 0);
    ledger.spend(&call("bot", "openai", (Some(30), Some(30)), 200, ""), 0);
    assert!(ledger.check(&b, "openai").await.is_err());
    assert_eq!(ledger.check(&b, "anthropic").await, Ok(()));
    assert!(b.covers("openai") && !b.covers("anthropic"));
    assert!(
        ledger
            .check(&b, "openai")
            .await
            .unwrap_err()
            .message(&b)
            .contains("of 50 LLM tokens for openai (")
    );
}

#[test]
fn calls_of_no_workload_count_for_no_budget_and_feed_the_metric() {
    let metrics = Arc::new(Metrics::new());
    let ledger = TokenLedger::new(None, Some(metrics.clone()));
    let mut anonymous = call("bot", "openai", (Some(1), Some(1)), 200, "");
    anonymous.workload = None;
    ledger.spend(&anonymous, 0);
    ledger.spend(&call("bot", "openai", (Some(3), Some(4)), 200, ""), 0);
    assert_eq!(ledger.spent(&budget("bot", 10, None)), 7);
    let text = metrics.encode(0);
    assert!(
        text.contains(r#"warden_llm_tokens_total{workload="bot",provider="openai"} 7"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_new_ledger_learns_the_days_earlier_spend_from_the_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        dir: tmp.path().to_path_buf(),
        rotate_every: Duration::from_secs(3600),
        rotate_bytes: 64 << 20,
        journal_every: AuditConfig::DEFAULT_JOURNAL_EVERY,
        retention: None,
    };
    let (sink, writer) = AuditWriter::start(config).unwrap();
    let ended = |mut row: RequestRow, start: DateTime<Utc>, end: DateTime<Utc>| {
        row.start_time = start;
        row.end_time = end;
        row
    };
    // Today, with usage; today, streamed without usage (prompt kept: 8
    // bytes, answer 4 bytes: 3 tokens); started yesterday, ended today.
    let mut streamed = call("bot", "openai", (None, None), 200, "abcd");
    streamed.llm.as_mut().unwrap().prompt = Some("12345678".into());
    for row in [
        ended(
            call("bot", "openai", (Some(10), Some(20)), 200, ""),
            at(4, 8, 0),
            at(4, 8, 1),
        ),
        ended(streamed, at(4, 9, 0), at(4, 9, 1)),
        ended(
            call("bot", "anthropic", (Some(1), Some(2)), 200, ""),
            at(3, 23, 59),
            at(4, 0, 1),
        ),
        // Not today's, not allowed, or after the ledger started: none count.
        ended(
            call("bot", "openai", (Some(1000), None), 200, ""),
            at(3, 12, 0),
            at(3, 12, 1),
        ),
        {
            let mut denied = call("bot", "openai", (Some(1000), None), 429, "");
            denied.decision = "deny";
            ended(denied, at(4, 9, 0), at(4, 9, 0))
        },
        ended(
            call("bot", "openai", (Some(1000), None), 200, ""),
            at(4, 11, 0),
            at(4, 11, 1),
        ),
        ended(
            call("other", "openai", (Some(5), Some(5)), 200, ""),
            at(4, 9, 0),
            at(4, 9, 1),
        ),
    ] {
        sink.record_request(row);
    }
    writer.shutdown().await.unwrap();

    let (_now, clock) = clock(at(4, 10, 0));
    let ledger = TokenLedger::with_clock(Some(tmp.path().to_path_buf()), None, clock);
    let bot = budget("bot", 37, None);
    // The earlier spend is learnt on the first check: 30 + 3 + 3 = 36.
    assert_eq!(ledger.check(&bot, "openai").await, Ok(()));
    assert_eq!(ledger.spent(&bot), 36);
    assert_eq!(ledger.spent(&budget("other", 1, None)), 10);
    ledger.spend(&call("bot", "openai", (Some(1), Some(0)), 200, ""), 0);
    assert!(ledger.check(&bot, "openai").await.is_err());
}

#[tokio::test]
async fn an_audit_directory_without_requests_starts_the_day_at_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = TokenLedger::new(Some(tmp.path().join("missing")), None);
    let b = budget("bot", 1, None);
    assert_eq!(ledger.check(&b, "openai").await, Ok(()));
    assert_eq!(ledger.spent(&b), 0);
}

#[tokio::test]
async fn a_reloaded_policy_keeps_the_days_spend() {
    let policy = |tokens: u64| {
        crate::policy::Policy::from_yaml(
            &format!(
                "version: 1\nworkloads:\n  bot: {{ match: {{ uid: 1000 }} }}\n\
                 budgets:\n  bot: {{ tokens_per_day: {tokens} }}\n"
            ),
            "policy.yaml",
        )
        .unwrap()
    };
    let live = crate::policy::LivePolicy::new(policy(100));
    let ledger = TokenLedger::new(None, None);
    ledger.spend(&call("bot", "openai", (Some(30), Some(30)), 200, ""), 0);
    let current = live.current();
    assert_eq!(
        ledger
            .check(current.budget_of("bot").unwrap(), "openai")
            .await,
        Ok(())
    );
    live.replace(policy(50)).unwrap();
    let current = live.current();
    let over = ledger
        .check(current.budget_of("bot").unwrap(), "openai")
        .await;
    assert_eq!(over.map_err(|o| o.spent), Err(60));
}
