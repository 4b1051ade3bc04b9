//! Client-to-server messages.
use std::fmt;

use super::framing::{
    CANCEL_REQUEST_CODE, Frame, FrameKind, GSSENC_REQUEST_CODE, ProtocolError, Reader,
    SSL_REQUEST_CODE, lossy,
};

/// Bytes that must never reach a log: a password, a SASL exchange, a cancel
/// key. `Debug` prints `<redacted>`; [`Secret::expose`] gives the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The secret bytes, for the one place that needs them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The body of a `p` message. Which of the four messages that share the `p`
/// type it is depends on the authentication request the server sent last;
/// the accessors interpret it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuthResponse(pub Secret);

/// A SASLInitialResponse, borrowed from an [`AuthResponse`].
pub struct SaslInitialResponse<'a> {
    pub mechanism: String,
    /// The client-first message; `None` if the client sent none (length -1).
    pub data: Option<&'a [u8]>,
}

impl fmt::Debug for SaslInitialResponse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslInitialResponse")
            .field("mechanism", &self.mechanism)
            .field("data", &"<redacted>")
            .finish()
    }
}

impl AuthResponse {
    /// As a PasswordMessage (answer to a cleartext or MD5 request): the
    /// password or MD5 hash, without its NUL.
    pub fn as_password(&self) -> Option<&[u8]> {
        let b = self.0.expose();
        match b.split_last() {
            Some((0, rest)) if !rest.contains(&0) => Some(rest),
            _ => None,
        }
    }

    /// As a SASLInitialResponse (first answer to a SASL request).
    pub fn as_sasl_initial(&self) -> Option<SaslInitialResponse<'_>> {
        let mut r = Reader::new(self.0.expose(), "SASLInitialResponse");
        let mechanism = r.string().ok()?;
        let len = r.i32().ok()?;
        let data = if len == -1 {
            None
        } else {
            Some(r.bytes(usize::try_from(len).ok()?).ok()?)
        };
        r.finish().ok()?;
        Some(SaslInitialResponse { mechanism, data })
    }

    /// As a SASLResponse or GSSResponse: the raw data.
    pub fn as_sasl_response(&self) -> &[u8] {
        self.0.expose()
    }
}

/// Statement (`S`) or portal (`P`), for Describe and Close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    pub fn as_byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// A decoded client-to-server message.
///
/// Owned, except for large payloads that stay in the frame: CopyData gives
/// its length and [`Frame::body`] holds the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendMessage {
    /// StartupMessage: protocol 3.`minor` and its parameters in order
    /// (`user`, `database`, `application_name`, `options`, ...).
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    /// CancelRequest. The key is 4 bytes in protocol 3.0, up to 256 in 3.2.
    Cancel {
        pid: i32,
        secret: Secret,
    },
    /// Simple query: one or more statements separated by `;`.
    Query {
        sql: String,
    },
    Parse {
        name: String,
        sql: String,
        param_types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        param_formats: Vec<i16>,
        params: Vec<Option<Vec<u8>>>,
        result_formats: Vec<i16>,
    },
    Execute {
        portal: String,
        /// 0 for no limit.
        max_rows: i32,
    },
    Describe {
        kind: Target,
        name: String,
    },
    Close {
        kind: Target,
        name: String,
    },
    Sync,
    Flush,
    /// The fast-path interface: calls a function by OID, bypassing SQL.
    FunctionCall {
        oid: u32,
        arg_formats: Vec<i16>,
        args: Vec<Option<Vec<u8>>>,
        result_format: i16,
    },
    /// COPY data; the bytes are [`Frame::body`].
    CopyData {
        len: usize,
    },
    CopyDone,
    CopyFail {
        message: String,
    },
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse.
    AuthResponse(AuthResponse),
    Terminate,
    /// A type byte this decoder does not know; the frame can still be forwarded.
    Unknown {
        tag: u8,
    },
}

impl FrontendMessage {
    /// Decodes a frame from a [`super::FrontendFramer`].
    pub fn decode(frame: &Frame) -> Result<Self, ProtocolError> {
        match frame.kind() {
            FrameKind::Untyped => decode_untyped(frame.body()),
            FrameKind::Typed(tag) => decode_typed(tag, frame.body()),
            FrameKind::NegotiationReply(_) => Err(ProtocolError::Malformed {
                message: "frontend",
                reason: "a negotiation reply is a server message",
            }),
        }
    }

    /// The message's name in the protocol documentation.
    pub fn name(&self) -> &'static str {
        match self {
            FrontendMessage::Startup { .. } => "StartupMessage",
            FrontendMessage::SslRequest => "SSLRequest",
            FrontendMessage::GssEncRequest => "GSSENCRequest",
            FrontendMessage::Cancel { .. } => "CancelRequest",
            FrontendMessage::Query { .. } => "Query",
            FrontendMessage::Parse { .. } => "Parse",
            FrontendMessage::Bind { .. } => "Bind",
            FrontendMessage::Execute { .. } => "Execute",
            FrontendMessage::Describe { .. } => "Describe",
            FrontendMessage::Close { .. } => "Close",
            FrontendMessage::Sync => "Sync",
            FrontendMessage::Flush => "Flush",
            FrontendMessage::FunctionCall { .. } => "FunctionCall",
            FrontendMessage::CopyData { .. } => "CopyData",
            FrontendMessage::CopyDone => "CopyDone",
            FrontendMessage::CopyFail { .. } => "CopyFail",
            FrontendMessage::AuthResponse(_) => "PasswordMessage",
            FrontendMessage::Terminate => "Terminate",
            FrontendMessage::Unknown { .. } => "Unknown",
        }
    }

    /// A startup parameter's value.
    pub fn startup_param(&self, name: &str) -> Option<&str> {
        match self {
            FrontendMessage::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

fn decode_untyped(body: &[u8]) -> Result<FrontendMessage, ProtocolError> {
    let mut r = Reader::new(body, "startup");
    let code = r.u32()?;
    let msg = match code {
        SSL_REQUEST_CODE => FrontendMessage::SslRequest,
        GSSENC_REQUEST_CODE => FrontendMessage::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let pid = r.i32()?;
            let secret = r.rest();
            if !(4..=256).contains(&secret.len()) {
                return Err(r.error("cancel key must be 4 to 256 bytes"));
            }
            FrontendMessage::Cancel {
                pid,
                secret: Secret::new(secret.to_vec()),
            }
        }
        c if c >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                params.push((lossy(name), r.string()?));
            }
            FrontendMessage::Startup {
                minor: (c & 0xffff) as u16,
                params,
            }
        }
        c => return Err(ProtocolError::UnsupportedStartupCode(c)),
    };
    r.finish()?;
    Ok(msg)
}

fn target(r: &mut Reader<'_>) -> Result<Target, ProtocolError> {
    match r.u8()? {
        b'S' => Ok(Target::Statement),
        b'P' => Ok(Target::Portal),
        _ => Err(r.error("target must be 'S' or 'P'")),
    }
}

fn formats(r: &mut Reader<'_>) -> Result<Vec<i16>, ProtocolError> {
    let n = r.count()?;
    (0..n).map(|_| r.i16()).collect()
}

fn values(r: &mut Reader<'_>) -> Result<Vec<Option<Vec<u8>>>, ProtocolError> {
    let n = r.count()?;
    // Each value takes at least 4 bytes: do not trust `n` for the allocation.
    let mut out = Vec::with_capacity(n.min(r.remaining() / 4));
    for _ in 0..n {
        out.push(r.nullable()?);
    }
    Ok(out)
}

fn decode_typed(tag: u8, body: &[u8]) -> Result<FrontendMessage, ProtocolError> {
    let name = match tag {
        b'Q' => "Query",
        b'P' => "Parse",
        b'B' => "Bind",
        b'E' => "Execute",
        b'D' => "Describe",
        b'C' => "Close",
        b'S' => "Sync",
        b'H' => "Flush",
        b'F' => "FunctionCall",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'f' => "CopyFail",
        b'p' => "PasswordMessage",
        b'X' => "Terminate",
        _ => "Unknown",
    };
    let mut r = Reader::new(body, name);
    let msg = match tag {
        b'Q' => FrontendMessage::Query { sql: r.string()? },
        b'P' => {
            let name = r.string()?;
            let sql = r.string()?;
            let n = r.count()?;
            let param_types = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            }
        }
        b'B' => FrontendMessage::Bind {
            portal: r.string()?,
            statement: r.string()?,
            param_formats: formats(&mut r)?,
            params: values(&mut r)?,
            result_formats: formats(&mut r)?,
        },
        b'E' => FrontendMessage::Execute {
            portal: r.string()?,
            max_rows: r.i32()?,
        },
        b'D' => FrontendMessage::Describe {
            kind: target(&mut r)?,
            name: r.string()?,
        },
        b'C' => FrontendMessage::Close {
            kind: target(&mut r)?,
            name: r.string()?,
        },
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'F' => FrontendMessage::FunctionCall {
            oid: r.u32()?,
            arg_formats: formats(&mut r)?,
            args: values(&mut r)?,
            result_format: r.i16()?,
        },
        b'd' => FrontendMessage::CopyData {
            len: r.rest().len(),
        },
        b'c' => FrontendMessage::CopyDone,
        b'f' => FrontendMessage::CopyFail {
            message: r.string()?,
        },
        b'p' => FrontendMessage::AuthResponse(AuthResponse(Secret::new(r.rest().to_vec()))),
        b'X' => FrontendMessage::Terminate,
        _ => return Ok(FrontendMessage::Unknown { tag }),
    };
    r.finish()?;
    Ok(msg)
}
