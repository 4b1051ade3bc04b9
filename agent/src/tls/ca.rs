//! The agent's certificate authority: stored as `ca.pem` + `ca.key` in its
//! directory, and the leaf certificates it signs on the fly.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::{BmpString, Ia5String, PrintableString, TeletexString, UniversalString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::ServerConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};

use super::{TlsError, der, write_atomic};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const DAY: u64 = 86_400;
/// Ten years, leap days included.
const CA_LIFETIME: u64 = 3_652 * DAY;
/// Certificates start an hour in the past, for clients whose clock is behind.
const BACKDATE: u64 = 3_600;
const LEAF_LIFETIME: u64 = 90 * DAY;
/// A cached leaf is replaced once it is this old, so a served leaf always has
/// at least 60 days left.
const LEAF_REFRESH: Duration = Duration::from_secs(30 * DAY);
/// Leaf certificates kept (one per name); the oldest is evicted first.
const CACHE_CAPACITY: usize = 1024;
/// Server configs kept per leaf (one per distinct ALPN list).
const CONFIGS_PER_LEAF: usize = 4;
/// Warn when the CA has less than this left.
const CA_EXPIRY_WARNING: u64 = 90 * DAY;

/// The agent's certificate authority.
///
/// Made once at start ([`Authority::load_or_create`]) and shared by every
/// connection; it is `Send + Sync`, and [`Authority::server_config`] may be
/// called concurrently.
pub struct Authority {
    ca_pem: String,
    ca_not_before: u64,
    ca_not_after: u64,
    issuer: Issuer<'static, KeyPair>,
    /// Whether the CA has a subjectKeyIdentifier, so leaves can name it.
    authority_key_id: bool,
    /// The one key of every leaf (generated per `Authority`, never stored).
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<LeafCache>,
    leaf_refresh: Duration,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("ca_not_after", &der::date(self.ca_not_after as i64))
            .field("cached_leaves", &self.lock_cache().map.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LeafCache {
    map: HashMap<String, Leaf>,
    /// Keys in insertion order, oldest first.
    order: VecDeque<String>,
    capacity: usize,
}

struct Leaf {
    key: Arc<CertifiedKey>,
    /// Unix seconds after which the leaf is made anew.
    refresh_at: u64,
    configs: Vec<(Vec<Vec<u8>>, Arc<ServerConfig>)>,
}

impl Authority {
    /// Load `<dir>/ca.pem` and `<dir>/ca.key`, or create them on first start.
    ///
    /// The CA is an ECDSA P-256 self-signed certificate, CN "Warden local CA
    /// (<hostname>)", valid ten years, key usage keyCertSign + cRLSign,
    /// basicConstraints CA:true pathlen 0. `dir` is made 0700 (its parent
    /// directories with the usual permissions), `ca.key` is created 0600 and
    /// `ca.pem` 0644, both through temporary files renamed into place (the key
    /// first, so an existing `ca.pem` always has its key), under an exclusive
    /// lock on `dir` so two processes starting at once make one CA.
    ///
    /// A `ca.pem` whose `ca.key` is missing, unreadable, not a key or not its
    /// key is an error naming the file; nothing is overwritten. A `ca.key`
    /// without `ca.pem` (an interrupted first start) is renamed
    /// `ca.key.orphaned.<unix time>` and a new CA is made.
    pub fn load_or_create(dir: &Path) -> Result<Authority, TlsError> {
        let provider = super::crypto_provider();
        prepare_dir(dir)?;
        let _lock = lock_dir(dir)?;
        remove_stale_temp_files(dir);
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let (ca_pem, key) = match fs::read_to_string(&cert_path) {
            Ok(pem) => (pem, read_key(&key_path, &cert_path)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                set_aside_orphan_key(&key_path)?;
                create(&cert_path, &key_path, &provider)?
            }
            Err(source) => {
                return Err(TlsError::CaCertUnreadable {
                    path: cert_path,
                    source,
                });
            }
        };
        Self::from_parts(&cert_path, &key_path, ca_pem, key, provider)
    }

    fn from_parts(
        cert_path: &Path,
        key_path: &Path,
        ca_pem: String,
        key: KeyPair,
        provider: Arc<CryptoProvider>,
    ) -> Result<Authority, TlsError> {
        let invalid = |reason: String| TlsError::CaCertInvalid {
            path: cert_path.to_path_buf(),
            reason,
        };
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| invalid(format!("no PEM certificate in it ({e})")))?;
        let fields = der::cert_fields(&ca_der).map_err(|e| invalid(e.to_string()))?;
        if fields.public_key != key.public_key_raw() {
            return Err(TlsError::CaKeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }
        let now = unix_now() as i64;
        if now < fields.not_before || now > fields.not_after {
            return Err(TlsError::CaExpired {
                path: cert_path.to_path_buf(),
                not_before: der::date(fields.not_before),
                not_after: der::date(fields.not_after),
            });
        }
        if fields.not_after - now < CA_EXPIRY_WARNING as i64 {
            tracing::warn!(
                ca = %cert_path.display(),
                not_after = %der::date(fields.not_after),
                "the agent's CA expires soon; rotate it (see docs/tls.md)"
            );
        }

        // The issuer name in every leaf must be byte-for-byte the CA's
        // subject, and the authority key identifier its subject key identifier.
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(fields.subject).map_err(&invalid)?;
        let ski = der::subject_key_id(&fields).map_err(|e| invalid(e.to_string()))?;
        let authority_key_id = ski.is_some();
        params.key_identifier_method = KeyIdMethod::PreSpecified(ski.unwrap_or_default().to_vec());
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = Issuer::new(params, key);

        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
            TlsError::Generate {
                what: "the leaf key",
                reason: e.to_string(),
            }
        })?;
        let leaf_signer = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                leaf_key.serialize_der(),
            )))?;

        let authority = Authority {
            ca_not_before: fields.not_before.max(0) as u64,
            ca_not_after: fields.not_after.max(0) as u64,
            ca_pem,
            issuer,
            authority_key_id,
            leaf_key,
            leaf_signer,
            provider,
            cache: Mutex::new(LeafCache {
                capacity: CACHE_CAPACITY,
                ..LeafCache::default()
            }),
            leaf_refresh: LEAF_REFRESH,
        };
        authority.self_check(cert_path, key_path, ca_der)?;
        Ok(authority)
    }

    /// Sign a leaf and verify it as a client would, so a CA that cannot
    /// work is reported at start rather than on every connection.
    fn self_check(
        &self,
        cert_path: &Path,
        key_path: &Path,
        ca_der: CertificateDer<'static>,
    ) -> Result<(), TlsError> {
        let invalid = |reason: String| TlsError::CaCertInvalid {
            path: cert_path.to_path_buf(),
            reason,
        };
        let name = ServerName::try_from("warden-self-check.invalid").expect("valid DNS name");
        let leaf = self.issue(&name)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca_der)
            .map_err(|e| invalid(format!("not a usable trust anchor ({e})")))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| invalid(e.to_string()))?;
        match verifier.verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now()) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)) => {
                Err(TlsError::CaKeyMismatch {
                    key: key_path.to_path_buf(),
                    cert: cert_path.to_path_buf(),
                })
            }
            Err(e) => Err(invalid(format!(
                "a certificate signed with it does not verify ({e}); was it made by Warden?"
            ))),
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A [`ServerConfig`] presenting a leaf certificate for `name`, signed by
    /// the CA, offering `alpn` (in order).
    ///
    /// `name` is the SNI name, or the destination IP address when the client
    /// sent no SNI. The leaf (ECDSA P-256, SAN = the name, serverAuth, valid
    /// from an hour ago for 90 days, never past the CA) is made on first use
    /// and cached per name (1024 names; the oldest is evicted first; a leaf
    /// is replaced after 30 days); configs are cached per name and ALPN list,
    /// so TLS session resumption works across connections to the same host.
    /// DNS names are matched case-insensitively, without a trailing dot.
    pub fn server_config(
        &self,
        name: &ServerName<'_>,
        alpn: &[Vec<u8>],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let cache_key = cache_key(name)?;
        let now = unix_now();
        // Signing a leaf takes well under a millisecond: do it under the
        // lock, so each name gets exactly one leaf.
        let mut cache = self.lock_cache();
        if let Some(leaf) = cache.map.get_mut(&cache_key)
            && now < leaf.refresh_at
        {
            if let Some((_, config)) = leaf.configs.iter().find(|(a, _)| a == alpn) {
                return Ok(config.clone());
            }
            let config = self.build_config(&leaf.key, alpn)?;
            if leaf.configs.len() >= CONFIGS_PER_LEAF {
                leaf.configs.remove(0);
            }
            leaf.configs.push((alpn.to_vec(), config.clone()));
            return Ok(config);
        }
        let key = Arc::new(self.issue(name)?);
        let config = self.build_config(&key, alpn)?;
        let leaf = Leaf {
            key,
            refresh_at: now.saturating_add(self.leaf_refresh.as_secs()),
            configs: vec![(alpn.to_vec(), config.clone())],
        };
        cache.insert(cache_key, leaf);
        Ok(config)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, LeafCache> {
        // The cache holds no invariant a panicking holder could break halfway.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn build_config(
        &self,
        key: &Arc<CertifiedKey>,
        alpn: &[Vec<u8>],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
        config.alpn_protocols = alpn.to_vec();
        Ok(Arc::new(config))
    }

    /// Sign a new leaf certificate for `name`.
    fn issue(&self, name: &ServerName<'_>) -> Result<CertifiedKey, TlsError> {
        let leaf_error = |reason: String| TlsError::Leaf {
            name: name_for_humans(name),
            reason,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        match name {
            ServerName::DnsName(dns) => {
                let host = normalize_dns(dns.as_ref());
                if host.is_empty() {
                    return Err(leaf_error("empty name".into()));
                }
                // ub-common-name is 64; longer names live in the SAN only.
                if host.len() <= 64 {
                    params
                        .distinguished_name
                        .push(DnType::CommonName, host.clone());
                }
                let ia5 = Ia5String::try_from(host).map_err(|e| leaf_error(e.to_string()))?;
                params.subject_alt_names = vec![SanType::DnsName(ia5)];
            }
            ServerName::IpAddress(ip) => {
                let ip = IpAddr::from(*ip);
                params
                    .distinguished_name
                    .push(DnType::CommonName, ip.to_string());
                params.subject_alt_names = vec![SanType::IpAddress(ip)];
            }
            _ => return Err(leaf_error("unsupported kind of server name".into())),
        }
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = self.authority_key_id;
        params.serial_number = Some(serial_number(&self.provider)?);
        let now = unix_now();
        let not_before = now.saturating_sub(BACKDATE).max(self.ca_not_before);
        let not_after = now.saturating_add(LEAF_LIFETIME).min(self.ca_not_after);
        set_validity(&mut params, not_before, not_after);
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| leaf_error(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone()],
            self.leaf_signer.clone(),
        ))
    }
}

impl LeafCache {
    fn insert(&mut self, key: String, leaf: Leaf) {
        if self.map.insert(key.clone(), leaf).is_some() {
            // A refreshed leaf counts as new.
            self.order.retain(|k| *k != key);
        }
        self.order.push_back(key);
        while self.map.len() > self.capacity.max(1) {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.map.remove(&oldest);
                }
                None => break,
            }
        }
    }
}

fn normalize_dns(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn cache_key(name: &ServerName<'_>) -> Result<String, TlsError> {
    match name {
        ServerName::DnsName(dns) => Ok(normalize_dns(dns.as_ref())),
        ServerName::IpAddress(ip) => Ok(format!("ip:{}", IpAddr::from(*ip))),
        _ => Err(TlsError::Leaf {
            name: name_for_humans(name),
            reason: "unsupported kind of server name".into(),
        }),
    }
}

fn name_for_humans(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_string(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Set a certificate's validity, in Unix seconds (without naming the `time`
/// crate, which the agent does not depend on directly).
fn set_validity(params: &mut CertificateParams, not_before: u64, not_after: u64) {
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_before);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_after);
}

/// A random, positive, 16-byte serial number: every leaf has the same key,
/// so rcgen's default (a hash of the public key) would repeat.
fn serial_number(provider: &CryptoProvider) -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    provider
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| TlsError::Generate {
            what: "a serial number",
            reason: "the system's random number generator failed".into(),
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// "Warden local CA (<hostname>)", at most 64 characters.
fn ca_common_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into());
    let host: String = host.chars().take(64 - "Warden local CA ()".len()).collect();
    format!("Warden local CA ({host})")
}

/// The CA's subject: CN "Warden local CA (<hostname>)", O "Warden", and an
/// OU with the creation date and a random id. The OU makes every CA's name
/// unique: clients look the issuer up by name, so a rotated CA, or another
/// host's, must not share a name with the one a client trusts (the client
/// would then report a bad signature instead of an unknown issuer, and
/// OpenSSL-based clients that trust both could pick the wrong one).
fn ca_name(provider: &CryptoProvider) -> Result<DistinguishedName, TlsError> {
    let mut id = [0u8; 4];
    provider
        .secure_random
        .fill(&mut id)
        .map_err(|_| TlsError::Generate {
            what: "the CA's name",
            reason: "the system's random number generator failed".into(),
        })?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ca_common_name());
    dn.push(DnType::OrganizationName, "Warden");
    dn.push(
        DnType::OrganizationalUnitName,
        format!("made {} id {id}", der::date(unix_now() as i64)),
    );
    Ok(dn)
}

/// Rebuild the CA's subject as an rcgen name that encodes to the same bytes.
fn distinguished_name(subject: &[u8]) -> Result<DistinguishedName, String> {
    let entries = der::name_entries(subject).map_err(|e| format!("subject: {e}"))?;
    let mut dn = DistinguishedName::new();
    for (oid, tag, bytes) in &entries {
        let text = || String::from_utf8(bytes.to_vec()).map_err(|_| "subject: bad string");
        let value = match tag {
            0x0c => DnValue::Utf8String(text()?),
            0x13 => DnValue::PrintableString(
                PrintableString::try_from(text()?).map_err(|e| e.to_string())?,
            ),
            0x16 => DnValue::Ia5String(Ia5String::try_from(text()?).map_err(|e| e.to_string())?),
            0x14 => {
                DnValue::TeletexString(TeletexString::try_from(text()?).map_err(|e| e.to_string())?)
            }
            0x1e => DnValue::BmpString(
                BmpString::from_utf16be(bytes.to_vec()).map_err(|e| e.to_string())?,
            ),
            0x1c => DnValue::UniversalString(
                UniversalString::from_utf32be(bytes.to_vec()).map_err(|e| e.to_string())?,
            ),
            _ => return Err(format!("subject: unsupported string type 0x{tag:02x}")),
        };
        dn.push(DnType::from_oid(oid), value);
    }
    if dn.iter().count() != entries.len() {
        return Err("subject: repeated attributes are not supported".into());
    }
    Ok(dn)
}

fn read_key(key_path: &Path, cert_path: &Path) -> Result<KeyPair, TlsError> {
    let pem = match fs::read_to_string(key_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TlsError::CaKeyMissing {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(TlsError::CaKeyUnreadable {
                key: key_path.to_path_buf(),
                source,
            });
        }
    };
    let key = KeyPair::from_pem(&pem).map_err(|e| TlsError::CaKeyInvalid {
        key: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // Whoever restored the key may have left it readable by others.
    if let Ok(meta) = fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(key = %key_path.display(), "the CA key was readable by others; making it 0600");
        if let Err(e) = fs::set_permissions(key_path, fs::Permissions::from_mode(0o600)) {
            tracing::warn!(key = %key_path.display(), error = %e, "cannot make the CA key 0600");
        }
    }
    Ok(key)
}

fn set_aside_orphan_key(key_path: &Path) -> Result<(), TlsError> {
    if fs::symlink_metadata(key_path).is_err() {
        return Ok(());
    }
    let aside = key_path.with_file_name(format!("{CA_KEY}.orphaned.{}", unix_now()));
    tracing::warn!(
        key = %key_path.display(),
        moved_to = %aside.display(),
        "found a CA key without its certificate (an interrupted first start?); \
         setting it aside and making a new CA"
    );
    fs::rename(key_path, &aside).map_err(|source| TlsError::Write {
        path: aside,
        source,
    })
}

fn create(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(String, KeyPair), TlsError> {
    let generate = |what, e: rcgen::Error| TlsError::Generate {
        what,
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| generate("the CA key", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(provider)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(serial_number(provider)?);
    let now = unix_now();
    set_validity(&mut params, now - BACKDATE, now + CA_LIFETIME);
    let cert = params
        .self_signed(&key)
        .map_err(|e| generate("the CA certificate", e))?;
    let pem = cert.pem();
    // Key first: once ca.pem exists, its key does too.
    write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert_path, pem.as_bytes(), 0o644)?;
    tracing::info!(ca = %cert_path.display(), "made a new certificate authority for TLS interception");
    Ok((pem, key))
}

/// Make `dir` (0700) if needed, and make sure it is not open to others.
fn prepare_dir(dir: &Path) -> Result<(), TlsError> {
    let err = |source| TlsError::CaDir {
        path: dir.to_path_buf(),
        source,
    };
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent).map_err(err)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let meta = fs::metadata(dir).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists and is not a directory",
        )));
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Hold an exclusive lock on the directory until the returned file is dropped.
fn lock_dir(dir: &Path) -> Result<File, TlsError> {
    let err = |source| TlsError::CaDir {
        path: dir.to_path_buf(),
        source,
    };
    let file = File::open(dir).map_err(err)?;
    loop {
        // SAFETY: flock on a file descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(err(e));
        }
    }
}

/// Temporary files a crashed start left behind (called under the lock).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!(".{CA_CERT}.tmp"))
            || name.starts_with(&format!(".{CA_KEY}.tmp"))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::super::test_util::{connect, rustls_error, serve_once};
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn client_trusting(pem: &str) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(super::super::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    #[test]
    fn authority_is_send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<Authority>();
    }

    #[test]
    fn create_then_load_gives_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/ca");
        let first = Authority::load_or_create(&dir).unwrap();
        assert!(first.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("ca.pem")), 0o644);
        assert_eq!(
            fs::read_to_string(dir.join("ca.pem")).unwrap(),
            first.ca_pem()
        );
        let second = Authority::load_or_create(&dir).unwrap();
        assert_eq!(first.ca_pem(), second.ca_pem());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    }

    #[test]
    fn the_ca_certificate_says_what_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(tmp.path()).unwrap();
        let der = CertificateDer::from_pem_slice(authority.ca_pem().as_bytes()).unwrap();
        let fields = der::cert_fields(&der).unwrap();
        let subject = der::name_entries(fields.subject).unwrap();
        assert_eq!(subject.len(), 3);
        assert_eq!(subject[0].0, vec![2, 5, 4, 3]);
        let cn = std::str::from_utf8(subject[0].2).unwrap();
        assert!(
            cn.starts_with("Warden local CA (") && cn.ends_with(')'),
            "{cn}"
        );
        assert!(cn.len() <= 64);
        assert_eq!(subject[1].0, vec![2, 5, 4, 10]);
        assert_eq!(subject[1].2, b"Warden");
        assert_eq!(subject[2].0, vec![2, 5, 4, 11]);
        let ou = std::str::from_utf8(subject[2].2).unwrap();
        assert!(ou.starts_with("made 20") && ou.contains(" id "), "{ou}");
        // Two CAs never share a name.
        let other = tempfile::tempdir().unwrap();
        let other = Authority::load_or_create(other.path()).unwrap();
        let other_der = CertificateDer::from_pem_slice(other.ca_pem().as_bytes()).unwrap();
        assert_ne!(
            der::cert_fields(&other_der).unwrap().subject,
            fields.subject
        );
        let now = unix_now() as i64;
        assert!(fields.not_before <= now - 3000);
        let years = (fields.not_after - now) / (365 * 86400);
        assert_eq!(years, 10);
        // basicConstraints CA:true, pathlen 0; keyUsage keyCertSign + cRLSign.
        let exts = fields.extensions.unwrap();
        let bc = der::extension(exts, &[0x55, 0x1d, 0x13]).unwrap().unwrap();
        assert_eq!(bc, [0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00]);
        let ku = der::extension(exts, &[0x55, 0x1d, 0x0f]).unwrap().unwrap();
        assert_eq!(ku, [0x03, 0x02, 0x01, 0x06]);
        assert!(der::subject_key_id(&fields).unwrap().is_some());
    }

    #[test]
    fn a_missing_or_bad_key_beside_a_certificate_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let original = Authority::load_or_create(dir).unwrap();
        let key_path = dir.join("ca.key");
        let good_key = fs::read(&key_path).unwrap();

        fs::remove_file(&key_path).unwrap();
        let err = Authority::load_or_create(dir).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMissing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("ca.key") && msg.contains("delete both"),
            "{msg}"
        );
        assert!(msg.contains("restore"), "{msg}");
        // Nothing was overwritten.
        assert_eq!(
            fs::read_to_string(dir.join("ca.pem")).unwrap(),
            original.ca_pem()
        );

        fs::write(&key_path, "not a key").unwrap();
        let err = Authority::load_or_create(dir).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyInvalid { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");

        let other = tempfile::tempdir().unwrap();
        Authority::load_or_create(other.path()).unwrap();
        fs::copy(other.path().join("ca.key"), &key_path).unwrap();
        let err = Authority::load_or_create(dir).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("does not belong") && msg.contains("ca.pem"),
            "{msg}"
        );

        fs::remove_file(&key_path).unwrap();
        fs::create_dir(&key_path).unwrap(); // unreadable as a file, even for root
        let err = Authority::load_or_create(dir).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyUnreadable { .. }), "{err:?}");
        fs::remove_dir(&key_path).unwrap();

        // Restoring the key, even with loose permissions, works again.
        fs::write(&key_path, good_key).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let restored = Authority::load_or_create(dir).unwrap();
        assert_eq!(restored.ca_pem(), original.ca_pem());
        assert_eq!(mode(&key_path), 0o600);
    }

    #[test]
    fn a_corrupt_certificate_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        Authority::load_or_create(tmp.path()).unwrap();
        fs::write(tmp.path().join("ca.pem"), "garbage").unwrap();
        let err = Authority::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, TlsError::CaCertInvalid { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn an_orphaned_key_is_set_aside_and_a_new_ca_made() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("ca.key"), "left over").unwrap();
        fs::write(tmp.path().join(".ca.pem.tmp.1.2"), "stale").unwrap();
        Authority::load_or_create(tmp.path()).unwrap();
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names[0], "ca.key");
        assert!(names[1].starts_with("ca.key.orphaned."), "{names:?}");
        assert_eq!(names[2], "ca.pem");
    }

    #[test]
    fn a_wide_open_directory_is_closed() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Authority::load_or_create(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o700);
    }

    #[test]
    fn concurrent_first_starts_make_one_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let pems: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        Authority::load_or_create(&dir)
                            .unwrap()
                            .ca_pem()
                            .to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(pems.iter().all(|p| *p == pems[0]));
    }

    /// Handshake with `authority`'s config for `server_name`; the client
    /// connects as `client_name`, trusting `trusted_pem`.
    async fn handshake(
        authority: &Authority,
        server_name: &str,
        client_name: &str,
        trusted_pem: &str,
    ) -> std::io::Result<(Option<Vec<u8>>, Vec<u8>)> {
        let config = authority
            .server_config(
                &ServerName::try_from(server_name).unwrap(),
                &[b"http/1.1".to_vec()],
            )
            .unwrap();
        let (addr, server) = serve_once(config).await;
        let result = connect(
            addr,
            ServerName::try_from(client_name.to_string()).unwrap(),
            client_trusting(trusted_pem),
        )
        .await;
        let _ = server.await;
        result
    }

    #[tokio::test]
    async fn a_client_trusting_the_ca_completes_the_handshake() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(tmp.path()).unwrap();
        let (alpn, leaf) = handshake(
            &authority,
            "api.example.test",
            "api.example.test",
            authority.ca_pem(),
        )
        .await
        .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(der::subject_alt_names(&leaf).unwrap(), ["api.example.test"]);

        // The leaf: issued by the CA, serverAuth, about 90 days.
        let ca = CertificateDer::from_pem_slice(authority.ca_pem().as_bytes()).unwrap();
        let ca_fields = der::cert_fields(&ca).unwrap();
        let fields = der::cert_fields(&leaf).unwrap();
        let now = unix_now() as i64;
        assert!(fields.not_before <= now - 3000 && fields.not_before >= ca_fields.not_before);
        assert!((fields.not_after - now - 90 * 86400).abs() < 60);
        let exts = fields.extensions.unwrap();
        let eku = der::extension(exts, &[0x55, 0x1d, 0x25]).unwrap().unwrap();
        // SEQUENCE { id-kp-serverAuth 1.3.6.1.5.5.7.3.1 }
        assert_eq!(eku, [0x30, 0x0a, 0x06, 0x08, 0x2b, 6, 1, 5, 5, 7, 3, 1]);
        // The authority key identifier names the CA's subject key identifier.
        let aki = der::extension(exts, &[0x55, 0x1d, 0x23]).unwrap().unwrap();
        let ski = der::subject_key_id(&ca_fields).unwrap().unwrap();
        assert!(aki.ends_with(ski));
    }

    #[tokio::test]
    async fn a_client_asking_for_another_name_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(tmp.path()).unwrap();
        let err = handshake(
            &authority,
            "api.example.test",
            "other.example.test",
            authority.ca_pem(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_client_not_trusting_the_ca_fails_with_unknown_issuer() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(tmp.path()).unwrap();
        let other_tmp = tempfile::tempdir().unwrap();
        let other = Authority::load_or_create(other_tmp.path()).unwrap();
        let err = handshake(
            &authority,
            "api.example.test",
            "api.example.test",
            other.ca_pem(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{err:?}"
        );
    }

    /// As the proxy does it: read the ClientHello, see there is no SNI, and
    /// present a certificate for the destination address.
    #[tokio::test]
    async fn a_client_without_sni_gets_a_certificate_for_the_address() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Arc::new(Authority::load_or_create(tmp.path()).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_authority = authority.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
            let start = acceptor.await.unwrap();
            let sni = start.client_hello().server_name().map(str::to_string);
            let name = match &sni {
                Some(sni) => ServerName::try_from(sni.as_str()).unwrap().to_owned(),
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let config = server_authority
                .server_config(&name, &[b"http/1.1".to_vec()])
                .unwrap();
            let mut tls = start.into_stream(config).await.unwrap();
            tls.write_all(b"hello").await.unwrap();
            tls.shutdown().await.unwrap();
            sni
        });
        let (alpn, leaf) = connect(
            addr,
            ServerName::IpAddress(addr.ip().into()),
            client_trusting(authority.ca_pem()),
        )
        .await
        .unwrap();
        assert_eq!(server.await.unwrap(), None, "no SNI for an IP address");
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(der::subject_alt_names(&leaf).unwrap(), ["127.0.0.1"]);
    }

    /// The leaf a config presents, read through a real handshake.
    async fn presented(config: Arc<ServerConfig>, name: &str, ca_pem: &str) -> Vec<u8> {
        let (addr, server) = serve_once(config).await;
        let (_, leaf) = connect(
            addr,
            ServerName::try_from(name.to_string()).unwrap(),
            client_trusting(ca_pem),
        )
        .await
        .unwrap();
        server.await.unwrap().unwrap();
        leaf
    }

    #[tokio::test]
    async fn leaves_are_cached_per_name() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(tmp.path()).unwrap();
        let pem = authority.ca_pem().to_string();
        let name = |s: &'static str| ServerName::try_from(s).unwrap();
        let h1 = [b"http/1.1".to_vec()];
        let h2 = [b"h2".to_vec(), b"http/1.1".to_vec()];

        let a1 = authority
            .server_config(&name("a.example.test"), &h1)
            .unwrap();
        let a2 = authority
            .server_config(&name("a.example.test"), &h1)
            .unwrap();
        assert!(Arc::ptr_eq(&a1, &a2), "same name, same ALPN: same config");
        let a_upper = authority
            .server_config(&name("A.Example.TEST."), &h2)
            .unwrap();
        assert_eq!(a_upper.alpn_protocols, h2);
        let b = authority
            .server_config(&name("b.example.test"), &h1)
            .unwrap();

        let a1_der = presented(a1, "a.example.test", &pem).await;
        let a2_der = presented(a2, "a.example.test", &pem).await;
        let a_upper_der = presented(a_upper, "a.example.test", &pem).await;
        let b_der = presented(b, "b.example.test", &pem).await;
        assert_eq!(a1_der, a2_der);
        assert_eq!(a1_der, a_upper_der, "names are case-insensitive");
        assert_ne!(a1_der, b_der);
        assert_eq!(der::subject_alt_names(&b_der).unwrap(), ["b.example.test"]);
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(tmp.path()).unwrap();
        authority.lock_cache().capacity = 2;
        let name = |s: &'static str| ServerName::try_from(s).unwrap();
        let a = authority.server_config(&name("a.test"), &[]).unwrap();
        authority.server_config(&name("b.test"), &[]).unwrap();
        let a_again = authority.server_config(&name("a.test"), &[]).unwrap();
        assert!(Arc::ptr_eq(&a, &a_again));
        authority.server_config(&name("c.test"), &[]).unwrap();
        {
            let cache = authority.lock_cache();
            assert_eq!(cache.map.len(), 2);
            assert!(!cache.map.contains_key("a.test"), "a was the oldest");
        }
        let a_new = authority.server_config(&name("a.test"), &[]).unwrap();
        assert!(!Arc::ptr_eq(&a, &a_new));
    }

    #[test]
    fn old_leaves_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let mut authority = Authority::load_or_create(tmp.path()).unwrap();
        authority.leaf_refresh = Duration::ZERO;
        let name = ServerName::try_from("a.test").unwrap();
        let first = authority.server_config(&name, &[]).unwrap();
        let second = authority.server_config(&name, &[]).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(authority.lock_cache().order.len(), 1);
    }
}
