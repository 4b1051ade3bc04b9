//! Retention: audit files older than the policy's `audit.retention` go.
//!
//! Files are removed by whole Hive partitions: an `hour=HH` directory goes
//! once the end of its hour is older than the retention, so that no reader
//! ever sees half an hour. Session recordings go by day
//! (`recordings/<YYYY-MM-DD>`), once the end of their day is: at most a
//! day after the rows that name them. The agent sweeps at start and then
//! every [`SWEEP_EVERY`].
use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};

use super::{
    RECORDINGS_DIR,
    schema::{APPROVALS_TABLE, CONNECTIONS_TABLE, EVENTS_TABLE, REQUESTS_TABLE},
};

pub const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub partitions: usize,
    pub files: usize,
}

/// Removes the partitions of every table under `dir` whose hour ended more
/// than `keep` before `now`. Directories that are not partitions are left
/// alone.
pub fn sweep(dir: &Path, keep: Duration, now: DateTime<Utc>) -> io::Result<Swept> {
    let keep = TimeDelta::from_std(keep).unwrap_or(TimeDelta::MAX);
    let Some(cutoff) = now.checked_sub_signed(keep) else {
        return Ok(Swept::default());
    };
    let mut swept = Swept::default();
    for table in [
        CONNECTIONS_TABLE,
        REQUESTS_TABLE,
        APPROVALS_TABLE,
        EVENTS_TABLE,
    ] {
        for (date_dir, date) in partitions(&dir.join(table), "date=", |v| {
            NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()
        })? {
            let mut left = false;
            for (hour_dir, hour) in partitions(&date_dir, "hour=", |v| {
                v.parse::<u32>().ok().filter(|h| *h < 24)
            })? {
                let end = date
                    .and_hms_opt(hour, 0, 0)
                    .map(|t| t.and_utc() + TimeDelta::hours(1));
                if end.is_some_and(|end| end <= cutoff) {
                    swept.files += count_files(&hour_dir)?;
                    fs::remove_dir_all(&hour_dir)?;
                    swept.partitions += 1;
                } else {
                    left = true;
                }
            }
            if !left {
                // Empty now, unless something else lives there.
                let _ = fs::remove_dir(&date_dir);
            }
        }
    }
    for (day_dir, day) in partitions(&dir.join(RECORDINGS_DIR), "", |v| {
        NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()
    })? {
        let end = day
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc() + TimeDelta::days(1));
        if end.is_some_and(|end| end <= cutoff) {
            swept.files += count_files(&day_dir)?;
            fs::remove_dir_all(&day_dir)?;
            swept.partitions += 1;
        }
    }
    Ok(swept)
}

/// The subdirectories of `dir` named `<key><value>` whose value parses.
fn partitions<V>(
    dir: &Path,
    key: &str,
    parse: impl Fn(&str) -> Option<V>,
) -> io::Result<Vec<(PathBuf, V)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name();
        if let Some(value) = name
            .to_str()
            .and_then(|n| n.strip_prefix(key))
            .and_then(&parse)
        {
            out.push((entry.path(), value));
        }
    }
    Ok(out)
}

fn count_files(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            n += count_files(&entry.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn touch(dir: &Path, rel: &str) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"x").unwrap();
    }

    #[test]
    fn removes_whole_hours_older_than_the_retention() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        touch(d, "connections/date=2025-03-01/hour=22/part-a.parquet");
        touch(d, "connections/date=2025-03-01/hour=23/part-b.parquet");
        touch(d, "connections/date=2025-03-01/hour=23/part-c.parquet");
        touch(d, "requests/date=2025-03-01/hour=23/part-d.parquet");
        touch(d, "approvals/date=2025-03-01/hour=23/part-g.parquet");
        touch(d, "requests/date=2025-03-02/hour=00/part-e.parquet");
        touch(d, "requests/date=2025-03-02/hour=01/part-f.parquet");
        touch(d, "requests/notes/keep.txt");
        touch(d, "recordings/2025-03-01/s-1-1.cast");
        touch(d, "recordings/2025-03-01/s-1-2.cast");
        touch(d, "recordings/2025-03-02/s-2-1.cast");
        touch(d, "recordings/notes/keep.txt");
        touch(d, "requests/date=garbage/hour=01/keep.parquet");

        // A day's retention at 00:30 on the 3rd: hours ending by 00:30 on
        // the 2nd go; 00:00-01:00 on the 2nd ends after the cutoff and stays.
        let now = Utc.with_ymd_and_hms(2025, 3, 3, 0, 30, 0).unwrap();
        let swept = sweep(d, Duration::from_secs(86400), now).unwrap();
        assert_eq!(
            swept,
            Swept {
                partitions: 5,
                files: 7
            }
        );
        // A day of recordings goes once the whole day is past the cutoff.
        assert!(!d.join("recordings/2025-03-01").exists());
        assert!(d.join("recordings/2025-03-02/s-2-1.cast").exists());
        assert!(d.join("recordings/notes/keep.txt").exists());
        assert!(!d.join("connections/date=2025-03-01").exists());
        assert!(!d.join("requests/date=2025-03-01").exists());
        assert!(!d.join("approvals/date=2025-03-01").exists());
        assert!(
            d.join("requests/date=2025-03-02/hour=00/part-e.parquet")
                .exists()
        );
        assert!(
            d.join("requests/date=2025-03-02/hour=01/part-f.parquet")
                .exists()
        );
        assert!(d.join("requests/notes/keep.txt").exists());
        assert!(
            d.join("requests/date=garbage/hour=01/keep.parquet")
                .exists()
        );

        // An hour later the 00 hour is past the cutoff too.
        let later = now + TimeDelta::hours(1);
        assert_eq!(
            sweep(d, Duration::from_secs(86400), later)
                .unwrap()
                .partitions,
            1
        );
        assert!(!d.join("requests/date=2025-03-02/hour=00").exists());
    }

    #[test]
    fn a_missing_directory_is_nothing_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let swept = sweep(&tmp.path().join("none"), Duration::from_secs(1), Utc::now()).unwrap();
        assert_eq!(swept, Swept::default());
    }
}
