//! Error bodies in the provider's own shape, so that the app's SDK raises
//! its usual permission or rate-limit error (with our message) instead of
//! failing to parse the body.

use serde_json::json;

use super::Provider;

/// The error body for a request the agent denies:
/// - OpenAI: `{"error":{"message":M,"type":"permission_error","param":null,"code":"warden_denied"}}`
/// - Anthropic: `{"type":"error","error":{"type":"permission_error","message":M}}`
///
/// Send it with status 403 (both SDKs pick their exception class from the
/// status and show the message).
pub fn error_body(provider: Provider, message: &str) -> Vec<u8> {
    let body = match provider {
        Provider::OpenAi => json!({
            "error": {
                "message": message,
                "type": "permission_error",
                "param": null,
                "code": "warden_denied",
            }
        }),
        Provider::Anthropic => json!({
            "type": "error",
            "error": {
                "type": "permission_error",
                "message": message,
            }
        }),
    };
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// The error body for a request refused because its workload has spent
/// its daily token budget:
/// - OpenAI: `{"error":{"message":M,"type":"insufficient_quota","param":null,"code":"warden_budget_exceeded"}}`
///   (the type OpenAI gives an exhausted quota);
/// - Anthropic: `{"type":"error","error":{"type":"rate_limit_error","message":M}}`.
///
/// Send it with status 429 (`RateLimitError` in both SDKs) and
/// `x-should-retry: false`, which both SDKs obey: retrying before the
/// budget resets cannot succeed.
pub fn budget_error_body(provider: Provider, message: &str) -> Vec<u8> {
    let body = match provider {
        Provider::OpenAi => json!({
            "error": {
                "message": message,
                "type": "insufficient_quota",
                "param": null,
                "code": "warden_budget_exceeded",
            }
        }),
        Provider::Anthropic => json!({
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": message,
            }
        }),
    };
    serde_json::to_vec(&body).expect("a JSON value serialises")
}
