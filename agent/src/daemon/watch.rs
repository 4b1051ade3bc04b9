//! Following the cgroup tree: which cgroups exist now, and which appear
//! and go later. inotify on cgroupfs tells of every mkdir and rmdir as it
//! happens, so a service that starts is seen at once, without polling.
use std::{
    collections::HashMap,
    fs,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::{Interest, unix::AsyncFd};

/// A change in the tree, paths relative to its root ("/" first).
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Appeared(String),
    Gone(String),
    /// A followed cgroup's `cgroup.events` changed: processes came into its
    /// subtree (or left it).
    Populated(String),
}

pub struct CgroupWatch {
    root: PathBuf,
    inotify: AsyncFd<InotifyFd>,
    /// The directories watched, by descriptor.
    watched: HashMap<WatchDescriptor, String>,
    /// The `cgroup.events` files followed, by descriptor.
    followed: HashMap<WatchDescriptor, String>,
}

impl CgroupWatch {
    pub fn new(root: &Path) -> anyhow::Result<CgroupWatch> {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| {
                anyhow::anyhow!(
                    "inotify: {e}; raise fs.inotify.max_user_instances if the host runs out of them"
                )
            })?;
        // SAFETY: the Inotify owns its descriptor, and the AsyncFd owns it.
        let inotify =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching inotify: {e}"))?;
        Ok(CgroupWatch {
            root: root.to_path_buf(),
            inotify,
            watched: HashMap::new(),
            followed: HashMap::new(),
        })
    }

    /// Walks the tree from `relative` down, handing each cgroup to `visit`.
    /// Where `visit` says "descend", the directory is watched and its
    /// children visited: a managed cgroup's children inherit its programs,
    /// so they need neither.
    pub fn scan(&mut self, relative: &str, visit: &mut impl FnMut(&str) -> Descend) {
        let mut stack = vec![relative.to_string()];
        while let Some(rel) = stack.pop() {
            if rel != "/" && visit(&rel) == Descend::No {
                continue;
            }
            let dir = self.absolute(&rel);
            // Watch before listing, so a child made in between is not missed
            // (at worst it is visited twice; attaching is idempotent above).
            if let Err(e) = self.watch(&rel, &dir) {
                tracing::warn!(cgroup = %rel, error = %e, "cannot watch a cgroup for new children");
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name();
                    stack.push(join(&rel, &name.to_string_lossy()));
                }
            }
        }
    }

    fn watch(&mut self, rel: &str, dir: &Path) -> nix::Result<()> {
        let wd = self.inotify.get_ref().0.add_watch(
            dir,
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR,
        )?;
        self.watched.insert(wd, rel.to_string());
        Ok(())
    }

    /// Report when processes come into the subtree of `rel`: the kernel
    /// rewrites its `cgroup.events` when the subtree's first process comes
    /// and its last goes.
    pub fn follow(&mut self, rel: &str) -> nix::Result<()> {
        let events = self.absolute(rel).join("cgroup.events");
        let wd = self
            .inotify
            .get_ref()
            .0
            .add_watch(&events, AddWatchFlags::IN_MODIFY)?;
        self.followed.insert(wd, rel.to_string());
        Ok(())
    }

    /// The next changes: waits for at least one.
    pub async fn changes(&mut self) -> anyhow::Result<Vec<Change>> {
        loop {
            let mut guard = self.inotify.readable().await?;
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(Into::into)) {
                Ok(Ok(events)) => events,
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            };
            let mut changes = Vec::new();
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.watched.remove(&event.wd);
                    self.followed.remove(&event.wd);
                    continue;
                }
                if let Some(rel) = self.followed.get(&event.wd) {
                    changes.push(Change::Populated(rel.clone()));
                    continue;
                }
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    tracing::warn!(
                        "the kernel dropped cgroup events (inotify queue overflow); rescanning"
                    );
                    changes.push(Change::Appeared("/".into()));
                    continue;
                }
                let (Some(parent), Some(name)) = (self.watched.get(&event.wd), &event.name) else {
                    continue;
                };
                if !event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    continue;
                }
                let path = join(parent, &name.to_string_lossy());
                if event.mask.contains(AddWatchFlags::IN_CREATE) {
                    changes.push(Change::Appeared(path));
                } else if event.mask.contains(AddWatchFlags::IN_DELETE) {
                    changes.push(Change::Gone(path));
                }
            }
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }

    pub fn absolute(&self, relative: &str) -> PathBuf {
        self.root.join(relative.trim_start_matches('/'))
    }

    /// How many directories are watched (for `warden status`).
    pub fn watched(&self) -> usize {
        self.watched.len()
    }
}

/// tokio's reactor wants the raw descriptor.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descend {
    Yes,
    No,
}

fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_from_the_root() {
        assert_eq!(join("/", "system.slice"), "/system.slice");
        assert_eq!(
            join("/system.slice", "a.service"),
            "/system.slice/a.service"
        );
    }

    /// inotify works on any directory tree: a plain one stands for cgroupfs.
    #[tokio::test]
    async fn new_and_removed_directories_are_reported() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("system.slice/old.service")).unwrap();
        let mut watch = CgroupWatch::new(root.path()).unwrap();
        let mut seen = Vec::new();
        watch.scan("/", &mut |rel| {
            seen.push(rel.to_string());
            if rel.ends_with(".service") {
                Descend::No
            } else {
                Descend::Yes
            }
        });
        seen.sort();
        assert_eq!(seen, ["/system.slice", "/system.slice/old.service"]);
        assert_eq!(watch.watched(), 2);

        fs::create_dir(root.path().join("system.slice/new.service")).unwrap();
        fs::remove_dir(root.path().join("system.slice/old.service")).unwrap();
        let mut changes = Vec::new();
        while changes.len() < 2 {
            let more = tokio::time::timeout(std::time::Duration::from_secs(5), watch.changes())
                .await
                .expect("inotify reports within seconds")
                .unwrap();
            changes.extend(more);
        }
        assert_eq!(
            changes,
            [
                Change::Appeared("/system.slice/new.service".into()),
                Change::Gone("/system.slice/old.service".into())
            ]
        );
    }
}
