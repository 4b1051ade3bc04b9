//! Reviewers' identity: OpenID Connect ID tokens checked against the
//! issuer's discovery document and keys (signature, issuer, audience,
//! expiry), with the groups read from a configurable claim.
use std::{collections::HashMap, time::Duration};

use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IssuerUrl, Nonce,
    SignatureVerificationError,
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

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Reads the discovery document and keys now, so that a wrong issuer
    /// shows at start rather than at the first review.
    pub async fn discover(&self) -> Result<(), TokenError> {
        self.provider(true).await.map(|_| ())
    }

    /// Checks `token` and says who it names.
    pub async fn verify(&self, token: &str) -> Result<Reviewer, TokenError> {
        let token: Token = token
            .trim()
            .parse()
            .map_err(|e: serde_json::Error| TokenError::Malformed(e.to_string()))?;
        let provider = self.provider(false).await?;
        match self.check(&token, &provider) {
            Err(TokenError::Signature(_)) if self.may_refresh().await => {
                let provider = self.provider(true).await?;
                self.check(&token, &provider)
            }
            checked => checked,
        }
    }

    fn check(
        &self,
        token: &Token,
        provider: &CoreProviderMetadata,
    ) -> Result<Reviewer, TokenError> {
        let verifier = CoreIdTokenVerifier::new_public_client(
            ClientId::new(self.settings.client_id.clone()),
            provider.issuer().clone(),
            provider.jwks().clone(),
        );
        // Tokens handed to the control API come from a sign-in the agent did
        // not start, so there is no nonce of ours to compare.
        let any_nonce = |_: Option<&Nonce>| Ok(());
        let claims = token.claims(&verifier, any_nonce).map_err(|e| match e {
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
