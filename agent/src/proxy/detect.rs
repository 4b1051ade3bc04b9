//! Protocol detection from the first bytes a client sends, so that decoders
//! can take over the protocols they know.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http,
    Postgres,
    Ssh,
    /// The client sent bytes that match nothing known.
    Unknown,
    /// The server spoke first (SMTP, MySQL, ...).
    ServerFirst,
    /// The connection closed before either side sent a byte.
    None,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::Unknown => "unknown",
            Protocol::ServerFirst => "server-first",
            Protocol::None => "none",
        }
    }
}

/// What the first bytes say, or `None` when more bytes are needed to tell.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        return None;
    }
    // TLS record: handshake (22), version 3.x.
    if first[0] == 0x16 {
        return match first.get(1..3) {
            Some([3, minor]) if *minor <= 4 => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Unknown),
            None => None,
        };
    }
    if let Some(p) = prefix_match(first, b"SSH-", Protocol::Ssh) {
        return p;
    }
    const METHODS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI * HTTP/2.0",
    ];
    let mut undecided = false;
    for m in METHODS {
        match prefix_match(first, m, Protocol::Http) {
            Some(Some(p)) => return Some(p),
            Some(None) => undecided = true,
            None => {}
        }
    }
    // PostgreSQL: int32 length, then a protocol code (3.0 startup, SSLRequest,
    // GSSENCRequest, CancelRequest). Every one starts with a zero byte.
    if first[0] == 0 {
        if first.len() < 8 {
            return None;
        }
        let len = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
        let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
        let known = matches!(code, 196_608 | 80_877_102 | 80_877_103 | 80_877_104);
        return Some(if known && (8..=10_000).contains(&len) {
            Protocol::Postgres
        } else {
            Protocol::Unknown
        });
    }
    if undecided {
        None
    } else {
        Some(Protocol::Unknown)
    }
}

/// Some(Some(p)) on a match, Some(None) while `first` is a strict prefix of
/// the pattern, None on a mismatch.
fn prefix_match(first: &[u8], pattern: &[u8], p: Protocol) -> Option<Option<Protocol>> {
    let n = first.len().min(pattern.len());
    if first[..n] != pattern[..n] {
        return None;
    }
    Some((n == pattern.len()).then_some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_client_first_protocols() {
        assert_eq!(classify(&[0x16, 3, 1, 2, 0]), Some(Protocol::Tls));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(
            classify(b"POST /v1/chat/completions HTTP/1.1\r\n"),
            Some(Protocol::Http)
        );
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http)
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Protocol::Ssh));
        let startup = [0, 0, 0, 40, 0, 3, 0, 0, b'u'];
        assert_eq!(classify(&startup), Some(Protocol::Postgres));
        let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(classify(&ssl_request), Some(Protocol::Postgres));
    }

    #[test]
    fn waits_for_more_bytes_when_ambiguous() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"SS"), None);
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0, 0, 0]), None);
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(classify(b"hello"), Some(Protocol::Unknown));
        assert_eq!(classify(b"GEX"), Some(Protocol::Unknown));
        assert_eq!(classify(&[0, 0, 0, 8, 1, 2, 3, 4]), Some(Protocol::Unknown));
        assert_eq!(classify(&[0x16, 9, 9]), Some(Protocol::Unknown));
    }
}
