//! What the fuzz targets share: chunkings of an input, and a masker with
//! every built-in detector.
//!
//! The chunk sizes come from a generator seeded with a hash of the input, so
//! a corpus file is the raw bytes of a real session (no header to strip) and
//! every mutation of it is also cut differently; a crash input reproduces
//! with the same chunks.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use warden_protocols::masking::{DetectorSpec, Masker, builtin_detector_names};
use warden_protocols::protocols::postgres::{BackendFramer, Frame, FrontendFramer, ProtocolError};

/// The two PostgreSQL framers, for [`frame_all`].
pub trait Framing {
    fn push(&mut self, bytes: &[u8]);
    fn next(&mut self) -> Result<Option<Frame>, ProtocolError>;
    fn buffered(&self) -> usize;
}

impl Framing for FrontendFramer {
    fn push(&mut self, bytes: &[u8]) {
        FrontendFramer::push(self, bytes)
    }
    fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        FrontendFramer::next(self)
    }
    fn buffered(&self) -> usize {
        FrontendFramer::buffered(self)
    }
}

impl Framing for BackendFramer {
    fn push(&mut self, bytes: &[u8]) {
        BackendFramer::push(self, bytes)
    }
    fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        BackendFramer::next(self)
    }
    fn buffered(&self) -> usize {
        BackendFramer::buffered(self)
    }
}

/// The frames of `chunks` pushed in order into `framer`, the error that
/// stopped them (checked to be sticky), and the bytes left buffered.
pub fn frame_all(
    mut framer: impl Framing,
    chunks: &[&[u8]],
) -> (Vec<Frame>, Option<ProtocolError>, usize) {
    let mut frames = Vec::new();
    for chunk in chunks {
        framer.push(chunk);
        loop {
            match framer.next() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(framer.next(), Err(e.clone()), "errors are sticky");
                    return (frames, Some(e), framer.buffered());
                }
            }
        }
    }
    (frames, None, framer.buffered())
}

/// FNV-1a of the input: the chunking's seed.
pub fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A small xorshift generator: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `data` cut into chunks as a socket might deliver it: mostly a few bytes,
/// sometimes up to a page, now and then an empty read; `variant` picks
/// another chunking of the same input.
pub fn chunks(data: &[u8], variant: u64) -> Vec<&[u8]> {
    let mut rng = Rng::new(hash(data) ^ variant.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let size = match rng.below(16) {
            0 => 0,
            1..=7 => 1 + rng.below(8),
            8..=13 => 1 + rng.below(64),
            _ => 1 + rng.below(4096),
        };
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Every built-in detector and a few column globs, built once.
pub fn masker() -> &'static Arc<Masker> {
    static MASKER: OnceLock<Arc<Masker>> = OnceLock::new();
    MASKER.get_or_init(|| {
        let detectors: Vec<DetectorSpec> = builtin_detector_names()
            .iter()
            .map(|n| DetectorSpec::Builtin(n.to_string()))
            .collect();
        let globs = ["*card*", "ssn", "e?ail", "*secret*"].map(String::from);
        Arc::new(Masker::new(&globs, &detectors).expect("the built-in detectors compile"))
    })
}
