//! Policy: decides per connection, from one YAML file (docs/policy.md).
//!
//! Version 0 of the policy language knows connections only: who (workloads,
//! from the kernel's attribution), where (targets: addresses and ports), and
//! rules that allow or deny, first match wins. Later versions add protocol
//! matchers, masking, approvals and credentials to the same file.
//!
//! - [`parse`] reads and checks a file, with errors that name line and column;
//! - [`glob`] is the small glob language of workload selectors;
//! - this module holds the checked policy and decides.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;

use crate::identity::Identity;

pub mod glob;
mod parse;

pub use parse::{MAX_UDP_PORTS, SUPPORTED_VERSION};

use glob::Glob;

/// The policy built into the agent, used when no file is given: it audits
/// everything and denies nothing.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default.yaml");

/// The name [`Decision::rule`] carries when no rule matched.
pub const DEFAULT_RULE: &str = "default";

/// The name [`Decision::rule`] carries for UDP, which `udp.allow_ports` decides.
pub const UDP_RULE: &str = "udp.allow_ports";

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule's name, or "default" ([`DEFAULT_RULE`]), or for UDP
    /// "udp.allow_ports" ([`UDP_RULE`]).
    pub rule: String,
    /// The first workload the identity matches, if any.
    pub workload: Option<String>,
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

/// Where: a destination's address and port. Every key given must hold.
#[derive(Clone, Debug, Default)]
struct Target {
    name: String,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
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

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    /// Indexes into `Policy::workloads`; empty: any process.
    workloads: Vec<usize>,
    /// Indexes into `Policy::targets`; empty: any destination.
    targets: Vec<usize>,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    action: Action,
}

/// A checked policy. Cheap to share behind an `Arc`; deciding never fails.
#[derive(Clone, Debug)]
pub struct Policy {
    version: u32,
    default: DefaultAction,
    workloads: Vec<Workload>,
    targets: Vec<Target>,
    rules: Vec<Rule>,
    udp_ports: Vec<u16>,
    audit: AuditSettings,
}

impl Policy {
    /// The built-in policy (policies/default.yaml): audit everything, deny
    /// nothing, UDP to port 53 only.
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

    /// Decides one connection. TCP: the first rule whose `when` holds decides,
    /// else the default. UDP: `udp.allow_ports` decides, as the kernel does.
    pub fn decide_connection(&self, req: &ConnectionRequest) -> Decision {
        let hits: Vec<bool> = self
            .workloads
            .iter()
            .map(|w| w.selector.matches(req.identity))
            .collect();
        let workload = hits
            .iter()
            .position(|&hit| hit)
            .map(|i| self.workloads[i].name.clone());
        if req.transport == Transport::Udp {
            let allowed = self.udp_ports.contains(&req.destination.port());
            return Decision {
                action: if allowed { Action::Allow } else { Action::Deny },
                rule: UDP_RULE.to_string(),
                workload,
            };
        }
        let rule = self.rules.iter().find(|rule| {
            (rule.workloads.is_empty() || rule.workloads.iter().any(|&w| hits[w]))
                && (rule.targets.is_empty()
                    || rule
                        .targets
                        .iter()
                        .any(|&t| self.targets[t].matches(req.destination)))
                && address_matches(&rule.address, req.destination.ip())
                && port_matches(&rule.port, req.destination.port())
        });
        match rule {
            Some(rule) => Decision {
                action: rule.action,
                rule: rule.name.clone(),
                workload,
            },
            None => Decision {
                action: self.default.action(),
                rule: DEFAULT_RULE.to_string(),
                workload,
            },
        }
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

    /// "3 rules, 2 workloads, 2 targets", as `warden policy check` prints it.
    pub fn summary(&self) -> String {
        fn count(n: usize, noun: &str) -> String {
            format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
        }
        format!(
            "{}, {}, {}",
            count(self.rule_count(), "rule"),
            count(self.workload_count(), "workload"),
            count(self.target_count(), "target")
        )
    }
}

#[cfg(test)]
mod tests;
