//! Streamed (SSE) responses: masking findings in the streamed text as it
//! goes, and reading the stream for the audit.
//!
//! # What is masked
//!
//! The text the model streams, as *text streams*, one per place it grows:
//! OpenAI chat `choices[i].delta.content` and
//! `choices[i].delta.tool_calls[j].function.arguments` (legacy completions
//! `choices[i].text`); responses API `response.output_text.delta` and
//! `response.function_call_arguments.delta`; Anthropic `content_block_delta`
//! `text_delta.text`, `input_json_delta.partial_json` and
//! `thinking_delta.thinking`. Events that repeat a full text (responses
//! `*.done`, `response.completed`, a non-empty start block) are masked
//! whole, with no hold, and their findings are not counted again. Events
//! that are not JSON or not understood are masked as raw text (a finding
//! that a JSON escape splits is not found there).
//!
//! # Holding back
//!
//! A finding may be split across deltas (`"My card is 4111"`, `" 1111 11"`,
//! `"11 1111."`). Each text stream keeps its not-yet-sent text; on each
//! delta the text that can no longer change (the rule and its caps are in
//! `hold.rs`: in short, the trailing word, a trailing run of digit groups,
//! a `Bearer `/key-name prefix and an open PEM key are held) is masked and
//! released, the rest is held.
//!
//! Events, not just text, are held: an event whose text is not settled yet
//! waits (and the events after it wait with it, so the order never changes).
//! When its text turns out to hold no finding, the event goes out exactly as
//! received, a delta or so later; so a stream without findings comes out
//! byte for byte as it came in. (Splitting the event instead, to send its
//! settled words at once, would rewrite nearly every event of every stream,
//! since almost every delta ends inside a word.) So a delta that ends after
//! whitespace or punctuation goes out in the `feed` that completes it; one
//! that ends inside a word (which could still become an email, a key, a
//! URL) goes out with the next delta of its stream.
//!
//! When a finding is masked, the settled events are rewritten: the first
//! carries all the released (masked) text in its text field, the others an
//! empty string, and text of theirs still held is carried by the stream's
//! next delta event. On the stream's end (OpenAI chat chunk with a
//! `finish_reason`, `data: [DONE]`, responses `*.done`/`response.completed`,
//! Anthropic `content_block_stop`/`message_stop`, or
//! [`StreamMasker::finish`]) the held text is released: in the stream's
//! held events, or when they have all gone, in an extra
//! delta event just before the end event, built from the stream's last delta
//! event (for OpenAI chat, a chunk with only that choice's text or that tool
//! call's `index` and arguments, as the SDKs concatenate repeated strings;
//! for the responses API, it repeats that event's `sequence_number`).
//!
//! Only the changed string of a rewritten event is re-encoded; the rest of
//! its bytes, and every other event (comments, `event:` and `id:` lines),
//! stay as received. The cost per delta is the hold rule and the masker
//! over the pending text only (at most the cap), never the whole stream.
//!
//! Without a masker (or one with no detectors) nothing is held: every chunk
//! goes out unchanged in the call that brought it, and the stream is only
//! read for the audit.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::events::{self, Audit, End, StreamId};
use super::json::{self, Seg};
use super::sse::{self, Framer};
use super::{Endpoint, LlmResponse, Provider, hold};
use crate::masking::Masker;

/// Decodes and masks a streamed response body; see the module doc.
pub struct StreamMasker {
    provider: Provider,
    endpoint: Endpoint,
    /// `None` when there is nothing to mask: chunks pass straight through.
    masker: Option<Arc<Masker>>,
    framer: Framer,
    /// Events not sent yet, in order; `queue[0]` has number `base`.
    queue: VecDeque<Queued>,
    base: u64,
    streams: Vec<TextStream>,
    audit: Audit,
    masked: u64,
}

impl std::fmt::Debug for StreamMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMasker")
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint)
            .field("masking", &self.masker.is_some())
            .field("queued", &self.queue.len())
            .field("masked", &self.masked)
            .finish()
    }
}

/// An event waiting to be sent.
struct Queued {
    block: Vec<u8>,
    /// Its JSON data, when text fields of it may be replaced.
    data: String,
    /// The text fields that text streams will settle.
    slots: Vec<Vec<Seg>>,
    /// New values of string fields.
    edits: Vec<(Vec<Seg>, String)>,
    /// Slots not settled yet.
    waiting: usize,
}

impl Queued {
    fn ready(block: Vec<u8>) -> Queued {
        Queued {
            block,
            data: String::new(),
            slots: Vec::new(),
            edits: Vec::new(),
            waiting: 0,
        }
    }

    fn render(self) -> Vec<u8> {
        if self.edits.is_empty() {
            self.block
        } else {
            sse::with_data(&self.block, &json::replace_strings(&self.data, &self.edits))
        }
    }
}

/// A slot of a queued event waiting for a text stream, and its piece length.
struct Held {
    seq: u64,
    slot: usize,
    len: usize,
}

/// The last delta event of a stream, to build an extra one from.
struct Template {
    block: Vec<u8>,
    data: String,
    path: Vec<Seg>,
}

/// The pending text of one text stream: `text[..carry]` belongs to events
/// already sent (it must ride in a later one), the rest to the `held` slots
/// in order; `text[..clean]` is settled and holds no finding.
struct TextStream {
    id: StreamId,
    text: String,
    clean: usize,
    carry: usize,
    held: VecDeque<Held>,
    template: Option<Template>,
}

/// What settling a stream's text does outside it.
struct Sink<'a> {
    queue: &'a mut VecDeque<Queued>,
    base: u64,
    audit: &'a mut Audit,
    masked: &'a mut u64,
}

impl Sink<'_> {
    /// Settles a slot: `None` leaves the field as received.
    fn settle(&mut self, held: &Held, value: Option<String>) {
        let queued = &mut self.queue[(held.seq - self.base) as usize];
        if let Some(value) = value {
            let path = queued.slots[held.slot].clone();
            queued.edits.push((path, value));
        }
        queued.waiting -= 1;
    }
}

impl TextStream {
    fn new(id: StreamId) -> TextStream {
        TextStream {
            id,
            text: String::new(),
            clean: 0,
            carry: 0,
            held: VecDeque::new(),
            template: None,
        }
    }

    /// A delta's piece, in slot `held.slot` of event `held.seq`.
    fn push(&mut self, piece: &str, seq: u64, slot: usize) {
        self.text.push_str(piece);
        self.held.push_back(Held {
            seq,
            slot,
            len: piece.len(),
        });
    }

    /// Releases what can no longer change.
    fn advance(&mut self, masker: &Masker, sink: &mut Sink) {
        let cut = hold::cut(&self.text, self.clean);
        if cut > self.clean {
            let (masked, n) = masker.mask_text(&self.text[self.clean..cut]);
            if n > 0 {
                *sink.masked += u64::from(n);
                let released = format!("{}{}", &self.text[..self.clean], masked);
                self.release(released, cut, false, sink);
                return;
            }
            self.clean = cut;
        }
        if self.carry > 0
            && self.clean > 0
            && self
                .held
                .front()
                .is_some_and(|f| self.carry + f.len > self.clean)
        {
            // Already rewritten, and the next event straddles the settled
            // text: let it carry what is settled rather than wait.
            let released = self.text[..self.clean].to_string();
            self.release(released, self.clean, false, sink);
            return;
        }
        self.settle(sink);
    }

    /// Releases everything; returns text no held event can carry (for an
    /// extra event).
    fn end(&mut self, masker: &Masker, sink: &mut Sink) -> Option<String> {
        let len = self.text.len();
        if len > self.clean {
            let (masked, n) = masker.mask_text(&self.text[self.clean..]);
            if n > 0 {
                *sink.masked += u64::from(n);
                let released = format!("{}{}", &self.text[..self.clean], masked);
                return self.release(released, len, true, sink);
            }
            self.clean = len;
        }
        self.settle(sink);
        if self.text.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.text);
        sink.audit.release(self.id, &rest);
        self.clean = 0;
        self.carry = 0;
        Some(rest)
    }

    /// Sends the held events whose text is settled, unchanged (the first
    /// one carrying `text[..carry]` if there is any).
    fn settle(&mut self, sink: &mut Sink) {
        let mut at = self.carry;
        let mut consumed = 0;
        while let Some(front) = self.held.front() {
            let end = at + front.len;
            if end > self.clean {
                break;
            }
            let front = self.held.pop_front().expect("front exists");
            if self.carry > 0 {
                let text = self.text[..end].to_string();
                sink.audit.release(self.id, &text);
                sink.settle(&front, Some(text));
                self.carry = 0;
            } else {
                sink.audit.release(self.id, &self.text[at..end]);
                sink.settle(&front, None);
            }
            at = end;
            consumed = end;
        }
        if consumed > 0 {
            self.text.drain(..consumed);
            self.clean -= consumed;
        }
    }

    /// Sends `released` (the final form of `text[..cut]`) in the first held
    /// event, and an empty text in the others that start before `cut` (all
    /// of them at the end); their text after `cut` becomes carry. Returns the
    /// text when there is no held event to carry it (at the end).
    fn release(
        &mut self,
        released: String,
        cut: usize,
        end: bool,
        sink: &mut Sink,
    ) -> Option<String> {
        sink.audit.release(self.id, &released);
        if self.held.is_empty() {
            self.text.clear();
            self.clean = 0;
            self.carry = 0;
            return Some(released);
        }
        let mut at = self.carry;
        let mut value = Some(released);
        while !self.held.is_empty() {
            if value.is_none() && at >= cut && !end {
                break;
            }
            let front = self.held.pop_front().expect("not empty");
            sink.settle(&front, Some(value.take().unwrap_or_default()));
            at += front.len;
        }
        self.text.drain(..cut);
        self.clean = 0;
        self.carry = at - cut;
        None
    }
}

impl StreamMasker {
    /// A decoder for a streamed response of `endpoint`; `masker` masks the
    /// streamed text (none, or one without detectors: pass through).
    pub fn new(
        provider: Provider,
        endpoint: Endpoint,
        masker: Option<Arc<Masker>>,
    ) -> StreamMasker {
        StreamMasker {
            provider,
            endpoint,
            masker: masker.filter(|m| m.has_detectors()),
            framer: Framer::default(),
            queue: VecDeque::new(),
            base: 0,
            streams: Vec::new(),
            audit: Audit::new(endpoint),
            masked: 0,
        }
    }

    /// The next chunk of the upstream body; returns the bytes ready to send
    /// to the client now (may be empty).
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        self.framer.push(chunk);
        while let Some(block) = self.framer.next_block() {
            self.process(block);
        }
        if self.masker.is_none() {
            return Bytes::copy_from_slice(chunk);
        }
        self.drain()
    }

    /// The end of the upstream body: everything still held, released
    /// (masked). An unterminated last event (a body cut short) is read as
    /// an event; with a masker it is ended with an empty line, so that it
    /// and the text released after it reach the client as events (without
    /// a masker it passed as it came).
    pub fn finish(&mut self) -> Bytes {
        if let Some(mut rest) = self.framer.take_rest() {
            if self.masker.is_some() {
                sse::terminate(&mut rest);
            }
            self.process(rest);
        }
        self.end_streams(&End::All, None);
        if self.masker.is_none() {
            return Bytes::new();
        }
        self.drain()
    }

    /// Findings masked so far (in streamed text and events masked as raw
    /// text; not again in events that repeat a full text).
    pub fn masked(&self) -> u64 {
        self.masked
    }

    /// What the stream said so far, as sent: masked text, never the
    /// original sensitive values. With several chat choices the text is
    /// their texts joined with `\n`.
    pub fn response(&self) -> &LlmResponse {
        &self.audit.response
    }

    fn drain(&mut self) -> Bytes {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|q| q.waiting == 0) {
            let queued = self.queue.pop_front().expect("front exists");
            self.base += 1;
            out.extend_from_slice(&queued.render());
        }
        Bytes::from(out)
    }

    fn process(&mut self, block: Vec<u8>) {
        let fields = sse::fields(&block);
        let Some(data) = fields.data else {
            // Comments, blank lines, `event:` alone: no client reads them,
            // but they reach the app's process all the same.
            self.push_raw(block);
            return;
        };
        if data.trim() == "[DONE]" {
            self.end_streams(&End::All, None);
            self.push_ready(block);
            return;
        }
        let decoded = match serde_json::from_str::<Value>(&data) {
            Ok(value) if value.is_object() => {
                events::decode(self.endpoint, &mut self.audit, &value).map(|d| (d, value))
            }
            _ => None,
        };
        let Some((decoded, value)) = decoded else {
            self.push_raw(block);
            return;
        };
        let Some(masker) = self.masker.clone() else {
            for (id, _, piece) in &decoded.deltas {
                self.audit.release(*id, piece);
            }
            for end in &decoded.ends {
                self.ended(end);
            }
            return;
        };

        // Streams this event ends without adding to them: their held text
        // goes out before it.
        let touched: Vec<StreamId> = decoded.deltas.iter().map(|(id, _, _)| *id).collect();
        for end in &decoded.ends {
            self.end_streams(end, Some(&touched));
        }

        let mut edits = Vec::new();
        for path in decoded.repeats {
            if let Some(Value::String(text)) = json::get(&value, &path) {
                let (masked, n) = masker.mask_text(text);
                if n > 0 {
                    edits.push((path, masked.into_owned()));
                }
            }
        }
        let seq = self.base + self.queue.len() as u64;
        self.queue.push_back(Queued {
            block,
            data,
            slots: decoded.deltas.iter().map(|(_, p, _)| p.clone()).collect(),
            edits,
            waiting: decoded.deltas.len(),
        });

        for (slot, (id, path, piece)) in decoded.deltas.into_iter().enumerate() {
            let index = self.stream_index(id);
            let queued = &self.queue[(seq - self.base) as usize];
            let template = Template {
                block: queued.block.clone(),
                data: queued.data.clone(),
                path,
            };
            let stream = &mut self.streams[index];
            stream.push(&piece, seq, slot);
            stream.template = Some(template);
            let ends_here = decoded.ends.iter().any(|end| end.covers(id));
            if ends_here {
                self.end_stream(index, &masker);
            } else {
                let mut sink = Sink {
                    queue: &mut self.queue,
                    base: self.base,
                    audit: &mut self.audit,
                    masked: &mut self.masked,
                };
                self.streams[index].advance(&masker, &mut sink);
            }
        }
        for end in &decoded.ends {
            self.ended(end);
        }
    }

    fn push_ready(&mut self, block: Vec<u8>) {
        if self.masker.is_some() {
            self.queue.push_back(Queued::ready(block));
        }
    }

    /// An event not understood: masked as raw text.
    fn push_raw(&mut self, block: Vec<u8>) {
        let Some(masker) = &self.masker else { return };
        let text = String::from_utf8_lossy(&block);
        let (masked, n) = masker.mask_text(&text);
        if n > 0 {
            self.masked += u64::from(n);
            let masked = masked.into_owned().into_bytes();
            self.queue.push_back(Queued::ready(masked));
        } else {
            self.queue.push_back(Queued::ready(block));
        }
    }

    fn stream_index(&mut self, id: StreamId) -> usize {
        match self.streams.iter().position(|s| s.id == id) {
            Some(index) => index,
            None => {
                self.streams.push(TextStream::new(id));
                self.streams.len() - 1
            }
        }
    }

    /// Ends the streams `end` covers (those not in `except`); without a
    /// masker, only the audit's end-of-stream fix-ups.
    fn end_streams(&mut self, end: &End, except: Option<&[StreamId]>) {
        let Some(masker) = self.masker.clone() else {
            self.ended(end);
            return;
        };
        let mut index = 0;
        while index < self.streams.len() {
            let id = self.streams[index].id;
            if end.covers(id) && !except.is_some_and(|e| e.contains(&id)) {
                self.end_stream(index, &masker);
            } else {
                index += 1;
            }
        }
    }

    /// Ends stream `index` (removing it): its held text goes out, in its
    /// held events or an extra event queued now.
    fn end_stream(&mut self, index: usize, masker: &Masker) {
        let mut stream = self.streams.remove(index);
        let mut sink = Sink {
            queue: &mut self.queue,
            base: self.base,
            audit: &mut self.audit,
            masked: &mut self.masked,
        };
        if let Some(text) = stream.end(masker, &mut sink)
            && let Some(extra) = self.extra_event(&stream, text)
        {
            self.queue.push_back(extra);
        }
    }

    /// An extra delta event of `stream` carrying `text`.
    fn extra_event(&self, stream: &TextStream, text: String) -> Option<Queued> {
        let template = stream.template.as_ref()?;
        let data = match self.endpoint {
            Endpoint::Chat | Endpoint::Completions => {
                events::chat_chunk(&template.data, self.endpoint, stream.id, &text)
            }
            _ => None,
        };
        let data = data.unwrap_or_else(|| {
            json::replace_strings(&template.data, &[(template.path.clone(), text)])
        });
        let mut block = sse::with_data(&template.block, &data);
        sse::terminate(&mut block);
        Some(Queued::ready(block))
    }

    /// Audit fix-ups once streams ended.
    fn ended(&mut self, end: &End) {
        let streams = &self.streams;
        self.audit
            .ended(end, |id| streams.iter().any(|s| s.id == id));
    }
}
