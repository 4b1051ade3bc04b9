//! Server-to-client messages.
use std::ops::Range;

use super::framing::{Frame, FrameKind, ProtocolError, Reader, lossy};
use super::frontend::Secret;

/// An authentication request or result (`R`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    Ok,
    KerberosV5,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Gss,
    GssContinue {
        data: Vec<u8>,
    },
    Sspi,
    /// The mechanisms the server offers, e.g. `SCRAM-SHA-256`, `SCRAM-SHA-256-PLUS`.
    Sasl {
        mechanisms: Vec<String>,
    },
    /// The server-first message.
    SaslContinue {
        data: Vec<u8>,
    },
    /// The server-final message.
    SaslFinal {
        data: Vec<u8>,
    },
    /// A code this decoder does not know, and the rest of the body.
    Other {
        code: i32,
        data: Vec<u8>,
    },
}

/// The transaction status in ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block; statements are refused until rollback.
    Failed,
}

impl TransactionStatus {
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InTransaction),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }
}

/// One column of a RowDescription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    /// The table's OID if the column is a plain table column, else 0.
    pub table_oid: u32,
    /// The column's attribute number if `table_oid` is set, else 0.
    pub column: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`; negative for variable width.
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// A DataRow: where each value lies within the frame's bytes.
///
/// Values are not copied: [`DataRow::value`] and [`DataRow::values`] read
/// them from [`Frame::bytes`] of the frame the row was decoded from, and the
/// ranges let a masker splice a new row without reparsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRow {
    /// `None` for SQL NULL; ranges index into [`Frame::bytes`].
    pub ranges: Vec<Option<Range<usize>>>,
}

impl DataRow {
    /// The number of columns.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Column `i` of the row read from `frame` (the frame it was decoded
    /// from): `None` if out of range, `Some(None)` for NULL.
    pub fn value<'a>(&self, frame: &'a Frame, i: usize) -> Option<Option<&'a [u8]>> {
        let r = self.ranges.get(i)?;
        Some(r.clone().and_then(|r| frame.bytes().get(r)))
    }

    /// Every column of the row read from `frame`, `None` for NULL.
    pub fn values<'a>(&'a self, frame: &'a Frame) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        self.ranges
            .iter()
            .map(move |r| r.clone().and_then(|r| frame.bytes().get(r)))
    }
}

/// The tag of a CommandComplete: `SELECT 5`, `INSERT 0 3`, `UPDATE 2`, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandTag(pub String);

impl CommandTag {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The command: the tag without its counts (`CREATE TABLE`, `INSERT`, ...).
    pub fn command(&self) -> &str {
        let mut s = self.0.as_str();
        while let Some((head, last)) = s.rsplit_once(' ') {
            if last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
                break;
            }
            s = head;
        }
        s
    }

    /// The row count of commands that report one: SELECT, INSERT (the last
    /// number of `INSERT oid rows`), UPDATE, DELETE, MERGE, FETCH, MOVE, COPY.
    pub fn rows(&self) -> Option<u64> {
        let mut words = self.0.split(' ');
        let command = words.next()?;
        let numbers: Vec<&str> = words.collect();
        let count = match (command, numbers.as_slice()) {
            ("INSERT", [_oid, rows]) => rows,
            ("SELECT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY", [rows]) => rows,
            _ => return None,
        };
        count.parse().ok()
    }
}

/// The fields of an ErrorResponse or NoticeResponse, in the order received.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// (field type byte, value): `S` severity, `V` severity (not localised),
    /// `C` SQLSTATE code, `M` message, `D` detail, `H` hint, `P` position, ...
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    /// A field's value.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// The severity, not localised if the server sent that form.
    pub fn severity(&self) -> Option<&str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    /// The SQLSTATE code.
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    pub fn detail(&self) -> Option<&str> {
        self.get(b'D')
    }

    pub fn hint(&self) -> Option<&str> {
        self.get(b'H')
    }
}

/// The body of CopyIn/CopyOut/CopyBothResponse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyResponse {
    /// 0 text, 1 binary.
    pub format: i8,
    pub column_formats: Vec<i16>,
}

/// The server's answer to an SSLRequest or GSSENCRequest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NegotiationReply {
    /// `S`: TLS follows.
    SslAccepted,
    /// `G`: GSSAPI encryption follows.
    GssAccepted,
    /// `N`: continue unencrypted (or try another request).
    Refused,
}

/// A decoded server-to-client message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendMessage {
    NegotiationReply(NegotiationReply),
    Authentication(Authentication),
    ParameterStatus {
        name: String,
        value: String,
    },
    /// The cancel key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    BackendKeyData {
        pid: i32,
        secret: Secret,
    },
    ReadyForQuery {
        status: TransactionStatus,
    },
    RowDescription {
        fields: Vec<FieldDescription>,
    },
    DataRow(DataRow),
    CommandComplete(CommandTag),
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    PortalSuspended,
    EmptyQueryResponse,
    ParameterDescription {
        types: Vec<u32>,
    },
    CopyInResponse(CopyResponse),
    CopyOutResponse(CopyResponse),
    CopyBothResponse(CopyResponse),
    /// COPY data; the bytes are [`Frame::body`].
    CopyData {
        len: usize,
    },
    CopyDone,
    NotificationResponse {
        pid: i32,
        channel: String,
        payload: String,
    },
    FunctionCallResponse {
        value: Option<Vec<u8>>,
    },
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<String>,
    },
    /// A type byte this decoder does not know; the frame can still be forwarded.
    Unknown {
        tag: u8,
    },
}

impl BackendMessage {
    /// Decodes a frame from a [`super::BackendFramer`].
    pub fn decode(frame: &Frame) -> Result<Self, ProtocolError> {
        match frame.kind() {
            FrameKind::NegotiationReply(b) => Ok(BackendMessage::NegotiationReply(match b {
                b'S' => NegotiationReply::SslAccepted,
                b'G' => NegotiationReply::GssAccepted,
                b'N' => NegotiationReply::Refused,
                _ => {
                    return Err(ProtocolError::Malformed {
                        message: "negotiation reply",
                        reason: "must be 'S', 'G' or 'N'",
                    });
                }
            })),
            FrameKind::Untyped => Err(ProtocolError::Malformed {
                message: "backend",
                reason: "the server sends no untyped messages",
            }),
            FrameKind::Typed(tag) => decode_typed(tag, frame.body(), frame.body_offset()),
        }
    }

    /// The message's name in the protocol documentation.
    pub fn name(&self) -> &'static str {
        match self {
            BackendMessage::NegotiationReply(_) => "NegotiationReply",
            BackendMessage::Authentication(_) => "Authentication",
            BackendMessage::ParameterStatus { .. } => "ParameterStatus",
            BackendMessage::BackendKeyData { .. } => "BackendKeyData",
            BackendMessage::ReadyForQuery { .. } => "ReadyForQuery",
            BackendMessage::RowDescription { .. } => "RowDescription",
            BackendMessage::DataRow(_) => "DataRow",
            BackendMessage::CommandComplete(_) => "CommandComplete",
            BackendMessage::ErrorResponse(_) => "ErrorResponse",
            BackendMessage::NoticeResponse(_) => "NoticeResponse",
            BackendMessage::ParseComplete => "ParseComplete",
            BackendMessage::BindComplete => "BindComplete",
            BackendMessage::CloseComplete => "CloseComplete",
            BackendMessage::NoData => "NoData",
            BackendMessage::PortalSuspended => "PortalSuspended",
            BackendMessage::EmptyQueryResponse => "EmptyQueryResponse",
            BackendMessage::ParameterDescription { .. } => "ParameterDescription",
            BackendMessage::CopyInResponse(_) => "CopyInResponse",
            BackendMessage::CopyOutResponse(_) => "CopyOutResponse",
            BackendMessage::CopyBothResponse(_) => "CopyBothResponse",
            BackendMessage::CopyData { .. } => "CopyData",
            BackendMessage::CopyDone => "CopyDone",
            BackendMessage::NotificationResponse { .. } => "NotificationResponse",
            BackendMessage::FunctionCallResponse { .. } => "FunctionCallResponse",
            BackendMessage::NegotiateProtocolVersion { .. } => "NegotiateProtocolVersion",
            BackendMessage::Unknown { .. } => "Unknown",
        }
    }
}

fn error_fields(r: &mut Reader<'_>) -> Result<ErrorFields, ProtocolError> {
    let mut fields = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        fields.push((code, r.string()?));
    }
    Ok(ErrorFields { fields })
}

fn copy_response(r: &mut Reader<'_>) -> Result<CopyResponse, ProtocolError> {
    let format = r.u8()? as i8;
    let n = r.count()?;
    let column_formats = (0..n).map(|_| r.i16()).collect::<Result<_, _>>()?;
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

fn authentication(r: &mut Reader<'_>) -> Result<Authentication, ProtocolError> {
    Ok(match r.i32()? {
        0 => Authentication::Ok,
        2 => Authentication::KerberosV5,
        3 => Authentication::CleartextPassword,
        5 => {
            let b = r.bytes(4)?;
            Authentication::Md5Password {
                salt: [b[0], b[1], b[2], b[3]],
            }
        }
        7 => Authentication::Gss,
        8 => Authentication::GssContinue {
            data: r.rest().to_vec(),
        },
        9 => Authentication::Sspi,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(lossy(m));
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue {
            data: r.rest().to_vec(),
        },
        12 => Authentication::SaslFinal {
            data: r.rest().to_vec(),
        },
        code => Authentication::Other {
            code,
            data: r.rest().to_vec(),
        },
    })
}

fn decode_typed(tag: u8, body: &[u8], offset: usize) -> Result<BackendMessage, ProtocolError> {
    let name = match tag {
        b'R' => "Authentication",
        b'S' => "ParameterStatus",
        b'K' => "BackendKeyData",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        b'D' => "DataRow",
        b'C' => "CommandComplete",
        b'E' => "ErrorResponse",
        b'N' => "NoticeResponse",
        b't' => "ParameterDescription",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'W' => "CopyBothResponse",
        b'A' => "NotificationResponse",
        b'V' => "FunctionCallResponse",
        b'v' => "NegotiateProtocolVersion",
        _ => "message",
    };
    let mut r = Reader::new(body, name);
    let msg = match tag {
        b'R' => BackendMessage::Authentication(authentication(&mut r)?),
        b'S' => BackendMessage::ParameterStatus {
            name: r.string()?,
            value: r.string()?,
        },
        b'K' => {
            let pid = r.i32()?;
            let secret = r.rest();
            if !(4..=256).contains(&secret.len()) {
                return Err(r.error("cancel key must be 4 to 256 bytes"));
            }
            BackendMessage::BackendKeyData {
                pid,
                secret: Secret::new(secret.to_vec()),
            }
        }
        b'Z' => {
            let b = r.u8()?;
            BackendMessage::ReadyForQuery {
                status: TransactionStatus::from_byte(b)
                    .ok_or_else(|| r.error("status must be 'I', 'T' or 'E'"))?,
            }
        }
        b'T' => {
            let n = r.count()?;
            // A field takes at least 19 bytes: bound the allocation by the body.
            let mut fields = Vec::with_capacity(n.min(r.remaining() / 19));
            for _ in 0..n {
                fields.push(FieldDescription {
                    name: r.string()?,
                    table_oid: r.u32()?,
                    column: r.i16()?,
                    type_oid: r.u32()?,
                    type_size: r.i16()?,
                    type_modifier: r.i32()?,
                    format: r.i16()?,
                });
            }
            BackendMessage::RowDescription { fields }
        }
        b'D' => {
            let n = r.count()?;
            let mut ranges = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                ranges.push(
                    r.nullable_range()?
                        .map(|x| x.start + offset..x.end + offset),
                );
            }
            BackendMessage::DataRow(DataRow { ranges })
        }
        b'C' => BackendMessage::CommandComplete(CommandTag(r.string()?)),
        b'E' => BackendMessage::ErrorResponse(error_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(error_fields(&mut r)?),
        b'1' => BackendMessage::ParseComplete,
        b'2' => BackendMessage::BindComplete,
        b'3' => BackendMessage::CloseComplete,
        b'n' => BackendMessage::NoData,
        b's' => BackendMessage::PortalSuspended,
        b'I' => BackendMessage::EmptyQueryResponse,
        b't' => {
            let n = r.count()?;
            let types = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            BackendMessage::ParameterDescription { types }
        }
        b'G' => BackendMessage::CopyInResponse(copy_response(&mut r)?),
        b'H' => BackendMessage::CopyOutResponse(copy_response(&mut r)?),
        b'W' => BackendMessage::CopyBothResponse(copy_response(&mut r)?),
        b'd' => BackendMessage::CopyData {
            len: r.rest().len(),
        },
        b'c' => BackendMessage::CopyDone,
        b'A' => BackendMessage::NotificationResponse {
            pid: r.i32()?,
            channel: r.string()?,
            payload: r.string()?,
        },
        b'V' => BackendMessage::FunctionCallResponse {
            value: r.nullable()?,
        },
        b'v' => {
            let newest_minor = r.i32()?;
            let n = r.i32()?;
            let n = usize::try_from(n).map_err(|_| r.error("negative count"))?;
            let mut unrecognized = Vec::with_capacity(n.min(r.remaining()));
            for _ in 0..n {
                unrecognized.push(r.string()?);
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        _ => return Ok(BackendMessage::Unknown { tag }),
    };
    r.finish()?;
    Ok(msg)
}
