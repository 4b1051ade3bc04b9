//! Shell-style globs for workload selectors (exe, comm, unit, cgroup) and
//! for the names in SQL matchers (tables, functions, database, user).
//!
//! `*` matches any run of characters, `/` included; `?` matches one
//! character; `[abc]`, `[a-z]` and `[!a-z]` match one character of (or not
//! of) a set; `\` makes the next character literal. There is nothing else:
//! no `{a,b}`, and `**` means the same as `*`.
//!
//! A glob made with [`Glob::new_caseless`] ignores case: its literals and
//! the text are compared lowercased, and a `[...]` set holds a character
//! when it holds the character in either case.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*` (and `**`)
    Any,
    /// `[...]`: inclusive ranges; a single character is a range of one.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A compiled glob. Matches the whole string, not a part of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
    caseless: bool,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl Glob {
    /// Compiles `pattern`; the error says what is wrong in a few words.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        Glob::compile(pattern, false)
    }

    /// Like [`Glob::new`], for a glob that ignores case ("crm.*" matches
    /// `CRM.Customers`).
    pub fn new_caseless(pattern: &str) -> Result<Glob, String> {
        Glob::compile(pattern, true)
    }

    fn compile(pattern: &str, caseless: bool) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("the pattern is empty".into());
        }
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Any) {
                        tokens.push(Token::Any);
                    }
                }
                '?' => tokens.push(Token::One),
                '\\' => match chars.next() {
                    Some(next) => push_literal(&mut tokens, next, caseless),
                    None => return Err("it ends with a lone \\".into()),
                },
                '[' => {
                    let negated = matches!(chars.peek(), Some('!') | Some('^'));
                    if negated {
                        chars.next();
                    }
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    // A `]` right after `[` or `[!` is a member, as in shells.
                    let mut first = true;
                    while let Some(c) = chars.next() {
                        if c == ']' && !first {
                            closed = true;
                            break;
                        }
                        first = false;
                        let lo = if c == '\\' {
                            chars.next().ok_or("it ends with a lone \\")?
                        } else {
                            c
                        };
                        let mut lookahead = chars.clone();
                        if lookahead.next() == Some('-')
                            && !matches!(lookahead.peek(), Some(']') | None)
                        {
                            chars.next();
                            let hi = match chars.next() {
                                Some('\\') => chars.next().ok_or("it ends with a lone \\")?,
                                Some(hi) => hi,
                                None => break,
                            };
                            if hi < lo {
                                return Err(format!("the range {lo}-{hi} in [...] is backwards"));
                            }
                            ranges.push((lo, hi));
                        } else {
                            ranges.push((lo, lo));
                        }
                    }
                    if !closed {
                        return Err("a [ is not closed by ]".into());
                    }
                    tokens.push(Token::Class { negated, ranges });
                }
                c => push_literal(&mut tokens, c, caseless),
            }
        }
        Ok(Glob {
            source: pattern.to_string(),
            tokens,
            caseless,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        let text: Vec<char> = if self.caseless {
            text.chars().flat_map(char::to_lowercase).collect()
        } else {
            text.chars().collect()
        };
        let (mut t, mut p) = (0usize, 0usize);
        // Where the last `*` was, and where in the text it started matching.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            if p < self.tokens.len() {
                match &self.tokens[p] {
                    Token::Any => {
                        star = Some((p, t));
                        p += 1;
                        continue;
                    }
                    tok if one_matches(tok, text[t], self.caseless) => {
                        p += 1;
                        t += 1;
                        continue;
                    }
                    _ => {}
                }
            }
            match star {
                // Let the last `*` take one more character and retry.
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            }
        }
        self.tokens[p..].iter().all(|tok| *tok == Token::Any)
    }
}

/// A caseless glob keeps its literals lowercased, as it lowercases the text.
fn push_literal(tokens: &mut Vec<Token>, c: char, caseless: bool) {
    if caseless {
        tokens.extend(c.to_lowercase().map(Token::Literal));
    } else {
        tokens.push(Token::Literal(c));
    }
}

/// `c` is lowercased already when `caseless`.
fn one_matches(token: &Token, c: char, caseless: bool) -> bool {
    match token {
        Token::Literal(l) => *l == c,
        Token::One => true,
        Token::Any => false,
        Token::Class { negated, ranges } => {
            let within = |c: char| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi);
            let hit = within(c) || (caseless && c.to_uppercase().any(within));
            hit != *negated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).unwrap().is_match(text)
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("/usr/bin/python3*", "/usr/bin/python3"));
        assert!(m("/usr/bin/python3*", "/usr/bin/python3.12"));
        assert!(!m("/usr/bin/python3*", "/usr/local/bin/python3"));
        assert!(m("*", ""));
        assert!(m("*", "/a/b/c"));
        assert!(m("/kubepods/*", "/kubepods/burstable/pod1/abc"));
        assert!(m("*.service", "support-bot.service"));
        assert!(!m("*.service", "support-bot.scope"));
        assert!(m("a*b*c", "aXXbYYbZc"));
        assert!(!m("a*b*c", "aXXbYYbZ"));
        assert!(m("py?hon", "python"));
        assert!(!m("py?hon", "pyhon"));
        assert!(m("a**b", "a/x/b"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exact2"));
        assert!(!m("exact", "exac"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("python[23]", "python3"));
        assert!(!m("python[23]", "python4"));
        assert!(m("run-[0-9][0-9]", "run-42"));
        assert!(!m("run-[!0-9]", "run-4"));
        assert!(m("run-[!0-9]", "run-x"));
        assert!(m("[]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m(r"a\*b", "a*b"));
        assert!(!m(r"a\*b", "aXb"));
    }

    #[test]
    fn caseless_globs() {
        let c = |pattern: &str, text: &str| Glob::new_caseless(pattern).unwrap().is_match(text);
        assert!(c("crm.*", "CRM.Customers"));
        assert!(c("*CARD*", "public.credit_cards"));
        assert!(c("customers", "Customers"));
        assert!(!c("customers", "crm.customers"));
        assert!(c("[A-C]rm.x", "crm.X"));
        assert!(c("[a-c]rm.x", "CRM.x"));
        assert!(!c("[!a-c]rm.x", "Crm.x"));
        assert!(c(r"\Crm", "crm"));
        assert!(!m("crm.*", "CRM.customers"), "plain globs keep case");
        assert_eq!(Glob::new_caseless("").unwrap_err(), "the pattern is empty");
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(Glob::new("").unwrap_err(), "the pattern is empty");
        assert_eq!(
            Glob::new("/usr/bin/[python").unwrap_err(),
            "a [ is not closed by ]"
        );
        assert_eq!(Glob::new("abc\\").unwrap_err(), "it ends with a lone \\");
        assert_eq!(
            Glob::new("[z-a]").unwrap_err(),
            "the range z-a in [...] is backwards"
        );
    }
}
