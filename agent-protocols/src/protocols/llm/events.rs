//! What the events of each API's stream mean: which text streams a delta
//! adds to, which events repeat a full text or end streams, and what the
//! audit learns from them (model, usage, tool calls, finish reason).
//!
//! OpenAI chat and legacy completions: `chat.completion.chunk`s with
//! `choices[i].delta` (or `choices[i].text`), a chunk with a `finish_reason`
//! per choice, a usage chunk, `[DONE]`. Anthropic: `message_start`,
//! `content_block_start`/`_delta`/`_stop`, `message_delta`, `message_stop`,
//! `ping`. Responses API: `response.*` events, whose `.done` events and
//! `response.completed` repeat the full texts. Anything else is not
//! understood (and masked as raw text by the caller).

use serde_json::{Value, json};

use super::json::{self, Seg, jpath, str_at, u64_at};
use super::{Endpoint, LlmResponse, ToolCall};

/// What a text stream carries: assistant text, tool-call arguments, or
/// Anthropic thinking (masked too, not audited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Args,
    Thinking,
}

/// A text stream: `a` is the choice, content block or output item index;
/// `b` the tool call index (chat) or content part index (responses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StreamId {
    pub(super) kind: Kind,
    pub(super) a: u64,
    pub(super) b: u64,
}

/// Which streams an event ends.
pub(super) enum End {
    One(StreamId),
    /// Every stream of a choice, content block or output item.
    Index(u64),
    All,
}

impl End {
    pub(super) fn covers(&self, id: StreamId) -> bool {
        match self {
            End::One(one) => *one == id,
            End::Index(a) => id.a == *a,
            End::All => true,
        }
    }
}

/// The audit view of the stream, built as text is released.
pub(super) struct Audit {
    pub(super) response: LlmResponse,
    endpoint: Endpoint,
    /// Text per choice, once a chat stream has more than one.
    choices: Vec<(u64, String)>,
    /// Tool calls by (choice or block or item, tool index).
    tools: Vec<((u64, u64), usize)>,
}

impl Audit {
    pub(super) fn new(endpoint: Endpoint) -> Audit {
        Audit {
            response: LlmResponse::default(),
            endpoint,
            choices: Vec::new(),
            tools: Vec::new(),
        }
    }

    /// Fix-ups once the streams `end` covers ended (`open`: whether a stream
    /// is still open): an Anthropic tool call whose input never streamed has
    /// `{}`, its non-streaming form.
    pub(super) fn ended(&mut self, end: &End, open: impl Fn(StreamId) -> bool) {
        if self.endpoint != Endpoint::Messages {
            return;
        }
        for ((a, b), index) in &self.tools {
            let id = StreamId {
                kind: Kind::Args,
                a: *a,
                b: *b,
            };
            let tool = &mut self.response.tool_calls[*index];
            if end.covers(id) && tool.arguments.is_empty() && !open(id) {
                tool.arguments.push_str("{}");
            }
        }
    }

    pub(super) fn release(&mut self, id: StreamId, text: &str) {
        if text.is_empty() {
            return;
        }
        match id.kind {
            Kind::Text => self.push_text(id.a, text),
            Kind::Args => self.tool((id.a, id.b)).arguments.push_str(text),
            Kind::Thinking => {}
        }
    }

    fn push_text(&mut self, a: u64, text: &str) {
        // Choices are joined; blocks and output parts are one text.
        if !matches!(self.endpoint, Endpoint::Chat | Endpoint::Completions) {
            self.response.text.push_str(text);
            return;
        }
        match self.choices.binary_search_by_key(&a, |(i, _)| *i) {
            Ok(i) => self.choices[i].1.push_str(text),
            Err(i) => self.choices.insert(i, (a, text.to_string())),
        }
        if self.choices.len() == 1 {
            self.response.text.push_str(text);
        } else {
            let texts: Vec<&str> = self.choices.iter().map(|(_, t)| t.as_str()).collect();
            self.response.text = texts.join("\n");
        }
    }

    pub(super) fn tool(&mut self, key: (u64, u64)) -> &mut ToolCall {
        let index = match self.tools.iter().find(|(k, _)| *k == key) {
            Some((_, index)) => *index,
            None => {
                self.response.tool_calls.push(ToolCall::default());
                let index = self.response.tool_calls.len() - 1;
                self.tools.push((key, index));
                index
            }
        };
        &mut self.response.tool_calls[index]
    }

    fn start_tool(&mut self, key: (u64, u64), id: Option<&str>, name: Option<&str>) {
        let tool = self.tool(key);
        if let (None, Some(id)) = (&tool.id, id) {
            tool.id = Some(id.to_string());
        }
        if let Some(name) = name
            && tool.name.is_empty()
        {
            tool.name = name.to_string();
        }
    }

    fn model(&mut self, model: Option<&str>) {
        if let Some(model) = model {
            self.response.model = Some(model.to_string());
        }
    }
}

/// The fields of an output that hold text the model wrote.
const TEXT_KEYS: [&str; 3] = ["text", "arguments", "refusal"];

/// What an understood event holds.
#[derive(Default)]
pub(super) struct Decoded {
    /// Text stream pieces: stream, path of the field, piece.
    pub(super) deltas: Vec<(StreamId, Vec<Seg>, String)>,
    /// Strings that repeat a full text, masked whole.
    pub(super) repeats: Vec<Vec<Seg>>,
    pub(super) ends: Vec<End>,
}

impl Decoded {
    fn delta(&mut self, kind: Kind, a: u64, b: u64, path: Vec<Seg>, piece: &str) {
        self.deltas
            .push((StreamId { kind, a, b }, path, piece.to_string()));
    }

    /// The strings under `base` whose key is `text`, `arguments` or `refusal`.
    fn repeats_under(&mut self, value: &Value, base: Vec<Seg>) {
        if let Some(inner) = json::get(value, &base) {
            json::string_paths(inner, base, &TEXT_KEYS, &mut self.repeats);
        }
    }
}

/// Reads an event: audit fields now, text streams, repeats and ends for
/// the caller. `None` when the event is not understood.
pub(super) fn decode(endpoint: Endpoint, audit: &mut Audit, value: &Value) -> Option<Decoded> {
    match endpoint {
        Endpoint::Chat | Endpoint::Completions => decode_chat(audit, value),
        Endpoint::Responses => decode_responses(audit, value),
        Endpoint::Messages => decode_anthropic(audit, value),
        Endpoint::Embeddings => None,
    }
}

fn decode_chat(audit: &mut Audit, value: &Value) -> Option<Decoded> {
    let choices = value.get("choices")?.as_array()?;
    let mut d = Decoded::default();
    audit.model(str_at(value, "model"));
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        audit.response.input_tokens = u64_at(usage, "prompt_tokens");
        audit.response.output_tokens = u64_at(usage, "completion_tokens");
    }
    for (ci, choice) in choices.iter().enumerate() {
        let a = u64_at(choice, "index").unwrap_or(ci as u64);
        if let Some(text) = str_at(choice, "text") {
            d.delta(Kind::Text, a, 0, jpath!["choices", ci, "text"], text);
        }
        if let Some(delta) = choice.get("delta") {
            if let Some(content) = str_at(delta, "content") {
                d.delta(
                    Kind::Text,
                    a,
                    0,
                    jpath!["choices", ci, "delta", "content"],
                    content,
                );
            }
            let calls = delta.get("tool_calls").and_then(Value::as_array);
            for (ti, call) in calls.into_iter().flatten().enumerate() {
                let b = u64_at(call, "index").unwrap_or(ti as u64);
                let function = call.get("function");
                audit.start_tool(
                    (a, b),
                    str_at(call, "id"),
                    function.and_then(|f| str_at(f, "name")),
                );
                if let Some(arguments) = function.and_then(|f| str_at(f, "arguments")) {
                    let path = jpath![
                        "choices",
                        ci,
                        "delta",
                        "tool_calls",
                        ti,
                        "function",
                        "arguments"
                    ];
                    d.delta(Kind::Args, a, b, path, arguments);
                }
            }
        }
        if let Some(reason) = str_at(choice, "finish_reason") {
            if a == 0 || audit.response.finish_reason.is_none() {
                audit.response.finish_reason = Some(reason.to_string());
            }
            d.ends.push(End::Index(a));
        }
    }
    Some(d)
}

fn decode_anthropic(audit: &mut Audit, value: &Value) -> Option<Decoded> {
    let mut d = Decoded::default();
    let index = u64_at(value, "index").unwrap_or(0);
    match str_at(value, "type")? {
        "message_start" => {
            let message = value.get("message")?;
            audit.model(str_at(message, "model"));
            if let Some(usage) = message.get("usage") {
                audit.response.input_tokens = u64_at(usage, "input_tokens");
                audit.response.output_tokens = u64_at(usage, "output_tokens");
            }
            d.repeats_under(value, jpath!["message", "content"]);
        }
        "content_block_start" => {
            let block = value.get("content_block")?;
            match str_at(block, "type") {
                Some("tool_use") | Some("server_tool_use") => {
                    audit.start_tool((index, 0), str_at(block, "id"), str_at(block, "name"));
                    if let Some(input) = block.get("input") {
                        json::string_paths(
                            input,
                            jpath!["content_block", "input"],
                            &[],
                            &mut d.repeats,
                        );
                    }
                }
                _ => d.repeats_under(value, jpath!["content_block"]),
            }
        }
        "content_block_delta" => {
            let delta = value.get("delta")?;
            match str_at(delta, "type")? {
                "text_delta" => d.delta(
                    Kind::Text,
                    index,
                    0,
                    jpath!["delta", "text"],
                    str_at(delta, "text")?,
                ),
                "input_json_delta" => {
                    let piece = str_at(delta, "partial_json")?;
                    d.delta(Kind::Args, index, 0, jpath!["delta", "partial_json"], piece)
                }
                "thinking_delta" => {
                    let piece = str_at(delta, "thinking")?;
                    d.delta(Kind::Thinking, index, 0, jpath!["delta", "thinking"], piece)
                }
                "signature_delta" => {}
                _ => return None,
            }
        }
        "content_block_stop" => d.ends.push(End::Index(index)),
        "message_delta" => {
            if let Some(reason) = value.get("delta").and_then(|v| str_at(v, "stop_reason")) {
                audit.response.finish_reason = Some(reason.to_string());
            }
            if let Some(usage) = value.get("usage") {
                if let Some(n) = u64_at(usage, "output_tokens") {
                    audit.response.output_tokens = Some(n);
                }
                if let Some(n) = u64_at(usage, "input_tokens") {
                    audit.response.input_tokens = Some(n);
                }
            }
        }
        "message_stop" => d.ends.push(End::All),
        "ping" => {}
        _ => return None,
    }
    Some(d)
}

fn decode_responses(audit: &mut Audit, value: &Value) -> Option<Decoded> {
    let mut d = Decoded::default();
    let output = u64_at(value, "output_index").unwrap_or(0);
    let part = u64_at(value, "content_index").unwrap_or(0);
    let text = StreamId {
        kind: Kind::Text,
        a: output,
        b: part,
    };
    let args = StreamId {
        kind: Kind::Args,
        a: output,
        b: 0,
    };
    match str_at(value, "type")? {
        "response.created" | "response.in_progress" | "response.queued" => {
            audit.model(value.get("response").and_then(|r| str_at(r, "model")));
        }
        "response.output_item.added" => {
            let item = value.get("item")?;
            if str_at(item, "type") == Some("function_call") {
                let id = str_at(item, "call_id").or_else(|| str_at(item, "id"));
                audit.start_tool((output, 0), id, str_at(item, "name"));
            }
            d.repeats_under(value, jpath!["item"]);
        }
        "response.content_part.added" => d.repeats_under(value, jpath!["part"]),
        "response.output_text.delta" => d.delta(
            Kind::Text,
            output,
            part,
            jpath!["delta"],
            str_at(value, "delta")?,
        ),
        "response.function_call_arguments.delta" => d.delta(
            Kind::Args,
            output,
            0,
            jpath!["delta"],
            str_at(value, "delta")?,
        ),
        "response.output_text.done" => {
            d.repeats.push(jpath!["text"]);
            d.ends.push(End::One(text));
        }
        "response.content_part.done" => {
            d.repeats_under(value, jpath!["part"]);
            d.ends.push(End::One(text));
        }
        "response.function_call_arguments.done" => {
            d.repeats.push(jpath!["arguments"]);
            d.ends.push(End::One(args));
        }
        "response.output_item.done" => {
            d.repeats_under(value, jpath!["item"]);
            d.ends.push(End::Index(output));
        }
        "response.completed" | "response.incomplete" | "response.failed" => {
            let response = value.get("response")?;
            audit.model(str_at(response, "model"));
            if let Some(status) = str_at(response, "status") {
                audit.response.finish_reason = Some(status.to_string());
            }
            if let Some(usage) = response.get("usage").filter(|u| u.is_object()) {
                audit.response.input_tokens = u64_at(usage, "input_tokens");
                audit.response.output_tokens = u64_at(usage, "output_tokens");
            }
            d.repeats_under(value, jpath!["response", "output"]);
            d.ends.push(End::All);
        }
        "response.output_text.annotation.added" => {}
        _ => return None,
    }
    Some(d)
}

/// An OpenAI chat (or completions) chunk carrying only `text` for stream
/// `id`, from another chunk of the stream (its `id`, `model`, `created`...):
/// the SDKs concatenate every string of a delta, so the role, tool call id
/// and name of the template must not be repeated.
pub(super) fn chat_chunk(
    template: &str,
    endpoint: Endpoint,
    id: StreamId,
    text: &str,
) -> Option<String> {
    let mut value: Value = serde_json::from_str(template).ok()?;
    let object = value.as_object_mut()?;
    object.remove("usage");
    let choice = match (endpoint, id.kind) {
        (Endpoint::Completions, _) => {
            json!({"index": id.a, "text": text, "logprobs": null, "finish_reason": null})
        }
        (_, Kind::Args) => json!({
            "index": id.a,
            "delta": {"tool_calls": [{"index": id.b, "function": {"arguments": text}}]},
            "logprobs": null,
            "finish_reason": null,
        }),
        _ => {
            json!({"index": id.a, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
        }
    };
    object.insert("choices".to_string(), Value::Array(vec![choice]));
    Some(value.to_string())
}
