//! Policy: decides per connection and, for PostgreSQL, per statement, from
//! one YAML file (docs/policy.md).
//!
//! Who (workloads, from the kernel's attribution), where (targets: addresses,
//! ports and what they speak), and rules that allow or deny, first match
//! wins. A rule without a protocol matcher is a *connection rule*: it decides
//! connections. A rule with a `sql` matcher is a *statement rule*: it decides
//! each statement of a PostgreSQL session, and never a connection; one that
//! allows may also mask the rows the statement returns (`mask`, compiled at
//! load into a [`crate::masking::Masker`] that the [`Decision`] carries), and
//! `sql_mask` masks the rows of statements no rule decides. Later versions
//! add more matchers, approvals and credentials to the same file.
//!
//! The policy knows nothing of sockets or wire protocols: callers hand it
//! plain values ([`ConnectionRequest`], [`StatementRequest`]).
//!
//! - [`parse`] reads and checks a file, with errors that name line and column;
//! - [`glob`] is the small glob language of selectors and SQL matchers;
//! - this module holds the checked policy and decides.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

use crate::{identity::Identity, masking::Masker};

pub mod glob;
mod parse;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// "allow" or "deny", as the audit writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Decision {
    pub action: Action,
    /// The rule's name, or "default" ([`DEFAULT_RULE`]) when no rule matched
    /// (for a statement too), or for UDP "udp.allow_ports" ([`UDP_RULE`]).
    pub rule: String,
    /// The first workload the identity matches, if any.
    pub workload: Option<String>,
    /// For an allowed statement: how to mask the rows it returns, from the
    /// deciding rule's `mask`, or from `sql_mask` when no rule decided.
    /// None for connections, for denied statements, and for statements
    /// whose rule has no mask: their rows pass unchanged.
    pub mask: Option<Arc<Masker>>,
}

/// Two decisions are equal when they say the same, and carry the same
/// compiled mask (one rule's, or `sql_mask`), or none.
impl PartialEq for Decision {
    fn eq(&self, other: &Decision) -> bool {
        self.action == other.action
            && self.rule == other.rule
            && self.workload == other.workload
            && match (&self.mask, &other.mask) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Decision {}

/// A rule's `mask`, or `sql_mask`, compiled: the masker, and what the file
/// said, for summaries.
#[derive(Clone, Debug)]
struct Mask {
    masker: Arc<Masker>,
    /// The column globs, as written.
    columns: Vec<String>,
    /// The detectors the names resolved to (presets expanded), in order.
    detectors: Vec<String>,
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
    }

    fn matches(&self, id: &Identity) -> bool {
        fn any_glob(globs: &Option<Vec<Glob>>, value: Option<&str>) -> bool {
            match globs {
                None => true,
                Some(globs) => value.is_some_and(|v| globs.iter().any(|g| g.is_match(v))),
            }
        }
        self.uid.as_ref().is_none_or(|uids| uids.contains(&id.uid))
            && self
                .user
                .as_ref()
                .is_none_or(|users| id.user.as_ref().is_some_and(|u| users.contains(u)))
            && any_glob(&self.exe, id.exe.as_deref())
            && any_glob(&self.comm, Some(&id.comm))
            && any_glob(&self.unit, id.unit.as_deref())
            && any_glob(&self.cgroup, id.cgroup_path.as_deref())
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
}

/// Where: a destination's address and port. Every key given must hold.
#[derive(Clone, Debug, Default)]
struct Target {
    name: String,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    protocol: Option<Protocol>,
}

impl Target {
    fn matches(&self, destination: SocketAddr) -> bool {
        address_matches(&self.address, destination.ip())
            && port_matches(&self.port, destination.port())
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
        let session = |globs: &Option<Vec<Glob>>, value: Option<&str>| {
            globs
                .as_ref()
                .is_none_or(|globs| value.is_some_and(|v| globs.iter().any(|g| g.is_match(v))))
        };
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

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    /// Indexes into `Policy::workloads`; empty: any process.
    workloads: Vec<usize>,
    /// Indexes into `Policy::targets`; empty: any destination.
    targets: Vec<usize>,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    /// Some: a statement rule, which never decides a connection.
    sql: Option<SqlMatcher>,
    action: Action,
    /// Only on a statement rule that allows (checked at load).
    mask: Option<Mask>,
}

impl Rule {
    /// Whether who and where hold: workload, target, address and port.
    fn holds_for(&self, policy: &Policy, hits: &[bool], destination: SocketAddr) -> bool {
        (self.workloads.is_empty() || self.workloads.iter().any(|&w| hits[w]))
            && (self.targets.is_empty()
                || self
                    .targets
                    .iter()
                    .any(|&t| policy.targets[t].matches(destination)))
            && address_matches(&self.address, destination.ip())
            && port_matches(&self.port, destination.port())
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
    udp_ports: Vec<u16>,
    audit: AuditSettings,
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
    /// `udp.allow_ports` decides, as the kernel does.
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
            };
        }
        let rule = self
            .rules
            .iter()
            .filter(|rule| rule.sql.is_none())
            .find(|rule| rule.holds_for(self, &hits, req.destination));
        match rule {
            Some(rule) => Decision {
                action: rule.action,
                rule: rule.name.clone(),
                workload,
                mask: None,
            },
            None => Decision {
                action: self.default.action(),
                rule: DEFAULT_RULE.to_string(),
                workload,
                mask: None,
            },
        }
    }

    /// Decides one statement of a PostgreSQL session whose connection was
    /// allowed: the first statement rule (in file order) whose whole `when`
    /// holds (workload, target, address, port and the `sql` matcher)
    /// decides, with its `mask` if it has one; else `sql_default` (allow
    /// unless the file says deny), with the rule "default" and `sql_mask`.
    /// Connection rules and `default` play no part.
    pub fn decide_statement(&self, req: &StatementRequest) -> Decision {
        let hits = self.workload_hits(req.identity);
        let workload = self.first_workload(&hits);
        let rule = self.rules.iter().find(|rule| {
            rule.sql
                .as_ref()
                .is_some_and(|sql| rule.holds_for(self, &hits, req.destination) && sql.matches(req))
        });
        let masker = |mask: &Option<Mask>| mask.as_ref().map(|m| Arc::clone(&m.masker));
        match rule {
            Some(rule) => Decision {
                action: rule.action,
                rule: rule.name.clone(),
                workload,
                mask: masker(&rule.mask),
            },
            None => Decision {
                action: self.sql_default,
                rule: DEFAULT_RULE.to_string(),
                workload,
                mask: masker(&self.sql_mask),
            },
        }
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
    /// with masks "..., 2 of them for SQL statements, 1 with a mask, ...", and
    /// with `sql_mask` "...; sql_mask masks columns \"*email*\" and
    /// detectors card, iban" (presets expanded).
    pub fn summary(&self) -> String {
        fn count(n: usize, noun: &str) -> String {
            format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
        }
        let masks = match self.masking_rule_count() {
            0 => String::new(),
            n => format!(", {n} with a mask"),
        };
        let statements = match self.statement_rule_count() {
            0 => String::new(),
            n => format!(", {n} of them for SQL statements{masks}"),
        };
        let sql_mask = match &self.sql_mask {
            None => String::new(),
            Some(mask) => {
                let mut parts = Vec::new();
                if !mask.columns.is_empty() {
                    let columns: Vec<String> =
                        mask.columns.iter().map(|c| format!("{c:?}")).collect();
                    parts.push(format!("columns {}", columns.join(", ")));
                }
                if !mask.detectors.is_empty() {
                    parts.push(format!("detectors {}", mask.detectors.join(", ")));
                }
                format!("; sql_mask masks {}", parts.join(" and "))
            }
        };
        format!(
            "{}{statements}, {}, {}{sql_mask}",
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
