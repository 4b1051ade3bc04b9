//! Reading a policy file: YAML to a checked [`Policy`], with errors that name
//! the line and column.
//!
//! Every key and value is read by a hand-written serde visitor, and every
//! check (unknown and not-yet-supported keys, addresses, ports, globs, names,
//! references between rules and definitions) runs inside the visitor of the
//! node it is about. serde_yaml then stamps the error with the position of
//! that node, as libyaml saw it, so positions never come from guessing at the
//! text, whatever the style (block or flow, quoted or not, anchors).
//!
//! References (a rule naming a workload or a target) can point forwards in
//! the file, so the file is read twice: the first reading learns the names
//! (and what each target speaks) and checks everything else; the second
//! checks the references, with the names known, and that a rule's `sql`
//! matcher goes only with targets that speak PostgreSQL.

use std::{
    cell::{Cell, RefCell},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    Action, AuditSettings, DefaultAction, Policy, PolicyError, PortRange, Protocol, Rule,
    STATEMENT_CLASSES, Selector, SqlMatcher, Target, Workload, glob::Glob,
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
    /// (key, what it belongs to): ("http", "protocol matchers").
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
        "workloads",
        "targets",
        "udp",
        "rules",
        "audit",
    ],
    later: &[
        ("credentials", "credential injection"),
        ("detectors", "masking"),
        ("presets", "masking"),
    ],
    instead: &[],
};

pub(crate) const WORKLOAD: Fields = Fields {
    what: "in a workload",
    known: &["match"],
    later: &[],
    instead: &[],
};

pub(crate) const MATCH: Fields = Fields {
    what: "in a workload's match",
    known: &["uid", "user", "exe", "comm", "unit", "cgroup", "container"],
    later: &[("k8s", "Kubernetes selectors")],
    instead: &[],
};

pub(crate) const TARGET: Fields = Fields {
    what: "in a target",
    known: &["address", "port", "protocol"],
    later: &[("host", "host names")],
    instead: &[(
        "database",
        "a rule's sql matcher names databases: `when: { target: ..., sql: { database: crm } }`",
    )],
};

pub(crate) const UDP: Fields = Fields {
    what: "under udp",
    known: &["allow_ports"],
    later: &[],
    instead: &[],
};

pub(crate) const RULE: Fields = Fields {
    what: "in a rule",
    known: &["name", "when", "action"],
    later: &[
        ("approve", "approvals"),
        ("mask", "masking"),
        ("redact_prompt", "masking"),
        ("mask_response", "masking"),
        ("credential", "credential injection"),
        ("credentials", "credential injection"),
        ("llm", "protocol matchers"),
    ],
    instead: &[(
        "sql",
        "a rule's sql matcher goes under when: `when: { sql: { ... } }`",
    )],
};

pub(crate) const WHEN: Fields = Fields {
    what: "in a rule's when",
    known: &["workload", "target", "address", "port", "sql"],
    later: &[
        ("http", "protocol matchers"),
        ("llm", "protocol matchers"),
        ("ssh", "protocol matchers"),
        ("protocol", "protocol matchers"),
        ("host", "host names"),
        ("from_llm", "protocol matchers"),
    ],
    instead: &[
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
    ],
};

pub(crate) const SQL: Fields = Fields {
    what: "in a rule's sql",
    known: &["class", "tables", "functions", "database", "user"],
    later: &[("columns", "masking")],
    instead: &[
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
    known: &["dir", "rotate"],
    later: &[
        ("prompts", "LLM request auditing"),
        ("retention", "audit retention"),
    ],
    instead: &[],
};

/// Each mapping of the format, with where the JSON Schema describes it.
#[cfg(test)]
pub(crate) const SCHEMA_OBJECTS: &[(&str, &Fields)] = &[
    ("", &TOP),
    ("/$defs/workload", &WORKLOAD),
    ("/$defs/match", &MATCH),
    ("/$defs/target", &TARGET),
    ("/$defs/udp", &UDP),
    ("/$defs/rule", &RULE),
    ("/$defs/when", &WHEN),
    ("/$defs/sql", &SQL),
    ("/$defs/audit", &AUDIT),
];

// ---------------------------------------------------------------------------
// Entry point and errors

pub(super) fn parse(src: &str, origin: &str) -> Result<Policy, PolicyError> {
    let learn = Ctx::default();
    let first = read(src, &learn).map_err(|e| convert(&e, src, origin))?;
    let check = Ctx {
        names: Some(Names {
            workloads: first.workloads.iter().map(|w| w.name.clone()).collect(),
            targets: first.targets.iter().map(|t| t.name.clone()).collect(),
            target_protocols: first.targets.iter().map(|t| t.protocol).collect(),
            rules: first.rules.iter().map(|r| r.name.clone()).collect(),
        }),
        ..Ctx::default()
    };
    let file = read(src, &check).map_err(|e| convert(&e, src, origin))?;
    Ok(file.compile())
}

fn read(src: &str, ctx: &Ctx) -> Result<FileDef, serde_yaml::Error> {
    FileSeed { ctx }.deserialize(serde_yaml::Deserializer::from_str(src))
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

#[derive(Default)]
struct Names {
    workloads: Vec<String>,
    targets: Vec<String>,
    /// What each target of `targets` speaks, in the same order.
    target_protocols: Vec<Option<Protocol>>,
    rules: Vec<String>,
}

impl Names {
    fn target_protocol(&self, name: &str) -> Option<Protocol> {
        let i = self.targets.iter().position(|n| n == name)?;
        self.target_protocols[i]
    }
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

impl Ctx {
    fn current_rule(&self) -> String {
        let index = self.rules_started.get();
        self.names
            .as_ref()
            .and_then(|n| n.rules.get(index.wrapping_sub(1)))
            .cloned()
            .unwrap_or_else(|| format!("#{index}"))
    }

    /// On the second reading: the error for a `sql` matcher on `target`, if
    /// the target says it speaks something other than PostgreSQL.
    fn sql_target_error(&self, target: &str) -> Option<String> {
        let protocol = self.names.as_ref()?.target_protocol(target);
        if Protocol::speaks_sql(protocol) {
            return None;
        }
        Some(format!(
            "rule `{}` has a sql matcher, which matches PostgreSQL statements, but its target \
             `{target}` says `protocol: {}`; a sql matcher goes with targets of `protocol: \
             postgres` (or `any`, or none), so name another target or split the rule",
            self.current_rule(),
            protocol.map_or("", Protocol::as_str)
        ))
    }
}

struct FileDef {
    version: Option<u64>,
    default: DefaultAction,
    sql_default: Action,
    workloads: Vec<Workload>,
    targets: Vec<Target>,
    udp_ports: Vec<u16>,
    rules: Vec<RuleDef>,
    audit: AuditSettings,
}

struct RuleDef {
    name: String,
    workloads: Vec<String>,
    targets: Vec<String>,
    address: Option<Vec<IpNet>>,
    port: Option<Vec<PortRange>>,
    sql: Option<SqlMatcher>,
    action: Action,
}

impl FileDef {
    fn compile(self) -> Policy {
        let index = |names: &[String], name: &str| names.iter().position(|n| n == name);
        let workload_names: Vec<String> = self.workloads.iter().map(|w| w.name.clone()).collect();
        let target_names: Vec<String> = self.targets.iter().map(|t| t.name.clone()).collect();
        let rules = self
            .rules
            .into_iter()
            .map(|r| Rule {
                // The second reading has checked that every name is defined.
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
                action: r.action,
            })
            .collect();
        Policy {
            version: self.version.unwrap_or(SUPPORTED_VERSION) as u32,
            default: self.default,
            workloads: self.workloads,
            targets: self.targets,
            rules,
            sql_default: self.sql_default,
            udp_ports: self.udp_ports,
            audit: self.audit,
        }
    }
}

// ---------------------------------------------------------------------------
// Mappings

/// Reads the keys of a mapping of `fields`, handing each known key to `each`,
/// which must read its value.
fn for_each_field<'de, A: MapAccess<'de>>(
    map: &mut A,
    fields: &'static Fields,
    mut each: impl FnMut(&'static str, &mut A) -> Result<(), A::Error>,
) -> Result<(), A::Error> {
    let mut seen = Vec::new();
    while let Some(key) = map.next_key_seed(FieldKey {
        fields,
        seen: &mut seen,
        check: None,
    })? {
        each(key, map)?;
    }
    Ok(())
}

struct FieldKey<'a> {
    fields: &'static Fields,
    seen: &'a mut Vec<&'static str>,
    /// A check of a known key against what the mapping said before it; an
    /// error is put at the key.
    check: Option<&'a dyn Fn(&'static str) -> Result<(), String>>,
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
            if let Some(check) = self.check {
                check(k).map_err(fail)?;
            }
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

struct FileSeed<'c> {
    ctx: &'c Ctx,
}

impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
    type Value = FileDef;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<FileDef, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_> {
    type Value = FileDef;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a policy: a mapping with version, default, workloads, targets, udp, rules, audit",
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileDef, A::Error> {
        let mut file = FileDef {
            version: None,
            default: DefaultAction::Audit,
            sql_default: Action::Allow,
            workloads: Vec::new(),
            targets: Vec::new(),
            udp_ports: vec![53],
            rules: Vec::new(),
            audit: AuditSettings::default(),
        };
        for_each_field(&mut map, &TOP, |key, map| {
            match key {
                "version" => file.version = Some(map.next_value_seed(One(VersionP))?),
                "default" => file.default = map.next_value_seed(One(DefaultP))?,
                "sql_default" => file.sql_default = map.next_value_seed(One(SqlDefaultP))?,
                "workloads" => {
                    file.workloads = map
                        .next_value_seed(NamedMap {
                            kind: "workload",
                            section: "workloads",
                            seed: WorkloadSeed,
                        })?
                        .into_iter()
                        .map(|(name, selector)| Workload { name, selector })
                        .collect()
                }
                "targets" => {
                    file.targets = map
                        .next_value_seed(NamedMap {
                            kind: "target",
                            section: "targets",
                            seed: TargetSeed,
                        })?
                        .into_iter()
                        .map(|(name, target)| Target { name, ..target })
                        .collect()
                }
                "udp" => file.udp_ports = map.next_value_seed(UdpSeed)?,
                "rules" => file.rules = map.next_value_seed(RulesSeed { ctx: self.ctx })?,
                "audit" => file.audit = map.next_value_seed(AuditSeed)?,
                _ => unreachable!("{key} is in TOP.known"),
            }
            Ok(())
        })?;
        if file.version.is_none() {
            return Err(fail(format!(
                "the policy does not say its version; write `version: {SUPPORTED_VERSION}` as its first line"
            )));
        }
        Ok(file)
    }
}

/// A mapping from names to definitions, in file order (workloads, targets).
struct NamedMap<S> {
    kind: &'static str,
    section: &'static str,
    seed: S,
}

impl<'de, S> DeserializeSeed<'de> for NamedMap<S>
where
    S: DeserializeSeed<'de> + Copy,
{
    type Value = Vec<(String, S::Value)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S> Visitor<'de> for NamedMap<S>
where
    S: DeserializeSeed<'de> + Copy,
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
        })? {
            let value = map.next_value_seed(self.seed)?;
            out.push((name, value));
        }
        Ok(out)
    }
}

struct NameKey<'a> {
    kind: &'static str,
    section: &'static str,
    seen: &'a mut Vec<String>,
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

#[derive(Clone, Copy)]
struct WorkloadSeed;

impl<'de> DeserializeSeed<'de> for WorkloadSeed {
    type Value = Selector;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Selector, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for WorkloadSeed {
    type Value = Selector;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a workload: a mapping with match")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Selector, A::Error> {
        let mut selector = None;
        for_each_field(&mut map, &WORKLOAD, |key, map| {
            match key {
                "match" => selector = Some(map.next_value_seed(MatchSeed)?),
                _ => unreachable!("{key} is in WORKLOAD.known"),
            }
            Ok(())
        })?;
        selector.ok_or_else(|| {
            fail(
                "a workload needs a match; write e.g. `match: { unit: \"support-bot.service\" }` \
                 or `match: { uid: [1000] }`",
            )
        })
    }
}

#[derive(Clone, Copy)]
struct MatchSeed;

impl<'de> DeserializeSeed<'de> for MatchSeed {
    type Value = Selector;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Selector, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MatchSeed {
    type Value = Selector;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a match: a mapping with some of {}",
            MATCH.known.join(", ")
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Selector, A::Error> {
        let mut s = Selector::default();
        for_each_field(&mut map, &MATCH, |key, map| {
            match key {
                "uid" => s.uid = Some(map.next_value_seed(Many::new(UidP, "uid"))?),
                "user" => s.user = Some(map.next_value_seed(Many::new(UserP, "user name"))?),
                "exe" => s.exe = Some(map.next_value_seed(Many::new(GlobP(EXE_EXAMPLE), "exe"))?),
                "comm" => {
                    s.comm = Some(map.next_value_seed(Many::new(GlobP(COMM_EXAMPLE), "comm"))?)
                }
                "unit" => {
                    s.unit = Some(map.next_value_seed(Many::new(GlobP(UNIT_EXAMPLE), "unit"))?)
                }
                "cgroup" => {
                    s.cgroup =
                        Some(map.next_value_seed(Many::new(GlobP(CGROUP_EXAMPLE), "cgroup"))?)
                }
                "container" => {
                    s.container = Some(map.next_value_seed(Many::new(ContainerP, "container id"))?)
                }
                _ => unreachable!("{key} is in MATCH.known"),
            }
            Ok(())
        })?;
        if s.is_empty() {
            return Err(fail(format!(
                "a workload's match is empty, which would match every process; give at least one \
                 of: {}",
                MATCH.known.join(", ")
            )));
        }
        Ok(s)
    }
}

const EXE_EXAMPLE: &str = "\"/usr/bin/python3*\"";
const COMM_EXAMPLE: &str = "\"python3*\"";
const UNIT_EXAMPLE: &str = "\"support-bot.service\"";
const CGROUP_EXAMPLE: &str = "\"/system.slice/support-bot.service\"";

#[derive(Clone, Copy)]
struct TargetSeed;

impl<'de> DeserializeSeed<'de> for TargetSeed {
    type Value = Target;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Target, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TargetSeed {
    type Value = Target;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a target: a mapping with address and/or port, and optionally protocol")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Target, A::Error> {
        let mut t = Target::default();
        for_each_field(&mut map, &TARGET, |key, map| {
            match key {
                "address" => t.address = Some(map.next_value_seed(Many::new(AddressP, "address"))?),
                "port" => t.port = Some(map.next_value_seed(Many::new(PortP, "port"))?),
                "protocol" => t.protocol = Some(map.next_value_seed(One(ProtocolP))?),
                _ => unreachable!("{key} is in TARGET.known"),
            }
            Ok(())
        })?;
        if t.address.is_none() && t.port.is_none() {
            return Err(fail(
                "a target needs an address, a port or both; write e.g. \
                 `{ address: \"10.0.0.0/8\", port: 5432 }`",
            ));
        }
        Ok(t)
    }
}

struct UdpSeed;

impl<'de> DeserializeSeed<'de> for UdpSeed {
    type Value = Vec<u16>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u16>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UdpSeed {
    type Value = Vec<u16>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping with allow_ports")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<u16>, A::Error> {
        let mut ports = vec![53];
        for_each_field(&mut map, &UDP, |key, map| {
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
                    ports = list;
                }
                _ => unreachable!("{key} is in UDP.known"),
            }
            Ok(())
        })?;
        Ok(ports)
    }
}

struct AuditSeed;

impl<'de> DeserializeSeed<'de> for AuditSeed {
    type Value = AuditSettings;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<AuditSettings, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AuditSeed {
    type Value = AuditSettings;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping with dir and/or rotate")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AuditSettings, A::Error> {
        let mut audit = AuditSettings::default();
        for_each_field(&mut map, &AUDIT, |key, map| {
            match key {
                "dir" => audit.dir = Some(map.next_value_seed(One(DirP))?),
                "rotate" => audit.rotate = Some(map.next_value_seed(One(DurationP))?),
                _ => unreachable!("{key} is in AUDIT.known"),
            }
            Ok(())
        })?;
        Ok(audit)
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
        while let Some(rule) = seq.next_element_seed(RuleSeed { ctx: self.ctx })? {
            rules.push(rule);
        }
        Ok(rules)
    }
}

#[derive(Clone, Copy)]
struct RuleSeed<'c> {
    ctx: &'c Ctx,
}

impl<'de> DeserializeSeed<'de> for RuleSeed<'_> {
    type Value = RuleDef;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RuleDef, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RuleSeed<'_> {
    type Value = RuleDef;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a rule: a mapping with name, when and action")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RuleDef, A::Error> {
        let ctx = self.ctx;
        ctx.rules_started.set(ctx.rules_started.get() + 1);
        let mut name = None;
        let mut when = None;
        let mut action = None;
        for_each_field(&mut map, &RULE, |key, map| {
            match key {
                "name" => name = Some(map.next_value_seed(One(RuleNameP { ctx }))?),
                "when" => when = Some(map.next_value_seed(WhenSeed { ctx })?),
                "action" => action = Some(map.next_value_seed(One(ActionP))?),
                _ => unreachable!("{key} is in RULE.known"),
            }
            Ok(())
        })?;
        let index = ctx.rules_started.get();
        let Some(name) = name else {
            return Err(fail(format!(
                "rule #{index} has no name; write e.g. `name: no-cloud-metadata` (the audit \
                 records which rule decided)"
            )));
        };
        let Some(action) = action else {
            return Err(fail(format!(
                "rule `{name}` has no action; write `action: allow` or `action: deny`"
            )));
        };
        let when = when.unwrap_or_default();
        Ok(RuleDef {
            name,
            workloads: when.workloads,
            targets: when.targets,
            address: when.address,
            port: when.port,
            sql: when.sql,
            action,
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
}

struct WhenSeed<'c> {
    ctx: &'c Ctx,
}

impl<'de> DeserializeSeed<'de> for WhenSeed<'_> {
    type Value = WhenDef;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<WhenDef, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for WhenSeed<'_> {
    type Value = WhenDef;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a when: a mapping with some of {}",
            WHEN.known.join(", ")
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WhenDef, A::Error> {
        let ctx = self.ctx;
        let mut w = WhenDef::default();
        let mut seen = Vec::new();
        loop {
            // `sql` after `target`: a target that does not speak PostgreSQL
            // is reported at the `sql` key. (`target` after `sql`: at the
            // target's name, by RefP.)
            let targets = &w.targets;
            let check = |key: &'static str| match key {
                "sql" => targets
                    .iter()
                    .find_map(|t| ctx.sql_target_error(t))
                    .map_or(Ok(()), Err),
                _ => Ok(()),
            };
            let Some(key) = map.next_key_seed(FieldKey {
                fields: &WHEN,
                seen: &mut seen,
                check: Some(&check),
            })?
            else {
                break;
            };
            match key {
                "workload" => {
                    w.workloads = map.next_value_seed(Many::new(
                        RefP {
                            ctx,
                            kind: RefKind::Workload,
                            sql: false,
                        },
                        "workload name",
                    ))?
                }
                "target" => {
                    w.targets = map.next_value_seed(Many::new(
                        RefP {
                            ctx,
                            kind: RefKind::Target,
                            sql: w.sql.is_some(),
                        },
                        "target name",
                    ))?
                }
                "address" => w.address = Some(map.next_value_seed(Many::new(AddressP, "address"))?),
                "port" => w.port = Some(map.next_value_seed(Many::new(PortP, "port"))?),
                "sql" => w.sql = Some(map.next_value_seed(SqlSeed)?),
                _ => unreachable!("{key} is in WHEN.known"),
            }
        }
        Ok(w)
    }
}

/// A rule's `sql` matcher.
struct SqlSeed;

impl<'de> DeserializeSeed<'de> for SqlSeed {
    type Value = SqlMatcher;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<SqlMatcher, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SqlSeed {
    type Value = SqlMatcher;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a sql matcher: a mapping with some of {}",
            SQL.known.join(", ")
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SqlMatcher, A::Error> {
        let mut m = SqlMatcher::default();
        for_each_field(&mut map, &SQL, |key, map| {
            match key {
                "class" => m.class = Some(map.next_value_seed(Many::new(ClassP, "class"))?),
                "tables" => {
                    m.tables =
                        Some(map.next_value_seed(Many::new(NameGlobP(TABLES_EXAMPLE), "table"))?)
                }
                "functions" => {
                    m.functions = Some(
                        map.next_value_seed(Many::new(NameGlobP(FUNCTIONS_EXAMPLE), "function"))?,
                    )
                }
                "database" => {
                    m.database =
                        Some(map.next_value_seed(Many::new(GlobP(DATABASE_EXAMPLE), "database"))?)
                }
                "user" => {
                    m.user = Some(map.next_value_seed(Many::new(GlobP(DB_USER_EXAMPLE), "user"))?)
                }
                _ => unreachable!("{key} is in SQL.known"),
            }
            Ok(())
        })?;
        Ok(m)
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

/// One scalar or a list of them; a single value is a list of one.
#[derive(Clone, Copy)]
struct Many<P> {
    parse: P,
    /// "port": for the message about an empty list.
    noun: &'static str,
    allow_empty: bool,
}

impl<P> Many<P> {
    fn new(parse: P, noun: &'static str) -> Self {
        Many {
            parse,
            noun,
            allow_empty: false,
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
            _ => Err(format!(
                "{s:?} is not a default; write `default: audit` (allow and record) or \
                 `default: deny`"
            )),
        }
    }
}

#[derive(Clone, Copy)]
struct ActionP;

impl Parse for ActionP {
    type Out = Action;
    fn expecting(&self) -> String {
        "allow or deny".into()
    }
    fn text(&self, s: &str) -> Result<Action, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "approve" | "mask" | "redact" | "hold" | "audit" => Err(format!(
                "action `{s}` is not supported yet in policy v0; write `action: allow` or \
                 `action: deny`"
            )),
            _ => Err(format!(
                "{s:?} is not an action; write `action: allow` or `action: deny`"
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
            _ => Err(format!(
                "{s:?} is not a sql_default; write `sql_default: allow` or `sql_default: deny`"
            )),
        }
    }
}

#[derive(Clone, Copy)]
struct ProtocolP;

impl Parse for ProtocolP {
    type Out = Protocol;
    fn expecting(&self) -> String {
        let names: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
        format!("a protocol: one of {}", names.join(", "))
    }
    fn text(&self, s: &str) -> Result<Protocol, String> {
        if let Some(p) = Protocol::ALL.into_iter().find(|p| p.as_str() == s) {
            return Ok(p);
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
struct RefP<'c> {
    ctx: &'c Ctx,
    kind: RefKind,
    /// The rule has a `sql` matcher (read before this): a target must speak
    /// PostgreSQL.
    sql: bool,
}

impl Parse for RefP<'_> {
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
            if self.sql
                && self.kind == RefKind::Target
                && let Some(message) = self.ctx.sql_target_error(s)
            {
                return Err(message);
            }
            return Ok(s.to_string());
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
            "{s:?} is not an address or CIDR, and host names are not supported yet in policy \
             v0; write e.g. 10.0.0.0/8 or 192.0.2.1"
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
struct DurationP;

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
mod tests;
