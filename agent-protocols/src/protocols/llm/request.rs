//! Request bodies: what the audit records of them, and prompt redaction.
//!
//! The text that redaction covers is the text people and models wrote:
//! message contents (strings and text parts), system prompts and
//! instructions, `input` and `prompt`, tool results, tool-call arguments
//! (OpenAI's JSON text, Anthropic's `input` values) and embeddings inputs.
//! Ids, model names, roles, tool names and definitions, and image or file
//! references are not text anyone wrote to the model, and are left alone:
//! masking them would break the request without protecting anything.

use serde_json::Value;

use super::json::{mask_all_strings, mask_string, str_at, u64_at};
use super::{Endpoint, LlmError, LlmRequest, Provider, parse_object};
use crate::masking::Masker;

/// Reads a request body of `endpoint` (the endpoint decides the body shape;
/// `provider` is there for symmetry with the other calls).
pub fn parse_request(
    provider: Provider,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<LlmRequest, LlmError> {
    let _ = provider;
    let value = parse_object(body)?;
    let mut req = LlmRequest {
        model: str_at(&value, "model").map(str::to_string),
        max_tokens: ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| u64_at(&value, k)),
        stream: value
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ..LlmRequest::default()
    };
    let mut prompt = Prompt::default();
    match endpoint {
        Endpoint::Chat => {
            for message in array(&value, "messages") {
                prompt.message(message);
            }
        }
        Endpoint::Messages => {
            if let Some(system) = value.get("system") {
                prompt.system(content_text(system));
            }
            for message in array(&value, "messages") {
                prompt.message(message);
            }
        }
        Endpoint::Responses => {
            if let Some(instructions) = str_at(&value, "instructions") {
                prompt.system(instructions.to_string());
            }
            match value.get("input") {
                Some(Value::String(text)) => prompt.line("user", text.clone()),
                Some(Value::Array(items)) => {
                    for item in items {
                        prompt.item(item);
                    }
                }
                _ => {}
            }
        }
        Endpoint::Embeddings => prompt.inputs(value.get("input")),
        Endpoint::Completions => prompt.inputs(value.get("prompt")),
    }
    req.prompt = prompt.text;
    req.messages = prompt.messages;
    Ok(req)
}

/// Replaces every detector finding in the text of a request body.
///
/// `Ok(None)` when nothing was found: the caller forwards the original bytes.
/// Otherwise the new body and the number of findings. The new body is the
/// same JSON re-serialised: serde_json here keeps objects in key order (its
/// `preserve_order` feature is off), so keys may come out reordered and
/// numbers rewritten in their shortest form; providers read JSON, not bytes.
pub fn redact_request(
    provider: Provider,
    endpoint: Endpoint,
    body: &[u8],
    masker: &Masker,
) -> Result<Option<(Vec<u8>, u32)>, LlmError> {
    let _ = provider;
    let mut value = parse_object(body)?;
    if !masker.has_detectors() {
        return Ok(None);
    }
    let mut count = 0u32;
    match endpoint {
        Endpoint::Chat => {
            for message in array_mut(&mut value, "messages") {
                mask_message(message, masker, &mut count);
            }
        }
        Endpoint::Messages => {
            if let Some(system) = value.get_mut("system") {
                mask_content(system, masker, &mut count);
            }
            for message in array_mut(&mut value, "messages") {
                mask_message(message, masker, &mut count);
            }
        }
        Endpoint::Responses => {
            if let Some(instructions) = value.get_mut("instructions") {
                mask_string(instructions, masker, &mut count);
            }
            match value.get_mut("input") {
                Some(Value::Array(items)) => {
                    for item in items {
                        mask_item(item, masker, &mut count);
                    }
                }
                Some(input) => mask_string(input, masker, &mut count),
                None => {}
            }
        }
        Endpoint::Embeddings => mask_inputs(value.get_mut("input"), masker, &mut count),
        Endpoint::Completions => {
            mask_inputs(value.get_mut("prompt"), masker, &mut count);
            if let Some(suffix) = value.get_mut("suffix") {
                mask_string(suffix, masker, &mut count);
            }
        }
    }
    if count == 0 {
        return Ok(None);
    }
    let body = serde_json::to_vec(&value).expect("a JSON value serialises");
    Ok(Some((body, count)))
}

fn array<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn array_mut<'a>(value: &'a mut Value, key: &str) -> &'a mut [Value] {
    match value.get_mut(key) {
        Some(Value::Array(items)) => items,
        _ => &mut [],
    }
}

/// The audit text of a prompt, built line by line.
#[derive(Default)]
struct Prompt {
    text: String,
    messages: u32,
}

impl Prompt {
    fn line(&mut self, role: &str, text: String) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(role);
        self.text.push_str(": ");
        self.text.push_str(&text);
        self.messages = self.messages.saturating_add(1);
    }

    fn system(&mut self, text: String) {
        self.line("system", text);
        self.messages -= 1; // a top-level system prompt is not a message
    }

    /// A chat or Anthropic message: `content` (string or parts/blocks), and
    /// OpenAI tool calls.
    fn message(&mut self, message: &Value) {
        let role = str_at(message, "role").unwrap_or("user");
        let mut text = message.get("content").map(content_text).unwrap_or_default();
        let calls = array(message, "tool_calls")
            .iter()
            .filter_map(|call| call.get("function"))
            .chain(message.get("function_call"));
        for function in calls {
            let name = str_at(function, "name").unwrap_or("");
            let arguments = str_at(function, "arguments").unwrap_or("");
            push_joined(&mut text, &format!("{name}({arguments})"));
        }
        self.line(role, text);
    }

    /// A responses API input item.
    fn item(&mut self, item: &Value) {
        match str_at(item, "type") {
            Some("function_call") | Some("custom_tool_call") => {
                let name = str_at(item, "name").unwrap_or("");
                let arguments = str_at(item, "arguments")
                    .or_else(|| str_at(item, "input"))
                    .unwrap_or("");
                self.line("assistant", format!("{name}({arguments})"));
            }
            Some("function_call_output") | Some("custom_tool_call_output") => {
                let output = item.get("output").map(content_text).unwrap_or_default();
                self.line("tool", output);
            }
            Some("message") | None => self.message(item),
            Some(_) => {} // reasoning, web search calls...: not prompt text
        }
    }

    /// Embeddings `input` or completions `prompt`: a string or strings
    /// (token arrays are not text).
    fn inputs(&mut self, value: Option<&Value>) {
        match value {
            Some(Value::String(text)) => self.line("user", text.clone()),
            Some(Value::Array(items)) => {
                for text in items.iter().filter_map(Value::as_str) {
                    self.line("user", text.to_string());
                }
            }
            _ => {}
        }
    }
}

fn push_joined(text: &mut String, part: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(part);
}

/// The text of a `content` value: a string, or the text of its parts
/// (`text`/`input_text`/`output_text` parts, Anthropic text blocks, tool
/// uses as `name(input)`, tool results' content) joined with `\n`.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match part {
                    Value::String(s) => push_joined(&mut text, s),
                    Value::Object(_) => {
                        if let Some(s) = str_at(part, "text") {
                            push_joined(&mut text, s);
                        } else if str_at(part, "type") == Some("tool_use") {
                            let name = str_at(part, "name").unwrap_or("");
                            let input = part.get("input").map(Value::to_string).unwrap_or_default();
                            push_joined(&mut text, &format!("{name}({input})"));
                        } else if str_at(part, "type") == Some("tool_result") {
                            let inner = part.get("content").map(content_text).unwrap_or_default();
                            push_joined(&mut text, &inner);
                        }
                    }
                    _ => {}
                }
            }
            text
        }
        _ => String::new(),
    }
}

/// A chat or Anthropic message (or a responses message item).
fn mask_message(message: &mut Value, masker: &Masker, count: &mut u32) {
    if let Some(content) = message.get_mut("content") {
        mask_content(content, masker, count);
    }
    if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
        for call in calls {
            if let Some(arguments) = call.pointer_mut("/function/arguments") {
                mask_string(arguments, masker, count);
            }
        }
    }
    if let Some(arguments) = message.pointer_mut("/function_call/arguments") {
        mask_string(arguments, masker, count);
    }
}

/// A `content` value: a string, or parts/blocks.
fn mask_content(content: &mut Value, masker: &Masker, count: &mut u32) {
    match content {
        Value::String(_) => mask_string(content, masker, count),
        Value::Array(parts) => {
            for part in parts {
                if part.is_string() {
                    mask_string(part, masker, count);
                    continue;
                }
                match str_at(part, "type") {
                    Some("tool_use") => {
                        if let Some(input) = part.get_mut("input") {
                            mask_all_strings(input, masker, count);
                        }
                    }
                    Some("tool_result") => {
                        if let Some(inner) = part.get_mut("content") {
                            mask_content(inner, masker, count);
                        }
                    }
                    _ => {
                        // text, input_text, output_text parts; images, files and
                        // audio have no `text`.
                        if let Some(text) = part.get_mut("text") {
                            mask_string(text, masker, count);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// A responses API input item.
fn mask_item(item: &mut Value, masker: &Masker, count: &mut u32) {
    match str_at(item, "type") {
        Some("function_call") => {
            if let Some(arguments) = item.get_mut("arguments") {
                mask_string(arguments, masker, count);
            }
        }
        Some("custom_tool_call") => {
            if let Some(input) = item.get_mut("input") {
                mask_string(input, masker, count);
            }
        }
        Some("function_call_output") | Some("custom_tool_call_output") => {
            if let Some(output) = item.get_mut("output") {
                mask_content(output, masker, count);
            }
        }
        Some("message") | None => mask_message(item, masker, count),
        Some(_) => {}
    }
}

fn mask_inputs(value: Option<&mut Value>, masker: &Masker, count: &mut u32) {
    match value {
        Some(Value::Array(items)) => {
            for item in items {
                mask_string(item, masker, count);
            }
        }
        Some(value) => mask_string(value, masker, count),
        None => {}
    }
}
