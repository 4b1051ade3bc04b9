//! Server-to-client bytes: framed, every frame decoded; each DataRow read
//! against the last RowDescription and masked as the proxy masks results
//! (whole columns by name, detector findings in the other text values).
//!
//! An input that starts with `S`, `G` or `N` is read as the server's answer
//! to an SSLRequest or GSSENCRequest first (a real session that tried TLS
//! and was refused starts with `N`; no server starts a connection with a
//! ParameterStatus or a notice).
//!
//! Invariants beyond "no panic":
//! - the frames and the error are the same whether the bytes come at once
//!   or in random chunks (two chunkings), and an error is sticky;
//! - frames hold the exact bytes: the frames and what is still buffered
//!   are the input, in order;
//! - a DataRow's value ranges lie inside its frame.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use warden_protocols::protocols::postgres::{
    BackendFramer, BackendMessage, FieldDescription, Frame, FrameKind, ProtocolError,
};

fn frame_all(chunks: &[&[u8]], negotiation: bool) -> (Vec<Frame>, Option<ProtocolError>, usize) {
    let mut framer = BackendFramer::new();
    if negotiation {
        framer.expect_negotiation_reply();
    }
    common::frame_all(framer, chunks)
}

fuzz_target!(|data: &[u8]| {
    let negotiation = matches!(data.first(), Some(b'S' | b'G' | b'N'));
    let (frames, error, buffered) = frame_all(&[data], negotiation);

    let mut at = 0;
    for frame in &frames {
        assert_eq!(frame.bytes(), &data[at..at + frame.len()]);
        if let FrameKind::Typed(_) = frame.kind() {
            let len = i32::from_be_bytes(frame.bytes()[1..5].try_into().unwrap());
            assert_eq!(len as usize, frame.len() - 1);
        }
        at += frame.len();
    }
    if error.is_none() {
        assert_eq!(at + buffered, data.len(), "no byte lost or invented");
    }

    for variant in 0..2 {
        let (chunked, chunked_error, _) = frame_all(&common::chunks(data, variant), negotiation);
        assert_eq!(chunked, frames, "frames depend on the chunking");
        assert_eq!(chunked_error, error, "the error depends on the chunking");
    }

    let masker = common::masker();
    let mut columns: Vec<FieldDescription> = Vec::new();
    for frame in &frames {
        let Ok(message) = BackendMessage::decode(frame) else {
            continue;
        };
        let _ = message.name();
        match message {
            BackendMessage::RowDescription { fields } => columns = fields,
            BackendMessage::DataRow(row) => {
                for (i, range) in row.ranges.iter().enumerate() {
                    let value = row.value(frame, i).expect("a column of the row");
                    if let Some(range) = range {
                        assert!(range.end <= frame.len() && range.start <= range.end);
                        assert_eq!(value, Some(&frame.bytes()[range.clone()]));
                    } else {
                        assert_eq!(value, None);
                    }
                }
                assert!(row.value(frame, row.len()).is_none());
                if row.len() != columns.len() {
                    continue;
                }
                for (column, value) in columns.iter().zip(row.values(frame)) {
                    let Some(value) = value else { continue };
                    // Text-format values, as the proxy masks them.
                    if column.format != 0 {
                        continue;
                    }
                    let Ok(text) = std::str::from_utf8(value) else {
                        continue;
                    };
                    if masker.masks_column(&column.name) {
                        let masked = masker.mask_value(text);
                        assert_eq!(masked.is_empty(), text.is_empty());
                    } else {
                        let (masked, n) = masker.mask_text(text);
                        if n == 0 {
                            assert_eq!(masked, text, "no finding, no change");
                        }
                    }
                }
            }
            BackendMessage::CommandComplete(tag) => {
                let _ = tag.command();
                let _ = tag.rows();
            }
            BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => {
                let _ = (fields.severity(), fields.code(), fields.message());
                let _ = (fields.detail(), fields.hint());
            }
            BackendMessage::CopyData { len } => assert_eq!(len, frame.body().len()),
            _ => {}
        }
    }
});
