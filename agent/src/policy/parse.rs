//! Reading a policy file: YAML to a checked [`Policy`], with errors that name
//! the line and column.
//!
//! Every key and value is read by a hand-written serde visitor, and every
//! check (unknown and not-yet-supported keys, addresses, ports, globs, names,
//! references between rules and definitions) runs inside the visitor of the
//! node it is about. serde_yaml then stamps the error with the position of
//! that node, as libyaml saw it, so positions never come from guessing at the
//! text, whatever the style (block or flow, quoted or not, anchors). Each
//! mapping of known keys is one [`Keys`] impl: its state, what each key's
//! value does to it, and what it makes at the end.
//!
//! References (a rule naming a workload or a target, a mask or a preset
//! naming detectors and presets, a credential naming its target) can point
//! forwards in the file, so the file is read twice: the first reading learns
//! the names (and what each target speaks and whether it has a host, what
//! each rule does, the custom detectors and the presets) and checks
//! everything else; the second checks the references, with the names known,
//! that a rule's protocol matchers go only with targets that speak their
//! protocol, that `mask` goes only on statement rules that allow or approve
//! and `limits`, `redact_prompt` and `mask_response` only on request rules
//! that allow or approve, that `action: approve` goes only on statement,
//! request and SSH rules, with an `approve` and an `approvals` section,
//! that an SSH target with a credential says how its host key is checked,
//! compiles each mask into a [`Masker`], and reads the credentials'
//! secrets. The request rules' parts are in [`request`], the SSH rules' and
//! SSH targets' in [`ssh`], the approvals' in [`approval`].

use std::{
    cell::{Cell, RefCell},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    Action, ApprovalRule, ApprovalSettings, AuditSettings, Budget, Credential, DefaultAction,
    HttpMatcher, Limits, LlmMatcher, Mask, OnAuditFailure, Policy, PolicyError, PortRange,
    PromptAudit, Protocol, Rule, RuleKind, STATEMENT_CLASSES, Selector, SqlMatcher, SshLogin,
    SshMatcher, Target, TokenMatcher, UpstreamHostKeys, Workload, WorkloadTokenSettings,
    glob::Glob,
};
use crate::masking::{self, Checksum, DetectorSpec, MaskError, Masker};

mod approval;
mod budget;
mod request;
mod ssh;
mod token;

use approval::{ApprovalsKeys, ApproveKeys, OwnerP};
use budget::BudgetKeys;
use ssh::{HostKeyP, KnownHostsP, SshDefaultP, SshKeys};
use token::{TokenKeys, WorkloadTokensKeys};

#[cfg(test)]
pub(crate) use request::with_test_env;
use request::{
    CredentialDef, CredentialKeys, CredentialKind, DetectorsDef, DetectorsSeed, HostP, HttpKeys,
    LimitsKeys, LlmKeys,
};

/// The policy versions this build reads.
pub const SUPPORTED_VERSION: u64 = 1;

/// The most UDP ports the kernel's allow map holds.
pub const MAX_UDP_PORTS: usize = 256;

/// The keys one kind of mapping takes, and the keys of later versions that
/// it recognises in order to say "not supported yet" rather than "unknown".
pub(crate) struct Fields {
    /// Where the mapping is, for messages: "in a rule".
    pub what: &'static str,
    pub known: &'static [&'static str],
    /// (key, what it belongs to): ("ssh", "protocol matchers").
    pub later: &'static [(&'static str, &'static str)],
    /// (key, what to write instead): keys people write that are spelt, or
    /// belong, elsewhere.
    pub instead: &'static [(&'static str, &'static str)],
}

pub(crate) const TOP: Fields = Fields {
    what: "at the top level",
    known: &[
        "version",
        "default",
        "sql_default",
        "sql_mask",
        "http_default",
        "prompt_redact",
        "response_mask",
        "ssh_default",
        "workloads",
        "targets",
        "credentials",
        "detectors",
        "presets",
        "udp",
        "rules",
        "audit",
        "approvals",
        "budgets",
        "workload_tokens",
    ],
    later: &[],
    instead: &[
        ("budget", "write `budgets:`, keyed by workload name"),
        (
            "tokens",
            "write `workload_tokens:`, with the issuers whose tokens the agent trusts",
        ),
        (
            "mask",
            "write `sql_mask:` to mask the rows of statements no rule matches, or `mask:` in a \
             statement rule",
        ),
        (
            "redact_prompt",
            "write `prompt_redact:` to redact the prompts of requests no rule matches, or \
             `redact_prompt:` in a request rule",
        ),
        (
            "mask_response",
            "write `response_mask:` to mask the responses of requests no rule matches, or \
             `mask_response:` in a request rule",
        ),
        ("credential", "write `credentials:`, keyed by target name"),
        (
            "llm_default",
            "write `http_default:`, which decides the HTTP requests, LLM calls included, no \
             rule matches",
        ),
        (
            "approval",
            "write `approvals:`, with `oidc: { issuer, client_id }`",
        ),
        (
            "oidc",
            "oidc goes under approvals: `approvals: { oidc: { issuer: ..., client_id: ... } }`",
        ),
        (
            "approve",
            "approve goes in a rule that says `action: approve`; how reviewers sign in goes \
             under `approvals:`",
        ),
        (
            "ssh",
            "an ssh matcher goes in a rule's when: `when: { ssh: { command: \"git *\" } }`; \
             `ssh_default:` decides the SSH requests no rule matches",
        ),
        (
            "forwarding",
            "SSH forwarding no rule allows is denied; allow it with a rule: `when: { ssh: { \
             channel: forward } }, action: allow`",
        ),
    ],
};

pub(crate) const WORKLOAD: Fields = Fields {
    what: "in a workload",
    known: &["match", "owners"],
    later: &[],
    instead: &[
        ("owner", "write `owners:`, which takes one name or a list"),
        (
            "uid",
            "what a process must be goes under match: `match: { uid: 1000 }`",
        ),
        (
            "unit",
            "what a process must be goes under match: `match: { unit: \"bot.service\" }`",
        ),
    ],
};

pub(crate) const MATCH: Fields = Fields {
    what: "in a workload's match",
    known: &[
        "uid",
        "user",
        "exe",
        "comm",
        "unit",
        "cgroup",
        "container",
        "namespace",
        "service_account",
    ],
    later: &[("k8s", "Kubernetes selectors")],
    instead: &[],
};

pub(crate) const TARGET: Fields = Fields {
    what: "in a target",
    known: &[
        "address",
        "port",
        "host",
        "protocol",
        "tls",
        "tls_name",
        "host_keys",
        "known_hosts",
    ],
    later: &[],
    instead: &[
        (
            "host_key",
            "write `host_keys:`, which takes one key or a list",
        ),
        (
            "known_hosts_file",
            "write `known_hosts:`, with the file's absolute path",
        ),
        (
            "user",
            "the user the agent logs in as goes in the target's credential: `credentials: { \
             build-box: { user: deploy, private_key_file: /etc/warden/keys/build-box } }`",
        ),
        (
            "private_key_file",
            "keys go under credentials:, keyed by target name: `credentials: { build-box: { \
             private_key_file: /etc/warden/keys/build-box } }`",
        ),
        (
            "database",
            "a rule's sql matcher names databases: `when: { target: ..., sql: { database: crm } }`",
        ),
        ("hosts", "write `host:`, which takes one glob or a list"),
        (
            "url",
            "write the host alone, `host: api.openai.com`, and match paths in a rule's http \
             matcher",
        ),
        (
            "api_key_env",
            "keys go under credentials:, keyed by target name: `credentials: { openai: { \
             api_key_env: OPENAI_API_KEY } }`",
        ),
    ],
};

pub(crate) const DETECTOR: Fields = Fields {
    what: "in a detector",
    known: &["pattern", "checksum"],
    later: &[],
    instead: &[
        ("regex", "write `pattern:`"),
        ("match", "write `pattern:`"),
        (
            "luhn",
            "write `checksum: luhn` to keep only matches that pass the Luhn check",
        ),
    ],
};

pub(crate) const MASK: Fields = Fields {
    what: "in a mask",
    known: &["columns", "detectors"],
    later: &[],
    instead: &[
        ("column", "write `columns:`, which takes one glob or a list"),
        (
            "detector",
            "write `detectors:`, which takes one name or a list",
        ),
        (
            "presets",
            "a preset is named in `detectors:`, like a detector",
        ),
        (
            "tables",
            "tables go in the rule's sql matcher: `when: { sql: { tables: \"crm.*\" } }`",
        ),
    ],
};

pub(crate) const UDP: Fields = Fields {
    what: "under udp",
    known: &["allow_ports"],
    later: &[],
    instead: &[],
};

pub(crate) const RULE: Fields = Fields {
    what: "in a rule",
    known: &[
        "name",
        "when",
        "action",
        "approve",
        "mask",
        "limits",
        "redact_prompt",
        "mask_response",
    ],
    later: &[],
    instead: &[
        (
            "approval",
            "write `approve:`, with `action: approve`: `approve: { groups: [dba] }`",
        ),
        (
            "approvers",
            "write `approve: { groups: [dba] }`, with `action: approve`",
        ),
        (
            "reviewers",
            "write `approve: { groups: [dba] }`, with `action: approve`",
        ),
        (
            "sql",
            "a rule's sql matcher goes under when: `when: { sql: { ... } }`",
        ),
        (
            "http",
            "a rule's http matcher goes under when: `when: { http: { ... } }`",
        ),
        (
            "llm",
            "a rule's llm matcher goes under when: `when: { llm: { ... } }`",
        ),
        (
            "ssh",
            "a rule's ssh matcher goes under when: `when: { ssh: { ... } }`",
        ),
        (
            "credentials",
            "credentials are given per target at the top level: `credentials: { openai: { \
             api_key_env: OPENAI_API_KEY } }`",
        ),
        (
            "credential",
            "credentials are given per target at the top level: `credentials: { openai: { \
             api_key_env: OPENAI_API_KEY } }`",
        ),
        (
            "prompt_redact",
            "in a rule write `redact_prompt:`; `prompt_redact:` is the top-level one, for \
             requests no rule matches",
        ),
        (
            "response_mask",
            "in a rule write `mask_response:`; `response_mask:` is the top-level one, for \
             requests no rule matches",
        ),
        (
            "max_tokens",
            "limits go together: `limits: { max_tokens: 4000 }`",
        ),
        (
            "models",
            "limits go together: `limits: { models: [\"gpt-4.1-mini*\"] }`",
        ),
    ],
};

pub(crate) const WHEN: Fields = Fields {
    what: "in a rule's when",
    known: &[
        "workload", "target", "address", "port", "sql", "http", "llm", "ssh", "token",
    ],
    later: &[
        ("protocol", "protocol matchers"),
        ("from_llm", "protocol matchers"),
    ],
    instead: &[
        (
            "command",
            "commands go in the ssh matcher: `ssh: { command: \"git *\" }`",
        ),
        (
            "channel",
            "channels go in the ssh matcher: `ssh: { channel: shell }`",
        ),
        (
            "database",
            "databases are matched per statement: `sql: { database: crm }`",
        ),
        (
            "db_user",
            "database users are matched per statement: `sql: { user: bot_ro }`",
        ),
        (
            "class",
            "statement classes go in the sql matcher: `sql: { class: write }`",
        ),
        (
            "tables",
            "tables go in the sql matcher: `sql: { tables: \"crm.*\" }`",
        ),
        (
            "mask",
            "mask goes in the rule, next to its action: `action: allow, mask: { ... }`",
        ),
        (
            "host",
            "host names go in a target, `targets: { openai: { host: api.openai.com } }`, or in \
             the http matcher, `http: { host: \"*.internal\" }`",
        ),
        (
            "method",
            "methods go in the http matcher: `http: { method: DELETE }`",
        ),
        (
            "path",
            "paths go in the http matcher: `http: { path: \"/admin/*\" }`",
        ),
        (
            "model",
            "models go in the llm matcher: `llm: { model: \"gpt-4.1*\" }`",
        ),
        (
            "provider",
            "providers go in the llm matcher: `llm: { provider: openai }`",
        ),
        (
            "limits",
            "limits go in the rule, next to its action: `action: allow, limits: { ... }`",
        ),
        (
            "subject",
            "a workload token's subject goes in the token matcher: `token: { subject: \
             \"system:serviceaccount:crm:*\" }`",
        ),
    ],
};

pub(crate) const SQL: Fields = Fields {
    what: "in a rule's sql",
    known: &[
        "class",
        "tables",
        "functions",
        "database",
        "user",
        "from_llm",
    ],
    later: &[],
    instead: &[
        (
            "columns",
            "columns to mask go in the rule's mask, next to its action: `mask: { columns: \
             [\"*email*\"] }`",
        ),
        ("classes", "write `class:`, which takes one class or a list"),
        ("table", "write `tables:`, which takes one glob or a list"),
        (
            "function",
            "write `functions:`, which takes one glob or a list",
        ),
        ("db", "write `database:`"),
        ("db_user", "write `user:`"),
        ("users", "write `user:`, which takes one glob or a list"),
        (
            "databases",
            "write `database:`, which takes one glob or a list",
        ),
    ],
};

pub(crate) const AUDIT: Fields = Fields {
    what: "under audit",
    known: &["dir", "rotate", "retention", "prompts", "on_failure"],
    later: &[],
    instead: &[],
};

/// Each mapping of the format, with where the JSON Schema describes it.
#[cfg(test)]
pub(crate) const SCHEMA_OBJECTS: &[(&str, &Fields)] = &[
    ("", &TOP),
    ("/$defs/workload", &WORKLOAD),
    ("/$defs/match", &MATCH),
    ("/$defs/target", &TARGET),
    ("/$defs/detector", &DETECTOR),
    ("/$defs/mask", &MASK),
    ("/$defs/udp", &UDP),
    ("/$defs/rule", &RULE),
    ("/$defs/when", &WHEN),
    ("/$defs/sql", &SQL),
    ("/$defs/audit", &AUDIT),
    ("/$defs/http", &request::HTTP),
    ("/$defs/llm", &request::LLM),
    ("/$defs/limits", &request::LIMITS),
    ("/$defs/redactMapping", &request::REDACT),
    ("/$defs/responseMaskMapping", &request::RESPONSE_MASK),
    ("/$defs/credential", &request::CREDENTIAL),
    ("/$defs/ssh", &ssh::SSH),
    ("/$defs/approve", &approval::APPROVE),
    ("/$defs/approvals", &approval::APPROVALS),
    ("/$defs/oidc", &approval::OIDC),
    ("/$defs/budget", &budget::BUDGET),
    ("/$defs/workloadTokens", &token::WORKLOAD_TOKENS),
    ("/$defs/tokenIssuer", &token::TOKEN_ISSUER),
    ("/$defs/token", &token::TOKEN),
];

// ---------------------------------------------------------------------------
// Entry point and errors

pub(super) fn parse(src: &str, origin: &str) -> Result<Policy, PolicyError> {
    let learn = Ctx::default();
    let first = read(src, &learn).map_err(|e| convert(&e, src, origin))?;
    let check = Ctx {
        names: Some(Names::learnt(first)),
        ..Ctx::default()
    };
    let file = read(src, &check).map_err(|e| convert(&e, src, origin))?;
    Ok(file.compile())
}

fn read(src: &str, ctx: &Ctx) -> Result<FileDef, serde_yaml::Error> {
    Mapping(FileKeys {
        ctx,
        file: FileDef::default(),
    })
    .deserialize(serde_yaml::Deserializer::from_str(src))
}
/// Marks the start of a message written here, so that the path serde_yaml
/// puts in front ("rules[0].when: ") can be cut off exactly.
const OURS: char = '\u{1f}';

fn fail<E: de::Error>(message: impl fmt::Display) -> E {
    E::custom(format_args!("{OURS}{message}"))
}

fn convert(err: &serde_yaml::Error, src: &str, origin: &str) -> PolicyError {
    let (line, column) = err
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    let text = err.to_string();
    let at = format!(" at line {line} column {column}");
    // libyaml's own errors show as a struct in Debug; ours and serde's as
    // Error("message", line: .., column: ..). serde_yaml 0.9 is frozen.
    let syntax = format!("{err:?}").starts_with("Error {");
    let message = if syntax {
        syntax_message(&text.replacen(&at, "", 1), src, line)
    } else {
        let text = text.strip_suffix(&at).unwrap_or(&text);
        match text.find(OURS) {
            Some(i) => text[i + OURS.len_utf8()..].to_string(),
            None => strip_path(text).to_string(),
        }
    };
    PolicyError::Invalid {
        origin: origin.to_string(),
        line,
        column,
        message,
    }
}

/// serde's own messages ("invalid type: ...") come after a path such as
/// `rules[0].when.port: `; a path has no spaces, a message's first words do.
fn strip_path(text: &str) -> &str {
    match text.split_once(": ") {
        Some((path, rest)) if !path.contains(char::is_whitespace) && !path.contains('`') => rest,
        _ => text,
    }
}

fn syntax_message(problem: &str, src: &str, line: usize) -> String {
    let source_line = src.lines().nth(line.saturating_sub(1)).unwrap_or("");
    let hint = if source_line.contains('\t') || problem.contains("tab") {
        "indent with spaces: YAML does not allow tabs there"
    } else if problem.contains("mapping values are not allowed") {
        "put a space after each `key:`, check the indentation, and quote values that contain `: `"
    } else if problem.contains("did not find expected") {
        "check the indentation (keys of one mapping line up) and closing brackets and quotes"
    } else {
        "check the indentation and the quoting"
    };
    format!("this is not valid YAML: {problem}; {hint}")
}

// ---------------------------------------------------------------------------
// What the file says, before the names are resolved

struct Names {
    workloads: Vec<String>,
    targets: Vec<String>,
    /// What each target of `targets` speaks, in the same order.
    target_protocols: Vec<Option<Protocol>>,
    /// Whether each target of `targets` has a `host`, in the same order.
    target_hosts: Vec<bool>,
    /// Whether each target of `targets` has a `host` or an `address`.
    target_located: Vec<bool>,
    rules: Vec<String>,
    /// What each rule of `rules` does, in the same order.
    rule_shapes: Vec<RuleShape>,
    sql_default: Action,
    http_default: Action,
    /// The names of the targets that have a credential.
    credentials: Vec<String>,
    /// Whether the file has an `approvals` section (which has an `oidc`).
    approvals: bool,
    /// The issuers of `workload_tokens`, when the file has the section.
    token_issuers: Option<Vec<String>>,
    /// The custom detectors: (name, pattern, checksum), as
    /// [`masking::resolve`] takes them.
    detectors: Vec<(String, String, Option<Checksum>)>,
    /// The presets defined in the file: (name, members).
    presets: Vec<(String, Vec<String>)>,
}

/// What the first reading learnt of a rule, for checking its action,
/// `approve`, `mask`, `limits`, `redact_prompt` and `mask_response`.
#[derive(Clone)]
struct RuleShape {
    action: Action,
    kind: RuleKind,
    /// Whether it has an `approve`.
    approve: bool,
    /// The first target it names that cannot have HTTP requests, and what
    /// that target speaks.
    not_http_target: Option<(String, Protocol)>,
}

impl Names {
    /// What the second reading needs of the first.
    fn learnt(first: FileDef) -> Names {
        let protocol = |name: &str| {
            first
                .targets
                .iter()
                .find(|t| t.name == name)
                .and_then(|t| t.protocol)
        };
        let rule_shapes = first
            .rules
            .iter()
            .map(|r| RuleShape {
                action: r.action,
                kind: r.kind(&first.targets),
                approve: r.approval.is_some(),
                not_http_target: r.targets.iter().find_map(|t| {
                    protocol(t)
                        .filter(|&p| !Protocol::speaks_http(Some(p)))
                        .map(|p| (t.clone(), p))
                }),
            })
            .collect();
        Names {
            workloads: first.workloads.iter().map(|w| w.name.clone()).collect(),
            targets: first.targets.iter().map(|t| t.name.clone()).collect(),
            target_protocols: first.targets.iter().map(|t| t.protocol).collect(),
            target_hosts: first.targets.iter().map(|t| t.host.is_some()).collect(),
            target_located: first
                .targets
                .iter()
                .map(|t| t.host.is_some() || t.address.is_some())
                .collect(),
            rules: first.rules.iter().map(|r| r.name.clone()).collect(),
            rule_shapes,
            sql_default: first.sql_default,
            http_default: first.http_default,
            credentials: first.credentials.iter().map(|(n, _)| n.clone()).collect(),
            approvals: first.approvals.is_some(),
            token_issuers: first
                .workload_tokens
                .as_ref()
                .map(|t| t.issuers.iter().map(|i| i.issuer.clone()).collect()),
            detectors: first.detectors,
            presets: first.presets,
        }
    }

    fn target_has_host(&self, name: &str) -> bool {
        self.targets
            .iter()
            .position(|n| n == name)
            .is_some_and(|i| self.target_hosts[i])
    }

    fn target_protocol(&self, name: &str) -> Option<Protocol> {
        let i = self.targets.iter().position(|n| n == name)?;
        self.target_protocols[i]
    }

    fn is_detector(&self, name: &str) -> bool {
        self.detectors.iter().any(|(n, _, _)| n == name)
    }

    fn preset(&self, name: &str) -> Option<&[String]> {
        self.presets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, members)| members.as_slice())
    }

    /// Whether a preset takes a custom detector's name. The only clash of
    /// names the first reading cannot see (detectors may come after
    /// presets); the second reports it at the preset's name.
    fn preset_takes_a_detector_name(&self) -> bool {
        self.presets.iter().any(|(p, _)| self.is_detector(p))
    }

    /// Whether `name` is something a mask or a preset may name.
    fn is_mask_name(&self, name: &str) -> bool {
        is_builtin_detector(name)
            || is_builtin_preset(name)
            || self.is_detector(name)
            || self.preset(name).is_some()
    }

    /// What a mask may name, for messages.
    fn mask_names(&self) -> String {
        let list = |names: Vec<&str>| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        let builtin_presets: Vec<String> = masking::builtin_presets()
            .iter()
            .map(|(name, members)| {
                if members.len() == masking::builtin_detector_names().len() {
                    format!("{name} (every built-in detector)")
                } else {
                    format!("{name} ({})", members.join(", "))
                }
            })
            .collect();
        format!(
            "built-in detectors: {}; built-in presets: {}; defined under detectors: {}; \
             defined under presets: {}",
            list(masking::builtin_detector_names().to_vec()),
            list(builtin_presets.iter().map(String::as_str).collect()),
            list(self.detectors.iter().map(|(n, _, _)| n.as_str()).collect()),
            list(self.presets.iter().map(|(n, _)| n.as_str()).collect()),
        )
    }

    /// The name a mask may use that is closest to `name`, if one is close:
    /// `emial` → `email`.
    fn closest_mask_name(&self, name: &str) -> Option<String> {
        let candidates = masking::builtin_detector_names()
            .iter()
            .copied()
            .chain(masking::builtin_presets().iter().map(|(n, _)| *n))
            .chain(self.detectors.iter().map(|(n, _, _)| n.as_str()))
            .chain(self.presets.iter().map(|(n, _)| n.as_str()));
        let lower = name.to_ascii_lowercase();
        candidates
            .map(|c| (edit_distance(&lower, c), c))
            .filter(|&(d, c)| d <= 2 && d < c.len())
            .min_by_key(|&(d, _)| d)
            .map(|(_, c)| c.to_string())
    }

    /// A chain of presets that comes back to where it started, reachable
    /// from `name`: `["a", "b", "a"]`. Built-in presets name only built-in
    /// detectors, so only presets of the file can make one.
    fn preset_cycle(&self, name: &str) -> Option<Vec<String>> {
        fn walk<'n>(
            names: &'n Names,
            name: &'n str,
            path: &mut Vec<&'n str>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|&p| p == name) {
                let mut cycle: Vec<String> = path[i..].iter().map(|p| p.to_string()).collect();
                cycle.push(name.to_string());
                return Some(cycle);
            }
            let members = names.preset(name)?;
            path.push(name);
            for member in members {
                if let Some(cycle) = walk(names, member, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            None
        }
        walk(self, name, &mut Vec::new())
    }
}

/// Levenshtein distance, over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn is_builtin_detector(name: &str) -> bool {
    masking::builtin_detector_names().contains(&name)
}

fn is_builtin_preset(name: &str) -> bool {
    masking::builtin_presets().iter().any(|(n, _)| *n == name)
}

/// State shared by one reading of the file.
#[derive(Default)]
struct Ctx {
    /// Known on the second reading: what the references may name.
    names: Option<Names>,
    /// How many rules have started so far.
    rules_started: Cell<usize>,
    rule_names: RefCell<Vec<String>>,
}

/// A protocol matcher of a rule's `when`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Matcher {
    Sql,
    Http,
    Llm,
    Ssh,
    Token,
}

impl Matcher {
    fn of_key(key: &str) -> Option<Matcher> {
        match key {
            "sql" => Some(Matcher::Sql),
            "http" => Some(Matcher::Http),
            "llm" => Some(Matcher::Llm),
            "ssh" => Some(Matcher::Ssh),
            "token" => Some(Matcher::Token),
            _ => None,
        }
    }

    /// "a sql matcher", for messages.
    fn a(self) -> &'static str {
        match self {
            Matcher::Sql => "a sql matcher",
            Matcher::Http => "an http matcher",
            Matcher::Llm => "an llm matcher",
            Matcher::Ssh => "an ssh matcher",
            Matcher::Token => "a token matcher",
        }
    }

    /// What the rules with it decide: "PostgreSQL statements".
    fn decides(self) -> &'static str {
        match self {
            Matcher::Sql => "PostgreSQL statements",
            Matcher::Http | Matcher::Llm | Matcher::Token => "HTTP requests",
            Matcher::Ssh => "SSH requests",
        }
    }
}

impl Ctx {
    fn current_rule(&self) -> String {
        let index = self.rules_started.get();
        if let Some(name) = self
            .names
            .as_ref()
            .and_then(|n| n.rules.get(index.wrapping_sub(1)))
        {
            return name.clone();
        }
        // On the first reading: every earlier rule had a name (or the
        // reading stopped there), so a name for each rule started means the
        // current rule's name has been read.
        let seen = self.rule_names.borrow();
        match seen.last() {
            Some(name) if seen.len() == index => name.clone(),
            _ => format!("#{index}"),
        }
    }

    /// On the second reading: what the first learnt of the current rule.
    fn shape(&self) -> Option<&RuleShape> {
        let names = self.names.as_ref()?;
        names
            .rule_shapes
            .get(self.rules_started.get().wrapping_sub(1))
    }

    /// On the second reading: the error for `matcher` in a rule naming
    /// `target`, if the target speaks another protocol (or, for `sql`, has
    /// a host, which only HTTP requests have).
    fn matcher_target_error(&self, matcher: Matcher, target: &str) -> Option<String> {
        let names = self.names.as_ref()?;
        let protocol = names.target_protocol(target);
        let rule = self.current_rule();
        let (matches, speaks, goes_with) = match matcher {
            Matcher::Sql => (
                "PostgreSQL statements",
                Protocol::speaks_sql(protocol),
                "`protocol: postgres`",
            ),
            Matcher::Http | Matcher::Token => (
                "HTTP requests",
                Protocol::speaks_http(protocol),
                "`protocol: http` or `llm`",
            ),
            Matcher::Llm => (
                "LLM API calls",
                Protocol::speaks_llm(protocol),
                "`protocol: llm`",
            ),
            Matcher::Ssh => (
                "SSH requests",
                Protocol::speaks_ssh(protocol),
                "`protocol: ssh`",
            ),
        };
        if !speaks {
            let hint = if matcher == Matcher::Llm && protocol == Some(Protocol::Http) {
                format!(" (if `{target}` is an LLM API, say `protocol: llm` on it)")
            } else {
                String::new()
            };
            return Some(format!(
                "rule `{rule}` has {}, which matches {matches}, but its target `{target}` says \
                 `protocol: {}`; {} goes with targets of {goes_with} (or `any`, or none), so \
                 name another target or split the rule{hint}",
                matcher.a(),
                protocol.map_or("", Protocol::as_str),
                matcher.a(),
            ));
        }
        if matches!(matcher, Matcher::Sql | Matcher::Ssh) && names.target_has_host(target) {
            return Some(format!(
                "rule `{rule}` has {a}, which matches {matches}, but its target `{target}` has a \
                 host, which only HTTP requests have; {a} goes with targets of address and port, \
                 so name another target or split the rule",
                a = matcher.a(),
            ));
        }
        None
    }

    /// On the second reading: the error for a `mask` on the current rule, if
    /// it is not a statement rule that allows or approves.
    fn mask_rule_error(&self) -> Option<String> {
        let shape = self.shape()?;
        let rule = self.current_rule();
        match shape.kind {
            RuleKind::Connection => Some(format!(
                "rule `{rule}` has a mask but no sql matcher, so it decides connections; mask \
                 applies to the rows a statement returns: add an sql matcher, e.g. `when: {{ \
                 ..., sql: {{ class: read }} }}`"
            )),
            RuleKind::Request => Some(format!(
                "rule `{rule}` decides HTTP requests (it has an http or llm matcher, limits, \
                 redact_prompt, mask_response, or a target with a host); mask applies to the \
                 rows a PostgreSQL statement returns: to mask what an HTTP or LLM API returns, \
                 write `mask_response:`"
            )),
            RuleKind::Ssh => Some(format!(
                "rule `{rule}` has an ssh matcher, so it decides SSH requests; mask applies to \
                 the rows a PostgreSQL statement returns, and nothing of an SSH session is \
                 masked: remove its mask"
            )),
            RuleKind::Statement if shape.action == Action::Deny => Some(format!(
                "rule `{rule}` denies, and a denied statement returns no rows to mask; mask goes \
                 with `action: allow` or `action: approve`: make the rule allow, or remove its \
                 mask"
            )),
            RuleKind::Statement => None,
        }
    }

    /// On the second reading: the error for `limits`, `redact_prompt` or
    /// `mask_response` (`key`) on the current rule, if it is not a request
    /// rule that allows or approves, with targets that can have HTTP
    /// requests.
    fn request_option_error(&self, key: &str) -> Option<String> {
        let shape = self.shape()?;
        let rule = self.current_rule();
        if shape.kind == RuleKind::Statement {
            let hint = if key == "mask_response" {
                " (to mask the rows a statement returns, write `mask:`)"
            } else {
                ""
            };
            return Some(format!(
                "rule `{rule}` has a sql matcher, so it decides PostgreSQL statements; {key} \
                 applies to HTTP requests{hint}: put it on a rule with an http or llm matcher, \
                 or split the rule"
            ));
        }
        if shape.kind == RuleKind::Ssh {
            return Some(format!(
                "rule `{rule}` has an ssh matcher, so it decides SSH requests; {key} applies to \
                 HTTP requests: put it on a rule with an http or llm matcher, or split the rule"
            ));
        }
        if shape.action == Action::Deny {
            return Some(format!(
                "rule `{rule}` denies, and {key} applies to the requests a rule allows; {key} \
                 goes with `action: allow` or `action: approve`: make the rule allow, or remove \
                 its {key}"
            ));
        }
        if let Some((target, protocol)) = &shape.not_http_target {
            return Some(format!(
                "rule `{rule}` has {key}, which applies to HTTP requests, but its target \
                 `{target}` says `protocol: {}`; name targets of `protocol: http`, `llm` or \
                 `any` (or none)",
                protocol.as_str()
            ));
        }
        None
    }

    /// On the second reading: the error for `action: approve` on the current
    /// rule, if it is a connection rule, has no `approve`, or the file has
    /// no `approvals` section.
    fn approve_action_error(&self) -> Option<String> {
        let shape = self.shape()?;
        let names = self.names.as_ref()?;
        let rule = self.current_rule();
        if shape.kind == RuleKind::Connection {
            return Some(format!(
                "rule `{rule}` has no sql, http, llm or ssh matcher, so it decides connections; \
                 approve holds one statement or request, and a connection rule decides whole \
                 connections: add an sql, http, llm or ssh matcher, e.g. `when: {{ ..., sql: {{ \
                 class: write }} }}`"
            ));
        }
        if !shape.approve {
            return Some(format!(
                "rule `{rule}` says `action: approve` but not who may approve; write `approve: \
                 {{ groups: [dba] }}` next to its action (reviewers in one of these OIDC groups \
                 approve)"
            ));
        }
        if !names.approvals {
            return Some(format!(
                "rule `{rule}` says `action: approve`, but the file has no approvals section, \
                 so nobody could approve: add an `approvals:` section with `oidc: {{ issuer, \
                 client_id }}`, the identity provider reviewers sign in with"
            ));
        }
        None
    }

    /// On the second reading: the error for an `approve` on the current
    /// rule, if it does not say `action: approve`.
    fn approve_key_error(&self) -> Option<String> {
        let shape = self.shape()?;
        let rule = self.current_rule();
        (shape.action != Action::Approve).then(|| {
            format!(
                "rule `{rule}` says `action: {}`, and approve says who releases what a rule \
                 holds; approve goes with `action: approve`: make the rule approve, or remove \
                 its approve",
                shape.action.as_str()
            )
        })
    }

    /// On the second reading: the error for a credential named `name`, if
    /// no target of that name can have HTTP requests.
    fn credential_target_error(&self, name: &str) -> Result<(), String> {
        let Some(names) = &self.names else {
            return Ok(());
        };
        let Some(index) = names.targets.iter().position(|t| t == name) else {
            let list = if names.targets.is_empty() {
                "none".to_string()
            } else {
                names.targets.join(", ")
            };
            return Err(format!(
                "credentials name target `{name}`, which is not defined under targets:; defined: \
                 {list}; a credential is keyed by the name of the target its key is sent to"
            ));
        };
        if !names.target_located[index] {
            return Err(format!(
                "credential `{name}` is for target `{name}`, which gives neither a host nor an \
                 address, so its secret would be sent to any server on its port; give the \
                 target a `host` (or an `address`)"
            ));
        }
        Ok(())
    }
}

struct FileDef {
    version: Option<u64>,
    default: DefaultAction,
    sql_default: Action,
    sql_mask: Option<MaskDef>,
    http_default: Action,
    prompt_redact: Option<DetectorsDef>,
    response_mask: Option<DetectorsDef>,
    ssh_default: Action,
    workloads: Vec<Workload>,
    targets: Vec<Target>,
    credentials: Vec<(String, CredentialDef)>,
    detectors: Vec<(String, String, Option<Checksum>)>,
    presets: Vec<(String, Vec<String>)>,
    udp_ports: Vec<u16>,
    rules: Vec<RuleDef>,
    audit: AuditSettings,
    prompts: PromptAudit,
    approvals: Option<ApprovalSettings>,
    budgets: Vec<Budget>,
    workload_tokens: Option<WorkloadTokenSettings>,
}

impl Default for FileDef {
    /// What a file that says only its version means.
    fn default() -> FileDef {
        FileDef {
            version: None,
            default: DefaultAction::Audit,
            sql_default: Action::Allow,
            sql_mask: None,
            http_default: Action::Allow,
            prompt_redact: None,
            response_mask: None,
            ssh_default: Action::Allow,
            workloads: Vec::new(),
            targets: Vec::new(),
            credentials: Vec::new(),
            detectors: Vec::new(),
            presets: Vec::new(),
            udp_ports: vec![53],
            rules: Vec::new(),
            audit: AuditSettings::default(),
            prompts: PromptAudit::default(),
            approvals: None,
            budgets: Vec::new(),
            workload_tokens: None,
        }
    }
}

struct RuleDef {
    name: String,
    workloads: Vec<String>,
    targets: Vec<String>,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    sql: Option<SqlMatcher>,
    http: Option<HttpMatcher>,
    llm: Option<LlmMatcher>,
    token: Option<TokenMatcher>,
    ssh: Option<SshMatcher>,
    action: Action,
    approval: Option<ApprovalRule>,
    mask: Option<MaskDef>,
    limits: Option<Limits>,
    redact_prompt: Option<DetectorsDef>,
    mask_response: Option<DetectorsDef>,
}

impl RuleDef {
    /// What the rule decides: with `sql`, statements, with `ssh`, SSH
    /// requests (giving either other parts too is an error); with a request
    /// part (a `token` matcher included) or a target with a host (`targets` are the file's), HTTP
    /// requests; else connections.
    fn kind(&self, targets: &[Target]) -> RuleKind {
        let host_target = self
            .targets
            .iter()
            .any(|name| targets.iter().any(|t| &t.name == name && t.host.is_some()));
        if self.sql.is_some() {
            RuleKind::Statement
        } else if self.ssh.is_some() {
            RuleKind::Ssh
        } else if self.http.is_some()
            || self.llm.is_some()
            || self.token.is_some()
            || self.limits.is_some()
            || self.redact_prompt.is_some()
            || self.mask_response.is_some()
            || host_target
        {
            RuleKind::Request
        } else {
            RuleKind::Connection
        }
    }
}

/// A `mask` or `sql_mask`: compiled on the second reading only, when the
/// detectors and presets it may name are known.
struct MaskDef {
    compiled: Option<Mask>,
}

impl FileDef {
    fn compile(self) -> Policy {
        let index = |names: &[String], name: &str| names.iter().position(|n| n == name);
        let workload_names: Vec<String> = self.workloads.iter().map(|w| w.name.clone()).collect();
        let target_names: Vec<String> = self.targets.iter().map(|t| t.name.clone()).collect();
        // The second reading has checked every name and compiled every mask.
        let rules = self
            .rules
            .into_iter()
            .map(|r| Rule {
                kind: r.kind(&self.targets),
                workloads: r
                    .workloads
                    .iter()
                    .filter_map(|n| index(&workload_names, n))
                    .collect(),
                targets: r
                    .targets
                    .iter()
                    .filter_map(|n| index(&target_names, n))
                    .collect(),
                name: r.name,
                address: r.address,
                port: r.port,
                sql: r.sql,
                http: r.http,
                llm: r.llm,
                token: r.token,
                ssh: r.ssh,
                action: r.action,
                approval: r.approval.map(Arc::new),
                mask: r.mask.and_then(|m| m.compiled),
                limits: r.limits,
                redact_prompt: r.redact_prompt.and_then(DetectorsDef::redact),
                mask_response: r.mask_response.and_then(|m| m.compiled),
            })
            .collect();
        // The second reading has read every secret, and checked that each
        // SSH target with a credential has host keys.
        let mut credentials: Vec<(usize, Arc<Credential>)> = Vec::new();
        let mut ssh_logins: Vec<(usize, Arc<SshLogin>)> = Vec::new();
        for (target, def) in self.credentials {
            let (Some(index), Some(secret)) = (index(&target_names, &target), def.secret) else {
                continue;
            };
            match def.kind {
                CredentialKind::Plain(kind) => {
                    let credential = Credential {
                        target,
                        secret,
                        kind,
                    };
                    credentials.push((index, Arc::new(credential)));
                }
                CredentialKind::Ssh { user, private_key } => {
                    let t = &self.targets[index];
                    let Some(host_keys) = t.host_keys.clone() else {
                        continue;
                    };
                    let login = SshLogin {
                        addresses: t.address.clone().unwrap_or_default(),
                        ports: t.port.clone().unwrap_or_default(),
                        target,
                        user,
                        secret: ssh::secret(secret, private_key),
                        host_keys,
                    };
                    ssh_logins.push((index, Arc::new(login)));
                }
            }
        }
        credentials.sort_by_key(|(index, _)| *index);
        ssh_logins.sort_by_key(|(index, _)| *index);
        Policy {
            version: self.version.unwrap_or(SUPPORTED_VERSION) as u32,
            default: self.default,
            workloads: self.workloads,
            targets: self.targets,
            rules,
            sql_default: self.sql_default,
            sql_mask: self.sql_mask.and_then(|m| m.compiled),
            http_default: self.http_default,
            prompt_redact: self.prompt_redact.and_then(DetectorsDef::redact),
            response_mask: self.response_mask.and_then(|m| m.compiled),
            credentials,
            ssh_default: self.ssh_default,
            ssh_logins,
            udp_ports: self.udp_ports,
            audit: self.audit,
            prompts: self.prompts,
            approvals: self.approvals,
            budgets: self.budgets,
            workload_tokens: self.workload_tokens,
        }
    }
}

// ---------------------------------------------------------------------------
// Mappings

/// One kind of mapping of known keys: its state while it is read, what each
/// key's value does to it, and what it makes at the end. [`Mapping`] reads
/// it, with the checks every mapping gets (unknown keys, keys given twice).
trait Keys<'de>: Sized {
    type Value;

    /// The keys it takes.
    fn fields(&self) -> &'static Fields;

    /// What it is, for serde's "invalid type" messages: "a target: a
    /// mapping with ...".
    fn expecting(&self) -> String;

    /// Called once, before the first key.
    fn start(&mut self) {}

    /// A check of a known key against what the mapping said before it (or
    /// what the first reading learnt); an error is put at the key.
    fn check(&self, _key: &'static str) -> Result<(), String> {
        Ok(())
    }

    /// Reads the value of a known key.
    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error>;

    /// What the mapping says; an error here is about the whole mapping, and
    /// points at its first key.
    fn finish<E: de::Error>(self) -> Result<Self::Value, E>;
}

/// Reads a mapping of [`Keys`].
struct Mapping<K>(K);

impl<'de, K: Keys<'de>> DeserializeSeed<'de> for Mapping<K> {
    type Value = K::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<K::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, K: Keys<'de>> Visitor<'de> for Mapping<K> {
    type Value = K::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0.expecting())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<K::Value, A::Error> {
        let mut keys = self.0;
        keys.start();
        let mut seen = Vec::new();
        loop {
            let check = |key| keys.check(key);
            let key = map.next_key_seed(FieldKey {
                fields: keys.fields(),
                seen: &mut seen,
                check: &check,
            })?;
            let Some(key) = key else { break };
            keys.value(key, &mut map)?;
        }
        keys.finish()
    }
}

struct FieldKey<'a> {
    fields: &'static Fields,
    seen: &'a mut Vec<&'static str>,
    /// A check of a known key against what the mapping said before it; an
    /// error is put at the key.
    check: &'a dyn Fn(&'static str) -> Result<(), String>,
}

impl<'de> DeserializeSeed<'de> for FieldKey<'_> {
    type Value = &'static str;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldKey<'_> {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a key {}: {}",
            self.fields.what,
            self.fields.known.join(", ")
        )
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        let Fields {
            what, known, later, ..
        } = self.fields;
        if let Some(&k) = known.iter().find(|&&k| k == key) {
            if self.seen.contains(&k) {
                return Err(fail(format!("`{key}` is given twice {what}; keep one")));
            }
            (self.check)(k).map_err(fail)?;
            self.seen.push(k);
            return Ok(k);
        }
        let expected = known.join(", ");
        if let Some((_, hint)) = self.fields.instead.iter().find(|(k, _)| *k == key) {
            return Err(fail(format!(
                "unknown field `{key}` {what} ({hint}); expected one of: {expected}"
            )));
        }
        if let Some((_, feature)) = later.iter().find(|(k, _)| *k == key) {
            return Err(fail(format!(
                "`{key}` {what} is not supported yet in policy v0 (a later version adds \
                 {feature}); expected one of: {expected}"
            )));
        }
        Err(fail(format!(
            "unknown field `{key}` {what}; expected one of: {expected}"
        )))
    }
}

struct FileKeys<'c> {
    ctx: &'c Ctx,
    file: FileDef,
}

impl<'de> Keys<'de> for FileKeys<'_> {
    type Value = FileDef;

    fn fields(&self) -> &'static Fields {
        &TOP
    }

    fn expecting(&self) -> String {
        "a policy: a mapping with version, default, workloads, targets, udp, rules, audit".into()
    }

    /// `sql_mask` with `sql_default: deny`, `prompt_redact` or
    /// `response_mask` with `http_default: deny`, wherever each is: at the
    /// mask.
    fn check(&self, key: &'static str) -> Result<(), String> {
        let Some(names) = &self.ctx.names else {
            return Ok(());
        };
        match key {
            "sql_mask" if names.sql_default == Action::Deny => Err(
                "sql_mask masks the rows of statements no rule matches, but `sql_default: deny` \
                 refuses those statements; remove sql_mask, or write `sql_default: allow`"
                    .to_string(),
            ),
            "prompt_redact" | "response_mask" if names.http_default == Action::Deny => {
                Err(format!(
                    "{key} applies to the HTTP requests no rule matches, but `http_default: \
                     deny` refuses those requests; remove {key}, or write `http_default: allow`"
                ))
            }
            _ => Ok(()),
        }
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let (ctx, file) = (self.ctx, &mut self.file);
        match key {
            "version" => file.version = Some(map.next_value_seed(One(VersionP))?),
            "default" => file.default = map.next_value_seed(One(DefaultP))?,
            "sql_default" => file.sql_default = map.next_value_seed(One(SqlDefaultP))?,
            "sql_mask" => {
                file.sql_mask = Some(map.next_value_seed(Mapping(MaskKeys::new(ctx, "sql_mask")))?)
            }
            "http_default" => file.http_default = map.next_value_seed(One(HttpDefaultP))?,
            "ssh_default" => file.ssh_default = map.next_value_seed(One(SshDefaultP))?,
            "prompt_redact" => {
                file.prompt_redact =
                    Some(map.next_value_seed(DetectorsSeed::top(ctx, "prompt_redact"))?)
            }
            "response_mask" => {
                file.response_mask =
                    Some(map.next_value_seed(DetectorsSeed::top(ctx, "response_mask"))?)
            }
            "workloads" => {
                file.workloads = map
                    .next_value_seed(NamedMap {
                        kind: "workload",
                        section: "workloads",
                        seed: |_: &str| Mapping(WorkloadKeys::default()),
                        reserved: &|_| Ok(()),
                    })?
                    .into_iter()
                    .map(|(name, (selector, owners))| Workload {
                        name,
                        selector,
                        owners,
                    })
                    .collect()
            }
            "targets" => {
                file.targets = map
                    .next_value_seed(NamedMap {
                        kind: "target",
                        section: "targets",
                        seed: |name: &str| Mapping(TargetKeys::new(ctx, name)),
                        reserved: &|_| Ok(()),
                    })?
                    .into_iter()
                    .map(|(name, target)| Target { name, ..target })
                    .collect()
            }
            "credentials" => {
                file.credentials = map.next_value_seed(NamedMap {
                    kind: "credential",
                    section: "credentials",
                    seed: |name: &str| Mapping(CredentialKeys::new(ctx, name)),
                    reserved: &|name| ctx.credential_target_error(name),
                })?
            }
            "detectors" => {
                file.detectors = map
                    .next_value_seed(NamedMap {
                        kind: "detector",
                        section: "detectors",
                        seed: |name: &str| {
                            Mapping(DetectorKeys {
                                name: name.to_string(),
                                pattern: None,
                                checksum: None,
                            })
                        },
                        reserved: &reserved_detector_name,
                    })?
                    .into_iter()
                    .map(|(name, (pattern, checksum))| (name, pattern, checksum))
                    .collect()
            }
            "presets" => {
                let reserved = |name: &str| reserved_preset_name(ctx, name);
                file.presets = map.next_value_seed(NamedMap {
                    kind: "preset",
                    section: "presets",
                    seed: |name: &str| PresetSeed {
                        ctx,
                        name: name.to_string(),
                    },
                    reserved: &reserved,
                })?
            }
            "udp" => file.udp_ports = map.next_value_seed(Mapping(UdpKeys(vec![53])))?,
            "rules" => file.rules = map.next_value_seed(RulesSeed { ctx })?,
            "audit" => {
                (file.audit, file.prompts) =
                    map.next_value_seed(Mapping(AuditKeys(Default::default())))?
            }
            "approvals" => {
                file.approvals = Some(map.next_value_seed(Mapping(ApprovalsKeys::new(ctx)))?)
            }
            "budgets" => {
                let reserved = |name: &str| budget::workload_error(ctx, name);
                file.budgets = map
                    .next_value_seed(NamedMap {
                        kind: "budget",
                        section: "budgets",
                        seed: |name: &str| Mapping(BudgetKeys::new(name)),
                        reserved: &reserved,
                    })?
                    .into_iter()
                    .map(|(_, budget)| budget)
                    .collect()
            }
            "workload_tokens" => {
                file.workload_tokens =
                    Some(map.next_value_seed(Mapping(WorkloadTokensKeys::default()))?)
            }
            _ => unreachable!("{key} is in TOP.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<FileDef, E> {
        if self.file.version.is_none() {
            return Err(fail(format!(
                "the policy does not say its version; write `version: {SUPPORTED_VERSION}` as its first line"
            )));
        }
        Ok(self.file)
    }
}

/// A mapping from names to definitions, in file order (workloads, targets,
/// detectors, presets).
struct NamedMap<'r, F> {
    kind: &'static str,
    section: &'static str,
    /// The seed that reads the definition of a name.
    seed: F,
    /// Refuses names that are taken by something else.
    reserved: &'r dyn Fn(&str) -> Result<(), String>,
}

impl<'de, F, S> DeserializeSeed<'de> for NamedMap<'_, F>
where
    F: Fn(&str) -> S,
    S: DeserializeSeed<'de>,
{
    type Value = Vec<(String, S::Value)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F, S> Visitor<'de> for NamedMap<'_, F>
where
    F: Fn(&str) -> S,
    S: DeserializeSeed<'de>,
{
    type Value = Vec<(String, S::Value)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a mapping of {} names to their definitions", self.kind)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(String, S::Value)> = Vec::new();
        let mut names = Vec::new();
        while let Some(name) = map.next_key_seed(NameKey {
            kind: self.kind,
            section: self.section,
            seen: &mut names,
            reserved: self.reserved,
        })? {
            let value = map.next_value_seed((self.seed)(&name))?;
            out.push((name, value));
        }
        Ok(out)
    }
}

struct NameKey<'a> {
    kind: &'static str,
    section: &'static str,
    seen: &'a mut Vec<String>,
    reserved: &'a dyn Fn(&str) -> Result<(), String>,
}

impl<'de> DeserializeSeed<'de> for NameKey<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameKey<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} name", self.kind)
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<String, E> {
        check_name(self.kind, name).map_err(fail)?;
        (self.reserved)(name).map_err(fail)?;
        if self.seen.iter().any(|n| n == name) {
            return Err(fail(format!(
                "{} `{name}` is defined twice under {}:; give each its own name",
                self.kind, self.section
            )));
        }
        self.seen.push(name.to_string());
        Ok(name.to_string())
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<String, E> {
        self.visit_str(&n.to_string())
    }
}

/// Names of workloads, targets and rules go into the audit and into other
/// rules: letters, digits, `-` and `_`, starting with a letter or digit.
fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = name.len() <= 100
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} is not allowed; a name is letters, digits, `-` and `_`, \
             starting with a letter or digit (e.g. support-bot)"
        ))
    }
}

/// A workload: its `match`, and its `owners`.
#[derive(Default)]
struct WorkloadKeys {
    selector: Option<Selector>,
    owners: Vec<String>,
}

impl<'de> Keys<'de> for WorkloadKeys {
    type Value = (Selector, Vec<String>);

    fn fields(&self) -> &'static Fields {
        &WORKLOAD
    }

    fn expecting(&self) -> String {
        "a workload: a mapping with match, and optionally owners".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "match" => self.selector = Some(map.next_value_seed(Mapping(MatchKeys::default()))?),
            "owners" => self.owners = map.next_value_seed(Many::new(OwnerP, "owner"))?,
            _ => unreachable!("{key} is in WORKLOAD.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Self::Value, E> {
        let selector = self.selector.ok_or_else(|| {
            fail(
                "a workload needs a match; write e.g. `match: { unit: \"support-bot.service\" }` \
                 or `match: { uid: [1000] }`",
            )
        })?;
        Ok((selector, self.owners))
    }
}

#[derive(Default)]
struct MatchKeys(Selector);

impl<'de> Keys<'de> for MatchKeys {
    type Value = Selector;

    fn fields(&self) -> &'static Fields {
        &MATCH
    }

    fn expecting(&self) -> String {
        format!("a match: a mapping with some of {}", MATCH.known.join(", "))
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let s = &mut self.0;
        match key {
            "uid" => s.uid = Some(map.next_value_seed(Many::new(UidP, "uid"))?),
            "user" => s.user = Some(map.next_value_seed(Many::new(UserP, "user name"))?),
            "exe" => s.exe = Some(map.next_value_seed(Many::new(GlobP(EXE_EXAMPLE), "exe"))?),
            "comm" => s.comm = Some(map.next_value_seed(Many::new(GlobP(COMM_EXAMPLE), "comm"))?),
            "unit" => s.unit = Some(map.next_value_seed(Many::new(GlobP(UNIT_EXAMPLE), "unit"))?),
            "cgroup" => {
                s.cgroup = Some(map.next_value_seed(Many::new(GlobP(CGROUP_EXAMPLE), "cgroup"))?)
            }
            "container" => {
                s.container = Some(map.next_value_seed(Many::new(ContainerP, "container id"))?)
            }
            "namespace" => {
                s.namespace =
                    Some(map.next_value_seed(Many::new(GlobP(NAMESPACE_EXAMPLE), "namespace"))?)
            }
            "service_account" => {
                s.service_account = Some(map.next_value_seed(Many::new(
                    GlobP(SERVICE_ACCOUNT_EXAMPLE),
                    "service account",
                ))?)
            }
            _ => unreachable!("{key} is in MATCH.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Selector, E> {
        if self.0.is_empty() {
            return Err(fail(format!(
                "a workload's match is empty, which would match every process; give at least one \
                 of: {}",
                MATCH.known.join(", ")
            )));
        }
        Ok(self.0)
    }
}

const EXE_EXAMPLE: &str = "\"/usr/bin/python3*\"";
const COMM_EXAMPLE: &str = "\"python3*\"";
const UNIT_EXAMPLE: &str = "\"support-bot.service\"";
const CGROUP_EXAMPLE: &str = "\"/system.slice/support-bot.service\"";
const NAMESPACE_EXAMPLE: &str = "\"ai-*\"";
const SERVICE_ACCOUNT_EXAMPLE: &str = "\"support-bot\"";

struct TargetKeys<'c> {
    ctx: &'c Ctx,
    /// Named already, for messages.
    target: Target,
}

impl<'c> TargetKeys<'c> {
    fn new(ctx: &'c Ctx, name: &str) -> TargetKeys<'c> {
        TargetKeys {
            ctx,
            target: Target {
                name: name.to_string(),
                ..Target::default()
            },
        }
    }
}

impl<'de> Keys<'de> for TargetKeys<'_> {
    type Value = Target;

    fn fields(&self) -> &'static Fields {
        &TARGET
    }

    fn expecting(&self) -> String {
        "a target: a mapping with address, port and/or host, and optionally protocol".into()
    }

    /// `host` after a `protocol` that has no HTTP requests, `host_keys` or
    /// `known_hosts` after a protocol other than `ssh` or after the other:
    /// at the key. (`protocol` after them: at the protocol, by ProtocolP.)
    fn check(&self, key: &'static str) -> Result<(), String> {
        let t = &self.target;
        match (key, t.protocol) {
            ("host", Some(protocol)) => ProtocolP {
                host: true,
                host_keys: None,
            }
            .host_error(protocol)
            .map_or(Ok(()), Err),
            ("host_keys" | "known_hosts", protocol) => {
                if let Some(first) = t.host_keys.as_ref().map(ssh::host_keys_key) {
                    return Err(ssh::both_host_key_sources(&t.name, first, key));
                }
                match protocol {
                    Some(p) if p != Protocol::Ssh => Err(ssh::host_keys_protocol_error(key, p)),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let t = &mut self.target;
        match key {
            "address" => t.address = Some(map.next_value_seed(Many::new(AddressP, "address"))?),
            "port" => t.port = Some(map.next_value_seed(Many::new(PortP, "port"))?),
            "host" => t.host = Some(map.next_value_seed(Many::new(HostP, "host"))?),
            "protocol" => t.protocol = Some(map.next_value_seed(One(ProtocolP::with(t)))?),
            "tls" => t.tls = map.next_value_seed(One(UpstreamTlsP))?,
            "tls_name" => t.tls_name = Some(map.next_value_seed(One(TlsNameP))?),
            "host_keys" => {
                let keys = map.next_value_seed(Many::new(HostKeyP, "host key"))?;
                t.host_keys = Some(UpstreamHostKeys::Keys(keys))
            }
            "known_hosts" => {
                let file = map.next_value_seed(One(KnownHostsP))?;
                t.host_keys = Some(UpstreamHostKeys::KnownHosts(file))
            }
            _ => unreachable!("{key} is in TARGET.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Target, E> {
        let t = &self.target;
        if t.address.is_none() && t.port.is_none() && t.host.is_none() {
            return Err(fail(
                "a target needs an address, a port or a host; write e.g. `{ address: \
                 \"10.0.0.0/8\", port: 5432 }` or `{ host: api.openai.com }`",
            ));
        }
        if t.tls && t.protocol != Some(Protocol::Postgres) {
            return Err(fail(
                "`tls: verify` is for `protocol: postgres` targets, whose TLS starts inside the \
                 protocol; for HTTPS the agent uses TLS to the server whenever the client does",
            ));
        }
        if t.tls_name.is_some() && !t.tls {
            return Err(fail(
                "`tls_name` is the name the agent checks the server's certificate against; it \
                 goes with `tls: verify`",
            ));
        }
        if let Some(key) = t.host_keys.as_ref().map(ssh::host_keys_key)
            && t.protocol.is_none()
        {
            return Err(fail(ssh::host_keys_without_protocol(&t.name, key)));
        }
        // On the second reading, when the credentials are known.
        if t.protocol == Some(Protocol::Ssh)
            && t.host_keys.is_none()
            && let Some(names) = &self.ctx.names
            && names.credentials.contains(&t.name)
        {
            return Err(fail(ssh::missing_host_keys(&t.name)));
        }
        Ok(self.target)
    }
}

/// `udp`: the allowed ports, sorted.
struct UdpKeys(Vec<u16>);

impl<'de> Keys<'de> for UdpKeys {
    type Value = Vec<u16>;

    fn fields(&self) -> &'static Fields {
        &UDP
    }

    fn expecting(&self) -> String {
        "a mapping with allow_ports".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "allow_ports" => {
                let mut seed = Many::new(UdpPortP, "port");
                seed.allow_empty = true;
                let mut list = map.next_value_seed(seed)?;
                list.sort_unstable();
                list.dedup();
                if list.len() > MAX_UDP_PORTS {
                    return Err(fail(format!(
                        "udp allow_ports lists {} ports; the kernel's map holds at most \
                         {MAX_UDP_PORTS}",
                        list.len()
                    )));
                }
                self.0 = list;
            }
            _ => unreachable!("{key} is in UDP.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Vec<u16>, E> {
        Ok(self.0)
    }
}

struct AuditKeys((AuditSettings, PromptAudit));

impl<'de> Keys<'de> for AuditKeys {
    type Value = (AuditSettings, PromptAudit);

    fn fields(&self) -> &'static Fields {
        &AUDIT
    }

    fn expecting(&self) -> String {
        "a mapping with some of dir, rotate, retention, prompts, on_failure".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let (audit, prompts) = &mut self.0;
        match key {
            "dir" => audit.dir = Some(map.next_value_seed(One(DirP))?),
            "rotate" => audit.rotate = Some(map.next_value_seed(One(DurationP))?),
            "retention" => audit.retention = Some(map.next_value_seed(One(DurationP))?),
            "prompts" => *prompts = map.next_value_seed(One(PromptsP))?,
            "on_failure" => audit.on_failure = map.next_value_seed(One(OnFailureP))?,
            _ => unreachable!("{key} is in AUDIT.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0)
    }
}

struct RulesSeed<'c> {
    ctx: &'c Ctx,
}

impl<'de> DeserializeSeed<'de> for RulesSeed<'_> {
    type Value = Vec<RuleDef>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<RuleDef>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RulesSeed<'_> {
    type Value = Vec<RuleDef>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of rules, each `- name: ..., when: ..., action: ...`")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RuleDef>, A::Error> {
        let mut rules = Vec::new();
        while let Some(rule) = seq.next_element_seed(Mapping(RuleKeys::new(self.ctx)))? {
            rules.push(rule);
        }
        Ok(rules)
    }
}

struct RuleKeys<'c> {
    ctx: &'c Ctx,
    name: Option<String>,
    when: Option<WhenDef>,
    action: Option<Action>,
    approval: Option<ApprovalRule>,
    mask: Option<MaskDef>,
    limits: Option<Limits>,
    redact_prompt: Option<DetectorsDef>,
    mask_response: Option<DetectorsDef>,
}

impl<'c> RuleKeys<'c> {
    fn new(ctx: &'c Ctx) -> RuleKeys<'c> {
        RuleKeys {
            ctx,
            name: None,
            when: None,
            action: None,
            approval: None,
            mask: None,
            limits: None,
            redact_prompt: None,
            mask_response: None,
        }
    }
}

impl<'de> Keys<'de> for RuleKeys<'_> {
    type Value = RuleDef;

    fn fields(&self) -> &'static Fields {
        &RULE
    }

    fn expecting(&self) -> String {
        "a rule: a mapping with name, when and action".into()
    }

    fn start(&mut self) {
        self.ctx.rules_started.set(self.ctx.rules_started.get() + 1);
    }

    /// `mask` on a rule that is not a statement rule, or that denies,
    /// `limits`, `redact_prompt`, `mask_response` on a rule that is not a
    /// request rule, or that denies, and `approve` on a rule that does not
    /// approve: at the key, wherever `when` and `action` are (the first
    /// reading learnt them). (`action: approve` where it may not be: at the
    /// action, by ActionP.)
    fn check(&self, key: &'static str) -> Result<(), String> {
        let error = match key {
            "approve" => self.ctx.approve_key_error(),
            "mask" => self.ctx.mask_rule_error(),
            "limits" | "redact_prompt" | "mask_response" => self.ctx.request_option_error(key),
            _ => None,
        };
        error.map_or(Ok(()), Err)
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        match key {
            "name" => self.name = Some(map.next_value_seed(One(RuleNameP { ctx }))?),
            "when" => self.when = Some(map.next_value_seed(Mapping(WhenKeys::new(ctx)))?),
            "action" => self.action = Some(map.next_value_seed(One(ActionP { ctx }))?),
            "approve" => self.approval = Some(map.next_value_seed(Mapping(ApproveKeys::new(ctx)))?),
            "mask" => self.mask = Some(map.next_value_seed(Mapping(MaskKeys::new(ctx, "rule")))?),
            "limits" => self.limits = Some(map.next_value_seed(Mapping(LimitsKeys::new(ctx)))?),
            "redact_prompt" => {
                self.redact_prompt =
                    Some(map.next_value_seed(DetectorsSeed::rule(ctx, "redact_prompt"))?)
            }
            "mask_response" => {
                self.mask_response =
                    Some(map.next_value_seed(DetectorsSeed::rule(ctx, "mask_response"))?)
            }
            _ => unreachable!("{key} is in RULE.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<RuleDef, E> {
        let index = self.ctx.rules_started.get();
        let Some(name) = self.name else {
            return Err(fail(format!(
                "rule #{index} has no name; write e.g. `name: no-cloud-metadata` (the audit \
                 records which rule decided)"
            )));
        };
        let Some(action) = self.action else {
            return Err(fail(format!(
                "rule `{name}` has no action; write `action: allow`, `action: deny` or `action: \
                 approve`"
            )));
        };
        let when = self.when.unwrap_or_default();
        Ok(RuleDef {
            name,
            workloads: when.workloads,
            targets: when.targets,
            address: when.address,
            port: when.port,
            sql: when.sql,
            http: when.http,
            llm: when.llm,
            token: when.token,
            ssh: when.ssh,
            action,
            approval: self.approval,
            mask: self.mask,
            limits: self.limits,
            redact_prompt: self.redact_prompt,
            mask_response: self.mask_response,
        })
    }
}

#[derive(Default)]
struct WhenDef {
    workloads: Vec<String>,
    targets: Vec<String>,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    sql: Option<SqlMatcher>,
    http: Option<HttpMatcher>,
    llm: Option<LlmMatcher>,
    ssh: Option<SshMatcher>,
    token: Option<TokenMatcher>,
}

impl WhenDef {
    /// The protocol matchers read so far.
    fn matchers(&self) -> Vec<Matcher> {
        [
            (self.sql.is_some(), Matcher::Sql),
            (self.http.is_some(), Matcher::Http),
            (self.llm.is_some(), Matcher::Llm),
            (self.ssh.is_some(), Matcher::Ssh),
            (self.token.is_some(), Matcher::Token),
        ]
        .into_iter()
        .filter_map(|(given, m)| given.then_some(m))
        .collect()
    }
}

struct WhenKeys<'c> {
    ctx: &'c Ctx,
    when: WhenDef,
}

impl<'c> WhenKeys<'c> {
    fn new(ctx: &'c Ctx) -> WhenKeys<'c> {
        WhenKeys {
            ctx,
            when: WhenDef::default(),
        }
    }
}

impl<'de> Keys<'de> for WhenKeys<'_> {
    type Value = WhenDef;

    fn fields(&self) -> &'static Fields {
        &WHEN
    }

    fn expecting(&self) -> String {
        format!("a when: a mapping with some of {}", WHEN.known.join(", "))
    }

    /// A protocol matcher after a target that does not speak its protocol,
    /// and `sql`, `ssh` and `http` or `llm` together: at the matcher's
    /// key. (`target` after a matcher: at the target's name, by RefP.)
    fn check(&self, key: &'static str) -> Result<(), String> {
        let Some(matcher) = Matcher::of_key(key) else {
            return Ok(());
        };
        if matcher == Matcher::Token
            && let Some(names) = &self.ctx.names
            && names.token_issuers.is_none()
        {
            return Err(format!(
                "rule `{}` has a token matcher, but the file trusts no issuer of workload tokens,                  so no request would carry a valid one: add a `workload_tokens:` section with                  `issuers: [{{ issuer: https://..., audience: warden }}]`",
                self.ctx.current_rule()
            ));
        }
        let before = self.when.matchers();
        let apart = |other: &&Matcher| other.decides() != matcher.decides();
        if let Some(&other) = before.iter().find(apart)
            && (matcher == Matcher::Ssh || other == Matcher::Ssh)
        {
            return Err(format!(
                "rule `{}` has {} and {} in one when; {} decides {} and {} {}, so nothing can \
                 meet both: split the rule in two",
                self.ctx.current_rule(),
                other.a(),
                matcher.a(),
                other.a(),
                other.decides(),
                matcher.a(),
                matcher.decides(),
            ));
        }
        if let Some(&other) = before.iter().find(apart) {
            let (sql, http) = if matcher == Matcher::Sql {
                (matcher, other)
            } else {
                (other, matcher)
            };
            return Err(format!(
                "rule `{}` has {} and {} in one when; {} decides PostgreSQL statements and {} \
                 HTTP requests, so no request or statement can meet both: split the rule in two",
                self.ctx.current_rule(),
                sql.a(),
                http.a(),
                sql.a(),
                http.a(),
            ));
        }
        self.when
            .targets
            .iter()
            .find_map(|t| self.ctx.matcher_target_error(matcher, t))
            .map_or(Ok(()), Err)
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let (ctx, w) = (self.ctx, &mut self.when);
        match key {
            "workload" => {
                let workload = RefP {
                    ctx,
                    kind: RefKind::Workload,
                    matchers: &[],
                };
                w.workloads = map.next_value_seed(Many::new(workload, "workload name"))?
            }
            "target" => {
                let matchers = w.matchers();
                let target = RefP {
                    ctx,
                    kind: RefKind::Target,
                    matchers: &matchers,
                };
                w.targets = map.next_value_seed(Many::new(target, "target name"))?
            }
            "address" => w.address = Some(map.next_value_seed(Many::new(AddressP, "address"))?),
            "port" => w.port = Some(map.next_value_seed(Many::new(PortP, "port"))?),
            "sql" => w.sql = Some(map.next_value_seed(Mapping(SqlKeys::default()))?),
            "http" => w.http = Some(map.next_value_seed(Mapping(HttpKeys::default()))?),
            "llm" => w.llm = Some(map.next_value_seed(Mapping(LlmKeys::default()))?),
            "ssh" => w.ssh = Some(map.next_value_seed(Mapping(SshKeys::default()))?),
            "token" => w.token = Some(map.next_value_seed(Mapping(TokenKeys::new(ctx)))?),
            _ => unreachable!("{key} is in WHEN.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<WhenDef, E> {
        Ok(self.when)
    }
}

/// A rule's `sql` matcher.
#[derive(Default)]
struct SqlKeys(SqlMatcher);

impl<'de> Keys<'de> for SqlKeys {
    type Value = SqlMatcher;

    fn fields(&self) -> &'static Fields {
        &SQL
    }

    fn expecting(&self) -> String {
        format!(
            "a sql matcher: a mapping with some of {}",
            SQL.known.join(", ")
        )
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let m = &mut self.0;
        match key {
            "class" => m.class = Some(map.next_value_seed(Many::new(ClassP, "class"))?),
            "tables" => {
                m.tables = Some(map.next_value_seed(Many::new(NameGlobP(TABLES_EXAMPLE), "table"))?)
            }
            "functions" => {
                m.functions =
                    Some(map.next_value_seed(Many::new(NameGlobP(FUNCTIONS_EXAMPLE), "function"))?)
            }
            "database" => {
                m.database =
                    Some(map.next_value_seed(Many::new(GlobP(DATABASE_EXAMPLE), "database"))?)
            }
            "user" => {
                m.user = Some(map.next_value_seed(Many::new(GlobP(DB_USER_EXAMPLE), "user"))?)
            }
            "from_llm" => m.from_llm = Some(map.next_value_seed(Flag("from_llm"))?),
            _ => unreachable!("{key} is in SQL.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<SqlMatcher, E> {
        Ok(self.0)
    }
}

// ---------------------------------------------------------------------------
// Masking: detectors, presets, masks

/// The longest name of a detector or preset: findings are replaced by
/// `[REDACTED:<name>]`.
const MAX_MASK_NAME: usize = 64;

fn check_mask_name_length(kind: &str, name: &str) -> Result<(), String> {
    if name.len() > MAX_MASK_NAME {
        return Err(format!(
            "{kind} name `{name}` is longer than {MAX_MASK_NAME} characters; pick a shorter one"
        ));
    }
    Ok(())
}

/// A custom detector may not take the name of a built-in detector or preset.
fn reserved_detector_name(name: &str) -> Result<(), String> {
    check_mask_name_length("detector", name)?;
    if is_builtin_detector(name) {
        return Err(format!(
            "`{name}` is a built-in detector; a detector defined here needs a name of its own \
             (e.g. {name}_strict), so a mask always means what its names say"
        ));
    }
    if is_builtin_preset(name) {
        return Err(format!(
            "`{name}` is a built-in preset; a detector defined here needs a name of its own"
        ));
    }
    Ok(())
}

/// A preset may not take the name of a detector (built-in or defined here)
/// or of a built-in preset.
fn reserved_preset_name(ctx: &Ctx, name: &str) -> Result<(), String> {
    check_mask_name_length("preset", name)?;
    if is_builtin_detector(name) {
        return Err(format!(
            "`{name}` is a built-in detector; a preset needs a name of its own"
        ));
    }
    if is_builtin_preset(name) {
        return Err(format!(
            "`{name}` is a built-in preset ({}); name yours differently, and list `{name}` in \
             it to build on it",
            builtin_preset_members(name)
        ));
    }
    if ctx.names.as_ref().is_some_and(|n| n.is_detector(name)) {
        return Err(format!(
            "`{name}` is defined under detectors:; a preset needs a name of its own"
        ));
    }
    Ok(())
}

fn builtin_preset_members(name: &str) -> String {
    masking::builtin_presets()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, members)| members.join(", "))
        .unwrap_or_default()
}

/// A custom detector: (pattern, checksum).
struct DetectorKeys {
    name: String,
    pattern: Option<String>,
    checksum: Option<Checksum>,
}

impl<'de> Keys<'de> for DetectorKeys {
    type Value = (String, Option<Checksum>);

    fn fields(&self) -> &'static Fields {
        &DETECTOR
    }

    fn expecting(&self) -> String {
        "a detector: a mapping with pattern, and optionally checksum".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let name = &self.name;
        match key {
            "pattern" => self.pattern = Some(map.next_value_seed(One(PatternP { name }))?),
            "checksum" => self.checksum = Some(map.next_value_seed(One(ChecksumP))?),
            _ => unreachable!("{key} is in DETECTOR.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Self::Value, E> {
        let name = &self.name;
        let Some(pattern) = self.pattern else {
            return Err(fail(format!(
                "detector `{name}` has no pattern; write e.g. `{name}: {{ pattern: 'EMP-\\d{{6}}' }}` \
                 (a regular expression)"
            )));
        };
        // The pattern alone was checked at its place; with its checksum,
        // here.
        if self.checksum.is_some() {
            detector_masker(name, &pattern, self.checksum).map_err(fail)?;
        }
        Ok((pattern, self.checksum))
    }
}

/// Builds a masker of one custom detector, which checks it as the masking
/// module will use it.
fn detector_masker(name: &str, pattern: &str, checksum: Option<Checksum>) -> Result<(), String> {
    let spec = DetectorSpec::Custom {
        name: name.to_string(),
        pattern: pattern.to_string(),
        checksum,
    };
    // The masking module's messages name the detector.
    Masker::new(&[], &[spec])
        .map(drop)
        .map_err(|e| e.to_string())
}

#[derive(Clone, Copy)]
struct PatternP<'n> {
    name: &'n str,
}

impl Parse for PatternP<'_> {
    type Out = String;
    fn expecting(&self) -> String {
        "a regular expression such as 'EMP-\\d{6}'".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() {
            return Err(format!(
                "detector `{}` has an empty pattern, which would match everywhere; write a \
                 regular expression such as 'EMP-\\d{{6}}'",
                self.name
            ));
        }
        detector_masker(self.name, s, None)?;
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

#[derive(Clone, Copy)]
struct ChecksumP;

impl Parse for ChecksumP {
    type Out = Checksum;
    fn expecting(&self) -> String {
        "a checksum: luhn or mod97".into()
    }
    fn text(&self, s: &str) -> Result<Checksum, String> {
        s.parse::<Checksum>().map_err(|_| {
            format!(
                "{s:?} is not a checksum; write `checksum: luhn` (card numbers) or `checksum: \
                 mod97` (IBANs), or leave it out"
            )
        })
    }
    fn int(&self, n: i128) -> Result<Checksum, String> {
        self.text(&n.to_string())
    }
}

/// A preset's list of detector and preset names.
struct PresetSeed<'c> {
    ctx: &'c Ctx,
    name: String,
}

impl<'de> DeserializeSeed<'de> for PresetSeed<'_> {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        let owner = format!("preset `{}`", self.name);
        d.deserialize_any(Many::new(
            MaskNameP {
                ctx: self.ctx,
                owner: &owner,
            },
            "detector or preset name",
        ))
    }
}

/// A `mask` or `sql_mask`: `{ columns: [globs], detectors: [names] }`.
struct MaskKeys<'c> {
    ctx: &'c Ctx,
    /// "rule `r`" or "sql_mask".
    owner: String,
    columns: Option<Vec<String>>,
    detectors: Option<Vec<String>>,
}

impl<'c> MaskKeys<'c> {
    /// `owner`: "rule" (the current one) or "sql_mask".
    fn new(ctx: &'c Ctx, owner: &str) -> MaskKeys<'c> {
        MaskKeys {
            ctx,
            owner: match owner {
                "rule" => format!("rule `{}`", ctx.current_rule()),
                other => other.to_string(),
            },
            columns: None,
            detectors: None,
        }
    }
}

impl<'de> Keys<'de> for MaskKeys<'_> {
    type Value = MaskDef;

    fn fields(&self) -> &'static Fields {
        &MASK
    }

    fn expecting(&self) -> String {
        "a mask: a mapping with columns and/or detectors".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "columns" => self.columns = Some(map.next_value_seed(Many::new(ColumnP, "column"))?),
            "detectors" => {
                let names = MaskNameP {
                    ctx: self.ctx,
                    owner: &self.owner,
                };
                self.detectors =
                    Some(map.next_value_seed(Many::new(names, "detector or preset name"))?)
            }
            _ => unreachable!("{key} is in MASK.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<MaskDef, E> {
        let owner = &self.owner;
        if self.columns.is_none() && self.detectors.is_none() {
            return Err(fail(format!(
                "the mask of {owner} says nothing to mask; give columns, detectors or both, e.g. \
                 `{{ columns: [\"*email*\"], detectors: [payment] }}`"
            )));
        }
        let compiled = compile_mask(
            self.ctx,
            &format!("the mask of {owner}"),
            self.columns.unwrap_or_default(),
            &self.detectors.unwrap_or_default(),
            Vec::new(),
        )
        .map_err(fail)?;
        Ok(MaskDef { compiled })
    }
}

/// Compiles a mask of `columns` and the detectors and presets `names` name,
/// on the second reading (None on the first). `what` ("the mask of rule
/// `r`") starts the messages; each name was checked at its place, so what
/// fails here is about the mask as a whole.
fn compile_mask(
    ctx: &Ctx,
    what: &str,
    columns: Vec<String>,
    names: &[String],
    json_paths: Vec<masking::JsonPath>,
) -> Result<Option<Mask>, String> {
    let Some(known) = ctx
        .names
        .as_ref()
        .filter(|n| !n.preset_takes_a_detector_name())
    else {
        // On the second reading with such a clash, the reading fails at the
        // preset's name, later in the file.
        return Ok(None);
    };
    let specs = masking::resolve(names, &known.detectors, &known.presets)
        .map_err(|e| format!("{what}: {e}"))?;
    let masker = Masker::new(&columns, &specs)
        .map_err(|e| format!("{what}: {e}"))?
        .with_json_paths(json_paths.clone());
    let detectors = specs
        .iter()
        .map(|spec| match spec {
            DetectorSpec::Builtin(name) => name.clone(),
            DetectorSpec::Custom { name, .. } => name.clone(),
        })
        .collect();
    Ok(Some(Mask {
        masker: Arc::new(masker),
        columns,
        detectors,
        fields: json_paths.iter().map(ToString::to_string).collect(),
    }))
}

/// A column glob of a mask, checked as the masking module reads it.
#[derive(Clone, Copy)]
struct ColumnP;

impl Parse for ColumnP {
    type Out = String;
    fn expecting(&self) -> String {
        format!("a column name or glob such as {COLUMNS_EXAMPLE}")
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let bad = |why: &str| {
            format!(
                "{s:?} is not a valid column glob: {why}; write e.g. {COLUMNS_EXAMPLE} (* matches \
                 any characters, ? one character; case does not matter)"
            )
        };
        match Masker::new(&[s.to_string()], &[]) {
            Ok(_) => Ok(s.to_string()),
            Err(MaskError::BadGlob { reason, .. }) => Err(bad(&reason)),
            Err(e) => Err(bad(&e.to_string())),
        }
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

const COLUMNS_EXAMPLE: &str = "\"*email*\"";

/// A detector or preset name in a mask or a preset; checked on the second
/// reading, when the detectors and presets of the file are known.
#[derive(Clone, Copy)]
struct MaskNameP<'c, 'o> {
    ctx: &'c Ctx,
    /// "rule `r`", "sql_mask", "preset `p`".
    owner: &'o str,
}

impl Parse for MaskNameP<'_, '_> {
    type Out = String;
    fn expecting(&self) -> String {
        "a detector or preset name such as card or payment".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let Some(names) = &self.ctx.names else {
            return Ok(s.to_string());
        };
        let owner = self.owner;
        if !names.is_mask_name(s) {
            let hint = names
                .closest_mask_name(s)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            return Err(format!(
                "{owner} names `{s}`, which is not a detector or a preset{hint}; {}",
                names.mask_names()
            ));
        }
        if let Some(cycle) = names.preset_cycle(s) {
            return Err(format!(
                "{owner} names `{s}`, but presets include one another in a circle: {}; a preset \
                 may name detectors and other presets, never itself",
                cycle.join(" -> ")
            ));
        }
        if !names.preset_takes_a_detector_name() {
            masking::resolve(&[s.to_string()], &names.detectors, &names.presets)
                .map_err(|e| format!("{owner} names `{s}`, which cannot be used: {e}"))?;
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

const TABLES_EXAMPLE: &str = "\"crm.*\"";
const FUNCTIONS_EXAMPLE: &str = "\"pg_read_file\"";
const DATABASE_EXAMPLE: &str = "crm";
const DB_USER_EXAMPLE: &str = "bot_ro";

// ---------------------------------------------------------------------------
// Scalars, one or a list of them

/// Reads one kind of scalar; errors are sentences to show the user.
trait Parse: Copy {
    type Out;
    /// "a port such as 443"
    fn expecting(&self) -> String;
    fn text(&self, s: &str) -> Result<Self::Out, String>;
    fn int(&self, n: i128) -> Result<Self::Out, String> {
        Err(format!("{n} is not {}", self.expecting()))
    }
}

/// Exactly one scalar.
#[derive(Clone, Copy)]
struct One<P>(P);

impl<'de, P: Parse> DeserializeSeed<'de> for One<P> {
    type Value = P::Out;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<P::Out, D::Error> {
        d.deserialize_any(ScalarVisitor(self.0))
    }
}

struct ScalarVisitor<P>(P);

impl<'de, P: Parse> Visitor<'de> for ScalarVisitor<P> {
    type Value = P::Out;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0.expecting())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<P::Out, E> {
        self.0.text(v).map_err(fail)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<P::Out, E> {
        self.0.int(v.into()).map_err(fail)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<P::Out, E> {
        self.0.int(v.into()).map_err(fail)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<P::Out, E> {
        self.0
            .int(i128::try_from(v).unwrap_or(i128::MAX))
            .map_err(fail)
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<P::Out, E> {
        self.0.int(v).map_err(fail)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<P::Out, E> {
        Err(fail(format!("{v} is not {}", self.0.expecting())))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<P::Out, E> {
        Err(fail(format!("{v} is not {}", self.0.expecting())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<P::Out, E> {
        Err(fail(format!(
            "a value is missing here; expected {}",
            self.0.expecting()
        )))
    }
}

/// `true` or `false`, for the key named.
#[derive(Clone, Copy)]
struct Flag(&'static str);

impl<'de> DeserializeSeed<'de> for Flag {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flag {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{}: true` or `{}: false`", self.0, self.0)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

/// One scalar or a list of them; a single value is a list of one.
#[derive(Clone, Copy)]
struct Many<P> {
    parse: P,
    /// "port": for the message about an empty list.
    noun: &'static str,
    allow_empty: bool,
    /// The message about an empty list, when "leave the key out" is wrong.
    when_empty: Option<&'static str>,
}

impl<P> Many<P> {
    fn new(parse: P, noun: &'static str) -> Self {
        Many {
            parse,
            noun,
            allow_empty: false,
            when_empty: None,
        }
    }
}

impl<'de, P: Parse> DeserializeSeed<'de> for Many<P> {
    type Value = Vec<P::Out>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<P::Out>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, P: Parse> Visitor<'de> for Many<P> {
    type Value = Vec<P::Out>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}, or a list of them", self.parse.expecting())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_str(v).map(|x| vec![x])
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_u64(v).map(|x| vec![x])
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_i64(v).map(|x| vec![x])
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_u128(v).map(|x| vec![x])
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_i128(v).map(|x| vec![x])
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_f64(v).map(|x| vec![x])
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        ScalarVisitor(self.parse).visit_bool(v).map(|x| vec![x])
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(fail(format!(
            "a value is missing here; expected {}, or a list of them",
            self.parse.expecting()
        )))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(One(self.parse))? {
            out.push(v);
        }
        if out.is_empty()
            && !self.allow_empty
            && let Some(message) = self.when_empty
        {
            return Err(fail(message));
        }
        if out.is_empty() && !self.allow_empty {
            return Err(fail(format!(
                "this list is empty, so it would match nothing; give at least one {}, or leave \
                 the key out",
                self.noun
            )));
        }
        Ok(out)
    }
}

// --- the scalars

#[derive(Clone, Copy)]
struct VersionP;

impl Parse for VersionP {
    type Out = u64;
    fn expecting(&self) -> String {
        format!("a policy version ({SUPPORTED_VERSION})")
    }
    fn text(&self, s: &str) -> Result<u64, String> {
        match s.trim().parse::<i128>() {
            Ok(n) => self.int(n),
            Err(_) => Err(format!(
                "{s:?} is not a version; write `version: {SUPPORTED_VERSION}`"
            )),
        }
    }
    fn int(&self, n: i128) -> Result<u64, String> {
        if n == i128::from(SUPPORTED_VERSION) {
            Ok(SUPPORTED_VERSION)
        } else {
            Err(format!(
                "unsupported policy version {n}; this Warden reads `version: {SUPPORTED_VERSION}`"
            ))
        }
    }
}

#[derive(Clone, Copy)]
struct DefaultP;

impl Parse for DefaultP {
    type Out = DefaultAction;
    fn expecting(&self) -> String {
        "audit or deny".into()
    }
    fn text(&self, s: &str) -> Result<DefaultAction, String> {
        match s {
            "audit" => Ok(DefaultAction::Audit),
            "deny" => Ok(DefaultAction::Deny),
            "allow" => Err(
                "`default: allow` is not a choice; write `default: audit` (allow and \
                            record every connection no rule matches) or `default: deny`"
                    .into(),
            ),
            "approve" => Err(
                "`default: approve` is not a choice: default decides whole connections, and \
                 approve holds one statement or request; write `default: audit` or `default: \
                 deny`, and `action: approve` on a rule with an sql, http, llm or ssh matcher"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not a default; write `default: audit` (allow and record) or \
                 `default: deny`"
            )),
        }
    }
}

/// A rule's `action`; on the second reading, `approve` only where it may
/// be.
#[derive(Clone, Copy)]
struct ActionP<'c> {
    ctx: &'c Ctx,
}

impl Parse for ActionP<'_> {
    type Out = Action;
    fn expecting(&self) -> String {
        "allow, deny or approve".into()
    }
    fn text(&self, s: &str) -> Result<Action, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "approve" => self
                .ctx
                .approve_action_error()
                .map_or(Ok(Action::Approve), Err),
            "mask" | "redact" => Err(format!(
                "`action: {s}` is not an action; masking is `action: allow` with a mask on a \
                 statement rule: `action: allow, mask: {{ columns: [\"*email*\"], detectors: \
                 [payment] }}`"
            )),
            "hold" | "review" | "ask" => Err(format!(
                "`action: {s}` is not an action; to hold a statement or request until reviewers \
                 approve it, write `action: approve` with `approve: {{ groups: [dba] }}`"
            )),
            "audit" => Err(
                "action `audit` is not supported yet in policy v0; write `action: allow` (every \
                 connection, statement and request is recorded anyway), `action: deny` or \
                 `action: approve`"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not an action; write `action: allow`, `action: deny` or `action: \
                 approve`"
            )),
        }
    }
}

#[derive(Clone, Copy)]
struct SqlDefaultP;

impl Parse for SqlDefaultP {
    type Out = Action;
    fn expecting(&self) -> String {
        "allow or deny".into()
    }
    fn text(&self, s: &str) -> Result<Action, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "audit" => Err(
                "`sql_default: audit` is not a choice; write `sql_default: allow` (every \
                 statement is recorded in the audit anyway) or `sql_default: deny`"
                    .into(),
            ),
            "approve" => Err(
                "`sql_default: approve` is not a choice; write `sql_default: allow` or \
                 `sql_default: deny`, and hold statements with a rule: `when: { sql: { ... } \
                 }, action: approve`"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not a sql_default; write `sql_default: allow` or `sql_default: deny`"
            )),
        }
    }
}

/// A target's `tls`: whether the agent speaks TLS to the server.
#[derive(Clone, Copy)]
struct UpstreamTlsP;

impl Parse for UpstreamTlsP {
    type Out = bool;
    fn expecting(&self) -> String {
        "verify or off".into()
    }
    fn text(&self, s: &str) -> Result<bool, String> {
        match s {
            "verify" => Ok(true),
            "off" => Ok(false),
            "require" | "on" | "true" | "verify-full" => Err(format!(
                "write `tls: verify`: the agent always checks the server's certificate, against \
                 the system's roots and --upstream-ca (not {s:?})"
            )),
            _ => Err(format!(
                "{s:?} is not a tls setting; write `tls: verify` or `tls: off`"
            )),
        }
    }
}

/// A target's `tls_name`: the DNS name in the server's certificate.
#[derive(Clone, Copy)]
struct TlsNameP;

impl Parse for TlsNameP {
    type Out = String;
    fn expecting(&self) -> String {
        "a DNS name such as db.internal".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        rustls::pki_types::ServerName::try_from(s)
            .map(|_| s.to_string())
            .map_err(|_| format!("{s:?} is not a DNS name or address a certificate can hold"))
    }
}

#[derive(Clone, Copy)]
struct ProtocolP {
    /// The target has a `host` (read before this): it must speak HTTP.
    host: bool,
    /// The target has `host_keys` or `known_hosts` (this one, read before
    /// this): it must speak SSH.
    host_keys: Option<&'static str>,
}

impl ProtocolP {
    /// For the target as read so far.
    fn with(target: &Target) -> ProtocolP {
        ProtocolP {
            host: target.host.is_some(),
            host_keys: target.host_keys.as_ref().map(ssh::host_keys_key),
        }
    }

    /// The error for a target with a host that says `protocol`, if that
    /// protocol has no HTTP requests.
    fn host_error(self, protocol: Protocol) -> Option<String> {
        (self.host && !Protocol::speaks_http(Some(protocol))).then(|| {
            format!(
                "a target with a host says `protocol: {}`; a host is matched per HTTP request \
                 (its Host header, else the TLS server name), so a target with one speaks \
                 `http`, `llm` or `any`: fix the protocol, or name the destination by address \
                 and port instead",
                protocol.as_str()
            )
        })
    }
}

impl Parse for ProtocolP {
    type Out = Protocol;
    fn expecting(&self) -> String {
        let names: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
        format!("a protocol: one of {}", names.join(", "))
    }
    fn text(&self, s: &str) -> Result<Protocol, String> {
        if let Some(p) = Protocol::ALL.into_iter().find(|p| p.as_str() == s) {
            if let Some(key) = self.host_keys
                && p != Protocol::Ssh
            {
                return Err(ssh::host_keys_protocol_error(key, p));
            }
            return self.host_error(p).map_or(Ok(p), Err);
        }
        let names: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
        let hint = match s.to_ascii_lowercase().as_str() {
            "postgresql" | "pg" | "psql" => " (PostgreSQL is `postgres`)",
            "https" => " (HTTPS is `http`: Warden reads HTTP inside TLS)",
            _ => "",
        };
        Err(format!(
            "{s:?} is not a protocol{hint}; write one of: {}",
            names.join(", ")
        ))
    }
}

#[derive(Clone, Copy)]
struct HttpDefaultP;

impl Parse for HttpDefaultP {
    type Out = Action;
    fn expecting(&self) -> String {
        "allow or deny".into()
    }
    fn text(&self, s: &str) -> Result<Action, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "audit" => Err(
                "`http_default: audit` is not a choice; write `http_default: allow` (every \
                 request is recorded in the audit anyway) or `http_default: deny`"
                    .into(),
            ),
            "approve" => Err(
                "`http_default: approve` is not a choice; write `http_default: allow` or \
                 `http_default: deny`, and hold requests with a rule: `when: { http: { ... } \
                 }, action: approve`"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not an http_default; write `http_default: allow` or `http_default: deny`"
            )),
        }
    }
}

#[derive(Clone, Copy)]
struct PromptsP;

impl Parse for PromptsP {
    type Out = PromptAudit;
    fn expecting(&self) -> String {
        "full, digest or none".into()
    }
    fn text(&self, s: &str) -> Result<PromptAudit, String> {
        [PromptAudit::Full, PromptAudit::Digest, PromptAudit::None]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a choice for audit prompts; write `prompts: full` (the prompt \
                     as sent upstream), `prompts: digest` (a digest only) or `prompts: none`"
                )
            })
    }
}

#[derive(Clone, Copy)]
struct OnFailureP;

impl Parse for OnFailureP {
    type Out = OnAuditFailure;
    fn expecting(&self) -> String {
        "keep_serving or fail_closed".into()
    }
    fn text(&self, s: &str) -> Result<OnAuditFailure, String> {
        [OnAuditFailure::KeepServing, OnAuditFailure::FailClosed]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a choice for audit on_failure; write `on_failure: keep_serving` \
                     (serve, keep rows in memory up to a bound, count what is dropped) or \
                     `on_failure: fail_closed` (refuse new connections while the audit cannot be written)"
                )
            })
    }
}

#[derive(Clone, Copy)]
struct ClassP;

impl Parse for ClassP {
    type Out = &'static str;
    fn expecting(&self) -> String {
        format!("a statement class: one of {}", STATEMENT_CLASSES.join(", "))
    }
    fn text(&self, s: &str) -> Result<&'static str, String> {
        if let Some(&class) = STATEMENT_CLASSES.iter().find(|&&c| c == s) {
            return Ok(class);
        }
        let hint = match s.to_ascii_lowercase().as_str() {
            "select" | "reads" => " (SELECT is class `read`)",
            "insert" | "update" | "delete" | "merge" | "truncate" | "dml" | "writes" => {
                " (INSERT, UPDATE, DELETE, MERGE and TRUNCATE are class `write`)"
            }
            "create" | "alter" | "drop" | "schema" => " (CREATE, ALTER and DROP are class `ddl`)",
            "grant" | "revoke" | "role" | "privileges" => {
                " (GRANT, REVOKE and roles are class `privilege`)"
            }
            "call" | "functions" => " (CALL and unsafe function calls are class `function`)",
            "set" | "show" => " (SET and SHOW are class `session`)",
            "begin" | "commit" | "rollback" => {
                " (BEGIN, COMMIT and ROLLBACK are class `transaction`)"
            }
            _ => "",
        };
        Err(format!(
            "{s:?} is not a statement class{hint}; write one of: {}",
            STATEMENT_CLASSES.join(", ")
        ))
    }
}

#[derive(Clone, Copy)]
struct RuleNameP<'c> {
    ctx: &'c Ctx,
}

impl Parse for RuleNameP<'_> {
    type Out = String;
    fn expecting(&self) -> String {
        "a rule name such as no-cloud-metadata".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        check_name("rule", s)?;
        if s == "default" {
            return Err(
                "a rule cannot be named `default`: the audit uses that name for connections no \
                 rule matches; pick another name"
                    .into(),
            );
        }
        let mut seen = self.ctx.rule_names.borrow_mut();
        if seen.iter().any(|n| n == s) {
            return Err(format!(
                "a rule named `{s}` comes earlier in rules:; each rule needs its own name (the \
                 audit records which rule decided)"
            ));
        }
        seen.push(s.to_string());
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RefKind {
    Workload,
    Target,
}

#[derive(Clone, Copy)]
struct RefP<'c, 'm> {
    ctx: &'c Ctx,
    kind: RefKind,
    /// The protocol matchers of the rule read before this: a target must
    /// speak their protocols.
    matchers: &'m [Matcher],
}

impl Parse for RefP<'_, '_> {
    type Out = String;
    fn expecting(&self) -> String {
        match self.kind {
            RefKind::Workload => "the name of a workload defined under workloads:".into(),
            RefKind::Target => "the name of a target defined under targets:".into(),
        }
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let Some(names) = &self.ctx.names else {
            return Ok(s.to_string());
        };
        let (kind, section, defined, other, other_kind) = match self.kind {
            RefKind::Workload => (
                "workload",
                "workloads",
                &names.workloads,
                &names.targets,
                "target",
            ),
            RefKind::Target => (
                "target",
                "targets",
                &names.targets,
                &names.workloads,
                "workload",
            ),
        };
        if defined.iter().any(|n| n == s) {
            return match self
                .matchers
                .iter()
                .find_map(|&m| self.ctx.matcher_target_error(m, s))
            {
                Some(message) => Err(message),
                None => Ok(s.to_string()),
            };
        }
        let list = if defined.is_empty() {
            "none".to_string()
        } else {
            defined.join(", ")
        };
        let mut message = format!(
            "rule `{}` names {kind} `{s}` which is not defined under {section}:; defined: {list}",
            self.ctx.current_rule()
        );
        if other.iter().any(|n| n == s) {
            message.push_str(&format!(
                " (`{s}` is a {other_kind}: write `{other_kind}: {s}`)"
            ));
        }
        Err(message)
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

#[derive(Clone, Copy)]
struct UidP;

impl Parse for UidP {
    type Out = u32;
    fn expecting(&self) -> String {
        "a uid (a number such as 1000)".into()
    }
    fn text(&self, s: &str) -> Result<u32, String> {
        match s.trim().parse::<i128>() {
            Ok(n) => self.int(n),
            Err(_) => Err(format!(
                "{s:?} is not a uid; uid takes numbers (to match a user by name write \
                 `user: {s}`)"
            )),
        }
    }
    fn int(&self, n: i128) -> Result<u32, String> {
        u32::try_from(n).map_err(|_| format!("{n} is not a uid; a uid is 0 to 4294967295"))
    }
}

#[derive(Clone, Copy)]
struct UserP;

impl Parse for UserP {
    type Out = String;
    fn expecting(&self) -> String {
        "a user name such as alice".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?} is not a user name; write e.g. `user: alice`"
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        Err(format!(
            "user takes a user name; to match uid {n} write `uid: {n}`"
        ))
    }
}

#[derive(Clone, Copy)]
struct GlobP(&'static str);

impl Parse for GlobP {
    type Out = Glob;
    fn expecting(&self) -> String {
        format!("a glob such as {}", self.0)
    }
    fn text(&self, s: &str) -> Result<Glob, String> {
        Glob::new(s).map_err(|why| {
            format!(
                "{s:?} is not a valid glob: {why}; write e.g. {} (* matches any characters, ? one \
                 character, [abc] one of a set)",
                self.0
            )
        })
    }
    fn int(&self, n: i128) -> Result<Glob, String> {
        self.text(&n.to_string())
    }
}

/// A caseless glob on table and function names.
#[derive(Clone, Copy)]
struct NameGlobP(&'static str);

impl Parse for NameGlobP {
    type Out = Glob;
    fn expecting(&self) -> String {
        format!("a glob such as {}", self.0)
    }
    fn text(&self, s: &str) -> Result<Glob, String> {
        Glob::new_caseless(s).map_err(|why| {
            format!(
                "{s:?} is not a valid glob: {why}; write e.g. {} (* matches any characters, ? one \
                 character, [abc] one of a set; case does not matter)",
                self.0
            )
        })
    }
    fn int(&self, n: i128) -> Result<Glob, String> {
        self.text(&n.to_string())
    }
}

#[derive(Clone, Copy)]
struct ContainerP;

impl Parse for ContainerP {
    type Out = String;
    fn expecting(&self) -> String {
        "a container id or its first hex digits, such as 3f2a9c1b7e4d".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(s.to_ascii_lowercase())
        } else {
            Err(format!(
                "{s:?} is not a container id; write the id or its first hex digits, e.g. \
                 `container: \"3f2a9c1b7e4d\"` (docker ps shows them)"
            ))
        }
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

#[derive(Clone, Copy)]
struct AddressP;

impl Parse for AddressP {
    type Out = IpNet;
    fn expecting(&self) -> String {
        "an address or CIDR such as 10.0.0.0/8 or 192.0.2.1".into()
    }
    fn text(&self, s: &str) -> Result<IpNet, String> {
        parse_net(s)
    }
}

/// An address ("192.0.2.1", "fd00::1") or a network ("10.0.0.0/8").
pub(crate) fn parse_net(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = if let Ok(ip) = t.parse::<IpAddr>() {
        IpNet::from(ip)
    } else if let Ok(net) = t.parse::<IpNet>() {
        if net.addr() != net.network() {
            return Err(format!(
                "{s:?} has bits set past its /{len} prefix; write {network}/{len} for the \
                 network, or {addr} for the one address",
                len = net.prefix_len(),
                network = net.network(),
                addr = net.addr()
            ));
        }
        net
    } else if let Ok(sa) = t.parse::<SocketAddr>() {
        return Err(format!(
            "{s:?} is an address with a port; write the port apart: \
             `address: \"{}\", port: {}`",
            sa.ip(),
            sa.port()
        ));
    } else if t.contains(|c: char| c.is_ascii_alphabetic()) && !t.contains(':') {
        return Err(format!(
            "{s:?} is not an address or CIDR: an address is matched per connection, before \
             any host name is known; to match a host name, give a target `host: {t}` (it holds \
             for HTTP requests), or write an address such as 10.0.0.0/8 or 192.0.2.1"
        ));
    } else {
        return Err(format!(
            "{s:?} is not an address or CIDR; write e.g. 10.0.0.0/8 or 192.0.2.1"
        ));
    };
    // Warden hands the policy IPv4 destinations as IPv4, never as ::ffff:a.b.c.d.
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        let v4 = IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).expect("prefix fits");
        return Err(format!(
            "{s:?} is an IPv4-mapped IPv6 address, which never reaches the policy (Warden sees \
             such connections as IPv4); write {}",
            if v4.prefix_len() == 32 {
                v4.addr().to_string()
            } else {
                v4.to_string()
            }
        ));
    }
    Ok(net)
}

#[derive(Clone, Copy)]
struct PortP;

impl Parse for PortP {
    type Out = PortRange;
    fn expecting(&self) -> String {
        "a port such as 443 or a range such as \"8000-8099\"".into()
    }
    fn text(&self, s: &str) -> Result<PortRange, String> {
        parse_port_range(s)
    }
    fn int(&self, n: i128) -> Result<PortRange, String> {
        let p = port_number(n)?;
        Ok(PortRange { first: p, last: p })
    }
}

fn port_number(n: i128) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {n} is out of range; a port is 1 to 65535")),
    }
}

/// "443" or "8000-8099".
pub(crate) fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let bad = || format!("{s:?} is not a port or port range; write e.g. 443 or \"8000-8099\"");
    let number = |t: &str| -> Result<u16, String> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        port_number(t.parse::<i128>().unwrap_or(i128::MAX))
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => {
            let p = number(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!(
            "the port range {s:?} is backwards; write \"{last}-{first}\""
        ));
    }
    Ok(PortRange { first, last })
}

#[derive(Clone, Copy)]
struct UdpPortP;

impl Parse for UdpPortP {
    type Out = u16;
    fn expecting(&self) -> String {
        "a UDP port such as 53".into()
    }
    fn text(&self, s: &str) -> Result<u16, String> {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return self.int(t.parse::<i128>().unwrap_or(i128::MAX));
        }
        Err(format!(
            "{s:?} is not a port; udp allow_ports takes single ports, e.g. [53, 123]"
        ))
    }
    fn int(&self, n: i128) -> Result<u16, String> {
        port_number(n)
    }
}

#[derive(Clone, Copy)]
struct DirP;

impl Parse for DirP {
    type Out = PathBuf;
    fn expecting(&self) -> String {
        "a directory such as /var/lib/warden/audit".into()
    }
    fn text(&self, s: &str) -> Result<PathBuf, String> {
        if s.starts_with('/') {
            Ok(PathBuf::from(s))
        } else {
            Err(format!(
                "audit dir {s:?} is not an absolute path; write e.g. /var/lib/warden/audit"
            ))
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct DurationP;

impl Parse for DurationP {
    type Out = Duration;
    fn expecting(&self) -> String {
        "a duration such as 60s, 15m, 1h or 1d".into()
    }
    fn text(&self, s: &str) -> Result<Duration, String> {
        parse_duration(s)
    }
    fn int(&self, n: i128) -> Result<Duration, String> {
        Err(format!("{n} has no unit; write e.g. {n}s (s, m, h or d)"))
    }
}

/// "90s", "15m", "1h", "1d".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "d" => Some(86400),
        _ => None,
    };
    match (digits.parse::<u64>(), scale) {
        (Ok(n), Some(scale)) if n > 0 => n
            .checked_mul(scale)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long")),
        (Ok(0), Some(_)) => Err(format!(
            "{s:?} is zero; write a positive duration such as 60s"
        )),
        _ => Err(format!(
            "{s:?} is not a duration; write a number and a unit, e.g. 60s, 15m, 1h or 1d"
        )),
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
pub(super) mod tests;
