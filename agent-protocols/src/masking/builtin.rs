//! The built-in detectors: their patterns, the checks a candidate must pass,
//! and their masked forms. `docs/masking.md` describes them for users.
//!
//! A pattern finds candidates; [`accept`] then checks the candidate in its
//! text (checksums, number ranges, the characters around it) and may cut it
//! shorter (a card or IBAN followed by more digit groups) or longer (a
//! private key to its END line).
//!
//! The patterns use no Unicode word boundary (which would make the lazy DFA
//! of the masker's `RegexSet` give up on non-ASCII text): the boundary
//! before a finding is checked in [`accept`] (where a `\n` escape counts as
//! one), the one after it with `(?-u:\b)` or in [`accept`].

use std::sync::LazyLock;

use regex::Regex;

use super::check;

/// What a built-in detector is; selects its checks and its masked form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Card,
    Ssn,
    Email,
    Phone,
    Iban,
    AwsKey,
    Jwt,
    PrivateKey,
    ApiKey,
    UrlPassword,
    BearerToken,
}

pub(super) struct Builtin {
    pub(super) name: &'static str,
    pub(super) kind: Kind,
    pub(super) pattern: &'static str,
    /// No finding is shorter (in bytes): texts shorter than the shortest
    /// of a masker's detectors are not scanned at all.
    pub(super) min_len: usize,
}

/// 13–19 digits, contiguous or a group of 4 then 2–4 groups of 3–6, split by
/// spaces or dashes.
const CARD: &str = r"(?:[0-9]{13,19}|[0-9]{4}(?:[\x20-][0-9]{3,6}){2,4})(?-u:\b)";

/// `123-45-6789` or `123 45 6789`.
const SSN: &str = r"[0-9]{3}(?:-[0-9]{2}-|\x20[0-9]{2}\x20)[0-9]{4}(?-u:\b)";

const EMAIL: &str = r"[\p{L}\p{N}._%+-]+@[\p{L}\p{N}-]+(?:\.[\p{L}\p{N}-]+)*\.\p{L}{2,24}";

/// `+` and a country code, at most one parenthesised group, then digits with
/// optional single separators; or a North American number.
const PHONE: &str = concat!(
    r"\+[1-9][0-9]{0,3}(?:[\x20.-]?\([0-9]{1,4}\))?(?:[\x20.-]?[0-9]){5,14}(?-u:\b)",
    r"|\([2-9][0-9]{2}\)\x20?[2-9][0-9]{2}[\x20.-][0-9]{4}(?-u:\b)",
    r"|(?:1[\x20.-])?[2-9][0-9]{2}[\x20.-][2-9][0-9]{2}[\x20.-][0-9]{4}(?-u:\b)",
);

/// Country, check digits, then the BBAN contiguous or in groups of 4 (the
/// last of 1–3).
const IBAN: &str =
    r"[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?:\x20[A-Z0-9]{4}){2,7}(?:\x20[A-Z0-9]{1,3})?)(?-u:\b)";

const AWS_KEY: &str = concat!(
    r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|AKPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}(?-u:\b)",
    r#"|(?i-u:(?:aws_?)?secret_?access_?key)["']?[\x20\t]*[:=][\x20\t]*["']?(?P<value>[A-Za-z0-9/+]{40})"#,
);

const JWT: &str = r"eyJ[A-Za-z0-9_-]{2,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*";

/// The BEGIN line of a PEM private key and the base64 or `Name: value`
/// lines after it (line breaks may be escaped as in JSON); [`accept`]
/// extends it to the END line when there is one.
const PRIVATE_KEY: &str = concat!(
    r"-----BEGIN[\x20A-Z0-9]*\x20PRIVATE\x20KEY(?:\x20BLOCK)?-----",
    r"(?:[\x20\t]*(?:\r?\n|\\r\\n|\\n)(?:[A-Za-z0-9+/=]*|[A-Za-z-]+:[^\r\n\\]*))*",
);

const API_KEY: &str = concat!(
    r"(?:sk-[A-Za-z0-9_-]{20,}",
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}",
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}",
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",
    r"|AIza[A-Za-z0-9_-]{35}|glpat-[A-Za-z0-9_-]{20,}|npm_[A-Za-z0-9]{36}",
    r"|hf_[A-Za-z0-9]{30,}|SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}",
    r"|pypi-[A-Za-z0-9_-]{50,})",
);

const URL_PASSWORD: &str = r"(?-u:\b)[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]+:(?P<value>[^\s/?#@]+)@";

const BEARER_TOKEN: &str = r"(?-u:\b)(?i-u:bearer)[\x20\t]+(?P<value>[A-Za-z0-9._~+/-]{16,}=*)";

pub(super) const BUILTINS: [Builtin; 11] = [
    Builtin {
        name: "card",
        kind: Kind::Card,
        pattern: CARD,
        min_len: 13,
    },
    Builtin {
        name: "ssn",
        kind: Kind::Ssn,
        pattern: SSN,
        min_len: 11,
    },
    Builtin {
        name: "email",
        kind: Kind::Email,
        pattern: EMAIL,
        min_len: 6,
    },
    Builtin {
        name: "phone",
        kind: Kind::Phone,
        pattern: PHONE,
        min_len: 9,
    },
    Builtin {
        name: "iban",
        kind: Kind::Iban,
        pattern: IBAN,
        min_len: 15,
    },
    Builtin {
        name: "aws_key",
        kind: Kind::AwsKey,
        pattern: AWS_KEY,
        min_len: 20,
    },
    Builtin {
        name: "jwt",
        kind: Kind::Jwt,
        pattern: JWT,
        min_len: 12,
    },
    Builtin {
        name: "private_key",
        kind: Kind::PrivateKey,
        pattern: PRIVATE_KEY,
        min_len: 27,
    },
    Builtin {
        name: "api_key",
        kind: Kind::ApiKey,
        pattern: API_KEY,
        min_len: 15,
    },
    Builtin {
        name: "url_password",
        kind: Kind::UrlPassword,
        pattern: URL_PASSWORD,
        min_len: 8,
    },
    Builtin {
        name: "bearer_token",
        kind: Kind::BearerToken,
        pattern: BEARER_TOKEN,
        min_len: 23,
    },
];

pub(super) const NAMES: [&str; 11] = [
    "card",
    "ssn",
    "email",
    "phone",
    "iban",
    "aws_key",
    "jwt",
    "private_key",
    "api_key",
    "url_password",
    "bearer_token",
];

pub(super) const PRESETS: &[(&str, &[&str])] = &[
    ("contact", &["email", "phone"]),
    ("personal", &["ssn", "email", "phone"]),
    ("payment", &["card", "iban"]),
    ("secrets", &["aws_key", "jwt", "private_key", "api_key"]),
    ("all", &NAMES),
];

static REGEXES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    BUILTINS
        .iter()
        .map(|b| Regex::new(b.pattern).expect("built-in patterns compile"))
        .collect()
});

/// The compiled pattern of `BUILTINS[index]` (compiled once per process;
/// clones share it).
pub(super) fn regex(index: usize) -> Regex {
    REGEXES[index].clone()
}

fn regex_of(kind: Kind) -> &'static Regex {
    let index = BUILTINS
        .iter()
        .position(|b| b.kind == kind)
        .expect("every kind is built in");
    &REGEXES[index]
}

/// Whether all of `value` is one finding of `kind` (for column values).
pub(super) fn is_whole(kind: Kind, value: &str) -> bool {
    match regex_of(kind).find(value) {
        Some(m) if m.start() == 0 && m.end() == value.len() => {
            accept(kind, value, 0, value.len()) == Some(value.len())
        }
        _ => false,
    }
}

/// Checks the candidate `text[start..end]`; returns the end of the finding
/// (`end`, or earlier for a card or IBAN cut short), or `None`.
pub(super) fn accept(kind: Kind, text: &str, start: usize, end: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let found = &bytes[start..end];
    match kind {
        Kind::Card | Kind::Ssn | Kind::Iban | Kind::AwsKey | Kind::Jwt | Kind::ApiKey
            if !starts_clean(bytes, start) =>
        {
            None
        }
        Kind::Card => accept_card(bytes, start, end),
        Kind::Ssn => (ssn_ok(found) && numeric_context_ok(bytes, start, end)).then_some(end),
        Kind::Email => {
            // Like a word boundary after the top-level domain.
            let after = text[end..].chars().next();
            (!matches!(after, Some(c) if c.is_alphanumeric() || c == '_')).then_some(end)
        }
        Kind::Phone => phone_ok(bytes, start, end).then_some(end),
        Kind::Iban => accept_iban(bytes, start, end),
        Kind::AwsKey => {
            // A secret value (40 characters; a key id has 20) must not run
            // on into more key characters.
            let after = bytes.get(end).copied();
            let runs_on = matches!(after, Some(b) if b.is_ascii_alphanumeric() || b == b'/' || b == b'+' || b == b'=');
            (found.len() != 40 || !runs_on).then_some(end)
        }
        Kind::Jwt => (!token_char_after(bytes, end) && jwt_header_ok(found)).then_some(end),
        Kind::PrivateKey => Some(accept_private_key(text, start, end)),
        Kind::ApiKey => (!token_char_after(bytes, end) && api_key_ok(found)).then_some(end),
        Kind::UrlPassword => Some(end),
        Kind::BearerToken => {
            let has_digit = found.iter().any(u8::is_ascii_digit);
            let has_letter = found.iter().any(u8::is_ascii_alphabetic);
            (has_digit && has_letter).then_some(end)
        }
    }
}

/// Appends the masked form of `found` (a finding of `kind`) to `out`.
pub(super) fn mask_into(kind: Kind, name: &str, found: &str, out: &mut String) {
    match kind {
        Kind::Card => {
            let digits = found.bytes().filter(u8::is_ascii_digit).count();
            let mut seen = 0;
            for c in found.chars() {
                if c.is_ascii_digit() {
                    seen += 1;
                    out.push(if seen + 4 > digits { c } else { '*' });
                } else {
                    out.push(c);
                }
            }
        }
        Kind::Ssn | Kind::Phone => {
            out.extend(
                found
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '*' } else { c }),
            );
        }
        Kind::Email => {
            let (local, domain) = found.rsplit_once('@').unwrap_or(("", found));
            if local.chars().count() >= 3 {
                out.extend(local.chars().next());
            }
            out.push_str("***@");
            out.push_str(domain);
        }
        Kind::Iban => {
            for (i, c) in found.chars().enumerate() {
                out.push(if i < 2 || c == ' ' { c } else { '*' });
            }
        }
        Kind::AwsKey
        | Kind::Jwt
        | Kind::PrivateKey
        | Kind::ApiKey
        | Kind::UrlPassword
        | Kind::BearerToken => redact_into(name, out),
    }
}

/// `[REDACTED:<name>]`
pub(super) fn redact_into(name: &str, out: &mut String) {
    out.push_str("[REDACTED:");
    out.push_str(name);
    out.push(']');
}

/// Like an ASCII word boundary before `start` (the patterns leave it to this
/// check), except that a JSON or C escape counts as a boundary: `\n4111…`,
/// `\tsk-…` start clean.
fn starts_clean(bytes: &[u8], start: usize) -> bool {
    match start.checked_sub(1).map(|i| bytes[i]) {
        None => true,
        Some(b'n' | b't' | b'r') => start >= 2 && bytes[start - 2] == b'\\',
        Some(b) => !(b.is_ascii_alphanumeric() || b == b'_'),
    }
}

/// False when the number at `start..end` is glued to more digits by `.`,
/// `-`, `/` or `:` (a decimal, a date, an IP address, a dashed or dotted
/// id): `2024-123-45-6789`, `3.4111111111111111`, `10.415.555.2671`.
fn numeric_context_ok(bytes: &[u8], start: usize, end: usize) -> bool {
    let glue = |b: u8| matches!(b, b'.' | b'-' | b'/' | b':');
    let before = start >= 2 && glue(bytes[start - 1]) && bytes[start - 2].is_ascii_digit();
    let after = end + 1 < bytes.len() && glue(bytes[end]) && bytes[end + 1].is_ascii_digit();
    !before && !after
}

/// How far an END line is looked for after a BEGIN line: PEM private keys
/// are a few KiB (an 8192-bit RSA key about 6.5 KiB).
const PEM_WINDOW: usize = 64 * 1024;

/// The end of the PEM block that starts at `start`: its END line when the
/// next `-----` after the BEGIN line (within [`PEM_WINDOW`]) starts one
/// with a private-key label, otherwise the BEGIN line and the key lines
/// after it. Stopping at the next `-----` keeps a text of many BEGIN lines
/// linear.
fn accept_private_key(text: &str, start: usize, end: usize) -> usize {
    const BEGIN: &str = "-----BEGIN";
    let header_end = match text[start + BEGIN.len()..end].find("-----") {
        Some(at) => start + BEGIN.len() + at + 5,
        None => return end,
    };
    let mut window_end = (header_end + PEM_WINDOW).min(text.len());
    while !text.is_char_boundary(window_end) {
        window_end -= 1;
    }
    if let Some(at) = text[header_end..window_end].find("-----") {
        let dashes = header_end + at;
        if let Some(label_and_rest) = text[dashes..].strip_prefix("-----END") {
            let close = label_and_rest
                .get(..64)
                .unwrap_or(label_and_rest)
                .find("-----");
            if let Some(close) = close {
                let label = &label_and_rest[..close];
                let label_ok = label
                    .bytes()
                    .all(|b| b == b' ' || b.is_ascii_uppercase() || b.is_ascii_digit())
                    && (label.ends_with(" PRIVATE KEY") || label.ends_with(" PRIVATE KEY BLOCK"));
                if label_ok {
                    return dashes + "-----END".len() + close + 5;
                }
            }
        }
    }
    private_key_end(text.as_bytes(), start, end)
}

/// A PEM block without its END line ends with its last whole line: a last
/// line that runs on into prose (`MIIE…\nthat is all`) is left out.
fn private_key_end(bytes: &[u8], start: usize, end: usize) -> usize {
    let found = &bytes[start..end];
    let line_ends = matches!(
        bytes.get(end),
        None | Some(b'\r' | b'\n' | b'\\' | b'"' | b'\'')
    );
    let whole_lines = if found.ends_with(b"-----") || line_ends {
        found
    } else {
        &found[..last_line_break(found).unwrap_or(found.len())]
    };
    start + trim_line_breaks(whole_lines)
}

/// The start of the last line break in `found`, raw (`\n`, `\r\n`) or
/// escaped as in JSON (`\\n`, `\\r\\n`).
fn last_line_break(found: &[u8]) -> Option<usize> {
    let mut i = found.len();
    while i > 0 {
        i -= 1;
        if found[i] == b'\n' {
            return Some(if i > 0 && found[i - 1] == b'\r' {
                i - 1
            } else {
                i
            });
        }
        if found[i] == b'n' && i > 0 && found[i - 1] == b'\\' {
            let escaped = i - 1;
            return Some(if escaped >= 2 && &found[escaped - 2..escaped] == b"\\r" {
                escaped - 2
            } else {
                escaped
            });
        }
    }
    None
}

/// The length of `found` without trailing blanks and line breaks (raw or
/// escaped), which stay outside the finding.
fn trim_line_breaks(found: &[u8]) -> usize {
    let mut n = found.len();
    loop {
        if n > 0 && matches!(found[n - 1], b'\r' | b'\n' | b' ' | b'\t') {
            n -= 1;
        } else if n >= 2 && found[n - 2] == b'\\' && matches!(found[n - 1], b'n' | b'r') {
            n -= 2;
        } else {
            return n;
        }
    }
}

fn token_char_after(bytes: &[u8], end: usize) -> bool {
    matches!(bytes.get(end), Some(b) if b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// The longest prefix of the candidate that ends at a digit group and is a
/// card number: 13–19 digits, one kind of separator, first digit 2–6, not
/// all one digit, Luhn-valid, not glued to more digits.
fn accept_card(bytes: &[u8], start: usize, end: usize) -> Option<usize> {
    let found = &bytes[start..end];
    let mut separator = None;
    for &b in found {
        if !b.is_ascii_digit() {
            match separator {
                None => separator = Some(b),
                Some(s) if s != b => return None,
                Some(_) => {}
            }
        }
    }
    let total = found.iter().filter(|b| b.is_ascii_digit()).count();
    let mut digits = total;
    // Group ends, from the whole candidate down.
    let mut i = found.len();
    loop {
        let prefix = &found[..i];
        if (13..=19).contains(&digits)
            && card_number_ok(prefix)
            && numeric_context_ok(bytes, start, start + i)
        {
            return Some(start + i);
        }
        // Step back over the last group and its separator (none when the
        // number is contiguous).
        separator?;
        let sep = prefix.iter().rposition(|b| !b.is_ascii_digit())?;
        digits -= i - sep - 1;
        i = sep;
        if digits < 13 {
            return None;
        }
    }
}

fn card_number_ok(number: &[u8]) -> bool {
    let first = number[0];
    (b'2'..=b'6').contains(&first)
        && number.iter().any(|b| b.is_ascii_digit() && *b != first)
        && check::luhn(number)
}

/// `AAA-GG-SSSS`: area not 000, 666 or 900–999; group not 00; serial not
/// 0000; not one of the two numbers known from advertising.
fn ssn_ok(found: &[u8]) -> bool {
    let area = &found[0..3];
    let group = &found[4..6];
    let serial = &found[7..11];
    area != b"000"
        && area != b"666"
        && area[0] != b'9'
        && group != b"00"
        && serial != b"0000"
        && !(area == b"078" && group == b"05" && serial == b"1120")
        && !(area == b"219" && group == b"09" && serial == b"9999")
}

fn phone_ok(bytes: &[u8], start: usize, end: usize) -> bool {
    let found = &bytes[start..end];
    let before = start.checked_sub(1).map(|i| bytes[i]);
    match found[0] {
        b'+' => {
            let digits = found.iter().filter(|b| b.is_ascii_digit()).count();
            (8..=15).contains(&digits)
                && before != Some(b'+')
                && starts_clean(bytes, start)
                && numeric_context_ok(bytes, start, end)
        }
        b'(' => numeric_context_ok(bytes, start, end),
        _ => {
            // One kind of separator throughout: 415-555-2671, 1.800.555.0199.
            let mut separators = found.iter().filter(|b| !b.is_ascii_digit());
            let first = separators.next();
            separators.all(|b| Some(b) == first)
                && before != Some(b'+')
                && starts_clean(bytes, start)
                && numeric_context_ok(bytes, start, end)
        }
    }
}

/// The candidate cut to its country's IBAN length at a group end, if the
/// country is in the registry and the mod-97 check passes.
fn accept_iban(bytes: &[u8], start: usize, end: usize) -> Option<usize> {
    let found = &bytes[start..end];
    let expected = iban_length(&found[0..2])?;
    let spaced = found.contains(&b' ');
    let mut count = 0;
    let mut cut = None;
    for (i, b) in found.iter().enumerate() {
        if *b != b' ' {
            count += 1;
            if count == expected {
                cut = Some(i + 1);
                break;
            }
        }
    }
    let cut = cut?;
    let at_group_end = cut == found.len() || (spaced && found[cut] == b' ');
    let chars = found[..cut].iter().copied().filter(|b| *b != b' ');
    (at_group_end && check::mod97(chars)).then_some(start + cut)
}

/// The IBAN length of each country in the SWIFT IBAN registry.
fn iban_length(country: &[u8]) -> Option<usize> {
    const LENGTHS: &[(&[u8; 2], usize)] = &[
        (b"AD", 24),
        (b"AE", 23),
        (b"AL", 28),
        (b"AT", 20),
        (b"AZ", 28),
        (b"BA", 20),
        (b"BE", 16),
        (b"BG", 22),
        (b"BH", 22),
        (b"BI", 27),
        (b"BR", 29),
        (b"BY", 28),
        (b"CH", 21),
        (b"CR", 22),
        (b"CY", 28),
        (b"CZ", 24),
        (b"DE", 22),
        (b"DJ", 27),
        (b"DK", 18),
        (b"DO", 28),
        (b"EE", 20),
        (b"EG", 29),
        (b"ES", 24),
        (b"FI", 18),
        (b"FK", 18),
        (b"FO", 18),
        (b"FR", 27),
        (b"GB", 22),
        (b"GE", 22),
        (b"GI", 23),
        (b"GL", 18),
        (b"GR", 27),
        (b"GT", 28),
        (b"HN", 28),
        (b"HR", 21),
        (b"HU", 28),
        (b"IE", 22),
        (b"IL", 23),
        (b"IQ", 23),
        (b"IS", 26),
        (b"IT", 27),
        (b"JO", 30),
        (b"KW", 30),
        (b"KZ", 20),
        (b"LB", 28),
        (b"LC", 32),
        (b"LI", 21),
        (b"LT", 20),
        (b"LU", 20),
        (b"LV", 21),
        (b"LY", 25),
        (b"MC", 27),
        (b"MD", 24),
        (b"ME", 22),
        (b"MK", 19),
        (b"MN", 20),
        (b"MR", 27),
        (b"MT", 31),
        (b"MU", 30),
        (b"NI", 28),
        (b"NL", 18),
        (b"NO", 15),
        (b"OM", 23),
        (b"PK", 24),
        (b"PL", 28),
        (b"PS", 29),
        (b"PT", 25),
        (b"QA", 29),
        (b"RO", 24),
        (b"RS", 22),
        (b"RU", 33),
        (b"SA", 24),
        (b"SC", 31),
        (b"SD", 18),
        (b"SE", 24),
        (b"SI", 19),
        (b"SK", 24),
        (b"SM", 27),
        (b"SO", 23),
        (b"ST", 25),
        (b"SV", 28),
        (b"TL", 23),
        (b"TN", 24),
        (b"TR", 26),
        (b"UA", 29),
        (b"VA", 22),
        (b"VG", 24),
        (b"XK", 20),
        (b"YE", 30),
    ];
    LENGTHS
        .iter()
        .find(|(code, _)| code.as_slice() == country)
        .map(|(_, len)| *len)
}

/// The header (first part) decodes to a JSON object naming `"alg"`.
fn jwt_header_ok(token: &[u8]) -> bool {
    let Some(dot) = token.iter().position(|b| *b == b'.') else {
        return false;
    };
    // Headers are short; the first 1024 characters tell.
    let header = &token[..dot.min(1024)];
    match check::base64url_decode(header) {
        Some(json) => json.first() == Some(&b'{') && json.windows(5).any(|w| w == b"\"alg\""),
        None => false,
    }
}

/// Extra checks for the prefixes that could start ordinary words: `sk-`
/// needs a letter, a digit and a run of 16 characters without `-` or `_`
/// (not a slug like `sk-my-long-branch-name-2`); Slack tokens need a digit.
fn api_key_ok(found: &[u8]) -> bool {
    if let Some(body) = found.strip_prefix(b"sk-") {
        let longest_run = body
            .split(|b| *b == b'-' || *b == b'_')
            .map(<[u8]>::len)
            .max()
            .unwrap_or(0);
        body.iter().any(u8::is_ascii_digit)
            && body.iter().any(u8::is_ascii_alphabetic)
            && longest_run >= 16
    } else if found.starts_with(b"xox") || found.starts_with(b"xapp-") {
        found.iter().any(u8::is_ascii_digit)
    } else {
        true
    }
}
