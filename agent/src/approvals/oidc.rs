//! OpenID Connect ID tokens checked against the issuer's discovery
//! document and keys (signature, issuer, audience, expiry): reviewers'
//! tokens ([`Verifier`], with the groups read from a configurable claim),
//! and the tokens workloads present ([`Issuer`], used by the proxy).
use std::{collections::HashMap, time::Duration};

use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, CsrfToken, IdToken, IdTokenClaims,
    IssuerUrl, Nonce, PkceCodeChallenge, SignatureVerificationError,
    core::{
        CoreGenderClaim, CoreIdTokenVerifier, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
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
        "the identity provider {issuer} cannot be read ({source}); check `{setting}` and that the provider is up"
    )]
    Provider {
        issuer: String,
        /// Where the policy names the issuer: "approvals.oidc.issuer".
        setting: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("this is not a signed JWT ({0}); pass the ID token itself, not an opaque access token")]
    Malformed(String),
    #[error(
        "the token's signature does not verify against the keys of {0}; it is forged or from another provider"
    )]
    Signature(String),
    #[error("the token has expired; sign in again, or present a fresh token")]
    Expired,
    #[error(
        "the token was issued to another client or audience ({got}); it must be issued to `{want}`"
    )]
    Audience { got: String, want: String },
    #[error("the token is from another issuer ({0})")]
    Issuer(String),
    #[error("the token was refused: {0}")]
    Invalid(String),
}

/// Claims besides the standard ones, for the groups claim, whatever its
/// name.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct OtherClaims {
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

/// What a token says, once its signature, issuer, audience and expiry hold.
pub type Claims = IdTokenClaims<OtherClaims, CoreGenderClaim>;

/// The provider's keys are fetched again, at most this often, when a token
/// names a key the agent does not have (the provider rotated its keys).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(30);

/// Signatures by public keys only: a shared-secret (HS*) or unsigned token
/// could be made by anyone who holds the secret, or by anyone.
const ALLOWED_ALGS: [CoreJwsSigningAlgorithm; 9] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// The issuer a token names, before anything of it is verified: only to
/// pick which trusted issuer's keys verify it. An expired token is refused
/// here already.
pub fn unverified_issuer(token: &str) -> Result<String, TokenError> {
    let token: Token = token
        .trim()
        .parse()
        .map_err(|e: serde_json::Error| TokenError::Malformed(e.to_string()))?;
    let peek = CoreIdTokenVerifier::new_insecure_without_verification();
    match token.claims(&peek, |_: Option<&Nonce>| Ok(())) {
        Ok(claims) => Ok(claims.issuer().to_string()),
        Err(ClaimsVerificationError::Expired(_)) => Err(TokenError::Expired),
        Err(other) => Err(TokenError::Invalid(other.to_string())),
    }
}

/// The parts of a discovery document the agent uses. Only `issuer` and
/// `jwks_uri` are required: a Kubernetes API server's document has no
/// endpoints for signing in.
#[derive(Clone, Debug, Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
}

#[derive(Clone)]
struct Discovered {
    document: Discovery,
    keys: CoreJsonWebKeySet,
}

/// One issuer of tokens: its discovery document and keys, read when first
/// needed and again when a token names a key the agent does not have.
pub struct Issuer {
    issuer: String,
    setting: &'static str,
    fetcher: Fetcher,
    discovered: Mutex<Option<(Discovered, Instant)>>,
}

impl Issuer {
    /// `setting`: where the policy names `issuer`, for messages.
    pub fn new(issuer: String, setting: &'static str, fetcher: Fetcher) -> Issuer {
        Issuer {
            issuer,
            setting,
            fetcher,
            discovered: Mutex::new(None),
        }
    }

    /// Reads the discovery document and keys now, so that a wrong issuer
    /// shows at start rather than at the first token.
    pub async fn discover(&self) -> Result<(), TokenError> {
        self.discovered(true).await.map(|_| ())
    }

    /// Checks `token`'s signature, issuer, expiry, and that it is issued to
    /// `audience` (and to nobody else); with `nonce`, that it carries it.
    pub async fn verify(
        &self,
        token: &str,
        audience: &str,
        nonce: Option<&Nonce>,
    ) -> Result<Claims, TokenError> {
        let token: Token = token
            .trim()
            .parse()
            .map_err(|e: serde_json::Error| TokenError::Malformed(e.to_string()))?;
        let discovered = self.discovered(false).await?;
        match self.check(&token, &discovered, audience, nonce) {
            Err(TokenError::Signature(_)) if self.may_refresh().await => {
                let discovered = self.discovered(true).await?;
                self.check(&token, &discovered, audience, nonce)
            }
            checked => checked,
        }
    }

    fn check(
        &self,
        token: &Token,
        discovered: &Discovered,
        audience: &str,
        nonce: Option<&Nonce>,
    ) -> Result<Claims, TokenError> {
        let issuer = IssuerUrl::new(discovered.document.issuer.clone())
            .map_err(|e| TokenError::Invalid(format!("the issuer is not a URL: {e}")))?;
        let verifier = CoreIdTokenVerifier::new_public_client(
            ClientId::new(audience.to_string()),
            issuer,
            discovered.keys.clone(),
        )
        .set_allowed_algs(ALLOWED_ALGS);
        // Tokens handed to the control API, and workloads' tokens, come from
        // a sign-in the agent did not start: no nonce of ours to compare.
        let nonce_check = |got: Option<&Nonce>| match (nonce, got) {
            (None, _) => Ok(()),
            (Some(want), Some(got)) if want.secret() == got.secret() => Ok(()),
            _ => Err("the nonce is not the one this sign-in sent".to_string()),
        };
        token
            .claims(&verifier, nonce_check)
            .cloned()
            .map_err(|e| match e {
                ClaimsVerificationError::Expired(_) => TokenError::Expired,
                ClaimsVerificationError::InvalidAudience(got) => TokenError::Audience {
                    got,
                    want: audience.to_string(),
                },
                ClaimsVerificationError::InvalidIssuer(m) => TokenError::Issuer(m),
                ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey
                    | SignatureVerificationError::CryptoError(_)
                    | SignatureVerificationError::AmbiguousKeyId(_),
                ) => TokenError::Signature(self.issuer.clone()),
                other => TokenError::Invalid(other.to_string()),
            })
    }

    async fn may_refresh(&self) -> bool {
        self.discovered
            .lock()
            .await
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= REFRESH_AT_MOST_EVERY)
    }

    async fn discovered(&self, refresh: bool) -> Result<Discovered, TokenError> {
        let mut cached = self.discovered.lock().await;
        if !refresh && let Some((discovered, _)) = cached.as_ref() {
            return Ok(discovered.clone());
        }
        let failed = |reason: String| TokenError::Provider {
            issuer: self.issuer.clone(),
            setting: self.setting,
            source: Box::new(DiscoveryFailed(reason)),
        };
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let document: Discovery = serde_json::from_slice(&self.get(&url).await.map_err(failed)?)
            .map_err(|e| failed(format!("{url}: not a discovery document: {e}")))?;
        if document.issuer != self.issuer {
            return Err(failed(format!(
                "{url} says its issuer is {:?}; write that exact URL in the policy",
                document.issuer
            )));
        }
        let keys: CoreJsonWebKeySet = serde_json::from_slice(
            &self.get(&document.jwks_uri).await.map_err(failed)?,
        )
        .map_err(|e| {
            failed(format!(
                "{}: not a JSON Web Key Set: {e}",
                document.jwks_uri
            ))
        })?;
        let discovered = Discovered { document, keys };
        *cached = Some((discovered.clone(), Instant::now()));
        Ok(discovered)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let request = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let answer = self
            .fetcher
            .send(request)
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status().is_success() {
            return Err(format!("{url} answered {}", answer.status()));
        }
        Ok(answer.into_body())
    }

    /// A sign-in endpoint of the discovery document (`key` names it, for
    /// messages): a Kubernetes API server's has none.
    async fn endpoint(
        &self,
        key: &str,
        pick: fn(Discovery) -> Option<String>,
    ) -> Result<String, TokenError> {
        pick(self.discovered(false).await?.document).ok_or_else(|| {
            TokenError::Invalid(format!(
                "the provider {} has no {key}, so reviewers cannot sign in through it",
                self.issuer
            ))
        })
    }
}

pub struct Verifier {
    settings: OidcSettings,
    fetcher: Fetcher,
    issuer: Issuer,
}

impl Verifier {
    pub fn new(settings: OidcSettings, fetcher: Fetcher) -> Verifier {
        Verifier {
            issuer: Issuer::new(
                settings.issuer.clone(),
                "approvals.oidc.issuer",
                fetcher.clone(),
            ),
            settings,
            fetcher,
        }
    }

    /// Reads the discovery document and keys now, so that a wrong issuer
    /// shows at start rather than at the first review.
    pub async fn discover(&self) -> Result<(), TokenError> {
        self.issuer.discover().await
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
        let claims = self
            .issuer
            .verify(token, &self.settings.client_id, nonce)
            .await?;
        Ok(self.reviewer(&claims))
    }

    /// Where to send a reviewer to sign in (authorization code flow with
    /// PKCE), and what the callback needs to finish.
    pub async fn sign_in(&self, redirect_uri: &str) -> Result<(String, SignIn), TokenError> {
        let endpoint = self
            .issuer
            .endpoint("authorization_endpoint", |d| d.authorization_endpoint)
            .await?;
        let mut url = openidconnect::url::Url::parse(&endpoint).map_err(|e| {
            TokenError::Invalid(format!("the authorization endpoint {endpoint:?}: {e}"))
        })?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = CsrfToken::new_random();
        let nonce = Nonce::new_random();
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
        let endpoint = self
            .issuer
            .endpoint("token_endpoint", |d| d.token_endpoint)
            .await?;
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
        let request = http::Request::post(endpoint.as_str())
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
                setting: "approvals.oidc.issuer",
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

    fn reviewer(&self, claims: &Claims) -> Reviewer {
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
        Reviewer {
            subject: claims.subject().to_string(),
            email: claims.email().map(|e| e.to_string()),
            username: claims.preferred_username().map(|u| u.to_string()),
            name: claims
                .name()
                .and_then(|n| n.get(None))
                .map(|n| n.to_string()),
            groups,
        }
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
