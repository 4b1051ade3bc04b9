//! Policy: decides per connection, per PostgreSQL statement, per HTTP
//! request (LLM API calls included) and per SSH request, from one YAML file
//! (docs/policy.md).
//!
//! Who (workloads, from the kernel's attribution), where (targets: addresses,
//! ports, HTTP hosts and what they speak), and rules that allow or deny,
//! first match wins. Each rule is of one of four kinds:
//!
//! - a *connection rule* (no protocol matcher) decides connections;
//! - a *statement rule* (a `sql` matcher) decides each statement of a
//!   PostgreSQL session, never a connection; one that allows may also mask
//!   the rows the statement returns (`mask`, compiled at load into a
//!   [`crate::masking::Masker`] that the [`Decision`] carries), and
//!   `sql_mask` masks the rows of statements no rule decides;
//! - a *request rule* (an `http` or `llm` matcher, `limits`, `redact_prompt`,
//!   `mask_response`, or a target with `host`) decides each HTTP request,
//!   never a connection nor a statement; one that allows may bound the LLM
//!   call (`limits`), redact its prompt and mask its response, and
//!   `http_default`, `prompt_redact` and `response_mask` do the same for the
//!   requests no rule decides ([`HttpDecision`]);
//! - an *SSH rule* (an `ssh` matcher) decides each request of an SSH
//!   session (an exec, a shell, a subsystem, a forwarding...), never a
//!   connection; `ssh_default` decides the exec, shell and subsystem
//!   requests no rule decides, and the forwarding (port, agent, X11)
//!   requests no rule decides are denied ([`SSH_FORWARDING_RULE`]).
//!
//! Statement, request and SSH rules may also say `action: approve`: the
//! statement or request is held until reviewers release it, as the rule's
//! `approve` says ([`ApprovalRule`]), with what an allow would carry (mask,
//! limits, redaction); the `approvals` section says how reviewers sign in
//! ([`ApprovalSettings`]), and a workload's `owners` may never approve its
//! requests.
//!
//! `budgets` give workloads a daily number of LLM tokens ([`Budget`]); the
//! proxy refuses their LLM calls once it is spent.
//!
//! `credentials` give targets the API key the agent puts in their requests,
//! the password it logs in to PostgreSQL with, or the SSH login
//! ([`SshLogin`]) it uses towards an SSH server whose host key the policy
//! names; the secrets are read when the policy is loaded and never printed.
//!
//! The policy knows nothing of sockets or wire protocols: callers hand it
//! plain values ([`ConnectionRequest`], [`StatementRequest`],
//! [`HttpRequest`], [`SshRequest`]).
//!
//! - [`parse`] reads and checks a file, with errors that name line and column;
//! - [`glob`] is the small glob language of selectors and SQL matchers;
//! - this module holds the checked policy and decides.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

use crate::{identity::Identity, masking::Masker};

pub mod glob;
mod live;
mod parse;

pub use live::{LivePolicy, ReloadError};
#[cfg(test)]
pub(crate) use parse::with_test_env;
pub use parse::{MAX_UDP_PORTS, SUPPORTED_VERSION};

use glob::Glob;

/// The policy built into the agent, used when no file is given: it audits
/// everything, denies nothing, and masks what the built-in detectors find in
/// query results (`sql_mask`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default.yaml");

/// The name [`Decision::rule`] carries when no rule matched.
pub const DEFAULT_RULE: &str = "default";

/// The name [`Decision::rule`] carries for UDP, which `udp.allow_ports` decides.
pub const UDP_RULE: &str = "udp.allow_ports";

/// The name [`Decision::rule`] carries for an SSH forwarding request (port,
/// agent or X11) that no SSH rule matches: it is denied, whatever
/// `ssh_default` says.
pub const SSH_FORWARDING_RULE: &str = "ssh.forwarding";

/// The statement classes a `sql` matcher names, least dangerous first: the
/// names the PostgreSQL classifier gives (docs/postgres.md).
pub const STATEMENT_CLASSES: [&str; 9] = [
    "transaction",
    "session",
    "read",
    "write",
    "copy",
    "ddl",
    "function",
    "privilege",
    "unknown",
];

/// The class a statement is matched as when its class is not one of
/// [`STATEMENT_CLASSES`].
const UNKNOWN_CLASS: &str = "unknown";

/// The LLM API providers an `llm` matcher names: [`LlmInfo::provider`].
pub const LLM_PROVIDERS: [&str; 2] = ["openai", "anthropic"];

/// The LLM API endpoints an `llm` matcher names: [`LlmInfo::endpoint`].
/// OpenAI's `/v1/chat/completions` is `chat`, `/v1/responses` `responses`,
/// `/v1/embeddings` `embeddings`, `/v1/completions` `completions`;
/// Anthropic's `/v1/messages` is `messages`.
pub const LLM_ENDPOINTS: [&str; 5] = ["chat", "responses", "embeddings", "completions", "messages"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// What the policy is asked about one connection.
#[derive(Clone, Debug)]
pub struct ConnectionRequest<'a> {
    pub identity: &'a Identity,
    pub destination: SocketAddr,
    pub transport: Transport,
}

/// What the policy is asked about one statement of a PostgreSQL session
/// whose connection was allowed. Names are as the classifier gives them:
/// schema-qualified as written (`crm.customers`, `customers`,
/// `"CRM".customers`).
#[derive(Clone, Debug)]
pub struct StatementRequest<'a> {
    pub identity: &'a Identity,
    /// The session's original destination, as for its connection.
    pub destination: SocketAddr,
    /// The startup packet's `database`, if the client sent one.
    pub database: Option<&'a str>,
    /// The startup packet's `user`.
    pub db_user: Option<&'a str>,
    /// One of [`STATEMENT_CLASSES`]; any other string is taken as "unknown".
    pub class: &'a str,
    pub tables_read: &'a [String],
    pub tables_written: &'a [String],
    pub functions: &'a [String],
    /// Whether an LLM answer to the same workload proposed this statement
    /// (see [`crate::lineage`]).
    pub from_llm: bool,
}

/// What the policy is asked about one HTTP request (inside TLS or not) of a
/// connection that was allowed.
#[derive(Clone, Debug)]
pub struct HttpRequest<'a> {
    pub identity: &'a Identity,
    /// The connection's original destination.
    pub destination: SocketAddr,
    /// The Host header (HTTP/1) or :authority (HTTP/2) without its port,
    /// else the TLS server name; lowercase. None: the request named none.
    pub host: Option<&'a str>,
    /// As sent: `GET`, `POST`...; matched without regard to case.
    pub method: &'a str,
    /// The path, without the query string: `/v1/chat/completions`.
    pub path: &'a str,
    /// Some when the request is a call to an LLM API the proxy recognised.
    pub llm: Option<LlmInfo<'a>>,
    /// Whether an LLM answer to the same workload carried this request's
    /// URL (see [`crate::lineage`]).
    pub from_llm: bool,
    /// The verified workload token the request carried, if any: added to
    /// the kernel's attribution (`identity`), never in its place.
    pub token: Option<PresentedToken<'a>>,
}

/// Who a verified workload token says the workload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresentedToken<'a> {
    /// The issuer, as `workload_tokens.issuers` names it.
    pub issuer: &'a str,
    /// The token's `sub`: `system:serviceaccount:crm:billing`.
    pub subject: &'a str,
}

/// The header that carries a workload token when the policy names none.
pub const DEFAULT_TOKEN_HEADER: &str = "x-warden-workload-token";

/// The `workload_tokens:` section: whose tokens the agent trusts, and where
/// a request carries one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadTokenSettings {
    /// In file order; an issuer appears once.
    pub issuers: Vec<TokenIssuer>,
    /// The HTTP header, lowercase; the agent removes it from every request.
    pub header: String,
}

/// One trusted issuer of workload tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenIssuer {
    /// The issuer URL; its `/.well-known/openid-configuration` is read.
    pub issuer: String,
    /// What the token's `aud` must be.
    pub audience: String,
}

impl WorkloadTokenSettings {
    pub fn issuer(&self, issuer: &str) -> Option<&TokenIssuer> {
        self.issuers.iter().find(|i| i.issuer == issuer)
    }
}

/// What an SSH client asks for on a session's connection: the kind of
/// channel (or global request) an [`SshRequest`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SshChannel {
    /// A command (`ssh host cmd`, scp).
    Exec,
    /// An interactive shell.
    Shell,
    /// A subsystem (sftp), named by [`SshRequest::command`].
    Subsystem,
    /// Port forwarding, local (`direct-tcpip`) or remote (`tcpip-forward`).
    Forward,
    /// Agent forwarding.
    Agent,
    /// X11 forwarding.
    X11,
}

impl SshChannel {
    /// Every channel, in the order the policy lists them.
    pub const ALL: [SshChannel; 6] = [
        SshChannel::Exec,
        SshChannel::Shell,
        SshChannel::Subsystem,
        SshChannel::Forward,
        SshChannel::Agent,
        SshChannel::X11,
    ];

    /// "exec", "shell", "subsystem", "forward", "agent" or "x11", as the
    /// policy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SshChannel::Exec => "exec",
            SshChannel::Shell => "shell",
            SshChannel::Subsystem => "subsystem",
            SshChannel::Forward => "forward",
            SshChannel::Agent => "agent",
            SshChannel::X11 => "x11",
        }
    }

    /// Whether no rule matching it leaves it to `ssh_default` (exec, shell,
    /// subsystem) rather than denied ([`SSH_FORWARDING_RULE`]).
    fn is_forwarding(self) -> bool {
        matches!(
            self,
            SshChannel::Forward | SshChannel::Agent | SshChannel::X11
        )
    }
}

/// What the policy is asked about one request of an SSH session whose
/// connection was allowed.
#[derive(Clone, Debug)]
pub struct SshRequest<'a> {
    pub identity: &'a Identity,
    /// The session's original destination, as for its connection.
    pub destination: SocketAddr,
    /// The user the client logs in as (its SSH user name).
    pub user: &'a str,
    pub channel: SshChannel,
    /// The exec command line, or the subsystem's name; None otherwise.
    pub command: Option<&'a str>,
    /// Whether an LLM answer to the same workload proposed this command
    /// (see [`crate::lineage`]).
    pub from_llm: bool,
}

/// The login the agent uses towards an SSH server in place of the client's,
/// from a `protocol: ssh` target and its credential. Its Debug never shows
/// the secret.
#[derive(Clone)]
pub struct SshLogin {
    /// The target's name.
    pub target: String,
    /// The target's addresses (empty: any).
    pub addresses: Vec<IpNet>,
    /// The target's ports (empty: any).
    pub ports: Vec<PortRange>,
    /// The user to log in as upstream; None: the user the client asked for.
    pub user: Option<String>,
    pub secret: SshSecret,
    /// How the agent checks the real server's host key.
    pub host_keys: UpstreamHostKeys,
}

impl fmt::Debug for SshLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshLogin")
            .field("target", &self.target)
            .field("addresses", &self.addresses)
            .field("ports", &self.ports)
            .field("user", &self.user)
            .field("secret", &self.secret)
            .field("host_keys", &self.host_keys)
            .finish()
    }
}

/// An SSH login's secret, read when the policy is loaded. Its Debug never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub enum SshSecret {
    /// A private key in OpenSSH (PEM) form, as read from its variable or
    /// file; the proxy parses it.
    PrivateKey(String),
    /// A password (trimmed of a trailing newline).
    Password(String),
}

impl SshSecret {
    /// The key or password.
    pub fn as_str(&self) -> &str {
        match self {
            SshSecret::PrivateKey(s) | SshSecret::Password(s) => s,
        }
    }
}

impl fmt::Debug for SshSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshSecret::PrivateKey(_) => f.write_str("PrivateKey(***)"),
            SshSecret::Password(_) => f.write_str("Password(***)"),
        }
    }
}

/// How the agent checks the host key of the real SSH server: a target's
/// `host_keys` or `known_hosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamHostKeys {
    /// Public keys in OpenSSH one-line form ("ssh-ed25519 AAAA... [comment]"),
    /// from the target's `host_keys:`.
    Keys(Vec<String>),
    /// A known_hosts file, from the target's `known_hosts:`.
    KnownHosts(PathBuf),
}

/// What the proxy learnt of an LLM API call.
#[derive(Clone, Copy, Debug)]
pub struct LlmInfo<'a> {
    /// One of [`LLM_PROVIDERS`].
    pub provider: &'a str,
    /// One of [`LLM_ENDPOINTS`].
    pub endpoint: &'a str,
    /// The `model` of the request body, if it has one.
    pub model: Option<&'a str>,
    /// The most tokens the request asks for (`max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`), if it says.
    pub max_tokens: Option<u64>,
    pub stream: bool,
}

/// What to do with a prompt in which a detector finds something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDetect {
    /// Replace the findings and send the request on.
    Redact,
    /// Refuse the request.
    Deny,
}

/// How to redact an LLM prompt: `redact_prompt` of a rule, or
/// `prompt_redact`, compiled once at load.
#[derive(Clone, Debug)]
pub struct Redact {
    pub masker: Arc<Masker>,
    pub on_detect: OnDetect,
}

/// How much of an LLM prompt the audit keeps: `audit.prompts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptAudit {
    /// The prompt as sent upstream (after redaction).
    #[default]
    Full,
    /// A digest of it only.
    Digest,
    /// Nothing of it.
    None,
}

impl PromptAudit {
    /// "full", "digest" or "none", as the policy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptAudit::Full => "full",
            PromptAudit::Digest => "digest",
            PromptAudit::None => "none",
        }
    }
}

/// The secret the agent uses towards one target in place of whatever the
/// application holds: an API key it puts into HTTP requests, or a password
/// it logs in to a database with. Its Debug never shows the secret.
pub struct Credential {
    /// The target's name.
    pub target: String,
    /// The key or password, read at load (trimmed of a trailing newline).
    pub secret: String,
    pub kind: SecretKind,
}

/// What a credential's secret is, and what goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// An API key, sent in `header`; None: the caller chooses per provider.
    ApiKey { header: Option<CredentialHeader> },
    /// A database password, for `user`; None: the user the client asked for.
    Password { user: Option<String> },
}

impl Credential {
    /// The header an API key goes in, as the policy says (None: per provider,
    /// or not an API key).
    pub fn header(&self) -> Option<CredentialHeader> {
        match self.kind {
            SecretKind::ApiKey { header } => header,
            SecretKind::Password { .. } => None,
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("target", &self.target)
            .field("secret", &"***")
            .field("kind", &self.kind)
            .finish()
    }
}

/// The header a credential is sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `Authorization: Bearer <key>` (OpenAI and most APIs).
    Authorization,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
}

impl CredentialHeader {
    /// The header's name, lowercase: "authorization" or "x-api-key".
    pub fn name(self) -> &'static str {
        match self {
            CredentialHeader::Authorization => "authorization",
            CredentialHeader::XApiKey => "x-api-key",
        }
    }

    /// The header's value for `secret`: `Bearer <key>`, or the key.
    pub fn value(self, secret: &str) -> String {
        match self {
            CredentialHeader::Authorization => format!("Bearer {secret}"),
            CredentialHeader::XApiKey => secret.to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Hold the statement or request until reviewers approve it
    /// ([`ApprovalRule`]); statement, request and SSH rules only.
    Approve,
}

impl Action {
    /// "allow", "deny" or "approve", as the audit writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Approve => "approve",
        }
    }
}

/// A rule's `approve:`: who may release what it holds, and for how long it
/// waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRule {
    /// The reviewer's groups (from the ID token's groups claim) must
    /// include one of these.
    pub groups: Vec<String>,
    /// Distinct reviewers needed; at least 1.
    pub quorum: u32,
    /// How long the request waits before it expires and is refused.
    pub expires: Duration,
    /// What the requester is told while it waits (a PostgreSQL notice, an
    /// HTTP header), if the rule says.
    pub message: Option<String>,
}

impl ApprovalRule {
    pub const DEFAULT_QUORUM: u32 = 1;
    pub const DEFAULT_EXPIRES: Duration = Duration::from_secs(15 * 60);
}

/// The `approvals:` section: how reviewers are authenticated and told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalSettings {
    /// The identity provider reviewers sign in with.
    pub oidc: OidcSettings,
    /// Posted a Slack-style `{"text": ...}` for every new pending request.
    pub webhook: Option<String>,
}

/// Its Debug never shows the client secret.
#[derive(Clone, PartialEq, Eq)]
pub struct OidcSettings {
    /// The issuer URL; its `/.well-known/openid-configuration` is read.
    pub issuer: String,
    /// The client id ID tokens must be issued to (their `aud`).
    pub client_id: String,
    /// The client secret for the reviewer page's sign-in, from an
    /// environment variable or a file, if the provider wants one.
    pub client_secret: Option<String>,
    /// The claim that lists a reviewer's groups; default "groups".
    pub groups_claim: String,
}

impl fmt::Debug for OidcSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcSettings")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "***"))
            .field("groups_claim", &self.groups_claim)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct Decision {
    pub action: Action,
    /// The rule's name, or "default" ([`DEFAULT_RULE`]) when no rule matched
    /// (for a statement and an SSH request too), or for UDP
    /// "udp.allow_ports" ([`UDP_RULE`]), or for an SSH forwarding request no
    /// rule matched "ssh.forwarding" ([`SSH_FORWARDING_RULE`]).
    pub rule: String,
    /// The first workload the identity matches, if any.
    pub workload: Option<String>,
    /// For an allowed statement (or one held for approval, once released):
    /// how to mask the rows it returns, from the deciding rule's `mask`, or
    /// from `sql_mask` when no rule decided.
    /// None for connections, for denied statements, and for statements
    /// whose rule has no mask: their rows pass unchanged.
    pub mask: Option<Arc<Masker>>,
    /// Some with [`Action::Approve`]: who may release the statement.
    pub approval: Option<Arc<ApprovalRule>>,
}

/// Two decisions are equal when they say the same, carry the same
/// compiled mask (one rule's, or `sql_mask`), or none, and the same
/// approval, or none.
impl PartialEq for Decision {
    fn eq(&self, other: &Decision) -> bool {
        self.action == other.action
            && self.rule == other.rule
            && self.workload == other.workload
            && self.approval == other.approval
            && match (&self.mask, &other.mask) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Decision {}

/// The decision on one HTTP request.
#[derive(Clone, Debug)]
pub struct HttpDecision {
    pub action: Action,
    /// The deciding request rule's name, or "default" ([`DEFAULT_RULE`])
    /// when `http_default` decided.
    pub rule: String,
    /// The first workload the identity matches, if any.
    pub workload: Option<String>,
    /// For a deny: one sentence for the client, naming the rule: `denied by
    /// rule "no-deletes"`, `model "gpt-5" is not allowed by rule "small"
    /// (allowed: gpt-4.1-mini*)`, `denied by http_default`. None for an
    /// allow or an approve.
    pub reason: Option<String>,
    /// For an allow (or an approve, once released): how to redact the
    /// prompt, from the rule's `redact_prompt`, or `prompt_redact` when no
    /// rule decided.
    pub redact: Option<Redact>,
    /// For an allow (or an approve, once released): how to mask the
    /// response, from the rule's `mask_response`, or `response_mask` when no
    /// rule decided.
    pub mask_response: Option<Arc<Masker>>,
    /// A rule's `mask_response` masks the JSON answers of any HTTP request
    /// it decides; `response_mask`, only LLM answers.
    pub mask_any_json: bool,
    /// The credential of the first target, in file order, that has one and
    /// holds for the request's destination and host, whichever rule
    /// decided.
    pub credential: Option<Arc<Credential>>,
    /// How much of an LLM prompt the audit keeps (`audit.prompts`).
    pub prompts: PromptAudit,
    /// Some with [`Action::Approve`]: who may release the request.
    pub approval: Option<Arc<ApprovalRule>>,
}

/// A rule's `mask`, or `sql_mask`, compiled: the masker, and what the file
/// said, for summaries.
#[derive(Clone, Debug)]
struct Mask {
    masker: Arc<Masker>,
    /// The column globs, as written.
    columns: Vec<String>,
    /// The detectors the names resolved to (presets expanded), in order.
    detectors: Vec<String>,
    /// The JSON paths of a response mask, as written.
    fields: Vec<String>,
}

impl Mask {
    /// "columns \"*email*\" and detectors card, iban", for summaries.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.columns.is_empty() {
            let columns: Vec<String> = self.columns.iter().map(|c| format!("{c:?}")).collect();
            parts.push(format!("columns {}", columns.join(", ")));
        }
        if !self.detectors.is_empty() {
            parts.push(format!("detectors {}", self.detectors.join(", ")));
        }
        if !self.fields.is_empty() {
            parts.push(format!("fields {}", self.fields.join(", ")));
        }
        parts.join(" and ")
    }
}

/// A rule's `redact_prompt`, or `prompt_redact`, compiled.
#[derive(Clone, Debug)]
struct PromptRedact {
    mask: Mask,
    on_detect: OnDetect,
}

impl PromptRedact {
    fn redact(&self) -> Redact {
        Redact {
            masker: Arc::clone(&self.mask.masker),
            on_detect: self.on_detect,
        }
    }
}

/// What happens to connections no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultAction {
    /// Allow, and record in the audit (every connection is recorded anyway).
    Audit,
    Deny,
}

impl DefaultAction {
    pub fn action(self) -> Action {
        match self {
            DefaultAction::Audit => Action::Allow,
            DefaultAction::Deny => Action::Deny,
        }
    }
}

/// The `audit:` section; the command line overrides both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditSettings {
    pub dir: Option<PathBuf>,
    pub rotate: Option<Duration>,
    /// Remove audit files older than this.
    pub retention: Option<Duration>,
    pub on_failure: OnAuditFailure,
}

/// What the agent does while the audit cannot be written: `audit.on_failure`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnAuditFailure {
    /// Serve on; rows are kept in memory up to a bound, then dropped and
    /// counted.
    #[default]
    KeepServing,
    /// Refuse new connections until the audit is written again.
    FailClosed,
}

impl OnAuditFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnAuditFailure::KeepServing => "keep_serving",
            OnAuditFailure::FailClosed => "fail_closed",
        }
    }
}

/// A policy that could not be read. Its message names the file, the line and
/// the column, what is wrong, and what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{origin}: cannot read the policy: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        /// 1-based.
        line: usize,
        /// 1-based.
        column: usize,
        message: String,
    },
}

impl PolicyError {
    /// (line, column), 1-based, when the error is about the text.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            PolicyError::Invalid { line, column, .. } => Some((*line, *column)),
            PolicyError::Read { .. } => None,
        }
    }
}

/// An inclusive range of ports; one port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// Who: what a workload's `match:` asks of a process. Every key given must
/// hold; a key with a list holds when any of its values does.
#[derive(Clone, Debug, Default)]
struct Selector {
    uid: Option<Vec<u32>>,
    user: Option<Vec<String>>,
    exe: Option<Vec<Glob>>,
    comm: Option<Vec<Glob>>,
    unit: Option<Vec<Glob>>,
    cgroup: Option<Vec<Glob>>,
    /// Lowercase hex prefixes of container ids.
    container: Option<Vec<String>>,
    /// The Kubernetes pod's namespace and service account, as the node's
    /// files give them (never as the pod says).
    namespace: Option<Vec<Glob>>,
    service_account: Option<Vec<Glob>>,
}

impl Selector {
    fn is_empty(&self) -> bool {
        self.uid.is_none()
            && self.user.is_none()
            && self.exe.is_none()
            && self.comm.is_none()
            && self.unit.is_none()
            && self.cgroup.is_none()
            && self.container.is_none()
            && self.namespace.is_none()
            && self.service_account.is_none()
    }

    fn matches(&self, id: &Identity) -> bool {
        let any_glob = globs_match;
        self.uid.as_ref().is_none_or(|uids| uids.contains(&id.uid))
            && self
                .user
                .as_ref()
                .is_none_or(|users| id.user.as_ref().is_some_and(|u| users.contains(u)))
            && any_glob(&self.exe, id.exe.as_deref())
            && any_glob(&self.comm, Some(&id.comm))
            && any_glob(&self.unit, id.unit.as_deref())
            && any_glob(&self.cgroup, id.cgroup_path.as_deref())
            && any_glob(
                &self.namespace,
                id.pod.as_ref().map(|p| p.namespace.as_str()),
            )
            && any_glob(
                &self.service_account,
                id.pod.as_ref().and_then(|p| p.service_account.as_deref()),
            )
            && self.container.as_ref().is_none_or(|prefixes| {
                id.container_id.as_ref().is_some_and(|cid| {
                    let cid = cid.to_ascii_lowercase();
                    prefixes.iter().any(|p| cid.starts_with(p.as_str()))
                })
            })
    }
}

#[derive(Clone, Debug)]
struct Workload {
    name: String,
    selector: Selector,
    /// `owners:`: the people (OIDC subjects, emails or usernames) the
    /// workload acts for; none of them may approve its requests.
    owners: Vec<String>,
}

/// Whether a key of globs holds for a value: no key holds for anything; a
/// key holds for a value it was given (not None) that one glob matches.
fn globs_match(globs: &Option<Vec<Glob>>, value: Option<&str>) -> bool {
    match globs {
        None => true,
        Some(globs) => value.is_some_and(|v| globs.iter().any(|g| g.is_match(v))),
    }
}

/// What a target speaks, as its `protocol:` says. It types the matchers a
/// rule may give with the target; connections are matched by address and
/// port alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Postgres,
    Http,
    Llm,
    Ssh,
    Tls,
    Any,
}

impl Protocol {
    const ALL: [Protocol; 6] = [
        Protocol::Postgres,
        Protocol::Http,
        Protocol::Llm,
        Protocol::Ssh,
        Protocol::Tls,
        Protocol::Any,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Http => "http",
            Protocol::Llm => "llm",
            Protocol::Ssh => "ssh",
            Protocol::Tls => "tls",
            Protocol::Any => "any",
        }
    }

    /// Whether a `sql` matcher may go with a target of this protocol.
    fn speaks_sql(protocol: Option<Protocol>) -> bool {
        matches!(protocol, None | Some(Protocol::Postgres | Protocol::Any))
    }

    /// Whether a target of this protocol may have HTTP requests: an `http`
    /// matcher, request options, a `host`, credentials.
    fn speaks_http(protocol: Option<Protocol>) -> bool {
        matches!(
            protocol,
            None | Some(Protocol::Http | Protocol::Llm | Protocol::Any)
        )
    }

    /// Whether an `llm` matcher may go with a target of this protocol.
    fn speaks_llm(protocol: Option<Protocol>) -> bool {
        matches!(protocol, None | Some(Protocol::Llm | Protocol::Any))
    }

    /// Whether an `ssh` matcher may go with a target of this protocol.
    fn speaks_ssh(protocol: Option<Protocol>) -> bool {
        matches!(protocol, None | Some(Protocol::Ssh | Protocol::Any))
    }
}

/// Where: a destination's address and port, and an HTTP request's host.
/// Every key given must hold.
#[derive(Clone, Debug, Default)]
struct Target {
    name: String,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    /// Caseless globs on an HTTP request's host: a target with a host holds
    /// only for requests, never for a connection.
    host: Option<Vec<Glob>>,
    protocol: Option<Protocol>,
    /// `tls: verify`: the agent speaks TLS to the server (PostgreSQL).
    tls: bool,
    /// The name the server's certificate is checked against; None: its address.
    tls_name: Option<String>,
    /// `host_keys` or `known_hosts` (`protocol: ssh` targets only): how the
    /// agent checks the SSH server's host key.
    host_keys: Option<UpstreamHostKeys>,
}

impl Target {
    /// `host`: the HTTP request's, or None for a connection or a statement.
    fn matches(&self, destination: SocketAddr, host: Option<&str>) -> bool {
        address_matches(&self.address, destination.ip())
            && port_matches(&self.port, destination.port())
            && globs_match(&self.host, host)
    }
}

/// An IPv4 network never contains an IPv6 address, nor the reverse.
fn address_matches(nets: &Option<Vec<IpNet>>, ip: IpAddr) -> bool {
    nets.as_ref()
        .is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
}

fn port_matches(ranges: &Option<Vec<PortRange>>, port: u16) -> bool {
    ranges
        .as_ref()
        .is_none_or(|ranges| ranges.iter().any(|r| r.contains(port)))
}

/// What: a rule's `sql` matcher. Every key given must hold; a key with a
/// list holds when any of its values does. No key: every statement.
#[derive(Clone, Debug, Default)]
struct SqlMatcher {
    /// Names from [`STATEMENT_CLASSES`].
    class: Option<Vec<&'static str>>,
    /// Caseless globs; hold when any table read or written matches one.
    tables: Option<Vec<Glob>>,
    /// Caseless globs; hold when any function called matches one.
    functions: Option<Vec<Glob>>,
    /// Globs on the session's database (the user's name when none was sent).
    database: Option<Vec<Glob>>,
    /// Globs on the session's user.
    user: Option<Vec<Glob>>,
    /// Holds when whether an LLM answer proposed the statement is this.
    from_llm: Option<bool>,
}

impl SqlMatcher {
    fn matches(&self, req: &StatementRequest) -> bool {
        let class = STATEMENT_CLASSES
            .iter()
            .find(|&&c| c == req.class)
            .copied()
            .unwrap_or(UNKNOWN_CLASS);
        fn any_name<'n>(
            globs: &Option<Vec<Glob>>,
            mut names: impl Iterator<Item = &'n String>,
        ) -> bool {
            globs
                .as_ref()
                .is_none_or(|globs| names.any(|name| globs.iter().any(|g| name_matches(g, name))))
        }
        let session = globs_match;
        // PostgreSQL connects to the database named like the user when the
        // client names none.
        let database = req.database.or(req.db_user);
        self.class.as_ref().is_none_or(|c| c.contains(&class))
            && any_name(
                &self.tables,
                req.tables_read.iter().chain(req.tables_written),
            )
            && any_name(&self.functions, req.functions.iter())
            && session(&self.database, database)
            && session(&self.user, req.db_user)
            && self.from_llm.is_none_or(|f| f == req.from_llm)
    }
}

/// A table or function name as the classifier writes it (`crm.customers`,
/// `"CRM".customers`) matches a glob as written, or without its quotes
/// (`CRM.customers`), so "crm.*" covers quoted and unquoted spellings.
fn name_matches(glob: &Glob, name: &str) -> bool {
    glob.is_match(name) || (name.contains('"') && glob.is_match(&unquoted(name)))
}

/// `"CRM"."Odd""Name"` to `CRM.Odd"Name`.
fn unquoted(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars().peekable();
    let mut inside = false;
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
        } else if inside && chars.peek() == Some(&'"') {
            chars.next();
            out.push('"');
        } else {
            inside = !inside;
        }
    }
    out
}

/// What: a rule's `http` matcher. Every key given must hold; a key with a
/// list holds when any of its values does. No key: every request.
#[derive(Clone, Debug, Default)]
struct HttpMatcher {
    /// Uppercase; compared without regard to case.
    method: Option<Vec<String>>,
    /// Globs on the path, without the query; case matters.
    path: Option<Vec<Glob>>,
    /// Caseless globs on the request's host.
    host: Option<Vec<Glob>>,
    /// Holds when whether an LLM answer proposed the request's URL is this.
    from_llm: Option<bool>,
}

impl HttpMatcher {
    fn matches(&self, req: &HttpRequest) -> bool {
        self.method
            .as_ref()
            .is_none_or(|methods| methods.iter().any(|m| m.eq_ignore_ascii_case(req.method)))
            && globs_match(&self.path, Some(req.path))
            && globs_match(&self.host, req.host)
            && self.from_llm.is_none_or(|f| f == req.from_llm)
    }
}

/// What: a rule's `llm` matcher. It never holds for a request that is not
/// an LLM API call. Every key given must hold.
#[derive(Clone, Debug, Default)]
struct LlmMatcher {
    /// Names from [`LLM_PROVIDERS`].
    provider: Option<Vec<&'static str>>,
    /// Caseless globs on the model.
    model: Option<Vec<Glob>>,
    /// Names from [`LLM_ENDPOINTS`].
    endpoint: Option<Vec<&'static str>>,
}

impl LlmMatcher {
    fn matches(&self, llm: &LlmInfo) -> bool {
        let one_of = |names: &Option<Vec<&'static str>>, value: &str| {
            names
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n.eq_ignore_ascii_case(value)))
        };
        one_of(&self.provider, llm.provider)
            && globs_match(&self.model, llm.model)
            && one_of(&self.endpoint, llm.endpoint)
    }
}

/// Who else: a rule's `token` matcher, on the verified workload token of
/// a request. It never holds for a request without one. Every key given
/// must hold.
#[derive(Clone, Debug, Default)]
struct TokenMatcher {
    /// Globs on the token's subject; case matters.
    subject: Option<Vec<Glob>>,
    /// Issuers of `workload_tokens.issuers` (checked at load).
    issuer: Option<Vec<String>>,
}

impl TokenMatcher {
    fn matches(&self, token: &PresentedToken) -> bool {
        globs_match(&self.subject, Some(token.subject))
            && self
                .issuer
                .as_ref()
                .is_none_or(|issuers| issuers.iter().any(|i| i == token.issuer))
    }
}

/// What: a rule's `ssh` matcher. Every key given must hold; a key with a
/// list holds when any of its values does. No key: every SSH request.
#[derive(Clone, Debug, Default)]
struct SshMatcher {
    channel: Option<Vec<SshChannel>>,
    /// Globs on an exec's command line or a subsystem's name; case matters.
    /// They never hold for another channel.
    command: Option<Vec<Glob>>,
    /// Globs on the SSH user name; case matters.
    user: Option<Vec<Glob>>,
    /// Holds when whether an LLM answer proposed the command is this.
    from_llm: Option<bool>,
}

impl SshMatcher {
    fn matches(&self, req: &SshRequest) -> bool {
        let command = match req.channel {
            SshChannel::Exec | SshChannel::Subsystem => req.command,
            _ => None,
        };
        self.channel
            .as_ref()
            .is_none_or(|channels| channels.contains(&req.channel))
            && globs_match(&self.command, command)
            && globs_match(&self.user, Some(req.user))
            && self.from_llm.is_none_or(|f| f == req.from_llm)
    }
}

/// A workload's daily token budget (`budgets:`): how many input and output
/// tokens its LLM calls may use per UTC day. The spend itself is counted
/// outside the policy ([`crate::budget::TokenLedger`]), so that a reload
/// keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    pub workload: String,
    pub tokens_per_day: u64,
    /// The providers whose calls it counts and refuses; None: every
    /// provider.
    pub providers: Option<Vec<&'static str>>,
}

impl Budget {
    /// The audit's `rule` of a call it refuses: `budgets.<workload>`.
    pub fn audit_rule(&self) -> String {
        format!("budgets.{}", self.workload)
    }

    /// Whether calls to `provider` ("openai", "anthropic") count against it.
    pub fn covers(&self, provider: &str) -> bool {
        self.providers
            .as_ref()
            .is_none_or(|p| p.contains(&provider))
    }
}

/// An allowing request rule's `limits`: a request outside them is denied by
/// the rule.
#[derive(Clone, Debug, Default)]
struct Limits {
    /// Caseless globs; a request whose model is unknown is outside them.
    models: Option<Vec<Glob>>,
    /// A request that does not say is within it.
    max_tokens: Option<u64>,
}

impl Limits {
    /// Why the request is outside the limits of rule `rule`, if it is.
    fn violation(&self, rule: &str, llm: Option<&LlmInfo>) -> Option<String> {
        if let Some(models) = &self.models {
            let allowed: Vec<&str> = models.iter().map(Glob::as_str).collect();
            let allowed = allowed.join(", ");
            match llm.and_then(|l| l.model) {
                None => {
                    return Some(format!(
                        "the request names no model, and rule {rule:?} allows only models \
                         {allowed}"
                    ));
                }
                Some(model) if !models.iter().any(|g| g.is_match(model)) => {
                    return Some(format!(
                        "model {model:?} is not allowed by rule {rule:?} (allowed: {allowed})"
                    ));
                }
                Some(_) => {}
            }
        }
        if let (Some(limit), Some(asked)) = (self.max_tokens, llm.and_then(|l| l.max_tokens))
            && asked > limit
        {
            return Some(format!(
                "max_tokens {asked} is over the limit {limit} of rule {rule:?}"
            ));
        }
        None
    }
}

/// What a rule decides, from what it gives (checked at load: one kind
/// each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleKind {
    Connection,
    /// It has a `sql` matcher.
    Statement,
    /// It has an `http`, `llm` or `token` matcher, `limits`,
    /// `redact_prompt` or `mask_response`, or names a target with a `host`.
    Request,
    /// It has an `ssh` matcher.
    Ssh,
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    kind: RuleKind,
    /// Indexes into `Policy::targets`; empty: any destination.
    targets: Vec<usize>,
    /// Indexes into `Policy::workloads`; empty: any process.
    workloads: Vec<usize>,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    /// Some on a statement rule only.
    sql: Option<SqlMatcher>,
    /// Some on a request rule only, as the next five.
    http: Option<HttpMatcher>,
    llm: Option<LlmMatcher>,
    token: Option<TokenMatcher>,
    /// Some on an SSH rule only.
    ssh: Option<SshMatcher>,
    action: Action,
    /// Some exactly when the action is [`Action::Approve`], which only
    /// statement, request and SSH rules say (checked at load).
    approval: Option<Arc<ApprovalRule>>,
    /// Only on a statement rule that allows or approves (checked at load).
    mask: Option<Mask>,
    /// Only on a request rule that allows or approves (checked at load), as
    /// the next two.
    limits: Option<Limits>,
    redact_prompt: Option<PromptRedact>,
    mask_response: Option<Mask>,
}

impl Rule {
    /// Whether who and where hold: workload, target, address and port;
    /// `host` is an HTTP request's, None for a connection or a statement.
    fn holds_for(
        &self,
        policy: &Policy,
        hits: &[bool],
        destination: SocketAddr,
        host: Option<&str>,
    ) -> bool {
        (self.workloads.is_empty() || self.workloads.iter().any(|&w| hits[w]))
            && (self.targets.is_empty()
                || self
                    .targets
                    .iter()
                    .any(|&t| policy.targets[t].matches(destination, host)))
            && address_matches(&self.address, destination.ip())
            && port_matches(&self.port, destination.port())
    }

    /// Whether the whole `when` of a request rule holds for a request.
    fn holds_for_request(&self, policy: &Policy, hits: &[bool], req: &HttpRequest) -> bool {
        self.holds_for(policy, hits, req.destination, req.host)
            && self.http.as_ref().is_none_or(|m| m.matches(req))
            && self
                .llm
                .as_ref()
                .is_none_or(|m| req.llm.as_ref().is_some_and(|llm| m.matches(llm)))
            && self
                .token
                .as_ref()
                .is_none_or(|m| req.token.as_ref().is_some_and(|t| m.matches(t)))
    }
}

/// A checked policy. Cheap to share behind an `Arc`; deciding never fails.
#[derive(Clone, Debug)]
pub struct Policy {
    version: u32,
    default: DefaultAction,
    workloads: Vec<Workload>,
    targets: Vec<Target>,
    rules: Vec<Rule>,
    /// What happens to statements no statement rule matches.
    sql_default: Action,
    /// How the rows of statements no statement rule matches are masked
    /// (only with `sql_default: allow`, checked at load).
    sql_mask: Option<Mask>,
    /// What happens to HTTP requests no request rule matches.
    http_default: Action,
    /// How the prompts and responses of requests no request rule matches
    /// are masked (only with `http_default: allow`, checked at load).
    prompt_redact: Option<PromptRedact>,
    response_mask: Option<Mask>,
    /// (index into `targets`, its credential), in file order of the
    /// targets.
    credentials: Vec<(usize, Arc<Credential>)>,
    /// What happens to exec, shell and subsystem requests no SSH rule
    /// matches.
    ssh_default: Action,
    /// (index into `targets`, its SSH login), in file order of the targets.
    ssh_logins: Vec<(usize, Arc<SshLogin>)>,
    udp_ports: Vec<u16>,
    audit: AuditSettings,
    prompts: PromptAudit,
    approvals: Option<ApprovalSettings>,
    /// In file order; at most one per workload.
    budgets: Vec<Budget>,
    workload_tokens: Option<WorkloadTokenSettings>,
}

impl Policy {
    /// The built-in policy (policies/default.yaml): audit everything, deny
    /// nothing, mask the built-in detectors' findings in query results, UDP
    /// to port 53 only.
    pub fn embedded_default() -> Policy {
        Policy::from_yaml(EMBEDDED_DEFAULT, "policies/default.yaml")
            .expect("the embedded default policy parses (a unit test checks it)")
    }

    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let origin = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            origin: origin.clone(),
            source,
        })?;
        Policy::from_yaml(&src, &origin)
    }

    /// Checks a policy given as text; `origin` names it in error messages.
    pub fn from_yaml(src: &str, origin: &str) -> Result<Policy, PolicyError> {
        parse::parse(src, origin)
    }

    /// Decides one connection. TCP: the first connection rule whose `when`
    /// holds decides, else the default; statement rules are passed over. UDP:
    /// `udp.allow_ports` decides, as the kernel does. Never
    /// [`Action::Approve`]: only statement, request and SSH rules say it.
    pub fn decide_connection(&self, req: &ConnectionRequest) -> Decision {
        let hits = self.workload_hits(req.identity);
        let workload = self.first_workload(&hits);
        if req.transport == Transport::Udp {
            let allowed = self.udp_ports.contains(&req.destination.port());
            return Decision {
                action: if allowed { Action::Allow } else { Action::Deny },
                rule: UDP_RULE.to_string(),
                workload,
                mask: None,
                approval: None,
            };
        }
        let rule = self
            .rules
            .iter()
            .filter(|rule| rule.kind == RuleKind::Connection)
            .find(|rule| rule.holds_for(self, &hits, req.destination, None));
        match rule {
            Some(rule) => Decision {
                action: rule.action,
                rule: rule.name.clone(),
                workload,
                mask: None,
                approval: None,
            },
            None => Decision {
                action: self.default.action(),
                rule: DEFAULT_RULE.to_string(),
                workload,
                mask: None,
                approval: None,
            },
        }
    }

    /// Decides one statement of a PostgreSQL session whose connection was
    /// allowed: the first statement rule (in file order) whose whole `when`
    /// holds (workload, target, address, port and the `sql` matcher)
    /// decides, with its `mask` if it has one, and with its `approve` if it
    /// says `action: approve` (the caller holds the statement until
    /// reviewers release it); else `sql_default` (allow unless the file says
    /// deny), with the rule "default" and `sql_mask`. Connection rules,
    /// request rules and `default` play no part.
    pub fn decide_statement(&self, req: &StatementRequest) -> Decision {
        let hits = self.workload_hits(req.identity);
        let workload = self.first_workload(&hits);
        let rule = self.rules.iter().find(|rule| {
            rule.kind == RuleKind::Statement
                && rule.sql.as_ref().is_some_and(|sql| {
                    rule.holds_for(self, &hits, req.destination, None) && sql.matches(req)
                })
        });
        let masker = |mask: &Option<Mask>| mask.as_ref().map(|m| Arc::clone(&m.masker));
        match rule {
            Some(rule) => Decision {
                action: rule.action,
                rule: rule.name.clone(),
                workload,
                mask: masker(&rule.mask),
                approval: rule.approval.clone(),
            },
            None => Decision {
                action: self.sql_default,
                rule: DEFAULT_RULE.to_string(),
                workload,
                mask: masker(&self.sql_mask),
                approval: None,
            },
        }
    }

    /// Decides one HTTP request of a connection that was allowed: the first
    /// request rule (in file order) whose whole `when` holds (workload,
    /// target with its host, address, port, `http` and `llm` matchers)
    /// decides. A rule that allows or approves checks its `limits`: a
    /// request outside them is denied by the rule, with the reason; else it
    /// is allowed (or held for approval, with the rule's `approve`) with the
    /// rule's `redact_prompt` and `mask_response` (none if the rule has
    /// none). When no rule holds, `http_default` decides, with the rule
    /// "default", `prompt_redact` and `response_mask`. Connection and
    /// statement rules play no part. The credential is that of the first
    /// target with one that holds for the request, whatever decided.
    pub fn decide_http(&self, req: &HttpRequest) -> HttpDecision {
        let hits = self.workload_hits(req.identity);
        let mut decision = HttpDecision {
            action: Action::Allow,
            rule: DEFAULT_RULE.to_string(),
            workload: self.first_workload(&hits),
            reason: None,
            redact: None,
            mask_response: None,
            mask_any_json: false,
            credential: self.credential_for(req.destination, req.host).cloned(),
            prompts: self.prompts,
            approval: None,
        };
        let rule = self
            .rules
            .iter()
            .filter(|rule| rule.kind == RuleKind::Request)
            .find(|rule| rule.holds_for_request(self, &hits, req));
        let Some(rule) = rule else {
            if self.http_default == Action::Deny {
                decision.action = Action::Deny;
                decision.reason = Some("denied by http_default".to_string());
            } else {
                decision.redact = self.prompt_redact.as_ref().map(PromptRedact::redact);
                decision.mask_response = self.response_mask.as_ref().map(|m| Arc::clone(&m.masker));
            }
            return decision;
        };
        decision.rule = rule.name.clone();
        let violation = match rule.action {
            Action::Deny => Some(format!("denied by rule {:?}", rule.name)),
            Action::Allow | Action::Approve => rule
                .limits
                .as_ref()
                .and_then(|limits| limits.violation(&rule.name, req.llm.as_ref())),
        };
        match violation {
            Some(reason) => {
                decision.action = Action::Deny;
                decision.reason = Some(reason);
            }
            None => {
                decision.action = rule.action;
                decision.approval = rule.approval.clone();
                decision.redact = rule.redact_prompt.as_ref().map(PromptRedact::redact);
                decision.mask_response = rule.mask_response.as_ref().map(|m| Arc::clone(&m.masker));
                decision.mask_any_json = decision.mask_response.is_some();
            }
        }
        decision
    }

    /// Decides one request of an SSH session whose connection was allowed:
    /// the first SSH rule (in file order) whose whole `when` holds
    /// (workload, target, address, port and the `ssh` matcher) decides, with
    /// its `approve` if it says `action: approve` (the caller holds the
    /// request until reviewers release it). When none holds, an exec, shell
    /// or subsystem request gets `ssh_default` (allow unless the file says
    /// deny) with the rule "default"; a forwarding request (port, agent,
    /// X11) is denied with the rule "ssh.forwarding"
    /// ([`SSH_FORWARDING_RULE`]), whatever `ssh_default` says. Other kinds
    /// of rules and `default` play no part. Never a mask.
    pub fn decide_ssh(&self, req: &SshRequest) -> Decision {
        let hits = self.workload_hits(req.identity);
        let workload = self.first_workload(&hits);
        let rule = self.rules.iter().find(|rule| {
            rule.kind == RuleKind::Ssh
                && rule.ssh.as_ref().is_some_and(|ssh| {
                    rule.holds_for(self, &hits, req.destination, None) && ssh.matches(req)
                })
        });
        let (action, rule, approval) = match rule {
            Some(rule) => (rule.action, rule.name.clone(), rule.approval.clone()),
            None if req.channel.is_forwarding() => {
                (Action::Deny, SSH_FORWARDING_RULE.to_string(), None)
            }
            None => (self.ssh_default, DEFAULT_RULE.to_string(), None),
        };
        Decision {
            action,
            rule,
            workload,
            mask: None,
            approval,
        }
    }

    /// The SSH login the agent uses towards `destination`: that of the
    /// first target (in file order) with an SSH credential whose address
    /// and port hold for it. Only `protocol: ssh` targets have one. (An
    /// `Arc`, as [`Policy::login_for`]'s, that a session may keep.)
    pub fn ssh_login_for(&self, destination: SocketAddr) -> Option<&Arc<SshLogin>> {
        self.ssh_logins
            .iter()
            .find(|(t, _)| self.targets[*t].matches(destination, None))
            .map(|(_, login)| login)
    }

    /// Every target that has an SSH credential, in file order: for the
    /// known_hosts files clients are given.
    pub fn ssh_logins(&self) -> impl Iterator<Item = &SshLogin> {
        self.ssh_logins.iter().map(|(_, login)| login.as_ref())
    }

    /// Whether the who and where (workload, target, address, port) of any
    /// SSH rule hold for a connection of `identity` to `destination`: a
    /// caller that cannot decide the session's requests (no login to
    /// terminate it with) must not relay it unseen. `ssh_default` and the
    /// denial of forwarding are not counted ([`Policy::ssh_default`]).
    pub fn has_ssh_rules_for(&self, identity: &Identity, destination: SocketAddr) -> bool {
        let hits = self.workload_hits(identity);
        self.rules
            .iter()
            .filter(|rule| rule.kind == RuleKind::Ssh)
            .any(|rule| rule.holds_for(self, &hits, destination, None))
    }

    /// What happens to exec, shell and subsystem requests no SSH rule
    /// matches: `ssh_default`.
    pub fn ssh_default(&self) -> Action {
        self.ssh_default
    }

    /// How many rules are SSH rules (have an `ssh` matcher).
    pub fn ssh_rule_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.kind == RuleKind::Ssh)
            .count()
    }

    /// The credential of the first target (in file order) that has one and
    /// holds for a request to `destination` with `host`.
    fn credential_for(
        &self,
        destination: SocketAddr,
        host: Option<&str>,
    ) -> Option<&Arc<Credential>> {
        self.credentials
            .iter()
            .filter(|(_, c)| matches!(c.kind, SecretKind::ApiKey { .. }))
            .find(|(t, _)| self.targets[*t].matches(destination, host))
            .map(|(_, credential)| credential)
    }

    /// Whether the agent must speak TLS to the PostgreSQL server at
    /// `destination`, and the name its certificate must hold (None: the
    /// address): from the first postgres target, in file order, that holds
    /// for it.
    pub fn upstream_tls_for(&self, destination: SocketAddr) -> Option<Option<&str>> {
        self.targets
            .iter()
            .find(|t| t.protocol == Some(Protocol::Postgres) && t.matches(destination, None))
            .filter(|t| t.tls)
            .map(|t| t.tls_name.as_deref())
    }

    /// The database login of the first target (in file order) that has a
    /// password credential and holds for a connection to `destination`.
    /// Only `protocol: postgres` targets have one (an SSH target's password
    /// is an [`SshLogin`]).
    pub fn login_for(&self, destination: SocketAddr) -> Option<&Arc<Credential>> {
        self.credentials
            .iter()
            .filter(|(_, c)| matches!(c.kind, SecretKind::Password { .. }))
            .find(|(t, _)| self.targets[*t].matches(destination, None))
            .map(|(_, credential)| credential)
    }

    /// How many rules are request rules (decide HTTP requests).
    pub fn request_rule_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.kind == RuleKind::Request)
            .count()
    }

    /// What happens to HTTP requests no request rule matches: `http_default`.
    pub fn http_default(&self) -> Action {
        self.http_default
    }

    /// `prompt_redact`, compiled: how the prompts of requests no request
    /// rule matches are redacted.
    pub fn prompt_redact(&self) -> Option<Redact> {
        self.prompt_redact.as_ref().map(PromptRedact::redact)
    }

    /// `response_mask`, compiled: how the responses of requests no request
    /// rule matches are masked.
    pub fn response_mask(&self) -> Option<&Arc<Masker>> {
        self.response_mask.as_ref().map(|m| &m.masker)
    }

    /// How much of an LLM prompt the audit keeps: `audit.prompts`.
    pub fn prompt_audit(&self) -> PromptAudit {
        self.prompts
    }

    /// How many targets have an API key or a database password (SSH
    /// logins are counted apart: [`Policy::ssh_logins`]).
    pub fn credential_count(&self) -> usize {
        self.credentials.len()
    }

    /// Every secret the policy read, each credential's key, each SSH
    /// login's key or password and the OIDC client secret of `approvals`:
    /// `warden run` keeps them out of the program's environment, whatever
    /// variable holds them.
    pub fn credential_secrets(&self) -> impl Iterator<Item = &str> {
        self.credentials
            .iter()
            .map(|(_, c)| c.secret.as_str())
            .chain(self.ssh_logins.iter().map(|(_, l)| l.secret.as_str()))
            .chain(
                self.approvals
                    .iter()
                    .filter_map(|a| a.oidc.client_secret.as_deref()),
            )
    }

    /// The credential of the target named `target`, if it has one.
    pub fn credential(&self, target: &str) -> Option<&Arc<Credential>> {
        self.credentials
            .iter()
            .find(|(t, _)| self.targets[*t].name == target)
            .map(|(_, credential)| credential)
    }

    /// Whether statements need deciding at all: true when the file has a
    /// statement rule, says `sql_default: deny`, or has a `sql_mask`. When
    /// false, [`Policy::decide_statement`] allows every statement (rule
    /// "default") and masks nothing, so a caller may skip asking.
    pub fn has_statement_rules(&self) -> bool {
        self.sql_default == Action::Deny
            || self.sql_mask.is_some()
            || self.statement_rule_count() > 0
    }

    /// How many statement rules have a `mask`.
    pub fn masking_rule_count(&self) -> usize {
        self.rules.iter().filter(|r| r.mask.is_some()).count()
    }

    /// How many rules of `kind` say `action: approve`.
    fn approving_rule_count(&self, kind: RuleKind) -> usize {
        self.rules
            .iter()
            .filter(|r| r.kind == kind && r.action == Action::Approve)
            .count()
    }

    /// `sql_mask`, compiled: how the rows of statements no statement rule
    /// matches are masked.
    pub fn sql_mask(&self) -> Option<&Arc<Masker>> {
        self.sql_mask.as_ref().map(|m| &m.masker)
    }

    /// How many rules are statement rules (have a `sql` matcher).
    pub fn statement_rule_count(&self) -> usize {
        self.rules.iter().filter(|r| r.sql.is_some()).count()
    }

    /// What happens to statements no statement rule matches: `sql_default`.
    pub fn sql_default(&self) -> Action {
        self.sql_default
    }

    fn workload_hits(&self, identity: &Identity) -> Vec<bool> {
        self.workloads
            .iter()
            .map(|w| w.selector.matches(identity))
            .collect()
    }

    fn first_workload(&self, hits: &[bool]) -> Option<String> {
        hits.iter()
            .position(|&hit| hit)
            .map(|i| self.workloads[i].name.clone())
    }

    /// `approvals:`: how reviewers sign in; None when the file has none
    /// (then no rule says `action: approve`, checked at load).
    pub fn approvals(&self) -> Option<&ApprovalSettings> {
        self.approvals.as_ref()
    }

    /// `workload_tokens:`: whose tokens requests may carry, and in which
    /// header; None when the file has none (then no rule has a `token`
    /// matcher, checked at load).
    pub fn workload_tokens(&self) -> Option<&WorkloadTokenSettings> {
        self.workload_tokens.as_ref()
    }

    /// The `owners:` of the workload named `workload`; none for an unknown
    /// name.
    pub fn owners_of(&self, workload: &str) -> &[String] {
        self.workloads
            .iter()
            .find(|w| w.name == workload)
            .map_or(&[], |w| w.owners.as_slice())
    }

    /// The daily token budget of the workload named `workload`, if it has
    /// one.
    pub fn budget_of(&self, workload: &str) -> Option<&Budget> {
        self.budgets.iter().find(|b| b.workload == workload)
    }

    /// `budgets:`, in file order.
    pub fn budgets(&self) -> &[Budget] {
        &self.budgets
    }

    /// The first workload whose match holds for `identity`, if any.
    pub fn workload_of(&self, identity: &Identity) -> Option<&str> {
        self.workloads
            .iter()
            .find(|w| w.selector.matches(identity))
            .map(|w| w.name.as_str())
    }

    /// UDP destination ports the kernel lets through, sorted; the rest are
    /// refused and audited.
    pub fn udp_allowed_ports(&self) -> Vec<u16> {
        self.udp_ports.clone()
    }

    pub fn audit_settings(&self) -> AuditSettings {
        self.audit.clone()
    }

    /// `audit.on_failure`: what the proxy does while the audit cannot be
    /// written.
    pub fn on_audit_failure(&self) -> OnAuditFailure {
        self.audit.on_failure
    }

    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// "3 rules, 2 workloads, 2 targets", as `warden policy check` prints
    /// it; with statement rules, "3 rules, 2 of them for SQL statements, ...",
    /// with masks "..., 2 of them for SQL statements, 1 with a mask, ...",
    /// with rules that hold for approval "..., 1 holding for approval, ..."
    /// after the statement, the request and the SSH counts, with request
    /// rules "..., 1 of them for HTTP requests, ...", with SSH rules "...,
    /// 1 of them for SSH requests, ...", with credentials "..., 2 targets,
    /// 1 credential", with SSH logins "..., 1 SSH login", with budgets
    /// "..., 1 token budget", and then what
    /// applies to what no rule decides: "; sql_mask masks columns
    /// \"*email*\" and detectors card, iban" (presets expanded), ";
    /// http_default: deny", "; prompt_redact redacts detectors ...", ";
    /// response_mask masks ...", "; ssh_default: deny", with an `approvals`
    /// section, "; approvals by <issuer>", and last, with a
    /// `workload_tokens` section, "; workload tokens in <header> from
    /// <issuers>". Never a secret.
    pub fn summary(&self) -> String {
        fn count(n: usize, noun: &str) -> String {
            format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
        }
        let masks = match self.masking_rule_count() {
            0 => String::new(),
            n => format!(", {n} with a mask"),
        };
        let held = |kind| match self.approving_rule_count(kind) {
            0 => String::new(),
            n => format!(", {n} holding for approval"),
        };
        let statements = match self.statement_rule_count() {
            0 => String::new(),
            n => format!(
                ", {n} of them for SQL statements{masks}{}",
                held(RuleKind::Statement)
            ),
        };
        let requests = match self.request_rule_count() {
            0 => String::new(),
            n => format!(", {n} of them for HTTP requests{}", held(RuleKind::Request)),
        };
        let ssh = match self.ssh_rule_count() {
            0 => String::new(),
            n => format!(", {n} of them for SSH requests{}", held(RuleKind::Ssh)),
        };
        let mut credentials = match self.credential_count() {
            0 => String::new(),
            n => format!(", {}", count(n, "credential")),
        };
        if !self.ssh_logins.is_empty() {
            credentials.push_str(&format!(", {}", count(self.ssh_logins.len(), "SSH login")));
        }
        if !self.budgets.is_empty() {
            credentials.push_str(&format!(", {}", count(self.budgets.len(), "token budget")));
        }
        let mut defaults = String::new();
        if let Some(mask) = &self.sql_mask {
            defaults.push_str(&format!("; sql_mask masks {}", mask.describe()));
        }
        if self.http_default == Action::Deny {
            defaults.push_str("; http_default: deny");
        }
        if let Some(redact) = &self.prompt_redact {
            defaults.push_str(&format!(
                "; prompt_redact {} {}",
                match redact.on_detect {
                    OnDetect::Redact => "redacts",
                    OnDetect::Deny => "denies requests with",
                },
                redact.mask.describe()
            ));
        }
        if let Some(mask) = &self.response_mask {
            defaults.push_str(&format!("; response_mask masks {}", mask.describe()));
        }
        if self.ssh_default == Action::Deny {
            defaults.push_str("; ssh_default: deny");
        }
        if let Some(approvals) = &self.approvals {
            defaults.push_str(&format!("; approvals by {}", approvals.oidc.issuer));
        }
        if let Some(tokens) = &self.workload_tokens {
            let issuers: Vec<&str> = tokens.issuers.iter().map(|i| i.issuer.as_str()).collect();
            defaults.push_str(&format!(
                "; workload tokens in {} from {}",
                tokens.header,
                issuers.join(", ")
            ));
        }
        format!(
            "{}{statements}{requests}{ssh}, {}, {}{credentials}{defaults}",
            count(self.rule_count(), "rule"),
            count(self.workload_count(), "workload"),
            count(self.target_count(), "target")
        )
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[path = "statement_tests.rs"]
mod statement_tests;

#[cfg(test)]
#[path = "mask_tests.rs"]
mod mask_tests;

#[cfg(test)]
#[path = "http_tests.rs"]
mod http_tests;

#[cfg(test)]
#[path = "ssh_tests.rs"]
mod ssh_tests;

#[cfg(test)]
#[path = "token_tests.rs"]
mod token_tests;
