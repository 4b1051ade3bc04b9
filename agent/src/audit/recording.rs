//! Session recordings: what a terminal session showed, as an asciicast v2
//! file (<https://docs.asciinema.org/manual/asciicast/v2/>) that `asciinema
//! play` and `asciinema cat` replay. One file per SSH shell or exec, under
//! `<audit dir>/recordings/<date>/`; the session's `requests` row names it.
//!
//! Only what the server sent is kept (`"o"` events): what the client typed
//! comes back as echo when the terminal echoes, and is not recorded when it
//! does not (passwords).
use std::{
    fs::{self, File},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use chrono::{DateTime, Utc};
use serde_json::json;

/// What the header says of the terminal and the command.
pub struct CastHeader<'a> {
    pub width: u32,
    pub height: u32,
    pub started: DateTime<Utc>,
    /// The exec command line; None for a shell.
    pub command: Option<&'a str>,
    pub title: &'a str,
    /// `TERM`, when the client asked for a PTY.
    pub term: Option<&'a str>,
}

/// Appends events to one asciicast file. Writes go through a buffer; the
/// file is complete once [`Recording::finish`] returns (or on drop).
pub struct Recording {
    out: BufWriter<File>,
    path: PathBuf,
    start: Instant,
    /// The tail of the last chunk when it ended inside a UTF-8 sequence.
    partial: Vec<u8>,
    bytes: u64,
}

impl Recording {
    /// Creates `<dir>/<date>/<name>.cast` (the directories too) and writes
    /// the header.
    pub fn create(dir: &Path, name: &str, header: &CastHeader) -> std::io::Result<Recording> {
        let day = dir.join(header.started.format("%Y-%m-%d").to_string());
        fs::create_dir_all(&day)?;
        let path = day.join(format!("{name}.cast"));
        let mut out = BufWriter::new(File::create(&path)?);
        let mut head = json!({
            "version": 2,
            "width": header.width.max(1),
            "height": header.height.max(1),
            "timestamp": header.started.timestamp(),
            "title": header.title,
        });
        if let Some(command) = header.command {
            head["command"] = json!(command);
        }
        if let Some(term) = header.term {
            head["env"] = json!({ "TERM": term });
        }
        writeln!(out, "{head}")?;
        Ok(Recording {
            out,
            path,
            start: Instant::now(),
            partial: Vec::new(),
            bytes: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Output bytes recorded so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records what the terminal was sent. A UTF-8 sequence split across
    /// two chunks is kept whole; bytes that are not UTF-8 become U+FFFD.
    pub fn output(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.bytes += data.len() as u64;
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(data);
        let complete = complete_prefix(&buf);
        self.partial = buf[complete..].to_vec();
        if complete == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&buf[..complete]);
        self.event(&text)
    }

    fn event(&mut self, text: &str) -> std::io::Result<()> {
        let t = self.start.elapsed().as_secs_f64();
        writeln!(self.out, "{}", json!([(t * 1e6).round() / 1e6, "o", text]))
    }

    /// Writes what is left and flushes.
    pub fn finish(mut self) -> std::io::Result<PathBuf> {
        self.flush_partial()?;
        self.out.flush()?;
        Ok(std::mem::take(&mut self.path))
    }

    fn flush_partial(&mut self) -> std::io::Result<()> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let rest = std::mem::take(&mut self.partial);
        self.event(&String::from_utf8_lossy(&rest))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = self.flush_partial();
            let _ = self.out.flush();
        }
    }
}

/// The length of the longest prefix of `buf` that does not end inside a
/// UTF-8 sequence that more bytes could complete.
fn complete_prefix(buf: &[u8]) -> usize {
    match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        // An incomplete sequence at the very end: keep it for the next chunk.
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        // Invalid bytes inside: decode what is there lossily, except an
        // incomplete tail (at most 3 bytes).
        Err(_) => {
            let tail_start = buf.len().saturating_sub(3);
            (tail_start..buf.len())
                .find(|&i| {
                    buf[i] & 0xC0 == 0xC0
                        && std::str::from_utf8(&buf[i..])
                            .err()
                            .is_some_and(|e| e.error_len().is_none() && e.valid_up_to() == 0)
                })
                .unwrap_or(buf.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_events(path: &Path) -> (serde_json::Value, Vec<serde_json::Value>) {
        let text = fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        let header = serde_json::from_str(lines.next().unwrap()).unwrap();
        let events = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        (header, events)
    }

    fn header(command: Option<&str>) -> CastHeader<'_> {
        CastHeader {
            width: 100,
            height: 30,
            started: Utc::now(),
            command,
            title: "deploy@127.0.0.1:2222",
            term: Some("xterm"),
        }
    }

    #[test]
    fn header_and_output_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recording::create(dir.path(), "s-1", &header(Some("uname -a"))).unwrap();
        rec.output(b"hello\r\n").unwrap();
        rec.output(b"world").unwrap();
        assert_eq!(rec.bytes(), 12);
        let path = rec.finish().unwrap();
        assert!(path.starts_with(dir.path()));
        assert_eq!(path.extension().unwrap(), "cast");
        let (head, events) = read_events(&path);
        assert_eq!(head["version"], 2);
        assert_eq!(head["width"], 100);
        assert_eq!(head["command"], "uname -a");
        assert_eq!(head["env"]["TERM"], "xterm");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0][1], "o");
        assert_eq!(events[0][2], "hello\r\n");
        assert_eq!(events[1][2], "world");
        assert!(events[1][0].as_f64().unwrap() >= events[0][0].as_f64().unwrap());
    }

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recording::create(dir.path(), "s-2", &header(None)).unwrap();
        let euro = "€".as_bytes();
        rec.output(&[b'a', euro[0]]).unwrap();
        rec.output(&euro[1..]).unwrap();
        rec.output(&[0xff, b'b']).unwrap();
        let path = rec.finish().unwrap();
        let (head, events) = read_events(&path);
        assert!(head.get("command").is_none());
        let text: String = events
            .iter()
            .map(|e| e[2].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, "a€\u{fffd}b");
    }

    #[test]
    fn an_unfinished_tail_is_written_at_finish() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recording::create(dir.path(), "s-3", &header(None)).unwrap();
        rec.output(&[b'x', 0xe2, 0x82]).unwrap();
        let path = rec.finish().unwrap();
        let (_, events) = read_events(&path);
        let text: String = events
            .iter()
            .map(|e| e[2].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, "x\u{fffd}");
    }
}
