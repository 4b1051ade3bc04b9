//! LLM provider HTTP APIs: OpenAI-style (`chat/completions`, `responses`,
//! `embeddings`, `completions`) and Anthropic-style (`messages`).
//!
//! Pure code, no sockets, no policy, no HTTP library: it works on body bytes.
//! The proxy drives it:
//! - [`recognise`] tells from the method and path which API a request uses;
//! - [`parse_request`] / [`parse_response`] read what the audit records
//!   (model, prompt, text, tool calls, usage);
//! - [`redact_request`] / [`mask_response`] replace detector findings in the
//!   text people and models wrote (never in ids, models, roles or URLs);
//! - [`StreamMasker`] does the same for a streamed (SSE) response, chunk by
//!   chunk, holding back only the text that could still be part of a finding
//!   (see [`stream`] for the hold-back rule and what it costs);
//! - [`error_body`] and [`budget_error_body`] write a denial the
//!   provider's SDK understands.
//!
//! The body shape follows the [`Endpoint`]; the [`Provider`] only chooses
//! the error shape and the event vocabulary of streams. Bodies are read
//! leniently: a field of an unexpected type is skipped rather than refused
//! (the provider refuses malformed bodies itself); only a body that is not a
//! JSON object is an error.

mod error;
mod events;
mod hold;
mod json;
mod request;
mod response;
pub mod sse;
pub mod stream;

#[cfg(test)]
mod stream_tests;
#[cfg(test)]
mod tests;

pub use error::{budget_error_body, error_body};
pub use request::{parse_request, redact_request};
pub use response::{mask_response, parse_response};
pub use stream::StreamMasker;

/// Who defines the API shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    /// `openai` or `anthropic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

/// Which API of the provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI `chat/completions`.
    Chat,
    /// OpenAI `responses`.
    Responses,
    /// OpenAI `embeddings`.
    Embeddings,
    /// OpenAI legacy `completions`.
    Completions,
    /// Anthropic `messages`.
    Messages,
}

impl Endpoint {
    /// `chat`, `responses`, `embeddings`, `completions` or `messages`.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
            Endpoint::Messages => "messages",
        }
    }
}

/// The API of a request, from its method (POST only) and path (a query, if
/// any, and a trailing `/` are ignored). Paths match by their last segments,
/// so any prefix works (`/v1`, `/openai/v1`, `/api/v1`, a gateway's):
/// `…/chat/completions`, `…/responses`, `…/embeddings`, `…/completions`
/// (OpenAI) and `…/messages` (Anthropic).
pub fn recognise(method: &str, path: &str) -> Option<(Provider, Endpoint)> {
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.strip_suffix('/').unwrap_or(path);
    let mut segments = path.rsplit('/');
    let last = segments.next()?;
    match last {
        "completions" if segments.next() == Some("chat") => {
            Some((Provider::OpenAi, Endpoint::Chat))
        }
        "completions" => Some((Provider::OpenAi, Endpoint::Completions)),
        "responses" => Some((Provider::OpenAi, Endpoint::Responses)),
        "embeddings" => Some((Provider::OpenAi, Endpoint::Embeddings)),
        "messages" => Some((Provider::Anthropic, Endpoint::Messages)),
        _ => None,
    }
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The body is not JSON (serde_json's message and where it stopped).
    #[error("the body is not JSON: {message} at line {line} column {column}")]
    NotJson {
        message: String,
        line: usize,
        column: usize,
    },
    /// The body is JSON but not an object.
    #[error("the body is JSON but not an object (it is {found})")]
    NotObject { found: &'static str },
}

impl From<serde_json::Error> for LlmError {
    fn from(e: serde_json::Error) -> LlmError {
        // serde_json's message ends with the position, which has fields here.
        let message = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        LlmError::NotJson {
            message: message
                .strip_suffix(&position)
                .unwrap_or(&message)
                .to_string(),
            line: e.line(),
            column: e.column(),
        }
    }
}

/// What the audit records of a request.
#[derive(Clone, Debug, Default)]
pub struct LlmRequest {
    pub model: Option<String>,
    /// `max_tokens`, `max_completion_tokens` or `max_output_tokens`.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// The prompt as text: one line per message, `role: text` (content
    /// parts' text joined with `\n`; tool calls as `name(arguments)`). A
    /// top-level system prompt (`system`, `instructions`) comes first as
    /// `system: …`; embeddings and completions inputs are `user: …` lines.
    pub prompt: String,
    /// Messages (or input items, or input strings); a top-level system
    /// prompt is not counted.
    pub messages: u32,
}

/// One tool call a model asked for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ToolCall {
    pub id: Option<String>,
    pub name: String,
    /// The arguments as JSON text (Anthropic's `input` serialised).
    pub arguments: String,
}

/// What the audit records of a response.
#[derive(Clone, Debug, Default)]
pub struct LlmResponse {
    pub model: Option<String>,
    /// The assistant text: choices joined with `\n`; an Anthropic message's
    /// text blocks and a responses output's text parts concatenated.
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// `finish_reason` (of the first choice that has one), `stop_reason`, or
    /// the responses API `status`.
    pub finish_reason: Option<String>,
}

/// The body as a JSON object, or why not.
fn parse_object(body: &[u8]) -> Result<serde_json::Value, LlmError> {
    let value: serde_json::Value = serde_json::from_slice(body)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(LlmError::NotObject {
            found: json::kind(&value),
        })
    }
}
