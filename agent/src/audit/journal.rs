//! The journal: rows not yet in a Parquet file, on disk within
//! [`AuditConfig::journal_every`](super::AuditConfig::journal_every).
//!
//! Parquet files are written at each rotation (a minute by default), and a
//! Parquet file cannot be appended to, so the rows of the current rotation
//! would die with the agent. Each table therefore keeps one journal,
//! `<table>/.journal-<host>-<pid>-<n>.arrows`: an Arrow IPC stream to which the writer
//! appends the rows it received since the last append, several times a
//! second. After each rotation the journal is replaced, atomically, by one
//! that holds only the rows still waiting (those of a failed write).
//!
//! The owner holds an exclusive `flock` on its journal. A journal that
//! nobody holds belongs to an agent that died: the next agent on the same
//! audit directory (or `warden audit recover`) writes its complete
//! batches to Parquet and removes it. A batch cut short by the crash is
//! the only loss.
use std::{
    fs::{self, File},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use arrow::{
    array::{Array, BooleanArray, RecordBatch, TimestampMicrosecondArray},
    compute::filter_record_batch,
    datatypes::SchemaRef,
    ipc::{reader::StreamReader, writer::StreamWriter},
};
use chrono::DateTime;
use nix::fcntl::{Flock, FlockArg};

use super::files::{AuditError, name_safe, next_seq, partition_of};

const PREFIX: &str = ".journal-";
const SUFFIX: &str = ".arrows";

/// One table's journal, locked for as long as it is open.
pub(crate) struct Journal {
    path: PathBuf,
    schema: SchemaRef,
    writer: StreamWriter<Locked>,
}

/// A file this process holds the `flock` of, as a stream to write to.
struct Locked(Flock<File>);

impl Write for Locked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Journal {
    /// Starts a journal in `table_dir`, empty, named after the host, the
    /// process and a number, so that agents sharing a directory (even
    /// across hosts) and writers of one process never share one.
    pub(crate) fn create(
        table_dir: &Path,
        host: &str,
        schema: SchemaRef,
    ) -> Result<Journal, AuditError> {
        let path = table_dir.join(format!(
            "{PREFIX}{}-{}-{}{SUFFIX}",
            name_safe(host),
            std::process::id(),
            next_seq()
        ));
        let writer = new_stream(&path, &path, &schema, &[])?;
        Ok(Journal {
            path,
            schema,
            writer,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a batch; it is in the kernel's hands when this returns, so
    /// it survives the agent's crash (not a power loss before writeback).
    pub(crate) fn append(&mut self, batch: &RecordBatch) -> Result<(), AuditError> {
        let path = &self.path;
        self.writer
            .write(batch)
            .map_err(|source| AuditError::Arrow {
                path: path.clone(),
                source,
            })?;
        self.writer.flush().map_err(|source| AuditError::Arrow {
            path: path.clone(),
            source,
        })
    }

    /// Replaces the journal with one that holds only `pending`: written
    /// beside it, then renamed over it, so that a crash leaves one or the
    /// other, never both.
    pub(crate) fn reset(&mut self, pending: &[RecordBatch]) -> Result<(), AuditError> {
        let tmp = tmp_path(&self.path);
        let writer = new_stream(&tmp, &self.path, &self.schema, pending).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        fs::rename(&tmp, &self.path).map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })?;
        // The old file's lock goes with it.
        self.writer = writer;
        Ok(())
    }

    /// Removes the journal: everything in it is in Parquet files.
    pub(crate) fn remove(self) -> Result<(), AuditError> {
        fs::remove_file(&self.path).map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// `.journal-....arrows.tmp`: a `.*.tmp` name, which the start-up sweep
/// removes when a crash leaves it.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A new locked stream file at `at` with `batches` in it; errors name `path`.
fn new_stream(
    at: &Path,
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<StreamWriter<Locked>, AuditError> {
    let io_err = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let arrow_err = |source| AuditError::Arrow {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(at)
        .map_err(io_err)?;
    let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| io_err(io::Error::from(errno)))?;
    let mut writer = StreamWriter::try_new(Locked(file), schema).map_err(arrow_err)?;
    for batch in batches {
        writer.write(batch).map_err(arrow_err)?;
    }
    writer.flush().map_err(arrow_err)?;
    Ok(writer)
}

/// A journal left by an agent that is gone, locked by this process while it
/// is being written to Parquet.
pub(crate) struct Orphan {
    pub(crate) path: PathBuf,
    file: Flock<File>,
}

/// The journals in `table_dir` that no live agent holds.
pub(crate) fn orphans(table_dir: &Path) -> io::Result<Vec<Orphan>> {
    let entries = match fs::read_dir(table_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(PREFIX) && name.ends_with(SUFFIX)) {
            continue;
        }
        let path = entry.path();
        let file = match File::open(&path) {
            Ok(file) => file,
            // Its owner replaced or removed it meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // Held: its agent is alive (or another one is recovering it).
        if let Ok(file) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            found.push(Orphan { path, file });
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// What an orphan journal holds, split by Hive partition.
pub(crate) struct Recovered {
    pub(crate) partitions: Vec<(String, RecordBatch)>,
    pub(crate) rows: usize,
    /// Why reading stopped before the end, if it did (the batch the crash
    /// cut short).
    pub(crate) truncated: Option<String>,
}

impl Orphan {
    /// Reads the complete batches, splits them by the partition of their
    /// rows' `start_time`.
    pub(crate) fn read(&self) -> Result<Recovered, AuditError> {
        let arrow_err = |source| AuditError::Arrow {
            path: self.path.clone(),
            source,
        };
        let file = self.file.try_clone().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut recovered = Recovered {
            partitions: Vec::new(),
            rows: 0,
            truncated: None,
        };
        let reader = match StreamReader::try_new(io::BufReader::new(file), None) {
            Ok(reader) => reader,
            // Not even a whole schema: the crash came before any row.
            Err(e) => {
                recovered.truncated = Some(e.to_string());
                return Ok(recovered);
            }
        };
        for batch in reader {
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    recovered.truncated = Some(e.to_string());
                    break;
                }
            };
            recovered.rows += batch.num_rows();
            for (partition, part) in split_by_partition(&batch).map_err(arrow_err)? {
                recovered.partitions.push((partition, part));
            }
        }
        Ok(recovered)
    }

    /// Its rows are in Parquet files now.
    pub(crate) fn remove(self) -> io::Result<()> {
        fs::remove_file(&self.path)
    }
}

/// The batch's rows grouped by the Hive partition of their `start_time`.
fn split_by_partition(
    batch: &RecordBatch,
) -> Result<Vec<(String, RecordBatch)>, arrow::error::ArrowError> {
    let column = batch
        .column_by_name("start_time")
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| {
            arrow::error::ArrowError::SchemaError(
                "a journal batch without a start_time column".into(),
            )
        })?;
    let partitions: Vec<String> = (0..column.len())
        .map(|i| {
            let micros = column.value(i);
            partition_of(&DateTime::from_timestamp_micros(micros).unwrap_or_default())
        })
        .collect();
    let mut distinct = partitions.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() == 1 {
        return Ok(vec![(distinct.remove(0), batch.clone())]);
    }
    distinct
        .into_iter()
        .map(|p| {
            let mask: BooleanArray = partitions.iter().map(|q| Some(*q == p)).collect();
            Ok((p, filter_record_batch(batch, &mask)?))
        })
        .collect()
}
