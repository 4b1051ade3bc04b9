//! TLS interception: the agent ends the client's TLS with a certificate its
//! own CA makes for the name the client asked for, and opens its own TLS to
//! the original destination, verified against the real roots. What comes
//! out is a [`Tunnel`]: plaintext on both sides, for a decoder or the relay.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{
    ClientConfig,
    pki_types::{IpAddr as PkiIpAddr, ServerName},
    server::Acceptor,
};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector, client, server};

use crate::tls::Authority;

/// How long a client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Interceptor {
    authority: Arc<Authority>,
    /// Roots and extra CAs for the agent's upstream TLS; ALPN set per connection.
    upstream: Arc<ClientConfig>,
}

/// Both handshakes done: the client's TLS ended by the agent, the agent's
/// own TLS to the server.
pub struct Tunnel {
    pub client: server::TlsStream<TcpStream>,
    pub upstream: client::TlsStream<TcpStream>,
    /// The name the client asked for (SNI), if it sent one.
    pub server_name: Option<String>,
    /// The application protocol the server chose (ALPN), if any.
    pub alpn: Option<Vec<u8>>,
}

/// A handshake that failed, for the connection's audit row.
pub struct Failed {
    pub server_name: Option<String>,
    pub error: String,
}

impl Interceptor {
    pub fn new(authority: Arc<Authority>, upstream: Arc<ClientConfig>) -> Self {
        Interceptor {
            authority,
            upstream,
        }
    }

    /// The agent's CA, for its own TLS servers (the review page).
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    pub async fn handshake(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        destination: SocketAddr,
    ) -> Result<Tunnel, Failed> {
        // 1. The client's hello: which name, which application protocols.
        let (start, name, offered, outcome) = hello(client, destination).await?;

        // 2. The real server first, with what the client offered: its answer
        //    (certificate, protocol) decides what the client is offered.
        let mut config = (*self.upstream).clone();
        config.alpn_protocols = offered;
        let upstream = match TlsConnector::from(Arc::new(config))
            .connect(name.clone(), upstream)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                return Err(outcome.failed(format!("upstream TLS to {}: {e}", display(&name))));
            }
        };
        let alpn = upstream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let chosen: Vec<Vec<u8>> = alpn.iter().cloned().collect();

        // 3. The client's side, with a certificate for the same name.
        let server_config = match self.authority.server_config(&name, &chosen) {
            Ok(c) => c,
            Err(e) => {
                return Err(
                    outcome.failed(format!("making a certificate for {}: {e}", display(&name)))
                );
            }
        };
        let client = match start.into_stream(server_config).await {
            Ok(s) => s,
            Err(e) => {
                return Err(outcome.failed(format!(
                    "the client refused the agent's certificate for {} ({e}): it may pin certificates or not trust the Warden CA",
                    display(&name)
                )));
            }
        };

        Ok(Tunnel {
            client,
            upstream,
            server_name: outcome.server_name,
            alpn,
        })
    }

    /// Ends a client's TLS that starts inside another protocol (after
    /// PostgreSQL's SSLRequest), on the client's side only: the agent's
    /// certificate for the name the client asked for, or for the
    /// destination's address. `alpn` is chosen if the client offers it.
    /// Returns the stream and the name the client sent (SNI).
    pub async fn accept(
        &self,
        client: TcpStream,
        destination: SocketAddr,
        alpn: &[u8],
    ) -> Result<(server::TlsStream<TcpStream>, Option<String>), Failed> {
        let (start, name, offered, outcome) = hello(client, destination).await?;
        let chosen: Vec<Vec<u8>> = offered.into_iter().filter(|p| p == alpn).collect();
        let server_config = match self.authority.server_config(&name, &chosen) {
            Ok(c) => c,
            Err(e) => {
                return Err(
                    outcome.failed(format!("making a certificate for {}: {e}", display(&name)))
                );
            }
        };
        match start.into_stream(server_config).await {
            Ok(stream) => Ok((stream, outcome.server_name)),
            Err(e) => Err(outcome.failed(format!(
                "the client refused the agent's certificate for {} ({e}): it may not trust the Warden CA",
                display(&name)
            ))),
        }
    }

    /// The agent's TLS to a server whose TLS starts inside its protocol
    /// (PostgreSQL, after `S`), verified as for HTTPS against `name`, else
    /// the destination's address; `alpn` is offered.
    pub async fn connect(
        &self,
        upstream: TcpStream,
        destination: SocketAddr,
        name: Option<&str>,
        alpn: &[u8],
    ) -> Result<client::TlsStream<TcpStream>, String> {
        let name = match name {
            Some(name) => ServerName::try_from(name.to_string())
                .map_err(|e| format!("{name:?} is not a name a certificate can hold: {e}"))?,
            None => ServerName::IpAddress(PkiIpAddr::from(destination.ip())),
        };
        let mut config = (*self.upstream).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsConnector::from(Arc::new(config))
            .connect(name.clone(), upstream)
            .await
            .map_err(|e| format!("TLS to {}: {e}", display(&name)))
    }
}

/// The client's hello: the handshake to go on with, the name to make a
/// certificate for (SNI, else the destination's address), the application
/// protocols offered, and the audit's account of the handshake so far.
async fn hello(
    client: TcpStream,
    destination: SocketAddr,
) -> Result<
    (
        tokio_rustls::StartHandshake<TcpStream>,
        ServerName<'static>,
        Vec<Vec<u8>>,
        Failed,
    ),
    Failed,
> {
    let mut outcome = Failed {
        server_name: None,
        error: String::new(),
    };
    let start = match tokio::time::timeout(
        HELLO_TIMEOUT,
        LazyConfigAcceptor::new(Acceptor::default(), client),
    )
    .await
    {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            return Err(outcome.failed(format!("reading the client's TLS hello: {e}")));
        }
        Err(_) => return Err(outcome.failed("the client sent no TLS hello in time".into())),
    };
    let hello = start.client_hello();
    outcome.server_name = hello.server_name().map(str::to_string);
    let offered: Vec<Vec<u8>> = hello
        .alpn()
        .map(|protos| protos.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    let name = match outcome.server_name.clone().map(ServerName::try_from) {
        Some(Ok(dns)) => dns,
        _ => ServerName::IpAddress(PkiIpAddr::from(destination.ip())),
    };
    Ok((start, name, offered, outcome))
}

impl Failed {
    fn failed(mut self, error: String) -> Self {
        self.error = error;
        self
    }
}

fn display(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}
