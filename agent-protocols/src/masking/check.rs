//! Checksums and small decoders the detectors use. None allocates, except
//! the base64 decoding of a JWT header (a few hundred bytes at most).

/// The Luhn check over the ASCII digits of `bytes` (other bytes skipped).
pub(super) fn luhn(bytes: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut double = false;
    for &b in bytes.iter().rev() {
        if !b.is_ascii_digit() {
            continue;
        }
        let mut d = u32::from(b - b'0');
        if double {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        double = !double;
    }
    sum.is_multiple_of(10)
}

/// [`luhn`] for custom detectors: at least 2 digits.
pub(super) fn luhn_loose(text: &str) -> bool {
    text.bytes().filter(u8::is_ascii_digit).count() >= 2 && luhn(text.as_bytes())
}

/// The ISO 7064 mod-97-10 check as IBANs use it, over `chars` (ASCII
/// letters and digits only): the first four moved to the end, letters
/// counted as 10..35, the remainder must be 1.
pub(super) fn mod97<I>(chars: I) -> bool
where
    I: Iterator<Item = u8> + Clone,
{
    let mut rem = 0u32;
    let mut feed = |b: u8| -> bool {
        if b.is_ascii_digit() {
            rem = (rem * 10 + u32::from(b - b'0')) % 97;
        } else if b.is_ascii_alphabetic() {
            let v = u32::from(b.to_ascii_uppercase() - b'A') + 10;
            rem = (rem * 100 + v) % 97;
        } else {
            return false;
        }
        true
    };
    for b in chars.clone().skip(4) {
        if !feed(b) {
            return false;
        }
    }
    for b in chars.take(4) {
        if !feed(b) {
            return false;
        }
    }
    rem == 1
}

/// [`mod97`] for custom detectors: spaces and dashes ignored, any other
/// character than an ASCII letter or digit fails; at least 5 characters.
pub(super) fn mod97_loose(text: &str) -> bool {
    let chars = text.bytes().filter(|b| *b != b' ' && *b != b'-');
    chars.clone().count() >= 5 && mod97(chars)
}

/// Decodes unpadded (or padded) base64url; `None` on a character outside
/// the alphabet or an impossible length.
pub(super) fn base64url_decode(text: &[u8]) -> Option<Vec<u8>> {
    let text = match text.iter().position(|b| *b == b'=') {
        Some(pad) => &text[..pad],
        None => text,
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &b in text {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
