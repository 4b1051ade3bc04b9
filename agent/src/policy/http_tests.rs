//! Deciding HTTP requests and LLM calls: request rules (the `http` and
//! `llm` matchers, targets with a host, `limits`, `redact_prompt`,
//! `mask_response`), `http_default`, `prompt_redact`, `response_mask`,
//! `audit.prompts`, credentials and their secrets, request rules kept apart
//! from connection and statement rules, and every load error with its line
//! and column.
use std::{net::SocketAddr, sync::Arc};

use super::tests::{EXAMPLE_KEYS, policies_dir, policy, process};
use super::*;
use crate::policy::parse::tests::{assert_err, err};

fn who(uid: u32) -> Identity {
    process(uid, "support-bot.service")
}

/// One HTTP request, as the proxy would describe it: `Req::new` is a GET of
/// `/` on api.openai.com (162.159.140.245:443) by uid 998, not an LLM call.
#[derive(Clone)]
struct Req {
    uid: u32,
    destination: &'static str,
    host: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    llm: Option<LlmInfo<'static>>,
    from_llm: bool,
}

impl Req {
    fn new() -> Req {
        Req {
            uid: 998,
            destination: "162.159.140.245:443",
            host: Some("api.openai.com"),
            method: "GET",
            path: "/",
            llm: None,
            from_llm: false,
        }
    }
    /// Its URL was in an LLM answer.
    fn proposed_by_llm(mut self) -> Req {
        self.from_llm = true;
        self
    }
    fn uid(mut self, uid: u32) -> Req {
        self.uid = uid;
        self
    }
    fn to(mut self, destination: &'static str, host: Option<&'static str>) -> Req {
        self.destination = destination;
        self.host = host;
        self
    }
    fn http(mut self, method: &'static str, path: &'static str) -> Req {
        self.method = method;
        self.path = path;
        self
    }
    /// An LLM call: POST to the provider's path for `endpoint`.
    fn llm(
        mut self,
        provider: &'static str,
        endpoint: &'static str,
        model: Option<&'static str>,
    ) -> Req {
        self.method = "POST";
        self.path = match endpoint {
            "chat" => "/v1/chat/completions",
            "messages" => "/v1/messages",
            "embeddings" => "/v1/embeddings",
            "responses" => "/v1/responses",
            _ => "/v1/completions",
        };
        self.llm = Some(LlmInfo {
            provider,
            endpoint,
            model,
            max_tokens: None,
            stream: false,
        });
        self
    }
    fn max_tokens(mut self, n: u64) -> Req {
        self.llm.as_mut().expect("an LLM call").max_tokens = Some(n);
        self
    }

    fn on(&self, p: &Policy) -> HttpDecision {
        let destination: SocketAddr = self.destination.parse().unwrap();
        p.decide_http(&HttpRequest {
            identity: &who(self.uid),
            destination,
            host: self.host,
            method: self.method,
            path: self.path,
            llm: self.llm,
            from_llm: self.from_llm,
            token: None,
        })
    }

    /// (action, rule) the policy gives.
    fn decided(&self, p: &Policy) -> (Action, String) {
        let d = self.on(p);
        (d.action, d.rule)
    }
}

fn allow(rule: &str) -> (Action, String) {
    (Action::Allow, rule.to_string())
}

fn deny(rule: &str) -> (Action, String) {
    (Action::Deny, rule.to_string())
}

fn same(a: &Option<Arc<Masker>>, b: &Arc<Masker>) -> bool {
    a.as_ref().is_some_and(|a| Arc::ptr_eq(a, b))
}

const CARD: &str = "4111 1111 1111 1111";

// ---------------------------------------------------------------------------
// Deciding

const GATEWAY: &str = "\
version: 1
workloads:
  bot: { match: { unit: \"support-bot.service\" } }
targets:
  openai: { host: [\"api.openai.com\", \"*.openai.azure.com\"], protocol: llm }
  internal: { address: \"127.0.0.1\", port: 8080, protocol: http }
rules:
  - name: no-embeddings
    when: { llm: { endpoint: embeddings } }
    action: deny
  - name: only-small-models
    when: { workload: bot, target: openai, llm: { provider: [openai], model: [\"gpt-4.1*\"], endpoint: [chat, responses] } }
    action: allow
    limits: { models: [\"gpt-4.1-mini*\"], max_tokens: 4000 }
    redact_prompt: { detectors: [payment, ssn, secrets], on_detect: redact }
    mask_response: { detectors: [payment, ssn] }
  - name: openai-rest
    when: { target: openai }
    action: deny
  - name: no-deletes
    when: { target: internal, http: { method: [DELETE], path: [\"/admin/*\"] } }
    action: deny
";

#[test]
fn the_first_request_rule_that_holds_decides() {
    let p = policy(GATEWAY);
    assert_eq!(p.request_rule_count(), 4);
    let chat = Req::new().llm("openai", "chat", Some("gpt-4.1-mini-2025"));
    assert_eq!(chat.decided(&p), allow("only-small-models"));
    // An earlier rule wins, whatever comes after.
    let embed = Req::new().llm("openai", "embeddings", Some("gpt-4.1-mini"));
    assert_eq!(embed.decided(&p), deny("no-embeddings"));
    // The llm matcher does not hold for another workload: the next rule.
    assert_eq!(chat.clone().uid(1000).decided(&p), deny("openai-rest"));
    // ...nor for a plain request: a target with a host holds for it.
    assert_eq!(Req::new().decided(&p), deny("openai-rest"));
    // The host glob of the target: Azure's hosts are OpenAI's too.
    let azure = chat
        .clone()
        .to("20.0.0.1:443", Some("mine.openai.AZURE.com"));
    assert_eq!(azure.decided(&p), allow("only-small-models"));
    // No host: a target with a host never holds.
    assert_eq!(
        chat.clone().to("20.0.0.1:443", None).decided(&p),
        allow("default")
    );
    assert_eq!(
        Req::new()
            .to("10.1.1.1:443", Some("example.com"))
            .decided(&p),
        allow("default")
    );
    let d = Req::new().to("127.0.0.1:8080", Some("localhost")).on(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.workload.as_deref()),
        (Action::Allow, "default", Some("bot"))
    );
}

#[test]
fn a_deny_says_which_rule_denied() {
    let p = policy(GATEWAY);
    let d = Req::new().on(&p);
    assert_eq!(d.reason.as_deref(), Some("denied by rule \"openai-rest\""));
    assert!(d.redact.is_none() && d.mask_response.is_none());
    let allowed = Req::new().to("10.1.1.1:443", Some("example.com")).on(&p);
    assert_eq!(allowed.reason, None);
}

#[test]
fn limits_deny_with_a_reason_naming_the_rule() {
    let p = policy(GATEWAY);
    let call = |model: Option<&'static str>| Req::new().llm("openai", "chat", model);
    let d = call(Some("gpt-4.1")).on(&p);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Deny, "only-small-models")
    );
    assert_eq!(
        d.reason.as_deref(),
        Some(
            "model \"gpt-4.1\" is not allowed by rule \"only-small-models\" (allowed: \
             gpt-4.1-mini*)"
        )
    );
    assert!(d.redact.is_none() && d.mask_response.is_none());
    // Within the limits; a call that does not say its max_tokens is within.
    let d = call(Some("GPT-4.1-mini")).max_tokens(4000).on(&p);
    assert_eq!((d.action, d.reason), (Action::Allow, None));
    let d = call(Some("gpt-4.1-mini")).max_tokens(9000).on(&p);
    assert_eq!(d.action, Action::Deny);
    assert_eq!(
        d.reason.as_deref(),
        Some("max_tokens 9000 is over the limit 4000 of rule \"only-small-models\"")
    );
    // The model is checked first.
    let d = call(Some("gpt-4.1-nano")).max_tokens(9000).on(&p);
    assert!(
        d.reason
            .unwrap()
            .starts_with("model \"gpt-4.1-nano\" is not allowed")
    );
    // A rule whose models are limited denies a call whose model is unknown.
    let p = policy(
        "version: 1\nrules:\n  - name: small\n    when: { llm: {} }\n    action: allow\n    limits: { models: [\"a*\", \"b\"] }\n",
    );
    let d = call(None).on(&p);
    assert_eq!(
        (d.action, d.reason.as_deref()),
        (
            Action::Deny,
            Some("the request names no model, and rule \"small\" allows only models a*, b")
        )
    );
    // max_tokens alone lets any model through.
    let p = policy(
        "version: 1\nrules:\n  - name: short\n    when: { llm: {} }\n    action: allow\n    limits: { max_tokens: 10 }\n",
    );
    assert_eq!(call(None).decided(&p), allow("short"));
    assert_eq!(call(None).max_tokens(11).decided(&p), deny("short"));
}

#[test]
fn an_allowing_rule_carries_its_redaction_and_mask() {
    let p = policy(GATEWAY);
    let d = Req::new()
        .llm("openai", "chat", Some("gpt-4.1-mini"))
        .on(&p);
    assert_eq!(d.action, Action::Allow);
    let redact = d.redact.expect("the rule redacts");
    assert_eq!(redact.on_detect, OnDetect::Redact);
    let prompt = format!("card {CARD}, key AKIAIOSFODNN7EXAMPLE");
    let (masked, found) = redact.masker.mask_text(&prompt);
    assert_eq!(found, 2, "{masked}");
    let mask = d.mask_response.expect("the rule masks responses");
    assert_eq!(mask.mask_text(&format!("ssn 123-45-6789 card {CARD}")).1, 2);
    // Secrets are not in the response mask.
    assert_eq!(mask.mask_text("AKIAIOSFODNN7EXAMPLE").1, 0);
    // Compiled once, shared by every decision.
    let again = Req::new()
        .llm("openai", "responses", Some("gpt-4.1-mini"))
        .on(&p);
    assert!(Arc::ptr_eq(&again.redact.unwrap().masker, &redact.masker));
    assert!(same(&again.mask_response, &mask));
    // An allowing rule without them: nothing.
    let p = policy(
        "version: 1\nrules:\n  - { name: r, when: { http: {} }, action: allow }\nprompt_redact: [payment]\n",
    );
    let d = Req::new().on(&p);
    assert_eq!((d.action, d.rule.as_str()), (Action::Allow, "r"));
    assert!(d.redact.is_none() && d.mask_response.is_none());
}

#[test]
fn the_http_matcher_method_path_and_host() {
    let p = policy(
        "\
version: 1
rules:
  - name: no-deletes
    when: { http: { method: [delete, Patch], path: [\"/admin/*\", \"/v1/*/files\"] } }
    action: deny
  - name: internal-hosts
    when: { http: { host: [\"*.internal\", localhost] } }
    action: deny
",
    );
    let req = |method, path| Req::new().http(method, path);
    assert_eq!(
        req("DELETE", "/admin/users/7").decided(&p),
        deny("no-deletes")
    );
    assert_eq!(req("delete", "/admin/").decided(&p), deny("no-deletes"));
    assert_eq!(
        req("PATCH", "/v1/org/42/files").decided(&p),
        deny("no-deletes")
    );
    // `*` crosses segments.
    assert_eq!(
        req("PATCH", "/v1/a/b/c/files").decided(&p),
        deny("no-deletes")
    );
    // Case matters in paths; every key must hold.
    assert_eq!(req("DELETE", "/ADMIN/users").decided(&p), allow("default"));
    assert_eq!(req("GET", "/admin/users").decided(&p), allow("default"));
    assert_eq!(req("DELETE", "/admin").decided(&p), allow("default"));
    // Hosts ignore case; a request without a host does not match a host key.
    let host = |host| Req::new().to("10.0.0.1:80", host);
    assert_eq!(
        host(Some("db.Internal")).decided(&p),
        deny("internal-hosts")
    );
    assert_eq!(host(Some("localhost")).decided(&p), deny("internal-hosts"));
    assert_eq!(host(Some("internal")).decided(&p), allow("default"));
    assert_eq!(host(None).decided(&p), allow("default"));
}

#[test]
fn the_llm_matcher_provider_model_and_endpoint() {
    let p = policy(
        "\
version: 1
rules:
  - name: claude
    when: { llm: { provider: anthropic, model: \"claude-*\", endpoint: messages } }
    action: allow
  - name: openai-chat
    when: { llm: { provider: [openai], endpoint: [chat, completions] } }
    action: allow
  - name: any-llm
    when: { llm: {} }
    action: deny
",
    );
    let call = |provider, endpoint, model| Req::new().llm(provider, endpoint, model);
    assert_eq!(
        call("anthropic", "messages", Some("Claude-Sonnet-4")).decided(&p),
        allow("claude")
    );
    assert_eq!(
        call("anthropic", "messages", Some("gpt-4.1")).decided(&p),
        deny("any-llm")
    );
    // A model key does not hold for a call that names no model.
    assert_eq!(
        call("anthropic", "messages", None).decided(&p),
        deny("any-llm")
    );
    assert_eq!(
        call("openai", "chat", None).decided(&p),
        allow("openai-chat")
    );
    assert_eq!(
        call("openai", "completions", Some("x")).decided(&p),
        allow("openai-chat")
    );
    assert_eq!(
        call("openai", "embeddings", Some("x")).decided(&p),
        deny("any-llm")
    );
    // Provider names from the proxy are compared without regard to case.
    assert_eq!(
        call("OpenAI", "chat", None).decided(&p),
        allow("openai-chat")
    );
    // An llm matcher never holds for a request that is not an LLM call,
    // even `llm: {}`.
    assert_eq!(
        Req::new().http("POST", "/v1/chat/completions").decided(&p),
        allow("default")
    );
}

#[test]
fn http_default_prompt_redact_and_response_mask() {
    let p = policy(
        "\
version: 1
prompt_redact: { detectors: [secrets], on_detect: deny }
response_mask: [ssn]
rules:
  - { name: plain, when: { http: { path: \"/plain\" } }, action: allow }
",
    );
    let d = Req::new().on(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.reason.as_deref()),
        (Action::Allow, "default", None)
    );
    let redact = d.redact.expect("prompt_redact");
    assert_eq!(redact.on_detect, OnDetect::Deny);
    assert!(Arc::ptr_eq(
        &redact.masker,
        &p.prompt_redact().unwrap().masker
    ));
    assert!(same(&d.mask_response, p.response_mask().unwrap()));
    assert_eq!(p.response_mask().unwrap().mask_text("123-45-6789").1, 1);
    // A request a rule decides gets the rule's, here none.
    let d = Req::new().http("GET", "/plain").on(&p);
    assert!(d.redact.is_none() && d.mask_response.is_none());
    assert_eq!(
        p.summary(),
        "1 rule, 1 of them for HTTP requests, 0 workloads, 0 targets; prompt_redact denies \
         requests with detectors aws_key, jwt, private_key, api_key; response_mask masks detectors \
         ssn"
    );

    let p = policy(
        "version: 1\nhttp_default: deny\nrules:\n  - { name: ok, when: { http: { host: ok.example } }, action: allow }\n",
    );
    assert_eq!(p.http_default(), Action::Deny);
    let d = Req::new().on(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.reason.as_deref()),
        (Action::Deny, "default", Some("denied by http_default"))
    );
    assert_eq!(
        Req::new()
            .to("10.0.0.1:443", Some("ok.example"))
            .decided(&p),
        allow("ok")
    );
    assert!(
        p.summary().ends_with("; http_default: deny"),
        "{}",
        p.summary()
    );
    // http_default decides requests only, default connections only.
    let c = p.decide_connection(&ConnectionRequest {
        identity: &who(998),
        destination: "10.0.0.1:443".parse().unwrap(),
        transport: Transport::Tcp,
    });
    assert_eq!((c.action, c.rule.as_str()), (Action::Allow, "default"));
}

#[test]
fn the_embedded_default_masks_prompts_and_responses_and_denies_nothing() {
    let p = Policy::embedded_default();
    assert_eq!(p.http_default(), Action::Allow);
    assert_eq!(p.prompt_audit(), PromptAudit::Full);
    let d = Req::new()
        .llm("openai", "chat", Some("gpt-5"))
        .max_tokens(100_000)
        .on(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.reason),
        (Action::Allow, "default", None)
    );
    assert!(d.credential.is_none());
    assert_eq!(d.prompts, PromptAudit::Full);
    let redact = d.redact.expect("the default redacts prompts");
    assert_eq!(redact.on_detect, OnDetect::Redact);
    let response = d.mask_response.expect("the default masks responses");
    for masker in [&redact.masker, &response] {
        let text = format!("ssn 123-45-6789, card {CARD}, key AKIAIOSFODNN7EXAMPLE");
        let (masked, found) = masker.mask_text(&text);
        assert_eq!(found, 3, "{masked}");
        assert_eq!(masker.mask_text("hello, what is 2 + 2?").1, 0);
        assert!(!masker.masks_column("email"));
    }
    assert_eq!(
        p.summary(),
        "0 rules, 0 workloads, 0 targets; sql_mask masks detectors card, iban, ssn, aws_key, jwt, \
         private_key, api_key; prompt_redact redacts detectors card, iban, ssn, aws_key, jwt, \
         private_key, api_key; response_mask masks detectors card, iban, ssn, aws_key, jwt, \
         private_key, api_key"
    );
}

#[test]
fn request_rules_decide_neither_connections_nor_statements() {
    let p = policy(
        "\
version: 1
default: deny
targets:
  openai: { host: api.openai.com, port: 443 }
  anywhere: { port: 443 }
rules:
  - { name: host-target, when: { target: openai }, action: allow }
  - { name: catch-all-requests, when: { http: {} }, action: allow }
  - { name: redacting, when: { port: 5432 }, action: allow, redact_prompt: [ssn] }
  - { name: statements, when: { sql: {} }, action: deny }
  - { name: connections, when: { target: anywhere }, action: deny }
",
    );
    assert_eq!(p.request_rule_count(), 3);
    assert_eq!(p.statement_rule_count(), 1);
    let connect = |destination: &str| {
        let d = p.decide_connection(&ConnectionRequest {
            identity: &who(1000),
            destination: destination.parse().unwrap(),
            transport: Transport::Tcp,
        });
        (d.action, d.rule)
    };
    // The host target's rule and the catch-all are not connection rules.
    assert_eq!(connect("162.159.140.245:443"), deny("connections"));
    assert_eq!(connect("10.0.0.1:5432"), deny("default"));
    let statement = p.decide_statement(&StatementRequest {
        identity: &who(1000),
        destination: "10.0.0.1:5432".parse().unwrap(),
        database: Some("crm"),
        db_user: Some("app"),
        class: "read",
        tables_read: &[],
        tables_written: &[],
        functions: &[],
        from_llm: false,
    });
    assert_eq!(
        (statement.action, statement.rule.as_str()),
        (Action::Deny, "statements")
    );
    // ...and connection and statement rules decide no request.
    assert_eq!(Req::new().decided(&p), allow("host-target"));
    assert_eq!(
        Req::new()
            .to("10.0.0.1:443", Some("example.com"))
            .decided(&p),
        allow("catch-all-requests")
    );
    let p = policy(
        "version: 1\nhttp_default: deny\nrules:\n  - { name: conn, action: allow }\n  - { name: stmt, when: { sql: {} }, action: allow }\n",
    );
    assert_eq!(p.request_rule_count(), 0);
    assert_eq!(Req::new().decided(&p), deny("default"));
}

#[test]
fn audit_prompts() {
    for (value, expected) in [
        ("full", PromptAudit::Full),
        ("digest", PromptAudit::Digest),
        ("none", PromptAudit::None),
    ] {
        let p = policy(&format!("version: 1\naudit: {{ prompts: {value} }}\n"));
        assert_eq!(p.prompt_audit(), expected);
        assert_eq!(Req::new().on(&p).prompts, expected);
        assert_eq!(expected.as_str(), value);
    }
    assert_err(
        "version: 1\naudit:\n  prompts: hash\n",
        3,
        12,
        "\"hash\" is not a choice for audit prompts; write `prompts: full` (the prompt as sent \
         upstream), `prompts: digest` (a digest only) or `prompts: none`",
    );
}

// ---------------------------------------------------------------------------
// Credentials

const CREDENTIALS: &str = "\
version: 1
targets:
  local-llm: { address: \"127.0.0.1\", port: 8000, protocol: llm }
  openai: { host: api.openai.com }
  anthropic: { host: api.anthropic.com, protocol: llm }
  internal: { address: \"127.0.0.0/8\", protocol: http }
credentials:
  anthropic: { api_key_file: FILE, header: x-api-key }
  openai: { api_key_env: WARDEN_TEST_OPENAI_KEY, header: Authorization }
  internal: { api_key_env: WARDEN_TEST_INTERNAL_KEY }
rules:
  - { name: no-anthropic, when: { target: anthropic }, action: deny }
";

fn with_credentials(file: &std::path::Path) -> Policy {
    let src = CREDENTIALS.replace("FILE", &file.display().to_string());
    with_test_env(
        &[
            ("WARDEN_TEST_OPENAI_KEY", "sk-openai-secret"),
            ("WARDEN_TEST_INTERNAL_KEY", "internal-secret\n"),
        ],
        || policy(&src),
    )
}

#[test]
fn credentials_are_read_from_the_environment_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("anthropic");
    std::fs::write(&file, "sk-ant-secret\n").unwrap();
    let p = with_credentials(&file);
    assert_eq!(p.credential_count(), 3);
    let openai = p.credential("openai").unwrap();
    assert_eq!(
        (
            openai.target.as_str(),
            openai.secret.as_str(),
            openai.header()
        ),
        (
            "openai",
            "sk-openai-secret",
            Some(CredentialHeader::Authorization)
        )
    );
    let anthropic = p.credential("anthropic").unwrap();
    assert_eq!(
        (anthropic.secret.as_str(), anthropic.header()),
        ("sk-ant-secret", Some(CredentialHeader::XApiKey))
    );
    // A trailing newline is trimmed, from a variable too.
    assert_eq!(p.credential("internal").unwrap().secret, "internal-secret");
    assert_eq!(p.credential("internal").unwrap().header(), None);
    assert!(p.credential("local-llm").is_none());

    // A decision carries the credential of its destination, whatever decided.
    let d = Req::new().on(&p);
    assert!(Arc::ptr_eq(d.credential.as_ref().unwrap(), openai));
    let d = Req::new()
        .to("160.79.104.10:443", Some("api.anthropic.com"))
        .on(&p);
    assert_eq!(d.action, Action::Deny);
    assert!(Arc::ptr_eq(d.credential.as_ref().unwrap(), anthropic));
    // The first target in file order that has a credential and holds:
    // local-llm holds for 127.0.0.1:8000 but has none, internal has one.
    let d = Req::new().to("127.0.0.1:8000", Some("localhost")).on(&p);
    assert_eq!(d.credential.unwrap().target, "internal");
    let d = Req::new().to("10.0.0.1:443", Some("example.com")).on(&p);
    assert!(d.credential.is_none());

    // The real environment is read too: PATH is set wherever tests run.
    let real = policy(
        "version: 1\ntargets:\n  t: { host: t.example }\ncredentials:\n  t: { api_key_env: PATH }\n",
    );
    assert_eq!(
        real.credential("t").unwrap().secret,
        std::env::var("PATH").unwrap()
    );

    assert_eq!(CredentialHeader::Authorization.value("k"), "Bearer k");
    assert_eq!(CredentialHeader::XApiKey.name(), "x-api-key");
}

#[test]
fn secrets_are_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("anthropic");
    std::fs::write(&file, "sk-ant-secret").unwrap();
    let p = with_credentials(&file);
    let debug = format!("{:?}", p.credential("openai").unwrap());
    assert_eq!(
        debug,
        "Credential { target: \"openai\", secret: \"***\", kind: ApiKey { header: \
         Some(Authorization) } }"
    );
    let everything = format!(
        "{p:?} {:?} {:?} {}",
        Req::new().on(&p),
        Req::new()
            .to("160.79.104.10:443", Some("api.anthropic.com"))
            .on(&p),
        p.summary()
    );
    for secret in ["sk-openai-secret", "sk-ant-secret", "internal-secret"] {
        assert!(
            !everything.contains(secret),
            "{secret} shown in {everything}"
        );
    }
    assert_eq!(
        p.summary(),
        "1 rule, 1 of them for HTTP requests, 0 workloads, 4 targets, 3 credentials"
    );
    // A value that looks like a key, written where a variable's name goes,
    // is not echoed either.
    let e = err(
        "version: 1\ntargets:\n  t: { host: t.example }\ncredentials:\n  t: { api_key_env: sk-proj-abc123 }\n",
    );
    assert!(!e.contains("sk-proj"), "{e}");
    assert!(e.starts_with("policy.yaml:5:21: credential `t`: api_key_env takes the name of an environment variable"), "{e}");
}

#[test]
fn credential_errors_name_their_line() {
    let base = "version: 1\ntargets:\n  openai: { host: api.openai.com, protocol: llm }\n  db: { address: 127.0.0.1, port: 5432, protocol: postgres }\ncredentials:\n";
    assert_eq!(
        err(&format!("{base}  open-ai: {{ api_key_env: PATH }}\n")),
        "policy.yaml:6:3: credentials name target `open-ai`, which is not defined under \
         targets:; defined: openai, db; a credential is keyed by the name of the target its key \
         is sent to"
    );
    assert_err(
        "version: 1\ntargets:\n  https: { port: 443 }\ncredentials:\n  https: { api_key_env: PATH }\n",
        5,
        3,
        "credential `https` is for target `https`, which gives neither a host nor an address, so \
         its secret would be sent to any server on its port; give the target a `host` (or an \
         `address`)",
    );
    assert_err(
        &format!("{base}  db: {{ api_key_env: PATH }}\n"),
        6,
        7,
        "credential `db` is an API key, which the agent puts in HTTP requests, but its target \
         `db` says `protocol: postgres`; give the target `protocol: http`, `llm` or `any` (or no \
         protocol), or use the other kind of credential",
    );
    assert_eq!(
        err(&format!(
            "{base}  openai:\n    api_key_env: WARDEN_TEST_SURELY_UNSET_7F3A\n"
        )),
        "policy.yaml:7:18: credential `openai`: the environment variable \
         WARDEN_TEST_SURELY_UNSET_7F3A is not set in the agent's environment; set it where the \
         agent starts (e.g. `Environment=` or `EnvironmentFile=` in its systemd unit), or write \
         `api_key_file:` instead"
    );
    assert_eq!(
        with_test_env(&[("EMPTY_KEY", "\n")], || err(&format!(
            "{base}  openai: {{ api_key_env: EMPTY_KEY }}\n"
        ))),
        "policy.yaml:6:26: credential `openai`: the environment variable EMPTY_KEY is empty; \
         put the secret in it"
    );
    let e = with_test_env(&[("TWO_LINES", "sk-a\nsk-b\n")], || {
        err(&format!("{base}  openai: {{ api_key_env: TWO_LINES }}\n"))
    });
    assert_eq!(
        e,
        "policy.yaml:6:26: credential `openai`: the secret in the environment variable \
         TWO_LINES has a line break or another control character inside it; a secret is one \
         line (only a trailing newline is trimmed)"
    );
}

#[test]
fn unreadable_key_files_and_other_credential_mistakes() {
    let base = "version: 1\ntargets:\n  openai: { host: api.openai.com }\ncredentials:\n";
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let e = err(&format!(
        "{base}  openai: {{ api_key_file: {} }}\n",
        missing.display()
    ));
    assert!(
        e.starts_with(&format!(
            "policy.yaml:5:27: credential `openai`: cannot read api_key_file {}: No such file or \
             directory",
            missing.display()
        )) && e.ends_with(
            "; put the secret in that file and make it readable by the agent, or write \
             `api_key_env:` instead"
        ),
        "{e}"
    );
    // A directory is not a key file; nor is an empty file.
    assert_err(
        &format!(
            "{base}  openai:\n    api_key_file: {}\n",
            dir.path().display()
        ),
        6,
        19,
        "cannot read api_key_file",
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    assert_err(
        &format!("{base}  openai: {{ api_key_file: {} }}\n", empty.display()),
        5,
        27,
        &format!(
            "credential `openai`: the file {} is empty; put the secret in it",
            empty.display()
        ),
    );
    assert_err(
        &format!("{base}  openai: {{ api_key_file: secrets/openai }}\n"),
        5,
        27,
        "credential `openai`: api_key_file \"secrets/openai\" is not an absolute path; write e.g. \
         /etc/warden/secrets/openai",
    );
    // Exactly one of api_key_env and api_key_file, at the second.
    assert_eq!(
        err(&format!(
            "{base}  openai:\n    api_key_env: PATH\n    api_key_file: {}\n",
            empty.display()
        )),
        "policy.yaml:7:5: credential `openai` has both api_key_env and api_key_file; keep one: \
         the secret is read from one place"
    );
    assert_err(
        &format!("{base}  openai: {{ header: x-api-key }}\n"),
        5,
        11,
        "credential `openai` does not say where its secret is; write `api_key_env: VARIABLE` or \
         `api_key_file: /path/to/file` for an API key, or `password_env:` or `password_file:` \
         for a database password",
    );
    assert_err(
        &format!("{base}  openai: {{ api_key_env: PATH, header: api-key }}\n"),
        5,
        40,
        "\"api-key\" is not a header credentials are sent in; write `header: authorization` \
         (sent as `Bearer <key>`) or `header: x-api-key`",
    );
    assert_err(
        &format!("{base}  openai: {{ api_key: sk-123 }}\n"),
        5,
        13,
        "unknown field `api_key` in a credential (a key never goes in the policy: write \
         `api_key_env: VARIABLE` or `api_key_file: /path/to/file`)",
    );
    assert_err(
        &format!("{base}  openai: {{ api_key_env: PATH }}\n  openai: {{ api_key_env: HOME }}\n"),
        6,
        3,
        "credential `openai` is defined twice under credentials:",
    );
}

// ---------------------------------------------------------------------------
// Load errors

#[test]
fn unknown_keys_in_request_matchers() {
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when: { http: { methods: [GET] } }\n    action: deny\n"
        ),
        "policy.yaml:4:21: unknown field `methods` in a rule's http (write `method:`, which takes \
         one method or a list); expected one of: method, path, host, from_llm"
    );
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when:\n      http:\n        verb: GET\n    action: deny\n"
        ),
        "policy.yaml:6:9: unknown field `verb` in a rule's http; expected one of: method, path, \
         host, from_llm"
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { http: { columns: [\"*\"] } }\n    action: deny\n",
        4,
        21,
        "unknown field `columns` in a rule's http (column globs make no sense for HTTP",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { llm: { models: [gpt-4.1] } }\n    action: deny\n",
        4,
        20,
        "unknown field `models` in a rule's llm (write `model:`, which takes one glob or a list; \
         to allow some models and deny the others, use the rule's `limits: { models: [...] }`); \
         expected one of: provider, model, endpoint",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { host: api.openai.com }\n    action: deny\n",
        4,
        13,
        "unknown field `host` in a rule's when (host names go in a target",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    limits: { model: [a] }\n",
        5,
        15,
        "unknown field `model` in a rule's limits (write `models:`",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    redact_prompt: { columns: [ssn] }\n",
        5,
        22,
        "unknown field `columns` in a prompt redaction (column globs make no sense for HTTP",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    mask_response: { detectors: [ssn], on_detect: deny }\n",
        5,
        40,
        "unknown field `on_detect` in a response mask (a response is always masked, never refused",
    );
}

#[test]
fn bad_request_values() {
    let when = |matcher: &str| {
        format!("version: 1\nrules:\n  - name: r\n    when: {{ {matcher} }}\n    action: deny\n")
    };
    assert_eq!(
        err(&when("llm: { provider: [openai, azure] }")),
        "policy.yaml:4:39: \"azure\" is not an LLM provider (Azure OpenAI speaks the OpenAI API: \
         write `openai`); write one of: openai, anthropic"
    );
    assert_err(
        &when("llm: { provider: mistral }"),
        4,
        30,
        "\"mistral\" is not an LLM provider; write one of: openai, anthropic",
    );
    assert_err(
        &when("llm: { endpoint: \"/v1/chat/completions\" }"),
        4,
        30,
        "\"/v1/chat/completions\" is not an LLM endpoint (OpenAI's /v1/chat/completions is \
         `chat`); write one of: chat, responses, embeddings, completions, messages",
    );
    assert_err(
        &when("llm: { model: \"gpt-[4\" }"),
        4,
        27,
        "\"gpt-[4\" is not a valid glob",
    );
    assert_err(
        &when("http: { method: \"/admin\" }"),
        4,
        29,
        "\"/admin\" is a path, not an HTTP method; paths go under `path:`",
    );
    assert_err(
        &when("http: { method: \"GET POST\" }"),
        4,
        29,
        "\"GET POST\" is not an HTTP method; write e.g. GET, POST, PUT, PATCH or DELETE",
    );
    assert_err(
        &when("http: { path: admin/* }"),
        4,
        27,
        "\"admin/*\" does not start with /; a path glob matches the whole path, e.g. \"/admin/*\"",
    );
    assert_err(
        &when("http: { host: \"https://api.openai.com/v1\" }"),
        4,
        27,
        "\"https://api.openai.com/v1\" is a URL; write the host alone: `host: api.openai.com`",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { host: \"api.openai.com:443\" }\n",
        3,
        14,
        "\"api.openai.com:443\" has a port; a host is matched without its port: write `host: \
         api.openai.com`, and the port apart in the target: `port: 443`",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    limits: { max_tokens: 0 }\n",
        5,
        27,
        "max_tokens 0 would deny every request",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    limits: { max_tokens: lots }\n",
        5,
        27,
        "\"lots\" is not a number of tokens; write e.g. `max_tokens: 4000`",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    limits: {}\n",
        5,
        13,
        "the limits of rule `r` say nothing; give models, max_tokens or both",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    redact_prompt: { detectors: [ssn], on_detect: block }\n",
        5,
        51,
        "`on_detect: block` is not a choice; write `on_detect: deny`",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    redact_prompt: { on_detect: deny }\n",
        5,
        20,
        "the redact_prompt of rule `r` names no detectors; write e.g. `{ detectors: [payment, \
         ssn, secrets] }`",
    );
    assert_err(
        "version: 1\nhttp_default: audit\n",
        2,
        15,
        "`http_default: audit` is not a choice; write `http_default: allow`",
    );
}

#[test]
fn detector_names_resolve_as_in_masks() {
    let p = policy(
        "\
version: 1
detectors:
  ticket: { pattern: 'TCK-\\d{4}' }
presets:
  mine: [ticket, ssn]
response_mask: mine
rules:
  - { name: r, when: { http: {} }, action: allow, redact_prompt: [mine, payment] }
",
    );
    let d = Req::new().on(&p);
    let redact = d.redact.unwrap().masker;
    assert_eq!(redact.mask_text("TCK-1234 and 123-45-6789").1, 2);
    assert_eq!(p.response_mask().unwrap().mask_text("TCK-1234").1, 1);
    assert_eq!(
        err("version: 1\nprompt_redact: [payment, emial]\n"),
        "policy.yaml:2:26: prompt_redact names `emial`, which is not a detector or a preset (did \
         you mean `email`?); built-in detectors: card, ssn, email, phone, iban, aws_key, jwt, \
         private_key, api_key, url_password, bearer_token; built-in presets: contact (email, \
         phone), personal (ssn, email, phone), payment (card, iban), secrets (aws_key, jwt, \
         private_key, api_key), all (every built-in detector); defined under detectors: none; \
         defined under presets: none"
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    mask_response: { detectors: [tiket] }\n",
        5,
        34,
        "rule `r` names `tiket`, which is not a detector or a preset",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    action: allow\n    mask_response: []\n",
        5,
        20,
        "this list is empty, so it would match nothing; give at least one detector or preset name",
    );
}

#[test]
fn matchers_go_with_targets_that_speak_their_protocol() {
    let src = |when: &str| {
        format!(
            "version: 1\ntargets:\n  db: {{ address: 10.0.4.12, port: 5432, protocol: postgres }}\n  web: {{ port: 80, protocol: http }}\n  openai: {{ host: api.openai.com, protocol: llm }}\n  any: {{ port: 1, protocol: any }}\nrules:\n  - name: r\n    when: {when}\n    action: deny\n"
        )
    };
    // An llm matcher on a postgres target: at the matcher when the target
    // comes first, at the target's name when the matcher does.
    assert_eq!(
        err(&src("{ target: db, llm: { model: \"gpt-*\" } }")),
        "policy.yaml:9:25: rule `r` has an llm matcher, which matches LLM API calls, but its \
         target `db` says `protocol: postgres`; an llm matcher goes with targets of `protocol: \
         llm` (or `any`, or none), so name another target or split the rule"
    );
    assert_err(
        &src("{ llm: {}, target: [any, db] }"),
        9,
        36,
        "rule `r` has an llm matcher, which matches LLM API calls, but its target `db` says \
         `protocol: postgres`",
    );
    assert_err(
        &src("{ target: web, llm: {} }"),
        9,
        26,
        "an llm matcher goes with targets of `protocol: llm` (or `any`, or none), so name another \
         target or split the rule (if `web` is an LLM API, say `protocol: llm` on it)",
    );
    assert_err(
        &src("{ target: db, http: { method: GET } }"),
        9,
        25,
        "rule `r` has an http matcher, which matches HTTP requests, but its target `db` says \
         `protocol: postgres`; an http matcher goes with targets of `protocol: http` or `llm` (or \
         `any`, or none)",
    );
    // A sql matcher on a target with a host (or of protocol llm).
    assert_err(
        &src("{ sql: {}, target: openai }"),
        9,
        30,
        "rule `r` has a sql matcher, which matches PostgreSQL statements, but its target `openai` \
         says `protocol: llm`",
    );
    let p = policy(&src("{ target: [web, openai, any], http: {} }"));
    assert_eq!(p.request_rule_count(), 1);
    let p = policy(&src("{ target: [openai, any], llm: {} }"));
    assert_eq!(p.request_rule_count(), 1);
    assert_err(
        "version: 1\ntargets:\n  h: { host: x.example }\nrules:\n  - { name: r, when: { target: h, sql: {} }, action: deny }\n",
        5,
        35,
        "rule `r` has a sql matcher, which matches PostgreSQL statements, but its target `h` has \
         a host, which only HTTP requests have",
    );
}

#[test]
fn sql_and_http_in_one_when() {
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: r\n    when:\n      sql: { class: write }\n      http: { method: DELETE }\n    action: deny\n"
        ),
        "policy.yaml:6:7: rule `r` has a sql matcher and an http matcher in one when; a sql \
         matcher decides PostgreSQL statements and an http matcher HTTP requests, so no request \
         or statement can meet both: split the rule in two"
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { llm: {}, sql: {} }, action: deny }\n",
        3,
        33,
        "rule `r` has a sql matcher and an llm matcher in one when",
    );
    // http with llm is fine: both hold for the request.
    let p = policy(
        "version: 1\nrules:\n  - { name: r, when: { llm: {}, http: { host: x } }, action: deny }\n",
    );
    assert_eq!(p.request_rule_count(), 1);
}

#[test]
fn request_options_only_on_request_rules_that_allow() {
    assert_eq!(
        err(
            "version: 1\nrules:\n  - name: too-big\n    when: { llm: {} }\n    action: deny\n    limits: { max_tokens: 4000 }\n"
        ),
        "policy.yaml:6:5: rule `too-big` denies, and limits applies to the requests a rule \
         allows; limits goes with `action: allow` or `action: approve`: make the rule allow, or \
         remove its limits"
    );
    // Wherever the action is.
    assert_err(
        "version: 1\nrules:\n  - { name: r, mask_response: [ssn], action: deny }\n",
        3,
        16,
        "rule `r` denies, and mask_response applies to the requests a rule allows",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { sql: { class: read } }\n    action: allow\n    redact_prompt: [ssn]\n",
        6,
        5,
        "rule `r` has a sql matcher, so it decides PostgreSQL statements; redact_prompt applies \
         to HTTP requests: put it on a rule with an http or llm matcher, or split the rule",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { sql: {} }\n    action: allow\n    mask_response: [ssn]\n",
        6,
        5,
        "mask_response applies to HTTP requests (to mask the rows a statement returns, write \
         `mask:`)",
    );
    assert_err(
        "version: 1\ntargets:\n  db: { port: 5432, protocol: postgres }\nrules:\n  - { name: r, when: { target: db }, action: allow, limits: { max_tokens: 1 } }\n",
        5,
        53,
        "rule `r` has limits, which applies to HTTP requests, but its target `db` says \
         `protocol: postgres`",
    );
    // mask on a request rule says what to write instead.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { http: {} }\n    action: allow\n    mask: { detectors: [ssn] }\n",
        6,
        5,
        "rule `r` decides HTTP requests (it has an http or llm matcher, limits, redact_prompt, \
         mask_response, or a target with a host); mask applies to the rows a PostgreSQL statement \
         returns: to mask what an HTTP or LLM API returns, write `mask_response:`",
    );
    // prompt_redact and response_mask with http_default: deny.
    assert_eq!(
        err("version: 1\nresponse_mask: [ssn]\nhttp_default: deny\n"),
        "policy.yaml:2:1: response_mask applies to the HTTP requests no rule matches, but \
         `http_default: deny` refuses those requests; remove response_mask, or write \
         `http_default: allow`"
    );
    assert_err(
        "version: 1\nhttp_default: deny\nprompt_redact: [ssn]\n",
        3,
        1,
        "prompt_redact applies to the HTTP requests no rule matches",
    );
}

#[test]
fn targets_with_a_host() {
    let p = policy(
        "version: 1\ntargets:\n  a: { host: A.example }\n  b: { host: [\"*.b.example\", b.example], port: 443, protocol: any }\n",
    );
    assert_eq!(p.target_count(), 2);
    assert_err(
        "version: 1\ntargets:\n  t: { protocol: postgres, host: db.example }\n",
        3,
        28,
        "a target with a host says `protocol: postgres`; a host is matched per HTTP request (its \
         Host header, else the TLS server name), so a target with one speaks `http`, `llm` or \
         `any`",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { host: db.example, protocol: ssh }\n",
        3,
        36,
        "a target with a host says `protocol: ssh`",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { host: \"api.openai.com/v1\" }\n",
        3,
        14,
        "\"api.openai.com/v1\" has a path; write the host alone, `host: api.openai.com`",
    );
    assert_err(
        "version: 1\ntargets:\n  t: { host: [] }\n",
        3,
        14,
        "this list is empty, so it would match nothing; give at least one host",
    );
}

#[test]
fn every_form_parses() {
    let p = policy(
        "\
version: 1
http_default: allow
prompt_redact: secrets
response_mask: { detectors: payment }
targets:
  openai:
    host: api.openai.com
    protocol: llm
credentials:
  openai:
    api_key_env: PATH
rules:
  - name: block
    when:
      http:
        method: get
        path: /x
        host: X.example
      llm:
        provider: openai
        model: gpt-4.1
        endpoint: chat
    action: allow
    limits:
      models: \"gpt-4.1*\"
      max_tokens: \"4000\"
    redact_prompt:
      - ssn
    mask_response:
      detectors:
        - card
audit:
  prompts: none
",
    );
    assert_eq!((p.request_rule_count(), p.credential_count()), (1, 1));
}

#[test]
fn the_llm_gateway_example_does_what_it_says() {
    let p = with_test_env(EXAMPLE_KEYS, || {
        Policy::load(&policies_dir().join("examples/llm-gateway.yaml"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.http_default(), Action::Deny);
    assert_eq!(p.prompt_audit(), PromptAudit::Digest);
    let openai = |model| Req::new().llm("openai", "chat", Some(model));
    let d = openai("gpt-4.1-mini").max_tokens(1000).on(&p);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Allow, "bot-small-openai-models")
    );
    assert_eq!(d.credential.as_ref().unwrap().secret, "sk-example-openai");
    assert_eq!(d.credential.as_ref().unwrap().header(), None);
    let redact = d.redact.unwrap();
    assert_eq!(redact.on_detect, OnDetect::Deny);
    assert_eq!(
        redact
            .masker
            .mask_text("key sk-proj-abcdefghijklmnopqrstuvwxyz012345")
            .1,
        1
    );
    let d = openai("gpt-4.1").on(&p);
    assert_eq!(d.action, Action::Deny);
    assert!(
        d.reason
            .unwrap()
            .contains("is not allowed by rule \"bot-small-openai-models\"")
    );
    assert_eq!(
        openai("gpt-4.1-mini").max_tokens(5000).decided(&p),
        deny("bot-small-openai-models")
    );
    assert_eq!(
        openai("gpt-4.1-mini").uid(1000).decided(&p),
        deny("default")
    );
    assert_eq!(
        Req::new()
            .llm("openai", "embeddings", Some("text-embedding-3-small"))
            .decided(&p),
        deny("default")
    );
    let claude = Req::new()
        .to("160.79.104.10:443", Some("api.anthropic.com"))
        .llm("anthropic", "messages", Some("claude-3-5-haiku-latest"));
    let d = claude.on(&p);
    assert_eq!((d.action, d.rule.as_str()), (Action::Allow, "bot-claude"));
    assert_eq!(d.redact.unwrap().on_detect, OnDetect::Redact);
    let key = d.credential.unwrap();
    assert_eq!(
        (key.secret.as_str(), key.header()),
        ("sk-ant-example", Some(CredentialHeader::XApiKey))
    );
    let internal = |method, path| {
        Req::new()
            .to("127.0.0.1:8080", Some("localhost"))
            .http(method, path)
    };
    assert_eq!(
        internal("DELETE", "/admin/users/1").decided(&p),
        deny("internal-admin-read-only")
    );
    assert_eq!(
        internal("GET", "/admin/users").decided(&p),
        allow("internal")
    );
    assert_eq!(
        Req::new().to("10.0.0.1:443", Some("pypi.org")).decided(&p),
        deny("default")
    );
    assert_eq!(
        p.summary(),
        "4 rules, 4 of them for HTTP requests, 1 workload, 3 targets, 2 credentials; \
         http_default: deny"
    );
}

#[test]
fn from_llm_matches_requests_to_urls_an_llm_proposed() {
    let p = policy(
        r#"
version: 1
rules:
  - name: no-llm-chosen-urls
    when: { http: { from_llm: true } }
    action: deny
"#,
    );
    assert_eq!(
        Req::new().proposed_by_llm().decided(&p),
        deny("no-llm-chosen-urls")
    );
    assert_eq!(Req::new().decided(&p), allow("default"));
}

#[test]
fn database_passwords_are_credentials_of_postgres_targets() {
    let src = "version: 1\ntargets:\n  crm: { address: 127.0.0.1, port: 5432, protocol: postgres }\n  \
               other: { address: 127.0.0.1, port: 5433, protocol: postgres }\n  openai: { host: \
               api.openai.com }\ncredentials:\n  crm: { user: bot_ro, password_env: PG_PW }\n  \
               other: { password_env: PG_PW }\n  openai: { api_key_env: PG_PW }\n";
    let p = with_test_env(&[("PG_PW", "s3cret\n")], || policy(src));
    let crm = p.login_for("127.0.0.1:5432".parse().unwrap()).unwrap();
    assert_eq!(
        (crm.target.as_str(), crm.secret.as_str(), &crm.kind),
        (
            "crm",
            "s3cret",
            &SecretKind::Password {
                user: Some("bot_ro".into())
            }
        )
    );
    assert_eq!(crm.header(), None);
    let other = p.login_for("127.0.0.1:5433".parse().unwrap()).unwrap();
    assert_eq!(other.kind, SecretKind::Password { user: None });
    assert!(p.login_for("127.0.0.1:5434".parse().unwrap()).is_none());
    // Logins are never API keys, nor the reverse.
    assert_eq!(
        p.credential("openai").unwrap().kind,
        SecretKind::ApiKey { header: None }
    );
    let d = Req::new()
        .to("127.0.0.1:5432", Some("api.openai.com"))
        .on(&p);
    assert!(d.credential.is_none_or(|c| c.target == "openai"));

    let base = "version: 1\ntargets:\n  db: { address: 127.0.0.1, port: 5432, protocol: postgres }\n  \
                web: { host: example.com }\ncredentials:\n";
    assert_err(
        &format!("{base}  web: {{ password_env: PATH }}\n"),
        6,
        8,
        "credential `web` is a database password, which the agent logs in to PostgreSQL with, \
         but its target `web` says `protocol: none`; give the target `protocol: postgres`",
    );
    assert_err(
        &format!("{base}  db: {{ password_env: PATH, header: x-api-key }}\n"),
        6,
        7,
        "credential `db` is a database password, which is not sent in a header",
    );
    assert_err(
        &format!("{base}  web: {{ api_key_env: PATH, user: bob }}\n"),
        6,
        8,
        "credential `web` is an API key, which has no `user`",
    );
    assert_err(
        &format!("{base}  db: {{ password_env: PATH, password_file: /x }}\n"),
        6,
        29,
        "credential `db` has both password_env and password_file",
    );
    assert_err(
        &format!("{base}  db: {{ password_file: relative }}\n"),
        6,
        24,
        "credential `db`: password_file \"relative\" is not an absolute path",
    );
}

#[test]
fn a_rules_mask_response_masks_json_fields_of_any_answer() {
    let src = "version: 1\ntargets:\n  crm-api: { address: 127.0.0.1, port: 8080, protocol: http }\n\
               rules:\n  - name: crm-reads\n    when: { target: crm-api }\n    action: allow\n    \
               mask_response: { fields: [\"$.customers[*].card\", $..ssn], detectors: [payment] }\n";
    let p = policy(src);
    let d = Req::new().to("127.0.0.1:8080", Some("crm.internal")).on(&p);
    assert_eq!(d.rule, "crm-reads");
    assert!(d.mask_any_json);
    let masker = d.mask_response.unwrap();
    let mut doc =
        serde_json::json!({"customers": [{"card": "4111 1111 1111 1111", "ssn": 123456789}]});
    assert_eq!(masker.mask_json(&mut doc), 2);
    assert_eq!(
        doc,
        serde_json::json!({"customers": [{"card": "**** **** **** 1111", "ssn": null}]})
    );
    assert!(p.summary().contains("1 rule"), "{}", p.summary());
    // The top-level response_mask stays with LLM answers.
    let d = Req::new()
        .to("127.0.0.1:9999", None)
        .on(&policy("version: 1\nresponse_mask: [payment]\n"));
    assert!(d.mask_response.is_some() && !d.mask_any_json);

    assert_err(
        &src.replace("$..ssn", "ssn"),
        8,
        54,
        "\"ssn\" is not a JSON path Warden reads (it does not start with `$`)",
    );
}

// ---------------------------------------------------------------------------
// Holding for approval

const HOLDING: &str = "\
version: 1
approvals:
  oidc: { issuer: \"http://127.0.0.1:9400\", client_id: warden }
workloads:
  bot: { match: { unit: \"support-bot.service\" }, owners: [alice] }
targets:
  openai: { host: api.openai.com, protocol: llm }
  internal: { address: \"127.0.0.1\", port: 8080, protocol: http }
rules:
  - name: big-models-need-a-lead
    when: { workload: bot, target: openai, llm: { endpoint: chat } }
    action: approve
    approve: { groups: [leads], expires: 5m }
    limits: { models: [\"gpt-4.1*\"], max_tokens: 4000 }
    redact_prompt: { detectors: [secrets], on_detect: deny }
    mask_response: [payment]
  - name: admin-needs-ops
    when: { target: internal, http: { path: \"/admin/*\" } }
    action: approve
    approve: { groups: [ops, sre], quorum: 2 }
  - name: no-deletes
    when: { target: internal, http: { method: DELETE } }
    action: deny
";

#[test]
fn an_approving_rule_holds_the_request_with_its_approve() {
    let p = policy(HOLDING);
    let call = Req::new()
        .llm("openai", "chat", Some("gpt-4.1"))
        .max_tokens(1000);
    let d = call.on(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.workload.as_deref()),
        (Action::Approve, "big-models-need-a-lead", Some("bot"))
    );
    assert_eq!(d.reason, None);
    let approval = d.approval.expect("who approves");
    assert_eq!(
        *approval,
        ApprovalRule {
            groups: vec!["leads".into()],
            quorum: 1,
            expires: Duration::from_secs(300),
            message: None,
        }
    );
    // What an allow would carry applies once released.
    let redact = d.redact.expect("the rule redacts");
    assert_eq!(redact.on_detect, OnDetect::Deny);
    assert!(d.mask_response.is_some() && d.mask_any_json);
    assert!(Arc::ptr_eq(&call.on(&p).approval.unwrap(), &approval));
    // A plain HTTP request.
    let admin = Req::new()
        .to("127.0.0.1:8080", Some("localhost"))
        .http("POST", "/admin/reindex");
    let d = admin.on(&p);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Approve, "admin-needs-ops")
    );
    let approval = d.approval.unwrap();
    assert_eq!((approval.groups.len(), approval.quorum), (2, 2));
    assert!(d.redact.is_none() && d.mask_response.is_none());
    // Every other decision carries none.
    for req in [
        Req::new()
            .to("127.0.0.1:8080", Some("localhost"))
            .http("DELETE", "/x"),
        Req::new().to("127.0.0.1:8080", Some("localhost")),
        Req::new().uid(1000).llm("openai", "chat", Some("gpt-4.1")),
    ] {
        let d = req.on(&p);
        assert_ne!(d.action, Action::Approve);
        assert!(d.approval.is_none(), "{d:?}");
    }
    assert_eq!(p.owners_of("bot"), ["alice"]);
    assert_eq!(
        p.summary(),
        "3 rules, 3 of them for HTTP requests, 2 holding for approval, 1 workload, 2 targets; \
         approvals by http://127.0.0.1:9400"
    );
}

#[test]
fn limits_still_deny_on_an_approving_rule() {
    let p = policy(HOLDING);
    let call = |model| Req::new().llm("openai", "chat", Some(model));
    let d = call("gpt-5").on(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.reason.as_deref()),
        (
            Action::Deny,
            "big-models-need-a-lead",
            Some(
                "model \"gpt-5\" is not allowed by rule \"big-models-need-a-lead\" (allowed: \
                 gpt-4.1*)"
            )
        )
    );
    assert!(d.approval.is_none() && d.redact.is_none() && d.mask_response.is_none());
    let d = call("gpt-4.1").max_tokens(9000).on(&p);
    assert_eq!(
        (d.action, d.reason.as_deref()),
        (
            Action::Deny,
            Some("max_tokens 9000 is over the limit 4000 of rule \"big-models-need-a-lead\"")
        )
    );
    assert!(d.approval.is_none());
}

#[test]
fn request_options_and_mask_go_on_approving_rules_too() {
    // A statement rule that approves may mask; a request rule that approves
    // may have limits, redact_prompt and mask_response (HOLDING above).
    policy(
        "version: 1\napprovals:\n  oidc: { issuer: \"https://x\", client_id: w }\nrules:\n  - { name: r, when: { sql: {} }, action: approve, approve: { groups: [dba] }, mask: { detectors: [payment] } }\n",
    );
    // Never on a rule of the other kind.
    assert_err(
        "version: 1\napprovals:\n  oidc: { issuer: \"https://x\", client_id: w }\nrules:\n  - name: r\n    when: { sql: {} }\n    action: approve\n    approve: { groups: [dba] }\n    limits: { max_tokens: 10 }\n",
        9,
        5,
        "rule `r` has a sql matcher, so it decides PostgreSQL statements; limits applies to \
         HTTP requests",
    );
    assert_err(
        "version: 1\napprovals:\n  oidc: { issuer: \"https://x\", client_id: w }\nrules:\n  - name: r\n    when: { http: {} }\n    mask: { columns: [a] }\n    action: approve\n    approve: { groups: [dba] }\n",
        7,
        5,
        "rule `r` decides HTTP requests",
    );
    // A request rule that approves is a request rule by its options alone.
    let p = policy(
        "version: 1\napprovals:\n  oidc: { issuer: \"https://x\", client_id: w }\nrules:\n  - { name: r, action: approve, approve: { groups: [dba] }, limits: { max_tokens: 10 } }\n",
    );
    assert_eq!(p.request_rule_count(), 1);
    assert_eq!(
        Req::new().llm("openai", "chat", None).decided(&p),
        (Action::Approve, "r".to_string())
    );
}

#[test]
fn the_approvals_example_holds_large_models() {
    let p = Policy::load(&policies_dir().join("examples/approvals.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let call = |model| Req::new().llm("openai", "chat", Some(model));
    let d = call("gpt-5-mini").on(&p);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Approve, "bot-large-models")
    );
    assert_eq!(d.approval.unwrap().groups, ["team-leads"]);
    assert!(d.redact.is_some());
    assert_eq!(
        call("gpt-4.1").max_tokens(9000).decided(&p),
        deny("bot-large-models")
    );
    assert_eq!(call("gpt-4.1-mini").decided(&p), allow("default"));
    assert_eq!(
        p.summary(),
        "3 rules, 2 of them for SQL statements, 2 holding for approval, 1 of them for HTTP \
         requests, 1 holding for approval, 1 workload, 2 targets; approvals by \
         https://login.example.com/realms/ops"
    );
}
