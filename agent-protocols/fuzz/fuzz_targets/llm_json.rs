//! A JSON body of an LLM API, read as a request and as a response of every
//! endpoint (OpenAI chat, completions, responses, embeddings; Anthropic
//! messages), and masked with every built-in detector.
//!
//! Invariants beyond "no panic":
//! - parsing and masking agree on what is JSON: a body one refuses, the
//!   other refuses too;
//! - a masked body is a JSON object that parses again, with a count of
//!   findings above zero;
//! - an error body is JSON.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use warden_protocols::protocols::llm::{
    Endpoint, Provider, error_body, mask_response, parse_request, parse_response, recognise,
    redact_request,
};

fn check_masked(
    endpoint: Endpoint,
    masked: Option<(Vec<u8>, u32)>,
    parse: fn(Provider, Endpoint, &[u8]) -> bool,
) {
    let Some((body, count)) = masked else { return };
    assert!(count > 0, "{endpoint:?}: a new body without findings");
    let value: serde_json::Value = serde_json::from_slice(&body).expect("a masked body is JSON");
    assert!(value.is_object());
    assert!(
        parse(Provider::OpenAi, endpoint, &body),
        "{endpoint:?}: a masked body that does not parse"
    );
}

fuzz_target!(|data: &[u8]| {
    let masker = common::masker();
    for endpoint in [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Responses,
        Endpoint::Embeddings,
        Endpoint::Messages,
    ] {
        let provider = match endpoint {
            Endpoint::Messages => Provider::Anthropic,
            _ => Provider::OpenAi,
        };
        let request = parse_request(provider, endpoint, data);
        let redacted = redact_request(provider, endpoint, data, masker);
        assert_eq!(request.is_ok(), redacted.is_ok(), "{endpoint:?}");
        if let Ok(redacted) = redacted {
            check_masked(endpoint, redacted, |p, e, b| parse_request(p, e, b).is_ok());
        }

        let response = parse_response(provider, endpoint, data);
        let masked = mask_response(provider, endpoint, data, masker);
        assert_eq!(response.is_ok(), masked.is_ok(), "{endpoint:?}");
        if let Ok(masked) = masked {
            check_masked(endpoint, masked, |p, e, b| parse_response(p, e, b).is_ok());
        }
    }

    // The same bytes as a path and as a denial message.
    if let Ok(text) = std::str::from_utf8(data)
        && text.len() < 4096
    {
        let _ = recognise("POST", text);
        for provider in [Provider::OpenAi, Provider::Anthropic] {
            let body = error_body(provider, text);
            serde_json::from_slice::<serde_json::Value>(&body).expect("an error body is JSON");
        }
    }
});
