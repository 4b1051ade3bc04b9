//! cgroup v2: where it is mounted, and the cgroups Warden makes for the
//! programs it manages.
use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo); Warden needs cgroup v2: \
         boot with systemd.unified_cgroup_hierarchy=1, or mount it with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cgroup {path} still has processes after {waited:?}: {pids:?}")]
    Busy {
        path: PathBuf,
        waited: Duration,
        pids: Vec<u32>,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo
/// (it is /sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading", Path::new("/proc/self/mountinfo")))?;
    mount_point_of(&info, "cgroup2").ok_or(CgroupError::NoCgroup2)
}

/// The first mount point of a file system type in a mountinfo text.
pub fn mount_point_of(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fs = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fs == fstype).then(|| PathBuf::from(unescape_mount(mount)))
    })
}

/// mountinfo escapes spaces and a few others as octal (\040).
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&digits, 8)
                && digits.len() == 3
            {
                out.push(v as char);
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// A cgroup made by Warden for a managed workload.
#[derive(Debug)]
pub struct ManagedCgroup {
    path: PathBuf,
}

impl ManagedCgroup {
    /// Make `<root>/warden/<name>`.
    pub fn create(root: &Path, name: &str) -> Result<Self, CgroupError> {
        let parent = root.join("warden");
        fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_err("creating", &path))?;
        Ok(ManagedCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id the kernel reports for tasks in this cgroup (its inode number).
    pub fn id(&self) -> Result<u64, CgroupError> {
        fs::metadata(&self.path)
            .map(|m| m.ino())
            .map_err(io_err("reading", &self.path))
    }

    /// The file a process writes "0" into to join this cgroup.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.path)
    }

    /// Kill every process left in the cgroup, wait for them to go, and remove it.
    pub fn kill_and_remove(self, wait: Duration) -> Result<(), CgroupError> {
        kill_all(&self.path);
        remove_when_empty(&self.path, wait)
    }
}

pub fn pids_in(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// cgroup.kill (Linux 5.14) kills the whole subtree at once; older kernels
/// get a SIGKILL per listed process.
pub fn kill_all(path: &Path) {
    let via_file = fs::OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"));
    if via_file.is_err() {
        for pid in pids_in(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub fn remove_when_empty(path: &Path, wait: Duration) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(CgroupError::Busy {
                    path: path.into(),
                    waited: wait,
                    pids: pids_in(path),
                });
            }
            Err(e) => return Err(io_err("removing", path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
50 25 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        assert_eq!(
            mount_point_of(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_point_of(HYBRID, "bpf"),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        assert_eq!(mount_point_of(HYBRID, "nfs"), None);
    }

    #[test]
    fn finds_cgroup2_on_a_unified_host() {
        let info = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            mount_point_of(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let info = "30 24 0:26 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_point_of(info, "cgroup2"),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
