//! Tests of the non-streaming calls: recognise, requests, responses, errors.

use serde_json::{Value, json};

use super::*;
use crate::masking::{DetectorSpec, Masker};

pub(super) fn masker(names: &[&str]) -> Masker {
    let specs: Vec<DetectorSpec> = names
        .iter()
        .map(|n| DetectorSpec::Builtin(n.to_string()))
        .collect();
    Masker::new(&[], &specs).expect("builtin masker")
}

fn all_detectors() -> Masker {
    masker(&[
        "card",
        "ssn",
        "email",
        "phone",
        "iban",
        "aws_key",
        "jwt",
        "private_key",
        "api_key",
        "url_password",
        "bearer_token",
    ])
}

fn body(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

const CARD: &str = "4111 1111 1111 1111";
const MASKED_CARD: &str = "**** **** **** 1111";

// ---- recognise ----

#[test]
fn recognises_paths_with_any_prefix() {
    use Endpoint::*;
    use Provider::*;
    for (path, want) in [
        ("/v1/chat/completions", Some((OpenAi, Chat))),
        ("/openai/v1/chat/completions", Some((OpenAi, Chat))),
        (
            "/api/v1/chat/completions?api-version=2024-06-01",
            Some((OpenAi, Chat)),
        ),
        ("/chat/completions/", Some((OpenAi, Chat))),
        ("/v1/responses", Some((OpenAi, Responses))),
        ("/api/v1/responses", Some((OpenAi, Responses))),
        ("/v1/embeddings", Some((OpenAi, Embeddings))),
        (
            "/openai/deployments/x/embeddings?api-version=1",
            Some((OpenAi, Embeddings)),
        ),
        ("/v1/completions", Some((OpenAi, Completions))),
        ("/completions", Some((OpenAi, Completions))),
        ("/v1/messages", Some((Anthropic, Messages))),
        ("/api/anthropic/v1/messages", Some((Anthropic, Messages))),
        ("/v1/messages/count_tokens", None),
        ("/v1/models", None),
        ("/v1/chat", None),
        ("/v1/mycompletions", None),
        ("/v1/xmessages", None),
        ("", None),
        ("/", None),
    ] {
        assert_eq!(recognise("POST", path), want, "{path}");
    }
    assert_eq!(
        recognise("post", "/v1/messages"),
        Some((Anthropic, Messages))
    );
    for method in ["GET", "PUT", "DELETE", "OPTIONS"] {
        assert_eq!(recognise(method, "/v1/chat/completions"), None, "{method}");
    }
    assert_eq!(Provider::OpenAi.as_str(), "openai");
    assert_eq!(Provider::Anthropic.as_str(), "anthropic");
    let names: Vec<&str> = [Chat, Responses, Embeddings, Completions, Messages]
        .iter()
        .map(|e| e.as_str())
        .collect();
    assert_eq!(
        names,
        ["chat", "responses", "embeddings", "completions", "messages"]
    );
}

// ---- requests ----

#[test]
fn parses_chat_requests_with_string_and_part_contents() {
    let req = body(json!({
        "model": "gpt-4o-mini",
        "max_completion_tokens": 300,
        "stream": true,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "And this?"}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "found"}
        ]
    }));
    let r = parse_request(Provider::OpenAi, Endpoint::Chat, &req).unwrap();
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(r.max_tokens, Some(300));
    assert!(r.stream);
    assert_eq!(r.messages, 4);
    assert_eq!(
        r.prompt,
        "system: Be brief.\nuser: What is in this image?\nAnd this?\nassistant: lookup({\"q\":\"x\"})\ntool: found"
    );

    let legacy = body(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    );
    let r = parse_request(Provider::OpenAi, Endpoint::Chat, &legacy).unwrap();
    assert_eq!(
        (r.max_tokens, r.stream, r.prompt.as_str()),
        (Some(5), false, "user: hi")
    );
}

#[test]
fn parses_responses_requests_with_string_and_list_input() {
    let req = body(json!({"model": "gpt-4.1", "input": "Tell me a joke", "max_output_tokens": 50}));
    let r = parse_request(Provider::OpenAi, Endpoint::Responses, &req).unwrap();
    assert_eq!(r.prompt, "user: Tell me a joke");
    assert_eq!((r.messages, r.max_tokens), (1, Some(50)));

    let req = body(json!({
        "model": "gpt-4.1",
        "instructions": "You are terse.",
        "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and Rome"},
                                                            {"type": "input_image", "image_url": "https://x/y.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
            {"type": "reasoning", "id": "rs_1", "summary": []}
        ]
    }));
    let r = parse_request(Provider::OpenAi, Endpoint::Responses, &req).unwrap();
    assert_eq!(
        r.prompt,
        "system: You are terse.\nuser: Weather in Paris?\nuser: and Rome\nassistant: weather({\"city\":\"Paris\"})\ntool: 18C"
    );
    assert_eq!(r.messages, 4);
}

#[test]
fn parses_embeddings_and_completions_requests() {
    let req = body(json!({"model": "text-embedding-3-small", "input": "hello"}));
    let r = parse_request(Provider::OpenAi, Endpoint::Embeddings, &req).unwrap();
    assert_eq!((r.prompt.as_str(), r.messages), ("user: hello", 1));
    let req = body(json!({"model": "text-embedding-3-small", "input": ["a", "b"]}));
    let r = parse_request(Provider::OpenAi, Endpoint::Embeddings, &req).unwrap();
    assert_eq!((r.prompt.as_str(), r.messages), ("user: a\nuser: b", 2));
    let req = body(json!({"model": "text-embedding-3-small", "input": [[1, 2, 3]]}));
    let r = parse_request(Provider::OpenAi, Endpoint::Embeddings, &req).unwrap();
    assert_eq!((r.prompt.as_str(), r.messages), ("", 0));

    let req =
        body(json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this", "max_tokens": 7}));
    let r = parse_request(Provider::OpenAi, Endpoint::Completions, &req).unwrap();
    assert_eq!(
        (r.prompt.as_str(), r.max_tokens),
        ("user: Say this", Some(7))
    );
}

#[test]
fn parses_anthropic_requests_with_system_string_and_blocks() {
    let req = body(json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "You are a poet.",
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "odes"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "3 odes"}]},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
            ]}
        ]
    }));
    let r = parse_request(Provider::Anthropic, Endpoint::Messages, &req).unwrap();
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!((r.max_tokens, r.messages), (Some(1024), 3));
    assert_eq!(
        r.prompt,
        "system: You are a poet.\nuser: Hello\nassistant: Let me look.\nsearch({\"q\":\"odes\"})\nuser: 3 odes"
    );

    let req = body(json!({
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": true
    }));
    let r = parse_request(Provider::Anthropic, Endpoint::Messages, &req).unwrap();
    assert_eq!(r.prompt, "system: Rule one.\nRule two.\nuser: Hi");
    assert!(r.stream);
    assert_eq!(r.messages, 1);
}

#[test]
fn bodies_that_are_not_json_objects_are_errors() {
    let err = parse_request(Provider::OpenAi, Endpoint::Chat, b"{\"model\": ").unwrap_err();
    match &err {
        LlmError::NotJson { line, column, .. } => assert_eq!((*line, *column), (1, 10)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "the body is not JSON: EOF while parsing a value at line 1 column 10"
    );
    let err = parse_request(Provider::OpenAi, Endpoint::Chat, b"[1]").unwrap_err();
    assert!(
        matches!(err, LlmError::NotObject { found: "an array" }),
        "{err:?}"
    );
    let m = all_detectors();
    assert!(redact_request(Provider::OpenAi, Endpoint::Chat, b"nope", &m).is_err());
    assert!(parse_response(Provider::Anthropic, Endpoint::Messages, b"\"x\"").is_err());
    assert!(mask_response(Provider::Anthropic, Endpoint::Messages, b"", &m).is_err());
}

// ---- redaction ----

#[test]
fn redacts_a_card_in_a_user_message_and_not_in_the_model_name() {
    let m = all_detectors();
    let req = body(json!({
        "model": "ft:gpt-4o:acme:4111111111111111",
        "messages": [
            {"role": "system", "content": "Help."},
            {"role": "user", "content": format!("My card is {CARD}.")},
            {"role": "user", "content": [{"type": "text", "text": "mail bob@example.com"},
                                         {"type": "image_url", "image_url": {"url": "https://x/4111111111111111.png"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_4111111111111111", "type": "function",
                 "function": {"name": "pay", "arguments": format!("{{\"card\":\"{CARD}\"}}")}}
            ]}
        ]
    }));
    let (new, n) = redact_request(Provider::OpenAi, Endpoint::Chat, &req, &m)
        .unwrap()
        .expect("findings");
    assert_eq!(n, 3);
    let v: Value = serde_json::from_slice(&new).unwrap();
    assert_eq!(v["model"], "ft:gpt-4o:acme:4111111111111111");
    assert_eq!(
        v["messages"][1]["content"],
        format!("My card is {MASKED_CARD}.")
    );
    assert_eq!(
        v["messages"][2]["content"][0]["text"],
        "mail b***@example.com"
    );
    assert_eq!(
        v["messages"][2]["content"][1]["image_url"]["url"],
        "https://x/4111111111111111.png"
    );
    assert_eq!(
        v["messages"][3]["tool_calls"][0]["id"],
        "call_4111111111111111"
    );
    assert_eq!(
        v["messages"][3]["tool_calls"][0]["function"]["arguments"],
        format!("{{\"card\":\"{MASKED_CARD}\"}}")
    );
    // The same structure otherwise.
    let mut original: Value = serde_json::from_slice(&req).unwrap();
    original["messages"][1]["content"] = v["messages"][1]["content"].clone();
    original["messages"][2]["content"][0]["text"] = v["messages"][2]["content"][0]["text"].clone();
    original["messages"][3]["tool_calls"][0]["function"]["arguments"] =
        v["messages"][3]["tool_calls"][0]["function"]["arguments"].clone();
    assert_eq!(original, v);
}

#[test]
fn bodies_without_findings_are_left_alone() {
    let m = all_detectors();
    let req = body(
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there, 2024 was fine."}]}),
    );
    assert!(
        redact_request(Provider::OpenAi, Endpoint::Chat, &req, &m)
            .unwrap()
            .is_none()
    );
    let none = Masker::new(&[], &[]).unwrap();
    let req = body(json!({"model": "gpt-4o", "messages": [{"role": "user", "content": CARD}]}));
    assert!(
        redact_request(Provider::OpenAi, Endpoint::Chat, &req, &none)
            .unwrap()
            .is_none()
    );
}

#[test]
fn redacts_every_kind_of_prompt_text() {
    let m = all_detectors();
    let req = body(json!({
        "model": "claude",
        "system": [{"type": "text", "text": format!("card {CARD}")}],
        "messages": [
            {"role": "user", "content": format!("ssn 123-45-6789")},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "pay",
                                               "input": {"card": CARD, "nested": ["call 415-555-2671"]}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sent to bob@example.com"}]}
        ]
    }));
    let (new, n) = redact_request(Provider::Anthropic, Endpoint::Messages, &req, &m)
        .unwrap()
        .unwrap();
    assert_eq!(n, 5);
    let v: Value = serde_json::from_slice(&new).unwrap();
    assert_eq!(v["system"][0]["text"], format!("card {MASKED_CARD}"));
    assert_eq!(v["messages"][0]["content"], "ssn ***-**-****");
    assert_eq!(v["messages"][1]["content"][0]["input"]["card"], MASKED_CARD);
    assert_eq!(
        v["messages"][1]["content"][0]["input"]["nested"][0],
        "call ***-***-****"
    );
    assert_eq!(v["messages"][1]["content"][0]["id"], "toolu_1");
    assert_eq!(
        v["messages"][2]["content"][0]["content"],
        "sent to b***@example.com"
    );

    let req = body(json!({
        "model": "gpt-4.1",
        "instructions": format!("card {CARD}"),
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": CARD}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": format!("{{\"c\":\"{CARD}\"}}")},
            {"type": "function_call_output", "call_id": "c", "output": CARD}
        ]
    }));
    let (new, n) = redact_request(Provider::OpenAi, Endpoint::Responses, &req, &m)
        .unwrap()
        .unwrap();
    assert_eq!(n, 4);
    assert!(!String::from_utf8(new).unwrap().contains(CARD));
    let req = body(json!({"model": "gpt-4.1", "input": format!("pay {CARD}")}));
    let (new, n) = redact_request(Provider::OpenAi, Endpoint::Responses, &req, &m)
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            n,
            serde_json::from_slice::<Value>(&new).unwrap()["input"].clone()
        ),
        (1, json!(format!("pay {MASKED_CARD}")))
    );

    let req = body(json!({"model": "e", "input": ["fine", CARD]}));
    let (new, n) = redact_request(Provider::OpenAi, Endpoint::Embeddings, &req, &m)
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            n,
            serde_json::from_slice::<Value>(&new).unwrap()["input"].clone()
        ),
        (1, json!(["fine", MASKED_CARD]))
    );
    let req = body(json!({"model": "c", "prompt": CARD}));
    let (_, n) = redact_request(Provider::OpenAi, Endpoint::Completions, &req, &m)
        .unwrap()
        .unwrap();
    assert_eq!(n, 1);
}

// ---- responses ----

#[test]
fn parses_openai_chat_responses_with_tool_calls_and_usage() {
    let resp = body(json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]}, "finish_reason": "tool_calls"},
            {"index": 1, "message": {"role": "assistant", "content": "Other."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    }));
    let r = parse_response(Provider::OpenAi, Endpoint::Chat, &resp).unwrap();
    assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(r.text, "Checking.\nOther.");
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            id: Some("call_1".into()),
            name: "weather".into(),
            arguments: "{\"city\":\"Paris\"}".into()
        }]
    );
    assert_eq!((r.input_tokens, r.output_tokens), (Some(12), Some(7)));
    assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));

    let resp = body(
        json!({"model": "i", "choices": [{"index": 0, "text": "done", "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
    );
    let r = parse_response(Provider::OpenAi, Endpoint::Completions, &resp).unwrap();
    assert_eq!(
        (r.text.as_str(), r.finish_reason.as_deref(), r.output_tokens),
        ("done", Some("length"), Some(2))
    );

    let resp = body(
        json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                           "model": "text-embedding-3-small", "usage": {"prompt_tokens": 5, "total_tokens": 5}}),
    );
    let r = parse_response(Provider::OpenAi, Endpoint::Embeddings, &resp).unwrap();
    assert_eq!((r.text.as_str(), r.input_tokens), ("", Some(5)));
}

#[test]
fn parses_openai_responses_api_responses() {
    let resp = body(json!({
        "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1-2025-04-14",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello ", "annotations": []},
                         {"type": "output_text", "text": "world", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_9", "name": "f", "arguments": "{}", "status": "completed"}
        ],
        "usage": {"input_tokens": 30, "output_tokens": 9, "total_tokens": 39}
    }));
    let r = parse_response(Provider::OpenAi, Endpoint::Responses, &resp).unwrap();
    assert_eq!(r.text, "Hello world");
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            id: Some("call_9".into()),
            name: "f".into(),
            arguments: "{}".into()
        }]
    );
    assert_eq!((r.input_tokens, r.output_tokens), (Some(30), Some(9)));
    assert_eq!(r.finish_reason.as_deref(), Some("completed"));
    assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));
}

#[test]
fn parses_anthropic_responses() {
    let resp = body(json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 100, "output_tokens": 20}
    }));
    let r = parse_response(Provider::Anthropic, Endpoint::Messages, &resp).unwrap();
    assert_eq!(r.text, "Let me check.");
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            id: Some("toolu_1".into()),
            name: "get_weather".into(),
            arguments: "{\"location\":\"Paris\"}".into()
        }]
    );
    assert_eq!((r.input_tokens, r.output_tokens), (Some(100), Some(20)));
    assert_eq!(r.finish_reason.as_deref(), Some("tool_use"));
}

#[test]
fn masks_responses_text_and_tool_arguments() {
    let m = all_detectors();
    let resp = body(json!({
        "id": "chatcmpl-4111111111111111", "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Card: {CARD}"), "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "pay", "arguments": format!("{{\"card\":\"{CARD}\"}}")}}
        ]}, "finish_reason": "stop"}]
    }));
    let (new, n) = mask_response(Provider::OpenAi, Endpoint::Chat, &resp, &m)
        .unwrap()
        .unwrap();
    assert_eq!(n, 2);
    let v: Value = serde_json::from_slice(&new).unwrap();
    assert_eq!(v["id"], "chatcmpl-4111111111111111");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("Card: {MASKED_CARD}")
    );
    let r = parse_response(Provider::OpenAi, Endpoint::Chat, &new).unwrap();
    assert_eq!(
        r.tool_calls[0].arguments,
        format!("{{\"card\":\"{MASKED_CARD}\"}}")
    );

    let resp = body(json!({
        "model": "claude", "content": [{"type": "text", "text": "mail bob@example.com"},
                                       {"type": "tool_use", "id": "t", "name": "n", "input": {"to": ["bob@example.com"]}}]
    }));
    let (new, n) = mask_response(Provider::Anthropic, Endpoint::Messages, &resp, &m)
        .unwrap()
        .unwrap();
    assert_eq!(n, 2);
    let v: Value = serde_json::from_slice(&new).unwrap();
    assert_eq!(v["content"][1]["input"]["to"][0], "b***@example.com");

    let resp = body(json!({"model": "g", "status": "completed", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": CARD}]},
        {"type": "function_call", "name": "f", "arguments": CARD}]}));
    let (new, n) = mask_response(Provider::OpenAi, Endpoint::Responses, &resp, &m)
        .unwrap()
        .unwrap();
    assert_eq!(n, 2);
    assert!(!String::from_utf8(new).unwrap().contains(CARD));

    let clean =
        body(json!({"model": "gpt-4o", "choices": [{"index": 0, "message": {"content": "hi"}}]}));
    assert!(
        mask_response(Provider::OpenAi, Endpoint::Chat, &clean, &m)
            .unwrap()
            .is_none()
    );
    let emb = body(json!({"data": [{"embedding": [1.0]}], "model": CARD}));
    assert!(
        mask_response(Provider::OpenAi, Endpoint::Embeddings, &emb, &m)
            .unwrap()
            .is_none()
    );
}

// ---- errors ----

#[test]
fn error_bodies_have_the_providers_shape() {
    let v: Value =
        serde_json::from_slice(&error_body(Provider::OpenAi, "denied by \"rule\"")).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "denied by \"rule\"", "type": "permission_error", "param": null, "code": "warden_denied"}})
    );
    let v: Value = serde_json::from_slice(&error_body(Provider::Anthropic, "no")).unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "permission_error", "message": "no"}})
    );
}

#[test]
fn budget_error_bodies_are_the_providers_quota_errors() {
    let v: Value = serde_json::from_slice(&budget_error_body(Provider::OpenAi, "spent")).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "spent", "type": "insufficient_quota", "param": null, "code": "warden_budget_exceeded"}})
    );
    let v: Value =
        serde_json::from_slice(&budget_error_body(Provider::Anthropic, "spent")).unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "spent"}})
    );
}
