//! JSON bodies: the values a policy's JSON paths select are masked whole,
//! and every string value is scanned by the detectors.
//!
//! Paths are the part of JSONPath that selects fields, enough to name a
//! field wherever it sits: `$` (the root), `.name` or `['name']` (a member),
//! `[3]` (an element), `[*]` or `.*` (every member or element), and
//! `..name` (a member of that name at any depth).
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

#[derive(Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Member(String),
    Index(usize),
    Every,
    /// `..name`: the member `name` of this value or of any value inside it.
    Anywhere(String),
}

impl fmt::Debug for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a JSON path does not parse; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path:?} is not a JSON path Warden reads ({why}); write e.g. `$.customers[*].card` or `$..ssn`"
)]
pub struct JsonPathError {
    path: String,
    why: String,
}

impl FromStr for JsonPath {
    type Err = JsonPathError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| JsonPathError {
            path: text.to_string(),
            why: why.to_string(),
        };
        let mut rest = text
            .strip_prefix('$')
            .ok_or_else(|| fail("it does not start with `$`"))?;
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("..") {
                let (name, next) = split_name(after);
                if name.is_empty() {
                    return Err(fail("`..` needs a member name after it"));
                }
                steps.push(Step::Anywhere(name.to_string()));
                rest = next;
            } else if let Some(after) = rest.strip_prefix('.') {
                if let Some(next) = after.strip_prefix('*') {
                    steps.push(Step::Every);
                    rest = next;
                    continue;
                }
                let (name, next) = split_name(after);
                if name.is_empty() {
                    return Err(fail("`.` needs a member name after it"));
                }
                steps.push(Step::Member(name.to_string()));
                rest = next;
            } else if let Some(after) = rest.strip_prefix('[') {
                let end = after.find(']').ok_or_else(|| fail("a `[` is not closed"))?;
                let inside = &after[..end];
                rest = &after[end + 1..];
                let quoted = inside
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| inside.strip_prefix('"').and_then(|s| s.strip_suffix('"')));
                steps.push(if inside == "*" {
                    Step::Every
                } else if let Some(name) = quoted {
                    Step::Member(name.to_string())
                } else {
                    Step::Index(
                        inside.parse().map_err(|_| {
                            fail("inside `[ ]` goes `*`, an index or a quoted name")
                        })?,
                    )
                });
            } else {
                return Err(fail("after a step comes `.`, `..` or `[`"));
            }
        }
        Ok(JsonPath {
            text: text.to_string(),
            steps,
        })
    }
}

/// A member name up to the next `.` or `[`.
fn split_name(s: &str) -> (&str, &str) {
    let end = s.find(['.', '[']).unwrap_or(s.len());
    s.split_at(end)
}

impl JsonPath {
    /// Calls `f` on every value the path selects in `root`.
    pub(super) fn for_each(&self, root: &mut Value, f: &mut impl FnMut(&mut Value)) {
        walk(root, &self.steps, f);
    }
}

fn walk(value: &mut Value, steps: &[Step], f: &mut impl FnMut(&mut Value)) {
    let Some((step, rest)) = steps.split_first() else {
        f(value);
        return;
    };
    match step {
        Step::Member(name) => {
            if let Some(v) = value.as_object_mut().and_then(|o| o.get_mut(name)) {
                walk(v, rest, f);
            }
        }
        Step::Index(i) => {
            if let Some(v) = value.as_array_mut().and_then(|a| a.get_mut(*i)) {
                walk(v, rest, f);
            }
        }
        Step::Every => match value {
            Value::Object(o) => o.values_mut().for_each(|v| walk(v, rest, f)),
            Value::Array(a) => a.iter_mut().for_each(|v| walk(v, rest, f)),
            _ => {}
        },
        Step::Anywhere(name) => {
            if let Some(v) = value.as_object_mut().and_then(|o| o.get_mut(name)) {
                walk(v, rest, f);
            }
            // The selected member's own insides are searched too (a
            // `..name` inside a `name`), as JSONPath does.
            match value {
                Value::Object(o) => o.values_mut().for_each(|v| walk(v, steps, f)),
                Value::Array(a) => a.iter_mut().for_each(|v| walk(v, steps, f)),
                _ => {}
            }
        }
    }
}

/// Every string value inside `value` (not object keys).
pub(super) fn for_each_string(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter_mut().for_each(|v| for_each_string(v, f)),
        Value::Object(o) => o.values_mut().for_each(|v| for_each_string(v, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn selected(path: &str, mut value: Value) -> Vec<Value> {
        let path: JsonPath = path.parse().unwrap();
        let mut out = Vec::new();
        path.for_each(&mut value, &mut |v| out.push(v.clone()));
        out
    }

    #[test]
    fn paths_select_members_elements_and_descendants() {
        let doc = json!({
            "customers": [
                {"name": "Ada", "card": "4111", "address": {"zip": "1"}},
                {"name": "Alan", "card": "5555", "address": {"zip": "2"}}
            ],
            "owner": {"card": "6011"}
        });
        assert_eq!(
            selected("$.customers[*].card", doc.clone()),
            [json!("4111"), json!("5555")]
        );
        assert_eq!(
            selected("$.customers[1].name", doc.clone()),
            [json!("Alan")]
        );
        assert_eq!(selected("$['owner']['card']", doc.clone()), [json!("6011")]);
        assert_eq!(
            selected("$..card", doc.clone()),
            [json!("4111"), json!("5555"), json!("6011")]
        );
        assert_eq!(
            selected("$..address.zip", doc.clone()),
            [json!("1"), json!("2")]
        );
        assert_eq!(selected("$.owner.*", doc.clone()), [json!("6011")]);
        assert_eq!(selected("$", json!(3)), [json!(3)]);
        // Nothing there: nothing selected, no error.
        assert!(selected("$.customers[7].card", doc.clone()).is_empty());
        assert!(selected("$.customers.card", doc).is_empty());
    }

    #[test]
    fn mask_json_masks_paths_whole_and_scans_strings() {
        let masker = crate::masking::Masker::new(
            &[],
            &[crate::masking::DetectorSpec::Builtin("card".into())],
        )
        .unwrap()
        .with_json_paths(vec!["$..ssn".parse().unwrap(), "$.meta".parse().unwrap()]);
        let mut doc = json!({
            "ssn": "123-45-6789",
            "meta": {"a": 1},
            "note": "card 4111 1111 1111 1111",
            "n": [{"ssn": 7}, {"ssn": null}]
        });
        assert_eq!(masker.mask_json(&mut doc), 4);
        assert_eq!(
            doc,
            json!({
                "ssn": "***-**-****",
                "meta": null,
                "note": "card **** **** **** 1111",
                "n": [{"ssn": null}, {"ssn": null}]
            })
        );
    }

    #[test]
    fn bad_paths_say_why() {
        for (path, why) in [
            ("customers.card", "does not start with `$`"),
            ("$.", "`.` needs a member name"),
            ("$..", "`..` needs a member name"),
            ("$[1", "a `[` is not closed"),
            ("$[x]", "inside `[ ]` goes"),
            ("$a", "after a step comes"),
        ] {
            let e = path.parse::<JsonPath>().unwrap_err().to_string();
            assert!(e.contains(why), "{path}: {e}");
            assert!(
                e.ends_with("write e.g. `$.customers[*].card` or `$..ssn`"),
                "{e}"
            );
        }
    }
}
