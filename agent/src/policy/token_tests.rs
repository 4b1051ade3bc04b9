//! Workload tokens: the `workload_tokens` section, a rule's `token` matcher
//! matched in addition to the kernel's attribution (never instead of it),
//! and every load error with its line and column.
use super::tests::{policy, process};
use super::*;
use crate::policy::parse::tests::assert_err;

const K8S: &str = "https://kubernetes.default.svc";
const CI: &str = "https://token.actions.example.com";

const TOKENS: &str = "\
version: 1
workload_tokens:
  issuers:
    - issuer: https://kubernetes.default.svc
      audience: warden
    - { issuer: \"https://token.actions.example.com\", audience: \"https://github.com/acme\" }
workloads:
  bot: { match: { unit: \"support-bot.service\" } }
targets:
  crm-api: { host: crm.internal, protocol: http }
  billing: { host: billing.internal, protocol: http }
rules:
  - name: crm-from-crm-accounts
    when: { target: crm-api, token: { subject: \"system:serviceaccount:crm:*\" } }
    action: allow
  - name: crm-otherwise
    when: { target: crm-api }
    action: deny
  - name: billing-from-the-bot-with-ci-token
    when: { workload: bot, target: billing, token: { issuer: \"https://token.actions.example.com\" } }
    action: allow
  - name: billing-otherwise
    when: { target: billing }
    action: deny
";

/// (action, rule) for a GET of `host` by `uid` (998 is the bot), with the
/// token (issuer, subject) if any.
fn decide(p: &Policy, uid: u32, host: &str, token: Option<(&str, &str)>) -> (Action, String) {
    let d = p.decide_http(&HttpRequest {
        identity: &process(uid, "support-bot.service"),
        destination: "10.0.0.1:443".parse().unwrap(),
        host: Some(host),
        method: "GET",
        path: "/",
        llm: None,
        from_llm: false,
        token: token.map(|(issuer, subject)| PresentedToken { issuer, subject }),
    });
    (d.action, d.rule)
}

fn allow(rule: &str) -> (Action, String) {
    (Action::Allow, rule.to_string())
}

fn deny(rule: &str) -> (Action, String) {
    (Action::Deny, rule.to_string())
}

#[test]
fn the_section_reads_its_issuers_and_the_default_header() {
    let p = policy(TOKENS);
    let settings = p.workload_tokens().expect("the section");
    assert_eq!(settings.header, DEFAULT_TOKEN_HEADER);
    assert_eq!(
        settings.issuers,
        [
            TokenIssuer {
                issuer: K8S.into(),
                audience: "warden".into()
            },
            TokenIssuer {
                issuer: CI.into(),
                audience: "https://github.com/acme".into()
            },
        ]
    );
    assert_eq!(
        settings.issuer(CI).unwrap().audience,
        "https://github.com/acme"
    );
    assert!(settings.issuer("https://elsewhere.example.com").is_none());
    assert_eq!(p.request_rule_count(), 4);
    assert!(p.summary().ends_with(&format!(
        "; workload tokens in x-warden-workload-token from {K8S}, {CI}"
    )));

    let named = policy(&TOKENS.replace(
        "workload_tokens:\n",
        "workload_tokens:\n  header: X-Workload-Token\n",
    ));
    assert_eq!(named.workload_tokens().unwrap().header, "x-workload-token");
    assert!(policy("version: 1\n").workload_tokens().is_none());
}

#[test]
fn a_token_rule_matches_the_subject_glob_and_needs_a_token() {
    let p = policy(TOKENS);
    let billing = Some((K8S, "system:serviceaccount:crm:billing"));
    assert_eq!(
        decide(&p, 1000, "crm.internal", billing),
        allow("crm-from-crm-accounts")
    );
    // Another namespace, another issuer's subject that is not crm's, none.
    let other = Some((K8S, "system:serviceaccount:web:frontend"));
    assert_eq!(
        decide(&p, 1000, "crm.internal", other),
        deny("crm-otherwise")
    );
    assert_eq!(
        decide(&p, 1000, "crm.internal", Some((CI, "repo:acme/crm"))),
        deny("crm-otherwise")
    );
    assert_eq!(
        decide(&p, 1000, "crm.internal", None),
        deny("crm-otherwise")
    );
    // Globs are case-sensitive, as subjects are.
    let shouted = Some((K8S, "system:serviceaccount:CRM:billing"));
    assert_eq!(
        decide(&p, 1000, "crm.internal", shouted),
        deny("crm-otherwise")
    );
}

#[test]
fn a_token_adds_to_the_kernels_attribution_and_never_replaces_it() {
    let p = policy(TOKENS);
    let ci = Some((CI, "repo:acme/billing"));
    // The bot's process (uid 998) with a CI token: both hold.
    assert_eq!(
        decide(&p, 998, "billing.internal", ci),
        allow("billing-from-the-bot-with-ci-token")
    );
    // The same token from another process: the workload does not hold.
    assert_eq!(
        decide(&p, 1000, "billing.internal", ci),
        deny("billing-otherwise")
    );
    // The bot with a token from the other issuer: the issuer does not hold.
    let k8s = Some((K8S, "repo:acme/billing"));
    assert_eq!(
        decide(&p, 998, "billing.internal", k8s),
        deny("billing-otherwise")
    );
    // The bot without a token.
    assert_eq!(
        decide(&p, 998, "billing.internal", None),
        deny("billing-otherwise")
    );
    // A token never makes a process another workload.
    assert_eq!(p.workload_of(&process(1000, "support-bot.service")), None);
}

#[test]
fn an_empty_token_matcher_holds_for_any_valid_token() {
    let p = policy(
        "version: 1
workload_tokens:
  issuers: [{ issuer: \"https://kubernetes.default.svc\", audience: warden }]
http_default: deny
rules:
  - { name: any-token, when: { token: {} }, action: allow }
",
    );
    assert_eq!(
        decide(&p, 1000, "x.internal", Some((K8S, "anyone"))),
        allow("any-token")
    );
    assert_eq!(decide(&p, 1000, "x.internal", None), deny("default"));
    // It is a request rule: connections are not decided by it.
    assert_eq!(p.request_rule_count(), 1);
}

#[test]
fn load_errors_name_the_line_and_say_what_to_write() {
    let header = "version: 1\nworkload_tokens:\n  issuers: [{ issuer: \"https://k8s.example\", audience: warden }]\n";
    // A token matcher, but no issuer is trusted.
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { token: { subject: \"a*\" } }, action: allow }\n",
        3,
        24,
        "rule `r` has a token matcher, but the file trusts no issuer of workload tokens",
    );
    // An issuer the section does not list.
    assert_err(
        &format!(
            "{header}rules:\n  - {{ name: r, when: {{ token: {{ issuer: \"https://other.example\" }} }}, action: allow }}\n"
        ),
        5,
        41,
        "issuer \"https://other.example\" is not listed under workload_tokens.issuers",
    );
    // A token matcher with a sql matcher: tokens are read from HTTP requests.
    assert_err(
        &format!(
            "{header}rules:\n  - {{ name: r, when: {{ sql: {{ class: write }}, token: {{}} }}, action: deny }}\n"
        ),
        5,
        47,
        "has a sql matcher and a token matcher in one when",
    );
    // A token matcher with an SSH target.
    assert_err(
        &format!(
            "{header}targets:\n  box: {{ address: 10.0.0.9, port: 22, protocol: ssh }}\nrules:\n  - {{ name: r, when: {{ target: box, token: {{}} }}, action: deny }}\n"
        ),
        7,
        37,
        "rule `r` has a token matcher, which matches HTTP requests, but its target `box` says `protocol: ssh`",
    );
    // A header that carries something else.
    assert_err(
        "version: 1\nworkload_tokens:\n  header: Authorization\n  issuers: [{ issuer: \"https://k8s.example\", audience: warden }]\n",
        3,
        11,
        "Authorization carries something else",
    );
    // An issuer without its audience, twice, or none at all.
    assert_err(
        "version: 1\nworkload_tokens:\n  issuers:\n    - issuer: https://k8s.example\n",
        4,
        7,
        "issuer \"https://k8s.example\" has no audience",
    );
    assert_err(
        "version: 1\nworkload_tokens:\n  issuers:\n    - { issuer: \"https://k8s.example\", audience: a }\n    - { issuer: \"https://k8s.example\", audience: b }\n",
        4,
        5,
        "issuer \"https://k8s.example\" is listed twice",
    );
    assert_err(
        "version: 1\nworkload_tokens:\n  issuers: []\n",
        3,
        12,
        "workload_tokens.issuers is empty",
    );
    assert_err(
        "version: 1\nworkload_tokens:\n  header: x-token\n",
        3,
        3,
        "workload_tokens has no issuers",
    );
    // Keys people write for something else.
    assert_err(
        &format!(
            "{header}rules:\n  - {{ name: r, when: {{ token: {{ sub: \"a*\" }} }}, action: allow }}\n"
        ),
        5,
        33,
        "write `subject:`",
    );
    assert_err(
        &format!("{header}rules:\n  - {{ name: r, when: {{ subject: \"a*\" }}, action: allow }}\n"),
        5,
        24,
        "a workload token's subject goes in the token matcher",
    );
    assert_err(
        "version: 1\nworkload_tokens:\n  issuers:\n    - { url: \"https://k8s.example\", audience: warden }\n",
        4,
        9,
        "write `issuer:`",
    );
}
