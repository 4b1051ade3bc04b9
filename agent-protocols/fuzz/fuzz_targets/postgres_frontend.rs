//! Client-to-server bytes: framed, each frame decoded, the SQL of Query and
//! Parse split, fingerprinted and classified.
//!
//! Invariants beyond "no panic":
//! - the frames and the error are the same whether the bytes come at once
//!   or in random chunks (two chunkings), and an error is sticky;
//! - frames hold the exact bytes: the frames and what is still buffered
//!   are the input, in order; a typed frame's length field is its length;
//! - the statements split from a query are trimmed and not empty.
#![no_main]

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use libfuzzer_sys::fuzz_target;
use warden_protocols::protocols::postgres::{
    Frame, FrameKind, FrontendFramer, FrontendMessage, ProtocolError, classify, fingerprint,
    most_dangerous, split_statements,
};

/// The frames of `chunks` pushed in order, and the error that stopped them.
fn frame_all(chunks: &[&[u8]]) -> (Vec<Frame>, Option<ProtocolError>, usize) {
    common::frame_all(FrontendFramer::new(), chunks)
}

/// Whether this process classified `sql` already. The seeds are whole
/// sessions, and a mutation leaves all but one or two of their statements
/// as they were: classifying those again (most of the cost of an input)
/// finds nothing new. An input run alone, as a crash is rerun, classifies
/// all its statements.
fn seen_before(sql: &str) -> bool {
    static SEEN: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap();
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() >= 1 << 20 {
        seen.clear();
    }
    !seen.insert(common::hash(sql.as_bytes()))
}

fn check_sql(sql: &str) {
    if seen_before(sql) {
        return;
    }
    for piece in split_statements(sql) {
        // Trimmed of what the server calls blanks (ASCII ones and `\v`).
        let blank = |c: char| c.is_ascii_whitespace() || c == '\x0b';
        assert!(
            !piece.is_empty() && piece == piece.trim_matches(blank),
            "{piece:?}"
        );
    }
    let statements = classify(sql);
    let _ = most_dangerous(&statements);
    let _ = fingerprint(sql);
}

fuzz_target!(
    init: {
        // classify() runs sqlparser under catch_unwind (a statement the
        // parser panics on is `unknown`), but libfuzzer-sys's hook aborts on
        // any panic, caught or not. Let sqlparser's own panics unwind to
        // classify(); any other panic still aborts (and one that escaped
        // would abort in libfuzzer-sys's catch_unwind too).
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_parser = info.location().is_some_and(|l| l.file().contains("sqlparser"));
            if !in_parser {
                abort(info);
                return;
            }
            static SHOWN: AtomicBool = AtomicBool::new(false);
            if !SHOWN.swap(true, Ordering::Relaxed) {
                eprintln!("(a panic inside sqlparser, which classify() catches: {info}; further ones not shown)");
            }
        }));
    },
    |data: &[u8]| {
        let (frames, error, buffered) = frame_all(&[data]);

        // The frames are the input's bytes, in order.
        let mut at = 0;
        for frame in &frames {
            assert_eq!(frame.bytes(), &data[at..at + frame.len()]);
            assert_eq!(frame.body(), &frame.bytes()[frame.body_offset()..]);
            if let FrameKind::Typed(tag) = frame.kind() {
                assert_eq!(frame.bytes()[0], tag);
                let len = i32::from_be_bytes(frame.bytes()[1..5].try_into().unwrap());
                assert_eq!(len as usize, frame.len() - 1);
            }
            at += frame.len();
        }
        if error.is_none() {
            assert_eq!(at + buffered, data.len(), "no byte lost or invented");
        }

        // Chunking changes nothing.
        for variant in 0..2 {
            let (chunked, chunked_error, _) = frame_all(&common::chunks(data, variant));
            assert_eq!(chunked, frames, "frames depend on the chunking");
            assert_eq!(chunked_error, error, "the error depends on the chunking");
        }

        for frame in &frames {
            let Ok(message) = FrontendMessage::decode(frame) else {
                continue;
            };
            let _ = message.name();
            match &message {
                FrontendMessage::Query { sql } => check_sql(sql),
                FrontendMessage::Parse { sql, .. } => check_sql(sql),
                FrontendMessage::Startup { .. } => {
                    let _ = message.startup_param("user");
                    let _ = message.startup_param("database");
                }
                FrontendMessage::AuthResponse(auth) => {
                    let _ = auth.as_password();
                    let _ = auth.as_sasl_initial();
                    let _ = auth.as_sasl_response();
                }
                FrontendMessage::CopyData { len } => assert_eq!(*len, frame.body().len()),
                _ => {}
            }
        }
    }
);
