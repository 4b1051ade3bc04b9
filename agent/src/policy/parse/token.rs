//! The parts of a policy about the tokens workloads present: the top-level
//! `workload_tokens` section (the issuers trusted, each with the audience
//! its tokens must have, and the header requests carry a token in) and a
//! rule's `token` matcher. Whether a rule may have a `token` matcher at all
//! (the file trusts an issuer) is checked by [`super::WhenKeys`].

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{Ctx, Fields, GlobP, Keys, Many, Mapping, One, Parse, approval::UrlP, fail};
use crate::policy::{DEFAULT_TOKEN_HEADER, TokenIssuer, TokenMatcher, WorkloadTokenSettings};

pub(crate) const WORKLOAD_TOKENS: Fields = Fields {
    what: "under workload_tokens",
    known: &["issuers", "header"],
    later: &[],
    instead: &[
        (
            "issuer",
            "issuers go in a list: `issuers: [{ issuer: https://kubernetes.default.svc, \
             audience: warden }]`",
        ),
        (
            "audience",
            "each issuer has its audience: `issuers: [{ issuer: https://kubernetes.default.svc, \
             audience: warden }]`",
        ),
        ("header_name", "write `header:`"),
        ("headers", "write `header:`, one header name"),
    ],
};

pub(crate) const TOKEN_ISSUER: Fields = Fields {
    what: "in an issuer of workload_tokens.issuers",
    known: &["issuer", "audience"],
    later: &[],
    instead: &[
        ("url", "write `issuer:`"),
        ("issuer_url", "write `issuer:`"),
        ("discovery_url", "write `issuer:`, without /.well-known/..."),
        ("aud", "write `audience:`"),
        (
            "client_id",
            "write `audience:`, what the tokens' aud must be",
        ),
    ],
};

pub(crate) const TOKEN: Fields = Fields {
    what: "in a rule's token",
    known: &["subject", "issuer"],
    later: &[],
    instead: &[
        ("sub", "write `subject:`"),
        (
            "service_account",
            "write the token's subject: `subject: \"system:serviceaccount:crm:*\"`",
        ),
        (
            "audience",
            "every token's audience is checked against its issuer's `audience` under \
             workload_tokens.issuers",
        ),
    ],
};

/// Headers that carry something else: a token in one of them would be
/// taken from, or sent as, what the request means by it.
const NOT_A_TOKEN_HEADER: [&str; 9] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
];

const SUBJECT_EXAMPLE: &str = "\"system:serviceaccount:crm:*\"";

// ---------------------------------------------------------------------------
// The `workload_tokens` section

#[derive(Default)]
pub(super) struct WorkloadTokensKeys {
    issuers: Option<Vec<TokenIssuer>>,
    header: Option<String>,
}

impl<'de> Keys<'de> for WorkloadTokensKeys {
    type Value = WorkloadTokenSettings;

    fn fields(&self) -> &'static Fields {
        &WORKLOAD_TOKENS
    }

    fn expecting(&self) -> String {
        "workload_tokens: a mapping with issuers, and optionally header".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "issuers" => self.issuers = Some(map.next_value_seed(IssuersSeed)?),
            "header" => self.header = Some(map.next_value_seed(One(HeaderP))?),
            _ => unreachable!("{key} is in WORKLOAD_TOKENS.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<WorkloadTokenSettings, E> {
        let Some(issuers) = self.issuers else {
            return Err(fail(
                "workload_tokens has no issuers; write the issuers whose tokens the agent \
                 trusts, e.g. `issuers: [{ issuer: https://kubernetes.default.svc, audience: \
                 warden }]`",
            ));
        };
        Ok(WorkloadTokenSettings {
            issuers,
            header: self
                .header
                .unwrap_or_else(|| DEFAULT_TOKEN_HEADER.to_string()),
        })
    }
}

/// `issuers`: a list of `{ issuer, audience }`, each issuer once.
struct IssuersSeed;

impl<'de> DeserializeSeed<'de> for IssuersSeed {
    type Value = Vec<TokenIssuer>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<TokenIssuer>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for IssuersSeed {
    type Value = Vec<TokenIssuer>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of issuers, each `- { issuer: https://..., audience: warden }`")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<TokenIssuer>, A::Error> {
        let mut issuers: Vec<TokenIssuer> = Vec::new();
        while let Some(issuer) = seq.next_element_seed(Mapping(IssuerKeys::default()))? {
            if issuers.iter().any(|i| i.issuer == issuer.issuer) {
                return Err(fail(format!(
                    "issuer {:?} is listed twice under workload_tokens.issuers; list it once, \
                     with the audience its tokens are issued to",
                    issuer.issuer
                )));
            }
            issuers.push(issuer);
        }
        if issuers.is_empty() {
            return Err(fail(
                "workload_tokens.issuers is empty, so no token could be trusted; list at least \
                 one issuer, or remove workload_tokens",
            ));
        }
        Ok(issuers)
    }
}

#[derive(Default)]
struct IssuerKeys {
    issuer: Option<String>,
    audience: Option<String>,
}

impl<'de> Keys<'de> for IssuerKeys {
    type Value = TokenIssuer;

    fn fields(&self) -> &'static Fields {
        &TOKEN_ISSUER
    }

    fn expecting(&self) -> String {
        "an issuer: a mapping with issuer and audience".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "issuer" => self.issuer = Some(map.next_value_seed(One(UrlP::Issuer))?),
            "audience" => self.audience = Some(map.next_value_seed(One(AudienceP))?),
            _ => unreachable!("{key} is in TOKEN_ISSUER.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<TokenIssuer, E> {
        let Some(issuer) = self.issuer else {
            return Err(fail(
                "this issuer has no `issuer`; write the URL its tokens name in `iss`, e.g. \
                 `issuer: https://kubernetes.default.svc` (its /.well-known/openid-configuration \
                 is read)",
            ));
        };
        let Some(audience) = self.audience else {
            return Err(fail(format!(
                "issuer {issuer:?} has no audience; write what its tokens' aud must be, e.g. \
                 `audience: warden`: a token issued for another service is refused"
            )));
        };
        Ok(TokenIssuer { issuer, audience })
    }
}

// ---------------------------------------------------------------------------
// A rule's `token` matcher

pub(super) struct TokenKeys<'c> {
    ctx: &'c Ctx,
    matcher: TokenMatcher,
}

impl<'c> TokenKeys<'c> {
    pub(super) fn new(ctx: &'c Ctx) -> TokenKeys<'c> {
        TokenKeys {
            ctx,
            matcher: TokenMatcher::default(),
        }
    }
}

impl<'de> Keys<'de> for TokenKeys<'_> {
    type Value = TokenMatcher;

    fn fields(&self) -> &'static Fields {
        &TOKEN
    }

    fn expecting(&self) -> String {
        format!(
            "a token matcher: a mapping with some of {} (`token: {{}}`: any valid token)",
            TOKEN.known.join(", ")
        )
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let m = &mut self.matcher;
        match key {
            "subject" => {
                m.subject = Some(map.next_value_seed(Many::new(GlobP(SUBJECT_EXAMPLE), "subject"))?)
            }
            "issuer" => {
                let issuer = TrustedIssuerP { ctx: self.ctx };
                m.issuer = Some(map.next_value_seed(Many::new(issuer, "issuer"))?)
            }
            _ => unreachable!("{key} is in TOKEN.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<TokenMatcher, E> {
        Ok(self.matcher)
    }
}

// ---------------------------------------------------------------------------
// Scalars

/// `header`: an HTTP header name of its own, lowercase.
#[derive(Clone, Copy)]
struct HeaderP;

impl Parse for HeaderP {
    type Out = String;
    fn expecting(&self) -> String {
        format!("an HTTP header name such as {DEFAULT_TOKEN_HEADER}")
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let name = s.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!(
                "{s:?} is not an HTTP header name; write e.g. `header: {DEFAULT_TOKEN_HEADER}`"
            ));
        }
        if NOT_A_TOKEN_HEADER.contains(&name.as_str()) {
            return Err(format!(
                "{s} carries something else, and the agent removes the token header from every \
                 request; give the token a header of its own, e.g. `header: \
                 {DEFAULT_TOKEN_HEADER}` (the default)"
            ));
        }
        Ok(name)
    }
}

/// `audience`: what a trusted token's `aud` must hold.
#[derive(Clone, Copy)]
struct AudienceP;

impl Parse for AudienceP {
    type Out = String;
    fn expecting(&self) -> String {
        "an audience such as warden".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.contains(char::is_whitespace) || s.chars().any(char::is_control) {
            return Err(format!(
                "{s:?} is not an audience; write what the tokens' aud must be, e.g. `audience: \
                 warden`"
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

/// A `token` matcher's `issuer`: one of `workload_tokens.issuers` (checked
/// on the second reading).
#[derive(Clone, Copy)]
struct TrustedIssuerP<'c> {
    ctx: &'c Ctx,
}

impl Parse for TrustedIssuerP<'_> {
    type Out = String;
    fn expecting(&self) -> String {
        "an issuer listed under workload_tokens.issuers".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let Some(trusted) = self
            .ctx
            .names
            .as_ref()
            .and_then(|n| n.token_issuers.as_ref())
        else {
            return Ok(s.to_string());
        };
        if !trusted.iter().any(|t| t == s) {
            return Err(format!(
                "issuer {s:?} is not listed under workload_tokens.issuers, so no token from it \
                 is ever trusted; listed: {}",
                trusted.join(", ")
            ));
        }
        Ok(s.to_string())
    }
}
