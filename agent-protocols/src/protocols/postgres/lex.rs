//! A small lexer following the server's own rules, for two jobs: cutting a
//! simple-query string into statements exactly where the server does, and
//! fingerprints.
//!
//! It knows what hides a `;` from the server: quoted strings (`'...'`,
//! `E'...'` with backslash escapes, `$tag$...$tag$`), quoted identifiers,
//! `--` and nested `/* */` comments, parentheses (CREATE RULE actions) and
//! `BEGIN ATOMIC ... END` bodies of CREATE FUNCTION/PROCEDURE. It assumes
//! `standard_conforming_strings = on` (the default since PostgreSQL 9.1): with
//! it off, a backslash also escapes in `'...'`, and the lexer may cut a string
//! the server would not, which yields an extra statement, never a hidden one.

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Space,
    Comment,
    /// A keyword or unquoted identifier.
    Word,
    /// A `"quoted"` identifier.
    QuotedIdent,
    /// A string literal of any form.
    Str,
    Number,
    /// `$1`.
    Param,
    /// An operator such as `=`, `<>`, `||`, `->>`.
    Op,
    /// `( ) [ ] , ; . :: :` or another single character.
    Punct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_op_char(b: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&b)
}

/// The end of a quoted run starting after its opening quote at `i`: `''`
/// (or `""`) is an escaped quote; with `backslash`, `\` escapes the next byte.
fn quoted_end(s: &[u8], mut i: usize, quote: u8, backslash: bool) -> usize {
    while i < s.len() {
        let b = s[i];
        if backslash && b == b'\\' {
            i += 2;
        } else if b == quote {
            if s.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    s.len()
}

/// A dollar-quote delimiter (`$$` or `$tag$`) at `i`, as its length.
fn dollar_tag(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if s.get(j).is_some_and(|&b| is_ident_start(b)) {
        while s.get(j).is_some_and(|&b| is_ident_cont(b) && b != b'$') {
            j += 1;
        }
    }
    (s.get(j) == Some(&b'$')).then_some(j + 1 - i)
}

/// Splits `sql` into tokens; every byte belongs to exactly one token. An
/// unterminated string, identifier or comment runs to the end.
pub(super) fn tokens(sql: &str) -> Vec<Token> {
    let s = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let start = i;
        let b = s[i];
        let next = s.get(i + 1).copied();
        let kind = if b.is_ascii_whitespace() || b == 0x0b {
            while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == 0x0b) {
                i += 1;
            }
            Kind::Space
        } else if b == b'-' && next == Some(b'-') {
            while i < s.len() && s[i] != b'\n' && s[i] != b'\r' {
                i += 1;
            }
            Kind::Comment
        } else if b == b'/' && next == Some(b'*') {
            let mut depth = 0usize;
            while i < s.len() {
                if s[i] == b'/' && s.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && s.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            Kind::Comment
        } else if b == b'\'' {
            i = quoted_end(s, i + 1, b'\'', false);
            Kind::Str
        } else if (b == b'e' || b == b'E') && next == Some(b'\'') {
            i = quoted_end(s, i + 2, b'\'', true);
            Kind::Str
        } else if matches!(b, b'b' | b'B' | b'x' | b'X' | b'n' | b'N') && next == Some(b'\'') {
            i = quoted_end(s, i + 2, b'\'', false);
            Kind::Str
        } else if (b == b'u' || b == b'U') && next == Some(b'&') && s.get(i + 2) == Some(&b'\'') {
            i = quoted_end(s, i + 3, b'\'', false);
            Kind::Str
        } else if (b == b'u' || b == b'U') && next == Some(b'&') && s.get(i + 2) == Some(&b'"') {
            i = quoted_end(s, i + 3, b'"', false);
            Kind::QuotedIdent
        } else if b == b'"' {
            i = quoted_end(s, i + 1, b'"', false);
            Kind::QuotedIdent
        } else if b == b'$' && next.is_some_and(|n| n.is_ascii_digit()) {
            i += 1;
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
            Kind::Param
        } else if b == b'$' && dollar_tag(s, i).is_some() {
            let n = dollar_tag(s, i).unwrap_or(1);
            let tag = &s[i..i + n];
            i += n;
            match s[i..].windows(n).position(|w| w == tag) {
                Some(p) => i += p + n,
                None => i = s.len(),
            }
            Kind::Str
        } else if b.is_ascii_digit() || (b == b'.' && next.is_some_and(|n| n.is_ascii_digit())) {
            i += 1;
            while i < s.len() {
                let c = s[i];
                let exponent_sign = (c == b'+' || c == b'-')
                    && matches!(s[i - 1], b'e' | b'E')
                    && s.get(i + 1).is_some_and(|d| d.is_ascii_digit());
                if !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || exponent_sign) {
                    break;
                }
                i += 1;
            }
            Kind::Number
        } else if is_ident_start(b) {
            while i < s.len() && is_ident_cont(s[i]) {
                i += 1;
            }
            Kind::Word
        } else if is_op_char(b) {
            while i < s.len() && is_op_char(s[i]) {
                // A comment starts inside an operator: it ends the operator.
                if i > start
                    && ((s[i] == b'-' && s.get(i + 1) == Some(&b'-'))
                        || (s[i] == b'/' && s.get(i + 1) == Some(&b'*')))
                {
                    break;
                }
                i += 1;
            }
            // As the server: a multi-character operator cannot end in + or -
            // unless it holds one of ~ ! @ # % ^ & | ` ? (so `=-1` is `=`, `-1`).
            let op = &s[start..i];
            if op.len() > 1 && !op.iter().any(|c| b"~!@#%^&|`?".contains(c)) {
                while i > start + 1 && matches!(s[i - 1], b'+' | b'-') {
                    i -= 1;
                }
            }
            Kind::Op
        } else if b == b':' && next == Some(b':') {
            i += 2;
            Kind::Punct
        } else {
            // ASCII only: bytes >= 0x80 start words.
            i += 1;
            Kind::Punct
        };
        out.push(Token {
            kind,
            start,
            end: i,
        });
    }
    out
}

fn significant(t: &Token) -> bool {
    !matches!(t.kind, Kind::Space | Kind::Comment)
}

/// Cuts a simple-query string into its statements, as the server does: at
/// each `;` outside strings, comments, parentheses and `BEGIN ATOMIC`
/// bodies. Pieces with nothing but blanks and comments are left out; each
/// piece is trimmed of surrounding whitespace.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let toks = tokens(sql);
    let mut out = Vec::new();
    let mut piece_start = 0;
    let mut has_content = false;
    let mut parens = 0usize;
    let mut atomic = 0usize;
    let mut first_word: Option<&str> = None;
    let mut prev_word: Option<&str> = None;
    for t in &toks {
        if !significant(t) {
            continue;
        }
        let text = &sql[t.start..t.end];
        match t.kind {
            Kind::Punct if text == ";" && parens == 0 && atomic == 0 => {
                if has_content {
                    out.push(trim_space(&sql[piece_start..t.start]));
                }
                piece_start = t.end;
                has_content = false;
                first_word = None;
                prev_word = None;
                continue;
            }
            Kind::Punct if text == "(" => parens += 1,
            Kind::Punct if text == ")" => parens = parens.saturating_sub(1),
            Kind::Word => {
                let is = |word: &str| text.eq_ignore_ascii_case(word);
                if first_word.is_none() && !has_content {
                    first_word = Some(text);
                }
                if first_word.is_some_and(|f| f.eq_ignore_ascii_case("create")) {
                    let opens = (is("atomic")
                        && prev_word.is_some_and(|p| p.eq_ignore_ascii_case("begin")))
                        || (atomic > 0 && is("case"));
                    if opens {
                        atomic += 1;
                    } else if atomic > 0 && is("end") {
                        atomic -= 1;
                    }
                }
                prev_word = Some(text);
                has_content = true;
                continue;
            }
            _ => {}
        }
        prev_word = None;
        has_content = true;
    }
    if has_content {
        out.push(trim_space(&sql[piece_start..]));
    }
    out
}

/// `s` without the whitespace around it that the lexer (as the server)
/// calls space: ASCII blanks and `\v`. Not `str::trim`, which also takes
/// Unicode spaces: the server reads those as identifier characters, and a
/// piece of nothing but them came out empty.
fn trim_space(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b')
}

/// How hard a statement is on a recursive parser, estimated from its tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Complexity {
    /// Nesting that makes the parser recurse: open parentheses and brackets,
    /// open CASEs, JOINs waiting for their ON, runs of prefix operators.
    pub nesting: usize,
    /// The longest run of tokens not separated by a comma, summed over the
    /// open parentheses: a bound on how deep an operator chain's tree goes.
    pub chain: usize,
}

pub(super) fn complexity(sql: &str) -> Complexity {
    let mut out = Complexity::default();
    let mut depth = 0usize;
    let mut cases = 0usize;
    let mut joins = 0usize;
    let mut run = 0usize;
    // Tokens in the current comma-separated segment, per open parenthesis.
    let mut segments: Vec<usize> = vec![0];
    let mut chain = 0usize;
    let mut prev_word = "";
    for t in tokens(sql).iter().filter(|t| significant(t)) {
        let text = &sql[t.start..t.end];
        match (t.kind, text) {
            (Kind::Punct, "(" | "[") => {
                depth += 1;
                segments.push(0);
            }
            (Kind::Punct, ")" | "]") => {
                if depth > 0 {
                    depth -= 1;
                    chain -= segments.pop().unwrap_or(0);
                }
            }
            (Kind::Punct, "," | ";") => {
                if let Some(last) = segments.last_mut() {
                    chain -= *last;
                    *last = 0;
                }
            }
            _ => {
                if let Some(last) = segments.last_mut() {
                    *last += 1;
                    chain += 1;
                }
            }
        }
        let word = if t.kind == Kind::Word { text } else { "" };
        let is = |w: &str| word.eq_ignore_ascii_case(w);
        if is("case") {
            cases += 1;
        } else if is("end") {
            cases = cases.saturating_sub(1);
        } else if is("join")
            && !prev_word.eq_ignore_ascii_case("cross")
            && !prev_word.eq_ignore_ascii_case("natural")
        {
            joins += 1;
        } else if is("on") || is("using") {
            joins = joins.saturating_sub(1);
        }
        if is("not") || t.kind == Kind::Op {
            run += 1;
        } else {
            run = 0;
        }
        prev_word = word;
        out.nesting = out.nesting.max(depth + cases + joins + run);
        out.chain = out.chain.max(chain);
    }
    out
}

/// Keywords after which `(` keeps a space and `-` before a number is a sign.
const KEYWORDS: &[&str] = &[
    "all",
    "and",
    "any",
    "as",
    "between",
    "by",
    "case",
    "else",
    "exists",
    "from",
    "having",
    "in",
    "into",
    "is",
    "join",
    "like",
    "limit",
    "not",
    "offset",
    "on",
    "or",
    "over",
    "returning",
    "select",
    "set",
    "some",
    "then",
    "using",
    "values",
    "when",
    "where",
    "with",
];

/// A normalised form of `sql` that groups statements differing only in
/// literal values: literals and `$n` parameters become `?`, a sign before a
/// number is folded into it, lists of literals (`IN (1, 2, 3)`, `VALUES
/// (1), (2)`) collapse to one `(?)`, comments go, whitespace becomes single
/// spaces, keywords and unquoted identifiers are lowercased (the server
/// folds them too; quoted identifiers stay as written). Statements are
/// separated by `; `.
pub fn fingerprint(sql: &str) -> String {
    split_statements(sql)
        .into_iter()
        .map(fingerprint_one)
        .collect::<Vec<_>>()
        .join("; ")
}

fn fingerprint_one(sql: &str) -> String {
    let toks: Vec<Token> = tokens(sql).into_iter().filter(significant).collect();
    let mut words: Vec<String> = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let text = &sql[t.start..t.end];
        let w = match t.kind {
            Kind::Word => text.to_ascii_lowercase(),
            Kind::Str | Kind::Number | Kind::Param => "?".to_string(),
            Kind::Op
                if (text == "-" || text == "+")
                    && toks.get(i + 1).is_some_and(|n| n.kind == Kind::Number)
                    && sign_position(words.last().map(String::as_str)) =>
            {
                i += 1;
                "?".to_string()
            }
            _ => text.to_string(),
        };
        words.push(w);
        i += 1;
    }
    let words = collapse_lists(words);
    join(&words)
}

/// Whether a `-` after `prev` is a sign rather than a subtraction.
fn sign_position(prev: Option<&str>) -> bool {
    match prev {
        None => true,
        Some(p) => {
            matches!(p, "(" | "," | "[" | "::")
                || p.bytes().all(is_op_char)
                || KEYWORDS.contains(&p)
        }
    }
}

/// `( ? , ? , ? )` becomes `( ? )`; after `values`, `(?) , (?) , ...` becomes `(?)`.
fn collapse_lists(words: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i] == "(" {
            let mut j = i + 1;
            let mut ok = words.get(j).is_some_and(|w| w == "?");
            while ok && words.get(j + 1).is_some_and(|w| w == ",") {
                j += 2;
                ok = words.get(j).is_some_and(|w| w == "?");
            }
            if ok && words.get(j + 1).is_some_and(|w| w == ")") {
                let row = out.len() >= 4
                    && out[out.len() - 1] == ","
                    && out[out.len() - 2] == ")"
                    && out[out.len() - 3] == "?"
                    && out[out.len() - 4] == "("
                    && out[..out.len() - 4]
                        .iter()
                        .rev()
                        .find(|w| !matches!(w.as_str(), "(" | ")" | "?" | ","))
                        .is_some_and(|w| w == "values");
                if row {
                    out.pop(); // the comma before this row
                } else {
                    out.extend(["(".to_string(), "?".to_string(), ")".to_string()]);
                }
                i = j + 2;
                continue;
            }
        }
        out.push(words[i].clone());
        i += 1;
    }
    out
}

fn join(words: &[String]) -> String {
    let mut out = String::new();
    let mut prev: Option<&str> = None;
    for w in words {
        let w = w.as_str();
        let space = match prev {
            None => false,
            Some(p) => {
                // `count(`, `t(a, b)`, `x::numeric(`: no space after a name.
                let call = w == "("
                    && p.bytes()
                        .next()
                        .is_some_and(|b| is_ident_start(b) || b == b'"')
                    && !KEYWORDS.contains(&p);
                let subscript = w == "[" && p != "array";
                !matches!(w, "," | ")" | "]" | "." | "::" | ";")
                    && !matches!(p, "(" | "[" | "." | "::")
                    && !call
                    && !subscript
            }
        };
        if space {
            out.push(' ');
        }
        out.push_str(w);
        prev = Some(w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_where_the_server_does() {
        let cases: &[(&str, &[&str])] = &[
            ("select 1", &["select 1"]),
            ("select 1;", &["select 1"]),
            (" select 1 ; select 2 ;; ", &["select 1", "select 2"]),
            ("select ';'; select 2", &["select ';'", "select 2"]),
            ("select 'it''s;'; x", &["select 'it''s;'", "x"]),
            ("select E'\\';'; x", &["select E'\\';'", "x"]),
            ("select '\\'; x", &["select '\\'", "x"]),
            ("select $$;$$; x", &["select $$;$$", "x"]),
            ("select $a$ $$; $a$; x", &["select $a$ $$; $a$", "x"]),
            ("select $1; x", &["select $1", "x"]),
            ("select \"a;b\"; x", &["select \"a;b\"", "x"]),
            ("select 1 -- ; no\n; x", &["select 1 -- ; no", "x"]),
            (
                "select 1 /* ; /* ; */ ; */; x",
                &["select 1 /* ; /* ; */ ; */", "x"],
            ),
            ("select 1; -- only a comment", &["select 1"]),
            ("select 1; /* c */ ;", &["select 1"]),
            (
                "create rule r as on insert to t do also (insert into a values (1); delete from b); x",
                &[
                    "create rule r as on insert to t do also (insert into a values (1); delete from b)",
                    "x",
                ],
            ),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT 3",
                &[
                    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END",
                    "SELECT 3",
                ],
            ),
            ("begin; select 1; end", &["begin", "select 1", "end"]),
            (
                "select 'unterminated; drop table t",
                &["select 'unterminated; drop table t"],
            ),
            ("select 1); drop table t", &["select 1)", "drop table t"]),
            ("", &[]),
            ("  ;  ", &[]),
            ("\x0bselect 1\x0b;\t\x0c", &["select 1"]),
            // The `postgres_frontend` fuzz target's check that no statement
            // is empty: the server reads Unicode spaces as identifier
            // characters, not blanks; trimming them left an empty statement.
            ("\u{a0}", &["\u{a0}"]),
            ("select 1;\u{3000}", &["select 1", "\u{3000}"]),
        ];
        for (sql, want) in cases {
            assert_eq!(&split_statements(sql), want, "{sql}");
        }
    }

    #[test]
    fn tokens_cover_every_byte() {
        let sql = "SELECT é.\"x\", U&'a', b'01', 1.5e-3, $1, a->>'k', x::int -- c\n/* c */";
        let toks = tokens(sql);
        let mut pos = 0;
        for t in &toks {
            assert_eq!(t.start, pos);
            assert!(t.end > t.start);
            assert!(sql.is_char_boundary(t.end));
            pos = t.end;
        }
        assert_eq!(pos, sql.len());
    }

    #[test]
    fn fingerprints() {
        let cases = [
            (
                "SELECT *   FROM Users WHERE id = 42 AND name = 'bob' -- hi",
                "select * from users where id = ? and name = ?",
            ),
            (
                "select * from users where id=$1 and name=E'b\\'ob'",
                "select * from users where id = ? and name = ?",
            ),
            (
                "SELECT a FROM t WHERE id IN (1, 2, 3)",
                "select a from t where id in (?)",
            ),
            (
                "SELECT a FROM t WHERE id IN (7)",
                "select a from t where id in (?)",
            ),
            (
                "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z')",
                "insert into t(a, b) values (?)",
            ),
            ("select -1, x - 1, f(-2.5)", "select ?, x - ?, f(?)"),
            (
                "SELECT \"Name\" FROM \"CRM\".customers c",
                "select \"Name\" from \"CRM\".customers c",
            ),
            ("select count(*)  from t;", "select count(*) from t"),
            ("select 1; select 2", "select ?; select ?"),
            ("select x::numeric(10,2), $$a$$", "select x::numeric(?), ?"),
            ("select date '2020-01-01'", "select date ?"),
            ("select arr[1] from t", "select arr[?] from t"),
        ];
        for (sql, want) in cases {
            assert_eq!(fingerprint(sql), want, "{sql}");
        }
        assert_eq!(
            fingerprint("SELECT a FROM t WHERE id = 1"),
            fingerprint("select  a\nfrom T where ID=999")
        );
    }
}
