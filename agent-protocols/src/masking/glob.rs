//! Column-name globs: `*` matches any run of characters, `?` one character,
//! every other character itself, ignoring case. `[`, `]`, `{`, `}` and `\`
//! are reserved (refused), so that sets and escapes can be added later
//! without changing what an existing glob means.

use super::MaskError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// A lowercased character.
    Char(char),
    /// `?`
    One,
    /// `*` (runs of `*` count as one)
    Any,
}

#[derive(Clone, Debug)]
pub(super) struct ColumnGlob {
    source: String,
    tokens: Vec<Token>,
}

const RESERVED: &[char] = &['[', ']', '{', '}', '\\'];

impl ColumnGlob {
    pub(super) fn new(glob: &str) -> Result<ColumnGlob, MaskError> {
        let bad = |reason: &str| MaskError::BadGlob {
            glob: glob.to_string(),
            reason: reason.to_string(),
        };
        if glob.is_empty() {
            return Err(bad("the glob is empty"));
        }
        if let Some(c) = glob.chars().find(|c| RESERVED.contains(c)) {
            return Err(bad(&format!(
                "`{c}` is reserved: only `*` (any run of characters) and `?` (one character) are wildcards"
            )));
        }
        let mut tokens = Vec::with_capacity(glob.len());
        for c in glob.chars() {
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Any) {
                        tokens.push(Token::Any);
                    }
                }
                '?' => tokens.push(Token::One),
                c => tokens.extend(c.to_lowercase().map(Token::Char)),
            }
        }
        Ok(ColumnGlob {
            source: glob.to_string(),
            tokens,
        })
    }

    pub(super) fn source(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `name` matches, ignoring case.
    pub(super) fn matches(&self, name: &str) -> bool {
        if name.is_ascii() {
            let bytes = name.as_bytes();
            wildcard(&self.tokens, bytes.len(), |i| {
                char::from(bytes[i].to_ascii_lowercase())
            })
        } else {
            let chars: Vec<char> = name.chars().flat_map(char::to_lowercase).collect();
            wildcard(&self.tokens, chars.len(), |i| chars[i])
        }
    }
}

/// Matches `tokens` against the `len` characters `at(0..len)`: the usual
/// linear-time two-pointer matcher that backtracks to the last `*` only.
fn wildcard(tokens: &[Token], len: usize, at: impl Fn(usize) -> char) -> bool {
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < len {
        match tokens.get(t) {
            Some(Token::Any) => {
                star = Some((t, i));
                t += 1;
            }
            Some(Token::One) => {
                t += 1;
                i += 1;
            }
            Some(Token::Char(c)) if *c == at(i) => {
                t += 1;
                i += 1;
            }
            _ => match star {
                Some((star_t, star_i)) => {
                    t = star_t + 1;
                    i = star_i + 1;
                    star = Some((star_t, star_i + 1));
                }
                None => return false,
            },
        }
    }
    tokens[t..].iter().all(|token| *token == Token::Any)
}
