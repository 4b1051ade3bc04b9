//! Tests of [`StreamMasker`] on real-shaped streams of the three APIs: a
//! card split at every place of the text and the stream chunked at every
//! byte, streams without findings unchanged byte for byte, latency, and the
//! audit view.

use std::sync::{Arc, LazyLock};

use serde_json::Value;

use super::tests::masker;
use super::*;
use crate::masking::Masker;

const CARD: &str = "4111 1111 1111 1111";
/// A text with a card, multibyte characters before and after it.
const TEXT: &str = "Héllo — my card is 4111 1111 1111 1111, merci! 日本語です。";
/// The same without any finding.
const PLAIN: &str = "Héllo wörld — the answer is 42, (really) [ok]. 日本語です。 Done";

/// Built once: compiling the detectors is what costs most in these tests.
fn masker_arc() -> Arc<Masker> {
    static MASKER: LazyLock<Arc<Masker>> = LazyLock::new(|| {
        Arc::new(masker(&[
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
        ]))
    });
    MASKER.clone()
}

fn expected(text: &str) -> String {
    masker_arc().mask_text(text).0.into_owned()
}

fn s(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

// ---- stream builders (the events as the providers send them) ----

const CHAT_HEAD: &str = r#"{"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1718000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":["#;

fn chat_stream(deltas: &[&str], args: &[&str]) -> Vec<u8> {
    let mut out = String::new();
    let mut event = |choice: String| {
        out.push_str(&format!("data: {CHAT_HEAD}{choice}]}}\n\n"));
    };
    event(r#"{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}"#.into());
    for d in deltas {
        event(format!(
            r#"{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}"#,
            s(d)
        ));
    }
    if !args.is_empty() {
        event(r#"{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_Xyz","type":"function","function":{"name":"pay","arguments":""}}]},"logprobs":null,"finish_reason":null}"#.into());
        for a in args {
            event(format!(
                r#"{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}},"logprobs":null,"finish_reason":null}}"#,
                s(a)
            ));
        }
    }
    let reason = if args.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    event(format!(
        r#"{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}"#
    ));
    out.push_str(r#"data: {"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1718000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#);
    out.push_str("\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

fn anthropic_stream(deltas: &[&str], json: &[&str]) -> Vec<u8> {
    let mut out = String::new();
    let mut event =
        |name: &str, data: String| out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    event("message_start", r#"{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#.into());
    event(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
            .into(),
    );
    event("ping", r#"{"type": "ping"}"#.into());
    for d in deltas {
        event(
            "content_block_delta",
            format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                s(d)
            ),
        );
    }
    event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#.into(),
    );
    if !json.is_empty() {
        event("content_block_start", r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"pay","input":{}}}"#.into());
        for j in std::iter::once(&"").chain(json) {
            event(
                "content_block_delta",
                format!(
                    r#"{{"type":"content_block_delta","index":1,"delta":{{"type":"input_json_delta","partial_json":{}}}}}"#,
                    s(j)
                ),
            );
        }
        event(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":1}"#.into(),
        );
    }
    event("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#.into());
    event("message_stop", r#"{"type":"message_stop"}"#.into());
    out.into_bytes()
}

fn responses_stream(deltas: &[&str], args: &[&str]) -> Vec<u8> {
    let full = deltas.concat();
    let full_args = args.concat();
    let mut out = String::new();
    let mut seq = 0;
    let mut event = |name: &str, rest: String| {
        out.push_str(&format!(
            "event: {name}\ndata: {{\"type\":\"{name}\",\"sequence_number\":{seq},{rest}}}\n\n"
        ));
        seq += 1;
    };
    let message = |status: &str, text: &str| {
        format!(
            r#"{{"id":"msg_67ccd3acc8d48190a77525dc6de64b4f","type":"message","status":"{status}","content":[{{"type":"output_text","annotations":[],"text":{}}}],"role":"assistant"}}"#,
            s(text)
        )
    };
    let call = |status: &str, arguments: &str| {
        format!(
            r#"{{"id":"fc_12345xyz","type":"function_call","status":"{status}","arguments":{},"call_id":"call_12345xyz","name":"pay"}}"#,
            s(arguments)
        )
    };
    event("response.created", r#""response":{"id":"resp_67ccd3a9da748190","object":"response","created_at":1741476777,"status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null}"#.into());
    event("response.in_progress", r#""response":{"id":"resp_67ccd3a9da748190","object":"response","created_at":1741476777,"status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null}"#.into());
    event("response.output_item.added", r#""output_index":0,"item":{"id":"msg_67ccd3acc8d48190a77525dc6de64b4f","type":"message","status":"in_progress","content":[],"role":"assistant"}"#.into());
    event("response.content_part.added", r#""item_id":"msg_67ccd3acc8d48190a77525dc6de64b4f","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"text":""}"#.into());
    for d in deltas {
        event(
            "response.output_text.delta",
            format!(
                r#""item_id":"msg_67ccd3acc8d48190a77525dc6de64b4f","output_index":0,"content_index":0,"delta":{},"logprobs":[]"#,
                s(d)
            ),
        );
    }
    event(
        "response.output_text.done",
        format!(
            r#""item_id":"msg_67ccd3acc8d48190a77525dc6de64b4f","output_index":0,"content_index":0,"text":{},"logprobs":[]"#,
            s(&full)
        ),
    );
    event(
        "response.content_part.done",
        format!(
            r#""item_id":"msg_67ccd3acc8d48190a77525dc6de64b4f","output_index":0,"content_index":0,"part":{{"type":"output_text","annotations":[],"text":{}}}"#,
            s(&full)
        ),
    );
    event(
        "response.output_item.done",
        format!(r#""output_index":0,"item":{}"#, message("completed", &full)),
    );
    let mut output = vec![message("completed", &full)];
    if !args.is_empty() {
        event(
            "response.output_item.added",
            format!(r#""output_index":1,"item":{}"#, call("in_progress", "")),
        );
        for a in args {
            event(
                "response.function_call_arguments.delta",
                format!(
                    r#""item_id":"fc_12345xyz","output_index":1,"delta":{}"#,
                    s(a)
                ),
            );
        }
        event(
            "response.function_call_arguments.done",
            format!(
                r#""item_id":"fc_12345xyz","output_index":1,"arguments":{}"#,
                s(&full_args)
            ),
        );
        event(
            "response.output_item.done",
            format!(
                r#""output_index":1,"item":{}"#,
                call("completed", &full_args)
            ),
        );
        output.push(call("completed", &full_args));
    }
    event(
        "response.completed",
        format!(
            r#""response":{{"id":"resp_67ccd3a9da748190","object":"response","created_at":1741476777,"status":"completed","model":"gpt-4.1-2025-04-14","output":[{}],"usage":{{"input_tokens":37,"output_tokens":11,"total_tokens":48}}}}"#,
            output.join(",")
        ),
    );
    out.into_bytes()
}

// ---- running and reading streams ----

/// How the upstream body is cut into chunks.
#[derive(Clone, Copy, Debug)]
enum Chunking {
    Whole,
    Bytes,
    SplitAt(usize),
}

fn run(
    provider: Provider,
    endpoint: Endpoint,
    input: &[u8],
    chunking: Chunking,
    masker: Option<Arc<Masker>>,
) -> (Vec<u8>, StreamMasker) {
    let mut sm = StreamMasker::new(provider, endpoint, masker);
    let mut out = Vec::new();
    match chunking {
        Chunking::Whole => out.extend_from_slice(&sm.feed(input)),
        Chunking::Bytes => {
            for byte in input.chunks(1) {
                out.extend_from_slice(&sm.feed(byte));
            }
        }
        Chunking::SplitAt(at) => {
            out.extend_from_slice(&sm.feed(&input[..at]));
            out.extend_from_slice(&sm.feed(&input[at..]));
        }
    }
    out.extend_from_slice(&sm.finish());
    (out, sm)
}

/// The events of an output (blocks end with a blank `\n` line in these
/// tests): `event` name and data, each data parsed as JSON (or `[DONE]`).
fn events(out: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = std::str::from_utf8(out).expect("output is UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "output ends inside an event: {text:?}"
    );
    let mut all = Vec::new();
    for block in text.split_terminator("\n\n") {
        let mut name = None;
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                name = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v);
            }
        }
        if data.is_empty() {
            continue;
        }
        let data = data.join("\n");
        let value = if data == "[DONE]" {
            Value::String(data)
        } else {
            serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}"))
        };
        all.push((name, value));
    }
    all
}

/// What the openai SDK reassembles from a chat stream: text and the first
/// tool call's arguments; and checks every chunk's shape.
fn chat_client(out: &[u8]) -> (String, String) {
    let (mut text, mut args) = (String::new(), String::new());
    for (_, event) in events(out) {
        if event == "[DONE]" {
            continue;
        }
        assert_eq!(event["object"], "chat.completion.chunk", "{event}");
        assert_eq!(event["id"], "chatcmpl-AbC123");
        for choice in event["choices"].as_array().expect("choices") {
            assert_eq!(choice["index"], 0);
            let delta = &choice["delta"];
            assert!(delta.is_object(), "{event}");
            text.push_str(delta["content"].as_str().unwrap_or(""));
            if let Some(calls) = delta["tool_calls"].as_array() {
                for call in calls {
                    assert_eq!(call["index"], 0);
                    args.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
                }
            }
        }
    }
    (text, args)
}

/// What the anthropic SDK reassembles: text and tool input JSON; checks the
/// event names match the types.
fn anthropic_client(out: &[u8]) -> (String, String) {
    let (mut text, mut json) = (String::new(), String::new());
    for (name, event) in events(out) {
        assert_eq!(name.as_deref(), event["type"].as_str(), "{event}");
        if event["type"] == "content_block_delta" {
            let delta = &event["delta"];
            match delta["type"].as_str() {
                Some("text_delta") => text.push_str(delta["text"].as_str().expect("text")),
                Some("input_json_delta") => {
                    json.push_str(delta["partial_json"].as_str().expect("json"))
                }
                other => panic!("delta type {other:?}"),
            }
        }
    }
    (text, json)
}

/// What the openai SDK reassembles from a responses stream: deltas of text
/// and arguments, and the texts of the `.done` events and `response.completed`.
struct ResponsesClient {
    text: String,
    args: String,
    done_texts: Vec<String>,
}

fn responses_client(out: &[u8]) -> ResponsesClient {
    let mut client = ResponsesClient {
        text: String::new(),
        args: String::new(),
        done_texts: Vec::new(),
    };
    for (name, event) in events(out) {
        assert_eq!(name.as_deref(), event["type"].as_str(), "{event}");
        assert!(event["sequence_number"].is_u64());
        match event["type"].as_str().unwrap() {
            "response.output_text.delta" => {
                assert_eq!(event["item_id"], "msg_67ccd3acc8d48190a77525dc6de64b4f");
                client.text.push_str(event["delta"].as_str().unwrap());
            }
            "response.function_call_arguments.delta" => {
                client.args.push_str(event["delta"].as_str().unwrap())
            }
            "response.output_text.done" => client
                .done_texts
                .push(event["text"].as_str().unwrap().into()),
            "response.content_part.done" => client
                .done_texts
                .push(event["part"]["text"].as_str().unwrap().into()),
            "response.completed" => {
                let text = &event["response"]["output"][0]["content"][0]["text"];
                client.done_texts.push(text.as_str().unwrap().into());
            }
            _ => {}
        }
    }
    client
}

/// The places to split `text` in two deltas: every character boundary.
fn splits(text: &str) -> Vec<[&str; 2]> {
    (1..text.len())
        .filter(|&k| text.is_char_boundary(k))
        .map(|k| [&text[..k], &text[k..]])
        .collect()
}

fn assert_no_card(out: &[u8]) {
    let text = String::from_utf8_lossy(out);
    assert!(!text.contains("4111"), "raw card digits in output:\n{text}");
}

// ---- OpenAI chat ----

#[test]
fn chat_card_split_anywhere_reaches_the_client_masked() {
    let want = expected(TEXT);
    assert!(want.contains("**** **** **** 1111"));
    let mut cases: Vec<Vec<&str>> = splits(TEXT).into_iter().map(|s| s.to_vec()).collect();
    cases.push(vec![
        "Héllo — my card is 4111",
        " 1111 11",
        "11 1111, merci! 日本語です。",
    ]);
    cases.push(TEXT.split_inclusive(' ').collect());
    for deltas in cases {
        let input = chat_stream(&deltas, &[]);
        for chunking in [Chunking::Whole, Chunking::Bytes] {
            let (out, sm) = run(
                Provider::OpenAi,
                Endpoint::Chat,
                &input,
                chunking,
                Some(masker_arc()),
            );
            assert_no_card(&out);
            let (text, _) = chat_client(&out);
            assert_eq!(text, want, "{deltas:?} {chunking:?}");
            assert_eq!(sm.response().text, want);
            assert_eq!(sm.masked(), 1, "{deltas:?}");
            assert_eq!(
                (sm.response().input_tokens, sm.response().output_tokens),
                (Some(9), Some(12))
            );
            assert_eq!(sm.response().finish_reason.as_deref(), Some("stop"));
            let last: Vec<_> = events(&out).into_iter().rev().take(3).collect();
            assert_eq!(last[0].1, "[DONE]");
            assert!(last[1].1["usage"].is_object());
            assert_eq!(last[2].1["choices"][0]["finish_reason"], "stop");
        }
    }
}

#[test]
fn chat_stream_chunked_at_every_byte_offset() {
    let deltas = ["My card is 4111", " 1111 11", "11 1111."];
    let input = chat_stream(&deltas, &[]);
    let want = expected(&deltas.concat());
    for at in 0..=input.len() {
        let (out, _) = run(
            Provider::OpenAi,
            Endpoint::Chat,
            &input,
            Chunking::SplitAt(at),
            Some(masker_arc()),
        );
        assert_no_card(&out);
        assert_eq!(chat_client(&out).0, want, "split at {at}");
    }
}

#[test]
fn chat_tool_call_arguments_are_masked_across_deltas() {
    let args = [
        "{\"card\": \"4111 11",
        "11 1111 1",
        "111\", \"note\": \"hi\"}",
    ];
    let want = expected(&args.concat());
    let input = chat_stream(&["Paying."], &args);
    for chunking in [Chunking::Whole, Chunking::Bytes] {
        let (out, sm) = run(
            Provider::OpenAi,
            Endpoint::Chat,
            &input,
            chunking,
            Some(masker_arc()),
        );
        assert_no_card(&out);
        let (text, got) = chat_client(&out);
        assert_eq!((text.as_str(), got.as_str()), ("Paying.", want.as_str()));
        let call = &sm.response().tool_calls[0];
        assert_eq!(
            (
                call.id.as_deref(),
                call.name.as_str(),
                call.arguments.as_str()
            ),
            (Some("call_Xyz"), "pay", want.as_str())
        );
        assert_eq!(sm.response().finish_reason.as_deref(), Some("tool_calls"));
        // The id and name are sent once (the SDK concatenates repeated strings).
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches("call_Xyz").count(), 1);
    }
}

#[test]
fn streams_without_findings_are_unchanged_byte_for_byte() {
    let mut inputs = Vec::new();
    for deltas in splits(PLAIN) {
        inputs.push((
            Endpoint::Chat,
            Provider::OpenAi,
            chat_stream(&deltas, &["{\"q\": \"4 2\"", "}"]),
        ));
        inputs.push((
            Endpoint::Messages,
            Provider::Anthropic,
            anthropic_stream(&deltas, &["{\"q\":", " 42}"]),
        ));
        inputs.push((
            Endpoint::Responses,
            Provider::OpenAi,
            responses_stream(&deltas, &["{}"]),
        ));
    }
    inputs.push((
        Endpoint::Chat,
        Provider::OpenAi,
        chat_stream(&PLAIN.split_inclusive(' ').collect::<Vec<_>>(), &[]),
    ));
    for (endpoint, provider, input) in &inputs {
        for chunking in [Chunking::Whole, Chunking::Bytes] {
            let (out, sm) = run(*provider, *endpoint, input, chunking, Some(masker_arc()));
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(input),
                "{endpoint:?} {chunking:?}"
            );
            assert_eq!(sm.masked(), 0);
            assert_eq!(sm.response().text, PLAIN);
        }
    }
    // And with CRLF line ends, comments and ids.
    let crlf = String::from_utf8(chat_stream(&["Hel", "lo 4", "2 1"], &[]))
        .unwrap()
        .replace("\n", "\r\n");
    let crlf = format!(": keep-alive\r\n\r\nid: 1\r\n{crlf}");
    for at in 0..=crlf.len() {
        let (out, _) = run(
            Provider::OpenAi,
            Endpoint::Chat,
            crlf.as_bytes(),
            Chunking::SplitAt(at),
            Some(masker_arc()),
        );
        assert_eq!(out, crlf.as_bytes(), "split at {at}");
    }
}

#[test]
fn plain_deltas_go_out_in_the_same_feed() {
    let input = String::from_utf8(chat_stream(
        &["The sky is blue.\n", "It is, (mostly) "],
        &[],
    ))
    .unwrap();
    let blocks: Vec<&str> = input.split_inclusive("\n\n").collect();
    let mut sm = StreamMasker::new(Provider::OpenAi, Endpoint::Chat, Some(masker_arc()));
    for block in &blocks[..3] {
        assert_eq!(sm.feed(block.as_bytes()), block.as_bytes());
    }
    // A delta ending in a word is held until the next one shows the word is
    // over, then goes out unchanged.
    let word = format!(
        "data: {CHAT_HEAD}{{\"index\":0,\"delta\":{{\"content\":\" Hi\"}},\"finish_reason\":null}}]}}\n\n"
    );
    assert!(sm.feed(word.as_bytes()).is_empty());
    let dot = format!(
        "data: {CHAT_HEAD}{{\"index\":0,\"delta\":{{\"content\":\"! \"}},\"finish_reason\":null}}]}}\n\n"
    );
    assert_eq!(sm.feed(dot.as_bytes()), format!("{word}{dot}").as_bytes());

    // A card is released masked as soon as it is over, without waiting for the end.
    let piece = |t: &str| {
        format!(
            "data: {CHAT_HEAD}{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
            s(t)
        )
    };
    assert!(sm.feed(piece("Card 4111").as_bytes()).is_empty());
    assert!(sm.feed(piece(" 1111 11").as_bytes()).is_empty());
    assert!(sm.feed(piece("11 1111").as_bytes()).is_empty());
    let out = sm.feed(piece(", ok ").as_bytes());
    let (text, _) = chat_client(&out);
    assert_eq!(text, "Card **** **** **** 1111, ok ");
    assert_eq!(sm.masked(), 1);
}

#[test]
fn a_stream_without_masker_passes_through_and_is_read() {
    let input = chat_stream(&["My card is ", CARD, "."], &["{\"a\":", "1}"]);
    for chunking in [Chunking::Whole, Chunking::Bytes] {
        let mut sm = StreamMasker::new(Provider::OpenAi, Endpoint::Chat, None);
        let mut out = Vec::new();
        for chunk in input.chunks(match chunking {
            Chunking::Bytes => 1,
            _ => input.len(),
        }) {
            let sent = sm.feed(chunk);
            assert_eq!(sent, chunk, "each chunk goes out as it came");
            out.extend_from_slice(&sent);
        }
        assert!(sm.finish().is_empty());
        assert_eq!(out, input);
        let r = sm.response();
        assert_eq!(r.text, format!("My card is {CARD}."));
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(
            r.tool_calls,
            vec![ToolCall {
                id: Some("call_Xyz".into()),
                name: "pay".into(),
                arguments: "{\"a\":1}".into()
            }]
        );
        assert_eq!((r.input_tokens, r.output_tokens), (Some(9), Some(12)));
        assert_eq!(sm.masked(), 0);
    }
    // A masker without detectors is no masker.
    let none = Arc::new(Masker::new(&[], &[]).unwrap());
    let (out, _) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        &input,
        Chunking::Bytes,
        Some(none),
    );
    assert_eq!(out, input);

    let input = anthropic_stream(&["Hi ", "there"], &["{\"to\": ", "\"x\"}"]);
    let (out, sm) = run(
        Provider::Anthropic,
        Endpoint::Messages,
        &input,
        Chunking::Bytes,
        None,
    );
    assert_eq!(out, input);
    let r = sm.response();
    assert_eq!(r.text, "Hi there");
    assert_eq!(r.tool_calls[0].arguments, "{\"to\": \"x\"}");
    assert_eq!(
        (r.input_tokens, r.output_tokens, r.finish_reason.as_deref()),
        (Some(25), Some(15), Some("end_turn"))
    );
}

// ---- Anthropic ----

#[test]
fn anthropic_card_split_anywhere_reaches_the_client_masked() {
    let want = expected(TEXT);
    let json = ["{\"card\": \"41", "11 1111 1111 11", "11\"}"];
    let want_json = expected(&json.concat());
    for deltas in splits(TEXT) {
        let input = anthropic_stream(&deltas, &json);
        for chunking in [Chunking::Whole, Chunking::Bytes] {
            let (out, sm) = run(
                Provider::Anthropic,
                Endpoint::Messages,
                &input,
                chunking,
                Some(masker_arc()),
            );
            assert_no_card(&out);
            let (text, got_json) = anthropic_client(&out);
            assert_eq!(
                (text.as_str(), got_json.as_str()),
                (want.as_str(), want_json.as_str()),
                "{deltas:?}"
            );
            let r = sm.response();
            assert_eq!(r.text, want);
            assert_eq!(r.tool_calls.len(), 1);
            assert_eq!(
                r.tool_calls[0].id.as_deref(),
                Some("toolu_01T1x1fJ34qAmk2tNTrN7Up6")
            );
            assert_eq!(r.tool_calls[0].arguments, want_json);
            assert_eq!((r.input_tokens, r.output_tokens), (Some(25), Some(15)));
            assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
            assert_eq!(sm.masked(), 2);
            // The stream's events keep their order and types; only extra
            // deltas may be added.
            let types = |bytes: &[u8]| -> Vec<String> {
                events(bytes)
                    .into_iter()
                    .map(|(_, e)| e["type"].as_str().unwrap().to_string())
                    .filter(|t| t != "content_block_delta")
                    .collect()
            };
            assert_eq!(types(&out), types(&input));
        }
    }
}

#[test]
fn anthropic_tool_input_that_never_streams_is_empty_json() {
    let input = anthropic_stream(&["ok"], &[""]);
    let (_, sm) = run(
        Provider::Anthropic,
        Endpoint::Messages,
        &input,
        Chunking::Whole,
        Some(masker_arc()),
    );
    assert_eq!(sm.response().tool_calls[0].arguments, "{}");
}

// ---- responses API ----

#[test]
fn responses_card_split_anywhere_reaches_the_client_masked() {
    let want = expected(TEXT);
    let args = ["{\"card\":\"4111", " 1111 1111 1111\"}"];
    let want_args = expected(&args.concat());
    for deltas in splits(TEXT) {
        let input = responses_stream(&deltas, &args);
        for chunking in [Chunking::Whole, Chunking::Bytes] {
            let (out, sm) = run(
                Provider::OpenAi,
                Endpoint::Responses,
                &input,
                chunking,
                Some(masker_arc()),
            );
            assert_no_card(&out);
            let client = responses_client(&out);
            assert_eq!(client.text, want, "{deltas:?}");
            assert_eq!(client.args, want_args);
            assert_eq!(
                client.done_texts,
                vec![want.clone(), want.clone(), want.clone()]
            );
            let r = sm.response();
            assert_eq!(r.text, want);
            assert_eq!(
                r.tool_calls,
                vec![ToolCall {
                    id: Some("call_12345xyz".into()),
                    name: "pay".into(),
                    arguments: want_args.clone()
                }]
            );
            assert_eq!((r.input_tokens, r.output_tokens), (Some(37), Some(11)));
            assert_eq!(r.finish_reason.as_deref(), Some("completed"));
            assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));
            assert_eq!(sm.masked(), 2);
        }
    }
}

// ---- holding rules end to end ----

#[test]
fn other_findings_split_across_deltas() {
    for (deltas, hidden) in [
        (
            vec!["Write to john.d", "oe@exam", "ple.com please"],
            "john.doe",
        ),
        (
            vec!["Authorization: Bearer ", "abcdef1234567890", "XYZ ok"],
            "abcdef1234567890",
        ),
        (
            vec!["key sk-proj-", "A1b2C3d4E5f6G7h8", "I9j0 there"],
            "A1b2C3d4E5f6G7h8",
        ),
        (vec!["ssn 123-", "45-67", "89."], "6789"),
        (vec!["call (415) ", "555-", "2671 now"], "555-2671"),
        (
            vec!["IBAN GB82 WE", "ST 1234 5698 7654 32 thanks"],
            "WEST 1234",
        ),
    ] {
        let input = anthropic_stream(&deltas, &[]);
        for chunking in [Chunking::Whole, Chunking::Bytes] {
            let (out, _) = run(
                Provider::Anthropic,
                Endpoint::Messages,
                &input,
                chunking,
                Some(masker_arc()),
            );
            let (text, _) = anthropic_client(&out);
            assert_eq!(text, expected(&deltas.concat()), "{deltas:?}");
            assert!(
                !String::from_utf8_lossy(&out).contains(hidden),
                "{hidden} leaked: {text}"
            );
        }
    }
}

#[test]
fn a_private_key_streamed_line_by_line_is_masked() {
    let mut deltas = vec![
        "Here is the key:\n-----BEGIN RSA PRIV".to_string(),
        "ATE KEY-----\n".to_string(),
    ];
    for _ in 0..20 {
        deltas
            .push("MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n".to_string());
    }
    deltas.push("-----END RSA PRIVATE KEY-----\nKeep it safe.".to_string());
    let refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
    let input = chat_stream(&refs, &[]);
    let (out, sm) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        &input,
        Chunking::Whole,
        Some(masker_arc()),
    );
    let (text, _) = chat_client(&out);
    assert_eq!(
        text,
        "Here is the key:\n[REDACTED:private_key]\nKeep it safe."
    );
    assert!(!String::from_utf8_lossy(&out).contains("MIIE"));
    assert_eq!(sm.masked(), 1);
}

#[test]
fn a_long_token_is_released_at_the_cap() {
    let mut sm = StreamMasker::new(Provider::OpenAi, Endpoint::Chat, Some(masker_arc()));
    let piece = |t: &str| {
        format!(
            "data: {CHAT_HEAD}{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
            s(t)
        )
    };
    let mut sent = Vec::new();
    for _ in 0..40 {
        sent.extend_from_slice(&sm.feed(piece("abcdefghijklmnopqrstuvwxyz0123456789").as_bytes()));
    }
    // 1440 bytes of one token: the first part went out without the end.
    let (text, _) = chat_client(&sent);
    assert!(
        !text.is_empty() && text.len() <= 1440 - hold::MAX_HOLD + 36,
        "{}",
        text.len()
    );
    let (rest, _) = chat_client(&sm.finish());
    assert_eq!(
        format!("{text}{rest}"),
        "abcdefghijklmnopqrstuvwxyz0123456789".repeat(40)
    );
}

#[test]
fn events_not_understood_are_masked_as_raw_text() {
    let input = format!(
        "data: not json {CARD}\n\n: comment {CARD}\n\nevent: error\ndata: {{\"type\":\"error\",\"error\":{{\"message\":\"{CARD}\"}}}}\n\ndata: {{\"type\":\"message_stop\"}}\n\n"
    );
    let (out, sm) = run(
        Provider::Anthropic,
        Endpoint::Messages,
        input.as_bytes(),
        Chunking::Bytes,
        Some(masker_arc()),
    );
    assert_no_card(&out);
    assert_eq!(sm.masked(), 3);
    let (out, _) = run(
        Provider::Anthropic,
        Endpoint::Messages,
        input.as_bytes(),
        Chunking::Whole,
        None,
    );
    assert_eq!(out, input.as_bytes());
}

#[test]
fn an_unterminated_stream_is_flushed_by_finish() {
    let input = chat_stream(&["My card is 4111 1111", " 1111 1111"], &[]);
    // Cut the body off after the second delta event.
    let text = String::from_utf8(input).unwrap();
    let cut = text.match_indices("\n\n").nth(2).unwrap().0 + 2;
    let (out, sm) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        &text.as_bytes()[..cut],
        Chunking::Bytes,
        Some(masker_arc()),
    );
    assert_no_card(&out);
    assert_eq!(chat_client(&out).0, "My card is **** **** **** 1111");
    assert_eq!(sm.response().text, "My card is **** **** **** 1111");
    // The last event unterminated, and text held after it: both reach the
    // client as events.
    let input = chat_stream(&["My card is 4111 1111 1111 1111 ok"], &[]);
    let text = String::from_utf8(input).unwrap();
    let cut = text.match_indices("\n\n").nth(1).unwrap().0;
    for chunking in [Chunking::Whole, Chunking::Bytes] {
        let (out, sm) = run(
            Provider::OpenAi,
            Endpoint::Chat,
            &text.as_bytes()[..cut],
            chunking,
            Some(masker_arc()),
        );
        assert_eq!(chat_client(&out).0, "My card is **** **** **** 1111 ok");
        assert_eq!(events(&out).len(), 3);
        assert_eq!(sm.response().text, "My card is **** **** **** 1111 ok");
    }
    // An event cut in the middle is passed on as it was (masked as raw text),
    // ended.
    let (out, _) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        &text.as_bytes()[..cut + 32],
        Chunking::Bytes,
        Some(masker_arc()),
    );
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(&format!("\n\n{}\n\n", &text[cut + 2..cut + 32])),
        "{out}"
    );
    // Without a masker, the bytes as they came.
    let (out, _) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        &text.as_bytes()[..cut + 32],
        Chunking::Whole,
        None,
    );
    assert_eq!(out, &text.as_bytes()[..cut + 32]);
}

#[test]
fn an_unterminated_last_event_ending_in_cr_stays_an_event() {
    // The `sse` fuzz target's check that a terminated block stays one
    // event: `\r` ends the last data line of a body cut short; the empty
    // line `finish` adds must not turn it into `\r\n` and merge the extra
    // event that carries the held text into it.
    let input = chat_stream(&["My card is 4111 1111 1111 1111 ok"], &[]);
    let text = String::from_utf8(input).unwrap();
    let cut = text.match_indices("\n\n").nth(1).unwrap().0;
    let body = format!("{}\r", &text[..cut]);
    for chunking in [Chunking::Whole, Chunking::Bytes] {
        let (out, _) = run(
            Provider::OpenAi,
            Endpoint::Chat,
            body.as_bytes(),
            chunking,
            Some(masker_arc()),
        );
        // Read as a client does: each event one JSON chunk.
        let mut framer = sse::Framer::default();
        framer.push(&out);
        let (mut client, mut n) = (String::new(), 0);
        while let Some(block) = framer.next_block() {
            let data = sse::fields(&block).data.expect("an event with data");
            let chunk: Value = serde_json::from_str(&data).expect("one JSON chunk per event");
            client.push_str(
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or(""),
            );
            n += 1;
        }
        assert_eq!(
            framer.take_rest(),
            None,
            "the output ends with a whole event"
        );
        assert_eq!(n, 3);
        assert_eq!(client, "My card is **** **** **** 1111 ok");
    }
}

#[test]
fn several_choices_are_kept_apart() {
    let chunk = |i: u32, t: &str| {
        format!(
            "data: {CHAT_HEAD}{{\"index\":{i},\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
            s(t)
        )
    };
    let stop = |i: u32| {
        format!(
            "data: {CHAT_HEAD}{{\"index\":{i},\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
        )
    };
    let input = [
        chunk(0, "A 4111 "),
        chunk(1, "B 4111 1111 "),
        chunk(0, "1111 1111 1111"),
        chunk(1, "1111 1111"),
        stop(0),
        stop(1),
        "data: [DONE]\n\n".into(),
    ]
    .concat();
    let (out, sm) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        input.as_bytes(),
        Chunking::Bytes,
        Some(masker_arc()),
    );
    assert_no_card(&out);
    let mut texts = [String::new(), String::new()];
    for (_, e) in events(&out) {
        for c in e["choices"].as_array().into_iter().flatten() {
            texts[c["index"].as_u64().unwrap() as usize]
                .push_str(c["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(texts, ["A **** **** **** 1111", "B **** **** **** 1111"]);
    assert_eq!(
        sm.response().text,
        "A **** **** **** 1111\nB **** **** **** 1111"
    );
}

#[test]
fn masked_chunks_keep_their_other_bytes() {
    let input = chat_stream(&[&format!("card {CARD} ok. ")], &[]);
    let (out, _) = run(
        Provider::OpenAi,
        Endpoint::Chat,
        &input,
        Chunking::Whole,
        Some(masker_arc()),
    );
    let expected_out = String::from_utf8(input)
        .unwrap()
        .replace(CARD, "**** **** **** 1111");
    assert_eq!(String::from_utf8(out).unwrap(), expected_out);
}

// ---- random streams ----

/// A small deterministic generator (no dependency for tests).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Findings and the part of each that must never reach the client.
const SECRETS: [(&str, &str); 15] = [
    ("GB82 WEST 1234 5698 7654 32", "WEST 1234"),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI",
    ),
    ("AKIAIOSFODNN7EXAMPLE", "IOSFODNN7"),
    (
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oTxkUgpwlGKyoAoGCCqGSM49\nAwEHoUQDQgAE5ODvNvB0HbVfzDAr6hAoD0TPCdPmWvvKqLMeR1BZ3HzCi6f2BGpm\n-----END EC PRIVATE KEY-----",
        "MHcCAQEEIBkg4",
    ),
    ("4111 1111 1111 1111", "4111 1111"),
    ("5555-5555-5555-4444", "5555-5555"),
    ("john.doe@example.com", "john.doe"),
    ("(415) 555-2671", "555-2671"),
    ("+44 20 7946 0958", "7946"),
    ("123-45-6789", "123-45"),
    ("DE89 3704 0044 0532 0130 00", "3704 0044"),
    ("sk-proj-A1b2C3d4E5f6G7h8I9j0", "A1b2C3d4"),
    ("Bearer abcdef1234567890XYZ", "abcdef1234567890"),
    (
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "eyJzdWIiOiIxMjM0NTY3ODkwIn0",
    ),
    ("postgres://app:s3cretpw@db.internal/x", "s3cretpw"),
];

const FILLERS: [&str; 24] = [
    "Bearer",
    "\t",
    "  ",
    "2024-",
    "+",
    "(",
    "x",
    "-----",
    "@",
    "://",
    "AB12",
    " 7",
    "Hello",
    " world",
    ", ",
    ". ",
    " 日本語",
    "é",
    "\n",
    " 42 ",
    " (ok) ",
    " \"quoted\" ",
    " A-1",
    "—",
];

/// Random texts of findings and fillers (some glued to the findings, so that
/// they are no longer findings), split into random deltas, streamed in random
/// chunks: the client's text is the whole text masked at once, and what that
/// hides never shows. (Run with many more rounds while changing the rule.)
#[test]
fn random_streams_never_leak_and_match_whole_text_masking() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..600 {
        let mut text = String::new();
        let mut cores = Vec::new();
        for _ in 0..1 + rng.below(8) {
            if rng.below(3) == 0 {
                let (secret, core) = SECRETS[rng.below(SECRETS.len())];
                text.push_str(if rng.below(2) == 0 { " " } else { "\n" });
                text.push_str(secret);
                text.push_str([" ", ". ", ", ", "\n", "! ", "", "x", "1", "-"][rng.below(9)]);
                cores.push(core);
            } else {
                text.push_str(FILLERS[rng.below(FILLERS.len())]);
            }
        }
        let boundaries: Vec<usize> = (1..text.len())
            .filter(|&k| text.is_char_boundary(k))
            .collect();
        let mut cuts: Vec<usize> = (0..rng.below(20))
            .filter_map(|_| boundaries.get(rng.below(boundaries.len().max(1))).copied())
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut deltas = Vec::new();
        let mut at = 0;
        for cut in cuts.into_iter().chain([text.len()]) {
            deltas.push(&text[at..cut]);
            at = cut;
        }
        let want = expected(&text);
        let kind = round % 3;
        let input = match kind {
            0 => chat_stream(&deltas, &deltas),
            1 => anthropic_stream(&deltas, &deltas),
            _ => responses_stream(&deltas, &deltas),
        };
        let mut sm = StreamMasker::new(
            if kind == 1 {
                Provider::Anthropic
            } else {
                Provider::OpenAi
            },
            [Endpoint::Chat, Endpoint::Messages, Endpoint::Responses][kind],
            Some(masker_arc()),
        );
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + 1 + rng.below(60)).min(input.len());
            out.extend_from_slice(&sm.feed(&input[pos..end]));
            pos = end;
        }
        out.extend_from_slice(&sm.finish());
        let shown = String::from_utf8_lossy(&out);
        for core in cores.iter().filter(|core| !want.contains(*core)) {
            assert!(
                !shown.contains(core),
                "{core} leaked from {deltas:?}:\n{shown}"
            );
        }
        let (got_text, got_args) = match kind {
            0 => chat_client(&out),
            1 => anthropic_client(&out),
            _ => {
                let client = responses_client(&out);
                (client.text, client.args)
            }
        };
        assert_eq!(got_text, want, "{deltas:?}");
        assert_eq!(got_args, want, "{deltas:?}");
        if want == text {
            assert_eq!(out, input, "no finding, yet changed: {deltas:?}");
        }
    }
}
