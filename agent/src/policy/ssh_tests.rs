//! Deciding SSH requests: SSH rules (the `ssh` matcher: channel, command,
//! user, from_llm), first match, `ssh_default`, forwarding denied unless a
//! rule allows it, approval, SSH rules kept apart from the other kinds, SSH
//! logins (credentials of `protocol: ssh` targets, with `host_keys` or
//! `known_hosts`), and every load error with its line and column.
use std::{net::SocketAddr, sync::Arc};

use super::tests::{policy, process};
use super::*;
use crate::policy::parse::tests::{assert_err, err};

fn who(uid: u32) -> Identity {
    process(uid, "agent-bot.service")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One SSH request, as the proxy would describe it: `Req::exec("ls")` is
/// the command `ls` run as `deploy` on 10.0.0.5:22 by uid 998.
#[derive(Clone)]
struct Req {
    uid: u32,
    destination: &'static str,
    user: &'static str,
    channel: SshChannel,
    command: Option<&'static str>,
    from_llm: bool,
}

impl Req {
    fn new(channel: SshChannel, command: Option<&'static str>) -> Req {
        Req {
            uid: 998,
            destination: "10.0.0.5:22",
            user: "deploy",
            channel,
            command,
            from_llm: false,
        }
    }
    fn exec(command: &'static str) -> Req {
        Req::new(SshChannel::Exec, Some(command))
    }
    fn subsystem(name: &'static str) -> Req {
        Req::new(SshChannel::Subsystem, Some(name))
    }
    fn channel(channel: SshChannel) -> Req {
        Req::new(channel, None)
    }
    fn to(mut self, destination: &'static str) -> Req {
        self.destination = destination;
        self
    }
    fn user(mut self, user: &'static str) -> Req {
        self.user = user;
        self
    }
    fn uid(mut self, uid: u32) -> Req {
        self.uid = uid;
        self
    }
    fn proposed_by_llm(mut self) -> Req {
        self.from_llm = true;
        self
    }
    fn on(&self, p: &Policy) -> Decision {
        let identity = who(self.uid);
        p.decide_ssh(&SshRequest {
            identity: &identity,
            destination: addr(self.destination),
            user: self.user,
            channel: self.channel,
            command: self.command,
            from_llm: self.from_llm,
        })
    }
    /// (action, rule).
    fn decided(&self, p: &Policy) -> (Action, String) {
        let d = self.on(p);
        assert!(d.mask.is_none(), "an SSH decision never masks");
        (d.action, d.rule)
    }
}

fn allow(rule: &str) -> (Action, String) {
    (Action::Allow, rule.to_string())
}

fn deny(rule: &str) -> (Action, String) {
    (Action::Deny, rule.to_string())
}

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl box";

// ---------------------------------------------------------------------------
// Deciding

const RULES: &str = "\
version: 1
workloads:
  bot: { match: { unit: \"agent-bot.service\" } }
targets:
  build-box: { address: 10.0.0.5, port: 22, protocol: ssh }
  db: { address: 10.0.0.9, port: 5432, protocol: postgres }
rules:
  - name: no-rm
    when: { workload: bot, target: build-box, ssh: { command: [\"rm *\", \"*sudo *\"] } }
    action: deny
  - name: bot-git
    when: { workload: bot, ssh: { channel: exec, command: \"git *\" } }
    action: allow
  - name: no-root
    when: { ssh: { user: [root, \"admin*\"] } }
    action: deny
  - name: no-sftp
    when: { ssh: { channel: subsystem, command: sftp } }
    action: deny
  - name: no-shell-for-bot
    when: { workload: bot, ssh: { channel: shell } }
    action: deny
  - name: no-llm-commands
    when: { ssh: { channel: exec, from_llm: true } }
    action: deny
  - name: box
    when: { target: build-box }
    action: allow
";

#[test]
fn the_first_ssh_rule_that_holds_decides() {
    let p = policy(RULES);
    assert_eq!(Req::exec("rm -rf /tmp/x").decided(&p), deny("no-rm"));
    // no-rm comes first, even for a git command that runs sudo.
    assert_eq!(
        Req::exec("git status; sudo reboot").decided(&p),
        deny("no-rm")
    );
    assert_eq!(Req::exec("git pull").decided(&p), allow("bot-git"));
    // bot-git holds before no-root.
    assert_eq!(
        Req::exec("git pull").user("root").decided(&p),
        allow("bot-git")
    );
    assert_eq!(Req::exec("ls").user("root").decided(&p), deny("no-root"));
    // Another destination: no-rm (its target) does not hold.
    assert_eq!(
        Req::exec("rm -rf /").to("10.0.0.6:22").decided(&p),
        allow("default")
    );
    assert_eq!(
        Req::exec("rm -rf /").to("10.0.0.5:2222").decided(&p),
        allow("default")
    );
    // Another workload: no-rm and bot-git do not hold.
    assert_eq!(
        Req::exec("rm -rf /").uid(1000).decided(&p),
        allow("default")
    );
    // The connection rule `box` plays no part in SSH requests.
    assert_eq!(Req::exec("make").decided(&p), allow("default"));
    // Nor do SSH rules in connections: `box` decides the connection.
    let identity = who(998);
    let connection = p.decide_connection(&ConnectionRequest {
        identity: &identity,
        destination: addr("10.0.0.5:22"),
        transport: Transport::Tcp,
    });
    assert_eq!(
        (connection.action, connection.rule.as_str()),
        (Action::Allow, "box")
    );
    assert_eq!(connection.workload.as_deref(), Some("bot"));
    assert_eq!(Req::exec("ls").on(&p).workload.as_deref(), Some("bot"));
    // Nor in statements.
    let statement = p.decide_statement(&StatementRequest {
        identity: &identity,
        destination: addr("10.0.0.5:22"),
        database: None,
        db_user: Some("root"),
        class: "read",
        tables_read: &[],
        tables_written: &[],
        functions: &[],
        from_llm: false,
    });
    assert_eq!(statement.rule, "default");
    assert_eq!(p.ssh_rule_count(), 6);
    assert_eq!(p.statement_rule_count(), 0);
    assert_eq!(p.request_rule_count(), 0);
}

#[test]
fn command_globs_match_the_whole_command_line_with_case() {
    let p = policy(RULES);
    // `*` crosses spaces and slashes; the glob matches the whole line.
    assert_eq!(
        Req::exec("git push origin main").decided(&p),
        allow("bot-git")
    );
    assert_eq!(Req::exec("/usr/bin/git pull").decided(&p), allow("default"));
    assert_eq!(Req::exec("rm").decided(&p), allow("default"));
    assert_eq!(Req::exec("RM -rf /").decided(&p), allow("default"));
    assert_eq!(Req::exec("Git pull").decided(&p), allow("default"));
    // A subsystem is matched by its name.
    assert_eq!(Req::subsystem("sftp").decided(&p), deny("no-sftp"));
    assert_eq!(Req::subsystem("SFTP").decided(&p), allow("default"));
    // A command glob never holds for a shell, whatever the proxy says.
    let p = policy(
        "version: 1\nrules:\n  - { name: star, when: { ssh: { command: \"*\" } }, action: deny }\n",
    );
    assert_eq!(Req::exec("anything").decided(&p), deny("star"));
    assert_eq!(Req::subsystem("sftp").decided(&p), deny("star"));
    assert_eq!(
        Req::channel(SshChannel::Shell).decided(&p),
        allow("default")
    );
    assert_eq!(
        Req::new(SshChannel::Shell, Some("bash")).decided(&p),
        allow("default")
    );
    // An exec without a command line does not match a command glob.
    assert_eq!(
        Req::new(SshChannel::Exec, None).decided(&p),
        allow("default")
    );
}

#[test]
fn channels_one_or_a_list() {
    let p = policy(RULES);
    assert_eq!(
        Req::channel(SshChannel::Shell).decided(&p),
        deny("no-shell-for-bot")
    );
    assert_eq!(
        Req::channel(SshChannel::Shell).uid(1000).decided(&p),
        allow("default")
    );
    // bot-git says `channel: exec`: a subsystem named like a git command is
    // not one.
    assert_eq!(Req::subsystem("git x").decided(&p), allow("default"));
    let p = policy(
        "version: 1\nrules:\n  - { name: fwd, when: { ssh: { channel: [forward, agent] } }, action: allow }\n",
    );
    assert_eq!(Req::channel(SshChannel::Forward).decided(&p), allow("fwd"));
    assert_eq!(Req::channel(SshChannel::Agent).decided(&p), allow("fwd"));
    assert_eq!(
        Req::channel(SshChannel::X11).decided(&p),
        deny(SSH_FORWARDING_RULE)
    );
    assert_eq!(Req::exec("ls").decided(&p), allow("default"));
    let names: Vec<&str> = SshChannel::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        ["exec", "shell", "subsystem", "forward", "agent", "x11"]
    );
}

#[test]
fn users_are_globs_with_case() {
    let p = policy(RULES);
    assert_eq!(Req::exec("ls").user("admin2").decided(&p), deny("no-root"));
    assert_eq!(Req::exec("ls").user("Admin2").decided(&p), allow("default"));
    assert_eq!(Req::exec("ls").user("rooty").decided(&p), allow("default"));
    assert_eq!(
        Req::channel(SshChannel::Shell)
            .user("root")
            .uid(1000)
            .decided(&p),
        deny("no-root")
    );
}

#[test]
fn from_llm_matches_commands_an_llm_proposed() {
    let p = policy(RULES);
    assert_eq!(
        Req::exec("make deploy").proposed_by_llm().decided(&p),
        deny("no-llm-commands")
    );
    assert_eq!(Req::exec("make deploy").decided(&p), allow("default"));
    let p = policy(
        "version: 1\nrules:\n  - { name: human, when: { ssh: { from_llm: false } }, action: deny }\n",
    );
    assert_eq!(Req::exec("ls").decided(&p), deny("human"));
    assert_eq!(
        Req::exec("ls").proposed_by_llm().decided(&p),
        allow("default")
    );
}

#[test]
fn ssh_default_decides_exec_shell_and_subsystem_no_rule_matches() {
    let src = "version: 1\nssh_default: deny\nrules:\n  - { name: ls, when: { ssh: { command: ls } }, action: allow }\n";
    let p = policy(src);
    assert_eq!(p.ssh_default(), Action::Deny);
    assert_eq!(Req::exec("ls").decided(&p), allow("ls"));
    assert_eq!(Req::exec("ls -l").decided(&p), deny("default"));
    assert_eq!(Req::channel(SshChannel::Shell).decided(&p), deny("default"));
    assert_eq!(Req::subsystem("sftp").decided(&p), deny("default"));
    assert!(
        p.summary().ends_with("; ssh_default: deny"),
        "{}",
        p.summary()
    );
    // ssh_default decides neither connections nor statements.
    let identity = who(1000);
    let d = p.decide_connection(&ConnectionRequest {
        identity: &identity,
        destination: addr("10.0.0.5:22"),
        transport: Transport::Tcp,
    });
    assert_eq!(d.action, Action::Allow);

    let p = policy("version: 1\nssh_default: allow\n");
    assert_eq!(p.ssh_default(), Action::Allow);
    assert_eq!(
        Req::channel(SshChannel::Shell).decided(&p),
        allow("default")
    );
    // Left out: allow.
    assert_eq!(policy("version: 1\n").ssh_default(), Action::Allow);
    assert_eq!(Policy::embedded_default().ssh_default(), Action::Allow);
}

#[test]
fn forwarding_is_denied_unless_a_rule_allows_it() {
    let p = policy("version: 1\nssh_default: allow\n");
    for channel in [SshChannel::Forward, SshChannel::Agent, SshChannel::X11] {
        let d = Req::channel(channel).on(&p);
        assert_eq!(
            (d.action, d.rule.as_str(), d.workload.as_deref()),
            (Action::Deny, "ssh.forwarding", None),
            "{channel:?}"
        );
        assert!(d.approval.is_none());
    }
    assert_eq!(Req::exec("ls").decided(&p), allow("default"));

    let p = policy(
        "\
version: 1
ssh_default: deny
workloads:
  bot: { match: { unit: \"agent-bot.service\" } }
rules:
  - name: bot-tunnels
    when: { workload: bot, ssh: { channel: forward } }
    action: allow
  - name: everyone-else
    when: { ssh: {} }
    action: deny
",
    );
    assert_eq!(
        Req::channel(SshChannel::Forward).decided(&p),
        allow("bot-tunnels")
    );
    assert_eq!(
        Req::channel(SshChannel::Forward).uid(1000).decided(&p),
        deny("everyone-else")
    );
    // `ssh: {}` holds for every request, forwarding included.
    assert_eq!(
        Req::channel(SshChannel::Agent).decided(&p),
        deny("everyone-else")
    );
}

const APPROVALS: &str = "\
version: 1
approvals:
  oidc: { issuer: \"http://127.0.0.1:9400\", client_id: warden }
";

#[test]
fn an_approving_rule_holds_the_request_with_its_approve() {
    let p = policy(&format!(
        "{APPROVALS}rules:\n  - name: deploys\n    when: {{ ssh: {{ command: \"./deploy*\" }} }}\n    action: approve\n    approve: {{ groups: [ops], quorum: 2, expires: 10m, message: \"ops approve deploys\" }}\n"
    ));
    let d = Req::exec("./deploy.sh prod").on(&p);
    assert_eq!((d.action, d.rule.as_str()), (Action::Approve, "deploys"));
    assert!(d.mask.is_none());
    let approval = d.approval.expect("an approve carries its approval");
    assert_eq!(
        *approval,
        ApprovalRule {
            groups: vec!["ops".into()],
            quorum: 2,
            expires: std::time::Duration::from_secs(600),
            message: Some("ops approve deploys".into()),
        }
    );
    // Two decisions by the rule share its approval.
    let again = Req::exec("./deploy.sh staging").on(&p);
    assert!(Arc::ptr_eq(&approval, again.approval.as_ref().unwrap()));
    assert!(Req::exec("ls").on(&p).approval.is_none());
    assert!(
        p.summary()
            .contains("1 of them for SSH requests, 1 holding for approval")
    );
}

#[test]
fn has_ssh_rules_for_says_whether_an_ssh_rule_could_hold() {
    let p = policy(RULES);
    let bot = who(998);
    let other = who(1000);
    // no-root and no-sftp hold for any process and destination.
    assert!(p.has_ssh_rules_for(&other, addr("192.0.2.1:22")));
    let p = policy(
        "\
version: 1
workloads:
  bot: { match: { unit: \"agent-bot.service\" } }
targets:
  build-box: { address: 10.0.0.5, port: 22, protocol: ssh }
rules:
  - { name: conn, when: { port: 22 }, action: allow }
  - { name: bot-box, when: { workload: bot, target: build-box, ssh: { channel: shell } }, action: deny }
  - { name: port-2222, when: { port: 2222, ssh: {} }, action: deny }
",
    );
    assert!(p.has_ssh_rules_for(&bot, addr("10.0.0.5:22")));
    assert!(!p.has_ssh_rules_for(&other, addr("10.0.0.5:22")));
    assert!(!p.has_ssh_rules_for(&bot, addr("10.0.0.6:22")));
    assert!(p.has_ssh_rules_for(&other, addr("10.0.0.6:2222")));
    // Connection rules and ssh_default are not SSH rules.
    let p = policy(
        "version: 1\nssh_default: deny\nrules:\n  - { name: conn, when: { port: 22 }, action: deny }\n",
    );
    assert!(!p.has_ssh_rules_for(&bot, addr("10.0.0.5:22")));
}

// ---------------------------------------------------------------------------
// SSH logins

#[test]
fn ssh_logins_are_credentials_of_ssh_targets() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("build-box");
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n";
    std::fs::write(&key_file, key).unwrap();
    let src = format!(
        "\
version: 1
targets:
  pg: {{ address: 10.0.0.5, port: 5432, protocol: postgres }}
  build-box: {{ address: 10.0.0.5, port: 2222, protocol: ssh, known_hosts: /etc/warden/ssh_known_hosts }}
  lab: {{ address: [\"10.1.0.0/16\", \"fd00::/8\"], protocol: ssh, host_keys: [\"{ED25519}\", \"ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY=\"] }}
  lab-too: {{ address: 10.1.2.3, port: 22, protocol: ssh, host_keys: \"{ED25519}\" }}
  env-box: {{ address: 10.2.0.1, protocol: ssh, host_keys: \"{ED25519}\" }}
  no-login: {{ address: 10.3.0.1, protocol: ssh }}
credentials:
  env-box: {{ private_key_env: ENV_BOX_KEY }}
  lab-too: {{ password_env: LAB_PW }}
  lab: {{ user: deploy, password_env: LAB_PW }}
  build-box: {{ user: git, private_key_file: {} }}
  pg: {{ user: bot_ro, password_env: LAB_PW }}
",
        key_file.display()
    );
    let p = with_test_env(
        &[
            ("LAB_PW", "hunter2\n"),
            (
                "ENV_BOX_KEY",
                "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----",
            ),
        ],
        || policy(&src),
    );
    // Every SSH login, in file order of the targets.
    let targets: Vec<&str> = p.ssh_logins().map(|l| l.target.as_str()).collect();
    assert_eq!(targets, ["build-box", "lab", "lab-too", "env-box"]);

    let build = p.ssh_login_for(addr("10.0.0.5:2222")).unwrap();
    assert_eq!(build.target, "build-box");
    assert_eq!(build.user.as_deref(), Some("git"));
    // The key as read: its newlines and its last one kept.
    assert_eq!(build.secret, SshSecret::PrivateKey(key.to_string()));
    assert_eq!(
        build.host_keys,
        UpstreamHostKeys::KnownHosts("/etc/warden/ssh_known_hosts".into())
    );
    assert_eq!(build.addresses, ["10.0.0.5/32".parse::<IpNet>().unwrap()]);
    assert_eq!(
        build.ports,
        [PortRange {
            first: 2222,
            last: 2222
        }]
    );
    // The same address on the postgres port: the database login, never an
    // SSH one, and the reverse.
    assert!(p.ssh_login_for(addr("10.0.0.5:5432")).is_none());
    assert!(p.ssh_login_for(addr("10.0.0.5:22")).is_none());
    let pg = p.login_for(addr("10.0.0.5:5432")).unwrap();
    assert_eq!((pg.target.as_str(), pg.secret.as_str()), ("pg", "hunter2"));
    assert!(p.login_for(addr("10.0.0.5:2222")).is_none());
    assert!(p.login_for(addr("10.1.2.3:22")).is_none());
    assert!(p.credential("lab").is_none());
    assert_eq!(p.credential_count(), 1);

    // The first target in file order whose address and port hold: lab
    // (any port) before lab-too.
    let lab = p.ssh_login_for(addr("10.1.2.3:22")).unwrap();
    assert_eq!(lab.target, "lab");
    assert_eq!(lab.user.as_deref(), Some("deploy"));
    assert_eq!(lab.secret, SshSecret::Password("hunter2".into()));
    assert!(lab.ports.is_empty());
    assert_eq!(lab.addresses.len(), 2);
    assert_eq!(
        lab.host_keys,
        UpstreamHostKeys::Keys(vec![
            ED25519.to_string(),
            "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY=".to_string()
        ])
    );
    assert_eq!(
        p.ssh_login_for(addr("[fd00::1]:2200")).unwrap().target,
        "lab"
    );
    let env_box = p.ssh_login_for(addr("10.2.0.1:22")).unwrap();
    assert_eq!(env_box.user, None);
    assert!(
        matches!(&env_box.secret, SshSecret::PrivateKey(k) if k.ends_with("-----END OPENSSH PRIVATE KEY-----"))
    );
    // A target without a credential has no login.
    assert!(p.ssh_login_for(addr("10.3.0.1:22")).is_none());
    // One login per target, shared.
    assert!(Arc::ptr_eq(
        p.ssh_login_for(addr("10.2.0.1:22")).unwrap(),
        p.ssh_login_for(addr("10.2.0.1:2222")).unwrap()
    ));

    // Never shown, but kept out of the program's environment.
    let everything = format!(
        "{p:?} {:?} {}",
        p.ssh_login_for(addr("10.0.0.5:2222")),
        p.summary()
    );
    for secret in ["hunter2", "b3BlbnNzaC1rZXkt", "abc"] {
        assert!(
            !everything.contains(secret),
            "{secret} shown in {everything}"
        );
    }
    assert!(
        format!("{build:?}").contains("secret: PrivateKey(***)"),
        "{build:?}"
    );
    let secrets: Vec<&str> = p.credential_secrets().collect();
    assert!(secrets.contains(&key));
    assert!(secrets.contains(&"hunter2"));
    assert_eq!(
        p.summary(),
        "0 rules, 0 workloads, 6 targets, 1 credential, 4 SSH logins"
    );
}

// ---------------------------------------------------------------------------
// Load errors

#[test]
fn an_ssh_matcher_goes_with_ssh_targets() {
    // The matcher after a postgres target: at the matcher.
    assert_err(
        "version: 1\ntargets:\n  db: { port: 5432, protocol: postgres }\nrules:\n  - name: r\n    when: { target: db, ssh: { channel: exec } }\n    action: deny\n",
        6,
        25,
        "rule `r` has an ssh matcher, which matches SSH requests, but its target `db` says \
         `protocol: postgres`; an ssh matcher goes with targets of `protocol: ssh` (or `any`, \
         or none), so name another target or split the rule",
    );
    // The target after the matcher, and defined later in the file: at its name.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { ssh: {}, target: [box, web] }\n    action: deny\ntargets:\n  box: { port: 22, protocol: ssh }\n  web: { port: 443, protocol: http }\n",
        4,
        36,
        "but its target `web` says `protocol: http`",
    );
    // A target with a host holds for HTTP requests only.
    assert_err(
        "version: 1\ntargets:\n  api: { host: api.example.com }\nrules:\n  - { name: r, when: { target: api, ssh: {} }, action: deny }\n",
        5,
        37,
        "rule `r` has an ssh matcher, which matches SSH requests, but its target `api` has a host",
    );
    // ssh, any or no protocol: fine.
    policy(
        "version: 1\ntargets:\n  a: { port: 22, protocol: ssh }\n  b: { port: 23, protocol: any }\n  c: { port: 24 }\nrules:\n  - { name: r, when: { target: [a, b, c], ssh: {} }, action: deny }\n",
    );
    // Not with another matcher, at the second.
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when:\n      sql: {}\n      ssh: {}\n    action: deny\n",
        6,
        7,
        "rule `r` has a sql matcher and an ssh matcher in one when; a sql matcher decides \
         PostgreSQL statements and an ssh matcher SSH requests, so nothing can meet both: split \
         the rule in two",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: {}, http: {} }, action: deny }\n",
        3,
        33,
        "rule `r` has an ssh matcher and an http matcher in one when",
    );
}

#[test]
fn ssh_matcher_values_and_keys() {
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { ssh: { channel: [exec, sftp] } }\n    action: deny\n",
        4,
        36,
        "\"sftp\" is not an SSH channel (sftp is a subsystem: `channel: subsystem, command: \
         sftp`); write one of: exec, shell, subsystem, forward, agent, x11",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: { channel: direct-tcpip } }, action: deny }\n",
        3,
        40,
        "(port forwarding, local `-L` and remote `-R`, is `forward`)",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: { channel: Exec } }, action: deny }\n",
        3,
        40,
        "\"Exec\" is not an SSH channel (channels are written in lowercase)",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: { exec: ls } }, action: deny }\n",
        3,
        31,
        "unknown field `exec` in a rule's ssh (write `command:`, globs on the command line",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: { command: \"[git\" } }, action: deny }\n",
        3,
        40,
        "\"[git\" is not a valid glob",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: { user: [] } }, action: deny }\n",
        3,
        37,
        "this list is empty",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: { from_llm: yes } }, action: deny }\n",
        3,
        41,
        "`from_llm: true` or `from_llm: false`",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { command: ls }, action: deny }\n",
        3,
        24,
        "unknown field `command` in a rule's when (commands go in the ssh matcher",
    );
}

#[test]
fn ssh_rules_allow_deny_or_approve_and_never_mask() {
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { ssh: {} }\n    action: allow\n    mask: { columns: [x] }\n",
        6,
        5,
        "rule `r` has an ssh matcher, so it decides SSH requests; mask applies to the rows a \
         PostgreSQL statement returns",
    );
    assert_err(
        "version: 1\nrules:\n  - name: r\n    when: { ssh: {} }\n    action: allow\n    limits: { max_tokens: 10 }\n",
        6,
        5,
        "rule `r` has an ssh matcher, so it decides SSH requests; limits applies to HTTP requests",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: {} }, action: approve, approve: { groups: [ops] } }\n",
        3,
        43,
        "says `action: approve`, but the file has no approvals section",
    );
    assert_err(
        "version: 1\nrules:\n  - { name: r, when: { ssh: {} }, action: approve }\n",
        3,
        43,
        "rule `r` says `action: approve` but not who may approve",
    );
}

#[test]
fn ssh_default_is_allow_or_deny() {
    assert_err(
        "version: 1\nssh_default: approve\n",
        2,
        14,
        "`ssh_default: approve` is not a choice; write `ssh_default: allow` or `ssh_default: \
         deny`, and hold SSH requests with a rule",
    );
    assert_err(
        "version: 1\nssh_default: audit\n",
        2,
        14,
        "`ssh_default: audit` is not a choice",
    );
    assert_err(
        "version: 1\nssh_default: block\n",
        2,
        14,
        "\"block\" is not a ssh_default; write `ssh_default: allow` or `ssh_default: deny`",
    );
}

#[test]
fn host_keys_go_on_ssh_targets_only() {
    // The protocol first: at host_keys.
    assert_err(
        &format!(
            "version: 1\ntargets:\n  db:\n    port: 5432\n    protocol: postgres\n    host_keys: \"{ED25519}\"\n"
        ),
        6,
        5,
        "a target with host_keys says `protocol: postgres`; host_keys says how the agent checks \
         an SSH server's host key, so it goes on a target of `protocol: ssh`",
    );
    // The protocol after: at the protocol.
    assert_err(
        "version: 1\ntargets:\n  db: { port: 5432, known_hosts: /etc/kh, protocol: http }\n",
        3,
        53,
        "a target with known_hosts says `protocol: http`",
    );
    // No protocol: at the target.
    assert_err(
        "version: 1\ntargets:\n  box: { port: 22, known_hosts: /etc/kh }\n",
        3,
        8,
        "target `box` has known_hosts but no protocol; known_hosts says how the agent checks an \
         SSH server's host key, so it goes on a target of `protocol: ssh`: add `protocol: ssh`",
    );
    // Both: at the second.
    assert_err(
        &format!(
            "version: 1\ntargets:\n  box: {{ port: 22, protocol: ssh, known_hosts: /etc/kh, host_keys: \"{ED25519}\" }}\n"
        ),
        3,
        57,
        "target `box` has both known_hosts and host_keys; keep one",
    );
    assert_err(
        "version: 1\ntargets:\n  box: { port: 22, protocol: ssh, known_hosts: etc/kh }\n",
        3,
        48,
        "known_hosts \"etc/kh\" is not an absolute path; write e.g. /etc/warden/ssh_known_hosts",
    );
}

#[test]
fn host_key_lines_are_checked() {
    let target = |keys: &str| {
        format!(
            "version: 1\ntargets:\n  box:\n    port: 22\n    protocol: ssh\n    host_keys: {keys}\n"
        )
    };
    assert_err(
        &target("[\"ssh-dss AAAAB3NzaC1kc3MAAACBAP\"]"),
        6,
        17,
        "\"ssh-dss AAAAB3NzaC1kc3MAAACBAP\" is not an SSH public key; write the algorithm \
         (ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256",
    );
    assert_err(
        &target("\"ssh-ed25519\""),
        6,
        16,
        "the ssh-ed25519 key \"ssh-ed25519\" has no base64 key after its algorithm",
    );
    assert_err(
        &target("\"ssh-ed25519 not*base64!\""),
        6,
        16,
        "has no base64 key after its algorithm",
    );
    assert_err(
        &target(&format!("[\"{ED25519}\", \"[10.0.0.5]:2222 {ED25519}\"]")),
        6,
        105,
        "is a known_hosts line; write the key alone, from its algorithm on",
    );
    assert_err(&target("[]"), 6, 16, "this list is empty");
    // An RSA key, with no comment, is fine; so is surrounding space.
    let p = policy(&target("\"  ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7  \""));
    assert_eq!(p.target_count(), 1);
}

#[test]
fn an_ssh_credential_needs_a_host_key_source() {
    let src = "version: 1\ntargets:\n  build-box: { address: 127.0.0.1, port: 2222, protocol: ssh }\ncredentials:\n  build-box: { user: deploy, password_env: PATH }\n";
    assert_err(
        src,
        3,
        14,
        "target `build-box` has an SSH credential, so the agent logs in to the server itself, \
         and it must first verify the real server's host key; give the target `known_hosts: \
         /etc/warden/ssh_known_hosts` (a file in OpenSSH's known_hosts format) or `host_keys:",
    );
    // The credential first in the file: still at the target.
    assert_err(
        "version: 1\ncredentials:\n  build-box: { password_env: PATH }\ntargets:\n  build-box: { address: 127.0.0.1, protocol: ssh }\n",
        5,
        14,
        "target `build-box` has an SSH credential",
    );
    // Without a credential, none is needed: the agent does not log in.
    let p = policy("version: 1\ntargets:\n  build-box: { address: 127.0.0.1, protocol: ssh }\n");
    assert!(p.ssh_logins().next().is_none());
}

#[test]
fn ssh_credential_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n\n").unwrap();
    let public = dir.path().join("id.pub");
    std::fs::write(&public, format!("{ED25519}\n")).unwrap();
    let base = "version: 1\ntargets:\n  box: { address: 10.0.0.5, protocol: ssh, known_hosts: /etc/kh }\n  db: { address: 10.0.0.9, protocol: postgres }\ncredentials:\n";
    assert_err(
        &format!("{base}  box: {{ private_key_file: {} }}\n", empty.display()),
        6,
        28,
        &format!(
            "credential `box`: the file {} is empty; put the SSH private key in it",
            empty.display()
        ),
    );
    assert_err(
        &format!(
            "{base}  box: {{ private_key_file: {} }}\n",
            public.display()
        ),
        6,
        28,
        "holds a public key; give the private key (the file without .pub",
    );
    let e = err(&format!(
        "{base}  box: {{ private_key_file: {} }}\n",
        public.display()
    ));
    assert!(!e.contains("AAAAC3Nza"), "{e}");
    assert_err(
        &format!("{base}  box: {{ private_key_file: keys/box }}\n"),
        6,
        28,
        "credential `box`: private_key_file \"keys/box\" is not an absolute path",
    );
    assert_err(
        &format!("{base}  box: {{ private_key_file: /nonexistent/warden/box }}\n"),
        6,
        28,
        "credential `box`: cannot read private_key_file /nonexistent/warden/box",
    );
    assert_err(
        &format!("{base}  box: {{ private_key_env: WARDEN_TEST_UNSET_SSH_KEY }}\n"),
        6,
        27,
        "credential `box`: the environment variable WARDEN_TEST_UNSET_SSH_KEY is not set in \
         the agent's environment; set it where the agent starts (e.g. `Environment=` or \
         `EnvironmentFile=` in its systemd unit), or write `private_key_file:` instead",
    );
    assert_err(
        &format!("{base}  box: {{ private_key_env: PATH, password_env: PATH }}\n"),
        6,
        33,
        "credential `box` has both private_key_env and password_env; keep one",
    );
    assert_err(
        &format!("{base}  box: {{ password_env: PATH, header: x-api-key }}\n"),
        6,
        8,
        "credential `box` is an SSH login, which is not sent in a header",
    );
    assert_err(
        &format!("{base}  box: {{ api_key_env: PATH }}\n"),
        6,
        8,
        "credential `box` is an API key, which the agent puts in HTTP requests, but its target \
         `box` says `protocol: ssh`",
    );
    assert_err(
        &format!("{base}  db: {{ private_key_env: PATH }}\n"),
        6,
        7,
        "credential `db` is an SSH private key, which the agent logs in to SSH servers with, \
         but its target `db` says `protocol: postgres`; give the target `protocol: ssh`",
    );
    assert_err(
        &format!("{base}  box: {{ user: \"two words\", password_env: PATH }}\n"),
        6,
        16,
        "\"two words\" is not an SSH user name",
    );
    assert_err(
        &format!("{base}  box: {{ private_key: \"-----BEGIN\" }}\n"),
        6,
        10,
        "unknown field `private_key` in a credential (a key never goes in the policy: write \
         `private_key_file: /path/to/key`",
    );
    // A password on a target with no protocol is no SSH login.
    assert_err(
        "version: 1\ntargets:\n  t: { address: 10.0.0.5 }\ncredentials:\n  t: { password_env: PATH }\n",
        5,
        6,
        "credential `t` is a database password, which the agent logs in to PostgreSQL with, but \
         its target `t` says `protocol: none`; give the target `protocol: postgres` (or \
         `protocol: ssh` for an SSH password)",
    );
}

#[test]
fn summaries_count_ssh_rules() {
    let p = policy(RULES);
    assert_eq!(
        p.summary(),
        "7 rules, 6 of them for SSH requests, 1 workload, 2 targets"
    );
    assert_eq!(p.rule_count(), 7);
}
