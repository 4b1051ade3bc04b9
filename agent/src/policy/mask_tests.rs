//! Masking in the policy: `mask` on statement rules, `sql_mask`, custom
//! `detectors` and `presets`, what each decision carries, and every load
//! error with its line and column.
use std::net::SocketAddr;

use super::tests::policy;
use super::*;
use crate::policy::parse::tests::{assert_err, err};

fn identity(uid: u32) -> Identity {
    Identity {
        pid: 4242,
        uid,
        comm: "python3".into(),
        ..Default::default()
    }
}

/// The decision for a statement of `class` reading `tables`, by uid 1000,
/// to 10.0.4.12:5432.
fn statement(p: &Policy, class: &str, tables: &[&str]) -> Decision {
    let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    p.decide_statement(&StatementRequest {
        identity: &identity(1000),
        destination: "10.0.4.12:5432".parse().unwrap(),
        database: Some("crm"),
        db_user: Some("app"),
        class,
        tables_read: &tables,
        tables_written: &[],
        functions: &[],
        from_llm: false,
    })
}

fn connection(p: &Policy, destination: &str) -> Decision {
    let destination: SocketAddr = destination.parse().unwrap();
    p.decide_connection(&ConnectionRequest {
        identity: &identity(1000),
        destination,
        transport: Transport::Tcp,
    })
}

/// The detectors (presets expanded) of the mask of rule `name`.
fn rule_detectors(p: &Policy, name: &str) -> Vec<String> {
    let rule = p.rules.iter().find(|r| r.name == name).unwrap();
    rule.mask
        .as_ref()
        .expect("the rule has a mask")
        .detectors
        .clone()
}

const CARD: &str = "4111 1111 1111 1111";

#[test]
fn a_mask_on_an_allowing_statement_rule_is_compiled() {
    let p = policy(
        r#"
version: 1
targets:
  crm-db: { address: 10.0.4.12, port: 5432, protocol: postgres }
rules:
  - name: mask-crm-reads
    when: { target: crm-db, sql: { class: read, tables: "crm.*" } }
    action: allow
    mask: { columns: ["*email*", "*Phone*"], detectors: [payment] }
  - name: no-writes
    when: { sql: { class: write } }
    action: deny
  - name: plain-reads
    when: { sql: { class: read } }
    action: allow
  - name: crm-connections
    when: { target: crm-db }
    action: allow
"#,
    );
    let d = statement(&p, "read", &["crm.customers"]);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Allow, "mask-crm-reads")
    );
    let masker = d
        .mask
        .as_ref()
        .expect("the decision carries the rule's mask");
    // Column globs ignore case and match the whole name.
    for column in ["email", "customer_email", "EMAIL_ADDRESS", "home_phone"] {
        assert!(masker.masks_column(column), "{column}");
    }
    for column in ["id", "name", "mail"] {
        assert!(!masker.masks_column(column), "{column}");
    }
    // The payment preset finds cards in any text value.
    let text = format!("card {CARD} on file");
    let (masked, found) = masker.mask_text(&text);
    assert_eq!(found, 1);
    assert!(
        !masked.contains(CARD) && masked.ends_with("1111 on file"),
        "{masked}"
    );
    assert_eq!(rule_detectors(&p, "mask-crm-reads"), ["card", "iban"]);

    // Every decision of that rule shares one compiled masker.
    let again = statement(&p, "read", &["crm.orders"]);
    assert!(Arc::ptr_eq(masker, again.mask.as_ref().unwrap()));
    assert_eq!(d, again.clone());
    assert!(format!("{d:?}").contains("Masker"), "{d:?}");

    // Other rules, the default and connections carry no mask.
    let denied = statement(&p, "write", &["crm.orders"]);
    assert_eq!((denied.action, denied.mask.is_none()), (Action::Deny, true));
    let unmasked = statement(&p, "read", &["public.t"]);
    assert_eq!(unmasked.rule, "plain-reads");
    assert!(unmasked.mask.is_none());
    assert!(statement(&p, "session", &[]).mask.is_none());
    let c = connection(&p, "10.0.4.12:5432");
    assert_eq!(c.rule, "crm-connections");
    assert!(c.mask.is_none());
    assert_ne!(d, unmasked);
    assert_eq!(p.masking_rule_count(), 1);
    assert!(p.sql_mask().is_none());
    assert_eq!(
        p.summary(),
        "4 rules, 3 of them for SQL statements, 1 with a mask, 0 workloads, 1 target"
    );
}

#[test]
fn sql_mask_masks_statements_no_rule_matches() {
    let p = policy(
        r#"
version: 1
sql_mask: { columns: ssn, detectors: [secrets] }
rules:
  - { name: reads, when: { sql: { class: read } }, action: allow }
  - { name: masked-reads, when: { sql: { class: read } }, action: allow, mask: { columns: "*" } }
  - { name: no-ddl, when: { sql: { class: ddl } }, action: deny }
"#,
    );
    let sql_mask = p.sql_mask().expect("sql_mask is compiled");
    assert!(sql_mask.masks_column("SSN") && !sql_mask.masks_column("ssn_hash"));
    assert!(sql_mask.has_detectors());
    let d = statement(&p, "write", &["t"]);
    assert_eq!((d.action, d.rule.as_str()), (Action::Allow, DEFAULT_RULE));
    assert!(Arc::ptr_eq(d.mask.as_ref().unwrap(), sql_mask));
    // A rule that decides masks with its own mask, or not at all.
    assert!(statement(&p, "read", &["t"]).mask.is_none());
    assert!(statement(&p, "ddl", &[]).mask.is_none());
    assert!(connection(&p, "192.0.2.1:443").mask.is_none());
    // With sql_mask, statements need deciding even without statement rules.
    let only_mask = policy("version: 1\nsql_mask: { detectors: ssn }\n");
    assert!(only_mask.has_statement_rules());
    assert_eq!(only_mask.statement_rule_count(), 0);
    assert!(statement(&only_mask, "read", &[]).mask.is_some());
    assert_eq!(
        p.summary(),
        "3 rules, 3 of them for SQL statements, 1 with a mask, 0 workloads, 0 targets; sql_mask \
         masks columns \"ssn\" and detectors aws_key, jwt, private_key, api_key"
    );
}

#[test]
fn presets_and_custom_detectors_expand_in_order() {
    // Presets and detectors may be defined after the rules that name them.
    let p = policy(
        r#"
version: 1
rules:
  - name: r
    when: { sql: {} }
    action: allow
    mask: { detectors: [crm-sensitive, ssn, card] }
presets:
  crm-sensitive: [payment, ids, ssn]
  ids: [employee_id, badge]
detectors:
  employee_id: { pattern: 'EMP-\d{6}' }
  badge: { pattern: 'B(?P<value>\d{4}-\d{4})', checksum: luhn }
"#,
    );
    // In order of first mention, each once.
    assert_eq!(
        rule_detectors(&p, "r"),
        ["card", "iban", "employee_id", "badge", "ssn"]
    );
    let masker = statement(&p, "read", &[]).mask.unwrap();
    let (masked, found) = masker.mask_text("by EMP-123456 at desk 4");
    assert_eq!(found, 1);
    assert_eq!(masked, "by [REDACTED:employee_id] at desk 4");
    // Only the `value` group is masked, and only when its digits pass the
    // Luhn check: 1234-5674 does, 1234-5678 does not.
    assert_eq!(masker.mask_text("B1234-5674").0, "B[REDACTED:badge]");
    assert_eq!(masker.mask_text("B1234-5678").1, 0);
    // A checksum is written in lower or upper case.
    assert!(
        Policy::from_yaml(
            "version: 1\ndetectors:\n  d: { pattern: 'x\\d+', checksum: MOD97 }\n",
            "p"
        )
        .is_ok()
    );
}

#[test]
fn the_embedded_default_masks_what_the_builtin_detectors_find() {
    let p = Policy::embedded_default();
    let sql_mask = p.sql_mask().expect("the default has a sql_mask");
    assert_eq!(
        p.sql_mask.as_ref().unwrap().detectors,
        [
            "card",
            "iban",
            "ssn",
            "aws_key",
            "jwt",
            "private_key",
            "api_key"
        ]
    );
    assert!(p.sql_mask.as_ref().unwrap().columns.is_empty());
    assert_eq!(p.sql_default(), Action::Allow);
    assert_eq!(p.default_action(), DefaultAction::Audit);
    for class in STATEMENT_CLASSES {
        let d = statement(&p, class, &["crm.customers"]);
        assert_eq!((d.action, d.rule.as_str()), (Action::Allow, DEFAULT_RULE));
        assert!(Arc::ptr_eq(d.mask.as_ref().unwrap(), sql_mask), "{class}");
    }
    let text = format!("ssn 123-45-6789, card {CARD}, key AKIAIOSFODNN7EXAMPLE");
    let (masked, found) = sql_mask.mask_text(&text);
    assert_eq!(found, 3, "{masked}");
    assert!(
        !masked.contains("123-45-6789") && !masked.contains(CARD) && !masked.contains("AKIA"),
        "{masked}"
    );
    assert_eq!(sql_mask.mask_text("order 42 shipped").1, 0);
    assert!(!sql_mask.masks_column("email"));
    assert!(connection(&p, "10.0.4.12:5432").mask.is_none());
    assert_eq!(
        p.summary(),
        "0 rules, 0 workloads, 0 targets; sql_mask masks detectors card, iban, ssn, aws_key, jwt, \
         private_key, api_key; prompt_redact redacts detectors card, iban, ssn, aws_key, jwt, \
         private_key, api_key; response_mask masks detectors card, iban, ssn, aws_key, jwt, \
         private_key, api_key"
    );
}

// ---------------------------------------------------------------------------
// Where a mask may go

#[test]
fn a_mask_on_a_deny_rule_is_an_error_at_the_mask() {
    let src = "\
version: 1
rules:
  - name: no-cards
    when: { sql: { tables: \"*card*\" } }
    action: deny
    mask: { columns: [number] }
";
    assert_eq!(
        err(src),
        "policy.yaml:6:5: rule `no-cards` denies, and a denied statement returns no rows to \
         mask; mask goes with `action: allow` or `action: approve`: make the rule allow, or \
         remove its mask"
    );
    // The action after the mask: still at the mask.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    mask: { detectors: card }\n    when: { sql: {} }\n    action: deny\n",
        4,
        5,
        "rule `r` denies",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: a, when: { sql: {} }, action: allow }\n  - { name: b, action: deny, mask: { columns: x }, when: { sql: {} } }\n",
        4,
        30,
        "rule `b` denies",
    );
}

#[test]
fn a_mask_on_a_connection_rule_is_an_error_at_the_mask() {
    let src = "\
version: 1
targets:
  crm-db: { address: 10.0.4.12, port: 5432 }
rules:
  - name: crm
    when: { target: crm-db }
    action: allow
    mask:
      columns: [\"*email*\"]
";
    assert_eq!(
        err(src),
        "policy.yaml:8:5: rule `crm` has a mask but no sql matcher, so it decides connections; \
         mask applies to the rows a statement returns: add an sql matcher, e.g. `when: { ..., \
         sql: { class: read } }`"
    );
    // No when at all, and the mask first.
    assert_err(
        "version: 1\nrules:\n  - name: everything\n    mask: { detectors: [ssn] }\n    action: allow\n",
        4,
        5,
        "rule `everything` has a mask but no sql matcher",
    );
    // A mask inside when, or at the top level, says where it goes.
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: {}, mask: { columns: x } }, action: allow }\n",
        3,
        33,
        "unknown field `mask` in a rule's when (mask goes in the rule, next to its action",
    );
    assert_err(
        "version: 1\nmask: { detectors: ssn }\n",
        2,
        1,
        "unknown field `mask` at the top level (write `sql_mask:` to mask the rows of statements \
         no rule matches, or `mask:` in a statement rule)",
    );
}

#[test]
fn sql_mask_needs_sql_default_allow() {
    for src in [
        "version: 1\nsql_default: deny\nsql_mask: { detectors: ssn }\n",
        "version: 1\nsql_mask: { detectors: ssn }\nsql_default: deny\n",
    ] {
        let line = src.lines().position(|l| l.starts_with("sql_mask")).unwrap() + 1;
        assert_err(
            src,
            line,
            1,
            "sql_mask masks the rows of statements no rule matches, but `sql_default: deny` \
             refuses those statements; remove sql_mask, or write `sql_default: allow`",
        );
    }
}

// ---------------------------------------------------------------------------
// Names, patterns and globs

#[test]
fn an_unknown_detector_is_an_error_at_its_name_with_the_list() {
    let src = "\
version: 1
detectors:
  employee_id: { pattern: 'EMP-\\d{6}' }
presets:
  hr: [employee_id, ssn]
rules:
  - name: r
    when: { sql: { class: read } }
    action: allow
    mask:
      detectors:
        - payment
        - emial
";
    assert_eq!(
        err(src),
        "policy.yaml:13:11: rule `r` names `emial`, which is not a detector or a preset (did you \
         mean `email`?); built-in detectors: card, ssn, email, phone, iban, aws_key, jwt, \
         private_key, api_key, url_password, bearer_token; built-in presets: contact (email, \
         phone), personal (ssn, email, phone), payment (card, iban), secrets (aws_key, jwt, \
         private_key, api_key), all (every built-in detector); defined under detectors: \
         employee_id; defined under presets: hr"
    );
    assert_err(
        "version: 1\nsql_mask: { detectors: [card, passport] }\n",
        2,
        31,
        "sql_mask names `passport`, which is not a detector or a preset; built-in detectors: card,",
    );
    // In a preset, at the member.
    assert_err(
        "version: 1\npresets:\n  mine: [card, iban_strict]\n",
        3,
        16,
        "preset `mine` names `iban_strict`, which is not a detector or a preset",
    );
    // Names are exact.
    assert_err(
        "version: 1\nsql_mask: { detectors: SSN }\n",
        2,
        24,
        "sql_mask names `SSN`, which is not a detector or a preset (did you mean `ssn`?)",
    );
}

#[test]
fn a_bad_custom_detector_is_an_error_at_its_pattern() {
    let src = "\
version: 1
detectors:
  employee_id:
    pattern: 'EMP-\\d{6'
";
    let e = err(src);
    assert!(
        e.starts_with(
            "policy.yaml:4:14: detector `employee_id`: the pattern is not a valid regex: regex \
             parse error:"
        ) && e.contains("unclosed counted repetition"),
        "{e}"
    );
    assert_err(
        "version: 1\ndetectors:\n  e: { pattern: '(?<=a)b' }\n",
        3,
        17,
        "detector `e`: the pattern is not a valid regex",
    );
    assert_err(
        "version: 1\ndetectors:\n  e: { pattern: 'a*' }\n",
        3,
        17,
        "detector `e`: the pattern `a*` matches the empty string",
    );
    assert_err(
        "version: 1\ndetectors:\n  e: { pattern: '' }\n",
        3,
        17,
        "detector `e` has an empty pattern",
    );
    assert_err(
        "version: 1\ndetectors:\n  e: { checksum: luhn }\n",
        3,
        6,
        "detector `e` has no pattern; write e.g. `e: { pattern: 'EMP-\\d{6}' }`",
    );
    assert_err(
        "version: 1\ndetectors:\n  e: { pattern: 'x\\d+', checksum: crc32 }\n",
        3,
        35,
        "\"crc32\" is not a checksum; write `checksum: luhn` (card numbers) or `checksum: mod97` \
         (IBANs), or leave it out",
    );
    assert_err(
        "version: 1\ndetectors:\n  e: { regex: 'x+' }\n",
        3,
        8,
        "unknown field `regex` in a detector (write `pattern:`); expected one of: pattern, \
         checksum",
    );
}

#[test]
fn detector_and_preset_names_are_unique() {
    assert_err(
        "version: 1\ndetectors:\n  card: { pattern: 'x+' }\n",
        3,
        3,
        "`card` is a built-in detector; a detector defined here needs a name of its own",
    );
    assert_err(
        "version: 1\ndetectors:\n  payment: { pattern: 'x+' }\n",
        3,
        3,
        "`payment` is a built-in preset",
    );
    assert_err(
        "version: 1\ndetectors:\n  a: { pattern: 'x+' }\n  a: { pattern: 'y+' }\n",
        4,
        3,
        "detector `a` is defined twice under detectors:",
    );
    assert_err(
        "version: 1\npresets:\n  secrets: [ssn]\n",
        3,
        3,
        "`secrets` is a built-in preset (aws_key, jwt, private_key, api_key); name yours \
         differently, and list `secrets` in it to build on it",
    );
    assert_err(
        "version: 1\npresets:\n  ssn: [card]\n",
        3,
        3,
        "`ssn` is a built-in detector; a preset needs a name of its own",
    );
    // A preset named like a detector defined later in the file.
    assert_err(
        "version: 1\npresets:\n  emp: [ssn]\ndetectors:\n  emp: { pattern: 'x+' }\n",
        3,
        3,
        "`emp` is defined under detectors:; a preset needs a name of its own",
    );
    // ...also when a rule naming the preset comes first.
    assert_err(
        "version: 1\nsql_mask: { detectors: emp }\npresets:\n  emp: [ssn]\ndetectors:\n  emp: { pattern: 'x+' }\n",
        4,
        3,
        "`emp` is defined under detectors:; a preset needs a name of its own",
    );
    assert_err(
        &format!(
            "version: 1\ndetectors:\n  {}: {{ pattern: 'x+' }}\n",
            "d".repeat(65)
        ),
        3,
        3,
        "is longer than 64 characters",
    );
}

#[test]
fn presets_may_not_include_themselves() {
    assert_err(
        "version: 1\npresets:\n  a: [ssn, b]\n  b: [card, a]\n",
        3,
        12,
        "preset `a` names `b`, but presets include one another in a circle: b -> a -> b",
    );
    assert_err(
        "version: 1\npresets:\n  a: [a]\n",
        3,
        7,
        "preset `a` names `a`, but presets include one another in a circle: a -> a",
    );
    // Named by a rule before the presets: at the rule's name.
    assert_err(
        "version: 1\nsql_mask: { detectors: [c] }\npresets:\n  c: [d]\n  d: [c]\n",
        2,
        25,
        "sql_mask names `c`, but presets include one another in a circle: c -> d -> c",
    );
}

#[test]
fn a_mask_says_what_to_mask() {
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: {} }, action: allow, mask: {} }\n",
        3,
        56,
        "the mask of rule `r` says nothing to mask; give columns, detectors or both",
    );
    assert_err(
        "version: 1\nsql_mask:\n",
        2,
        10,
        "the mask of sql_mask says nothing to mask",
    );
    assert_err(
        "version: 1\nsql_mask: { columns: [] }\n",
        2,
        22,
        "this list is empty, so it would match nothing; give at least one column",
    );
    assert_err(
        "version: 1\nsql_mask: { detectors: [] }\n",
        2,
        24,
        "give at least one detector or preset name",
    );
    assert_err(
        "version: 1\nsql_mask: { column: ssn }\n",
        2,
        13,
        "unknown field `column` in a mask (write `columns:`, which takes one glob or a list); \
         expected one of: columns, detectors",
    );
    assert_err(
        "version: 1\nsql_mask: { columns: [\"*email*\", \"card[0]\"] }\n",
        2,
        34,
        "\"card[0]\" is not a valid column glob: `[` is reserved: only `*` (any run of \
         characters) and `?` (one character) are wildcards; write e.g. \"*email*\"",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { sql: {} }, action: mask }\n",
        3,
        43,
        "`action: mask` is not an action; masking is `action: allow` with a mask on a statement \
         rule",
    );
}

#[test]
fn masks_in_every_style_parse() {
    let p = policy(
        r#"
version: 1
detectors:
  ticket:
    pattern: 'TCK-[0-9]+'
presets:
  mine:
    - ticket
    - contact
  one: ssn
sql_mask:
  columns: "*secret*"
rules:
  - name: anchors
    when: { sql: &read { class: read } }
    action: allow
    mask: &m
      columns:
        - "*email*"
        - ssn
      detectors: mine
  - name: reused
    when: { sql: *read, target: db }
    action: allow
    mask: *m
  - name: one-name-is-a-list
    when: { sql: {} }
    action: allow
    mask: { detectors: one }
targets:
  db: { port: 5432 }
"#,
    );
    assert_eq!(rule_detectors(&p, "anchors"), ["ticket", "email", "phone"]);
    assert_eq!(rule_detectors(&p, "reused"), ["ticket", "email", "phone"]);
    assert_eq!(rule_detectors(&p, "one-name-is-a-list"), ["ssn"]);
    let sql_mask = p.sql_mask().unwrap();
    assert!(sql_mask.masks_column("client_secret") && !sql_mask.has_detectors());
    assert_eq!(p.masking_rule_count(), 3);
}
