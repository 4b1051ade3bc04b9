//! Lineage: which LLM exchange produced a database statement.
//!
//! When an LLM answer reaches a process (tool-call arguments, or text with
//! SQL in it), the SQL it carries is remembered for that process's cgroup
//! (the app and the programs it starts); when a statement from the same
//! cgroup then reaches a database, it is looked up here. A match names the
//! exchange (its session and seq in the `requests` table) and how it
//! matched:
//!
//! - `exact`: the statement is the text the model wrote (trimmed, without
//!   a final `;`);
//! - `normalized`: the same once whitespace and letter case are folded;
//! - `fingerprint`: the same shape with other literal values (the
//!   `fingerprint` column's form), as when an app binds the values itself.
//!
//! A proposal links one statement, the first that matches it: an app that
//! later runs the same text on its own is not credited to the model. The
//! newest proposal wins when several match. Proposals expire after
//! [`PROPOSAL_TTL`], and each cgroup keeps at most [`PROPOSALS_PER_SCOPE`].
use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::protocols::{
    llm::LlmResponse,
    postgres::{classify, fingerprint, split_statements},
};

/// How long an LLM's SQL stays a candidate for the statements that follow.
pub const PROPOSAL_TTL: Duration = Duration::from_secs(600);
/// Bound on the proposals kept for one cgroup.
pub const PROPOSALS_PER_SCOPE: usize = 256;

/// The exchange a request came from: its row in `requests`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub session_id: String,
    pub seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchKind {
    Exact,
    Normalized,
    Fingerprint,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact",
            MatchKind::Normalized => "normalized",
            MatchKind::Fingerprint => "fingerprint",
        }
    }
}

/// A statement's link to the exchange that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub exchange: Exchange,
    pub kind: MatchKind,
}

struct Proposal {
    exact: String,
    normalized: String,
    fingerprint: String,
    exchange: Exchange,
    at: Instant,
}

/// Proposals by cgroup id. One per agent, shared by the decoders.
#[derive(Default)]
pub struct Lineage {
    scopes: Mutex<HashMap<u64, VecDeque<Proposal>>>,
}

impl Lineage {
    /// Remember the SQL an LLM answer carries, for the cgroup it went to.
    pub fn record_answer(&self, cgroup: u64, exchange: &Exchange, answer: &LlmResponse) {
        let mut found = Vec::new();
        for call in &answer.tool_calls {
            match serde_json::from_str::<Value>(&call.arguments) {
                Ok(args) => sql_in_json(&args, &mut found),
                Err(_) => sql_in_text(&call.arguments, &mut found),
            }
        }
        sql_in_text(&answer.text, &mut found);
        if found.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        let proposals = scopes.entry(cgroup).or_default();
        proposals.retain(|p| now.duration_since(p.at) < PROPOSAL_TTL);
        for sql in found {
            for one in split_statements(&sql) {
                let exact = exact_form(one);
                if exact.is_empty() {
                    continue;
                }
                if proposals.len() >= PROPOSALS_PER_SCOPE {
                    proposals.pop_front();
                }
                proposals.push_back(Proposal {
                    normalized: normalized_form(&exact),
                    fingerprint: fingerprint(&exact),
                    exact,
                    exchange: exchange.clone(),
                    at: now,
                });
            }
        }
    }

    /// The exchange that proposed `statement`, if one from this cgroup did;
    /// the proposal is used up.
    pub fn claim_statement(&self, cgroup: u64, statement: &str) -> Option<Link> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        let proposals = scopes.get_mut(&cgroup)?;
        let now = Instant::now();
        proposals.retain(|p| now.duration_since(p.at) < PROPOSAL_TTL);
        let exact = exact_form(statement);
        let normalized = normalized_form(&exact);
        // Computed only when the cheaper forms found nothing.
        let mut shape: Option<String> = None;
        let mut best: Option<(usize, MatchKind)> = None;
        for kind in [
            MatchKind::Exact,
            MatchKind::Normalized,
            MatchKind::Fingerprint,
        ] {
            let hit = proposals.iter().rposition(|p| match kind {
                MatchKind::Exact => p.exact == exact,
                MatchKind::Normalized => p.normalized == normalized,
                MatchKind::Fingerprint => {
                    p.fingerprint == *shape.get_or_insert_with(|| fingerprint(&exact))
                }
            });
            if let Some(i) = hit {
                best = Some((i, kind));
                break;
            }
        }
        let (i, kind) = best?;
        let proposal = proposals.remove(i)?;
        Some(Link {
            exchange: proposal.exchange,
            kind,
        })
    }

    /// Forget a cgroup's proposals (its workload is gone).
    pub fn forget(&self, cgroup: u64) {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        scopes.remove(&cgroup);
    }
}

fn exact_form(sql: &str) -> String {
    sql.trim().trim_end_matches(';').trim_end().to_string()
}

fn normalized_form(exact: &str) -> String {
    exact
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The first words of statements an app would run for a model.
const SQL_STARTS: [&str; 16] = [
    "select", "insert", "update", "delete", "with", "create", "drop", "alter", "grant", "revoke",
    "truncate", "copy", "merge", "call", "do", "explain",
];

/// Starts like a statement and parses as SQL: prose that happens to begin
/// with "Select" or "Update" does not.
fn looks_like_sql(text: &str) -> bool {
    let first = text
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    SQL_STARTS.iter().any(|k| first.eq_ignore_ascii_case(k))
        && text.trim().contains(' ')
        && classify(text).iter().all(|s| s.parse_error.is_none())
}

/// Every string value in tool-call arguments that reads as SQL.
fn sql_in_json(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) if looks_like_sql(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| sql_in_json(v, out)),
        Value::Object(map) => map.values().for_each(|v| sql_in_json(v, out)),
        _ => {}
    }
}

/// SQL in free text: fenced code blocks (```sql ... ```), else the whole
/// text when it reads as SQL.
fn sql_in_text(text: &str, out: &mut Vec<String>) {
    let mut blocks = text.split("```").skip(1).step_by(2).peekable();
    if blocks.peek().is_none() {
        if looks_like_sql(text) {
            out.push(text.to_string());
        }
        return;
    }
    for block in blocks {
        // The fence's language tag, if any, is the rest of its first line.
        let body = match block.split_once('\n') {
            Some((tag, rest)) if !tag.trim().contains(' ') => rest,
            _ => block,
        };
        if looks_like_sql(body) {
            out.push(body.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::llm::ToolCall;

    fn answer(text: &str, calls: &[&str]) -> LlmResponse {
        LlmResponse {
            text: text.into(),
            tool_calls: calls
                .iter()
                .map(|a| ToolCall {
                    id: None,
                    name: "run_sql".into(),
                    arguments: a.to_string(),
                })
                .collect(),
            ..LlmResponse::default()
        }
    }

    fn ex(seq: u64) -> Exchange {
        Exchange {
            session_id: "s".into(),
            seq,
        }
    }

    #[test]
    fn tool_call_sql_links_exactly_once() {
        let l = Lineage::default();
        l.record_answer(
            7,
            &ex(1),
            &answer(
                "",
                &[r#"{"query": "SELECT name FROM customers WHERE id = 4;"}"#],
            ),
        );
        let link = l
            .claim_statement(7, "SELECT name FROM customers WHERE id = 4")
            .unwrap();
        assert_eq!((link.exchange, link.kind), (ex(1), MatchKind::Exact));
        // Used up: the app running it again on its own is not the model's.
        assert_eq!(
            l.claim_statement(7, "SELECT name FROM customers WHERE id = 4"),
            None
        );
    }

    #[test]
    fn other_cgroups_and_other_statements_do_not_link() {
        let l = Lineage::default();
        l.record_answer(
            7,
            &ex(1),
            &answer("", &[r#"{"q": "DELETE FROM t WHERE a = 1"}"#]),
        );
        assert_eq!(l.claim_statement(8, "DELETE FROM t WHERE a = 1"), None);
        assert_eq!(l.claim_statement(7, "SELECT count(*) FROM t"), None);
    }

    #[test]
    fn normalized_and_fingerprint_matches_say_so() {
        let l = Lineage::default();
        l.record_answer(
            1,
            &ex(1),
            &answer(
                "",
                &[
                    r#"{"q": "select *\n  from orders where id = 5"}"#,
                    r#"{"q": "UPDATE orders SET state = 'refunded' WHERE id = 9"}"#,
                ],
            ),
        );
        let n = l
            .claim_statement(1, "SELECT * FROM orders WHERE id = 5")
            .unwrap();
        assert_eq!(n.kind, MatchKind::Normalized);
        let f = l
            .claim_statement(1, "UPDATE orders SET state = $1 WHERE id = $2")
            .unwrap();
        assert_eq!(f.kind, MatchKind::Fingerprint);
    }

    #[test]
    fn sql_in_fenced_text_and_several_statements() {
        let l = Lineage::default();
        l.record_answer(
            1,
            &ex(3),
            &answer(
                "Run this:\n```sql\nINSERT INTO notes VALUES (1); SELECT 1 + 1\n```\nthen tell me.",
                &[],
            ),
        );
        assert!(l.claim_statement(1, "SELECT 1 + 1").is_some());
        assert!(
            l.claim_statement(1, "INSERT INTO notes VALUES (1)")
                .is_some()
        );
    }

    #[test]
    fn prose_is_not_sql_and_the_newest_proposal_wins() {
        let l = Lineage::default();
        l.record_answer(1, &ex(1), &answer("Select the best option for you.", &[]));
        assert_eq!(
            l.claim_statement(1, "Select the best option for you."),
            None
        );
        l.record_answer(1, &ex(2), &answer("", &[r#"{"q": "SELECT 1 AS x"}"#]));
        l.record_answer(1, &ex(3), &answer("", &[r#"{"q": "SELECT 1 AS x"}"#]));
        assert_eq!(
            l.claim_statement(1, "SELECT 1 AS x").unwrap().exchange,
            ex(3)
        );
        assert_eq!(
            l.claim_statement(1, "SELECT 1 AS x").unwrap().exchange,
            ex(2)
        );
    }

    #[test]
    fn proposals_per_cgroup_are_bounded() {
        let l = Lineage::default();
        for i in 0..(PROPOSALS_PER_SCOPE as u64 + 10) {
            let args = format!(r#"{{"q": "SELECT {i} AS n"}}"#);
            l.record_answer(1, &ex(i), &answer("", &[args.as_str()]));
        }
        // The newest is there; the oldest went (only its shape is left).
        let newest = format!("SELECT {} AS n", PROPOSALS_PER_SCOPE + 9);
        assert_eq!(
            l.claim_statement(1, &newest).unwrap().kind,
            MatchKind::Exact
        );
        let oldest = l.claim_statement(1, "SELECT 0 AS n").unwrap();
        assert_eq!(oldest.kind, MatchKind::Fingerprint);
        l.forget(1);
        assert_eq!(l.claim_statement(1, "SELECT 5 AS n"), None);
    }
}
