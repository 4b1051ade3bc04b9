//! Incremental framing: bytes in, whole messages out, one framer per direction.
//!
//! A framer never interprets a message beyond its header: it yields [`Frame`]s
//! holding the exact bytes that arrived, so the proxy can forward them
//! unchanged, drop them or replace them. [`crate::protocols::postgres::FrontendMessage::decode`]
//! and [`crate::protocols::postgres::BackendMessage::decode`] turn a frame into a typed message.
//!
//! # Startup phase and encryption requests
//!
//! The first messages a client sends have no type byte ("untyped"): a
//! StartupMessage, an SSLRequest, a GSSENCRequest or a CancelRequest. The
//! [`FrontendFramer`] tracks the phase itself: it stays in the startup phase
//! after an SSLRequest or a GSSENCRequest (whatever the server answers, the
//! next thing the client sends in clear or inside the negotiated encryption is
//! again an untyped message) and after a CancelRequest, and switches to typed
//! messages after a StartupMessage. So the proxy has nothing to call when the
//! server answers `N`. [`FrontendFramer::expect_startup`] exists for the rare
//! case where the proxy itself needs to restart the startup phase.
//!
//! The server's answer to an SSLRequest or GSSENCRequest is a single byte
//! (`S`, `G` or `N`) without a length. The [`BackendFramer`] cannot see the
//! client's request, so the proxy calls
//! [`BackendFramer::expect_negotiation_reply`] when it forwards one. If the
//! server accepts (`S` or `G`) the bytes that follow are TLS or GSSAPI, not
//! PostgreSQL messages: the proxy must not feed them to either framer until
//! it has decrypted them.
//!
//! # Limits
//!
//! A typed message whose length field is below 4, or above the framer's limit
//! (1 GiB by default, [`DEFAULT_MAX_MESSAGE_LEN`]), is a [`ProtocolError`], as
//! is an untyped message shorter than 8 bytes or longer than
//! [`MAX_STARTUP_MESSAGE_LEN`] (the server's own limit). The error is
//! reported before the body arrives; after an error the framer stays failed
//! and returns the same error again, since the stream cannot be resynchronised.
use std::fmt;

/// The default largest message a framer accepts: 1 GiB, as the server.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 1 << 30;

/// The largest untyped startup-phase message, as the server's
/// `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_MESSAGE_LEN: usize = 10_000;

/// The request code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// The request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// The request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol version 3.0, as a StartupMessage carries it.
pub const PROTOCOL_3_0: u32 = 3 << 16;

/// A malformed message: it closes the connection it came on, never more.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The length field of a message is smaller than its own header.
    #[error("{}: length {len} is below the minimum of {min}", describe(*.tag))]
    LengthTooShort {
        /// The type byte, or `None` for an untyped startup-phase message.
        tag: Option<u8>,
        len: i64,
        min: usize,
    },
    /// The length field of a message is above the framer's limit.
    #[error("{}: length {len} exceeds the limit of {limit} bytes", describe(*.tag))]
    LengthTooLong {
        /// The type byte, or `None` for an untyped startup-phase message.
        tag: Option<u8>,
        len: i64,
        limit: usize,
    },
    /// An untyped message whose code is neither protocol 3.x nor a known request.
    #[error("unsupported startup code {0:#010x} (protocol {major}.{minor})", major = .0 >> 16, minor = .0 & 0xffff)]
    UnsupportedStartupCode(u32),
    /// A message whose body does not match its type.
    #[error("malformed {message} message: {reason}")]
    Malformed {
        message: &'static str,
        reason: &'static str,
    },
    /// A SCRAM exchange failed (bad server message, or server not verified).
    #[error("SCRAM authentication: {0}")]
    Scram(String),
}

fn describe(tag: Option<u8>) -> String {
    match tag {
        None => "startup-phase message".to_string(),
        Some(t) if t.is_ascii_graphic() => format!("message '{}'", t as char),
        Some(t) => format!("message with type byte {t:#04x}"),
    }
}

/// What kind of message a [`Frame`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A startup-phase message: int32 length, then the body (no type byte).
    Untyped,
    /// A regular message: type byte, int32 length, body.
    Typed(u8),
    /// The server's one-byte answer to an SSLRequest or GSSENCRequest.
    NegotiationReply(u8),
}

/// One complete message, with the exact bytes it arrived as.
///
/// `Debug` shows the kind and length only: a frame may hold a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    kind: FrameKind,
    bytes: Vec<u8>,
}

impl Frame {
    /// What kind of message this is.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The type byte of a typed message.
    pub fn tag(&self) -> Option<u8> {
        match self.kind {
            FrameKind::Typed(t) => Some(t),
            _ => None,
        }
    }

    /// The whole message as it arrived (type byte and length included).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole message, to forward it.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Where the body starts within [`Frame::bytes`].
    pub fn body_offset(&self) -> usize {
        match self.kind {
            FrameKind::Untyped => 4,
            FrameKind::Typed(_) => 5,
            FrameKind::NegotiationReply(_) => 1,
        }
    }

    /// The body: what follows the type byte and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[self.body_offset()..]
    }

    /// The length of the whole message in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a frame holds at least its header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Bytes received and not yet framed; consumed from the front.
#[derive(Default)]
struct Buffer {
    data: Vec<u8>,
    start: usize,
}

impl Buffer {
    fn push(&mut self, bytes: &[u8]) {
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        } else if self.start >= 64 * 1024 && self.start * 2 >= self.data.len() {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.extend_from_slice(bytes);
    }

    fn available(&self) -> &[u8] {
        &self.data[self.start..]
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let out = self.data[self.start..self.start + n].to_vec();
        self.start += n;
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
        out
    }
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Frames a typed message at the front of `buf`, if complete.
fn typed_frame(buf: &mut Buffer, limit: usize) -> Result<Option<Frame>, ProtocolError> {
    let avail = buf.available();
    if avail.len() < 5 {
        return Ok(None);
    }
    let tag = avail[0];
    let len = be_i32(&avail[1..5]);
    if len < 4 {
        return Err(ProtocolError::LengthTooShort {
            tag: Some(tag),
            len: len.into(),
            min: 4,
        });
    }
    let len = len as usize; // positive i32: fits
    if len > limit {
        return Err(ProtocolError::LengthTooLong {
            tag: Some(tag),
            len: len as i64,
            limit,
        });
    }
    if avail.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some(Frame {
        kind: FrameKind::Typed(tag),
        bytes: buf.take(len + 1),
    }))
}

/// Frames client-to-server bytes: the startup phase, then typed messages.
pub struct FrontendFramer {
    buf: Buffer,
    startup: bool,
    limit: usize,
    failed: Option<ProtocolError>,
}

impl Default for FrontendFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl FrontendFramer {
    /// A framer at the start of a connection, with the default limit.
    pub fn new() -> Self {
        Self::with_max_message_len(DEFAULT_MAX_MESSAGE_LEN)
    }

    /// A framer whose typed messages may be at most `limit` bytes long
    /// (the length field, which counts itself but not the type byte).
    pub fn with_max_message_len(limit: usize) -> Self {
        Self {
            buf: Buffer::default(),
            startup: true,
            limit,
            failed: None,
        }
    }

    /// Appends bytes received from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// Bytes received and not yet returned in a frame.
    pub fn buffered(&self) -> usize {
        self.buf.available().len()
    }

    /// Whether the next message is expected untyped (startup phase).
    pub fn in_startup_phase(&self) -> bool {
        self.startup
    }

    /// Expects an untyped startup-phase message next. Not needed after an
    /// SSLRequest or GSSENCRequest (the framer stays in the startup phase by
    /// itself); for a proxy that restarts the startup phase on its own.
    pub fn expect_startup(&mut self) {
        self.startup = true;
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// Not an iterator: `None` means "not yet", not "finished".
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = if self.startup {
            self.startup_frame()
        } else {
            typed_frame(&mut self.buf, self.limit)
        };
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn startup_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let avail = self.buf.available();
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = be_i32(&avail[..4]);
        if len < 8 {
            return Err(ProtocolError::LengthTooShort {
                tag: None,
                len: len.into(),
                min: 8,
            });
        }
        let len = len as usize;
        if len > MAX_STARTUP_MESSAGE_LEN {
            return Err(ProtocolError::LengthTooLong {
                tag: None,
                len: len as i64,
                limit: MAX_STARTUP_MESSAGE_LEN,
            });
        }
        if avail.len() < 8 {
            return Ok(None);
        }
        let code = be_i32(&avail[4..8]) as u32;
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {}
            c if c >> 16 == 3 => {}
            c => return Err(ProtocolError::UnsupportedStartupCode(c)),
        }
        if avail.len() < len {
            return Ok(None);
        }
        if code >> 16 == 3 {
            self.startup = false;
        }
        Ok(Some(Frame {
            kind: FrameKind::Untyped,
            bytes: self.buf.take(len),
        }))
    }
}

/// Frames server-to-client bytes: typed messages, and the one-byte answer to
/// an encryption request when told to expect it.
pub struct BackendFramer {
    buf: Buffer,
    negotiation: bool,
    limit: usize,
    failed: Option<ProtocolError>,
}

impl Default for BackendFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendFramer {
    /// A framer at the start of a connection, with the default limit.
    pub fn new() -> Self {
        Self::with_max_message_len(DEFAULT_MAX_MESSAGE_LEN)
    }

    /// A framer whose messages may be at most `limit` bytes long.
    pub fn with_max_message_len(limit: usize) -> Self {
        Self {
            buf: Buffer::default(),
            negotiation: false,
            limit,
            failed: None,
        }
    }

    /// Appends bytes received from the server.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// Bytes received and not yet returned in a frame.
    pub fn buffered(&self) -> usize {
        self.buf.available().len()
    }

    /// The client sent an SSLRequest or GSSENCRequest: the server's next byte
    /// is a one-byte answer (`S`, `G` or `N`), or an ErrorResponse from a
    /// server that does not know the request.
    pub fn expect_negotiation_reply(&mut self) {
        self.negotiation = true;
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// Not an iterator: `None` means "not yet", not "finished".
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.negotiation {
            match self.buf.available().first() {
                None => return Ok(None),
                Some(&b @ (b'S' | b'G' | b'N')) => {
                    self.negotiation = false;
                    return Ok(Some(Frame {
                        kind: FrameKind::NegotiationReply(b),
                        bytes: self.buf.take(1),
                    }));
                }
                Some(_) => self.negotiation = false,
            }
        }
        let result = typed_frame(&mut self.buf, self.limit);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }
}

/// A cursor over a message body that fails instead of panicking.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], message: &'static str) -> Self {
        Self {
            buf,
            pos: 0,
            message,
        }
    }

    pub(super) fn error(&self, reason: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            message: self.message,
            reason,
        }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.remaining() < n {
            return Err(self.error("truncated"));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1)?[0])
    }

    pub(super) fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(be_i32(self.bytes(4)?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(self.i32()? as u32)
    }

    /// A count (int16) that must not be negative.
    pub(super) fn count(&mut self) -> Result<usize, ProtocolError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.error("negative count"))
    }

    /// A NUL-terminated string, without its NUL.
    pub(super) fn cstr(&mut self) -> Result<&'a [u8], ProtocolError> {
        let rest = &self.buf[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error("unterminated string"));
        };
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    pub(super) fn string(&mut self) -> Result<String, ProtocolError> {
        Ok(lossy(self.cstr()?))
    }

    /// A value prefixed by an int32 length, -1 for NULL: its range in the body.
    pub(super) fn nullable_range(
        &mut self,
    ) -> Result<Option<std::ops::Range<usize>>, ProtocolError> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| self.error("negative value length"))?;
        let start = self.pos;
        self.bytes(len)?;
        Ok(Some(start..start + len))
    }

    pub(super) fn nullable(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        Ok(self.nullable_range()?.map(|r| self.buf[r].to_vec()))
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails if bytes are left over.
    pub(super) fn finish(&self) -> Result<(), ProtocolError> {
        if self.remaining() != 0 {
            return Err(self.error("trailing bytes"));
        }
        Ok(())
    }
}

/// Text from the wire. Invalid UTF-8 (a client_encoding other than UTF8) is
/// replaced rather than refused; the raw bytes stay in the frame.
pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes() -> Vec<u8> {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0alice\0database\0app\0\0");
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn startup_switches_to_typed() {
        let mut f = FrontendFramer::new();
        let mut bytes = startup_bytes();
        bytes.extend(typed(b'Q', b"select 1\0"));
        f.push(&bytes);
        let a = f.next().unwrap().unwrap();
        assert_eq!(a.kind(), FrameKind::Untyped);
        assert!(!f.in_startup_phase());
        let b = f.next().unwrap().unwrap();
        assert_eq!(b.tag(), Some(b'Q'));
        assert_eq!(b.body(), b"select 1\0");
        assert!(f.next().unwrap().is_none());
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn ssl_request_keeps_startup_phase() {
        let mut f = FrontendFramer::new();
        let mut bytes = 8i32.to_be_bytes().to_vec();
        bytes.extend(SSL_REQUEST_CODE.to_be_bytes());
        bytes.extend(startup_bytes());
        f.push(&bytes);
        let a = f.next().unwrap().unwrap();
        assert_eq!(a.len(), 8);
        assert!(f.in_startup_phase());
        let b = f.next().unwrap().unwrap();
        assert_eq!(b.kind(), FrameKind::Untyped);
        assert!(!f.in_startup_phase());
        f.expect_startup();
        assert!(f.in_startup_phase());
    }

    #[test]
    fn bad_lengths_are_errors_and_sticky() {
        let mut f = FrontendFramer::new();
        f.push(&startup_bytes());
        f.next().unwrap().unwrap();
        f.push(&[b'Q', 0, 0, 0, 3]);
        let e = f.next().unwrap_err();
        assert!(matches!(e, ProtocolError::LengthTooShort { len: 3, .. }));
        assert_eq!(f.next().unwrap_err(), e);

        let mut f = FrontendFramer::with_max_message_len(100);
        f.expect_startup();
        f.push(&startup_bytes());
        f.next().unwrap().unwrap();
        f.push(&[b'Q', 0, 0, 0, 101]);
        assert!(matches!(
            f.next().unwrap_err(),
            ProtocolError::LengthTooLong { len: 101, .. }
        ));

        let mut f = FrontendFramer::new();
        f.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            f.next().unwrap_err(),
            ProtocolError::LengthTooShort { len: -1, .. }
        ));

        let mut f = FrontendFramer::new();
        f.push(&[0, 0, 0x40, 0]); // 16384 > startup limit
        assert!(matches!(
            f.next().unwrap_err(),
            ProtocolError::LengthTooLong { tag: None, .. }
        ));

        let mut f = FrontendFramer::new();
        f.push(&[0, 0, 0, 8, 0, 2, 0, 0]); // protocol 2.0
        assert_eq!(
            f.next().unwrap_err(),
            ProtocolError::UnsupportedStartupCode(2 << 16)
        );

        // A TLS ClientHello sent without an SSLRequest.
        let mut f = FrontendFramer::new();
        f.push(&[0x16, 0x03, 0x01, 0x02, 0x00]);
        assert!(f.next().is_err());

        let mut b = BackendFramer::new();
        b.push(&[b'Z', 0x80, 0, 0, 0]);
        assert!(matches!(
            b.next().unwrap_err(),
            ProtocolError::LengthTooShort { .. }
        ));
        let mut b = BackendFramer::new();
        b.push(&[b'D', 0x40, 0, 0, 1]);
        assert!(matches!(
            b.next().unwrap_err(),
            ProtocolError::LengthTooLong { .. }
        ));
    }

    #[test]
    fn negotiation_reply() {
        let mut b = BackendFramer::new();
        b.expect_negotiation_reply();
        assert!(b.next().unwrap().is_none());
        b.push(b"N");
        let f = b.next().unwrap().unwrap();
        assert_eq!(f.kind(), FrameKind::NegotiationReply(b'N'));
        assert_eq!(f.bytes(), b"N");
        // Afterwards 'S' is a typed message again (ParameterStatus).
        b.push(&typed(b'S', b"a\0b\0"));
        assert_eq!(b.next().unwrap().unwrap().tag(), Some(b'S'));

        // An old server answers with an ErrorResponse.
        let mut b = BackendFramer::new();
        b.expect_negotiation_reply();
        b.push(&typed(b'E', b"SFATAL\0\0"));
        assert_eq!(b.next().unwrap().unwrap().tag(), Some(b'E'));
    }

    #[test]
    fn debug_hides_bytes() {
        let mut f = FrontendFramer::new();
        f.push(&startup_bytes());
        f.next().unwrap();
        f.push(&typed(b'p', b"hunter2\0"));
        let frame = f.next().unwrap().unwrap();
        let shown = format!("{frame:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("104"),
            "{shown}"
        );
    }

    #[test]
    fn buffer_compacts() {
        let mut b = BackendFramer::new();
        let msg = typed(b'd', &[7u8; 1000]);
        for _ in 0..200 {
            b.push(&msg);
            b.push(&msg[..10]);
            assert_eq!(b.next().unwrap().unwrap().len(), msg.len());
            b.push(&msg[10..]);
            assert_eq!(b.next().unwrap().unwrap().len(), msg.len());
            assert!(b.next().unwrap().is_none());
        }
        assert!(b.buf.data.capacity() < 200 * msg.len());
    }
}
