//! Workload tokens on HTTP requests: a token a workload presents in the
//! policy's header (a Kubernetes service-account token, a cloud's workload
//! identity token) is verified against its issuer's keys, and its subject
//! is added to what the kernel said about the process, never put in its
//! place. The header is taken out of every request, valid or not, so that
//! the token never reaches the server.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::HeaderMap;

use crate::{
    approvals::{
        Fetcher,
        oidc::{Issuer, unverified_issuer},
    },
    policy::WorkloadTokenSettings,
};

/// Where `workload_tokens.issuers` is, for messages.
const SETTING: &str = "workload_tokens.issuers";

/// A verified token's issuer and subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub issuer: String,
    pub subject: String,
}

/// The issuers' keys, shared by every connection and kept across policy
/// reloads (keyed by issuer URL; the audience comes from the policy in
/// force).
pub struct WorkloadTokens {
    fetcher: Fetcher,
    issuers: Mutex<HashMap<String, Arc<Issuer>>>,
}

impl WorkloadTokens {
    pub fn new(fetcher: Fetcher) -> WorkloadTokens {
        WorkloadTokens {
            fetcher,
            issuers: Mutex::default(),
        }
    }

    /// Reads every issuer's discovery document and keys now, so that a
    /// wrong issuer shows in the log at start rather than at the first
    /// token.
    pub async fn discover(&self, settings: &WorkloadTokenSettings) {
        for trusted in &settings.issuers {
            if let Err(error) = self.issuer(&trusted.issuer).discover().await {
                tracing::warn!(%error, "requests with a workload token from this issuer are refused until it answers");
            }
        }
    }

    /// Takes the token header out of `headers` and verifies what it held:
    /// None without a header, else who the token names, or why it is
    /// refused.
    pub async fn take(
        &self,
        settings: &WorkloadTokenSettings,
        headers: &mut HeaderMap,
    ) -> Option<Result<Verified, String>> {
        let header = &settings.header;
        let values: Vec<_> = headers.get_all(header.as_str()).iter().cloned().collect();
        if values.is_empty() {
            return None;
        }
        headers.remove(header.as_str());
        let [value] = values.as_slice() else {
            return Some(Err(format!(
                "the request carries {} {header} headers; send one workload token",
                values.len()
            )));
        };
        let Ok(token) = value.to_str() else {
            return Some(Err(format!(
                "the {header} header is not text, so it is no token"
            )));
        };
        Some(self.verify(settings, token).await)
    }

    async fn verify(
        &self,
        settings: &WorkloadTokenSettings,
        token: &str,
    ) -> Result<Verified, String> {
        let header = &settings.header;
        let refused = |why: String| format!("the workload token in {header} was refused: {why}");
        let named = unverified_issuer(token).map_err(|e| refused(e.to_string()))?;
        let Some(trusted) = settings.issuer(&named) else {
            let listed: Vec<&str> = settings.issuers.iter().map(|i| i.issuer.as_str()).collect();
            return Err(refused(format!(
                "its issuer {named} is not one the policy trusts ({SETTING}: {})",
                listed.join(", ")
            )));
        };
        let claims = self
            .issuer(&trusted.issuer)
            .verify(token, &trusted.audience, None)
            .await
            .map_err(|e| refused(e.to_string()))?;
        Ok(Verified {
            issuer: trusted.issuer.clone(),
            subject: claims.subject().to_string(),
        })
    }

    fn issuer(&self, url: &str) -> Arc<Issuer> {
        let mut issuers = self.issuers.lock().unwrap_or_else(|e| e.into_inner());
        issuers
            .entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(Issuer::new(url.to_string(), SETTING, self.fetcher.clone()))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::policy::{DEFAULT_TOKEN_HEADER, TokenIssuer};

    /// RS256 in form, signed by nobody: iss https://elsewhere.example, exp 2100.
    const UNTRUSTED: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2Vsc2V3aGVyZS5leGFtcGxlIiwic3ViIjoic3lzdGVtOnNlcnZpY2VhY2NvdW50OmNybTpiaWxsaW5nIiwiYXVkIjpbIndhcmRlbiJdLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6NDEwMjQ0NDgwMH0.c2lnbmF0dXJl";
    /// The same from the trusted issuer, expired in 2023.
    const EXPIRED: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2s4cy5leGFtcGxlIiwic3ViIjoic3lzdGVtOnNlcnZpY2VhY2NvdW50OmNybTpiaWxsaW5nIiwiYXVkIjpbIndhcmRlbiJdLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6MTcwMDAwMDAwMH0.c2lnbmF0dXJl";

    fn settings() -> WorkloadTokenSettings {
        WorkloadTokenSettings {
            issuers: vec![TokenIssuer {
                issuer: "https://k8s.example".into(),
                audience: "warden".into(),
            }],
            header: DEFAULT_TOKEN_HEADER.into(),
        }
    }

    /// Every case here is refused before anything is fetched: the issuer
    /// is never reachable.
    fn tokens() -> WorkloadTokens {
        let tls = crate::tls::upstream_config(&[], &[]).expect("a TLS client config");
        WorkloadTokens::new(Fetcher::new(tls))
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-other", HeaderValue::from_static("kept"));
        for value in values {
            headers.append(DEFAULT_TOKEN_HEADER, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    async fn refusal(values: &[&str]) -> String {
        let mut headers = headers(values);
        let taken = tokens().take(&settings(), &mut headers).await;
        assert!(
            !headers.contains_key(DEFAULT_TOKEN_HEADER),
            "the header is always removed"
        );
        assert_eq!(headers["x-other"], "kept");
        match taken {
            Some(Err(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn without_the_header_nothing_changes() {
        let mut headers = headers(&[]);
        assert_eq!(tokens().take(&settings(), &mut headers).await, None);
        assert_eq!(headers.len(), 1);
    }

    #[tokio::test]
    async fn what_is_refused_is_taken_out_and_says_why() {
        let why = refusal(&[UNTRUSTED]).await;
        assert!(
            why.starts_with("the workload token in x-warden-workload-token was refused: ")
                && why.contains(
                    "its issuer https://elsewhere.example is not one the policy trusts \
                     (workload_tokens.issuers: https://k8s.example)"
                ),
            "{why}"
        );
        assert!(refusal(&[EXPIRED]).await.contains("the token has expired"));
        assert!(
            refusal(&["not-a-token"])
                .await
                .contains("this is not a signed JWT")
        );
        assert!(
            refusal(&[EXPIRED, UNTRUSTED])
                .await
                .contains("the request carries 2 x-warden-workload-token headers")
        );
    }
}
