//! The on-disk side: Hive partitions, atomic Parquet files, crash leftovers.
use std::{
    fs::{self, File},
    io::{self, BufWriter},
    marker::PhantomData,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use arrow::array::RecordBatch;
use chrono::{DateTime, Timelike, Utc};
use parquet::{
    arrow::ArrowWriter,
    basic::{Compression, ZstdLevel},
    errors::ParquetError,
    file::{metadata::KeyValue, properties::WriterProperties},
};

use super::schema::{META_SCHEMA_VERSION, META_TABLE, Table};

/// What can go wrong writing one file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot encode {path} as Parquet: {source}")]
    Encode { path: PathBuf, source: ParquetError },
    #[error("cannot build the Arrow batch for {path}: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
}

impl AuditError {
    /// What an operator can do about it.
    pub fn advice(&self) -> &'static str {
        let io = match self {
            AuditError::CreateDir { source, .. } | AuditError::Io { source, .. } => Some(source),
            AuditError::Encode {
                source: ParquetError::External(e),
                ..
            } => e.downcast_ref::<io::Error>(),
            _ => None,
        };
        match io.map(io::Error::kind) {
            Some(io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) => {
                "free disk space (or raise the quota) on the audit directory's filesystem"
            }
            Some(io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem) => {
                "make the audit directory writable by the agent's user"
            }
            Some(io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists) => {
                "remove the file that stands where a partition directory should be"
            }
            Some(_) => "check the audit directory's filesystem",
            None => "this is a bug in warden; please report it",
        }
    }
}

/// The Hive partition of a row: `date=YYYY-MM-DD/hour=H` of its start time.
/// The hour is not zero-padded: DuckDB and pyarrow infer `hour=05` as text
/// but `hour=5` as an integer, like `hour=15`.
pub(crate) fn partition_of(start: &DateTime<Utc>) -> String {
    format!("{}/hour={}", start.format("date=%Y-%m-%d"), start.hour())
}

/// Writes the files of the table of `T` (`<dir>/<T::NAME>`), named uniquely
/// for this process.
pub(crate) struct TableWriter<T> {
    table_dir: PathBuf,
    host: String,
    pid: u32,
    // Holds no row: Send and Sync whatever `T` is.
    rows: PhantomData<fn(&[T])>,
}

impl<T: Table> TableWriter<T> {
    pub(crate) fn new(dir: &Path, host: String) -> Self {
        TableWriter {
            table_dir: dir.join(T::NAME),
            host,
            pid: std::process::id(),
            rows: PhantomData,
        }
    }

    pub(crate) fn table_dir(&self) -> &Path {
        &self.table_dir
    }

    /// Writes the rows of one partition to a new file that appears
    /// atomically (see [`TableWriter::write_batch`]). Returns the final path.
    pub(crate) fn write_partition(
        &self,
        partition: &str,
        rows: &[T],
    ) -> Result<PathBuf, AuditError> {
        let batch = T::to_record_batch(rows, &self.host).map_err(|source| AuditError::Arrow {
            path: self.table_dir.join(partition),
            source,
        })?;
        self.write_batch(partition, &batch)
    }

    /// Writes a batch of one partition's rows to a new file that appears
    /// atomically: `.<name>.tmp` in the same directory, fsync, rename,
    /// fsync of the directory. Returns the final path.
    pub(crate) fn write_batch(
        &self,
        partition: &str,
        batch: &RecordBatch,
    ) -> Result<PathBuf, AuditError> {
        let dir = self.table_dir.join(partition);
        create_dir_synced(&dir)?;
        let name = format!(
            "part-{}-{}-{}-{:06}.parquet",
            Utc::now().format("%Y%m%dT%H%M%S"),
            name_safe(&self.host),
            self.pid,
            next_seq()
        );
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let result = write_file::<T>(&tmp, batch).and_then(|()| {
            fs::rename(&tmp, &path).map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?;
            sync_dir(&dir)
        });
        if result.is_err() {
            // Best effort: a leftover is removed at the next start anyway.
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }
}

fn write_file<T: Table>(tmp: &Path, batch: &RecordBatch) -> Result<(), AuditError> {
    let io_err = |source| AuditError::Io {
        path: tmp.to_path_buf(),
        source,
    };
    let encode_err = |source| AuditError::Encode {
        path: tmp.to_path_buf(),
        source,
    };
    let file = File::create(tmp).map_err(io_err)?;
    let mut writer = ArrowWriter::try_new(
        BufWriter::new(file),
        batch.schema(),
        Some(writer_props::<T>()),
    )
    .map_err(encode_err)?;
    writer.write(batch).map_err(encode_err)?;
    let file = writer
        .into_inner()
        .map_err(encode_err)?
        .into_inner()
        .map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)
}

fn writer_props<T: Table>() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(
                META_SCHEMA_VERSION.to_string(),
                T::SCHEMA_VERSION.to_string(),
            ),
            KeyValue::new(META_TABLE.to_string(), T::NAME.to_string()),
        ]))
        .build()
}

/// Creates `dir` and its parents; when it had to create them, fsyncs the
/// parents so that the new entries survive a power loss.
fn create_dir_synced(dir: &Path) -> Result<(), AuditError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| AuditError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    // date=.../hour=.. were possibly both new: sync the hour's and the date's parents.
    for parent in dir.ancestors().skip(1).take(2) {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| AuditError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes `.*.tmp` files under `dir` (recursively): files a crash left
/// before their rename. Those of a writer that still runs on this host (a
/// second agent sharing the directory) are left alone. Returns how many it
/// removed.
pub(crate) fn remove_stale_tmp(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            removed += remove_stale_tmp(&path)?;
        } else if kind.is_file()
            && is_tmp_name(&entry.file_name().to_string_lossy())
            && !writer_alive(&entry.file_name().to_string_lossy())
        {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn is_tmp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Whether the process that names itself in a temporary file
/// (`.part-<time>-<host>-<pid>-<seq>.parquet.tmp`,
/// `.journal-<host>-<pid>-<n>.arrows.tmp`) runs on this host.
fn writer_alive(name: &str) -> bool {
    let stem = name.trim_start_matches('.').trim_end_matches(".tmp");
    let stem = stem.rsplit_once('.').map_or(stem, |(s, _)| s);
    let mut parts = stem.rsplitn(3, '-');
    let (_seq, pid, rest) = (parts.next(), parts.next(), parts.next());
    let (Some(pid), Some(rest)) = (pid.and_then(|p| p.parse::<i32>().ok()), rest) else {
        return false;
    };
    pid > 0
        && rest.ends_with(&format!("-{}", name_safe(&hostname())))
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Numbers the files (and journals) of this process: one counter for every
/// writer in it, so that two writers of one process never pick one name.
pub(crate) fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// The host name as it goes into file names: what is not a letter, digit,
/// `-` or `_` becomes `_`.
pub(crate) fn name_safe(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// This machine's hostname.
pub(crate) fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}
