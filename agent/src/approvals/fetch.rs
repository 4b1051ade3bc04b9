//! The agent's own outbound HTTP, for the identity provider (discovery,
//! keys) and the webhook: one request per connection, HTTP/1.1 over TCP or
//! TLS (the same trust as the agent's TLS to servers). Small on purpose: a
//! full client would bring its own TLS stack and resolver.
use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Answers over this size are refused: discovery documents and key sets are
/// a few kilobytes.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{url}: {reason}")]
pub struct FetchError {
    pub url: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct Fetcher {
    tls: Arc<ClientConfig>,
}

impl Fetcher {
    pub fn new(tls: Arc<ClientConfig>) -> Fetcher {
        Fetcher { tls }
    }

    /// Sends `request` (an absolute http or https URL) and reads the whole
    /// answer.
    pub async fn send(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, FetchError> {
        let url = request.uri().to_string();
        let fail = |reason: String| FetchError {
            url: url.clone(),
            reason,
        };
        let read = async {
            let (parts, body) = self.open_inner(request).await?.into_parts();
            let bytes = read_body(body, MAX_BODY).await?;
            Ok::<_, String>(http::Response::from_parts(parts, bytes))
        };
        tokio::time::timeout(TIMEOUT, read)
            .await
            .map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))?
            .map_err(fail)
    }

    /// Sends `request` and returns once the answer's head has come: the
    /// body streams (a watch) or is large (a list); the caller reads it,
    /// with [`read_body`] or frame by frame, under timeouts of its own.
    pub async fn open(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Incoming>, FetchError> {
        let url = request.uri().to_string();
        let fail = |reason: String| FetchError {
            url: url.clone(),
            reason,
        };
        tokio::time::timeout(TIMEOUT, self.open_inner(request))
            .await
            .map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))?
            .map_err(fail)
    }

    async fn open_inner(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Incoming>, String> {
        let uri = request.uri().clone();
        let host = uri.host().ok_or("the URL has no host")?.to_string();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(format!("unsupported scheme {other:?}: use http or https")),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host_for_connect = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host_for_connect, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = ServerName::try_from(host_for_connect.to_string())
                .map_err(|e| format!("bad host name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(tls, request, &host, port).await
        } else {
            exchange(tcp, request, &host, port).await
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    request: http::Request<Vec<u8>>,
    host: &str,
    port: u16,
) -> Result<http::Response<Incoming>, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    // Origin form on the wire, with a Host header, as HTTP/1.1 wants.
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    parts.uri = path.parse().map_err(|e| format!("bad path: {e}"))?;
    if !parts.headers.contains_key(http::header::HOST) {
        let value = format!("{host}:{port}")
            .parse()
            .map_err(|e| format!("bad host: {e}"))?;
        parts.headers.insert(http::header::HOST, value);
    }
    sender
        .send_request(http::Request::from_parts(
            parts,
            Full::new(Bytes::from(body)),
        ))
        .await
        .map_err(|e| format!("HTTP: {e}"))
}

/// The whole of an answer's body, refused when over `max` bytes.
pub async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > max {
                return Err(format!("the answer is over {max} bytes"));
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(bytes)
}
