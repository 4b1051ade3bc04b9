//! The parts of a policy about SSH: the `ssh` matcher of a rule's `when`,
//! `ssh_default`, an SSH target's `host_keys` and `known_hosts`, the parts
//! of a credential that make an SSH login (its user, its private key), and
//! their scalars and messages. Which targets an `ssh` matcher goes with is
//! checked by [`super::Ctx`], like the other matchers.

use std::path::PathBuf;

use serde::de::{self, MapAccess};

use super::{Fields, Flag, GlobP, Keys, Many, Parse};
use crate::policy::{Action, Protocol, SshChannel, SshMatcher, SshSecret, UpstreamHostKeys};

pub(crate) const SSH: Fields = Fields {
    what: "in a rule's ssh",
    known: &["channel", "command", "user", "from_llm"],
    later: &[],
    instead: &[
        (
            "channels",
            "write `channel:`, which takes one channel or a list",
        ),
        (
            "commands",
            "write `command:`, which takes one glob or a list",
        ),
        (
            "exec",
            "write `command:`, globs on the command line: `ssh: { channel: exec, command: \
             [\"git *\"] }`",
        ),
        ("cmd", "write `command:`, which takes one glob or a list"),
        (
            "subsystem",
            "a subsystem is matched by its name in `command:`: `ssh: { channel: subsystem, \
             command: sftp }`",
        ),
        ("users", "write `user:`, which takes one glob or a list"),
        ("login", "write `user:`, globs on the SSH user name"),
        (
            "forward",
            "write `channel: forward`, which covers local and remote port forwarding",
        ),
    ],
};

/// The algorithms a host key line may start with.
const HOST_KEY_ALGORITHMS: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-256",
    "rsa-sha2-512",
];

const COMMAND_EXAMPLE: &str = "\"git *\"";
const SSH_USER_EXAMPLE: &str = "deploy";
const HOST_KEY_EXAMPLE: &str = "\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI...\"";
const KNOWN_HOSTS_EXAMPLE: &str = "/etc/warden/ssh_known_hosts";

// ---------------------------------------------------------------------------
// The ssh matcher

/// A rule's `ssh` matcher.
#[derive(Default)]
pub(super) struct SshKeys(SshMatcher);

impl<'de> Keys<'de> for SshKeys {
    type Value = SshMatcher;

    fn fields(&self) -> &'static Fields {
        &SSH
    }

    fn expecting(&self) -> String {
        format!(
            "an ssh matcher: a mapping with some of {}",
            SSH.known.join(", ")
        )
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        let m = &mut self.0;
        match key {
            "channel" => m.channel = Some(map.next_value_seed(Many::new(ChannelP, "channel"))?),
            "command" => {
                m.command = Some(map.next_value_seed(Many::new(GlobP(COMMAND_EXAMPLE), "command"))?)
            }
            "user" => {
                m.user = Some(map.next_value_seed(Many::new(GlobP(SSH_USER_EXAMPLE), "user"))?)
            }
            "from_llm" => m.from_llm = Some(map.next_value_seed(Flag("from_llm"))?),
            _ => unreachable!("{key} is in SSH.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<SshMatcher, E> {
        Ok(self.0)
    }
}

#[derive(Clone, Copy)]
struct ChannelP;

fn channel_names() -> String {
    let names: Vec<&str> = SshChannel::ALL.iter().map(|c| c.as_str()).collect();
    names.join(", ")
}

impl Parse for ChannelP {
    type Out = SshChannel;
    fn expecting(&self) -> String {
        format!("an SSH channel: one of {}", channel_names())
    }
    fn text(&self, s: &str) -> Result<SshChannel, String> {
        if let Some(channel) = SshChannel::ALL.into_iter().find(|c| c.as_str() == s) {
            return Ok(channel);
        }
        let hint = match s.to_ascii_lowercase().as_str() {
            "direct-tcpip" | "tcpip-forward" | "forwarding" | "port-forward"
            | "port-forwarding" | "port_forward" | "tunnel" | "local" | "remote" => {
                " (port forwarding, local `-L` and remote `-R`, is `forward`)"
            }
            "sftp" => " (sftp is a subsystem: `channel: subsystem, command: sftp`)",
            "scp" | "rsync" => {
                " (scp and rsync run a command: `channel: exec, command: \"scp *\"`)"
            }
            "command" | "cmd" | "run" | "execute" => " (a command is `exec`)",
            "pty" | "interactive" | "login" | "session" | "tty" => {
                " (an interactive session is `shell`)"
            }
            "auth-agent" | "agent-forwarding" | "ssh-agent" | "auth-agent@openssh.com" => {
                " (agent forwarding is `agent`)"
            }
            "x11-forwarding" | "x" | "x11-req" => " (X11 forwarding is `x11`)",
            "exec" | "shell" | "subsystem" | "forward" | "agent" | "x11" => {
                " (channels are written in lowercase)"
            }
            _ => "",
        };
        Err(format!(
            "{s:?} is not an SSH channel{hint}; write one of: {}",
            channel_names()
        ))
    }
}

// ---------------------------------------------------------------------------
// ssh_default

#[derive(Clone, Copy)]
pub(super) struct SshDefaultP;

impl Parse for SshDefaultP {
    type Out = Action;
    fn expecting(&self) -> String {
        "allow or deny".into()
    }
    fn text(&self, s: &str) -> Result<Action, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "audit" => Err(
                "`ssh_default: audit` is not a choice; write `ssh_default: allow` (every SSH \
                 request is recorded in the audit anyway) or `ssh_default: deny`"
                    .into(),
            ),
            "approve" => Err(
                "`ssh_default: approve` is not a choice; write `ssh_default: allow` or \
                 `ssh_default: deny`, and hold SSH requests with a rule: `when: { ssh: { ... } \
                 }, action: approve`"
                    .into(),
            ),
            _ => Err(format!(
                "{s:?} is not a ssh_default; write `ssh_default: allow` or `ssh_default: deny`"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// An SSH target's host keys

/// `host_keys` or `known_hosts`: the key that gave them.
pub(super) fn host_keys_key(keys: &UpstreamHostKeys) -> &'static str {
    match keys {
        UpstreamHostKeys::Keys(_) => "host_keys",
        UpstreamHostKeys::KnownHosts(_) => "known_hosts",
    }
}

/// The error for `host_keys` and `known_hosts` both on one target.
pub(super) fn both_host_key_sources(target: &str, first: &str, second: &str) -> String {
    format!(
        "target `{target}` has both {first} and {second}; keep one: the agent checks the SSH \
         server's host key against the keys `host_keys` lists, or against the file \
         `known_hosts` names"
    )
}

/// The error for `host_keys` or `known_hosts` (`key`) on a target of
/// another protocol than SSH.
pub(super) fn host_keys_protocol_error(key: &str, protocol: Protocol) -> String {
    format!(
        "a target with {key} says `protocol: {}`; {key} says how the agent checks an SSH \
         server's host key, so it goes on a target of `protocol: ssh`: fix the protocol, or \
         remove {key}",
        protocol.as_str()
    )
}

/// The error for `host_keys` or `known_hosts` (`key`) on a target that says
/// no protocol.
pub(super) fn host_keys_without_protocol(target: &str, key: &str) -> String {
    format!(
        "target `{target}` has {key} but no protocol; {key} says how the agent checks an SSH \
         server's host key, so it goes on a target of `protocol: ssh`: add `protocol: ssh`"
    )
}

/// The error for an SSH target with a credential and no host key source.
pub(super) fn missing_host_keys(target: &str) -> String {
    format!(
        "target `{target}` has an SSH credential, so the agent logs in to the server itself, \
         and it must first verify the real server's host key; give the target `known_hosts: \
         {KNOWN_HOSTS_EXAMPLE}` (a file in OpenSSH's known_hosts format) or `host_keys: \
         [{HOST_KEY_EXAMPLE}]` (the server's public keys, as in its /etc/ssh/ssh_host_*.pub)"
    )
}

/// One of `host_keys`: a public key in OpenSSH one-line form, checked
/// loosely (a known algorithm, then base64), kept as written (trimmed).
#[derive(Clone, Copy)]
pub(super) struct HostKeyP;

impl Parse for HostKeyP {
    type Out = String;
    fn expecting(&self) -> String {
        format!("an SSH public key such as {HOST_KEY_EXAMPLE}")
    }
    fn text(&self, s: &str) -> Result<String, String> {
        let line = s.trim();
        let mut words = line.split_whitespace();
        let (first, second) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let algorithms = HOST_KEY_ALGORITHMS.join(", ");
        if !HOST_KEY_ALGORITHMS.contains(&first) {
            if HOST_KEY_ALGORITHMS.contains(&second) {
                return Err(format!(
                    "{s:?} is a known_hosts line; write the key alone, from its algorithm on \
                     (`{second} AAAA...`), or put the line in a file and give the target \
                     `known_hosts:` instead"
                ));
            }
            if line.starts_with("-----BEGIN") {
                return Err(
                    "this is a private key; host_keys takes the server's public keys, as in its \
                     /etc/ssh/ssh_host_*.pub (and a private key never goes in the policy)"
                        .into(),
                );
            }
            return Err(format!(
                "{s:?} is not an SSH public key; write the algorithm ({algorithms}) then the key \
                 in base64, as in the server's /etc/ssh/ssh_host_*.pub, e.g. {HOST_KEY_EXAMPLE}"
            ));
        }
        let base64 = second.len() >= 16
            && second.len() % 4 == 0
            && second
                .trim_end_matches('=')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
        if !base64 {
            return Err(format!(
                "the {first} key {s:?} has no base64 key after its algorithm; copy the whole \
                 line from the server's /etc/ssh/ssh_host_*.pub, e.g. {HOST_KEY_EXAMPLE}"
            ));
        }
        Ok(line.to_string())
    }
}

/// `known_hosts`: an absolute path; the proxy reads the file when it
/// connects.
#[derive(Clone, Copy)]
pub(super) struct KnownHostsP;

impl Parse for KnownHostsP {
    type Out = PathBuf;
    fn expecting(&self) -> String {
        format!("a known_hosts file such as {KNOWN_HOSTS_EXAMPLE}")
    }
    fn text(&self, s: &str) -> Result<PathBuf, String> {
        if s.starts_with('/') {
            return Ok(PathBuf::from(s));
        }
        let hint = if s.starts_with('~') {
            " (the agent runs as root: `~` would be root's home)"
        } else {
            ""
        };
        Err(format!(
            "known_hosts {s:?} is not an absolute path{hint}; write e.g. {KNOWN_HOSTS_EXAMPLE}"
        ))
    }
}

// ---------------------------------------------------------------------------
// An SSH credential

/// A credential's `user` on an SSH target: the user the agent logs in as.
#[derive(Clone, Copy)]
pub(super) struct SshUserP;

impl Parse for SshUserP {
    type Out = String;
    fn expecting(&self) -> String {
        format!("an SSH user name such as {SSH_USER_EXAMPLE}")
    }
    fn text(&self, s: &str) -> Result<String, String> {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{s:?} is not an SSH user name; write e.g. `user: {SSH_USER_EXAMPLE}` (no spaces)"
            ));
        }
        Ok(s.to_string())
    }
    fn int(&self, n: i128) -> Result<String, String> {
        self.text(&n.to_string())
    }
}

/// A private key as read from `source` ("the file /etc/warden/keys/x"), for
/// `owner` ("credential `x`"): kept as read, for the proxy to parse, but
/// never empty, and never a public key. Messages never show it.
pub(super) fn checked_private_key(
    owner: &str,
    source: &str,
    value: String,
) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err(format!(
            "{owner}: {source} is empty; put the SSH private key in it (OpenSSH format, as \
             ssh-keygen writes it)"
        ));
    }
    let first = value.split_whitespace().next().unwrap_or("");
    if HOST_KEY_ALGORITHMS.contains(&first) {
        return Err(format!(
            "{owner}: {source} holds a public key; give the private key (the file without \
             .pub, starting with -----BEGIN OPENSSH PRIVATE KEY-----)"
        ));
    }
    Ok(value)
}

/// An SSH login's secret: a private key, or a password.
pub(super) fn secret(secret: String, private_key: bool) -> SshSecret {
    if private_key {
        SshSecret::PrivateKey(secret)
    } else {
        SshSecret::Password(secret)
    }
}
