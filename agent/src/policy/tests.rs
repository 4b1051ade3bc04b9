//! Deciding: matching workloads and targets, first match wins, defaults; and
//! the shipped policies and the JSON Schema.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use super::*;

/// A policy from YAML; a load error fails the test with its message.
pub(super) fn policy(src: &str) -> Policy {
    Policy::from_yaml(src, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// A python3 process: uid 998 runs in the service `unit`, any other uid in
/// a login session's scope.
pub(super) fn process(uid: u32, unit: &str) -> Identity {
    Identity {
        pid: 4242,
        uid,
        comm: "python3".into(),
        unit: Some(if uid == 998 { unit } else { "session-2.scope" }.into()),
        ..Default::default()
    }
}

fn who(uid: u32) -> Identity {
    Identity {
        pid: 4242,
        uid,
        comm: "python3".into(),
        exe: Some("/usr/bin/python3.12".into()),
        user: Some("alice".into()),
        unit: Some("support-bot.service".into()),
        cgroup_path: Some("/system.slice/support-bot.service".into()),
        ..Default::default()
    }
}

fn tcp(p: &Policy, id: &Identity, dest: &str) -> Decision {
    let destination: SocketAddr = dest.parse().unwrap();
    p.decide_connection(&ConnectionRequest {
        identity: id,
        destination,
        transport: Transport::Tcp,
    })
}

/// (action, rule, workload) for short assertions.
fn short(d: Decision) -> (Action, String, Option<String>) {
    (d.action, d.rule, d.workload)
}

fn allow(rule: &str, workload: Option<&str>) -> (Action, String, Option<String>) {
    (Action::Allow, rule.into(), workload.map(Into::into))
}

fn deny(rule: &str, workload: Option<&str>) -> (Action, String, Option<String>) {
    (Action::Deny, rule.into(), workload.map(Into::into))
}

#[test]
fn uid_lists() {
    let p = policy(
        "version: 1\nworkloads:\n  notebooks: { match: { uid: [1000, 1001] } }\nrules:\n  - { name: r, when: { workload: notebooks }, action: deny }\n",
    );
    assert_eq!(
        short(tcp(&p, &who(1000), "192.0.2.1:443")),
        deny("r", Some("notebooks"))
    );
    assert_eq!(
        short(tcp(&p, &who(1001), "192.0.2.1:443")),
        deny("r", Some("notebooks"))
    );
    assert_eq!(
        short(tcp(&p, &who(1002), "192.0.2.1:443")),
        allow("default", None)
    );
}

#[test]
fn exe_unit_and_other_selectors() {
    let p = policy(
        r#"
version: 1
workloads:
  bot:      { match: { exe: "/usr/bin/python3*", unit: "support-bot.service" } }
  services: { match: { unit: "*.service" } }
  by-user:  { match: { user: [bob, alice] } }
  by-comm:  { match: { comm: "py*" } }
  in-slice: { match: { cgroup: "/system.slice/*" } }
  box:      { match: { container: "ABCdef" } }
"#,
    );
    let bot = who(0);
    assert_eq!(p.workload_of(&bot), Some("bot"));

    // All keys of a match must hold: same unit, other exe.
    let mut node = who(0);
    node.exe = Some("/usr/bin/node".into());
    assert_eq!(p.workload_of(&node), Some("services"));

    // A key whose value the identity lacks does not hold.
    let mut gone = who(0);
    gone.exe = None;
    assert_eq!(p.workload_of(&gone), Some("services"));

    let mut other = Identity {
        uid: 1,
        comm: "curl".into(),
        ..Default::default()
    };
    assert_eq!(p.workload_of(&other), None);
    other.user = Some("bob".into());
    assert_eq!(p.workload_of(&other), Some("by-user"));
    other.user = None;
    other.comm = "pytest".into();
    assert_eq!(p.workload_of(&other), Some("by-comm"));
    other.comm = "curl".into();
    other.cgroup_path = Some("/system.slice/cron.service/x".into());
    assert_eq!(p.workload_of(&other), Some("in-slice"));
    other.cgroup_path = Some("/user.slice".into());
    other.container_id = Some("abcdef0123".into());
    assert_eq!(p.workload_of(&other), Some("box"));
    other.container_id = Some("0abcdef".into());
    assert_eq!(p.workload_of(&other), None);
}

#[test]
fn pods_match_by_namespace_and_service_account() {
    let p = policy(
        r#"
version: 1
workloads:
  support: { match: { namespace: "ai-*", service_account: support-bot } }
  ai:      { match: { namespace: ["ai-*", ml] } }
"#,
    );
    let pod = |namespace: &str, service_account: Option<&str>| Identity {
        pod: Some(crate::identity::PodIdentity {
            namespace: namespace.into(),
            name: "bot-7d9f".into(),
            uid: "0b1c7f2e-5a3d-4c8b-9e6f-2d4a1b3c5e7f".into(),
            container: Some("bot".into()),
            service_account: service_account.map(Into::into),
        }),
        ..who(1000)
    };
    assert_eq!(
        p.workload_of(&pod("ai-prod", Some("support-bot"))),
        Some("support")
    );
    assert_eq!(p.workload_of(&pod("ai-prod", Some("batch"))), Some("ai"));
    // A pod whose token the node does not show has no service account.
    assert_eq!(p.workload_of(&pod("ai-prod", None)), Some("ai"));
    assert_eq!(p.workload_of(&pod("ml", Some("support-bot"))), Some("ai"));
    assert_eq!(p.workload_of(&pod("default", Some("support-bot"))), None);
    // Not in a pod: neither key holds.
    assert_eq!(p.workload_of(&who(1000)), None);
}

#[test]
fn cidrs_v4_and_v6() {
    let p = policy(
        r#"
version: 1
default: deny
targets:
  internal: { address: ["10.0.0.0/8", "fd00::/8"] }
  one:      { address: 192.0.2.7 }
  all-v4:   { address: 0.0.0.0/0 }
rules:
  - { name: internal, when: { target: internal }, action: allow }
  - { name: one, when: { target: one }, action: allow }
  - { name: v4, when: { target: all-v4, port: 25 }, action: allow }
"#,
    );
    let id = who(1);
    assert_eq!(short(tcp(&p, &id, "10.1.2.3:80")), allow("internal", None));
    assert_eq!(short(tcp(&p, &id, "[fd12::1]:80")), allow("internal", None));
    assert_eq!(short(tcp(&p, &id, "11.0.0.1:80")), deny("default", None));
    assert_eq!(short(tcp(&p, &id, "[fe80::1]:80")), deny("default", None));
    assert_eq!(short(tcp(&p, &id, "192.0.2.7:1")), allow("one", None));
    assert_eq!(short(tcp(&p, &id, "192.0.2.8:1")), deny("default", None));
    // An IPv4 network never matches an IPv6 address, nor the reverse.
    assert_eq!(short(tcp(&p, &id, "198.51.100.1:25")), allow("v4", None));
    assert_eq!(
        short(tcp(&p, &id, "[2001:db8::1]:25")),
        deny("default", None)
    );
    let v6 = policy(
        "version: 1\ndefault: deny\nrules:\n  - { name: v6, when: { address: \"::/0\" }, action: allow }\n",
    );
    assert_eq!(short(tcp(&v6, &id, "[2001:db8::1]:1")), allow("v6", None));
    assert_eq!(short(tcp(&v6, &id, "0.0.0.0:1")), deny("default", None));
    assert_eq!(short(tcp(&v6, &id, "127.0.0.1:1")), deny("default", None));
}

#[test]
fn ports_and_ranges() {
    let p = policy(
        r#"
version: 1
default: deny
targets:
  web: { address: 10.0.0.0/8, port: [80, 443, "8000-8099"] }
rules:
  - { name: web, when: { target: web }, action: allow }
  - { name: dns-over-tls, when: { port: 853 }, action: allow }
"#,
    );
    let id = who(1);
    for ok in [
        "10.0.0.1:80",
        "10.0.0.1:443",
        "10.0.0.1:8000",
        "10.0.0.1:8050",
        "10.0.0.1:8099",
    ] {
        assert_eq!(short(tcp(&p, &id, ok)), allow("web", None), "{ok}");
    }
    for no in [
        "10.0.0.1:81",
        "10.0.0.1:7999",
        "10.0.0.1:8100",
        "11.0.0.1:80",
    ] {
        assert_eq!(short(tcp(&p, &id, no)), deny("default", None), "{no}");
    }
    assert_eq!(
        short(tcp(&p, &id, "9.9.9.9:853")),
        allow("dns-over-tls", None)
    );
}

#[test]
fn first_match_wins() {
    let p = policy(
        r#"
version: 1
workloads:
  bot: { match: { uid: 7 } }
targets:
  internal: { address: 10.0.0.0/8 }
  db:       { address: 10.0.4.12, port: 5432 }
rules:
  - { name: bot-db, when: { workload: bot, target: db }, action: allow }
  - { name: bot-internal, when: { workload: bot, target: internal }, action: deny }
  - { name: anyone-db, when: { target: db }, action: deny }
  - { name: anyone-db-again, when: { target: db }, action: allow }
"#,
    );
    assert_eq!(
        short(tcp(&p, &who(7), "10.0.4.12:5432")),
        allow("bot-db", Some("bot"))
    );
    assert_eq!(
        short(tcp(&p, &who(7), "10.0.4.13:5432")),
        deny("bot-internal", Some("bot"))
    );
    assert_eq!(
        short(tcp(&p, &who(8), "10.0.4.12:5432")),
        deny("anyone-db", None)
    );
    assert_eq!(
        short(tcp(&p, &who(8), "10.9.9.9:1")),
        allow("default", None)
    );
}

#[test]
fn all_keys_of_a_when_must_hold() {
    let p = policy(
        r#"
version: 1
workloads:
  a: { match: { uid: 1 } }
  b: { match: { uid: 2 } }
targets:
  internal: { address: 10.0.0.0/8 }
rules:
  - name: narrow
    when: { workload: [a, b], target: internal, address: 10.0.4.0/24, port: 22 }
    action: deny
  - name: catch-all
    action: deny
"#,
    );
    assert_eq!(
        short(tcp(&p, &who(1), "10.0.4.1:22")),
        deny("narrow", Some("a"))
    );
    assert_eq!(
        short(tcp(&p, &who(2), "10.0.4.1:22")),
        deny("narrow", Some("b"))
    );
    // Each key failing on its own falls through to the rule with no when.
    assert_eq!(
        short(tcp(&p, &who(3), "10.0.4.1:22")),
        deny("catch-all", None)
    );
    assert_eq!(
        short(tcp(&p, &who(1), "10.0.5.1:22")),
        deny("catch-all", Some("a"))
    );
    assert_eq!(
        short(tcp(&p, &who(1), "10.0.4.1:23")),
        deny("catch-all", Some("a"))
    );
}

#[test]
fn a_rule_names_any_workload_the_process_matches() {
    // The process matches both; Decision reports the first, the rule names the second.
    let p = policy(
        r#"
version: 1
workloads:
  python: { match: { comm: "python*" } }
  alice:  { match: { user: alice } }
rules:
  - { name: alice-no-ssh, when: { workload: alice, port: 22 }, action: deny }
"#,
    );
    assert_eq!(
        short(tcp(&p, &who(1), "192.0.2.1:22")),
        deny("alice-no-ssh", Some("python"))
    );
}

#[test]
fn default_deny_and_audit_report_the_workload() {
    let w = "workloads:\n  nb: { match: { uid: 1000 } }\n";
    let audit = policy(&format!("version: 1\ndefault: audit\n{w}"));
    let deny_all = policy(&format!("version: 1\ndefault: deny\n{w}"));
    assert_eq!(audit.default_action(), DefaultAction::Audit);
    assert_eq!(deny_all.default_action(), DefaultAction::Deny);
    assert_eq!(
        short(tcp(&audit, &who(1000), "192.0.2.1:443")),
        allow("default", Some("nb"))
    );
    assert_eq!(
        short(tcp(&deny_all, &who(1000), "192.0.2.1:443")),
        deny("default", Some("nb"))
    );
    assert_eq!(
        short(tcp(&deny_all, &who(1), "192.0.2.1:443")),
        deny("default", None)
    );
    // Left out, the default is audit.
    let plain = policy("version: 1\n");
    assert_eq!(plain.default_action(), DefaultAction::Audit);
    assert_eq!(
        short(tcp(&plain, &who(1), "192.0.2.1:443")),
        allow("default", None)
    );
}

#[test]
fn udp_is_decided_by_its_ports() {
    let p = policy(
        "version: 1\ndefault: deny\nworkloads:\n  w: { match: { uid: 1 } }\nudp:\n  allow_ports: [123, 53, 53]\nrules:\n  - { name: all, action: deny }\n",
    );
    assert_eq!(p.udp_allowed_ports(), vec![53, 123]);
    let id = who(1);
    let udp = |dest: &str| {
        short(p.decide_connection(&ConnectionRequest {
            identity: &id,
            destination: dest.parse().unwrap(),
            transport: Transport::Udp,
        }))
    };
    assert_eq!(udp("10.0.0.2:53"), allow(UDP_RULE, Some("w")));
    assert_eq!(udp("[fd00::1]:123"), allow(UDP_RULE, Some("w")));
    assert_eq!(udp("10.0.0.2:5353"), deny(UDP_RULE, Some("w")));

    assert_eq!(policy("version: 1\n").udp_allowed_ports(), vec![53]);
    assert_eq!(
        policy("version: 1\nudp: {}\n").udp_allowed_ports(),
        vec![53]
    );
    assert_eq!(
        policy("version: 1\nudp: { allow_ports: [] }\n").udp_allowed_ports(),
        Vec::<u16>::new()
    );
}

#[test]
fn counts_and_settings() {
    let p = policy(
        "version: 1\nworkloads:\n  w: { match: { uid: 1 } }\ntargets:\n  a: { port: 1 }\n  b: { port: 2 }\nrules:\n  - { name: r, action: allow }\naudit: { rotate: 1h }\n",
    );
    assert_eq!(p.version(), 1);
    assert_eq!(
        (p.rule_count(), p.workload_count(), p.target_count()),
        (1, 1, 2)
    );
    assert_eq!(p.summary(), "1 rule, 1 workload, 2 targets");
    assert_eq!(
        p.audit_settings(),
        AuditSettings {
            dir: None,
            rotate: Some(Duration::from_secs(3600)),
            retention: None,
            on_failure: Default::default(),
        }
    );
    assert_eq!(Action::Deny.as_str(), "deny");
}

#[test]
fn embedded_default_parses_and_denies_nothing() {
    Policy::from_yaml(EMBEDDED_DEFAULT, "policies/default.yaml").unwrap_or_else(|e| panic!("{e}"));
    let p = Policy::embedded_default();
    assert_eq!(p.default_action(), DefaultAction::Audit);
    assert_eq!(p.rule_count(), 0);
    assert_eq!(p.udp_allowed_ports(), vec![53]);
    assert_eq!(p.audit_settings(), AuditSettings::default());
    for dest in ["169.254.169.254:80", "10.0.0.1:5432", "[2001:db8::1]:443"] {
        assert_eq!(short(tcp(&p, &who(0), dest)), allow("default", None));
    }
    // HTTP requests too (http_tests.rs checks their masking).
    assert_eq!(p.http_default(), Action::Allow);
    assert_eq!(p.request_rule_count(), 0);
    assert_eq!(p.credential_count(), 0);
}

pub(super) fn policies_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// The variables the shipped examples read their credentials from.
pub(super) const EXAMPLE_KEYS: &[(&str, &str)] = &[
    ("OPENAI_REAL_KEY", "sk-example-openai"),
    ("ANTHROPIC_REAL_KEY", "sk-ant-example"),
    (
        "BUILD_BOX_SSH_KEY",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nexample\n-----END OPENSSH PRIVATE KEY-----\n",
    ),
];

#[test]
fn every_shipped_policy_parses() {
    let mut files = Vec::new();
    yaml_files(&policies_dir(), &mut files);
    assert!(files.len() >= 4, "found only {files:?}");
    for file in files {
        with_test_env(EXAMPLE_KEYS, || Policy::load(&file)).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_lockdown_example_does_what_it_says() {
    let p = Policy::load(&policies_dir().join("examples/deny-metadata-and-egress.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let id = who(1000);
    assert_eq!(
        short(tcp(&p, &id, "169.254.169.254:80")),
        deny("no-cloud-metadata", None)
    );
    assert_eq!(
        short(tcp(&p, &id, "[fd00:ec2::254]:80")),
        deny("no-cloud-metadata", None)
    );
    assert_eq!(short(tcp(&p, &id, "127.0.0.1:8080")), allow("local", None));
    assert_eq!(short(tcp(&p, &id, "[::1]:8080")), allow("local", None));
    assert_eq!(
        short(tcp(&p, &id, "10.20.3.4:5432")),
        allow("internal-services", None)
    );
    assert_eq!(short(tcp(&p, &id, "10.21.0.1:5432")), deny("default", None));
    assert_eq!(
        short(tcp(&p, &id, "93.184.216.34:443")),
        deny("default", None)
    );
}

#[test]
fn the_workloads_example_does_what_it_says() {
    let p = Policy::load(&policies_dir().join("examples/workloads.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let bot = who(998);
    let mut notebook = who(1000);
    notebook.unit = Some("session-3.scope".into());
    assert_eq!(
        short(tcp(&p, &bot, "10.0.4.12:5432")),
        allow("bot-to-crm", Some("support-bot"))
    );
    assert_eq!(
        short(tcp(&p, &bot, "10.3.0.1:8080")),
        allow("bot-to-internal-web", Some("support-bot"))
    );
    assert_eq!(
        short(tcp(&p, &bot, "10.0.4.13:5432")),
        deny("bot-nothing-else-inside", Some("support-bot"))
    );
    assert_eq!(
        short(tcp(&p, &notebook, "10.0.4.13:3306")),
        deny("notebooks-not-prod", Some("notebooks"))
    );
    assert_eq!(
        short(tcp(&p, &notebook, "10.0.5.1:3306")),
        allow("default", Some("notebooks"))
    );
    assert_eq!(
        short(tcp(&p, &notebook, "192.0.2.1:587")),
        deny("no-smtp", Some("notebooks"))
    );
}

#[test]
fn the_schema_describes_the_same_keys_as_the_parser() {
    let text = include_str!("../../../docs/policy.schema.json");
    let schema: serde_json::Value = serde_json::from_str(text).expect("the schema is JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    for (pointer, fields) in parse::SCHEMA_OBJECTS {
        let object = schema
            .pointer(pointer)
            .unwrap_or_else(|| panic!("the schema has no {pointer:?}"));
        assert_eq!(
            object["additionalProperties"], false,
            "{pointer:?} must refuse unknown keys, as the parser does"
        );
        let mut in_schema: Vec<&str> = object["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{pointer:?} has no properties"))
            .keys()
            .map(String::as_str)
            .collect();
        let mut in_parser = fields.known.to_vec();
        in_schema.sort_unstable();
        in_parser.sort_unstable();
        assert_eq!(in_schema, in_parser, "keys of {pointer:?}");
    }
    assert_eq!(schema["required"], serde_json::json!(["version"]));
    assert_eq!(
        schema.pointer("/properties/version/const"),
        Some(&serde_json::json!(SUPPORTED_VERSION))
    );
}

#[test]
fn the_examples_in_the_reference_parse() {
    let doc = include_str!("../../../docs/policy.md");
    let mut checked = 0;
    for block in doc.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap();
        if block.starts_with("version:") {
            with_test_env(EXAMPLE_KEYS, || Policy::from_yaml(block, "docs/policy.md"))
                .unwrap_or_else(|e| panic!("{e}\n{block}"));
            checked += 1;
        }
    }
    assert!(checked >= 4, "found {checked} complete examples");
}

#[test]
fn a_policy_can_be_shared_between_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Policy>();
}
