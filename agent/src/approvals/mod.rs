//! Approvals: a request a rule holds (`action: approve`) waits here until
//! reviewers decide. The decoder that held it hands in a [`HoldRequest`] and
//! waits on its [`Ticket`]; reviewers, authenticated by their OIDC ID token
//! ([`oidc`]), approve or reject it through the control API ([`control`]).
//!
//! Segregation of duties is checked here, never in the decoders: a reviewer
//! must be in one of the rule's groups, must not be an owner of the
//! requesting workload nor the requesting process's user, and counts once
//! towards the quorum. Every step is an `approvals` audit row.
//!
//! Pending requests live in the agent's memory: when the agent stops, the
//! held clients' connections close with it, and nothing held runs later.
pub mod control;
pub mod fetch;
pub mod oidc;
pub mod review;
mod tls_listener;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tokio::{sync::oneshot, time::Instant};

pub use self::fetch::Fetcher;
use self::oidc::{Reviewer, TokenError, Verifier};
use self::tls_listener::serve_loopback_tls;
use crate::{
    audit::{ApprovalRow, ApprovalStep, AuditSink},
    identity::Identity,
    lineage::Link,
    policy::{ApprovalRule, ApprovalSettings, LivePolicy},
};

/// What a decoder holds: one statement or request, with what a reviewer
/// needs to decide on it.
#[derive(Clone, Debug)]
pub struct HoldRequest {
    pub session_id: String,
    /// "postgres" or "http".
    pub protocol: &'static str,
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: SocketAddr,
    pub rule: String,
    /// The full statement, or `METHOD host/path`.
    pub request: String,
    /// Protocol details for the reviewer: database, user, class, tables...
    pub context: BTreeMap<&'static str, String>,
    /// The LLM exchange whose answer proposed the request, if known.
    pub caused_by: Option<Link>,
    pub approval: Arc<ApprovalRule>,
}

/// How a held request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The quorum was reached; by these reviewers.
    Approved(Vec<String>),
    Rejected {
        reviewer: String,
        reason: String,
    },
    Expired,
    /// The agent stopped first.
    Withdrawn,
}

impl Resolution {
    /// Why the request does not run, for the client; None when approved.
    pub fn refusal(&self, id: &str) -> Option<String> {
        match self {
            Resolution::Approved(_) => None,
            Resolution::Rejected { reviewer, reason } => {
                Some(format!("rejected by {reviewer} (approval {id}): {reason}"))
            }
            Resolution::Expired => Some(format!(
                "no reviewer decided in time (approval {id} expired)"
            )),
            Resolution::Withdrawn => Some(format!(
                "the Warden agent stopped before a reviewer decided (approval {id})"
            )),
        }
    }
}

/// A request waiting, as the control API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Pending {
    pub id: String,
    pub created: String,
    pub expires_at: String,
    pub protocol: &'static str,
    pub session_id: String,
    pub requester: Requester,
    pub destination: String,
    pub request: String,
    pub context: BTreeMap<&'static str, String>,
    pub rule: String,
    /// The LLM exchange that proposed it: `session_id` and `seq` of its
    /// `requests` row.
    pub caused_by: Option<CausedBy>,
    pub groups: Vec<String>,
    pub quorum: u32,
    pub approved_by: Vec<String>,
    /// What the requester was told while it waits.
    pub message: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Requester {
    pub pid: u32,
    pub uid: u32,
    pub user: Option<String>,
    /// The executable; never the command line, which may carry secrets
    /// (the audit's `connections` table has it for investigators).
    pub exe: Option<String>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    pub container: Option<String>,
    pub workload: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CausedBy {
    pub session_id: String,
    pub seq: u64,
    #[serde(rename = "match")]
    pub kind: &'static str,
}

/// Where a reviewer's decision left the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Progress {
    /// The quorum is reached: the request runs.
    Released {
        approved_by: Vec<String>,
    },
    /// More approvals are needed.
    Waiting {
        approvals: u32,
        quorum: u32,
    },
    Rejected,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "no request {0} is waiting: it was decided, expired, or never existed; `warden approvals list` shows what waits"
    )]
    NotFound(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The reviewer may not decide this request; the reason says why.
    #[error("{0}")]
    Refused(String),
    #[error("a rejection needs a reason: pass --reason \"...\"")]
    NoReason,
}

struct Entry {
    view: Pending,
    request: HoldRequest,
    expires_at: DateTime<Utc>,
    /// Subjects that approved, in order.
    approvals: Vec<String>,
    done: Option<oneshot::Sender<Resolution>>,
}

pub struct Approvals {
    pending: Mutex<HashMap<String, Entry>>,
    audit: AuditSink,
    policy: Arc<LivePolicy>,
    verifier: Verifier,
    webhook: Option<String>,
    fetcher: Fetcher,
}

impl Approvals {
    pub fn new(
        settings: &ApprovalSettings,
        policy: Arc<LivePolicy>,
        audit: AuditSink,
        fetcher: Fetcher,
    ) -> Arc<Approvals> {
        Arc::new(Approvals {
            pending: Mutex::new(HashMap::new()),
            audit,
            policy,
            verifier: Verifier::new(settings.oidc.clone(), fetcher.clone()),
            webhook: settings.webhook.clone(),
            fetcher,
        })
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds a request: it is listed for reviewers, audited, announced on
    /// the webhook, and the ticket resolves when they decide or it expires.
    pub fn submit(self: &Arc<Self>, request: HoldRequest) -> Ticket {
        let id = uuid::Uuid::now_v7().to_string();
        let now = Utc::now();
        let ttl = request.approval.expires;
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let view = Pending {
            id: id.clone(),
            created: rfc3339(now),
            expires_at: rfc3339(expires_at),
            protocol: request.protocol,
            session_id: request.session_id.clone(),
            requester: Requester {
                pid: request.identity.pid,
                uid: request.identity.uid,
                user: request.identity.user.clone(),
                exe: request.identity.exe.clone(),
                unit: request.identity.unit.clone(),
                cgroup: request.identity.cgroup_path.clone(),
                container: request.identity.container_id.clone(),
                workload: request.workload.clone(),
            },
            destination: request.destination.to_string(),
            request: request.request.clone(),
            context: request.context.clone(),
            rule: request.rule.clone(),
            caused_by: request.caused_by.as_ref().map(|l| CausedBy {
                session_id: l.exchange.session_id.clone(),
                seq: l.exchange.seq,
                kind: l.kind.as_str(),
            }),
            groups: request.approval.groups.clone(),
            quorum: request.approval.quorum,
            approved_by: Vec::new(),
            message: request.approval.message.clone(),
        };
        let (tx, rx) = oneshot::channel();
        let entry = Entry {
            view,
            request,
            expires_at,
            approvals: Vec::new(),
            done: Some(tx),
        };
        self.audit
            .record_approval(row(&id, &entry, ApprovalStep::Requested, None, None));
        if let Some(url) = &self.webhook {
            tokio::spawn(announce(
                self.fetcher.clone(),
                url.clone(),
                announcement(&entry.view),
            ));
        }
        tracing::info!(id, rule = %entry.request.rule, "request held for approval");
        let notice = notice(&entry.view, ttl);
        let last = Entry {
            view: entry.view.clone(),
            request: entry.request.clone(),
            expires_at,
            approvals: Vec::new(),
            done: None,
        };
        self.lock().insert(id.clone(), entry);
        Ticket {
            id,
            notice,
            deadline: Instant::now() + ttl,
            rx: Some(rx),
            broker: Arc::clone(self),
            entry: last,
            finished: None,
        }
    }

    /// The requests waiting, oldest first.
    pub fn list(&self) -> Vec<Pending> {
        let mut all: Vec<Pending> = self.lock().values().map(|e| e.view.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn get(&self, id: &str) -> Option<Pending> {
        self.lock().get(id).map(|e| e.view.clone())
    }

    /// A reviewer approves; with the quorum reached the request runs.
    pub async fn approve(&self, id: &str, token: &str) -> Result<Progress, ReviewError> {
        let reviewer = self.reviewer(id, token).await?;
        let mut pending = self.lock();
        let entry = pending
            .get_mut(id)
            .ok_or_else(|| ReviewError::NotFound(id.to_string()))?;
        if entry.approvals.contains(&reviewer.subject) {
            let why = format!(
                "{} has already approved request {id}; it needs {} distinct reviewers",
                reviewer.display(),
                entry.view.quorum
            );
            return Err(self.refuse(id, entry, &reviewer, why));
        }
        entry.approvals.push(reviewer.subject.clone());
        entry.view.approved_by.push(reviewer.display().to_string());
        self.audit.record_approval(row(
            id,
            entry,
            ApprovalStep::Approved,
            Some(&reviewer),
            None,
        ));
        let count = entry.approvals.len() as u32;
        if count < entry.view.quorum {
            return Ok(Progress::Waiting {
                approvals: count,
                quorum: entry.view.quorum,
            });
        }
        let entry = pending.remove(id).expect("present: just used");
        let approved_by = entry.view.approved_by.clone();
        if let Some(done) = entry.done {
            let _ = done.send(Resolution::Approved(approved_by.clone()));
        }
        Ok(Progress::Released { approved_by })
    }

    /// A reviewer rejects, with a reason the requester will read.
    pub async fn reject(
        &self,
        id: &str,
        token: &str,
        reason: &str,
    ) -> Result<Progress, ReviewError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(ReviewError::NoReason);
        }
        let reviewer = self.reviewer(id, token).await?;
        let mut pending = self.lock();
        let entry = pending
            .remove(id)
            .ok_or_else(|| ReviewError::NotFound(id.to_string()))?;
        self.audit.record_approval(row(
            id,
            &entry,
            ApprovalStep::Rejected,
            Some(&reviewer),
            Some(reason.to_string()),
        ));
        if let Some(done) = entry.done {
            let _ = done.send(Resolution::Rejected {
                reviewer: reviewer.display().to_string(),
                reason: reason.to_string(),
            });
        }
        Ok(Progress::Rejected)
    }

    /// Who the token names, if they may decide request `id`; every refusal
    /// is audited.
    async fn reviewer(&self, id: &str, token: &str) -> Result<Reviewer, ReviewError> {
        if !self.lock().contains_key(id) {
            return Err(ReviewError::NotFound(id.to_string()));
        }
        let reviewer = match self.verifier.verify(token).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(entry) = self.lock().get(id) {
                    self.audit.record_approval(row(
                        id,
                        entry,
                        ApprovalStep::Refused,
                        None,
                        Some(e.to_string()),
                    ));
                }
                return Err(e.into());
            }
        };
        let pending = self.lock();
        let entry = pending
            .get(id)
            .ok_or_else(|| ReviewError::NotFound(id.to_string()))?;
        if let Some(why) = self.unfit(entry, &reviewer) {
            return Err(self.refuse(id, entry, &reviewer, why));
        }
        Ok(reviewer)
    }

    /// Why `reviewer` may not decide `entry`, if they may not.
    fn unfit(&self, entry: &Entry, reviewer: &Reviewer) -> Option<String> {
        let groups = &entry.request.approval.groups;
        if !reviewer.groups.iter().any(|g| groups.contains(g)) {
            return Some(format!(
                "{} is not in a group that may approve this request (needs one of: {}; theirs: {})",
                reviewer.display(),
                groups.join(", "),
                if reviewer.groups.is_empty() {
                    "none".to_string()
                } else {
                    reviewer.groups.join(", ")
                }
            ));
        }
        let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let names = reviewer.names();
        if let Some(workload) = &entry.request.workload
            && let Some(owner) = self
                .policy
                .current()
                .owners_of(workload)
                .iter()
                .find(|o| names.iter().any(|n| same(n, o)))
        {
            return Some(format!(
                "{} owns the workload {workload} ({owner}) that asked: the identity that asks never approves",
                reviewer.display()
            ));
        }
        if let Some(user) = &entry.request.identity.user
            && names.iter().any(|n| same(n, user))
        {
            return Some(format!(
                "{} is the user ({user}) whose process asked: the identity that asks never approves",
                reviewer.display()
            ));
        }
        None
    }

    fn refuse(&self, id: &str, entry: &Entry, reviewer: &Reviewer, why: String) -> ReviewError {
        self.audit.record_approval(row(
            id,
            entry,
            ApprovalStep::Refused,
            Some(reviewer),
            Some(why.clone()),
        ));
        ReviewError::Refused(why)
    }

    /// The ticket's deadline passed, or its holder went away.
    fn end(&self, id: &str, step: ApprovalStep, reason: &str) {
        let Some(entry) = self.lock().remove(id) else {
            return;
        };
        self.audit
            .record_approval(row(id, &entry, step, None, Some(reason.to_string())));
    }

    /// Requests still waiting when the agent stops are abandoned: their
    /// connections close with the agent.
    pub fn abandon_all(&self, reason: &str) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.end(&id, ApprovalStep::Abandoned, reason);
        }
    }
}

/// A held request's side of the wait.
pub struct Ticket {
    id: String,
    notice: String,
    deadline: Instant,
    rx: Option<oneshot::Receiver<Resolution>>,
    broker: Arc<Approvals>,
    /// The request, for the row of its last step.
    entry: Entry,
    /// How the wait ended, once it has.
    finished: Option<Resolution>,
}

impl Ticket {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the requester is told while it waits.
    pub fn notice(&self) -> &str {
        &self.notice
    }

    /// Waits for the reviewers, or the rule's expiry.
    pub async fn wait(&mut self) -> Resolution {
        let resolution = match self.rx.take() {
            Some(rx) => match tokio::time::timeout_at(self.deadline, rx).await {
                Ok(Ok(resolution)) => resolution,
                // The broker dropped the entry without a word: only
                // `abandon_all` does, at stop.
                Ok(Err(_)) => Resolution::Withdrawn,
                Err(_) => {
                    self.broker.end(
                        &self.id,
                        ApprovalStep::Expired,
                        "no reviewer decided before the rule's expiry",
                    );
                    Resolution::Expired
                }
            },
            None => Resolution::Withdrawn,
        };
        self.finished = Some(resolution.clone());
        resolution
    }

    /// The approved request was sent on: the last step of its audit trail.
    pub fn executed(mut self) {
        if let Some(Resolution::Approved(by)) = &self.finished {
            self.entry.approvals = by.clone();
            self.broker.audit.record_approval(row(
                &self.id,
                &self.entry,
                ApprovalStep::Executed,
                None,
                None,
            ));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.finished.is_none() {
            self.broker.end(
                &self.id,
                ApprovalStep::Abandoned,
                "the requester's connection closed while it waited",
            );
        }
    }
}

fn row(
    id: &str,
    entry: &Entry,
    step: ApprovalStep,
    reviewer: Option<&Reviewer>,
    reason: Option<String>,
) -> ApprovalRow {
    let request = &entry.request;
    ApprovalRow {
        time: Utc::now(),
        approval_id: id.to_string(),
        step,
        session_id: request.session_id.clone(),
        protocol: request.protocol,
        identity: request.identity.clone(),
        workload: request.workload.clone(),
        destination: request.destination,
        rule: request.rule.clone(),
        request: request.request.clone(),
        reviewer: reviewer.map(|r| r.subject.clone()),
        reviewer_email: reviewer.and_then(|r| r.email.clone()),
        reviewer_groups: reviewer.map(|r| r.groups.clone()).unwrap_or_default(),
        approvals: entry.approvals.len() as u32,
        quorum: request.approval.quorum,
        reason,
        expires_at: entry.expires_at,
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The requester's line while it waits.
fn notice(view: &Pending, ttl: Duration) -> String {
    let mut text = format!(
        "Warden holds this request for approval (approval {}, rule \"{}\"): a reviewer in {} must \
         approve it within {}",
        view.id,
        view.rule,
        view.groups.join(" or "),
        humanize(ttl)
    );
    if let Some(message) = &view.message {
        text.push_str(". ");
        text.push_str(message);
    }
    text
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The webhook's message, in the shape Slack's incoming webhooks take.
fn announcement(view: &Pending) -> serde_json::Value {
    const MAX: usize = 500;
    let mut request = view.request.clone();
    if request.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|&i| request.is_char_boundary(i))
            .unwrap_or(0);
        request.truncate(cut);
        request.push('…');
    }
    let who = view
        .requester
        .workload
        .clone()
        .or_else(|| view.requester.exe.clone())
        .unwrap_or_else(|| format!("pid {}", view.requester.pid));
    serde_json::json!({
        "text": format!(
            "Warden: approval needed for a {} request from {who} to {} (rule \"{}\", reviewers: {}, expires {}):\n```{request}```\n`warden approvals show {}`",
            view.protocol, view.destination, view.rule, view.groups.join(", "), view.expires_at, view.id
        ),
        "approval_id": view.id,
    })
}

async fn announce(fetcher: Fetcher, url: String, body: serde_json::Value) {
    let request = http::Request::post(url.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.to_string().into_bytes());
    let result = match request {
        Ok(request) => fetcher.send(request).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(answer) if answer.status().is_success() => {}
        Ok(answer) => {
            tracing::warn!(%url, status = %answer.status(), "the approvals webhook refused the announcement")
        }
        Err(error) => tracing::warn!(%url, %error, "could not post to the approvals webhook"),
    }
}
