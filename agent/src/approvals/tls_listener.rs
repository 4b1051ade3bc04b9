//! A loopback HTTPS listener with a certificate of the agent's CA, shared by
//! the control API's TLS port and the review page.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::tls::Authority;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` (loopback only: `what` says what listens, for errors) and,
/// until `cancel`, hands each connection's TLS stream to `serve` on a task
/// of its own.
pub(super) async fn serve_loopback_tls<F, Fut>(
    addr: SocketAddr,
    authority: &Authority,
    what: &'static str,
    cancel: CancellationToken,
    serve: F,
) -> anyhow::Result<()>
where
    F: Fn(TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "{what} listens on loopback only ({addr} is not): reach it through an SSH tunnel or a reverse proxy"
    );
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))?;
    let tls = authority
        .server_config(
            &ServerName::IpAddress(addr.ip().into()),
            &[b"http/1.1".to_vec()],
        )
        .with_context(|| format!("making the certificate of {what}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let serve = Arc::new(serve);
    tracing::info!(%addr, "{what} listening with TLS");
    // Each handshake on its own task: a slow client never holds up the
    // next one.
    crate::loopback::spawn_accept_loop(listener, what, cancel, move |stream| {
        let acceptor = acceptor.clone();
        let serve = serve.clone();
        async move {
            let handshake = acceptor.accept(stream);
            if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                serve(tls).await;
            }
        }
    });
    Ok(())
}
