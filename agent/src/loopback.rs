//! The accept loop of the agent's own loopback endpoints (metrics, the
//! review page, the control API's TLS port): each connection on a task of
//! its own, until the agent stops.
use std::{future::Future, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// After a failed accept (out of descriptors, most often): a pause, so
/// the loop does not spin while nothing can be accepted.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Hands each connection `listener` accepts to `handle` on a task of its
/// own until `cancel`; `what` names the endpoint in the log.
pub fn spawn_accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    cancel: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "{what}: accept failed");
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                        continue;
                    }
                },
            };
            tokio::spawn(handle(stream));
        }
    });
}
