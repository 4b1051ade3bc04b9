//! PostgreSQL wire protocol (v3): framing, messages, SQL classification.
//!
//! Pure code, no sockets and no policy; the proxy drives it:
//! - [`FrontendFramer`] / [`BackendFramer`] cut each direction's bytes into
//!   [`Frame`]s that keep the exact bytes, so a message can be forwarded,
//!   dropped or replaced (see [`framing`] for the startup phase and limits);
//! - [`FrontendMessage::decode`] / [`BackendMessage::decode`] type a frame;
//! - [`encode`] writes the messages the proxy sends itself, and
//!   [`ScramClient`] authenticates upstream with SCRAM-SHA-256;
//! - [`classify()`](fn@classify) tells what each statement of a query does, and
//!   [`fingerprint`] normalises a query for lineage (docs/postgres.md).
//!
//! Passwords, SASL data and cancel keys are held in [`Secret`], whose
//! `Debug` is redacted; a [`Frame`]'s `Debug` shows only its kind and length.
pub mod backend;
pub mod classify;
pub mod encode;
pub mod framing;
pub mod frontend;
pub mod lex;

#[cfg(test)]
mod tests;

pub use backend::{
    Authentication, BackendMessage, CommandTag, CopyResponse, DataRow, ErrorFields,
    FieldDescription, NegotiationReply, TransactionStatus,
};
pub use classify::{Statement, StatementClass, classify, most_dangerous};
pub use encode::{ScramClient, Severity};
pub use framing::{
    BackendFramer, DEFAULT_MAX_MESSAGE_LEN, Frame, FrameKind, FrontendFramer, ProtocolError,
};
pub use frontend::{AuthResponse, FrontendMessage, Secret, Target};
pub use lex::{fingerprint, split_statements};
