//! Server-sent events (the WHATWG `text/event-stream` format): cutting a body
//! into event blocks, whatever the chunking, with every byte kept; reading a
//! block's `event` and `data`; writing a block back with new data.
//!
//! Lines end with `\r\n`, `\n` or `\r`; a block ends with an empty line. A
//! chunk that ends with `\r` leaves the block open until the next byte (or
//! the end) tells whether a `\n` belongs to it, so a `\r\n` split across
//! chunks is never read as two line ends.

/// Cuts a byte stream into event blocks. A block is kept until it is
/// complete, whatever its size (the caller bounds the body).
///
/// Public for the fuzz targets (`agent-protocols/fuzz`); the proxy uses it
/// through [`super::StreamMasker`].
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Where the current block starts (the bytes before it are handed out,
    /// and dropped at the next push: one shift per chunk, not per block).
    start: usize,
    /// Where to look for the next line end.
    scan: usize,
    /// Where the current line starts.
    line_start: usize,
}

impl Framer {
    /// Appends the next chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scan -= self.start;
            self.line_start -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete block (its lines and the empty line after them).
    pub fn next_block(&mut self) -> Option<Vec<u8>> {
        loop {
            let rel = self.buf[self.scan..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')?;
            let at = self.scan + rel;
            let next = if self.buf[at] == b'\r' {
                match self.buf.get(at + 1) {
                    None => return None, // a `\n` may follow in the next chunk
                    Some(b'\n') => at + 2,
                    Some(_) => at + 1,
                }
            } else {
                at + 1
            };
            let empty = at == self.line_start;
            self.scan = next;
            self.line_start = next;
            if empty {
                let block = self.buf[self.start..next].to_vec();
                self.start = next;
                return Some(block);
            }
        }
    }

    /// What is left at the end of the body (an unterminated block), if any.
    pub fn take_rest(&mut self) -> Option<Vec<u8>> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        self.scan = 0;
        self.line_start = 0;
        (!rest.is_empty()).then_some(rest)
    }
}

/// The lines of a block, each with its terminator.
fn lines(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = block;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        let term_len = match rest.get(end) {
            Some(b'\r') if rest.get(end + 1) == Some(&b'\n') => 2,
            Some(_) => 1,
            None => 0,
        };
        let (line, after) = rest.split_at(end);
        let (term, after) = after.split_at(term_len);
        rest = after;
        Some((line, term))
    })
}

/// A line's field name and value (the value without its one leading space).
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b':') {
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &[]),
    }
}

/// The `event` and `data` of a block (data lines joined with `\n`); `None`
/// fields when absent, or not UTF-8.
#[derive(Debug, Default, PartialEq)]
pub struct Fields {
    pub event: Option<String>,
    pub data: Option<String>,
}

/// Reads a block's [`Fields`].
pub fn fields(block: &[u8]) -> Fields {
    let mut out = Fields::default();
    let mut data: Option<Vec<u8>> = None;
    for (line, _) in lines(block) {
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        match field(line) {
            (b"event", value) => out.event = std::str::from_utf8(value).ok().map(str::to_string),
            (b"data", value) => {
                // Each data line adds its value and `\n`; the last `\n` goes.
                let data = data.get_or_insert_with(Vec::new);
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            _ => {}
        }
    }
    out.data = data.and_then(|mut d| {
        d.pop();
        String::from_utf8(d).ok()
    });
    out
}

/// `block` with its data lines replaced by `data` (one `data:` line per line
/// of it, at the first data line's place and in its style); other lines
/// (`event:`, `id:`, comments) are kept byte for byte.
pub fn with_data(block: &[u8], data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + data.len());
    let mut written = false;
    for (line, term) in lines(block) {
        if !line.is_empty() && line[0] != b':' && field(line).0 == b"data" {
            if !written {
                written = true;
                let prefix: &[u8] = if line.starts_with(b"data: ") {
                    b"data: "
                } else {
                    b"data:"
                };
                let term: &[u8] = if term.is_empty() { b"\n" } else { term };
                for part in data.split('\n') {
                    // A reader drops one space after `data:`: a line that
                    // starts with a space needs `data: ` in either style.
                    let prefix = if part.starts_with(' ') {
                        b"data: "
                    } else {
                        prefix
                    };
                    out.extend_from_slice(prefix);
                    out.extend_from_slice(part.as_bytes());
                    out.extend_from_slice(term);
                }
            }
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(term);
    }
    out
}

/// Ends `block` with a line end and an empty line, if it does not already
/// (an extra event built from the unterminated last event of a body).
pub fn terminate(block: &mut Vec<u8>) {
    let ends_line = |b: &[u8]| matches!(b.last(), Some(b'\n' | b'\r'));
    if !ends_line(block) {
        block.push(b'\n');
    }
    let last_end = if block.ends_with(b"\r\n") { 2 } else { 1 };
    let before = &block[..block.len() - last_end];
    // An empty `before`: the block is one empty line, already an end.
    if !before.is_empty() && !ends_line(before) {
        if block.ends_with(b"\r") {
            // A `\n` right after a lone `\r` is the same line end, not an
            // empty line: end the line with `\r\n` first.
            block.push(b'\n');
        }
        block.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            while let Some(block) = framer.next_block() {
                out.push(block);
            }
        }
        out.extend(framer.take_rest());
        out
    }

    #[test]
    fn cuts_blocks_whatever_the_chunking() {
        let stream = b"event: a\r\ndata: 1\r\n\r\n: ping\n\ndata: 2\rdata: 3\r\rdata: x";
        let want: Vec<&[u8]> = vec![
            b"event: a\r\ndata: 1\r\n\r\n",
            b": ping\n\n",
            b"data: 2\rdata: 3\r\r",
            b"data: x",
        ];
        assert_eq!(blocks(&[stream]), want);
        for at in 0..=stream.len() {
            assert_eq!(
                blocks(&[&stream[..at], &stream[at..]]),
                want,
                "split at {at}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(blocks(&bytes), want);
    }

    #[test]
    fn reads_fields() {
        let f = fields(b"event: e\r\nid: 1\r\n: c\r\ndata: {\"a\":\r\ndata:1}\r\n\r\n");
        assert_eq!(f.event.as_deref(), Some("e"));
        assert_eq!(f.data.as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(fields(b": ping\n\n"), Fields::default());
        assert_eq!(fields(b"data\n\n").data.as_deref(), Some(""));
    }

    #[test]
    fn replaces_data_keeping_other_lines() {
        let block = b"event: e\r\ndata: old\r\ndata: more\r\nid: 7\r\n\r\n";
        assert_eq!(
            with_data(block, "new"),
            b"event: e\r\ndata: new\r\nid: 7\r\n\r\n"
        );
        assert_eq!(with_data(b"data:x\n\n", "a\nb"), b"data:a\ndata:b\n\n");
        // The `sse` fuzz target's round trip: a line of the data that starts
        // with a space keeps it (a reader drops the one after `data:`).
        let block = b"data:x\ndata:  y\n\n";
        let data = fields(block).data.unwrap();
        assert_eq!(data, "x\n y");
        assert_eq!(with_data(block, &data), b"data:x\ndata:  y\n\n");
        assert_eq!(fields(&with_data(block, &data)).data.unwrap(), data);
    }

    #[test]
    fn terminates_blocks() {
        for (block, want) in [
            (&b"data: x"[..], &b"data: x\n\n"[..]),
            (b"data: x\n", b"data: x\n\n"),
            (b"data: x\r\n", b"data: x\r\n\n"),
            (b"data: x\n\n", b"data: x\n\n"),
            (b"data: x\r\n\r\n", b"data: x\r\n\r\n"),
            (b"data: x\r\r", b"data: x\r\r"),
            (b"data: x\r", b"data: x\r\n\n"),
            (b"\r", b"\r"),
            (b"\n", b"\n"),
        ] {
            let mut block = block.to_vec();
            terminate(&mut block);
            assert_eq!(block, want);
            // It stays one event when another follows.
            let mut framer = Framer::default();
            framer.push(&block);
            framer.push(b"data: next\n\n");
            assert_eq!(framer.next_block(), Some(block));
        }
    }
}
