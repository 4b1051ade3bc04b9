//! A streamed (SSE) response body: cut into event blocks, each block's
//! fields read and its data rewritten; then the whole body through
//! [`StreamMasker`] as the endpoint it looks like, with every built-in
//! detector and without a masker.
//!
//! Invariants beyond "no panic":
//! - the blocks are the same whether the body comes at once or in random
//!   chunks, and together they are the body, byte for byte;
//! - rewriting a block's data with its own data keeps its fields;
//!   `terminate` ends a block so that an event written after it stays a
//!   separate event;
//! - the masker's output (all of it, up to `finish`), its count of findings
//!   and the audit's reading do not depend on the chunking;
//! - without a masker the body passes through unchanged, chunk by chunk.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use warden_protocols::protocols::llm::{Endpoint, Provider, StreamMasker, sse};

fn blocks(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut framer = sse::Framer::default();
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

/// What a stream run gives: the bytes sent, findings, and the audit's text,
/// tool calls, finish reason and token counts.
#[derive(Debug, PartialEq)]
struct Run {
    out: Vec<u8>,
    masked: u64,
    audit: String,
}

fn run(endpoint: Endpoint, masking: bool, chunks: &[&[u8]]) -> Run {
    let provider = match endpoint {
        Endpoint::Messages => Provider::Anthropic,
        _ => Provider::OpenAi,
    };
    let masker = masking.then(|| common::masker().clone());
    let mut stream = StreamMasker::new(provider, endpoint, masker);
    let mut out = Vec::new();
    for chunk in chunks {
        let sent = stream.feed(chunk);
        if !masking {
            assert_eq!(
                &sent[..],
                *chunk,
                "without a masker a chunk passes as it is"
            );
        }
        out.extend_from_slice(&sent);
    }
    out.extend_from_slice(&stream.finish());
    let r = stream.response();
    Run {
        out,
        masked: stream.masked(),
        audit: format!(
            "{:?} {:?} {:?} {:?} {:?} {:?}",
            r.model, r.text, r.tool_calls, r.finish_reason, r.input_tokens, r.output_tokens
        ),
    }
}

/// The endpoints whose events the body looks like (a stream of one API
/// read as another's is mostly events not understood, masked as raw text,
/// at five times the cost); one picked by the hash when it looks like none.
fn endpoints(data: &[u8]) -> Vec<Endpoint> {
    // Comparing on the first byte first: every slice comparison is a traced
    // memcmp, which made this search a tenth of the target's time.
    let has = |s: &[u8]| data.windows(s.len()).any(|w| w[0] == s[0] && w == s);
    let mut out = Vec::new();
    if has(b"chat.completion") {
        out.push(Endpoint::Chat);
    }
    if has(b"text_completion") {
        out.push(Endpoint::Completions);
    }
    if has(b"\"response.") {
        out.push(Endpoint::Responses);
    }
    if has(b"content_block") || has(b"message_") {
        out.push(Endpoint::Messages);
    }
    if out.is_empty() {
        let all = [
            Endpoint::Chat,
            Endpoint::Completions,
            Endpoint::Responses,
            Endpoint::Messages,
            Endpoint::Embeddings,
        ];
        out.push(all[common::Rng::new(common::hash(data)).below(all.len())]);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = blocks(&[data]);
    assert_eq!(whole.concat(), data, "every byte kept, in order");
    for variant in 0..2 {
        assert_eq!(
            blocks(&common::chunks(data, variant)),
            whole,
            "blocks depend on the chunking"
        );
    }

    for block in &whole {
        let fields = sse::fields(block);
        if let Some(data) = &fields.data {
            let rewritten = sse::with_data(block, data);
            assert_eq!(
                sse::fields(&rewritten),
                fields,
                "with_data with the same data"
            );
        }
        let mut ended = block.clone();
        sse::terminate(&mut ended);
        assert!(ended.starts_with(block));
        assert_eq!(sse::fields(&ended), fields, "terminate adds no field");
        // As StreamMasker::finish uses it: the last, unterminated event of
        // a body, then an extra event.
        let mut framer = sse::Framer::default();
        framer.push(&ended);
        framer.push(b"data: {}\n\n");
        assert_eq!(
            framer.next_block().as_deref(),
            Some(&ended[..]),
            "a terminated block stays one event"
        );
    }

    let chunked = common::chunks(data, 0);
    for endpoint in endpoints(data) {
        let at_once = run(endpoint, true, &[data]);
        assert_eq!(
            run(endpoint, true, &chunked),
            at_once,
            "{endpoint:?}: masking depends on the chunking"
        );
        let plain = run(endpoint, false, &chunked);
        assert_eq!(plain.out, data, "{endpoint:?}: without a masker");
        assert_eq!(plain.masked, 0);
        assert_eq!(
            run(endpoint, false, &[data]).audit,
            plain.audit,
            "{endpoint:?}: the audit depends on the chunking"
        );
    }
});
