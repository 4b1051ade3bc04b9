//! TLS interception: the agent's certificate authority, per-host leaf
//! certificates and the agent's own upstream TLS.
//!
//! The proxy terminates a client's TLS with a [`rustls::ServerConfig`] from
//! [`Authority::server_config`] (a leaf certificate for the SNI name, or for
//! the destination IP when the client sent none, signed by the agent's CA),
//! and opens its own TLS connection upstream with [`upstream_config`], which
//! verifies the real server against the system's roots plus configured extra
//! CAs. [`write_trust_bundle`] writes the file `warden run` points its child's
//! `SSL_CERT_FILE` and friends at, so the child trusts both.
//!
//! Everything here uses rustls's *ring* provider explicitly
//! ([`crypto_provider`]); nothing depends on a process-wide default provider.
//!
//! See docs/tls.md for the user-facing side.

mod ca;
mod der;
mod upstream;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use ca::Authority;
pub use upstream::{private_ca_config, upstream_config, write_trust_bundle};

/// The crypto provider every config made here uses: rustls's *ring* provider.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What went wrong with the CA, a certificate or a TLS configuration.
/// Every message ends with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA directory cannot be made, locked or read.
    #[error(
        "cannot use the CA directory {path}: {source} \
         (it must be creatable and writable by the agent, which normally runs as root; \
         check the path and its parent's permissions)"
    )]
    CaDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `ca.pem` exists but cannot be read.
    #[error(
        "cannot read the CA certificate {path}: {source} \
         (fix its permissions, restore it from a backup, or delete both ca.pem and ca.key \
         in that directory to make a new CA)"
    )]
    CaCertUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `ca.pem` is not a certificate the agent can sign with.
    #[error(
        "the CA certificate {path} is not usable: {reason} \
         (restore ca.pem from a backup, or delete both ca.pem and ca.key in that directory \
         to make a new CA, then give the new ca.pem to everything that trusted the old one)"
    )]
    CaCertInvalid { path: PathBuf, reason: String },

    /// `ca.pem` has expired (or is not valid yet).
    #[error(
        "the CA certificate {path} is valid only from {not_before} to {not_after} \
         (check the system clock; if it is right, rotate the CA: stop the agent, move the \
         directory away, start the agent, and re-export the new ca.pem)"
    )]
    CaExpired {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },

    /// `ca.pem` exists but `ca.key` does not.
    #[error(
        "the CA key {key} is missing but the CA certificate {cert} exists \
         (restore ca.key from a backup, or delete both ca.pem and ca.key to make a new CA, \
         then give the new ca.pem to everything that trusted the old one)"
    )]
    CaKeyMissing { key: PathBuf, cert: PathBuf },

    /// `ca.key` exists but cannot be read.
    #[error(
        "cannot read the CA key {key}: {source} \
         (the key is readable by root only: run the agent as root; otherwise restore ca.key \
         from a backup, or delete both ca.pem and ca.key in that directory to make a new CA)"
    )]
    CaKeyUnreadable {
        key: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `ca.key` is not a private key.
    #[error(
        "the CA key {key} is not a usable private key: {reason} \
         (restore ca.key from a backup, or delete both ca.pem and ca.key in that directory \
         to make a new CA)"
    )]
    CaKeyInvalid { key: PathBuf, reason: String },

    /// `ca.key` is a key, but not the one `ca.pem` certifies.
    #[error(
        "the CA key {key} does not belong to the CA certificate {cert} \
         (restore the matching ca.key from a backup, or delete both files to make a new CA, \
         then give the new ca.pem to everything that trusted the old one)"
    )]
    CaKeyMismatch { key: PathBuf, cert: PathBuf },

    /// A file cannot be written.
    #[error("cannot write {path}: {source} (check free space and the directory's permissions)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A leaf certificate cannot be made for this name.
    #[error(
        "cannot make a certificate for {name}: {reason} \
         (the connection cannot be intercepted; allow it without inspection or refuse it)"
    )]
    Leaf { name: String, reason: String },

    /// Generating a key or certificate failed.
    #[error("cannot generate {what}: {reason} (this is a bug in Warden; please report it)")]
    Generate { what: &'static str, reason: String },

    /// rustls refused a configuration.
    #[error("cannot build the TLS configuration: {0} (this is a bug in Warden; please report it)")]
    Config(#[from] rustls::Error),

    /// No root certificate at all to verify upstream servers with.
    #[error(
        "no trusted root certificates found on this system{detail} \
         (install the ca-certificates package, or list CA files under tls.upstream_ca)"
    )]
    NoRoots { detail: String },

    /// An extra upstream CA file cannot be used.
    #[error(
        "cannot use the upstream CA file {path}: {reason} \
         (fix the file or remove it from tls.upstream_ca)"
    )]
    ExtraCa { path: PathBuf, reason: String },

    /// The system's trust store cannot be read to build the trust bundle.
    #[error(
        "cannot read the system's trusted certificates from {path}: {source} \
         (check that the ca-certificates package is installed and readable)"
    )]
    SystemRoots {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Write `bytes` to `path` atomically: a temporary file in the same
/// directory, created with `mode` (never wider, whatever the umask), synced,
/// then renamed over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename durable; not all file systems allow syncing a
        // directory, and the data is already safe either way.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod test_util {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Serve one TLS connection on loopback with `config`, write "hello",
    /// and return (address, task yielding the server's result).
    pub(crate) async fn serve_once(
        config: Arc<rustls::ServerConfig>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
            tls.write_all(b"hello").await?;
            tls.shutdown().await?;
            Ok(())
        });
        (addr, task)
    }

    /// Connect to `addr` as `name` with `config`, read "hello" back, and
    /// return the negotiated ALPN and the server's leaf certificate.
    pub(crate) async fn connect(
        addr: std::net::SocketAddr,
        name: ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<(Option<Vec<u8>>, Vec<u8>)> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let (_, conn) = tls.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        assert_eq!(buf, b"hello");
        Ok((alpn, leaf))
    }

    /// The rustls error inside an I/O error from tokio-rustls, if any.
    pub(crate) fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
        err.get_ref()?.downcast_ref::<rustls::Error>()
    }
}
