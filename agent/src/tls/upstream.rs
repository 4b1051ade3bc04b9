//! The agent's own TLS towards real servers, and the trust bundle given to
//! the programs `warden run` starts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use super::{TlsError, crypto_provider, der, write_atomic};

/// Where Debian, Ubuntu (and Alpine, Arch, ...) keep the system's roots as one PEM file.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Client config for the agent's own upstream TLS.
///
/// Trusts the system's roots (found by rustls-native-certs, which honours
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` in the agent's own environment;
/// certificates that do not parse are logged and skipped) plus every
/// certificate in the PEM files `extra_ca_files`, which must each hold at
/// least one. Servers are verified normally (webpki: chain, name, validity);
/// there is no way to turn verification off. `alpn` is offered in order.
///
/// Loading the system's roots reads many files: make one config per ALPN
/// list at start and share it.
pub fn upstream_config(
    extra_ca_files: &[PathBuf],
    alpn: &[Vec<u8>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "could not load some of the system's root certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::warn!(
            ignored,
            "skipped system root certificates that do not parse"
        );
    }
    tracing::debug!(roots = added, "loaded the system's root certificates");
    for path in extra_ca_files {
        let certs = read_pem_certs(path)?;
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::ExtraCa {
                path: path.clone(),
                reason: format!("a certificate in it is not a usable CA ({e})"),
            })?;
        }
    }
    if roots.is_empty() {
        let detail = native
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        return Err(TlsError::NoRoots { detail });
    }
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// Client config that trusts only the certificates in `ca_file`: a
/// private CA such as a Kubernetes cluster's, which no system root vouches
/// for and which should vouch for nothing else.
pub fn private_ca_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_pem_certs(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::ExtraCa {
            path: ca_file.to_path_buf(),
            reason: format!("a certificate in it is not a usable CA ({e})"),
        })?;
    }
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; at least one.
fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError::ExtraCa {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not PEM ({e})")))?;
    if certs.is_empty() {
        return Err(error(
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// Write a PEM bundle: the system's trusted roots followed by the agent's CA.
///
/// The roots are `/etc/ssl/certs/ca-certificates.crt`, copied as is, when it
/// exists; otherwise the certificates rustls-native-certs finds, re-encoded
/// as PEM (if there are none, the bundle holds the agent's CA only, and a
/// warning is logged). The file is written atomically (temporary file, then
/// rename) with mode 0644; its directory must exist.
///
/// `warden run` points the child's `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
/// `CURL_CA_BUNDLE` and `NODE_EXTRA_CA_CERTS` at it, so the child trusts both
/// real servers and the agent.
pub fn write_trust_bundle(ca_pem: &str, path: &Path) -> Result<(), TlsError> {
    write_trust_bundle_from(ca_pem, path, Path::new(SYSTEM_BUNDLE))
}

fn write_trust_bundle_from(
    ca_pem: &str,
    path: &Path,
    system_bundle: &Path,
) -> Result<(), TlsError> {
    let mut bundle = match fs::read(system_bundle) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "could not load some of the system's root certificates");
            }
            if native.certs.is_empty() {
                tracing::warn!(
                    bundle = %path.display(),
                    "no system root certificates found: the trust bundle holds only \
                     the agent's CA, so connections the agent does not intercept \
                     cannot be verified by the program"
                );
            }
            native
                .certs
                .iter()
                .flat_map(|c| der::pem("CERTIFICATE", c).into_bytes())
                .collect()
        }
        Err(source) => {
            return Err(TlsError::SystemRoots {
                path: system_bundle.to_path_buf(),
                source,
            });
        }
    };
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    write_atomic(path, &bundle, 0o644)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    use super::super::test_util::{connect, rustls_error, serve_once};
    use super::*;
    use crate::tls::Authority;

    /// A test CA (PEM) and a server config for `name` signed by it.
    fn test_server(name: &str) -> (String, Arc<rustls::ServerConfig>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        (ca.pem(), Arc::new(config))
    }

    #[tokio::test]
    async fn an_extra_ca_file_is_trusted() {
        let (ca_pem, server) = test_server("upstream.example.test");
        let tmp = tempfile::tempdir().unwrap();
        let ca_file = tmp.path().join("corp-ca.pem");
        fs::write(&ca_file, &ca_pem).unwrap();
        let name = ServerName::try_from("upstream.example.test").unwrap();
        let alpn = [b"h2".to_vec(), b"http/1.1".to_vec()];

        let config = upstream_config(&[ca_file], &alpn).unwrap();
        assert_eq!(config.alpn_protocols, alpn);
        let (addr, task) = serve_once(server.clone()).await;
        let (negotiated, _) = connect(addr, name.clone(), config).await.unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(negotiated.as_deref(), Some(&b"http/1.1"[..]));

        // Without it, the same server is refused (or, on a machine without
        // any root, there is no config at all).
        match upstream_config(&[], &alpn) {
            Err(TlsError::NoRoots { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(config) => {
                let (addr, task) = serve_once(server).await;
                let err = connect(addr, name, config).await.unwrap_err();
                let _ = task.await;
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
        }
    }

    #[test]
    fn a_bad_extra_ca_file_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.pem");
        let err = upstream_config(std::slice::from_ref(&missing), &[]).unwrap_err();
        assert!(matches!(err, TlsError::ExtraCa { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        assert!(err.to_string().contains("tls.upstream_ca"), "{err}");

        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "no certificates here\n").unwrap();
        let err = upstream_config(&[empty], &[]).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    fn count_certs(pem: &str) -> usize {
        pem.matches("-----BEGIN CERTIFICATE-----").count()
    }

    #[test]
    fn the_trust_bundle_holds_the_system_roots_and_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(&tmp.path().join("ca")).unwrap();
        let path = tmp.path().join("trust.pem");
        write_trust_bundle(authority.ca_pem(), &path).unwrap();
        let bundle = fs::read_to_string(&path).unwrap();
        assert!(bundle.ends_with(authority.ca_pem()));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        let system = Path::new(SYSTEM_BUNDLE);
        if system.exists() {
            let roots = count_certs(&fs::read_to_string(system).unwrap());
            assert!(roots > 0);
            assert_eq!(count_certs(&bundle), roots + 1);
        }
        // Every certificate in it parses.
        let parsed = CertificateDer::pem_slice_iter(bundle.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(parsed.len(), count_certs(&bundle));

        // Rewriting replaces it.
        write_trust_bundle(authority.ca_pem(), &path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), bundle);
    }

    #[test]
    fn without_the_system_file_the_bundle_is_built_from_native_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(&tmp.path().join("ca")).unwrap();
        let path = tmp.path().join("trust.pem");
        write_trust_bundle_from(authority.ca_pem(), &path, &tmp.path().join("absent.crt")).unwrap();
        let bundle = fs::read_to_string(&path).unwrap();
        let native = rustls_native_certs::load_native_certs().certs.len();
        assert_eq!(count_certs(&bundle), native + 1);
        let parsed = CertificateDer::pem_slice_iter(bundle.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(parsed.len(), native + 1);
        assert!(bundle.ends_with(authority.ca_pem()));
    }
}
