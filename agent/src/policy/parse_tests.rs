//! Reading policies: every kind of error, with its exact line and column.
use std::{io::Write, time::Duration};

use super::super::{
    ApprovalRule, ApprovalSettings, AuditSettings, OidcSettings, Policy, PolicyError, PortRange,
};
use super::{parse_duration, parse_net, parse_port_range, with_test_env};

/// The error `src` gives, as the user sees it.
pub(in crate::policy) fn err(src: &str) -> String {
    match Policy::from_yaml(src, "policy.yaml") {
        Ok(_) => panic!("expected an error from:\n{src}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the error starts with `policy.yaml:LINE:COL: ` and mentions `words`.
#[track_caller]
pub(in crate::policy) fn assert_err(src: &str, line: usize, column: usize, words: &str) {
    let got = err(src);
    let prefix = format!("policy.yaml:{line}:{column}: ");
    assert!(
        got.starts_with(&prefix) && got.contains(words),
        "expected {prefix}...{words}...\n     got {got}"
    );
}

#[test]
fn unknown_field_in_a_rule() {
    let src = "\
version: 1
rules:
  - name: no-cloud-metadata
    when: { address: 169.254.169.254 }
    acton: deny
";
    assert_eq!(
        err(src),
        "policy.yaml:5:5: unknown field `acton` in a rule; expected one of: name, when, action, \
         approve, mask, limits, redact_prompt, mask_response"
    );
}

#[test]
fn unknown_fields_everywhere_name_their_place() {
    assert_eq!(
        err("version: 1\nrule: []\n"),
        "policy.yaml:2:1: unknown field `rule` at the top level; expected one of: version, \
         default, sql_default, sql_mask, http_default, prompt_redact, response_mask, \
         ssh_default, workloads, targets, credentials, detectors, presets, udp, rules, audit, \
         approvals, budgets, workload_tokens"
    );
    // In a flow mapping, the column is the key's.
    assert_eq!(
        err("version: 1\nrules:\n  - { name: a, when: { adress: 10.0.0.1 }, action: deny }\n"),
        "policy.yaml:3:24: unknown field `adress` in a rule's when; expected one of: workload, \
         target, address, port, sql, http, llm, ssh, token"
    );
    assert_err(
        "version: 1\nworkloads:\n  w:\n    match: { pid: 1 }\n",
        4,
        14,
        "unknown field `pid` in a workload's match; expected one of: uid, user, exe, comm, unit, \
         cgroup, container, namespace, service_account",
    );
    assert_err(
        "version: 1\nworkloads:\n  w:\n    selector: { uid: 1 }\n",
        4,
        5,
        "unknown field `selector` in a workload; expected one of: match, owners",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { addr: 10.0.0.1 }\n",
        3,
        8,
        "unknown field `addr` in a target",
    );
    assert_err(
        "version: 1\nudp:\n  ports: [53]\n",
        3,
        3,
        "unknown field `ports` under udp; expected one of: allow_ports",
    );
    assert_err(
        "version: 1\naudit:\n  directory: /x\n",
        3,
        3,
        "unknown field `directory` under audit; expected one of: dir, rotate, retention, prompts, on_failure",
    );
}

#[test]
fn a_key_given_twice() {
    assert_err(
        "version: 1\ndefault: deny\ndefault: audit\n",
        3,
        1,
        "`default` is given twice at the top level; keep one",
    );
    assert_err(
        "version: 1\nrules:\n  - name: a\n    action: deny\n    action: allow\n",
        5,
        5,
        "`action` is given twice in a rule",
    );
}

#[test]
fn bad_addresses() {
    let src = "\
version: 1
default: deny
# the networks we own
targets:
  internal:
    port: 5432
    address: \"10.0.0.0/33\"
";
    assert_eq!(
        err(src),
        "policy.yaml:7:14: \"10.0.0.0/33\" is not an address or CIDR; write e.g. 10.0.0.0/8 or \
         192.0.2.1"
    );
    // In a list, the position is the element's.
    assert_err(
        "version: 1\ntargets:\n  t:\n    address:\n      - 10.0.0.0/8\n      - fd00::/200\n",
        6,
        9,
        "\"fd00::/200\" is not an address or CIDR",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { address: 10.1.2.3/16 }\n",
        3,
        17,
        "has bits set past its /16 prefix; write 10.1.0.0/16 for the network, or 10.1.2.3 for \
         the one address",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { address: \"10.0.4.12:5432\" }\n",
        3,
        17,
        "write the port apart: `address: \"10.0.4.12\", port: 5432`",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { address: api.openai.com }\n",
        3,
        17,
        "\"api.openai.com\" is not an address or CIDR: an address is matched per connection, \
         before any host name is known; to match a host name, give a target `host: \
         api.openai.com` (it holds for HTTP requests)",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { address: 1234 }\n    action: deny\n",
        4,
        22,
        "1234 is not an address or CIDR such as 10.0.0.0/8 or 192.0.2.1",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { address: \"::ffff:192.0.2.1\" }\n",
        3,
        17,
        "is an IPv4-mapped IPv6 address, which never reaches the policy (Warden sees such \
         connections as IPv4); write 192.0.2.1",
    );
}

#[test]
fn bad_ports() {
    assert_err(
        "version: 1\ntargets:\n  t: { port: [443, 70000] }\n",
        3,
        20,
        "port 70000 is out of range; a port is 1 to 65535",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { port: 0 }\n",
        3,
        14,
        "port 0 is out of range",
    );
    assert_err(
        "version: 1\ntargets:\n  t:\n    port:\n      - 5432\n      - \"8099-8000\"\n",
        6,
        9,
        "the port range \"8099-8000\" is backwards; write \"8000-8099\"",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { port: 80-http }\n",
        3,
        14,
        "\"80-http\" is not a port or port range; write e.g. 443 or \"8000-8099\"",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { port: [] }\n",
        3,
        14,
        "this list is empty, so it would match nothing; give at least one port",
    );
    assert_err(
        "version: 1\nudp:\n  allow_ports: [53, \"100-200\"]\n",
        3,
        21,
        "udp allow_ports takes single ports",
    );
    let many: Vec<String> = (1..=300).map(|p| p.to_string()).collect();
    assert_err(
        &format!("version: 1\nudp:\n  allow_ports: [{}]\n", many.join(", ")),
        3,
        3,
        "udp allow_ports lists 300 ports; the kernel's map holds at most 256",
    );
}

#[test]
fn bad_globs_and_selectors() {
    assert_eq!(
        err("version: 1\nworkloads:\n  bot:\n    match: { exe: \"/usr/bin/[python\" }\n"),
        "policy.yaml:4:19: \"/usr/bin/[python\" is not a valid glob: a [ is not closed by ]; \
         write e.g. \"/usr/bin/python3*\" (* matches any characters, ? one character, [abc] one \
         of a set)"
    );
    assert_err(
        "version: 1\nworkloads:\n  bot:\n    match:\n      unit: [\"a.service\", \"\"]\n",
        5,
        27,
        "\"\" is not a valid glob: the pattern is empty",
    );
    assert_err(
        "version: 1\nworkloads:\n  w: { match: { uid: alice } }\n",
        3,
        22,
        "\"alice\" is not a uid; uid takes numbers (to match a user by name write `user: alice`)",
    );
    assert_err(
        "version: 1\nworkloads:\n  w: { match: { uid: -1 } }\n",
        3,
        22,
        "-1 is not a uid",
    );
    assert_err(
        "version: 1\nworkloads:\n  w: { match: { container: docker-abc } }\n",
        3,
        28,
        "\"docker-abc\" is not a container id",
    );
    assert_err(
        "version: 1\nworkloads:\n  w: { match: {} }\n",
        3,
        15,
        "a workload's match is empty, which would match every process",
    );
    assert_err(
        "version: 1\nworkloads:\n  w: {}\n",
        3,
        6,
        "a workload needs a match",
    );
}

#[test]
fn undefined_references() {
    // Rules may name definitions that come later in the file.
    let src = "\
version: 1
rules:
  - name: bot-to-crm
    when: { workload: bot, target: crm }
    action: allow
  - name: x
    when: { target: crm-db }
    action: deny
workloads:
  bot: { match: { uid: 1000 } }
targets:
  a: { port: 1 }
  b: { port: 2 }
  crm: { port: 5432 }
";
    assert_eq!(
        err(src),
        "policy.yaml:7:21: rule `x` names target `crm-db` which is not defined under targets:; \
         defined: a, b, crm"
    );
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when:\n      workload: [bot, notebooks]\n    action: deny\nworkloads:\n  bot: { match: { uid: 1 } }\n"
        ),
        "policy.yaml:5:23: rule `r` names workload `notebooks` which is not defined under \
         workloads:; defined: bot"
    );
    // Naming a workload as a target says so.
    assert_eq!(
        err(
            "version: 1\nworkloads:\n  bot: { match: { uid: 1 } }\nrules:\n  - name: r\n    when: { target: bot }\n    action: deny\n"
        ),
        "policy.yaml:6:21: rule `r` names target `bot` which is not defined under targets:; \
         defined: none (`bot` is a workload: write `workload: bot`)"
    );
}

#[test]
fn names() {
    let src = "\
version: 1
rules:
  - name: one
    action: deny
  - action: allow
    name: one
";
    assert_eq!(
        err(src),
        "policy.yaml:6:11: a rule named `one` comes earlier in rules:; each rule needs its own \
         name (the audit records which rule decided)"
    );
    assert_err(
        "version: 1\nworkloads:\n  w: { match: { uid: 1 } }\n  w: { match: { uid: 2 } }\n",
        4,
        3,
        "workload `w` is defined twice under workloads:",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { port: 1 }\n  t: { port: 2 }\n",
        4,
        3,
        "target `t` is defined twice under targets:",
    );
    assert_err(
        "version: 1\nrules:\n  - name: default\n    action: deny\n",
        3,
        11,
        "a rule cannot be named `default`",
    );
    assert_err(
        "version: 1\nrules:\n  - name: \"no metadata\"\n    action: deny\n",
        3,
        11,
        "rule name \"no metadata\" is not allowed; a name is letters, digits, `-` and `_`",
    );
    assert_err(
        "version: 1\nrules:\n  - action: deny\n",
        3,
        5,
        "rule #1 has no name",
    );
    assert_err(
        "version: 1\nrules:\n  - name: a\n    when: { port: 22 }\n",
        3,
        5,
        "rule `a` has no action; write `action: allow`, `action: deny` or `action: approve`",
    );
}

#[test]
fn versions() {
    assert_eq!(
        err("version: 2\n"),
        "policy.yaml:1:10: unsupported policy version 2; this Warden reads `version: 1`"
    );
    assert_err("version: v1\n", 1, 10, "\"v1\" is not a version");
    assert_eq!(
        err("# a policy\ndefault: deny\n"),
        "policy.yaml:2:1: the policy does not say its version; write `version: 1` as its first \
         line"
    );
    assert_err("", 1, 1, "the policy does not say its version");
    assert!(Policy::from_yaml("version: \"1\"\n", "p").is_ok());
}

#[test]
fn not_supported_yet() {
    // `sql`, `http`, `llm` and `ssh` are supported now (statement_tests.rs,
    // http_tests.rs, ssh_tests.rs); `protocol` in a when is not.
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when:\n      target: db\n      protocol: ssh\n    action: deny\ntargets:\n  db: { port: 22 }\n"
        ),
        "policy.yaml:6:7: `protocol` in a rule's when is not supported yet in policy v0 (a later \
         version adds protocol matchers); expected one of: workload, target, address, port, sql, \
         http, llm, ssh, token"
    );
    assert_eq!(
        err("version: 1\nrules:\n  - name: r\n    action: audit\n"),
        "policy.yaml:4:13: action `audit` is not supported yet in policy v0; write `action: \
         allow` (every connection, statement and request is recorded anyway), `action: deny` or \
         `action: approve`"
    );
    // Masking is supported (masking tests below), as a mask on an allow.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: mask\n",
        4,
        13,
        "`action: mask` is not an action; masking is `action: allow` with a mask on a statement \
         rule",
    );
}

#[test]
fn audit_retention_is_a_duration() {
    let p = Policy::from_yaml("version: 1\naudit:\n  retention: 30d\n", "p.yaml").unwrap();
    assert_eq!(
        p.audit_settings().retention,
        Some(Duration::from_secs(30 * 86400))
    );
    let p =
        Policy::from_yaml("version: 1\naudit: { on_failure: fail_closed }\n", "p.yaml").unwrap();
    assert_eq!(
        p.on_audit_failure(),
        crate::policy::OnAuditFailure::FailClosed
    );
    assert_err(
        "version: 1\naudit:\n  on_failure: close\n",
        3,
        15,
        "\"close\" is not a choice for audit on_failure",
    );
    assert_err(
        "version: 1\naudit:\n  retention: 30\n",
        3,
        14,
        "30 has no unit; write e.g. 30s (s, m, h or d)",
    );
}

#[test]
fn bad_values() {
    assert_err(
        "version: 1\ndefault: allow\n",
        2,
        10,
        "`default: allow` is not a choice; write `default: audit`",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: block\n",
        4,
        13,
        "\"block\" is not an action; write `action: allow`, `action: deny` or `action: approve`",
    );
    assert_err(
        "version: 1\naudit:\n  dir: audit\n",
        3,
        8,
        "audit dir \"audit\" is not an absolute path",
    );
    assert_err(
        "version: 1\naudit:\n  rotate: 60\n",
        3,
        11,
        "60 has no unit; write e.g. 60s",
    );
    assert_err(
        "version: 1\nworkloads:\n  w:\n    match:\n      uid:\n",
        5,
        11,
        "a value is missing here; expected a uid",
    );
    assert_err(
        "version: 1\nrules: {}\n",
        2,
        8,
        "invalid type: map, expected a list of rules",
    );
    assert_err(
        "- version: 1\n",
        1,
        1,
        "expected a policy: a mapping with version",
    );
}

#[test]
fn yaml_syntax_errors() {
    assert_err(
        "version: 1\n\tdefault: deny\n",
        2,
        1,
        "this is not valid YAML",
    );
    assert!(err("version: 1\n\tdefault: deny\n").contains("tabs"));
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { port: 22 ]\n    action: deny\n",
        4,
        22,
        "this is not valid YAML",
    );
    assert_err(
        "version: 1\ndefault: deny: x\n",
        2,
        14,
        "this is not valid YAML: mapping values are not allowed in this context",
    );
}

#[test]
fn a_misindented_key_lands_where_it_is() {
    // `when` indented like the rule's dash belongs to the top level.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: deny\nwhen: { port: 22 }\n",
        5,
        1,
        "unknown field `when` at the top level",
    );
}

#[test]
fn positions_hold_with_crlf_and_anchors() {
    let crlf = "version: 1\r\ntargets:\r\n  t: { port: 0 }\r\n";
    assert_err(crlf, 3, 14, "port 0 is out of range");
    let anchors = "\
version: 1
targets:
  a: &web { port: [80, 443] }
  b: *web
  c: { port: 99999 }
";
    assert_err(anchors, 5, 14, "port 99999 is out of range");
}

#[test]
fn error_values() {
    let e = Policy::from_yaml("version: 2\n", "x.yaml").unwrap_err();
    assert_eq!(e.position(), Some((1, 10)));
    assert!(matches!(e, PolicyError::Invalid { ref origin, .. } if origin == "x.yaml"));
}

#[test]
fn load_reads_files_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"version: 1\ndefault: deny\naudit: { dir: /srv/audit, rotate: 5m }\n")
        .unwrap();
    let p = Policy::load(&path).unwrap();
    assert_eq!(
        p.audit_settings(),
        AuditSettings {
            dir: Some("/srv/audit".into()),
            rotate: Some(Duration::from_secs(300)),
            retention: None,
            on_failure: Default::default(),
        }
    );

    std::fs::write(&path, "version: 1\nrules:\n  - name: a\n    acton: deny\n").unwrap();
    let e = Policy::load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}:4:5: unknown field `acton` in a rule; expected one of: name, when, action, \
             approve, mask, limits, redact_prompt, mask_response",
            path.display()
        )
    );

    let missing = dir.path().join("nope.yaml");
    let e = Policy::load(&missing).unwrap_err();
    assert!(matches!(e, PolicyError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read the policy: ", missing.display())),
        "{e}"
    );
}

#[test]
fn scalars() {
    assert_eq!(
        parse_port_range("8000-8099"),
        Ok(PortRange {
            first: 8000,
            last: 8099
        })
    );
    assert_eq!(
        parse_port_range(" 443 "),
        Ok(PortRange {
            first: 443,
            last: 443
        })
    );
    assert!(parse_port_range("1-").is_err());
    assert!(parse_port_range("-5").is_err());
    assert!(parse_port_range("65536").is_err());
    assert_eq!(parse_net("192.0.2.1").unwrap().to_string(), "192.0.2.1/32");
    assert_eq!(parse_net("fd00::/8").unwrap().to_string(), "fd00::/8");
    assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
    assert!(parse_net("::ffff:0:0/96").is_err());
    assert!(parse_net("::/0").is_ok());
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("1.5h").is_err());
    assert!(parse_duration("s").is_err());
}

// ---------------------------------------------------------------------------
// Statement rules: the `sql` matcher, target protocols, sql_default

const CLASSES: &str = "transaction, session, read, write, copy, ddl, function, privilege, unknown";

#[test]
fn sql_matchers_parse() {
    let p = Policy::from_yaml(
        r#"
version: 1
sql_default: deny
targets:
  crm-db: { address: 10.0.4.12, port: 5432, protocol: postgres }
  any-db: { port: 5432, protocol: any }
  plain:  { port: 5433 }
  web:    { port: 443, protocol: http }
rules:
  - name: one-of-each
    when: { target: crm-db, sql: { class: read, tables: "crm.*", functions: now, database: crm, user: bot } }
    action: allow
  - name: lists
    when:
      target: [any-db, plain]
      sql:
        class: [write, ddl]
        tables: ["*card*", payments.*]
        functions: ["pg_*"]
        database: [crm, "crm_*"]
        user: [alice, "svc-*"]
    action: deny
  - name: every-statement
    when: { sql: {} }
    action: allow
  - name: null-is-empty
    when:
      sql:
    action: allow
  - name: connection-rule
    when: { target: web }
    action: allow
"#,
        "policy.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.rule_count(), 5);
    assert_eq!(p.statement_rule_count(), 4);
    assert_eq!(p.sql_default(), super::super::Action::Deny);
    assert_eq!(
        p.summary(),
        "5 rules, 4 of them for SQL statements, 0 workloads, 4 targets"
    );
}

#[test]
fn a_bad_class_names_the_classes() {
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when: { sql: { class: [read, writes] } }\n    action: deny\n"
        ),
        format!(
            "policy.yaml:4:34: \"writes\" is not a statement class (INSERT, UPDATE, DELETE, MERGE \
             and TRUNCATE are class `write`); write one of: {CLASSES}"
        )
    );
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when:\n      sql:\n        class: selected\n    action: deny\n"
        ),
        format!("policy.yaml:6:16: \"selected\" is not a statement class; write one of: {CLASSES}")
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when:\n      sql:\n        class:\n          - read\n          - SELECT\n    action: deny\n",
        8,
        13,
        "\"SELECT\" is not a statement class (SELECT is class `read`); write one of:",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { class: [] } }, action: deny }\n",
        3,
        38,
        "this list is empty, so it would match nothing; give at least one class",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { class: 3 } }, action: deny }\n",
        3,
        38,
        "3 is not a statement class: one of transaction,",
    );
}

#[test]
fn a_sql_matcher_needs_a_target_that_speaks_postgres() {
    // `sql` after the target: at the `sql` key.
    assert_eq!(
        err(
            "version: 1\ntargets:\n  openai: { address: 192.0.2.10, port: 443, protocol: llm }\nrules:\n  - name: r\n    when:\n      target: openai\n      sql: { class: read }\n    action: deny\n"
        ),
        "policy.yaml:8:7: rule `r` has a sql matcher, which matches PostgreSQL statements, but \
         its target `openai` says `protocol: llm`; a sql matcher goes with targets of \
         `protocol: postgres` (or `any`, or none), so name another target or split the rule"
    );
    // The target after `sql`, and defined later in the file: at its name.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: deny\n    when: { sql: { class: read }, target: [crm, web] }\ntargets:\n  crm: { port: 5432, protocol: postgres }\n  web: { port: 443, protocol: http }\n",
        5,
        49,
        "rule `r` has a sql matcher, which matches PostgreSQL statements, but its target `web` \
         says `protocol: http`",
    );
    for protocol in ["ssh", "tls", "http", "llm"] {
        assert_err(
            &format!(
                "version: 1\ntargets:\n  t: {{ port: 1, protocol: {protocol} }}\nrules:\n  - {{ name: r, when: {{ target: t, sql: {{}} }}, action: deny }}\n"
            ),
            5,
            35,
            &format!("says `protocol: {protocol}`"),
        );
    }
    // A connection rule may name any target; sql with postgres, any or none.
    assert!(
        Policy::from_yaml(
            "version: 1\ntargets:\n  web: { port: 443, protocol: http }\n  a: { port: 1, protocol: any }\n  b: { port: 2 }\n  c: { port: 3, protocol: postgres }\nrules:\n  - { name: w, when: { target: web }, action: deny }\n  - { name: s, when: { target: [a, b, c], sql: {} }, action: deny }\n",
            "p"
        )
        .is_ok()
    );
}

#[test]
fn unknown_keys_in_a_sql_matcher() {
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when: { sql: { class: read, tabels: \"crm.*\" } }\n    action: deny\n"
        ),
        "policy.yaml:4:33: unknown field `tabels` in a rule's sql; expected one of: class, \
         tables, functions, database, user, from_llm"
    );
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when:\n      sql:\n        table: customers\n    action: deny\n"
        ),
        "policy.yaml:6:9: unknown field `table` in a rule's sql (write `tables:`, which takes \
         one glob or a list); expected one of: class, tables, functions, database, user, from_llm"
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { db_user: bot } }, action: deny }\n",
        3,
        31,
        "unknown field `db_user` in a rule's sql (write `user:`)",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { columns: [ssn] } }, action: deny }\n",
        3,
        31,
        "unknown field `columns` in a rule's sql (columns to mask go in the rule's mask, next to \
         its action: `mask: { columns: [\"*email*\"] }`)",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { class: read, class: write } }, action: deny }\n",
        3,
        44,
        "`class` is given twice in a rule's sql; keep one",
    );
    // Keys of the sql matcher written one level up.
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { database: crm }, action: deny }\n",
        3,
        24,
        "unknown field `database` in a rule's when (databases are matched per statement: \
         `sql: { database: crm }`)",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, sql: { class: read }, action: deny }\n",
        3,
        16,
        "unknown field `sql` in a rule (a rule's sql matcher goes under when:",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: write }, action: deny }\n",
        3,
        29,
        "invalid type: string \"write\", expected a sql matcher: a mapping with some of class, \
         tables, functions, database, user",
    );
}

#[test]
fn bad_sql_values() {
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { tables: [\"crm.*\", \"crm.[x\"] } }, action: deny }\n",
        3,
        49,
        "\"crm.[x\" is not a valid glob: a [ is not closed by ]; write e.g. \"crm.*\"",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: { database: \"\" } }, action: deny }\n",
        3,
        41,
        "\"\" is not a valid glob: the pattern is empty; write e.g. crm",
    );
    assert_err(
        "version: 1\nsql_default: audit\n",
        2,
        14,
        "`sql_default: audit` is not a choice; write `sql_default: allow`",
    );
    assert_err(
        "version: 1\nsql_default: block\n",
        2,
        14,
        "\"block\" is not a sql_default; write `sql_default: allow` or `sql_default: deny`",
    );
    assert_err(
        "version: 1\ntargets:\n  db: { port: 5432, protocol: postgresql }\n",
        3,
        31,
        "\"postgresql\" is not a protocol (PostgreSQL is `postgres`); write one of: postgres, \
         http, llm, ssh, tls, any",
    );
    assert_err(
        "version: 1\ntargets:\n  db: { port: 5432, database: crm }\n",
        3,
        21,
        "unknown field `database` in a target (a rule's sql matcher names databases:",
    );
    assert_err(
        "version: 1\ntargets:\n  db: { protocol: postgres }\n",
        3,
        7,
        "a target needs an address, a port or a host",
    );
    // A statement rule may approve, with an approve and an approvals
    // section (approval tests below).
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { sql: { class: write } }\n    action: approve\n",
        5,
        13,
        "rule `r` says `action: approve` but not who may approve; write `approve: { groups: \
         [dba] }`",
    );
}

// ---------------------------------------------------------------------------
// Holding for approval: `action: approve`, `approve`, `approvals`, `owners`

/// An `approvals` section, lines 2 and 3 of the files below.
const APPROVALS: &str = "\
version: 1
approvals:
  oidc: { issuer: \"http://127.0.0.1:9400\", client_id: warden }
";

fn rule_approval(p: &Policy, name: &str) -> Option<ApprovalRule> {
    let rule = p.rules.iter().find(|r| r.name == name).expect("the rule");
    rule.approval.as_deref().cloned()
}

#[test]
fn approve_parses_with_its_defaults() {
    let p = Policy::from_yaml(
        &format!(
            "{APPROVALS}rules:\n  - name: hold-writes\n    when: {{ sql: {{ class: write }} }}\n    action: approve\n    approve: {{ groups: dba }}\n"
        ),
        "p.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rule_approval(&p, "hold-writes"),
        Some(ApprovalRule {
            groups: vec!["dba".into()],
            quorum: 1,
            expires: Duration::from_secs(15 * 60),
            message: None,
        })
    );
    assert_eq!(ApprovalRule::DEFAULT_QUORUM, 1);
    assert_eq!(ApprovalRule::DEFAULT_EXPIRES, Duration::from_secs(900));
    assert_eq!(
        p.approvals(),
        Some(&ApprovalSettings {
            oidc: OidcSettings {
                issuer: "http://127.0.0.1:9400".into(),
                client_id: "warden".into(),
                client_secret: None,
                groups_claim: "groups".into(),
            },
            webhook: None,
        })
    );
    assert_eq!(
        p.summary(),
        "1 rule, 1 of them for SQL statements, 1 holding for approval, 0 workloads, 0 targets; \
         approvals by http://127.0.0.1:9400"
    );
    // Without approvals, none.
    assert_eq!(
        Policy::from_yaml("version: 1\n", "p").unwrap().approvals(),
        None
    );
}

#[test]
fn approve_and_approvals_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("oidc");
    std::fs::write(&secret, "s3cret-from-file\n").unwrap();
    let src = format!(
        "\
version: 1
approvals:
  oidc:
    issuer: https://login.example.com/realms/ops
    client_id: warden
    client_secret_file: {}
    groups_claim: roles
  webhook: https://hooks.example/abc
workloads:
  bot:
    match: {{ unit: \"support-bot.service\" }}
    owners: [alice@example.com, \"1234\", bob]
  cron:
    match: {{ uid: 0 }}
rules:
  - name: hold-writes
    when: {{ workload: bot, sql: {{ class: [write, ddl] }} }}
    action: approve
    approve:
      groups: [dba, sre]
      quorum: 2
      expires: 1h
      message: \"a DBA must approve writes to crm\"
",
        secret.display()
    );
    let p = Policy::from_yaml(&src, "p.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rule_approval(&p, "hold-writes"),
        Some(ApprovalRule {
            groups: vec!["dba".into(), "sre".into()],
            quorum: 2,
            expires: Duration::from_secs(3600),
            message: Some("a DBA must approve writes to crm".into()),
        })
    );
    let approvals = p.approvals().unwrap();
    assert_eq!(
        approvals.oidc.issuer,
        "https://login.example.com/realms/ops"
    );
    assert_eq!(
        approvals.oidc.client_secret.as_deref(),
        Some("s3cret-from-file")
    );
    assert_eq!(approvals.oidc.groups_claim, "roles");
    assert_eq!(
        approvals.webhook.as_deref(),
        Some("https://hooks.example/abc")
    );
    assert_eq!(p.owners_of("bot"), ["alice@example.com", "1234", "bob"]);
    assert!(p.owners_of("cron").is_empty());
    assert!(p.owners_of("nobody").is_empty());
    // The client secret is never shown, and kept from the program like a
    // credential's key.
    let shown = format!("{p:?} {} {approvals:?}", p.summary());
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(p.credential_secrets().any(|s| s == "s3cret-from-file"));
    // From the environment.
    let p = with_test_env(&[("WARDEN_OIDC_SECRET", "env-s3cret")], || {
        Policy::from_yaml(
            "version: 1\napprovals:\n  oidc: { issuer: \"http://127.0.0.1:9400\", client_id: warden, client_secret_env: WARDEN_OIDC_SECRET }\n",
            "p.yaml",
        )
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.approvals().unwrap().oidc.client_secret.as_deref(),
        Some("env-s3cret")
    );
}

#[test]
fn approve_only_on_statement_and_request_rules() {
    assert_eq!(
        err(&format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ port: 5432 }}\n    action: approve\n    approve: {{ groups: [dba] }}\n"
        )),
        "policy.yaml:7:13: rule `r` has no sql, http, llm or ssh matcher, so it decides \
         connections; approve holds one statement or request, and a connection rule decides \
         whole connections: add an sql, http, llm or ssh matcher, e.g. `when: { ..., sql: { \
         class: write } }`"
    );
    // A rule that names a target with a host is a request rule: it may.
    Policy::from_yaml(
        &format!(
            "{APPROVALS}targets:\n  api: {{ host: api.example.com }}\nrules:\n  - {{ name: r, when: {{ target: api }}, action: approve, approve: {{ groups: [ops] }} }}\n"
        ),
        "p",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The defaults stay allow or deny.
    assert_err(
        "version: 1\nsql_default: approve\n",
        2,
        14,
        "`sql_default: approve` is not a choice; write `sql_default: allow` or `sql_default: \
         deny`, and hold statements with a rule",
    );
    assert_err(
        "version: 1\nhttp_default: approve\n",
        2,
        15,
        "`http_default: approve` is not a choice",
    );
    assert_err(
        "version: 1\ndefault: approve\n",
        2,
        10,
        "`default: approve` is not a choice: default decides whole connections",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: {} }, action: hold }\n",
        3,
        43,
        "`action: hold` is not an action; to hold a statement or request until reviewers \
         approve it, write `action: approve` with `approve: { groups: [dba] }`",
    );
}

#[test]
fn approve_needs_groups_and_an_approvals_section() {
    // No approve: at the action.
    assert_eq!(
        err(&format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ http: {{ method: DELETE }} }}\n    action: approve\n"
        )),
        "policy.yaml:7:13: rule `r` says `action: approve` but not who may approve; write \
         `approve: { groups: [dba] }` next to its action (reviewers in one of these OIDC groups \
         approve)"
    );
    // No approvals section: at the action, wherever the section would be.
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when: { sql: { class: write } }\n    action: approve\n    approve: { groups: [dba] }\n"
        ),
        "policy.yaml:5:13: rule `r` says `action: approve`, but the file has no approvals \
         section, so nobody could approve: add an `approvals:` section with `oidc: { issuer, \
         client_id }`, the identity provider reviewers sign in with"
    );
    // approve without groups: at its first key.
    assert_err(
        &format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ sql: {{}} }}\n    action: approve\n    approve: {{ quorum: 2 }}\n"
        ),
        8,
        14,
        "the approve of rule `r` names no groups, so nobody could approve; write e.g. `approve: \
         { groups: [dba] }`",
    );
    assert_err(
        &format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ sql: {{}} }}\n    action: approve\n    approve: {{ groups: [] }}\n"
        ),
        8,
        24,
        "this list is empty, so nobody could approve; give at least one group, e.g. `groups: \
         [dba]`",
    );
    // approve on a rule that does not approve: at the key, wherever the
    // action is.
    assert_eq!(
        err(&format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ sql: {{}} }}\n    approve: {{ groups: [dba] }}\n    action: allow\n"
        )),
        "policy.yaml:7:5: rule `r` says `action: allow`, and approve says who releases what a \
         rule holds; approve goes with `action: approve`: make the rule approve, or remove its \
         approve"
    );
    // approvals needs oidc, and oidc its issuer and client id.
    assert_err(
        "version: 1\napprovals:\n  webhook: https://hooks.example/abc\n",
        3,
        3,
        "approvals needs `oidc: { issuer, client_id }`",
    );
    assert_err(
        "version: 1\napprovals:\n  oidc: { client_id: warden }\n",
        3,
        9,
        "approvals.oidc has no issuer; write the identity provider's URL",
    );
    assert_err(
        "version: 1\napprovals:\n  oidc:\n    issuer: https://login.example.com\n",
        4,
        5,
        "approvals.oidc has no client_id",
    );
}

#[test]
fn bad_approve_values() {
    let rule = |approve: &str| {
        format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ sql: {{}} }}\n    action: approve\n    approve:\n      groups: [dba]\n      {approve}\n"
        )
    };
    assert_err(
        &rule("quorum: 0"),
        10,
        15,
        "quorum 0 would release without any reviewer; write 1 (the default) or more",
    );
    assert_err(
        &rule("quorum: two"),
        10,
        15,
        "\"two\" is not a number of reviewers; write e.g. `quorum: 2`",
    );
    assert_err(
        &rule("quorum: -1"),
        10,
        15,
        "-1 is not a number of reviewers",
    );
    assert_err(
        &rule("expires: 8d"),
        10,
        16,
        "expires 8d is longer than 7 days, the longest a statement or request may wait for \
         approval; write 7d or less",
    );
    assert!(Policy::from_yaml(&rule("expires: 7d"), "p").is_ok());
    assert_err(&rule("expires: 0s"), 10, 16, "\"0s\" is zero");
    assert_err(
        &rule("expires: 15"),
        10,
        16,
        "15 has no unit; write e.g. 15s",
    );
    assert_err(&rule("expires: soon"), 10, 16, "\"soon\" is not a duration");
    assert_err(
        &rule("message: \"two\\nlines\""),
        10,
        16,
        "the message has a line break or another control character",
    );
    assert_err(
        &rule(&format!("message: {}", "x".repeat(201))),
        10,
        16,
        "the message is 201 characters long; keep it to 200",
    );
    assert_err(&rule("message: \"\""), 10, 16, "the message is empty");
    assert_err(
        &rule("timeout: 1h"),
        10,
        7,
        "unknown field `timeout` in a rule's approve (write `expires:`, e.g. `expires: 15m`); \
         expected one of: groups, quorum, expires, message",
    );
    assert_err(
        &rule("groups: [sre]"),
        10,
        7,
        "`groups` is given twice in a rule's approve",
    );
    assert_err(
        &format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ sql: {{}} }}\n    action: approve\n    approve: {{ groups: [\" dba\"] }}\n"
        ),
        8,
        25,
        "\" dba\" is not a group",
    );
    assert_err(
        &format!(
            "{APPROVALS}rules:\n  - name: r\n    when: {{ sql: {{}} }}\n    action: approve\n    approve: [dba]\n"
        ),
        8,
        14,
        "expected approve: a mapping with groups",
    );
}

#[test]
fn bad_approvals_values() {
    // The keys on line 5; an issuer after them unless they give one.
    let oidc = |keys: &str| {
        let issuer = if keys.starts_with("issuer") {
            ""
        } else {
            "    issuer: https://login.example.com\n"
        };
        format!("version: 1\napprovals:\n  oidc:\n    client_id: warden\n    {keys}\n{issuer}")
    };
    assert_err(
        &oidc("issuer: login.example.com"),
        5,
        13,
        "issuer takes an http or https URL, e.g. https://login.example.com; \
         \"login.example.com\" is not one",
    );
    assert_err(
        &oidc("issuer: \"ftp://x\""),
        5,
        13,
        "issuer takes an http or https URL",
    );
    assert_err(
        &oidc("issuer: \"https://\""),
        5,
        13,
        "issuer takes an http or https URL",
    );
    assert_err(
        &oidc("issuer: \"https://login.example.com/?a=b\""),
        5,
        13,
        "has a query; an issuer is a URL without query or fragment",
    );
    assert_err(
        &oidc("issuer: https://login.example.com/.well-known/openid-configuration"),
        5,
        13,
        "is a discovery document; write the issuer itself: `issuer: https://login.example.com`",
    );
    assert_err(
        &oidc("client_secret: hunter2"),
        5,
        5,
        "unknown field `client_secret` under approvals.oidc (a secret never goes in the \
         policy: write `client_secret_env: VARIABLE` or `client_secret_file: /path/to/file`)",
    );
    assert_err(
        &oidc("client_secret_env: UNSET_OIDC_SECRET_FOR_TEST"),
        5,
        24,
        "approvals.oidc: the environment variable UNSET_OIDC_SECRET_FOR_TEST is not set in the \
         agent's environment; set it where the agent starts (e.g. `Environment=` or \
         `EnvironmentFile=` in its systemd unit), or write `client_secret_file:` instead",
    );
    let e = err(&oidc("client_secret_env: \"hunter2 pass\""));
    assert!(
        e.starts_with("policy.yaml:5:24: approvals.oidc: client_secret_env takes the name of an environment variable")
            && !e.contains("hunter2"),
        "{e}"
    );
    assert_err(
        &oidc("client_secret_file: secrets/oidc"),
        5,
        25,
        "approvals.oidc: client_secret_file \"secrets/oidc\" is not an absolute path; write e.g. \
         /etc/warden/secrets/oidc",
    );
    assert_err(
        &oidc("client_secret_file: /nonexistent/warden/oidc"),
        5,
        25,
        "approvals.oidc: cannot read client_secret_file /nonexistent/warden/oidc",
    );
    assert_err(
        &oidc("client_secret_env: A\n    client_secret_file: /b"),
        6,
        5,
        "approvals.oidc has both client_secret_env and client_secret_file; keep one",
    );
    assert_err(
        &oidc("client_id: x"),
        5,
        5,
        "`client_id` is given twice under approvals.oidc",
    );
    assert_err(
        &oidc("groups_claim: \"\""),
        5,
        19,
        "\"\" is not a claim name",
    );
    assert_err(
        "version: 1\napprovals:\n  oidc: { issuer: \"https://x\", client_id: \"war den\" }\n",
        3,
        43,
        "\"war den\" is not a client id",
    );
    // The webhook's URL is never echoed: it is often its secret.
    let e = err(
        "version: 1\napprovals:\n  oidc: { issuer: \"https://x\", client_id: w }\n  webhook: hooks.example/s3cret\n",
    );
    assert!(
        e.starts_with("policy.yaml:4:12: webhook takes an http or https URL")
            && !e.contains("s3cret"),
        "{e}"
    );
    assert_err(
        "version: 1\napprovals:\n  issuer: https://x\n",
        3,
        3,
        "unknown field `issuer` under approvals (the issuer goes under oidc",
    );
    assert_err(
        "version: 1\noidc: { issuer: https://x }\n",
        2,
        1,
        "unknown field `oidc` at the top level (oidc goes under approvals",
    );
}

#[test]
fn bad_owners() {
    assert_err(
        "version: 1\nworkloads:\n  w:\n    match: { uid: 1 }\n    owners: []\n",
        5,
        13,
        "this list is empty, so it would match nothing; give at least one owner",
    );
    assert_err(
        "version: 1\nworkloads:\n  w:\n    match: { uid: 1 }\n    owners: [\"alice smith\"]\n",
        5,
        14,
        "\"alice smith\" is not an owner; write the person's OIDC subject, email or username",
    );
    assert_err(
        "version: 1\nworkloads:\n  w:\n    owner: alice\n    match: { uid: 1 }\n",
        4,
        5,
        "unknown field `owner` in a workload (write `owners:`",
    );
    assert_err(
        "version: 1\nworkloads:\n  w: { owners: alice }\n",
        3,
        6,
        "a workload needs a match",
    );
    let p = Policy::from_yaml(
        "version: 1\nworkloads:\n  w: { match: { uid: 1 }, owners: alice }\n",
        "p",
    )
    .unwrap();
    assert_eq!(p.owners_of("w"), ["alice"]);
}

#[test]
fn budgets_are_keyed_by_workload_with_tokens_per_day_and_providers() {
    let p = Policy::from_yaml(
        "\
version: 1
workloads:
  support-bot: { match: { uid: 1000 } }
  batch-job: { match: { uid: 1001 } }
budgets:
  support-bot: { tokens_per_day: 200000 }
  batch-job:
    tokens_per_day: \"1000000\"
    providers: openai
",
        "policy.yaml",
    )
    .unwrap();
    let bot = p.budget_of("support-bot").unwrap();
    assert_eq!(
        (bot.tokens_per_day, bot.providers.as_deref()),
        (200_000, None)
    );
    assert_eq!(bot.audit_rule(), "budgets.support-bot");
    let batch = p.budget_of("batch-job").unwrap();
    assert_eq!(
        (batch.tokens_per_day, batch.providers.as_deref()),
        (1_000_000, Some(&["openai"][..]))
    );
    assert!(p.budget_of("nobody").is_none());
    assert_eq!(p.budgets().len(), 2);
    assert!(p.summary().contains(", 2 token budgets"), "{}", p.summary());
}

#[test]
fn budget_errors_name_their_line() {
    let head = "version: 1\nworkloads:\n  bot: { match: { uid: 1000 } }\n  job: { match: { uid: 1001 } }\nbudgets:\n";
    assert_eq!(
        err(&format!("{head}  b0t: {{ tokens_per_day: 10 }}\n")),
        "policy.yaml:6:3: budgets name workload `b0t`, which is not defined under workloads:; \
         defined: bot, job; a budget is keyed by the name of the workload whose LLM calls it counts"
    );
    assert_err(
        &format!("{head}  bot: {{ tokens_per_day: 0 }}\n"),
        6,
        26,
        "tokens_per_day 0 would refuse every LLM call",
    );
    assert_err(
        &format!("{head}  bot: {{ tokens_per_day: 200k }}\n"),
        6,
        26,
        "\"200k\" is not a number of tokens",
    );
    assert_err(
        &format!("{head}  bot: {{ tokens_per_day: -5 }}\n"),
        6,
        26,
        "-5 is not a number of tokens",
    );
    assert_err(
        &format!("{head}  bot: {{ providers: [openai] }}\n"),
        6,
        8,
        "the budget of workload `bot` does not say how many tokens",
    );
    assert_err(
        &format!("{head}  bot: {{ tokens_per_day: 10, providers: [azure] }}\n"),
        6,
        42,
        "\"azure\" is not an LLM provider",
    );
    assert_err(
        &format!("{head}  bot: {{ tokens: 10 }}\n"),
        6,
        10,
        "unknown field `tokens` in a budget (write `tokens_per_day:`)",
    );
    assert_err(
        &format!("{head}  bot: {{ tokens_per_day: 10 }}\n  bot: {{ tokens_per_day: 20 }}\n"),
        7,
        3,
        "budget `bot` is defined twice under budgets:",
    );
    assert_err(
        "version: 1\nbudget: {}\n",
        2,
        1,
        "write `budgets:`, keyed by workload name",
    );
    // Without workloads, the message says none is defined.
    assert_err(
        "version: 1\nbudgets:\n  bot: { tokens_per_day: 10 }\n",
        3,
        3,
        "defined: none",
    );
}
