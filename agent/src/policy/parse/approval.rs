//! The parts of a policy about holding statements and requests for
//! approval: a rule's `approve`, the top-level `approvals` section (how
//! reviewers sign in, with its OIDC client secret read like a credential's),
//! a workload's `owners`, and their scalars. Whether a rule may say
//! `action: approve` at all is checked by [`super::Ctx`].

use std::time::Duration;

use serde::de::{self, MapAccess};

use super::{
    Ctx, DurationP, Fields, Keys, Many, Mapping, One, Parse, fail,
    request::{EnvKeyP, KeyFileP},
};
use crate::policy::{ApprovalRule, ApprovalSettings, OidcSettings};

pub(crate) const APPROVE: Fields = Fields {
    what: "in a rule's approve",
    known: &["groups", "quorum", "expires", "message"],
    later: &[],
    instead: &[
        ("group", "write `groups:`, which takes one group or a list"),
        (
            "reviewers",
            "reviewers are named by their OIDC groups: `groups: [dba]`",
        ),
        (
            "approvers",
            "approvers are named by their OIDC groups: `groups: [dba]`",
        ),
        (
            "users",
            "reviewers are named by their OIDC groups: `groups: [dba]`",
        ),
        (
            "approvals",
            "write `quorum:`, the number of distinct reviewers",
        ),
        ("min_approvals", "write `quorum:`"),
        ("timeout", "write `expires:`, e.g. `expires: 15m`"),
        ("ttl", "write `expires:`, e.g. `expires: 15m`"),
        ("expiry", "write `expires:`, e.g. `expires: 15m`"),
        ("expire", "write `expires:`, e.g. `expires: 15m`"),
        ("reason", "write `message:`"),
    ],
};

pub(crate) const APPROVALS: Fields = Fields {
    what: "under approvals",
    known: &["oidc", "webhook"],
    later: &[],
    instead: &[
        (
            "issuer",
            "the issuer goes under oidc: `oidc: { issuer: https://login.example.com, client_id: \
             warden }`",
        ),
        (
            "client_id",
            "the client id goes under oidc: `oidc: { issuer: https://login.example.com, \
             client_id: warden }`",
        ),
        ("slack", "write `webhook:`, with the incoming webhook's URL"),
        ("webhook_url", "write `webhook:`"),
        (
            "groups",
            "who may approve is said per rule: `approve: { groups: [dba] }`",
        ),
    ],
};

pub(crate) const OIDC: Fields = Fields {
    what: "under approvals.oidc",
    known: &[
        "issuer",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "groups_claim",
    ],
    later: &[],
    instead: &[
        ("issuer_url", "write `issuer:`"),
        ("url", "write `issuer:`"),
        ("discovery_url", "write `issuer:`, without /.well-known/..."),
        (
            "audience",
            "write `client_id:`, the audience ID tokens are issued to",
        ),
        ("client", "write `client_id:`"),
        (
            "client_secret",
            "a secret never goes in the policy: write `client_secret_env: VARIABLE` or \
             `client_secret_file: /path/to/file`",
        ),
        (
            "groups",
            "write `groups_claim:`, the claim that lists a reviewer's groups",
        ),
        ("claim", "write `groups_claim:`"),
    ],
};

/// The longest an approval may wait: `expires` at most.
pub(super) const MAX_EXPIRES: Duration = Duration::from_secs(7 * 86400);

/// The longest `message`: it goes in a PostgreSQL notice and an HTTP header.
const MAX_MESSAGE: usize = 200;

const DEFAULT_GROUPS_CLAIM: &str = "groups";

// ---------------------------------------------------------------------------
// A rule's `approve`

pub(super) struct ApproveKeys {
    /// "rule `r`".
    owner: String,
    groups: Option<Vec<String>>,
    quorum: Option<u32>,
    expires: Option<Duration>,
    message: Option<String>,
}

impl ApproveKeys {
    pub(super) fn new(ctx: &Ctx) -> ApproveKeys {
        ApproveKeys {
            owner: format!("rule `{}`", ctx.current_rule()),
            groups: None,
            quorum: None,
            expires: None,
            message: None,
        }
    }
}

impl<'de> Keys<'de> for ApproveKeys {
    type Value = ApprovalRule;

    fn fields(&self) -> &'static Fields {
        &APPROVE
    }

    fn expecting(&self) -> String {
        "approve: a mapping with groups, and optionally quorum, expires and message".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "groups" => {
                let mut groups = Many::new(GroupP, "group");
                groups.when_empty = Some(
                    "this list is empty, so nobody could approve; give at least one group, e.g. \
                     `groups: [dba]`",
                );
                self.groups = Some(map.next_value_seed(groups)?)
            }
            "quorum" => self.quorum = Some(map.next_value_seed(One(QuorumP))?),
            "expires" => self.expires = Some(map.next_value_seed(One(ExpiresP))?),
            "message" => self.message = Some(map.next_value_seed(One(MessageP))?),
            _ => unreachable!("{key} is in APPROVE.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<ApprovalRule, E> {
        let Some(groups) = self.groups else {
            return Err(fail(format!(
                "the approve of {} names no groups, so nobody could approve; write e.g. \
                 `approve: {{ groups: [dba] }}` (reviewers in one of these OIDC groups approve)",
                self.owner
            )));
        };
        Ok(ApprovalRule {
            groups,
            quorum: self.quorum.unwrap_or(ApprovalRule::DEFAULT_QUORUM),
            expires: self.expires.unwrap_or(ApprovalRule::DEFAULT_EXPIRES),
            message: self.message,
        })
    }
}

// ---------------------------------------------------------------------------
// The `approvals` section

pub(super) struct ApprovalsKeys<'c> {
    ctx: &'c Ctx,
    oidc: Option<OidcSettings>,
    webhook: Option<String>,
}

impl<'c> ApprovalsKeys<'c> {
    pub(super) fn new(ctx: &'c Ctx) -> ApprovalsKeys<'c> {
        ApprovalsKeys {
            ctx,
            oidc: None,
            webhook: None,
        }
    }
}

impl<'de> Keys<'de> for ApprovalsKeys<'_> {
    type Value = ApprovalSettings;

    fn fields(&self) -> &'static Fields {
        &APPROVALS
    }

    fn expecting(&self) -> String {
        "approvals: a mapping with oidc, and optionally webhook".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "oidc" => self.oidc = Some(map.next_value_seed(Mapping(OidcKeys::new(self.ctx)))?),
            "webhook" => self.webhook = Some(map.next_value_seed(One(UrlP::Webhook))?),
            _ => unreachable!("{key} is in APPROVALS.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<ApprovalSettings, E> {
        let Some(oidc) = self.oidc else {
            return Err(fail(
                "approvals needs `oidc: { issuer, client_id }`: the identity provider reviewers \
                 sign in with; write e.g. `oidc: { issuer: https://login.example.com, client_id: \
                 warden }`",
            ));
        };
        Ok(ApprovalSettings {
            oidc,
            webhook: self.webhook,
        })
    }
}

struct OidcKeys<'c> {
    ctx: &'c Ctx,
    issuer: Option<String>,
    client_id: Option<String>,
    /// "client_secret_env" or "client_secret_file", once read.
    source: Option<&'static str>,
    /// Read on the second reading only.
    client_secret: Option<String>,
    groups_claim: Option<String>,
}

impl<'c> OidcKeys<'c> {
    fn new(ctx: &'c Ctx) -> OidcKeys<'c> {
        OidcKeys {
            ctx,
            issuer: None,
            client_id: None,
            source: None,
            client_secret: None,
            groups_claim: None,
        }
    }
}

/// Who reads the client secret, for messages.
const OIDC_OWNER: &str = "approvals.oidc";

impl<'de> Keys<'de> for OidcKeys<'_> {
    type Value = OidcSettings;

    fn fields(&self) -> &'static Fields {
        &OIDC
    }

    fn expecting(&self) -> String {
        "oidc: a mapping with issuer and client_id, and optionally client_secret_env or \
         client_secret_file, and groups_claim"
            .into()
    }

    /// The second source of the secret: at its key.
    fn check(&self, key: &'static str) -> Result<(), String> {
        match (key, self.source) {
            ("client_secret_env" | "client_secret_file", Some(first)) => Err(format!(
                "approvals.oidc has both {first} and {key}; keep one: the client secret is read \
                 from one place"
            )),
            _ => Ok(()),
        }
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        match key {
            "issuer" => self.issuer = Some(map.next_value_seed(One(UrlP::Issuer))?),
            "client_id" => self.client_id = Some(map.next_value_seed(One(ClientIdP))?),
            "client_secret_env" => {
                self.client_secret = map.next_value_seed(One(EnvKeyP {
                    ctx,
                    owner: OIDC_OWNER,
                    key,
                    example: "WARDEN_OIDC_SECRET",
                }))?;
                self.source = Some(key);
            }
            "client_secret_file" => {
                self.client_secret = map.next_value_seed(One(KeyFileP {
                    ctx,
                    owner: OIDC_OWNER,
                    key,
                    example: "/etc/warden/secrets/oidc",
                }))?;
                self.source = Some(key);
            }
            "groups_claim" => self.groups_claim = Some(map.next_value_seed(One(ClaimP))?),
            _ => unreachable!("{key} is in OIDC.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<OidcSettings, E> {
        let Some(issuer) = self.issuer else {
            return Err(fail(
                "approvals.oidc has no issuer; write the identity provider's URL, e.g. `issuer: \
                 https://login.example.com` (its /.well-known/openid-configuration is read)",
            ));
        };
        let Some(client_id) = self.client_id else {
            return Err(fail(
                "approvals.oidc has no client_id; write the client id Warden is registered with \
                 at the identity provider, e.g. `client_id: warden`",
            ));
        };
        Ok(OidcSettings {
            issuer,
            client_id,
            client_secret: self.client_secret,
            groups_claim: self
                .groups_claim
                .unwrap_or_else(|| DEFAULT_GROUPS_CLAIM.to_string()),
        })
    }
}

// ---------------------------------------------------------------------------
// Scalars

/// An OIDC group a reviewer must be in.
#[derive(Clone, Copy)]
struct GroupP;

impl Parse for GroupP {
    type Out = String;
    fn expecting(&self) -> String {
        "an OIDC group such as dba".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.trim().is_empty() || s.trim() != s || s.chars().any(char::is_control) {
            return Err(format!(
                "{s:?} is not a group; write a group as the identity provider puts it in the \
                 groups claim, e.g. `groups: [dba]`"
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

/// `quorum`: how many distinct reviewers.
#[derive(Clone, Copy)]
struct QuorumP;

impl Parse for QuorumP {
    type Out = u32;
    fn expecting(&self) -> String {
        "a number of reviewers such as 2".into()
    }
    fn text(&self, s: &str) -> Result<u32, String> {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return self.int(t.parse::<i128>().unwrap_or(i128::MAX));
        }
        Err(format!(
            "{s:?} is not a number of reviewers; write e.g. `quorum: 2`"
        ))
    }
    fn int(&self, n: i128) -> Result<u32, String> {
        match u32::try_from(n) {
            Ok(0) => Err(
                "quorum 0 would release without any reviewer; write 1 (the default) or more".into(),
            ),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "{n} is not a number of reviewers; write a positive number such as 2"
            )),
        }
    }
}

/// `expires`: a duration, at most [`MAX_EXPIRES`].
#[derive(Clone, Copy)]
struct ExpiresP;

impl Parse for ExpiresP {
    type Out = Duration;
    fn expecting(&self) -> String {
        "a duration such as 15m, 1h or 1d".into()
    }
    fn text(&self, s: &str) -> Result<Duration, String> {
        let d = DurationP.text(s)?;
        if d > MAX_EXPIRES {
            return Err(format!(
                "expires {s} is longer than 7 days, the longest a statement or request may wait \
                 for approval; write 7d or less"
            ));
        }
        Ok(d)
    }
    fn int(&self, n: i128) -> Result<Duration, String> {
        DurationP.int(n)
    }
}

/// `message`: one line for the requester, in a notice and a header.
#[derive(Clone, Copy)]
struct MessageP;

impl Parse for MessageP {
    type Out = String;
    fn expecting(&self) -> String {
        "a message such as \"a DBA must approve writes to crm\"".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.trim().is_empty() {
            return Err(
                "the message is empty; write one line for whoever waits, or leave `message` out"
                    .into(),
            );
        }
        if s.chars().any(char::is_control) {
            return Err(
                "the message has a line break or another control character; it is one line (it \
                 goes in a PostgreSQL notice and an HTTP header)"
                    .into(),
            );
        }
        if s.chars().count() > MAX_MESSAGE {
            return Err(format!(
                "the message is {} characters long; keep it to {MAX_MESSAGE} (it goes in a \
                 PostgreSQL notice and an HTTP header)",
                s.chars().count()
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

/// An http(s) URL: the OIDC issuer, or the webhook.
#[derive(Clone, Copy)]
pub(super) enum UrlP {
    Issuer,
    Webhook,
}

impl Parse for UrlP {
    type Out = String;
    fn expecting(&self) -> String {
        match self {
            UrlP::Issuer => "an issuer URL such as https://login.example.com".into(),
            UrlP::Webhook => "a webhook URL such as https://hooks.slack.com/services/...".into(),
        }
    }
    fn text(&self, s: &str) -> Result<String, String> {
        // A webhook's URL is often its secret: it is never echoed.
        let (key, shown, example) = match self {
            UrlP::Issuer => ("issuer", format!("{s:?}"), "https://login.example.com"),
            UrlP::Webhook => (
                "webhook",
                "this value".to_string(),
                "https://hooks.slack.com/services/...",
            ),
        };
        let scheme_ok = s.starts_with("https://") || s.starts_with("http://");
        let uri = s
            .parse::<http::Uri>()
            .ok()
            .filter(|_| scheme_ok && !s.contains(char::is_whitespace) && !s.contains('#'));
        let Some(uri) = uri.filter(|u| u.host().is_some_and(|h| !h.is_empty())) else {
            return Err(format!(
                "{key} takes an http or https URL, e.g. {example}; {shown} is not one"
            ));
        };
        if matches!(self, UrlP::Issuer) {
            if uri.query().is_some() {
                return Err(format!(
                    "issuer {s:?} has a query; an issuer is a URL without query or fragment, \
                     e.g. {example}"
                ));
            }
            if uri.path().contains("/.well-known/") {
                let base = s.split("/.well-known/").next().unwrap_or(s);
                return Err(format!(
                    "issuer {s:?} is a discovery document; write the issuer itself: `issuer: \
                     {base}` (its /.well-known/openid-configuration is read)"
                ));
            }
        }
        Ok(s.to_string())
    }
}

/// `client_id`.
#[derive(Clone, Copy)]
struct ClientIdP;

impl Parse for ClientIdP {
    type Out = String;
    fn expecting(&self) -> String {
        "a client id such as warden".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.contains(char::is_whitespace) || s.chars().any(char::is_control) {
            return Err(format!(
                "{s:?} is not a client id; write the id Warden is registered with at the \
                 identity provider, e.g. `client_id: warden`"
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

/// `groups_claim`: the name of a claim of the ID token.
#[derive(Clone, Copy)]
struct ClaimP;

impl Parse for ClaimP {
    type Out = String;
    fn expecting(&self) -> String {
        "a claim name such as groups".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.contains(char::is_whitespace) || s.chars().any(char::is_control) {
            return Err(format!(
                "{s:?} is not a claim name; write the ID token's claim that lists a reviewer's \
                 groups, e.g. `groups_claim: groups` (the default) or `groups_claim: roles`"
            ));
        }
        Ok(s.to_string())
    }
}

/// A workload's owner: an OIDC subject, an email or a username.
#[derive(Clone, Copy)]
pub(super) struct OwnerP;

impl Parse for OwnerP {
    type Out = String;
    fn expecting(&self) -> String {
        "an owner: an OIDC subject, an email or a username such as alice@example.com".into()
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.contains(char::is_whitespace) || s.chars().any(char::is_control) {
            return Err(format!(
                "{s:?} is not an owner; write the person's OIDC subject, email or username, \
                 e.g. `owners: [alice@example.com]`"
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}
