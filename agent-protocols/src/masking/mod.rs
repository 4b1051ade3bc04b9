//! Masking: detectors of sensitive values and how they are masked.
//!
//! This module is pure: no sockets, no policy, no protocol. The policy
//! compiles one [`Masker`] per rule at load time (from the column globs and
//! the detectors the rule names, see [`resolve`]); the protocol proxies call
//! it for every value they relay:
//!
//! - [`Masker::masks_column`] says whether a result column is masked whole,
//!   and [`Masker::mask_value`] gives the masked form of such a value;
//! - [`Masker::mask_text`] replaces every detector finding inside any other
//!   text value, and borrows the text untouched when nothing is found.
//!
//! # How a text is scanned
//!
//! All the detectors of a masker are compiled into one [`RegexSet`], so a
//! text is read once, by one lazy DFA, to learn which detectors have a
//! candidate in it; in the common case (none) [`Masker::mask_text`] returns
//! [`Cow::Borrowed`] and allocates nothing. Only the detectors that have a
//! candidate search the text again, each with its own regex, and each
//! candidate then passes its detector's checks (Luhn for cards, mod-97 for
//! IBANs, context rules against dates and numeric ids, see
//! `docs/masking.md`) before it becomes a finding. Overlapping findings are
//! resolved leftmost first, then longest.
//!
//! The built-in patterns use ASCII word boundaries (`(?-u:\b)`), which the
//! DFA handles on any text; a Unicode `\b` would make the regex crate fall
//! back to a slower engine on non-ASCII text.

mod builtin;
mod check;
mod glob;
mod json;
#[cfg(test)]
mod tests;

pub use json::{JsonPath, JsonPathError};

use std::borrow::Cow;
use std::cmp::Reverse;
use std::fmt;
use std::str::FromStr;

use regex::{Regex, RegexSet, RegexSetBuilder};

use builtin::Kind;
use glob::ColumnGlob;

/// A detector as the policy names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectorSpec {
    /// One of [`builtin_detector_names`].
    Builtin(String),
    /// A detector the policy defines: a Rust regex, and optionally a checksum
    /// the matched text must pass. When the pattern has a group named
    /// `value`, only that group is masked (and checked); otherwise the whole
    /// match is. Findings are replaced by `[REDACTED:<name>]`.
    Custom {
        name: String,
        pattern: String,
        checksum: Option<Checksum>,
    },
}

impl DetectorSpec {
    /// The detector's name: the built-in name, or the custom detector's.
    pub fn name(&self) -> &str {
        match self {
            DetectorSpec::Builtin(name) => name,
            DetectorSpec::Custom { name, .. } => name,
        }
    }
}

/// A checksum a custom detector's matches must pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// The Luhn mod-10 check of card numbers, over the digits of the match
    /// (other characters are ignored; at least 2 digits are needed).
    Luhn,
    /// The ISO 7064 mod-97-10 check as IBANs use it: over the letters and
    /// digits of the match (spaces and dashes ignored, anything else fails),
    /// the first four moved to the end, letters counted as 10..35; the
    /// remainder must be 1. At least 5 letters and digits are needed.
    Mod97,
}

impl Checksum {
    /// The name a policy uses: `luhn` or `mod97`.
    pub fn name(self) -> &'static str {
        match self {
            Checksum::Luhn => "luhn",
            Checksum::Mod97 => "mod97",
        }
    }

    /// Whether `text` passes this checksum.
    pub fn verify(self, text: &str) -> bool {
        match self {
            Checksum::Luhn => check::luhn_loose(text),
            Checksum::Mod97 => check::mod97_loose(text),
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Checksum {
    type Err = MaskError;

    /// `luhn` or `mod97`, in any case.
    fn from_str(s: &str) -> Result<Checksum, MaskError> {
        if s.eq_ignore_ascii_case("luhn") {
            Ok(Checksum::Luhn)
        } else if s.eq_ignore_ascii_case("mod97") {
            Ok(Checksum::Mod97)
        } else {
            Err(MaskError::UnknownChecksum(s.to_string()))
        }
    }
}

/// The built-in detectors, in the order `all` lists them:
///
/// - `card`: payment card numbers, 13–19 digits, contiguous or in groups
///   (first group of 4, then groups of 3–6) split by one kind of separator
///   (space or dash); first digit 2–6 (Visa, Mastercard, Amex, Discover,
///   JCB, Diners, UnionPay, Maestro, Mir); Luhn-valid; not all one digit.
///   Masked with the last 4 digits kept: `**** **** **** 1111`.
/// - `ssn`: US social security numbers written `123-45-6789` or
///   `123 45 6789` (never 9 bare digits); area not 000, 666 or 9xx, group
///   not 00, serial not 0000. Masked `***-**-****`.
/// - `email`: `local@domain.tld` (ASCII). Masked `a***@example.com`: the
///   domain kept, the local part reduced to its first character (none when
///   it is shorter than 3) and a fixed `***`.
/// - `phone`: international numbers starting with `+` (8–15 digits, spaces,
///   dots, dashes and one parenthesised group allowed) and North American
///   numbers `(415) 555-2671`, `415-555-2671`, `415.555.2671`,
///   `1-800-555-0199` (area and exchange 2xx–9xx, one kind of separator).
///   Masked digit by digit: `+** ** **** ****`, `(***) ***-****`.
/// - `iban`: IBANs, contiguous or in groups of 4, of a country in the IBAN
///   registry with that country's length, mod-97 valid. Masked with the
///   country kept: `DE** **** **** **** **** **`.
/// - `aws_key`: AWS access key ids (`AKIA…`, `ASIA…` and the other
///   4-letter prefixes, then 16 characters) and secret access keys (40
///   characters) after a `secret_access_key`/`SecretAccessKey` name and
///   `=` or `:`. Masked `[REDACTED:aws_key]` (for a secret, only the value).
/// - `jwt`: JSON Web Tokens `eyJ….eyJ….sig` whose header decodes to a JSON
///   object with `"alg"`. Masked `[REDACTED:jwt]`.
/// - `private_key`: PEM private keys, `-----BEGIN … PRIVATE KEY-----` to
///   the matching `-----END …-----` (also with `\n` escaped, as in JSON),
///   or to the end of the base64 lines when the END line is missing.
///   Masked `[REDACTED:private_key]`.
/// - `api_key`: vendor API tokens with a recognisable prefix: `sk-…`
///   (OpenAI, Anthropic), `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_`/`github_pat_`
///   (GitHub), `xoxb-`/`xoxp-`/… and `xapp-` (Slack), `sk_live_`/`rk_live_`
///   and `_test_` (Stripe), `AIza` (Google), `glpat-` (GitLab), `npm_`,
///   `hf_` (Hugging Face), `SG.` (SendGrid), `pypi-`. Masked
///   `[REDACTED:api_key]`.
/// - `url_password`: the password in a URL's user info,
///   `postgres://app:s3cret@db` → `postgres://app:[REDACTED:url_password]@db`.
/// - `bearer_token`: the token after `Bearer ` (16 or more token
///   characters, with a letter and a digit). Masked `[REDACTED:bearer_token]`.
pub fn builtin_detector_names() -> &'static [&'static str] {
    &builtin::NAMES
}

/// The built-in presets: `contact` (email, phone), `personal` (ssn, email,
/// phone), `payment` (card, iban), `secrets` (aws_key, jwt, private_key,
/// api_key) and `all` (every built-in detector).
pub fn builtin_presets() -> &'static [(&'static str, &'static [&'static str])] {
    builtin::PRESETS
}

/// Why a masker (or a detector list) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// A name that is neither a detector nor a preset.
    #[error("unknown detector `{name}`: {}", known_names(.defined))]
    UnknownDetector {
        name: String,
        /// The custom detectors and presets the policy defines, if any.
        defined: Vec<String>,
    },
    /// A custom detector whose pattern does not compile.
    #[error(
        "detector `{name}`: the pattern is not a valid regex: {message}\n\
         (patterns use Rust regex syntax, https://docs.rs/regex/latest/regex/#syntax: \
         classes, repetitions, groups, `(?i)` flags and named groups work; \
         look-around and backreferences do not)"
    )]
    BadPattern { name: String, message: String },
    /// A custom detector whose pattern matches the empty string.
    #[error(
        "detector `{name}`: the pattern `{pattern}` matches the empty string; \
         a detector must match at least one character (use `+` rather than `*`)"
    )]
    EmptyPattern { name: String, pattern: String },
    /// A custom detector name that cannot be used in `[REDACTED:<name>]`.
    #[error("detector name `{0}`: use 1 to 64 ASCII letters, digits, `_` or `-`")]
    BadName(String),
    /// A checksum name other than `luhn` or `mod97`.
    #[error("unknown checksum `{0}`: valid checksums are luhn, mod97")]
    UnknownChecksum(String),
    /// A column glob that is empty or uses a reserved character.
    #[error("column glob `{glob}`: {reason}")]
    BadGlob { glob: String, reason: String },
    /// Presets that include each other.
    #[error("presets include each other: {}", .0.join(" -> "))]
    PresetCycle(Vec<String>),
    /// A custom detector or preset whose name is already taken.
    #[error("`{name}` {reason}")]
    NameConflict { name: String, reason: String },
}

fn known_names(defined: &[String]) -> String {
    let presets: Vec<String> = builtin::PRESETS
        .iter()
        .map(|(name, members)| {
            if *name == "all" {
                "all (every built-in)".to_string()
            } else {
                format!("{name} ({})", members.join(", "))
            }
        })
        .collect();
    let mut text = format!(
        "built-in detectors are {}; built-in presets are {}",
        builtin::NAMES.join(", "),
        presets.join(", ")
    );
    if !defined.is_empty() {
        text.push_str("; this policy defines ");
        text.push_str(&defined.join(", "));
    }
    text
}

/// Turns the names a policy lists into detectors: built-in detector names,
/// built-in preset names, the policy's own presets (`presets`: name and
/// members, which may name built-ins, built-in presets, custom detectors
/// and other presets) and the policy's custom detectors (`custom`: name,
/// pattern, checksum). Presets are expanded in place; each detector
/// appears once, at its first mention. Custom detectors and presets may not
/// reuse a built-in name or each other's; presets that include each other
/// are an error that shows the cycle.
pub fn resolve(
    names: &[String],
    custom: &[(String, String, Option<Checksum>)],
    presets: &[(String, Vec<String>)],
) -> Result<Vec<DetectorSpec>, MaskError> {
    let builtin_taken = |name: &str| {
        if builtin::NAMES.contains(&name) {
            Some("is a built-in detector")
        } else if builtin::PRESETS.iter().any(|(p, _)| *p == name) {
            Some("is a built-in preset")
        } else {
            None
        }
    };
    for (i, (name, _, _)) in custom.iter().enumerate() {
        check_name(name)?;
        if let Some(reason) = builtin_taken(name) {
            return Err(conflict(name, reason));
        }
        if custom[..i].iter().any(|(other, _, _)| other == name) {
            return Err(conflict(name, "is defined twice as a detector"));
        }
    }
    for (i, (name, _)) in presets.iter().enumerate() {
        check_name(name)?;
        if let Some(reason) = builtin_taken(name) {
            return Err(conflict(name, reason));
        }
        if custom.iter().any(|(other, _, _)| other == name) {
            return Err(conflict(name, "is both a detector and a preset"));
        }
        if presets[..i].iter().any(|(other, _)| other == name) {
            return Err(conflict(name, "is defined twice as a preset"));
        }
    }

    let mut resolver = Resolver {
        custom,
        presets,
        out: Vec::new(),
        stack: Vec::new(),
    };
    for name in names {
        resolver.add(name)?;
    }
    Ok(resolver.out)
}

fn conflict(name: &str, reason: &str) -> MaskError {
    MaskError::NameConflict {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

fn check_name(name: &str) -> Result<(), MaskError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(MaskError::BadName(name.to_string()))
    }
}

struct Resolver<'a> {
    custom: &'a [(String, String, Option<Checksum>)],
    presets: &'a [(String, Vec<String>)],
    out: Vec<DetectorSpec>,
    /// The user presets being expanded, outermost first.
    stack: Vec<&'a str>,
}

impl<'a> Resolver<'a> {
    fn push(&mut self, spec: DetectorSpec) {
        if !self.out.contains(&spec) {
            self.out.push(spec);
        }
    }

    fn add(&mut self, name: &'a str) -> Result<(), MaskError> {
        if builtin::NAMES.contains(&name) {
            self.push(DetectorSpec::Builtin(name.to_string()));
        } else if let Some((_, members)) = builtin::PRESETS.iter().find(|(p, _)| *p == name) {
            for member in members.iter() {
                self.push(DetectorSpec::Builtin(member.to_string()));
            }
        } else if let Some((_, pattern, checksum)) = self.custom.iter().find(|(n, _, _)| n == name)
        {
            self.push(DetectorSpec::Custom {
                name: name.to_string(),
                pattern: pattern.clone(),
                checksum: *checksum,
            });
        } else if let Some((_, members)) = self.presets.iter().find(|(n, _)| n == name) {
            if let Some(at) = self.stack.iter().position(|p| *p == name) {
                let mut cycle: Vec<String> =
                    self.stack[at..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_string());
                return Err(MaskError::PresetCycle(cycle));
            }
            self.stack.push(name);
            for member in members {
                self.add(member)?;
            }
            self.stack.pop();
        } else {
            let mut defined: Vec<String> = self.custom.iter().map(|(n, _, _)| n.clone()).collect();
            defined.extend(self.presets.iter().map(|(n, _)| n.clone()));
            return Err(MaskError::UnknownDetector {
                name: name.to_string(),
                defined,
            });
        }
        Ok(())
    }
}

/// Compiled masking for one rule. Cheap to share (`Send + Sync`; clones
/// share the compiled regexes), built once.
#[derive(Clone)]
pub struct Masker {
    columns: Vec<ColumnGlob>,
    /// The values of JSON bodies masked whole.
    json_paths: Vec<JsonPath>,
    detectors: Vec<Detector>,
    /// Every detector's pattern, index for index; `None` without detectors.
    set: Option<RegexSet>,
    /// No finding of any detector is shorter (bytes); shorter texts are not
    /// scanned.
    min_len: usize,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field(
                "columns",
                &self
                    .columns
                    .iter()
                    .map(ColumnGlob::source)
                    .collect::<Vec<_>>(),
            )
            .field("json_paths", &self.json_paths)
            .field(
                "detectors",
                &self
                    .detectors
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(Clone)]
struct Detector {
    name: String,
    regex: Regex,
    /// The index of the group named `value`, when only it is masked.
    value_group: Option<usize>,
    rule: Rule,
}

#[derive(Clone, Copy)]
enum Rule {
    Builtin(Kind),
    Custom(Option<Checksum>),
}

/// One accepted finding: a byte range of the text and its detector.
#[derive(Clone, Copy)]
struct Finding {
    start: usize,
    end: usize,
    detector: usize,
}

/// The column-value mask lengths: a value of up to 8 characters becomes 8
/// `*`, up to 16 becomes 16, up to 32 becomes 32, anything longer 64.
const LENGTH_CLASSES: [usize; 3] = [8, 16, 32];
const LONGEST_CLASS: usize = 64;

impl Masker {
    /// `column_globs`: column-name globs (`*card*`, `ssn`; case-insensitive;
    /// `*` matches any run of characters, `?` one character, everything else
    /// itself; `[ ] { } \` are reserved). `detectors`: what to look for
    /// inside text values; built-in names must be detector names (expand
    /// presets with [`resolve`]), and each detector counts once.
    pub fn new(column_globs: &[String], detectors: &[DetectorSpec]) -> Result<Masker, MaskError> {
        let columns = column_globs
            .iter()
            .map(|g| ColumnGlob::new(g))
            .collect::<Result<Vec<_>, _>>()?;

        let mut compiled: Vec<Detector> = Vec::new();
        let mut patterns: Vec<&str> = Vec::new();
        let mut seen: Vec<&DetectorSpec> = Vec::new();
        let mut min_len = usize::MAX;
        for spec in detectors {
            if seen.contains(&spec) {
                continue;
            }
            seen.push(spec);
            match spec {
                DetectorSpec::Builtin(name) => {
                    let Some(index) = builtin::NAMES.iter().position(|n| n == name) else {
                        return Err(MaskError::UnknownDetector {
                            name: name.clone(),
                            defined: Vec::new(),
                        });
                    };
                    let def = &builtin::BUILTINS[index];
                    let regex = builtin::regex(index);
                    compiled.push(Detector {
                        name: def.name.to_string(),
                        value_group: value_group(&regex),
                        regex,
                        rule: Rule::Builtin(def.kind),
                    });
                    patterns.push(def.pattern);
                    min_len = min_len.min(def.min_len);
                }
                DetectorSpec::Custom {
                    name,
                    pattern,
                    checksum,
                } => {
                    check_name(name)?;
                    let regex = Regex::new(pattern).map_err(|e| MaskError::BadPattern {
                        name: name.clone(),
                        message: e.to_string(),
                    })?;
                    if regex.is_match("") {
                        return Err(MaskError::EmptyPattern {
                            name: name.clone(),
                            pattern: pattern.clone(),
                        });
                    }
                    compiled.push(Detector {
                        name: name.clone(),
                        value_group: value_group(&regex),
                        regex,
                        rule: Rule::Custom(*checksum),
                    });
                    patterns.push(pattern);
                    min_len = 1;
                }
            }
        }

        let set = if patterns.is_empty() {
            None
        } else {
            let set =
                RegexSetBuilder::new(&patterns)
                    .build()
                    .map_err(|e| MaskError::BadPattern {
                        name: compiled
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        message: e.to_string(),
                    })?;
            Some(set)
        };
        Ok(Masker {
            columns,
            json_paths: Vec::new(),
            detectors: compiled,
            set,
            min_len,
        })
    }

    /// Whether a result column of this name is masked whole: whether any of
    /// the column globs matches it, ignoring case.
    pub fn masks_column(&self, name: &str) -> bool {
        self.columns.iter().any(|g| g.matches(name))
    }

    /// The masked form of a whole text value (of a column the policy names).
    ///
    /// - An empty value stays empty.
    /// - A value that the built-in `card` detector recognises as a card
    ///   number (surrounding whitespace aside) keeps its separators and its
    ///   last 4 digits: `4111 1111 1111 1111` → `**** **** **** 1111`.
    /// - A value that the built-in `ssn` detector recognises becomes
    ///   `***-**-****` (or `*** ** ****`): the same for every SSN.
    /// - Any other value becomes a run of `*` that says only its length
    ///   class: 8 for up to 8 characters, 16 for up to 16, 32 for up to 32,
    ///   64 for anything longer.
    ///
    /// These hold whatever detectors the masker has.
    pub fn mask_value(&self, value: &str) -> String {
        if value.is_empty() {
            return String::new();
        }
        let trimmed = value.trim();
        for kind in [Kind::Card, Kind::Ssn] {
            if builtin::is_whole(kind, trimmed) {
                let mut out = String::with_capacity(trimmed.len());
                builtin::mask_into(kind, "", trimmed, &mut out);
                return out;
            }
        }
        let chars = value.chars().count();
        let stars = LENGTH_CLASSES
            .iter()
            .copied()
            .find(|class| chars <= *class)
            .unwrap_or(LONGEST_CLASS);
        "*".repeat(stars)
    }

    /// Every detector finding inside `text` replaced. Returns the new text
    /// (`Cow::Borrowed`, without allocating, when nothing is found) and the
    /// number of findings replaced.
    pub fn mask_text<'a>(&self, text: &'a str) -> (Cow<'a, str>, u32) {
        let Some(set) = &self.set else {
            return (Cow::Borrowed(text), 0);
        };
        if text.len() < self.min_len {
            return (Cow::Borrowed(text), 0);
        }
        let candidates = set.matches(text);
        if !candidates.matched_any() {
            return (Cow::Borrowed(text), 0);
        }
        let mut findings: Vec<Finding> = Vec::new();
        for index in candidates.iter() {
            self.detectors[index].find_all(text, index, &mut findings);
        }
        if findings.is_empty() {
            return (Cow::Borrowed(text), 0);
        }
        if findings.len() > 1 {
            findings.sort_unstable_by_key(|f| (f.start, Reverse(f.end), f.detector));
        }
        let mut out = String::with_capacity(text.len() + 16);
        let mut pos = 0;
        let mut count = 0u32;
        for f in &findings {
            if f.start < pos {
                continue; // overlaps a finding already replaced
            }
            out.push_str(&text[pos..f.start]);
            self.detectors[f.detector].mask_into(&text[f.start..f.end], &mut out);
            pos = f.end;
            count = count.saturating_add(1);
        }
        out.push_str(&text[pos..]);
        (Cow::Owned(out), count)
    }

    /// The same masker, masking whole the values these paths select in JSON
    /// bodies ([`Masker::mask_json`]).
    pub fn with_json_paths(mut self, paths: Vec<JsonPath>) -> Masker {
        self.json_paths = paths;
        self
    }

    /// Masks a JSON document in place: each value a JSON path selects is
    /// masked whole (a string as [`Masker::mask_value`] masks it; a number,
    /// boolean, object or array becomes null, which every JSON schema that
    /// allows a missing value reads), then every string is scanned by the
    /// detectors. Returns how many values were masked.
    pub fn mask_json(&self, value: &mut serde_json::Value) -> u32 {
        use serde_json::Value;
        let mut count = 0u32;
        for path in &self.json_paths {
            path.for_each(value, &mut |v| match v {
                Value::Null => {}
                Value::String(s) => {
                    *s = self.mask_value(s);
                    count += 1;
                }
                other => {
                    *other = Value::Null;
                    count += 1;
                }
            });
        }
        if self.has_detectors() {
            json::for_each_string(value, &mut |s| {
                if let (Cow::Owned(masked), n) = self.mask_text(s) {
                    *s = masked;
                    count += n;
                }
            });
        }
        count
    }

    /// Whether any column is masked by name (so output without column
    /// names, such as COPY's, cannot be masked as the policy says).
    pub fn masks_columns(&self) -> bool {
        !self.columns.is_empty()
    }

    /// Whether there are detectors at all (so callers can skip text
    /// scanning).
    pub fn has_detectors(&self) -> bool {
        !self.detectors.is_empty()
    }
}

fn value_group(regex: &Regex) -> Option<usize> {
    regex.capture_names().position(|name| name == Some("value"))
}

impl Detector {
    /// Pushes every accepted finding of this detector in `text`.
    fn find_all(&self, text: &str, index: usize, out: &mut Vec<Finding>) {
        let mut locations = self.value_group.map(|_| self.regex.capture_locations());
        let mut at = 0;
        while at <= text.len() {
            let (match_start, match_end, start, end) = match (&mut locations, self.value_group) {
                (Some(locs), Some(group)) => {
                    let Some(m) = self.regex.captures_read_at(locs, text, at) else {
                        break;
                    };
                    let (start, end) = locs.get(group).unwrap_or((m.start(), m.end()));
                    (m.start(), m.end(), start, end)
                }
                _ => {
                    let Some(m) = self.regex.find_at(text, at) else {
                        break;
                    };
                    (m.start(), m.end(), m.start(), m.end())
                }
            };
            match self.accept(text, start, end) {
                Some(accepted) if accepted > start => {
                    out.push(Finding {
                        start,
                        end: accepted,
                        detector: index,
                    });
                    // A finding cut short (a card or IBAN followed by more
                    // groups) goes on right after itself.
                    at = if accepted < end {
                        accepted
                    } else {
                        match_end.max(accepted)
                    };
                }
                _ => at = self.restart_after_rejection(text, match_start, match_end),
            }
        }
    }

    /// Where to search again after a rejected candidate. The numbers
    /// (`card`, `ssn`, `phone`, `iban`) and `aws_key` are short and may hide a
    /// finding one group in (`2029 4111 1111 1111 1111`): skip the first
    /// word only. Candidates that can be long (`email`, `jwt`, `api_key`)
    /// and custom ones are skipped whole, as `find_iter` would, so that no
    /// text is searched again and again.
    fn restart_after_rejection(&self, text: &str, match_start: usize, match_end: usize) -> usize {
        match self.rule {
            Rule::Builtin(Kind::Card | Kind::Ssn | Kind::Phone | Kind::Iban | Kind::AwsKey) => {
                after_word(text, match_start)
            }
            Rule::Builtin(_) | Rule::Custom(_) => {
                if match_end > match_start {
                    match_end
                } else {
                    next_char(text, match_start)
                }
            }
        }
    }

    /// The end of the finding in `start..end` (which may be shorter, or for a
    /// private key longer), or `None` when the candidate fails the
    /// detector's checks.
    fn accept(&self, text: &str, start: usize, end: usize) -> Option<usize> {
        if start >= end {
            return None;
        }
        match self.rule {
            Rule::Builtin(kind) => builtin::accept(kind, text, start, end),
            Rule::Custom(None) => Some(end),
            Rule::Custom(Some(checksum)) => checksum.verify(&text[start..end]).then_some(end),
        }
    }

    fn mask_into(&self, found: &str, out: &mut String) {
        match self.rule {
            Rule::Builtin(kind) => builtin::mask_into(kind, &self.name, found, out),
            Rule::Custom(_) => builtin::redact_into(&self.name, out),
        }
    }
}

/// The end of the run of ASCII letters and digits at `at`, or the next
/// character when there is none there.
fn after_word(text: &str, at: usize) -> usize {
    let run = text.as_bytes()[at..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    if run == 0 {
        next_char(text, at)
    } else {
        at + run
    }
}

/// The byte index of the character after the one at `at` (or `len + 1` at
/// the end, which stops the search).
fn next_char(text: &str, at: usize) -> usize {
    match text[at..].chars().next() {
        Some(c) => at + c.len_utf8(),
        None => text.len() + 1,
    }
}
