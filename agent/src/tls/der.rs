//! Just enough DER and PEM to read back the agent's own CA certificate
//! (subject, validity, public key) and to write certificates as PEM.
//!
//! rcgen can only parse certificates with its `x509-parser` feature, which the
//! agent does not enable; the few fields needed here are simple to walk.

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
const TAG_VERSION: u8 = 0xa0;

/// One DER element: its tag, its content, and the whole encoding.
#[derive(Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub tag: u8,
    pub content: &'a [u8],
    pub raw: &'a [u8],
}

/// Read one element from the front of `input`.
pub(crate) fn next<'a>(input: &mut &'a [u8]) -> Result<Tlv<'a>, &'static str> {
    let all = *input;
    let (&tag, rest) = all.split_first().ok_or("truncated DER")?;
    if tag & 0x1f == 0x1f {
        return Err("unsupported DER tag");
    }
    let (&first, mut rest) = rest.split_first().ok_or("truncated DER")?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad DER length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err("truncated DER");
    }
    let header = all.len() - rest.len();
    let tlv = Tlv {
        tag,
        content: &rest[..len],
        raw: &all[..header + len],
    };
    *input = &rest[len..];
    Ok(tlv)
}

fn expect<'a>(input: &mut &'a [u8], tag: u8, what: &'static str) -> Result<Tlv<'a>, &'static str> {
    let tlv = next(input)?;
    if tlv.tag == tag { Ok(tlv) } else { Err(what) }
}

/// The fields of a certificate the authority needs.
pub(crate) struct CertFields<'a> {
    /// The subject Name, whole (tag and length included).
    pub subject: &'a [u8],
    pub not_before: i64,
    pub not_after: i64,
    /// The subjectPublicKey bits (for EC keys, the uncompressed point).
    pub public_key: &'a [u8],
    /// The extensions' SEQUENCE content, if any.
    pub extensions: Option<&'a [u8]>,
}

pub(crate) fn cert_fields(der: &[u8]) -> Result<CertFields<'_>, &'static str> {
    let mut input = der;
    let cert = expect(&mut input, TAG_SEQUENCE, "not a certificate")?;
    let mut cert = cert.content;
    let tbs = expect(&mut cert, TAG_SEQUENCE, "not a certificate")?;
    let mut tbs = tbs.content;
    let mut el = next(&mut tbs)?;
    if el.tag == TAG_VERSION {
        el = next(&mut tbs)?; // serialNumber
    }
    let _ = el;
    expect(&mut tbs, TAG_SEQUENCE, "bad signature algorithm")?;
    expect(&mut tbs, TAG_SEQUENCE, "bad issuer")?;
    let validity = expect(&mut tbs, TAG_SEQUENCE, "bad validity")?;
    let mut validity = validity.content;
    let not_before = time(next(&mut validity)?)?;
    let not_after = time(next(&mut validity)?)?;
    let subject = expect(&mut tbs, TAG_SEQUENCE, "bad subject")?.raw;
    let spki = expect(&mut tbs, TAG_SEQUENCE, "bad public key")?;
    let mut spki = spki.content;
    expect(&mut spki, TAG_SEQUENCE, "bad public key")?;
    let bits = expect(&mut spki, TAG_BIT_STRING, "bad public key")?.content;
    let public_key = bits.get(1..).ok_or("bad public key")?;
    let mut extensions = None;
    while !tbs.is_empty() {
        let el = next(&mut tbs)?;
        if el.tag == 0xa3 {
            let mut inner = el.content;
            extensions = Some(expect(&mut inner, TAG_SEQUENCE, "bad extensions")?.content);
        }
    }
    Ok(CertFields {
        subject,
        not_before,
        not_after,
        public_key,
        extensions,
    })
}

/// A Name's attributes, in order: (OID arcs, string tag, string bytes).
pub(crate) type NameEntry<'a> = (Vec<u64>, u8, &'a [u8]);

pub(crate) fn name_entries(name: &[u8]) -> Result<Vec<NameEntry<'_>>, &'static str> {
    let mut input = name;
    let seq = expect(&mut input, TAG_SEQUENCE, "bad name")?;
    let mut rdns = seq.content;
    let mut out = Vec::new();
    while !rdns.is_empty() {
        let set = expect(&mut rdns, TAG_SET, "bad name")?;
        let mut atvs = set.content;
        while !atvs.is_empty() {
            let atv = expect(&mut atvs, TAG_SEQUENCE, "bad name")?;
            let mut atv = atv.content;
            let oid = expect(&mut atv, TAG_OID, "bad name")?;
            let value = next(&mut atv)?;
            out.push((oid_arcs(oid.content)?, value.tag, value.content));
        }
    }
    Ok(out)
}

fn oid_arcs(bytes: &[u8]) -> Result<Vec<u64>, &'static str> {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    for &b in bytes {
        if acc > (u64::MAX >> 7) {
            return Err("bad OID");
        }
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    if bytes.last().is_some_and(|b| b & 0x80 != 0) || arcs.is_empty() {
        return Err("bad OID");
    }
    Ok(arcs)
}

/// A UTCTime or GeneralizedTime (whole seconds, `Z`) as Unix seconds.
fn time(tlv: Tlv<'_>) -> Result<i64, &'static str> {
    let s = std::str::from_utf8(tlv.content).map_err(|_| "bad time")?;
    let s = s.strip_suffix('Z').ok_or("bad time")?;
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad time");
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, &'static str> {
        s.get(r).ok_or("bad time")?.parse().map_err(|_| "bad time")
    };
    let (year, rest) = match (tlv.tag, s.len()) {
        (TAG_UTC_TIME, 12) => {
            let yy = num(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (TAG_GENERALIZED_TIME, 14) => (num(0..4)?, 4),
        _ => return Err("bad time"),
    };
    let month = num(rest..rest + 2)?;
    let day = num(rest + 2..rest + 4)?;
    let hour = num(rest + 4..rest + 6)?;
    let min = num(rest + 6..rest + 8)?;
    let sec = num(rest + 8..rest + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err("bad time");
    }
    Ok(days_from_civil(year, month, day) * 86400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `YYYY-MM-DD` of Unix seconds, for messages.
pub(crate) fn date(unix: i64) -> String {
    let z = unix.div_euclid(86400) + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// PEM-encode DER (`label` e.g. "CERTIFICATE"), 64 columns, LF line ends.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // The alphabet is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The value (extnValue's content) of the extension `oid` (DER content
/// bytes), from a certificate's extensions.
pub(crate) fn extension<'a>(
    extensions: &'a [u8],
    oid: &[u8],
) -> Result<Option<&'a [u8]>, &'static str> {
    let mut exts = extensions;
    while !exts.is_empty() {
        let ext = expect(&mut exts, TAG_SEQUENCE, "bad extension")?;
        let mut ext = ext.content;
        let id = expect(&mut ext, TAG_OID, "bad extension")?;
        let mut value = next(&mut ext)?;
        if value.tag == 0x01 {
            value = next(&mut ext)?; // critical
        }
        if id.content == oid {
            if value.tag != 0x04 {
                return Err("bad extension");
            }
            return Ok(Some(value.content));
        }
    }
    Ok(None)
}

/// The subjectKeyIdentifier of a certificate, if it has one.
pub(crate) fn subject_key_id<'a>(
    fields: &CertFields<'a>,
) -> Result<Option<&'a [u8]>, &'static str> {
    let Some(exts) = fields.extensions else {
        return Ok(None);
    };
    let Some(mut value) = extension(exts, &[0x55, 0x1d, 0x0e])? else {
        return Ok(None);
    };
    Ok(Some(
        expect(&mut value, 0x04, "bad subject key identifier")?.content,
    ))
}

/// Subject alternative names of a certificate (DNS names and IP addresses).
#[cfg(test)]
pub(crate) fn subject_alt_names(der: &[u8]) -> Result<Vec<String>, &'static str> {
    let fields = cert_fields(der)?;
    let exts = fields.extensions.ok_or("no extensions")?;
    let mut value = extension(exts, &[0x55, 0x1d, 0x11])?.ok_or("no SAN")?;
    let names = expect(&mut value, TAG_SEQUENCE, "bad SAN")?;
    let mut names = names.content;
    let mut out = Vec::new();
    while !names.is_empty() {
        let name = next(&mut names)?;
        match (name.tag, name.content.len()) {
            (0x82, _) => out.push(String::from_utf8_lossy(name.content).into_owned()),
            (0x87, 4) => {
                let o: [u8; 4] = name.content.try_into().map_err(|_| "bad SAN")?;
                out.push(std::net::Ipv4Addr::from(o).to_string());
            }
            (0x87, 16) => {
                let o: [u8; 16] = name.content.try_into().map_err(|_| "bad SAN")?;
                out.push(std::net::Ipv6Addr::from(o).to_string());
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        for days in [0i64, 59, 10_000, 20_000, 30_000, 50_000, 2_932_896] {
            let d = date(days * 86400);
            let (y, m, dd) = (&d[0..4], &d[5..7], &d[8..10]);
            assert_eq!(
                days_from_civil(y.parse().unwrap(), m.parse().unwrap(), dd.parse().unwrap()),
                days
            );
        }
    }

    #[test]
    fn times() {
        let utc = |s: &'static str| Tlv {
            tag: TAG_UTC_TIME,
            content: s.as_bytes(),
            raw: &[],
        };
        assert_eq!(time(utc("700101000000Z")), Ok(0));
        assert_eq!(time(utc("491231235959Z")), Ok(2_524_607_999));
        assert!(time(utc("700101000000")).is_err());
        let generalized = Tlv {
            tag: TAG_GENERALIZED_TIME,
            content: b"20500101000000Z",
            raw: &[],
        };
        assert_eq!(time(generalized), Ok(2_524_608_000));
    }

    #[test]
    fn oids() {
        assert_eq!(oid_arcs(&[0x55, 0x04, 0x03]), Ok(vec![2, 5, 4, 3]));
        assert_eq!(
            oid_arcs(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]),
            Ok(vec![1, 2, 840, 113549, 1, 1, 1])
        );
        assert!(oid_arcs(&[0x86]).is_err());
    }

    #[test]
    fn pem_matches_known_base64() {
        let p = pem("X", b"foobar!");
        assert_eq!(p, "-----BEGIN X-----\nZm9vYmFyIQ==\n-----END X-----\n");
        let long = pem("X", &[0u8; 60]);
        assert_eq!(long.lines().nth(1).unwrap().len(), 64);
        assert_eq!(long.lines().nth(2).unwrap(), "A".repeat(16));
    }
}
