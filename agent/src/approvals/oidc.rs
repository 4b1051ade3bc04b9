//! Reviewers' identity: OpenID Connect ID tokens checked against the
//! issuer's discovery document and keys (signature, issuer, audience,
//! expiry), with the groups read from a configurable claim.
use std::{collections::HashMap, time::Duration};

use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, CsrfToken, IdToken, IssuerUrl, Nonce,
    PkceCodeChallenge, SignatureVerificationError,
    core::{
        CoreGenderClaim, CoreIdTokenVerifier, CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm, CoreProviderMetadata,
    },
};
use serde::{Deserialize, Serialize};
use tokio::{sync::Mutex, time::Instant};

use super::fetch::Fetcher;
use crate::policy::OidcSettings;

/// A reviewer, as their verified ID token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reviewer {
    pub subject: String,
    pub email: Option<String>,
    pub username: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
}

impl Reviewer {
    /// Every name the reviewer goes by, to compare with owners and the
    /// requesting user: subject, email, the email's local part, username.
    pub fn names(&self) -> Vec<&str> {
        let mut names = vec![self.subject.as_str()];
        if let Some(email) = &self.email {
            names.push(email);
            names.extend(email.split('@').next());
        }
        names.extend(self.username.as_deref());
        names
    }

    /// "alice@example.com", else the subject, for messages and rows.
    pub fn display(&self) -> &str {
        self.email.as_deref().unwrap_or(&self.subject)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the identity provider {issuer} cannot be read ({source}); check `approvals.oidc.issuer` and that the provider is up"
    )]
    Provider {
        issuer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "this is not an ID token ({0}); sign in again and pass the ID token, not an access token"
    )]
    Malformed(String),
    #[error(
        "the ID token's signature does not verify against the keys of {0}; it is forged or from another provider"
    )]
    Signature(String),
    #[error("the ID token has expired; sign in again")]
    Expired,
    #[error(
        "the ID token was issued to another client ({0}); sign in through the client `approvals.oidc.client_id` names"
    )]
    Audience(String),
    #[error("the ID token is from another issuer ({0})")]
    Issuer(String),
    #[error("the ID token was refused: {0}")]
    Invalid(String),
}

/// Claims besides the standard ones, for the groups claim, whatever its
/// name.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct OtherClaims {
    #[serde(flatten)]
    claims: HashMap<String, serde_json::Value>,
}

impl AdditionalClaims for OtherClaims {}

type Token = IdToken<
    OtherClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

/// The provider's keys are fetched again, at most this often, when a token
/// names a key the agent does not have (the provider rotated its keys).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(30);

pub struct Verifier {
    settings: OidcSettings,
    fetcher: Fetcher,
    provider: Mutex<Option<(CoreProviderMetadata, Instant)>>,
}

impl Verifier {
    pub fn new(settings: OidcSettings, fetcher: Fetcher) -> Verifier {
        Verifier {
            settings,
            fetcher,
            provider: Mutex::new(None),
        }
    }

    /// Reads the discovery document and keys now, so that a wrong issuer
    /// shows at start rather than at the first review.
    pub async fn discover(&self) -> Result<(), TokenError> {
        self.provider(true).await.map(|_| ())
    }

    /// Checks `token` and says who it names.
    pub async fn verify(&self, token: &str) -> Result<Reviewer, TokenError> {
        self.verify_with(token, None).await
    }

    /// As [`Verifier::verify`]; with `nonce`, the token must carry it (a
    /// sign-in the agent started).
    async fn verify_with(
        &self,
        token: &str,
        nonce: Option<&Nonce>,
    ) -> Result<Reviewer, TokenError> {
        let token: Token = token
            .trim()
            .parse()
            .map_err(|e: serde_json::Error| TokenError::Malformed(e.to_string()))?;
        let provider = self.provider(false).await?;
        match self.check(&token, &provider, nonce) {
            Err(TokenError::Signature(_)) if self.may_refresh().await => {
                let provider = self.provider(true).await?;
                self.check(&token, &provider, nonce)
            }
            checked => checked,
        }
    }

    /// Where to send a reviewer to sign in (authorization code flow with
    /// PKCE), and what the callback needs to finish.
    pub async fn sign_in(&self, redirect_uri: &str) -> Result<(String, SignIn), TokenError> {
        let provider = self.provider(false).await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = CsrfToken::new_random();
        let nonce = Nonce::new_random();
        let mut url = provider.authorization_endpoint().url().clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", "openid email profile")
            .append_pair("state", state.secret())
            .append_pair("nonce", nonce.secret())
            .append_pair("code_challenge", challenge.as_str())
            .append_pair("code_challenge_method", "S256");
        Ok((
            url.to_string(),
            SignIn {
                state: state.secret().clone(),
                verifier: verifier.secret().clone(),
                nonce,
                redirect_uri: redirect_uri.to_string(),
            },
        ))
    }

    /// Exchanges the callback's code for an ID token and checks it (its
    /// nonce included): the raw token and who it names.
    pub async fn finish_sign_in(
        &self,
        sign_in: &SignIn,
        code: &str,
    ) -> Result<(String, Reviewer), TokenError> {
        let provider = self.provider(false).await?;
        let endpoint = provider
            .token_endpoint()
            .ok_or_else(|| TokenError::Invalid("the provider has no token endpoint".into()))?;
        // Built in a block: the serializer is not Send, and must not live
        // across the await below.
        let form = {
            let mut form = openidconnect::url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "authorization_code")
                .append_pair("code", code)
                .append_pair("redirect_uri", &sign_in.redirect_uri)
                .append_pair("code_verifier", &sign_in.verifier)
                .append_pair("client_id", &self.settings.client_id);
            if let Some(secret) = &self.settings.client_secret {
                form.append_pair("client_secret", secret);
            }
            form.finish()
        };
        let request = http::Request::post(endpoint.url().as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(form.into_bytes())
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let answer = self
            .fetcher
            .send(request)
            .await
            .map_err(|e| TokenError::Provider {
                issuer: self.settings.issuer.clone(),
                source: Box::new(e),
            })?;
        let body: serde_json::Value = serde_json::from_slice(answer.body()).unwrap_or_default();
        let Some(token) = body.get("id_token").and_then(|t| t.as_str()) else {
            let why = body
                .get("error_description")
                .or_else(|| body.get("error"))
                .and_then(|e| e.as_str())
                .unwrap_or("no id_token in the answer");
            return Err(TokenError::Invalid(format!(
                "the provider refused the sign-in ({}): {why}",
                answer.status()
            )));
        };
        let reviewer = self.verify_with(token, Some(&sign_in.nonce)).await?;
        Ok((token.to_string(), reviewer))
    }

    fn check(
        &self,
        token: &Token,
        provider: &CoreProviderMetadata,
        nonce: Option<&Nonce>,
    ) -> Result<Reviewer, TokenError> {
        let verifier = CoreIdTokenVerifier::new_public_client(
            ClientId::new(self.settings.client_id.clone()),
            provider.issuer().clone(),
            provider.jwks().clone(),
        );
        // Tokens handed to the control API come from a sign-in the agent did
        // not start, so there is no nonce of ours to compare then.
        let nonce_check = |got: Option<&Nonce>| match (nonce, got) {
            (None, _) => Ok(()),
            (Some(want), Some(got)) if want.secret() == got.secret() => Ok(()),
            _ => Err("the nonce is not the one this sign-in sent".to_string()),
        };
        let claims = token.claims(&verifier, nonce_check).map_err(|e| match e {
            ClaimsVerificationError::Expired(_) => TokenError::Expired,
            ClaimsVerificationError::InvalidAudience(m) => TokenError::Audience(m),
            ClaimsVerificationError::InvalidIssuer(m) => TokenError::Issuer(m),
            ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey
                | SignatureVerificationError::CryptoError(_)
                | SignatureVerificationError::AmbiguousKeyId(_),
            ) => TokenError::Signature(self.settings.issuer.clone()),
            other => TokenError::Invalid(other.to_string()),
        })?;
        let groups = match claims
            .additional_claims()
            .claims
            .get(&self.settings.groups_claim)
        {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        Ok(Reviewer {
            subject: claims.subject().to_string(),
            email: claims.email().map(|e| e.to_string()),
            username: claims.preferred_username().map(|u| u.to_string()),
            name: claims
                .name()
                .and_then(|n| n.get(None))
                .map(|n| n.to_string()),
            groups,
        })
    }

    async fn may_refresh(&self) -> bool {
        self.provider
            .lock()
            .await
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= REFRESH_AT_MOST_EVERY)
    }

    async fn provider(&self, refresh: bool) -> Result<CoreProviderMetadata, TokenError> {
        let mut cached = self.provider.lock().await;
        if !refresh && let Some((provider, _)) = cached.as_ref() {
            return Ok(provider.clone());
        }
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| TokenError::Provider {
            issuer: self.settings.issuer.clone(),
            source,
        };
        let issuer = IssuerUrl::new(self.settings.issuer.clone()).map_err(|e| failed(e.into()))?;
        // Owned futures: a borrowed fetcher makes the future not Send for
        // every lifetime, which the control API's tasks need.
        let fetcher = self.fetcher.clone();
        let client = move |request| {
            let fetcher = fetcher.clone();
            async move { fetcher.send(request).await }
        };
        let provider = CoreProviderMetadata::discover_async(issuer, &client)
            .await
            .map_err(|e| failed(Box::new(DiscoveryFailed(e.to_string()))))?;
        *cached = Some((provider.clone(), Instant::now()));
        Ok(provider)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DiscoveryFailed(String);

/// A sign-in under way, between the redirect to the provider and its
/// callback.
pub struct SignIn {
    pub state: String,
    verifier: String,
    nonce: Nonce,
    redirect_uri: String,
}
