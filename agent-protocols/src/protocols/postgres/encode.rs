//! Encoders for the messages the proxy writes itself: answers to the client
//! (errors, rewritten rows, its own authentication) and requests upstream
//! (startup, credentials).
//!
//! Strings are cut at their first NUL, which the protocol cannot carry: a
//! value with an embedded NUL can never smuggle extra fields into a message.
//!
//! # Panics
//!
//! An encoder panics if the message would exceed `i32::MAX` bytes or hold
//! more than `i16::MAX` values or fields, which no message read through a
//! framer (limit 1 GiB) and no PostgreSQL row (at most 1664 columns) comes near.
use std::fmt;

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};

use super::backend::{FieldDescription, TransactionStatus};
use super::framing::{CANCEL_REQUEST_CODE, PROTOCOL_3_0, ProtocolError, SSL_REQUEST_CODE};

/// The severity of an ErrorResponse or NoticeResponse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    /// Ends the statement (and the transaction block).
    Error,
    /// Ends the session.
    Fatal,
    Panic,
    Warning,
    Notice,
    Debug,
    Info,
    Log,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }
}

fn len_i32(n: usize) -> [u8; 4] {
    i32::try_from(n)
        .expect("PostgreSQL message longer than i32::MAX")
        .to_be_bytes()
}

/// A typed message: `tag`, length, then what `body` writes.
fn typed(tag: u8, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = vec![tag, 0, 0, 0, 0];
    body(&mut buf);
    let len = len_i32(buf.len() - 1);
    buf[1..5].copy_from_slice(&len);
    buf
}

/// An untyped startup-phase message.
fn untyped(body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = vec![0, 0, 0, 0];
    body(&mut buf);
    let len = len_i32(buf.len());
    buf[..4].copy_from_slice(&len);
    buf
}

fn put_cstr(buf: &mut Vec<u8>, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    buf.extend_from_slice(&s[..end]);
    buf.push(0);
}

fn put_nullable(buf: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            buf.extend_from_slice(&len_i32(v.len()));
            buf.extend_from_slice(v);
        }
    }
}

fn put_count(buf: &mut Vec<u8>, n: usize) {
    let n = i16::try_from(n).expect("more than i16::MAX items in a PostgreSQL message");
    buf.extend_from_slice(&n.to_be_bytes());
}

fn error_like(
    tag: u8,
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Vec<u8> {
    typed(tag, |b| {
        for (code, value) in [
            (b'S', Some(severity.as_str())),
            (b'V', Some(severity.as_str())),
            (b'C', Some(sqlstate)),
            (b'M', Some(message)),
            (b'D', detail),
            (b'H', hint),
        ] {
            if let Some(v) = value {
                b.push(code);
                put_cstr(b, v.as_bytes());
            }
        }
        b.push(0);
    })
}

/// ErrorResponse. `sqlstate` is a five-character code such as `42501`
/// (insufficient_privilege).
pub fn error_response(
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Vec<u8> {
    error_like(b'E', severity, sqlstate, message, detail, hint)
}

/// NoticeResponse.
pub fn notice_response(
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Vec<u8> {
    error_like(b'N', severity, sqlstate, message, detail, hint)
}

/// ReadyForQuery.
pub fn ready_for_query(status: TransactionStatus) -> Vec<u8> {
    typed(b'Z', |b| b.push(status.as_byte()))
}

/// DataRow; `None` is SQL NULL.
pub fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
    typed(b'D', |b| {
        put_count(b, values.len());
        for v in values {
            put_nullable(b, *v);
        }
    })
}

/// RowDescription.
pub fn row_description(fields: &[FieldDescription]) -> Vec<u8> {
    typed(b'T', |b| {
        put_count(b, fields.len());
        for f in fields {
            put_cstr(b, f.name.as_bytes());
            b.extend_from_slice(&f.table_oid.to_be_bytes());
            b.extend_from_slice(&f.column.to_be_bytes());
            b.extend_from_slice(&f.type_oid.to_be_bytes());
            b.extend_from_slice(&f.type_size.to_be_bytes());
            b.extend_from_slice(&f.type_modifier.to_be_bytes());
            b.extend_from_slice(&f.format.to_be_bytes());
        }
    })
}

/// CommandComplete, e.g. `SELECT 3`.
pub fn command_complete(tag: &str) -> Vec<u8> {
    typed(b'C', |b| put_cstr(b, tag.as_bytes()))
}

/// EmptyQueryResponse.
pub fn empty_query_response() -> Vec<u8> {
    typed(b'I', |_| {})
}

fn authentication(code: i32, rest: &[u8]) -> Vec<u8> {
    typed(b'R', |b| {
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(rest);
    })
}

/// AuthenticationOk.
pub fn authentication_ok() -> Vec<u8> {
    authentication(0, &[])
}

/// AuthenticationCleartextPassword: asks the client for its password.
pub fn authentication_cleartext_request() -> Vec<u8> {
    authentication(3, &[])
}

/// AuthenticationMD5Password with its salt.
pub fn authentication_md5_request(salt: [u8; 4]) -> Vec<u8> {
    authentication(5, &salt)
}

/// AuthenticationSASL offering `mechanisms`.
pub fn authentication_sasl(mechanisms: &[&str]) -> Vec<u8> {
    let mut rest = Vec::new();
    for m in mechanisms {
        put_cstr(&mut rest, m.as_bytes());
    }
    rest.push(0);
    authentication(10, &rest)
}

/// AuthenticationSASLContinue with the server-first message.
pub fn authentication_sasl_continue(data: &[u8]) -> Vec<u8> {
    authentication(11, data)
}

/// AuthenticationSASLFinal with the server-final message.
pub fn authentication_sasl_final(data: &[u8]) -> Vec<u8> {
    authentication(12, data)
}

/// ParameterStatus.
pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    typed(b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    })
}

/// BackendKeyData; `secret` is 4 bytes in protocol 3.0.
pub fn backend_key_data(pid: i32, secret: &[u8]) -> Vec<u8> {
    typed(b'K', |b| {
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(secret);
    })
}

/// StartupMessage for protocol 3.0.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    startup_message_minor(0, params)
}

/// StartupMessage for protocol 3.`minor`: a rewritten startup keeps the
/// version the client asked for.
pub fn startup_message_minor(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    untyped(|b| {
        b.extend_from_slice(&(PROTOCOL_3_0 | u32::from(minor)).to_be_bytes());
        for (k, v) in params {
            put_cstr(b, k.as_bytes());
            put_cstr(b, v.as_bytes());
        }
        b.push(0);
    })
}

/// SSLRequest.
pub fn ssl_request() -> Vec<u8> {
    untyped(|b| b.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes()))
}

/// CancelRequest.
pub fn cancel_request(pid: i32, secret: &[u8]) -> Vec<u8> {
    untyped(|b| {
        b.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(secret);
    })
}

/// PasswordMessage: a cleartext password, or the string [`md5_password`] returns.
pub fn password_message(password: &[u8]) -> Vec<u8> {
    typed(b'p', |b| put_cstr(b, password))
}

/// The answer to AuthenticationMD5Password (`md5` + hex), for [`password_message`].
pub fn md5_password(user: &str, password: &[u8], salt: [u8; 4]) -> String {
    md5_hash(user.as_bytes(), password, salt)
}

/// SASLInitialResponse.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    typed(b'p', |b| {
        put_cstr(b, mechanism.as_bytes());
        put_nullable(b, Some(data));
    })
}

/// SASLResponse.
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    typed(b'p', |b| b.extend_from_slice(data))
}

/// CopyData.
pub fn copy_data(data: &[u8]) -> Vec<u8> {
    typed(b'd', |b| b.extend_from_slice(data))
}

/// Query (simple protocol).
pub fn query(sql: &str) -> Vec<u8> {
    typed(b'Q', |b| put_cstr(b, sql.as_bytes()))
}

/// Sync.
pub fn sync() -> Vec<u8> {
    typed(b'S', |_| {})
}

/// Terminate.
pub fn terminate() -> Vec<u8> {
    typed(b'X', |_| {})
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ScramStep {
    Initial,
    Continued,
    Done,
}

/// The client side of SCRAM-SHA-256 towards the server, as three messages:
/// [`ScramClient::initial_response`] answers AuthenticationSASL,
/// [`ScramClient::continue_response`] answers AuthenticationSASLContinue,
/// [`ScramClient::finish`] checks AuthenticationSASLFinal (the server's proof).
/// Each returns a whole `p` message ready to send. `Debug` shows no secret.
pub struct ScramClient {
    inner: ScramSha256,
    mechanism: &'static str,
    step: ScramStep,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// SCRAM-SHA-256 without channel binding (`n,,`: the client does not
    /// support it, so a server offering -PLUS does not suspect a downgrade).
    pub fn new(password: &[u8]) -> Self {
        Self {
            inner: ScramSha256::new(password, ChannelBinding::unsupported()),
            mechanism: SCRAM_SHA_256,
            step: ScramStep::Initial,
        }
    }

    /// SCRAM-SHA-256-PLUS bound to the TLS connection to the server:
    /// `certificate_hash` is the hash of the server's certificate
    /// (`tls-server-end-point`, RFC 5929).
    pub fn with_tls_server_end_point(password: &[u8], certificate_hash: Vec<u8>) -> Self {
        Self {
            inner: ScramSha256::new(
                password,
                ChannelBinding::tls_server_end_point(certificate_hash),
            ),
            mechanism: SCRAM_SHA_256_PLUS,
            step: ScramStep::Initial,
        }
    }

    /// The mechanism name this client uses.
    pub fn mechanism(&self) -> &'static str {
        self.mechanism
    }

    /// The SASLInitialResponse message (client-first).
    pub fn initial_response(&self) -> Result<Vec<u8>, ProtocolError> {
        if self.step != ScramStep::Initial {
            return Err(ProtocolError::Scram("exchange already started".into()));
        }
        Ok(sasl_initial_response(self.mechanism, self.inner.message()))
    }

    /// The SASLResponse message (client-final) for the server-first message
    /// (the data of AuthenticationSASLContinue).
    pub fn continue_response(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        if self.step != ScramStep::Initial {
            return Err(ProtocolError::Scram("unexpected SASLContinue".into()));
        }
        if let Err(e) = self.inner.update(server_first) {
            self.step = ScramStep::Done;
            return Err(ProtocolError::Scram(e.to_string()));
        }
        self.step = ScramStep::Continued;
        Ok(sasl_response(self.inner.message()))
    }

    /// Verifies the server-final message (the data of AuthenticationSASLFinal):
    /// `Ok` only if the server proved it knows the password too.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ProtocolError> {
        if self.step != ScramStep::Continued {
            return Err(ProtocolError::Scram("unexpected SASLFinal".into()));
        }
        self.step = ScramStep::Done;
        self.inner
            .finish(server_final)
            .map_err(|e| ProtocolError::Scram(e.to_string()))
    }
}
