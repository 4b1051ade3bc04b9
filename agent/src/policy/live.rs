//! The policy in force, replaceable while connections run: a reload swaps
//! it whole, and every decision after that sees the new one.
use std::sync::{Arc, RwLock};

use super::{ApprovalSettings, AuditSettings, Policy};

pub struct LivePolicy {
    current: RwLock<Arc<Policy>>,
    /// Read once at start (the reviewers' identity provider, the audit's
    /// files and rotation): a policy that changes them needs a restart.
    approvals: Option<ApprovalSettings>,
    audit: AuditSettings,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    #[error(
        "the new policy changes its `{0}:` section, which the agent reads only at start; \
         the old policy stays in force: restart the agent to change `{0}:`, or keep the section as it was"
    )]
    NeedsRestart(&'static str),
}

impl LivePolicy {
    pub fn new(policy: Policy) -> LivePolicy {
        LivePolicy {
            approvals: policy.approvals().cloned(),
            audit: policy.audit_settings(),
            current: RwLock::new(Arc::new(policy)),
        }
    }

    /// The policy in force now. A caller that decides several things about
    /// one request takes it once, so that a reload cannot split them.
    pub fn current(&self) -> Arc<Policy> {
        self.current.read().expect("policy lock").clone()
    }

    /// Puts `policy` in force, unless it changes what is read only at start.
    pub fn replace(&self, policy: Policy) -> Result<Arc<Policy>, ReloadError> {
        if policy.approvals() != self.approvals.as_ref() {
            return Err(ReloadError::NeedsRestart("approvals"));
        }
        if policy.audit_settings() != self.audit {
            return Err(ReloadError::NeedsRestart("audit"));
        }
        let policy = Arc::new(policy);
        *self.current.write().expect("policy lock") = policy.clone();
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DefaultAction;

    fn policy(yaml: &str) -> Policy {
        Policy::from_yaml(yaml, "test.yaml").unwrap()
    }

    #[test]
    fn a_reload_puts_the_new_rules_in_force() {
        let live = LivePolicy::new(policy("version: 1\ndefault: audit\n"));
        let before = live.current();
        live.replace(policy("version: 1\ndefault: deny\n")).unwrap();
        assert_eq!(before.default_action(), DefaultAction::Audit);
        assert_eq!(live.current().default_action(), DefaultAction::Deny);
    }

    #[test]
    fn a_changed_audit_section_is_refused_and_the_old_policy_stays() {
        let live = LivePolicy::new(policy("version: 1\ndefault: audit\n"));
        let err = live
            .replace(policy("version: 1\ndefault: deny\naudit:\n  rotate: 5m\n"))
            .unwrap_err();
        assert_eq!(err, ReloadError::NeedsRestart("audit"));
        assert!(err.to_string().contains("restart the agent"));
        assert_eq!(live.current().default_action(), DefaultAction::Audit);
    }
}
