//! The host keys the agent shows SSH clients: one Ed25519 key per policy
//! target, derived from a seed made on first start
//! (`<state dir>/ssh/host-key-seed`, root only), so that a target keeps its
//! key across restarts and a client's known_hosts stays valid.
use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use russh::keys::{PrivateKey, ssh_key::private::Ed25519Keypair};
use sha2::{Digest, Sha256};

use crate::policy::SshLogin;

const SEED_FILE: &str = "host-key-seed";
const SEED_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "{path}: {source}; the agent keeps its SSH host key seed there: check that the state directory is writable by root"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: the SSH host key seed must be {SEED_LEN} bytes, found {found}; remove the file to make a new one (clients will then see new host keys)"
    )]
    BadSeed { path: PathBuf, found: usize },
}

pub struct HostKeys {
    seed: [u8; SEED_LEN],
}

impl HostKeys {
    /// Reads `<dir>/host-key-seed`, or makes it (0600, in a 0700 `dir`).
    pub fn load_or_create(dir: &Path) -> Result<HostKeys, HostKeyError> {
        let path = dir.join(SEED_FILE);
        let io = |source| HostKeyError::Io {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        match fs::read(&path) {
            Ok(bytes) => {
                let seed: [u8; SEED_LEN] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| HostKeyError::BadSeed {
                            path: path.clone(),
                            found: bytes.len(),
                        })?;
                Ok(HostKeys { seed })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; SEED_LEN];
                getrandom(&mut seed).map_err(io)?;
                // create_new: two agents starting at once keep the first seed.
                let written = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| f.write_all(&seed).and_then(|()| f.sync_all()));
                match written {
                    Ok(()) => Ok(HostKeys { seed }),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        HostKeys::load_or_create(dir)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The key shown to clients of `target` (a policy target's name).
    pub fn for_target(&self, target: &str) -> PrivateKey {
        let mut h = Sha256::new();
        h.update(b"warden ssh host key\0");
        h.update(self.seed);
        h.update(target.as_bytes());
        let seed: [u8; 32] = h.finalize().into();
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(format!("warden {target}"));
        key
    }

    /// `ssh-ed25519 AAAA... warden <target>`.
    pub fn public_line(&self, target: &str) -> String {
        self.for_target(target)
            .public_key()
            .to_openssh()
            .unwrap_or_default()
    }

    /// known_hosts lines for the targets that have an SSH login: one per
    /// single address and port (`[127.0.0.1]:2222 ssh-ed25519 ...`), and a
    /// comment for what cannot be written as a host (a network, any port).
    pub fn known_hosts<'a>(&self, logins: impl Iterator<Item = &'a SshLogin>) -> String {
        let mut out = String::from(
            "# Written by warden: the host keys the agent shows for the SSH targets it logs in to.\n",
        );
        for login in logins {
            let key = self.public_line(&login.target);
            let hosts = host_patterns(login);
            if hosts.is_empty() {
                out.push_str(&format!(
                    "# target {}: no single address and port; add its host names before this key:\n# <host> {key}\n",
                    login.target
                ));
                continue;
            }
            out.push_str(&format!("{} {key}\n", hosts.join(",")));
        }
        out
    }

    /// The OpenSSH private key text, for tests and `warden ssh host-key`.
    #[cfg(test)]
    fn private_openssh(&self, target: &str) -> String {
        self.for_target(target)
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map(|s| s.to_string())
            .unwrap_or_default()
    }
}

/// `[ip]:port` (or `ip` for port 22) for every single address and single
/// port of the login's target.
fn host_patterns(login: &SshLogin) -> Vec<String> {
    let ports: Vec<u16> = login
        .ports
        .iter()
        .filter(|r| r.first == r.last)
        .map(|r| r.first)
        .collect();
    let ports = if login.ports.is_empty() {
        vec![22]
    } else {
        ports
    };
    let mut out = Vec::new();
    for net in &login.addresses {
        if net.prefix_len() != net.max_prefix_len() {
            continue;
        }
        let ip = net.addr();
        for &port in &ports {
            out.push(if port == 22 {
                ip.to_string()
            } else {
                format!("[{ip}]:{port}")
            });
        }
    }
    out
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut f = fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PortRange, SshSecret, UpstreamHostKeys};

    fn login(target: &str, addresses: &[&str], ports: &[(u16, u16)]) -> SshLogin {
        SshLogin {
            target: target.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            user: None,
            secret: SshSecret::Password("x".into()),
            host_keys: UpstreamHostKeys::Keys(Vec::new()),
        }
    }

    #[test]
    fn seed_is_made_once_and_keys_are_stable_per_target() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ssh");
        let a = HostKeys::load_or_create(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(SEED_FILE)), 0o600);
        let b = HostKeys::load_or_create(&dir).unwrap();
        assert_eq!(a.public_line("build-box"), b.public_line("build-box"));
        assert_ne!(a.public_line("build-box"), a.public_line("db-box"));
        assert!(a.public_line("build-box").starts_with("ssh-ed25519 AAAA"));
        assert!(
            a.private_openssh("build-box")
                .contains("OPENSSH PRIVATE KEY")
        );
        let other = HostKeys::load_or_create(&tmp.path().join("other")).unwrap();
        assert_ne!(a.public_line("build-box"), other.public_line("build-box"));
    }

    #[test]
    fn a_truncated_seed_is_an_error_that_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(SEED_FILE), b"short").unwrap();
        let err = HostKeys::load_or_create(tmp.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("found 5"), "{err}");
        assert!(err.contains("remove the file"), "{err}");
    }

    #[test]
    fn known_hosts_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = HostKeys::load_or_create(tmp.path()).unwrap();
        let logins = [
            login("box", &["127.0.0.1/32"], &[(2222, 2222)]),
            login("std", &["10.0.0.5/32", "::1/128"], &[]),
            login("net", &["10.0.0.0/24"], &[(22, 22)]),
        ];
        let text = keys.known_hosts(logins.iter());
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("[127.0.0.1]:2222 ssh-ed25519 "),
            "{text}"
        );
        assert!(lines[0].ends_with(&keys.public_line("box")));
        assert!(lines[1].starts_with("10.0.0.5,::1 ssh-ed25519 "), "{text}");
        assert!(text.contains("# target net:"), "{text}");
    }
}
