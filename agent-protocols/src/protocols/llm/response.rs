//! Non-streaming response bodies: what the audit records of them, and
//! masking of what the model wrote (its text and tool-call arguments).

use serde_json::Value;

use super::json::{mask_all_strings, mask_string, str_at, u64_at};
use super::{Endpoint, LlmError, LlmResponse, Provider, ToolCall, parse_object};
use crate::masking::Masker;

/// Reads a response body of `endpoint` (the endpoint decides the shape).
pub fn parse_response(
    provider: Provider,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<LlmResponse, LlmError> {
    let _ = provider;
    let value = parse_object(body)?;
    let mut resp = LlmResponse {
        model: str_at(&value, "model").map(str::to_string),
        ..LlmResponse::default()
    };
    let usage = value.get("usage");
    match endpoint {
        Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => {
            resp.input_tokens = usage.and_then(|u| u64_at(u, "prompt_tokens"));
            resp.output_tokens = usage.and_then(|u| u64_at(u, "completion_tokens"));
            let mut texts = Vec::new();
            for choice in value
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let message = choice.get("message");
                let text = message
                    .and_then(|m| str_at(m, "content"))
                    .or_else(|| str_at(choice, "text"));
                if let Some(text) = text {
                    texts.push(text);
                }
                if resp.finish_reason.is_none() {
                    resp.finish_reason = str_at(choice, "finish_reason").map(str::to_string);
                }
                let Some(message) = message else { continue };
                let calls = message.get("tool_calls").and_then(Value::as_array);
                for call in calls.into_iter().flatten() {
                    let function = call.get("function");
                    resp.tool_calls.push(ToolCall {
                        id: str_at(call, "id").map(str::to_string),
                        name: function
                            .and_then(|f| str_at(f, "name"))
                            .unwrap_or("")
                            .to_string(),
                        arguments: function
                            .and_then(|f| str_at(f, "arguments"))
                            .unwrap_or("")
                            .to_string(),
                    });
                }
            }
            resp.text = texts.join("\n");
        }
        Endpoint::Responses => {
            resp.input_tokens = usage.and_then(|u| u64_at(u, "input_tokens"));
            resp.output_tokens = usage.and_then(|u| u64_at(u, "output_tokens"));
            resp.finish_reason = str_at(&value, "status").map(str::to_string);
            let output = value.get("output").and_then(Value::as_array);
            for item in output.into_iter().flatten() {
                match str_at(item, "type") {
                    Some("message") => {
                        let parts = item.get("content").and_then(Value::as_array);
                        for part in parts.into_iter().flatten() {
                            if str_at(part, "type") == Some("output_text")
                                && let Some(text) = str_at(part, "text")
                            {
                                resp.text.push_str(text);
                            }
                        }
                    }
                    Some("function_call") => resp.tool_calls.push(ToolCall {
                        id: str_at(item, "call_id")
                            .or_else(|| str_at(item, "id"))
                            .map(str::to_string),
                        name: str_at(item, "name").unwrap_or("").to_string(),
                        arguments: str_at(item, "arguments").unwrap_or("").to_string(),
                    }),
                    _ => {}
                }
            }
        }
        Endpoint::Messages => {
            resp.input_tokens = usage.and_then(|u| u64_at(u, "input_tokens"));
            resp.output_tokens = usage.and_then(|u| u64_at(u, "output_tokens"));
            resp.finish_reason = str_at(&value, "stop_reason").map(str::to_string);
            let blocks = value.get("content").and_then(Value::as_array);
            for block in blocks.into_iter().flatten() {
                match str_at(block, "type") {
                    Some("text") => resp.text.push_str(str_at(block, "text").unwrap_or("")),
                    Some("tool_use") => resp.tool_calls.push(ToolCall {
                        id: str_at(block, "id").map(str::to_string),
                        name: str_at(block, "name").unwrap_or("").to_string(),
                        arguments: block.get("input").map(Value::to_string).unwrap_or_default(),
                    }),
                    _ => {}
                }
            }
        }
    }
    Ok(resp)
}

/// Replaces every detector finding in what the model wrote: assistant text
/// and tool-call arguments (OpenAI's JSON text; the string values of an
/// Anthropic `input`). Same contract as [`super::redact_request`]: `Ok(None)`
/// when nothing was found, otherwise the re-serialised body (keys may be
/// reordered) and the number of findings.
pub fn mask_response(
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
        Endpoint::Chat | Endpoint::Completions => {
            if let Some(Value::Array(choices)) = value.get_mut("choices") {
                for choice in choices {
                    if let Some(text) = choice.get_mut("text") {
                        mask_string(text, masker, &mut count);
                    }
                    let Some(message) = choice.get_mut("message") else {
                        continue;
                    };
                    for key in ["content", "refusal"] {
                        if let Some(text) = message.get_mut(key) {
                            mask_string(text, masker, &mut count);
                        }
                    }
                    if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
                        for call in calls {
                            if let Some(arguments) = call.pointer_mut("/function/arguments") {
                                mask_string(arguments, masker, &mut count);
                            }
                        }
                    }
                }
            }
        }
        Endpoint::Embeddings => {}
        Endpoint::Responses => {
            if let Some(Value::Array(output)) = value.get_mut("output") {
                for item in output {
                    mask_output_item(item, masker, &mut count);
                }
            }
        }
        Endpoint::Messages => {
            if let Some(Value::Array(blocks)) = value.get_mut("content") {
                for block in blocks {
                    match str_at(block, "type") {
                        Some("text") => {
                            if let Some(text) = block.get_mut("text") {
                                mask_string(text, masker, &mut count);
                            }
                        }
                        Some("tool_use") => {
                            if let Some(input) = block.get_mut("input") {
                                mask_all_strings(input, masker, &mut count);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    if count == 0 {
        return Ok(None);
    }
    let body = serde_json::to_vec(&value).expect("a JSON value serialises");
    Ok(Some((body, count)))
}

/// A responses API output item: message text and refusals, function-call
/// arguments.
fn mask_output_item(item: &mut Value, masker: &Masker, count: &mut u32) {
    match str_at(item, "type") {
        Some("message") => {
            if let Some(Value::Array(parts)) = item.get_mut("content") {
                for part in parts {
                    for key in ["text", "refusal"] {
                        if let Some(text) = part.get_mut(key) {
                            mask_string(text, masker, count);
                        }
                    }
                }
            }
        }
        Some("function_call") => {
            if let Some(arguments) = item.get_mut("arguments") {
                mask_string(arguments, masker, count);
            }
        }
        _ => {}
    }
}
