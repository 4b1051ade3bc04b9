//! What the host must offer before the agent loads anything, each failure
//! with what to do about it.
use std::{fs, path::PathBuf};

use crate::cgroup::{self, CgroupError};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "Warden must run as root to load eBPF programs and manage cgroups (effective uid is {0}); run it with sudo"
    )]
    NotRoot(u32),
    #[error(
        "missing capabilities: {missing}; {role} needs {needed} \
         (in a container or a systemd unit: add these capabilities)"
    )]
    MissingCaps {
        missing: String,
        role: &'static str,
        needed: String,
    },
    #[error(
        "kernel {found} is too old: Warden needs Linux 5.8 or newer (bpf links on cgroups, ring buffers)"
    )]
    KernelTooOld { found: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "no BPF file system at /sys/fs/bpf and mounting one failed ({0}); mount it with \
         `mount -t bpf bpf /sys/fs/bpf` so that the agent can pin its programs (fail closed)"
    )]
    NoBpffs(String),
}

/// Host facts the agent needs later.
#[derive(Debug, Clone)]
pub struct Host {
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Who is starting: the capabilities each needs differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `warden run` also makes the program's mount namespace (CAP_SYS_ADMIN).
    Run,
    /// `warden daemon` (and `warden cleanup`) only load, attach and pin
    /// programs, so its unit can drop CAP_SYS_ADMIN.
    Daemon,
}

impl Role {
    fn needs(self) -> &'static [(u32, &'static str)] {
        match self {
            Role::Run => &[
                (CAP_BPF, "CAP_BPF"),
                (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
            ],
            Role::Daemon => &[
                (CAP_BPF, "CAP_BPF"),
                (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                (CAP_PERFMON, "CAP_PERFMON"),
            ],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Run => "warden run",
            Role::Daemon => "warden daemon",
        }
    }
}

pub fn check(role: Role) -> Result<Host, PreflightError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Err(PreflightError::NotRoot(euid));
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_caps(&status, role);
    if !missing.is_empty() {
        return Err(PreflightError::MissingCaps {
            missing: missing.join(", "),
            role: role.name(),
            needed: role
                .needs()
                .iter()
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if !kernel_at_least(&release, (5, 8)) {
        return Err(PreflightError::KernelTooOld { found: release });
    }
    let cgroup_root = cgroup::cgroup2_root()?;
    let bpffs = ensure_bpffs()?;
    Ok(Host { cgroup_root, bpffs })
}

fn missing_caps(status: &str, role: Role) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    role.needs()
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

fn ensure_bpffs() -> Result<PathBuf, PreflightError> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(p) = cgroup::mount_point_of(&info, "bpf") {
        return Ok(p);
    }
    let target = PathBuf::from("/sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        &target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| PreflightError::NoBpffs(e.to_string()))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        assert!(missing_caps("CapEff:\t000001fffeffffff\n", Role::Run).is_empty());
        assert_eq!(
            missing_caps("CapEff:\t0000000000000000\n", Role::Run),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        );
        assert_eq!(
            missing_caps("CapEff:\t0000000000201000\n", Role::Run),
            ["CAP_BPF"]
        );
        // The daemon's unit: BPF, NET_ADMIN, PERFMON, SYS_PTRACE, DAC_READ_SEARCH.
        let unit = (1u64 << 39) | (1 << 12) | (1 << 38) | (1 << 19) | (1 << 2);
        let status = format!("CapEff:\t{unit:016x}\n");
        assert!(missing_caps(&status, Role::Daemon).is_empty());
        assert_eq!(missing_caps(&status, Role::Run), ["CAP_SYS_ADMIN"]);
    }

    #[test]
    fn compares_kernel_releases() {
        assert!(kernel_at_least("6.18.44-fc-v657", (5, 8)));
        assert!(kernel_at_least("5.8.0", (5, 8)));
        assert!(!kernel_at_least("5.4.0-150-generic", (5, 8)));
        assert!(!kernel_at_least("garbage", (5, 8)));
    }
}
