//! The parts of a policy about HTTP requests and LLM API calls: the `http`
//! and `llm` matchers of a rule's `when`, a rule's `limits`, the detector
//! lists of `redact_prompt`, `mask_response`, `prompt_redact` and
//! `response_mask`, `credentials` and their secrets (an SSH login's parts
//! are in [`super::ssh`]), and their scalars.

#[cfg(test)]
use std::cell::RefCell;
use std::{env::VarError, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    Ctx, Fields, Flag, GlobP, Keys, Many, Mapping, MaskNameP, NameGlobP, One, Parse, compile_mask,
    fail,
    ssh::{self, SshUserP},
};
use crate::masking::JsonPath;
use crate::policy::{
    CredentialHeader, HttpMatcher, LLM_ENDPOINTS, LLM_PROVIDERS, Limits, LlmMatcher, Mask,
    OnDetect, PromptRedact, Protocol, SecretKind, glob::Glob,
};

pub(crate) const HTTP: Fields = Fields {
    what: "in a rule's http",
    known: &["method", "path", "host", "from_llm"],
    later: &[
        ("headers", "header matchers"),
        ("header", "header matchers"),
    ],
    instead: &[
        (
            "columns",
            "column globs make no sense for HTTP; to mask what the server returns write \
             `mask_response:` in the rule",
        ),
        (
            "methods",
            "write `method:`, which takes one method or a list",
        ),
        ("paths", "write `path:`, which takes one glob or a list"),
        ("hosts", "write `host:`, which takes one glob or a list"),
        (
            "url",
            "write the host and the path apart: `http: { host: api.example.com, path: \"/v1/*\" }`",
        ),
        (
            "query",
            "paths are matched without their query string; match the path alone",
        ),
        (
            "model",
            "models go in the llm matcher, next to http: `llm: { model: \"gpt-4.1*\" }`",
        ),
    ],
};

pub(crate) const LLM: Fields = Fields {
    what: "in a rule's llm",
    known: &["provider", "model", "endpoint"],
    later: &[],
    instead: &[
        (
            "models",
            "write `model:`, which takes one glob or a list; to allow some models and deny the \
             others, use the rule's `limits: { models: [...] }`",
        ),
        (
            "providers",
            "write `provider:`, which takes one name or a list",
        ),
        (
            "endpoints",
            "write `endpoint:`, which takes one name or a list",
        ),
        (
            "max_tokens",
            "max_tokens is a limit, in the rule next to its action: `limits: { max_tokens: 4000 }`",
        ),
        (
            "columns",
            "column globs make no sense for LLM calls; to mask what the model returns write \
             `mask_response:` in the rule",
        ),
        (
            "path",
            "paths go in the http matcher, next to llm: `http: { path: \"/v1/*\" }`",
        ),
    ],
};

pub(crate) const LIMITS: Fields = Fields {
    what: "in a rule's limits",
    known: &["models", "max_tokens"],
    later: &[],
    instead: &[
        ("model", "write `models:`, which takes one glob or a list"),
        ("tokens", "write `max_tokens:`"),
        ("max_output_tokens", "write `max_tokens:`"),
        ("max_completion_tokens", "write `max_tokens:`"),
    ],
};

pub(crate) const REDACT: Fields = Fields {
    what: "in a prompt redaction",
    known: &["detectors", "on_detect"],
    later: &[],
    instead: &[
        (
            "columns",
            "column globs make no sense for HTTP: a prompt is text, and the detectors find what \
             to redact in it",
        ),
        (
            "detector",
            "write `detectors:`, which takes one name or a list",
        ),
        ("action", "write `on_detect: redact` or `on_detect: deny`"),
        ("on_detection", "write `on_detect:`"),
    ],
};

pub(crate) const RESPONSE_MASK: Fields = Fields {
    what: "in a response mask",
    known: &["detectors", "fields"],
    later: &[],
    instead: &[
        (
            "columns",
            "column globs make no sense for HTTP: a response is text, and the detectors find \
             what to mask in it",
        ),
        (
            "detector",
            "write `detectors:`, which takes one name or a list",
        ),
        (
            "on_detect",
            "a response is always masked, never refused; on_detect goes in redact_prompt and \
             prompt_redact",
        ),
    ],
};

pub(crate) const CREDENTIAL: Fields = Fields {
    what: "in a credential",
    known: &[
        "api_key_env",
        "api_key_file",
        "header",
        "password_env",
        "password_file",
        "private_key_env",
        "private_key_file",
        "user",
    ],
    later: &[],
    instead: &[
        (
            "private_key",
            "a key never goes in the policy: write `private_key_file: /path/to/key` or \
             `private_key_env: VARIABLE`",
        ),
        ("identity_file", "write `private_key_file:`"),
        (
            "key_file",
            "write `private_key_file:` (SSH) or `api_key_file:`",
        ),
        ("ssh_key_file", "write `private_key_file:`"),
        (
            "host_keys",
            "the server's host keys go in its target: `targets: { build-box: { ..., host_keys: \
             [\"ssh-ed25519 AAAA...\"] } }`",
        ),
        (
            "known_hosts",
            "a known_hosts file goes in the target: `targets: { build-box: { ..., known_hosts: \
             /etc/warden/ssh_known_hosts } }`",
        ),
        ("env", "write `api_key_env:`"),
        ("file", "write `api_key_file:`"),
        ("api_key_path", "write `api_key_file:`"),
        (
            "api_key",
            "a key never goes in the policy: write `api_key_env: VARIABLE` or `api_key_file: \
             /path/to/file`",
        ),
        (
            "key",
            "a key never goes in the policy: write `api_key_env: VARIABLE` or `api_key_file: \
             /path/to/file`",
        ),
        (
            "secret",
            "a key never goes in the policy: write `api_key_env: VARIABLE` or `api_key_file: \
             /path/to/file`",
        ),
        (
            "token",
            "a key never goes in the policy: write `api_key_env: VARIABLE` or `api_key_file: \
             /path/to/file`",
        ),
    ],
};

const MODEL_EXAMPLE: &str = "\"gpt-4.1*\"";
const PATH_EXAMPLE: &str = "\"/admin/*\"";

// ---------------------------------------------------------------------------
// Matchers and limits

/// A rule's `http` matcher.
#[derive(Default)]
pub(super) struct HttpKeys(HttpMatcher);

impl<'de> Keys<'de> for HttpKeys {
    type Value = HttpMatcher;

    fn fields(&self) -> &'static Fields {
        &HTTP
    }

    fn expecting(&self) -> String {
        format!(
            "an http matcher: a mapping with some of {}",
            HTTP.known.join(", ")
        )
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let m = &mut self.0;
        match key {
            "method" => m.method = Some(map.next_value_seed(Many::new(MethodP, "method"))?),
            "path" => m.path = Some(map.next_value_seed(Many::new(PathP, "path"))?),
            "host" => m.host = Some(map.next_value_seed(Many::new(HostP, "host"))?),
            "from_llm" => m.from_llm = Some(map.next_value_seed(Flag("from_llm"))?),
            _ => unreachable!("{key} is in HTTP.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<HttpMatcher, E> {
        Ok(self.0)
    }
}

/// A rule's `llm` matcher.
#[derive(Default)]
pub(super) struct LlmKeys(LlmMatcher);

impl<'de> Keys<'de> for LlmKeys {
    type Value = LlmMatcher;

    fn fields(&self) -> &'static Fields {
        &LLM
    }

    fn expecting(&self) -> String {
        format!(
            "an llm matcher: a mapping with some of {}",
            LLM.known.join(", ")
        )
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let m = &mut self.0;
        match key {
            "provider" => m.provider = Some(map.next_value_seed(Many::new(ProviderP, "provider"))?),
            "model" => {
                m.model = Some(map.next_value_seed(Many::new(NameGlobP(MODEL_EXAMPLE), "model"))?)
            }
            "endpoint" => m.endpoint = Some(map.next_value_seed(Many::new(EndpointP, "endpoint"))?),
            _ => unreachable!("{key} is in LLM.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<LlmMatcher, E> {
        Ok(self.0)
    }
}

/// A rule's `limits`.
pub(super) struct LimitsKeys {
    /// "rule `r`".
    owner: String,
    limits: Limits,
}

impl LimitsKeys {
    pub(super) fn new(ctx: &Ctx) -> LimitsKeys {
        LimitsKeys {
            owner: format!("rule `{}`", ctx.current_rule()),
            limits: Limits::default(),
        }
    }
}

impl<'de> Keys<'de> for LimitsKeys {
    type Value = Limits;

    fn fields(&self) -> &'static Fields {
        &LIMITS
    }

    fn expecting(&self) -> String {
        "limits: a mapping with models and/or max_tokens".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let l = &mut self.limits;
        match key {
            "models" => {
                l.models = Some(map.next_value_seed(Many::new(NameGlobP(MODEL_EXAMPLE), "model"))?)
            }
            "max_tokens" => l.max_tokens = Some(map.next_value_seed(One(MaxTokensP))?),
            _ => unreachable!("{key} is in LIMITS.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Limits, E> {
        if self.limits.models.is_none() && self.limits.max_tokens.is_none() {
            return Err(fail(format!(
                "the limits of {} say nothing; give models, max_tokens or both, e.g. `{{ models: \
                 [\"gpt-4.1-mini*\"], max_tokens: 4000 }}`",
                self.owner
            )));
        }
        Ok(self.limits)
    }
}

// ---------------------------------------------------------------------------
// Prompt redaction and response masking

/// `redact_prompt`, `mask_response`, `prompt_redact` or `response_mask`:
/// compiled on the second reading only, as a mask is.
pub(super) struct DetectorsDef {
    pub(super) compiled: Option<Mask>,
    pub(super) on_detect: OnDetect,
}

impl DetectorsDef {
    pub(super) fn redact(self) -> Option<PromptRedact> {
        let on_detect = self.on_detect;
        self.compiled.map(|mask| PromptRedact { mask, on_detect })
    }
}

/// A list of detector and preset names, or a mapping: `{ detectors: [...],
/// on_detect: deny }` (redaction) or `{ detectors: [...] }` (masking). A
/// list is a mapping with `detectors` only (and `on_detect: redact`).
pub(super) struct DetectorsSeed<'c> {
    ctx: &'c Ctx,
    /// "redact_prompt", "mask_response", "prompt_redact" or "response_mask".
    key: &'static str,
    /// Who names the detectors, for messages: "rule `r`", or the key.
    owner: String,
}

impl<'c> DetectorsSeed<'c> {
    /// `redact_prompt` or `mask_response` of the current rule.
    pub(super) fn rule(ctx: &'c Ctx, key: &'static str) -> DetectorsSeed<'c> {
        DetectorsSeed {
            ctx,
            key,
            owner: format!("rule `{}`", ctx.current_rule()),
        }
    }

    /// `prompt_redact` or `response_mask`.
    pub(super) fn top(ctx: &'c Ctx, key: &'static str) -> DetectorsSeed<'c> {
        DetectorsSeed {
            ctx,
            key,
            owner: key.to_string(),
        }
    }

    fn redacts(&self) -> bool {
        matches!(self.key, "redact_prompt" | "prompt_redact")
    }

    /// "the redact_prompt of rule `r`", or "prompt_redact".
    fn what(&self) -> String {
        if self.owner == self.key {
            self.key.to_string()
        } else {
            format!("the {} of {}", self.key, self.owner)
        }
    }

    fn names(&self) -> Many<MaskNameP<'c, '_>> {
        let names = MaskNameP {
            ctx: self.ctx,
            owner: &self.owner,
        };
        Many::new(names, "detector or preset name")
    }

    fn compile<E: de::Error>(
        &self,
        names: Vec<String>,
        fields: Vec<JsonPath>,
        on_detect: OnDetect,
    ) -> Result<DetectorsDef, E> {
        let compiled =
            compile_mask(self.ctx, &self.what(), Vec::new(), &names, fields).map_err(fail)?;
        Ok(DetectorsDef {
            compiled,
            on_detect,
        })
    }

    /// The names of a list (or of one name), read by [`Many`].
    fn list<E: de::Error>(&self, names: Result<Vec<String>, E>) -> Result<DetectorsDef, E> {
        self.compile(names?, Vec::new(), OnDetect::Redact)
    }
}

impl<'de> DeserializeSeed<'de> for DetectorsSeed<'_> {
    type Value = DetectorsDef;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<DetectorsDef, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DetectorsSeed<'_> {
    type Value = DetectorsDef;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.redacts() {
            f.write_str(
                "a list of detector and preset names, or a mapping with detectors and on_detect",
            )
        } else {
            f.write_str("a list of detector and preset names, or a mapping with detectors")
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DetectorsDef, A::Error> {
        Mapping(DetectorsKeys {
            seed: self,
            detectors: None,
            fields: None,
            on_detect: None,
        })
        .visit_map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<DetectorsDef, A::Error> {
        self.list(self.names().visit_seq(seq))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<DetectorsDef, E> {
        self.list(self.names().visit_str(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<DetectorsDef, E> {
        self.list(self.names().visit_u64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<DetectorsDef, E> {
        self.list(self.names().visit_i64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<DetectorsDef, E> {
        self.list(self.names().visit_f64(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<DetectorsDef, E> {
        self.list(self.names().visit_bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<DetectorsDef, E> {
        self.list(self.names().visit_unit())
    }
}

struct DetectorsKeys<'c> {
    seed: DetectorsSeed<'c>,
    detectors: Option<Vec<String>>,
    /// A response mask's JSON paths.
    fields: Option<Vec<JsonPath>>,
    on_detect: Option<OnDetect>,
}

impl<'de> Keys<'de> for DetectorsKeys<'_> {
    type Value = DetectorsDef;

    fn fields(&self) -> &'static Fields {
        if self.seed.redacts() {
            &REDACT
        } else {
            &RESPONSE_MASK
        }
    }

    fn expecting(&self) -> String {
        if self.seed.redacts() {
            "a prompt redaction: a mapping with detectors, and optionally on_detect".into()
        } else {
            "a response mask: a mapping with detectors and/or fields (JSON paths)".into()
        }
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "detectors" => self.detectors = Some(map.next_value_seed(self.seed.names())?),
            "on_detect" => self.on_detect = Some(map.next_value_seed(One(OnDetectP))?),
            "fields" => self.fields = Some(map.next_value_seed(Many::new(JsonPathP, "JSON path"))?),
            _ => unreachable!("{key} is in REDACT.known or RESPONSE_MASK.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<DetectorsDef, E> {
        if self.detectors.is_none() && self.fields.is_none() {
            return Err(fail(format!(
                "{} names no detectors; write e.g. `{{ detectors: [payment, ssn, secrets] }}`, \
                 or just the list: `[payment, ssn, secrets]`",
                self.seed.what()
            )));
        }
        self.seed.compile(
            self.detectors.unwrap_or_default(),
            self.fields.unwrap_or_default(),
            self.on_detect.unwrap_or(OnDetect::Redact),
        )
    }
}

// ---------------------------------------------------------------------------
// Credentials

/// A credential, before it is given its target: on the second reading, its
/// secret. No Debug: it holds the secret.
pub(super) struct CredentialDef {
    pub(super) secret: Option<String>,
    pub(super) kind: CredentialKind,
}

/// What a credential is, as its keys and (on the second reading) its
/// target's protocol say.
pub(super) enum CredentialKind {
    /// An API key, or a PostgreSQL password.
    Plain(SecretKind),
    /// An SSH login (a `protocol: ssh` target): the user to log in as, and
    /// whether the secret is a private key (else a password).
    Ssh {
        user: Option<String>,
        private_key: bool,
    },
}

pub(super) struct CredentialKeys<'c> {
    ctx: &'c Ctx,
    /// The credential's name: its target's.
    name: String,
    /// "credential `name`", for messages.
    owner: String,
    /// "/etc/warden/secrets/name", for messages.
    file_example: String,
    /// "api_key_env", "api_key_file", "password_env", "password_file",
    /// "private_key_env" or "private_key_file", once read.
    source: Option<&'static str>,
    secret: Option<String>,
    header: Option<CredentialHeader>,
    user: Option<String>,
}

impl<'c> CredentialKeys<'c> {
    pub(super) fn new(ctx: &'c Ctx, name: &str) -> CredentialKeys<'c> {
        CredentialKeys {
            ctx,
            name: name.to_string(),
            owner: format!("credential `{name}`"),
            file_example: format!("/etc/warden/secrets/{name}"),
            source: None,
            secret: None,
            header: None,
            user: None,
        }
    }
}

impl<'de> Keys<'de> for CredentialKeys<'_> {
    type Value = CredentialDef;

    fn fields(&self) -> &'static Fields {
        &CREDENTIAL
    }

    fn expecting(&self) -> String {
        "a credential: a mapping with api_key_env or api_key_file (and optionally header), or \
         password_env or password_file (and optionally user), or for SSH private_key_env or \
         private_key_file (and optionally user)"
            .into()
    }

    /// The second source of the secret: at its key.
    fn check(&self, key: &'static str) -> Result<(), String> {
        match (key, self.source) {
            (
                "api_key_env" | "api_key_file" | "password_env" | "password_file"
                | "private_key_env" | "private_key_file",
                Some(first),
            ) => Err(format!(
                "credential `{}` has both {first} and {key}; keep one: the secret is read \
                     from one place",
                self.name
            )),
            _ => Ok(()),
        }
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let (ctx, owner) = (self.ctx, self.owner.as_str());
        match key {
            "api_key_env" | "password_env" | "private_key_env" => {
                let example = if key == "private_key_env" {
                    "BUILD_BOX_SSH_KEY"
                } else {
                    "OPENAI_API_KEY"
                };
                self.secret = map.next_value_seed(One(EnvKeyP {
                    ctx,
                    owner,
                    key,
                    example,
                }))?;
                self.source = Some(key);
            }
            "api_key_file" | "password_file" | "private_key_file" => {
                self.secret = map.next_value_seed(One(KeyFileP {
                    ctx,
                    owner,
                    key,
                    example: &self.file_example,
                }))?;
                self.source = Some(key);
            }
            "header" => self.header = Some(map.next_value_seed(One(HeaderP))?),
            "user" => {
                let ssh_target = ctx
                    .names
                    .as_ref()
                    .is_some_and(|names| names.target_protocol(&self.name) == Some(Protocol::Ssh));
                self.user = Some(if ssh_target {
                    map.next_value_seed(One(SshUserP))?
                } else {
                    map.next_value_seed(One(DbUserP))?
                })
            }
            _ => unreachable!("{key} is in CREDENTIAL.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<CredentialDef, E> {
        let name = &self.name;
        // On the second reading: what the target speaks.
        let protocol = self
            .ctx
            .names
            .as_ref()
            .map(|names| names.target_protocol(name));
        let ssh_target = protocol == Some(Some(Protocol::Ssh));
        let kind = match self.source {
            None => {
                return Err(fail(format!(
                    "credential `{name}` does not say where its secret is; write `api_key_env: \
                     VARIABLE` or `api_key_file: /path/to/file` for an API key, or \
                     `password_env:` or `password_file:` for a database password; for an SSH \
                     login, `private_key_file:` or `private_key_env:` (or a password)"
                )));
            }
            Some("api_key_env" | "api_key_file") => {
                if self.user.is_some() {
                    return Err(fail(format!(
                        "credential `{name}` is an API key, which has no `user`; a `user` goes \
                         with `password_env` or `password_file`, for a database"
                    )));
                }
                CredentialKind::Plain(SecretKind::ApiKey {
                    header: self.header,
                })
            }
            Some(source) => {
                let private_key = source.starts_with("private_key");
                // A password's target (a database's or an SSH server's) is
                // known on the second reading.
                if self.header.is_some() && (private_key || protocol.is_some()) {
                    let what = if private_key || ssh_target {
                        "an SSH login"
                    } else {
                        "a database password"
                    };
                    return Err(fail(format!(
                        "credential `{name}` is {what}, which is not sent in a header; `header` \
                         goes with `api_key_env` or `api_key_file`"
                    )));
                }
                if private_key || ssh_target {
                    CredentialKind::Ssh {
                        user: self.user,
                        private_key,
                    }
                } else {
                    CredentialKind::Plain(SecretKind::Password { user: self.user })
                }
            }
        };
        if let Some(protocol) = protocol {
            let fits = match &kind {
                CredentialKind::Plain(SecretKind::ApiKey { .. }) => Protocol::speaks_http(protocol),
                CredentialKind::Plain(SecretKind::Password { .. }) => {
                    protocol == Some(Protocol::Postgres)
                }
                CredentialKind::Ssh { .. } => protocol == Some(Protocol::Ssh),
            };
            if !fits {
                let (what, wanted) = match &kind {
                    CredentialKind::Plain(SecretKind::ApiKey { .. }) => (
                        "an API key, which the agent puts in HTTP requests",
                        "`protocol: http`, `llm` or `any` (or no protocol)",
                    ),
                    CredentialKind::Plain(SecretKind::Password { .. }) => (
                        "a database password, which the agent logs in to PostgreSQL with",
                        "`protocol: postgres` (or `protocol: ssh` for an SSH password)",
                    ),
                    CredentialKind::Ssh { .. } => (
                        "an SSH private key, which the agent logs in to SSH servers with",
                        "`protocol: ssh`",
                    ),
                };
                return Err(fail(format!(
                    "credential `{name}` is {what}, but its target `{name}` says `protocol: {}`; \
                     give the target {wanted}, or use the other kind of credential",
                    protocol.map_or("none", Protocol::as_str)
                )));
            }
        }
        Ok(CredentialDef {
            secret: self.secret,
            kind,
        })
    }
}

#[cfg(test)]
thread_local! {
    /// Environment variables that the policy readings of this thread see,
    /// in tests: setting the process's own would race other threads.
    static TEST_ENV: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `vars` set for the policy readings of this thread only
/// (the real environment is still read for the others).
#[cfg(test)]
pub(crate) fn with_test_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
    let set = |vars: Vec<(String, String)>| TEST_ENV.with(|env| *env.borrow_mut() = vars);
    set(vars
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect());
    let out = f();
    set(Vec::new());
    out
}

fn env_var(name: &str) -> Result<String, VarError> {
    #[cfg(test)]
    if let Some(value) = TEST_ENV.with(|env| {
        env.borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }) {
        return Ok(value);
    }
    std::env::var(name)
}

/// A secret as read from `source` ("the environment variable X"), trimmed
/// of its trailing newline, for `owner` ("credential `openai`"). Messages
/// never show it.
fn checked_secret(owner: &str, source: &str, value: String) -> Result<String, String> {
    let key = value.trim_end_matches(['\n', '\r']);
    if key.trim().is_empty() {
        return Err(format!("{owner}: {source} is empty; put the secret in it"));
    }
    if key.chars().any(char::is_control) {
        return Err(format!(
            "{owner}: the secret in {source} has a line break or another control character \
             inside it; a secret is one line (only a trailing newline is trimmed)"
        ));
    }
    Ok(key.to_string())
}

/// The secret of `key` as read from `source`: an SSH private key
/// ([`ssh::checked_private_key`]), or any other secret ([`checked_secret`]).
fn checked(key: &str, owner: &str, source: &str, value: String) -> Result<String, String> {
    if key.starts_with("private_key") {
        ssh::checked_private_key(owner, source, value)
    } else {
        checked_secret(owner, source, value)
    }
}

/// `api_key_env`, `password_env`, `private_key_env` or `client_secret_env`:
/// the secret, read on the second reading.
#[derive(Clone, Copy)]
pub(super) struct EnvKeyP<'c, 'n> {
    pub(super) ctx: &'c Ctx,
    /// Whose secret, for messages: "credential `openai`", "approvals.oidc".
    pub(super) owner: &'n str,
    /// `api_key_env`, `password_env` or `client_secret_env`.
    pub(super) key: &'static str,
    /// A variable's name, for messages: OPENAI_API_KEY.
    pub(super) example: &'static str,
}

impl Parse for EnvKeyP<'_, '_> {
    type Out = Option<String>;
    fn expecting(&self) -> String {
        format!(
            "the name of an environment variable such as {}",
            self.example
        )
    }
    fn text(&self, s: &str) -> Result<Option<String>, String> {
        let (owner, key, example) = (self.owner, self.key, self.example);
        let name_ok = s.chars().next().is_some_and(|c| !c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            // Not echoed: it may be the secret itself, written here by mistake.
            return Err(format!(
                "{owner}: {key} takes the name of an environment variable (letters, digits and \
                 _), such as {example}; this value is not one (a secret itself never goes in \
                 the policy)"
            ));
        }
        if self.ctx.names.is_none() {
            return Ok(None);
        }
        let source = format!("the environment variable {s}");
        match env_var(s) {
            Ok(value) => checked(key, owner, &source, value).map(Some),
            Err(VarError::NotPresent) => Err(format!(
                "{owner}: the environment variable {s} is not set in the \
                 agent's environment; set it where the agent starts (e.g. `Environment=` or \
                 `EnvironmentFile=` in its systemd unit), or write `{}:` instead",
                key.replace("_env", "_file")
            )),
            Err(VarError::NotUnicode(_)) => Err(format!(
                "{owner}: {source} is not valid UTF-8; a secret is text"
            )),
        }
    }
    fn int(&self, _: i128) -> Result<Option<String>, String> {
        self.text("0")
    }
}

/// `api_key_file`, `password_file`, `private_key_file` or
/// `client_secret_file`: the secret, read on the second reading.
#[derive(Clone, Copy)]
pub(super) struct KeyFileP<'c, 'n> {
    pub(super) ctx: &'c Ctx,
    /// Whose secret, for messages: "credential `openai`", "approvals.oidc".
    pub(super) owner: &'n str,
    /// `api_key_file`, `password_file` or `client_secret_file`.
    pub(super) key: &'static str,
    /// A path, for messages: /etc/warden/secrets/openai.
    pub(super) example: &'n str,
}

impl Parse for KeyFileP<'_, '_> {
    type Out = Option<String>;
    fn expecting(&self) -> String {
        format!("a file such as {}", self.example)
    }
    fn text(&self, s: &str) -> Result<Option<String>, String> {
        let (owner, key) = (self.owner, self.key);
        if !s.starts_with('/') {
            return Err(format!(
                "{owner}: {key} {s:?} is not an absolute path; write e.g. {}",
                self.example
            ));
        }
        if self.ctx.names.is_none() {
            return Ok(None);
        }
        match std::fs::read_to_string(s) {
            Ok(value) => checked(key, owner, &format!("the file {s}"), value).map(Some),
            Err(e) => Err(format!(
                "{owner}: cannot read {key} {s}: {e}; put the secret in that \
                 file and make it readable by the agent, or write `{}:` instead",
                key.replace("_file", "_env")
            )),
        }
    }
}

/// A JSON path of a response mask's `fields`.
#[derive(Clone, Copy)]
struct JsonPathP;

impl Parse for JsonPathP {
    type Out = JsonPath;
    fn expecting(&self) -> String {
        "a JSON path such as $.customers[*].card".into()
    }
    fn text(&self, s: &str) -> Result<JsonPath, String> {
        s.parse()
            .map_err(|e: crate::masking::JsonPathError| e.to_string())
    }
}

/// A credential's `user`: the PostgreSQL role the agent logs in as.
#[derive(Clone, Copy)]
struct DbUserP;

impl Parse for DbUserP {
    type Out = String;
    fn expecting(&self) -> String {
        "a PostgreSQL user name such as bot_ro".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.contains('\0') {
            return Err("a user name is not empty and has no NUL character".into());
        }
        Ok(s.to_string())
    }
}

#[derive(Clone, Copy)]
struct HeaderP;

impl Parse for HeaderP {
    type Out = CredentialHeader;
    fn expecting(&self) -> String {
        "authorization or x-api-key".into()
    }
    fn text(&self, s: &str) -> Result<CredentialHeader, String> {
        match s.to_ascii_lowercase().as_str() {
            "authorization" => Ok(CredentialHeader::Authorization),
            "x-api-key" => Ok(CredentialHeader::XApiKey),
            "bearer" => Err(
                "write `header: authorization`: the key is sent as `Authorization: Bearer <key>`"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not a header credentials are sent in; write `header: authorization` \
                 (sent as `Bearer <key>`) or `header: x-api-key`, or leave it out to use the \
                 provider's own"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Scalars

/// A caseless glob on an HTTP request's host (a target's `host`, an http
/// matcher's).
#[derive(Clone, Copy)]
pub(super) struct HostP;

impl Parse for HostP {
    type Out = Glob;
    fn expecting(&self) -> String {
        "a host name or glob such as api.openai.com or \"*.openai.azure.com\"".into()
    }
    fn text(&self, s: &str) -> Result<Glob, String> {
        let t = s.trim();
        if let Some((_, rest)) = t.split_once("://") {
            let host = rest.split(['/', ':']).next().unwrap_or(rest);
            return Err(format!(
                "{s:?} is a URL; write the host alone: `host: {host}` (paths go in a rule's http \
                 matcher)"
            ));
        }
        if let Some((host, _)) = t.split_once('/') {
            return Err(format!(
                "{s:?} has a path; write the host alone, `host: {host}`, and match paths in a \
                 rule's http matcher: `http: {{ path: \"/v1/*\" }}`"
            ));
        }
        if let Some((host, port)) = t.rsplit_once(':') {
            if !host.contains(':') && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{s:?} has a port; a host is matched without its port: write `host: {host}`, \
                     and the port apart in the target: `port: {port}`"
                ));
            }
            return Err(format!(
                "{s:?} is not a host name; an IPv6 address goes under `address:`"
            ));
        }
        if t.is_empty() || t.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?} is not a host name; write e.g. api.openai.com or \"*.openai.azure.com\""
            ));
        }
        Glob::new_caseless(t).map_err(|why| {
            format!(
                "{s:?} is not a valid host glob: {why}; write e.g. \"*.openai.azure.com\" (* \
                 matches any characters, dots included; case does not matter)"
            )
        })
    }
}

#[derive(Clone, Copy)]
struct MethodP;

impl Parse for MethodP {
    type Out = String;
    fn expecting(&self) -> String {
        "an HTTP method such as GET or DELETE".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let t = s.trim();
        if t.starts_with('/') {
            return Err(format!(
                "{s:?} is a path, not an HTTP method; paths go under `path:`, e.g. `http: {{ \
                 method: DELETE, path: \"{t}\" }}`"
            ));
        }
        if t == "*" {
            return Err(
                "method \"*\" is not a method; leave `method` out to match every method".into(),
            );
        }
        if t.is_empty()
            || !t
                .chars()
                .all(|c| c.is_ascii_alphabetic() || c == '-' || c == '_')
        {
            return Err(format!(
                "{s:?} is not an HTTP method; write e.g. GET, POST, PUT, PATCH or DELETE (case \
                 does not matter)"
            ));
        }
        Ok(t.to_ascii_uppercase())
    }
}

/// A glob on an HTTP path, without the query; case matters.
#[derive(Clone, Copy)]
struct PathP;

impl Parse for PathP {
    type Out = Glob;
    fn expecting(&self) -> String {
        format!("a path glob such as {PATH_EXAMPLE}")
    }
    fn text(&self, s: &str) -> Result<Glob, String> {
        if s.contains("://") {
            return Err(format!(
                "{s:?} is a URL; write the path alone, e.g. {PATH_EXAMPLE}, and the host in \
                 `host:`"
            ));
        }
        if !s.starts_with('/') && !s.starts_with('*') {
            return Err(format!(
                "{s:?} does not start with /; a path glob matches the whole path, e.g. \
                 {PATH_EXAMPLE}"
            ));
        }
        GlobP(PATH_EXAMPLE).text(s)
    }
}

#[derive(Clone, Copy)]
pub(super) struct ProviderP;

impl Parse for ProviderP {
    type Out = &'static str;
    fn expecting(&self) -> String {
        format!("an LLM provider: one of {}", LLM_PROVIDERS.join(", "))
    }
    fn text(&self, s: &str) -> Result<&'static str, String> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(&provider) = LLM_PROVIDERS.iter().find(|&&p| p == lower) {
            return Ok(provider);
        }
        let hint = match lower.as_str() {
            "azure" | "azure-openai" | "azure_openai" | "azureopenai" => {
                " (Azure OpenAI speaks the OpenAI API: write `openai`)"
            }
            "gpt" | "chatgpt" | "open-ai" | "open_ai" => " (OpenAI is `openai`)",
            "claude" => " (Claude's provider is `anthropic`)",
            _ => "",
        };
        Err(format!(
            "{s:?} is not an LLM provider{hint}; write one of: {}",
            LLM_PROVIDERS.join(", ")
        ))
    }
}

#[derive(Clone, Copy)]
struct EndpointP;

impl Parse for EndpointP {
    type Out = &'static str;
    fn expecting(&self) -> String {
        format!("an LLM endpoint: one of {}", LLM_ENDPOINTS.join(", "))
    }
    fn text(&self, s: &str) -> Result<&'static str, String> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(&endpoint) = LLM_ENDPOINTS.iter().find(|&&e| e == lower) {
            return Ok(endpoint);
        }
        let bare = lower.trim_start_matches('/').trim_start_matches("v1/");
        let hint = match bare {
            "chat/completions" | "chat.completions" | "chat_completions" => {
                " (OpenAI's /v1/chat/completions is `chat`)"
            }
            "messages" | "message" => " (Anthropic's /v1/messages is `messages`)",
            "embedding" | "embeddings" => " (/v1/embeddings is `embeddings`)",
            "completion" | "completions" => " (the legacy /v1/completions is `completions`)",
            "response" | "responses" => " (OpenAI's /v1/responses is `responses`)",
            _ => "",
        };
        Err(format!(
            "{s:?} is not an LLM endpoint{hint}; write one of: {}",
            LLM_ENDPOINTS.join(", ")
        ))
    }
}

#[derive(Clone, Copy)]
struct MaxTokensP;

impl Parse for MaxTokensP {
    type Out = u64;
    fn expecting(&self) -> String {
        "a number of tokens such as 4000".into()
    }
    fn text(&self, s: &str) -> Result<u64, String> {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return self.int(t.parse::<i128>().unwrap_or(i128::MAX));
        }
        Err(format!(
            "{s:?} is not a number of tokens; write e.g. `max_tokens: 4000`"
        ))
    }
    fn int(&self, n: i128) -> Result<u64, String> {
        match u64::try_from(n) {
            Ok(0) => Err(
                "max_tokens 0 would deny every request that says how many tokens it wants; \
                 write a positive number"
                    .into(),
            ),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "{n} is not a number of tokens; write a positive number such as 4000"
            )),
        }
    }
}

#[derive(Clone, Copy)]
struct OnDetectP;

impl Parse for OnDetectP {
    type Out = OnDetect;
    fn expecting(&self) -> String {
        "redact or deny".into()
    }
    fn text(&self, s: &str) -> Result<OnDetect, String> {
        match s {
            "redact" => Ok(OnDetect::Redact),
            "deny" => Ok(OnDetect::Deny),
            "block" | "refuse" | "reject" => Err(format!(
                "`on_detect: {s}` is not a choice; write `on_detect: deny` to refuse a request \
                 whose prompt has a finding"
            )),
            "mask" => Err(
                "`on_detect: mask` is not a choice; write `on_detect: redact` to replace the \
                 findings and send the request on"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not a choice for on_detect; write `on_detect: redact` (replace the \
                 findings) or `on_detect: deny` (refuse the request)"
            )),
        }
    }
}
