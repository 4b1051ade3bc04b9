//! The hold-back rule of streamed text: where the text that can no longer
//! change ends.
//!
//! Streamed text arrives in pieces; a finding split across two pieces must
//! still be found. So the not-yet-sent tail of a text is cut in two: the part
//! before the cut is masked and sent, the part after it is held until more
//! text (or the end) shows what it is. The cut must be a place no finding can
//! span, whatever text comes next; it is the earliest of:
//!
//! 1. the start of the trailing token (after the last whitespace), because
//!    emails, keys, tokens, JWTs and URLs grow from any word; but only after
//!    the token's last *break* character (`, ; ! ? " ' ` < > ) [ ] { } | *` and
//!    non-ASCII punctuation and symbols), which no whitespace-free finding
//!    contains (a `)` only closes a phone's area code, in a group that
//!    rule 2 holds), unless the token holds `://` (a URL's password may
//!    hold anything);
//! 2. the first token with a digit of a trailing chain of tokens joined by
//!    single spaces where *group* characters (digits, capitals, `( ) + . -`)
//!    meet across each space, which is what spaced cards, SSNs, phones and
//!    IBANs are made of (`4111 1111 1111 1111`, `(415) 555-2671`,
//!    `GB82 WEST 1234 …`); a trailing single space continues the chain;
//! 3. the token of a prefix that makes the text after it a finding:
//!    `Bearer` and blanks, an AWS `secret_access_key` name with `:`/`=`
//!    (and again from there, as a cut moved back may land after another
//!    prefix or inside a chain);
//! 4. the start of a PEM private key still open: a `-----BEGIN` whose block
//!    has neither its END line nor a line that cannot be part of a key (and a
//!    cut inside the END line of a closed key moves after it).
//!
//! A cut made this way falls after whitespace, after a break character or
//! after a key's END line, so the held text, masked alone later, is read
//! with the same boundaries as in the whole text (the detectors' checks
//! look at the character before a finding only for letters, digits and
//! `_`). The stream tests check this against whole-text masking on random
//! texts of findings and fillers split at random.
//!
//! The hold is capped: at most [`MAX_HOLD`] bytes (1 KiB, enough for API keys
//! and usual JWTs), or [`MAX_PEM_HOLD`] bytes (16 KiB) while a private key is
//! open. Beyond the cap the oldest held text is sent anyway, masked on its
//! own: a finding longer than the cap is then cut in two, and each part is
//! masked only if it is a finding by itself (a very long JWT keeps its
//! header and payload masked if they come first; the tail of an over-long
//! key or the lines of a key beyond 16 KiB would go out unmasked). Custom
//! detectors are held by the same rule: a custom pattern that spans
//! whitespace or break characters can be missed when the model streams it
//! in pieces.

use std::sync::LazyLock;

use regex::Regex;

/// The most text held back, in bytes, outside a private key.
pub(crate) const MAX_HOLD: usize = 1024;
/// The most text held back, in bytes, while a private key is open.
pub(crate) const MAX_PEM_HOLD: usize = 16 * 1024;

/// Where the held part of `text[from..]` starts: `text[..cut]` can no longer
/// be part of a finding that `text[cut..]` or later text completes. `from`
/// is a previous cut (the rule only looks at `text[from..]`).
pub(crate) fn cut(text: &str, from: usize) -> usize {
    let window = text
        .floor_char_boundary(text.len().saturating_sub(MAX_PEM_HOLD))
        .max(from);
    window + cut_in(&text[window..])
}

fn cut_in(t: &str) -> usize {
    let len = t.len();
    let token = token_start(t, len);
    let mut at = token;
    let tail = &t[token..];
    if !tail.contains("://")
        && let Some((i, c)) = tail.char_indices().rev().find(|&(_, c)| is_break(c))
    {
        at = token + i + c.len_utf8();
    }
    if let Some(chain) = chain_start(t) {
        at = at.min(chain);
    }
    let mut cap = MAX_HOLD;
    if let Some(Pem::Open(begin)) = last_key(t) {
        at = at.min(token_start(t, begin));
        cap = MAX_PEM_HOLD;
    }
    // A cut that lands after a prefix or between two groups of a chain moves
    // back, and again from there (`Bearer x…yBearer 42 `); one inside the END
    // line of a closed key moves after it. Back moves stop at the start, a
    // forward move happens once: this ends.
    loop {
        let mut moved = prefix_start(t, at);
        if let Some(chain) = chain_link(t, moved) {
            moved = moved.min(chain);
        }
        if let Some(end) = inside_closed_key(t, moved) {
            moved = end;
        }
        if moved == at {
            break;
        }
        at = moved;
    }
    if len - at > cap {
        at = t.ceil_char_boundary(len - cap);
    }
    at
}

/// The start of the whitespace-free token that contains (or ends at) `at`.
fn token_start(t: &str, at: usize) -> usize {
    t[..at]
        .char_indices()
        .rev()
        .find(|&(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8())
}

/// Characters no whitespace-free built-in finding contains (URL passwords
/// aside, see rule 1).
fn is_break(c: char) -> bool {
    if c.is_ascii() {
        matches!(
            c,
            ',' | ';'
                | '!'
                | '?'
                | '"'
                | '\''
                | '`'
                | '<'
                | '>'
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
                | '|'
                | '*'
        )
    } else {
        !c.is_alphanumeric()
    }
}

/// What spaced numbers are made of.
fn is_group(b: u8) -> bool {
    b.is_ascii_digit() || b.is_ascii_uppercase() || matches!(b, b'(' | b')' | b'+' | b'.' | b'-')
}

/// The start of the first token with a digit of the trailing chain: tokens
/// joined by single spaces where group characters meet (a spaced number may
/// begin inside a token, `x(415)`, and end inside one, `…7654 32é`). The
/// chain ends with the last token, or with a trailing single space after a
/// token that ends with a group character.
fn chain_start(t: &str) -> Option<usize> {
    let b = t.as_bytes();
    let end = b.len();
    if end >= 2 && b[end - 1] == b' ' && is_group(b[end - 2]) {
        chain_from(t, end - 1)
    } else if end == 0 || b[end - 1].is_ascii_whitespace() {
        None
    } else {
        chain_from(t, end)
    }
}

/// When a cut at `at` would split a chain (it follows a single space
/// between group characters, or is the trailing single space), the start of
/// the chain's first token with a digit.
fn chain_link(t: &str, at: usize) -> Option<usize> {
    let b = t.as_bytes();
    let splits = at >= 2
        && b[at - 1] == b' '
        && is_group(b[at - 2])
        && b.get(at).is_none_or(|&c| is_group(c));
    if splits { chain_from(t, at - 1) } else { None }
}

/// The start of the first token with a digit of the chain whose last token
/// ends at `end`.
fn chain_from(t: &str, mut end: usize) -> Option<usize> {
    let b = t.as_bytes();
    let mut first_digit = None;
    loop {
        let start = token_start(t, end);
        if b[start..end].iter().any(u8::is_ascii_digit) {
            first_digit = Some(start);
        }
        let linked = start >= 2
            && start < end
            && b[start - 1] == b' '
            && is_group(b[start])
            && is_group(b[start - 2]);
        if !linked {
            return first_digit;
        }
        end = start - 1;
    }
}

/// Prefixes that make the text after them a finding, at the end of the text
/// before the cut.
static PREFIX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i-u:bearer[\x20\t]*|(?:aws_?)?secret_?access_?key["']?[\x20\t]*(?:[:=][\x20\t]*["']?)?)$"#,
    )
    .expect("the prefix pattern compiles")
});

/// `at`, or the start of the token of a prefix that ends there.
fn prefix_start(t: &str, at: usize) -> usize {
    let head = &t[..at];
    let from = head.floor_char_boundary(at.saturating_sub(96));
    match PREFIX.find(&head[from..]) {
        Some(m) => token_start(t, from + m.start()),
        None => at,
    }
}

/// The last private key of a text.
#[derive(Clone, Copy)]
enum Pem {
    /// Not over yet: where its `-----BEGIN` is.
    Open(usize),
    /// Its BEGIN and the end of its END line.
    Closed(usize, usize),
}

/// The last `-----BEGIN` of `t`, when it may begin a private key: open (no
/// END line and no line that cannot be part of a key yet), or closed.
fn last_key(t: &str) -> Option<Pem> {
    key_at(t, t.rfind(BEGIN)?)
}

/// When `at` is inside a closed private key (in its END line), the end of it.
fn inside_closed_key(t: &str, at: usize) -> Option<usize> {
    match key_at(t, t[..at].rfind(BEGIN)?)? {
        Pem::Closed(begin, end) if begin < at && at < end => Some(end),
        _ => None,
    }
}

const BEGIN: &str = "-----BEGIN";

/// The private key that may start at `begin` (a `-----BEGIN`).
fn key_at(t: &str, begin: usize) -> Option<Pem> {
    const END: &str = "-----END";
    let after_begin = begin + BEGIN.len();
    let Some(close) = t[after_begin..].find("-----") else {
        return Some(Pem::Open(begin)); // the label is still coming
    };
    if !t[after_begin..after_begin + close].contains("PRIVATE KEY") {
        return None;
    }
    let body_start = after_begin + close + 5;
    let body = &t[body_start..];
    if let Some(end) = body.find(END) {
        let label = body_start + end + END.len();
        return Some(match t[label..].find("-----") {
            Some(close) => Pem::Closed(begin, label + close + 5),
            None => Pem::Open(begin),
        });
    }
    // Complete lines (raw or JSON-escaped breaks) must be key lines.
    let mut lines = body.split('\n').flat_map(|l| l.split("\\n")).peekable();
    while let Some(line) = lines.next() {
        if lines.peek().is_none() {
            break; // the last line is not complete yet
        }
        let line = line.trim_end_matches('\r').trim_end_matches("\\r").trim();
        let base64 = line
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        let header = line.split_once(':').is_some_and(|(name, _)| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
        });
        if !(base64 || header) {
            return None;
        }
    }
    Some(Pem::Open(begin))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The held part of `text`.
    fn held(text: &str) -> &str {
        &text[cut(text, 0)..]
    }

    #[test]
    fn plain_text_is_not_held_after_a_break() {
        assert_eq!(held("The sky is blue.\n"), "");
        assert_eq!(held("Hello, world! "), "");
        assert_eq!(held("Is it?"), "");
        assert_eq!(held("日本語のテキスト。"), "");
    }

    #[test]
    fn trailing_tokens_are_held() {
        assert_eq!(held("Hello world"), "world");
        assert_eq!(held("write to john.doe@exa"), "john.doe@exa");
        assert_eq!(held("key: sk-abc"), "sk-abc");
        assert_eq!(held("say \"eyJhbGci"), "eyJhbGci");
        assert_eq!(held("at postgres://app:p!ss"), "postgres://app:p!ss");
        assert_eq!(held("(see x)"), "");
        assert_eq!(held("call ("), "(");
    }

    #[test]
    fn digit_chains_are_held_from_their_first_group() {
        assert_eq!(held("My card is 4111"), "4111");
        assert_eq!(held("My card is 4111 "), "4111 ");
        assert_eq!(held("My card is 4111 1111 11"), "4111 1111 11");
        assert_eq!(held("call (415) 555"), "(415) 555");
        assert_eq!(held("call x(415) 555-"), "x(415) 555-");
        assert_eq!(
            held("a eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIx.dozjgR8U "),
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIx.dozjgR8U "
        );
        assert_eq!(held("IBAN GB82 WEST 1234"), "GB82 WEST 1234");
        assert_eq!(held("IBAN GB82 WEST "), "GB82 WEST ");
        assert_eq!(held("I AM "), "");
        assert_eq!(held("4111 1111 1111 1111, thanks"), "thanks");
        assert_eq!(held("4111 1111\n"), "");
        assert_eq!(held("4111  "), "");
        assert_eq!(
            held("IBAN GB82 WEST 1234 5698 7654 32é+"),
            "GB82 WEST 1234 5698 7654 32é+"
        );
        assert_eq!(held("IBAN GB82 WEST 1234 5698 7654 32é "), "");
        assert_eq!(held("call (415)555-2671)!"), "(415)555-2671)!");
        assert_eq!(held("Hello 42é "), "");
    }

    #[test]
    fn prefixes_are_held_with_what_follows() {
        assert_eq!(held("Authorization: Bearer "), "Bearer ");
        assert_eq!(held("Authorization: Bearer abc12"), "Bearer abc12");
        assert_eq!(
            held("aws_secret_access_key = wJalr"),
            "aws_secret_access_key = wJalr"
        );
        assert_eq!(
            held("x secret_access_key=\"wJalr"),
            "secret_access_key=\"wJalr"
        );
        assert_eq!(held("SecretAccessKey: "), "SecretAccessKey: ");
        assert_eq!(
            held("a Bearer abcdef1234567890XYZ1Bearer 42 "),
            "Bearer abcdef1234567890XYZ1Bearer 42 "
        );
        assert_eq!(held("a (415) 555-2671-Bearer "), "(415) 555-2671-Bearer ");
    }

    #[test]
    fn open_private_keys_are_held() {
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc";
        assert_eq!(held(&format!("here:\n{key}")), key);
        let escaped = "-----BEGIN PRIVATE KEY-----\\nMIIEow\\nab";
        assert_eq!(held(&format!("k {escaped}")), escaped);
        assert_eq!(held("-----BEGIN PRIV"), "-----BEGIN PRIV");
        let closed = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\nok ";
        assert_eq!(held(closed), "");
        let end = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----";
        assert_eq!(held(end), "");
        assert_eq!(held(&format!("{end}x")), "x");
        assert_eq!(held(&format!("{end}xBearer 日本語")), "xBearer 日本語");
        assert_eq!(held(&end[..end.len() - 1]), &end[..end.len() - 1]);
        let prose = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\nthat was it.\n";
        assert_eq!(held(prose), "");
        assert_eq!(held("-----BEGIN CERTIFICATE-----\nMIIE\n"), "");
    }

    #[test]
    fn the_hold_is_capped() {
        let long = format!("x {}", "a".repeat(3000));
        assert_eq!(held(&long).len(), MAX_HOLD);
        let multibyte = format!("x {}", "é".repeat(3000));
        assert!(held(&multibyte).len() <= MAX_HOLD);
        let key = format!("-----BEGIN PRIVATE KEY-----\n{}", "QUJD\n".repeat(1000));
        assert_eq!(held(&key), key);
        let huge = format!("-----BEGIN PRIVATE KEY-----\n{}", "QUJD\n".repeat(5000));
        // The BEGIN line is beyond the window: the key was released at the cap.
        assert!(held(&huge).len() <= MAX_PEM_HOLD);
    }

    #[test]
    fn only_the_text_after_from_is_looked_at() {
        let text = "4111 1111 ";
        assert_eq!(cut(text, 5), 5);
        assert_eq!(cut(text, 10), 10);
    }
}
