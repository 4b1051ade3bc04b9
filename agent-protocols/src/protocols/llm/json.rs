//! JSON helpers: where a value sits in a JSON text, so that a streamed event
//! can have one string replaced while every other byte (key order, spacing,
//! escapes) stays as the provider wrote it; and masking of string values in a
//! parsed [`Value`].

use std::ops::Range;

use serde_json::Value;

use crate::masking::Masker;

/// One step of a path into a JSON value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    pub(crate) fn key(k: &str) -> Seg {
        Seg::Key(k.to_string())
    }
}

/// Builds a path: `jpath![“choices”, 0, “delta”]` style, from keys and indexes.
macro_rules! jpath {
    ($($seg:expr),* $(,)?) => {
        vec![$($crate::protocols::llm::json::IntoSeg::into_seg($seg)),*]
    };
}
pub(crate) use jpath;

pub(crate) trait IntoSeg {
    fn into_seg(self) -> Seg;
}

impl IntoSeg for &str {
    fn into_seg(self) -> Seg {
        Seg::key(self)
    }
}

impl IntoSeg for usize {
    fn into_seg(self) -> Seg {
        Seg::Index(self)
    }
}

impl IntoSeg for Seg {
    fn into_seg(self) -> Seg {
        self
    }
}

/// What kind of JSON value this is, for error messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value at `path`, if any.
pub(crate) fn get<'a>(value: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, seg| match seg {
        Seg::Key(k) => v.get(k.as_str()),
        Seg::Index(i) => v.get(*i),
    })
}

fn get_mut<'a>(value: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, seg| match seg {
        Seg::Key(k) => v.get_mut(k.as_str()),
        Seg::Index(i) => v.get_mut(*i),
    })
}

/// `data` with the string at each path replaced. Replaces the bytes of those
/// values only; when a path cannot be found in the text (it always can in a
/// text serde_json parsed), falls back to re-serialising the whole value.
pub(crate) fn replace_strings(data: &str, edits: &[(Vec<Seg>, String)]) -> String {
    let mut spans: Vec<(Range<usize>, &str)> = Vec::with_capacity(edits.len());
    for (path, value) in edits {
        match locate(data.as_bytes(), path) {
            Some(span) => spans.push((span, value)),
            None => return reserialise(data, edits),
        }
    }
    spans.sort_by_key(|(span, _)| span.start);
    if spans.windows(2).any(|w| w[0].0.end > w[1].0.start) {
        return reserialise(data, edits);
    }
    let mut out = String::with_capacity(data.len() + 64);
    let mut at = 0;
    for (span, value) in spans {
        out.push_str(&data[at..span.start]);
        out.push_str(&serde_json::to_string(value).expect("a string serialises"));
        at = span.end;
    }
    out.push_str(&data[at..]);
    out
}

fn reserialise(data: &str, edits: &[(Vec<Seg>, String)]) -> String {
    let Ok(mut value) = serde_json::from_str::<Value>(data) else {
        return data.to_string();
    };
    for (path, text) in edits {
        if let Some(slot) = get_mut(&mut value, path) {
            *slot = Value::String(text.clone());
        }
    }
    value.to_string()
}

/// The byte range of the value at `path` in the JSON text `json` (of a
/// duplicated key, the last, as serde_json and most parsers keep).
pub(crate) fn locate(json: &[u8], path: &[Seg]) -> Option<Range<usize>> {
    let mut cur = Cursor { b: json, i: 0 };
    cur.ws();
    cur.find(path, 0)
}

/// Deeper than serde_json's own limit (128): what it parsed, we can walk.
const MAX_DEPTH: usize = 256;

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.i += 1)
    }

    /// At a value: the range of the value at `path` below it; the cursor
    /// ends after this value.
    fn find(&mut self, path: &[Seg], depth: usize) -> Option<Range<usize>> {
        self.ws();
        let Some((seg, rest)) = path.split_first() else {
            let start = self.i;
            self.skip(depth)?;
            return Some(start..self.i);
        };
        if depth > MAX_DEPTH {
            return None;
        }
        match (seg, self.peek()?) {
            (Seg::Key(want), b'{') => {
                self.i += 1;
                let mut found = None;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return None;
                }
                loop {
                    self.ws();
                    let key_start = self.i;
                    self.skip_string()?;
                    let key = &self.b[key_start..self.i];
                    self.eat(b':')?;
                    if key_is(key, want) {
                        // A later duplicate wins; a miss below it is a miss.
                        found = self.find(rest, depth + 1);
                    } else {
                        self.ws();
                        self.skip(depth + 1)?;
                    }
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return found;
                        }
                        _ => return None,
                    }
                }
            }
            (Seg::Index(want), b'[') => {
                self.i += 1;
                let mut found = None;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return None;
                }
                let mut index = 0;
                loop {
                    if index == *want {
                        found = self.find(rest, depth + 1);
                    } else {
                        self.ws();
                        self.skip(depth + 1)?;
                    }
                    index += 1;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return found;
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }

    /// Skips the value at the cursor.
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'"' => self.skip_string(),
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.peek()? == close {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    if open == b'{' {
                        self.ws();
                        self.skip_string()?;
                        self.eat(b':')?;
                    }
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b if b == close => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            _ => {
                let start = self.i;
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\r' | b'\n') {
                        break;
                    }
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }

    fn skip_string(&mut self) -> Option<()> {
        if self.peek()? != b'"' {
            return None;
        }
        self.i += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }
}

/// Whether the JSON string literal `raw` (with its quotes) is `want`.
fn key_is(raw: &[u8], want: &str) -> bool {
    let inner = &raw[1..raw.len() - 1];
    if inner.contains(&b'\\') {
        serde_json::from_slice::<String>(raw).is_ok_and(|k| k == want)
    } else {
        inner == want.as_bytes()
    }
}

/// Masks a string value in place; adds the findings to `count`.
pub(crate) fn mask_string(value: &mut Value, masker: &Masker, count: &mut u32) {
    if let Value::String(text) = value {
        let (masked, n) = masker.mask_text(text);
        if n > 0 {
            *text = masked.into_owned();
            *count = count.saturating_add(n);
        }
    }
}

/// Masks every string inside `value` (values, not keys).
pub(crate) fn mask_all_strings(value: &mut Value, masker: &Masker, count: &mut u32) {
    match value {
        Value::String(_) => mask_string(value, masker, count),
        Value::Array(items) => {
            for item in items {
                mask_all_strings(item, masker, count);
            }
        }
        Value::Object(map) => {
            for (_, item) in map.iter_mut() {
                mask_all_strings(item, masker, count);
            }
        }
        _ => {}
    }
}

/// Paths (below `base`) of the strings inside `value` whose key is one of
/// `keys`, or of every string when `keys` is empty.
pub(crate) fn string_paths(value: &Value, base: Vec<Seg>, keys: &[&str], out: &mut Vec<Vec<Seg>>) {
    match value {
        Value::String(_) if keys.is_empty() => out.push(base),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let mut path = base.clone();
                path.push(Seg::Index(i));
                string_paths(item, path, keys, out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let mut path = base.clone();
                path.push(Seg::key(k));
                if item.is_string() && keys.contains(&k.as_str()) {
                    out.push(path);
                } else {
                    string_paths(item, path, keys, out);
                }
            }
        }
        _ => {}
    }
}

/// A `u64` field.
pub(crate) fn u64_at(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}

/// A string field.
pub(crate) fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(data: &str, path: Vec<Seg>) -> Option<Range<usize>> {
        locate(data.as_bytes(), &path)
    }

    #[test]
    fn locates_values_and_keeps_other_bytes() {
        let data = r#"{"id":"x","choices":[{"index":0,"delta":{"content":"a\"b"}},{"delta" : {"content" :"c"}}]}"#;
        let span = find(data, jpath!["choices", 0, "delta", "content"]).unwrap();
        assert_eq!(&data[span], r#""a\"b""#);
        let span = find(data, jpath!["choices", 1, "delta", "content"]).unwrap();
        assert_eq!(&data[span], r#""c""#);
        assert!(find(data, jpath!["choices", 2]).is_none());
        assert!(find(data, jpath!["nope"]).is_none());

        let out = replace_strings(
            data,
            &[(jpath!["choices", 1, "delta", "content"], "é\n".into())],
        );
        assert_eq!(
            out,
            r#"{"id":"x","choices":[{"index":0,"delta":{"content":"a\"b"}},{"delta" : {"content" :"é\n"}}]}"#
        );
    }

    #[test]
    fn escaped_and_duplicate_keys() {
        let data = r#"{"t\u0065xt":"one","text":"two"}"#;
        let span = find(data, jpath!["text"]).unwrap();
        assert_eq!(&data[span], r#""two""#);
        let value: Value = serde_json::from_str(data).unwrap();
        assert_eq!(value["text"], "two");
    }

    #[test]
    fn string_paths_by_key() {
        let value: Value =
            serde_json::from_str(r#"{"a":[{"text":"x","id":"y"},{"arguments":"z"}],"text":1}"#)
                .unwrap();
        let mut out = Vec::new();
        string_paths(&value, Vec::new(), &["text", "arguments"], &mut out);
        assert_eq!(
            out,
            vec![jpath!["a", 0, "text"], jpath!["a", 1, "arguments"]]
        );
    }
}
