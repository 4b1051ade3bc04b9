//! Lineage: which LLM exchange produced a database statement, an HTTP
//! request or an SSH command.
//!
//! When an LLM answer reaches a process (tool-call arguments, or text with
//! SQL or URLs in it), the SQL and the URLs it carries are remembered for
//! that process's cgroup (the app and the programs it starts); when a
//! statement (or an HTTP request) from the same cgroup then goes out, it is
//! looked up here. A match names the exchange (its session and seq in the
//! `requests` table) and how it matched:
//!
//! - `exact`: the statement is the text the model wrote (trimmed, without
//!   a final `;`); the request is to the URL the model wrote, query
//!   included;
//! - `normalized`: the same once whitespace and letter case are folded; for
//!   a request, the same host, port and path, whatever the query;
//! - `fingerprint`: the same shape with other literal values (the
//!   `fingerprint` column's form), as when an app binds the values itself.
//!
//! Commands come from tool-call arguments named like one (`command`, `cmd`,
//! `commands`, `script`) and from fenced `sh`, `bash` or `shell` blocks in
//! the text; they match exactly, or once whitespace is folded.
//!
//! A proposal links one statement, the first that matches it: an app that
//! later runs the same text on its own is not credited to the model. The
//! newest proposal wins when several match. Proposals expire after
//! [`PROPOSAL_TTL`], and each cgroup keeps at most [`PROPOSALS_PER_SCOPE`].
use std::{
    collections::{HashMap, VecDeque},
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use regex::Regex;
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

/// A URL (or a command) an answer carried, in the forms requests are
/// compared in.
struct TextProposal {
    exact: String,
    normalized: String,
    exchange: Exchange,
    at: Instant,
}

#[derive(Default)]
struct Scope {
    sql: VecDeque<Proposal>,
    http: VecDeque<TextProposal>,
    commands: VecDeque<TextProposal>,
}

/// Proposals by cgroup id. One per agent, shared by the decoders.
#[derive(Default)]
pub struct Lineage {
    scopes: Mutex<HashMap<u64, Scope>>,
}

/// An HTTP request as lineage compares it: the host it asked for, the port
/// it connected to, and its path with the query.
pub struct HttpTarget<'a> {
    pub host: &'a str,
    pub port: u16,
    pub path_and_query: &'a str,
}

impl Lineage {
    /// Remember the SQL an LLM answer carries, for the cgroup it went to.
    pub fn record_answer(&self, cgroup: u64, exchange: &Exchange, answer: &LlmResponse) {
        let mut found = Vec::new();
        let mut urls = Vec::new();
        let mut commands = Vec::new();
        for call in &answer.tool_calls {
            match serde_json::from_str::<Value>(&call.arguments) {
                Ok(args) => {
                    sql_in_json(&args, &mut found);
                    commands_in_json(&args, false, &mut commands);
                }
                Err(_) => sql_in_text(&call.arguments, &mut found),
            }
            urls_in(&call.arguments, &mut urls);
        }
        sql_in_text(&answer.text, &mut found);
        urls_in(&answer.text, &mut urls);
        commands_in_text(&answer.text, &mut commands);
        if found.is_empty() && urls.is_empty() && commands.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        let scope = scopes.entry(cgroup).or_default();
        scope
            .commands
            .retain(|p| now.duration_since(p.at) < PROPOSAL_TTL);
        for command in commands {
            let exact = command.trim().to_string();
            if exact.is_empty() {
                continue;
            }
            if scope.commands.len() >= PROPOSALS_PER_SCOPE {
                scope.commands.pop_front();
            }
            scope.commands.push_back(TextProposal {
                normalized: folded(&exact),
                exact,
                exchange: exchange.clone(),
                at: now,
            });
        }
        scope
            .http
            .retain(|p| now.duration_since(p.at) < PROPOSAL_TTL);
        for (exact, normalized) in urls {
            if scope.http.len() >= PROPOSALS_PER_SCOPE {
                scope.http.pop_front();
            }
            scope.http.push_back(TextProposal {
                exact,
                normalized,
                exchange: exchange.clone(),
                at: now,
            });
        }
        let proposals = &mut scope.sql;
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
        let proposals = &mut scopes.get_mut(&cgroup)?.sql;
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

    /// The exchange that proposed this HTTP request's URL, if one from this
    /// cgroup did; the proposal is used up.
    pub fn claim_http(&self, cgroup: u64, target: &HttpTarget) -> Option<Link> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        let proposals = &mut scopes.get_mut(&cgroup)?.http;
        let now = Instant::now();
        proposals.retain(|p| now.duration_since(p.at) < PROPOSAL_TTL);
        let (exact, normalized) = url_forms(target.host, target.port, target.path_and_query);
        claim_text(proposals, &exact, &normalized)
    }

    /// The exchange that proposed this command (an SSH exec's command
    /// line), if one from this cgroup did; the proposal is used up.
    pub fn claim_command(&self, cgroup: u64, command: &str) -> Option<Link> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        let proposals = &mut scopes.get_mut(&cgroup)?.commands;
        let now = Instant::now();
        proposals.retain(|p| now.duration_since(p.at) < PROPOSAL_TTL);
        let exact = command.trim();
        claim_text(proposals, exact, &folded(exact))
    }
}

/// The newest proposal with this exact form, else with this normalized
/// one, taken out.
fn claim_text(
    proposals: &mut VecDeque<TextProposal>,
    exact: &str,
    normalized: &str,
) -> Option<Link> {
    let (i, kind) = proposals
        .iter()
        .rposition(|p| p.exact == exact)
        .map(|i| (i, MatchKind::Exact))
        .or_else(|| {
            proposals
                .iter()
                .rposition(|p| p.normalized == normalized)
                .map(|i| (i, MatchKind::Normalized))
        })?;
    let proposal = proposals.remove(i)?;
    Some(Link {
        exchange: proposal.exchange,
        kind,
    })
}

/// A command with its whitespace folded; case matters in commands.
fn folded(command: &str) -> String {
    command.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The argument names tools give a shell command.
const COMMAND_KEYS: [&str; 5] = ["command", "cmd", "commands", "script", "shell_command"];

/// The strings of tool-call arguments under a command-like key (a string,
/// or a list of them).
fn commands_in_json(value: &Value, under_command_key: bool, out: &mut Vec<String>) {
    match value {
        Value::String(s) if under_command_key => out.push(s.clone()),
        Value::Array(items) => items
            .iter()
            .for_each(|v| commands_in_json(v, under_command_key, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            let key = k.to_ascii_lowercase();
            commands_in_json(v, COMMAND_KEYS.contains(&key.as_str()), out)
        }),
        _ => {}
    }
}

/// Commands in fenced `sh`, `bash` or `shell` blocks: the block, and each
/// of its lines that is not a comment.
fn commands_in_text(text: &str, out: &mut Vec<String>) {
    for block in text.split("```").skip(1).step_by(2) {
        let Some((tag, body)) = block.split_once('\n') else {
            continue;
        };
        if !matches!(tag.trim(), "sh" | "bash" | "shell" | "console") {
            continue;
        }
        out.push(body.to_string());
        let lines: Vec<&str> = body
            .lines()
            .map(|l| l.trim().trim_start_matches("$ "))
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        if lines.len() > 1 {
            out.extend(lines.iter().map(|l| l.to_string()));
        }
    }
}

/// `host:port/path?query` and `host:port/path` (no final `/`), the host
/// lowercased.
fn url_forms(host: &str, port: u16, path_and_query: &str) -> (String, String) {
    let host = host.to_ascii_lowercase();
    let path_and_query = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    let path = path_and_query.split(['?', '#']).next().unwrap_or("");
    (
        format!("{host}:{port}{path_and_query}"),
        format!("{host}:{port}{}", path.trim_end_matches('/')),
    )
}

static URL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)\b(https?)://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?([^\s"'<>`\\]*)"#)
        .expect("a valid pattern")
});

/// The URLs in a text (tool-call arguments as JSON text, or an answer), in
/// the forms of [`url_forms`].
fn urls_in(text: &str, out: &mut Vec<(String, String)>) {
    for c in URL.captures_iter(text) {
        let https = c[1].eq_ignore_ascii_case("https");
        let host = c[2].trim_start_matches('[').trim_end_matches(']');
        let port = match c.get(3) {
            Some(p) => match p.as_str().parse::<u16>() {
                Ok(port) => port,
                Err(_) => continue,
            },
            None if https => 443,
            None => 80,
        };
        // Sentence punctuation after a URL is not part of it.
        let rest = c[4].trim_end_matches(['.', ',', ';', ':', '!', ')', ']', '}']);
        out.push(url_forms(host, port, rest));
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
    fn commands_from_tool_calls_and_shell_blocks_link_once() {
        let l = Lineage::default();
        l.record_answer(
            3,
            &ex(4),
            &answer(
                "Run this:\n```bash\n$ df -h /srv\n# then\nsystemctl status app\n```\n",
                &[
                    r#"{"host": "build-box", "command": "uptime"}"#,
                    r#"{"commands": ["ls  -la /tmp"]}"#,
                ],
            ),
        );
        assert_eq!(l.claim_command(3, "uptime").unwrap().kind, MatchKind::Exact);
        assert_eq!(l.claim_command(3, "uptime"), None, "used up");
        let folded = l.claim_command(3, "ls -la /tmp").unwrap();
        assert_eq!(
            (folded.exchange, folded.kind),
            (ex(4), MatchKind::Normalized)
        );
        assert!(l.claim_command(3, "df -h /srv").is_some());
        assert!(l.claim_command(3, "systemctl status app").is_some());
        // Other arguments are not commands; other cgroups see nothing.
        assert_eq!(l.claim_command(3, "build-box"), None);
        l.record_answer(3, &ex(5), &answer("", &[r#"{"cmd": "whoami"}"#]));
        assert_eq!(l.claim_command(4, "whoami"), None);
        assert_eq!(l.claim_command(3, "WHOAMI"), None, "case matters");
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

    fn get(host: &str, port: u16, path_and_query: &str) -> HttpTarget<'static> {
        HttpTarget {
            host: Box::leak(host.to_string().into_boxed_str()),
            port,
            path_and_query: Box::leak(path_and_query.to_string().into_boxed_str()),
        }
    }

    #[test]
    fn urls_in_tool_calls_and_text_link_the_requests_to_them() {
        let l = Lineage::default();
        l.record_answer(
            1,
            &ex(1),
            &answer(
                "See https://Docs.example.com/guide/, or http://[::1]:8080/a?b=1.",
                &[r#"{"url": "https://10.0.0.5:8443/tickets/2?fields=all"}"#],
            ),
        );
        let exact = l
            .claim_http(1, &get("10.0.0.5", 8443, "/tickets/2?fields=all"))
            .unwrap();
        assert_eq!((exact.exchange, exact.kind), (ex(1), MatchKind::Exact));
        // Used up.
        assert_eq!(
            l.claim_http(1, &get("10.0.0.5", 8443, "/tickets/2?fields=all")),
            None
        );
        // Default port, final slash and host case do not matter; the query does, a little.
        let n = l
            .claim_http(1, &get("docs.example.com", 443, "/guide?lang=en"))
            .unwrap();
        assert_eq!(n.kind, MatchKind::Normalized);
        assert_eq!(
            l.claim_http(1, &get("::1", 8080, "/a?b=1")).unwrap().kind,
            MatchKind::Exact
        );
    }

    #[test]
    fn requests_to_other_places_or_from_elsewhere_do_not_link() {
        let l = Lineage::default();
        l.record_answer(
            1,
            &ex(1),
            &answer("", &[r#"{"url": "https://a.example/x"}"#]),
        );
        assert_eq!(l.claim_http(2, &get("a.example", 443, "/x")), None);
        assert_eq!(l.claim_http(1, &get("a.example", 8443, "/x")), None);
        assert_eq!(l.claim_http(1, &get("a.example", 443, "/y")), None);
        assert_eq!(l.claim_http(1, &get("b.example", 443, "/x")), None);
        // The SQL side is not confused by it, nor the URL side by SQL.
        assert_eq!(l.claim_statement(1, "https://a.example/x"), None);
        assert!(l.claim_http(1, &get("a.example", 443, "/x")).is_some());
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
    }
}
