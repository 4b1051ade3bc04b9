//! Credential injection: the agent logs in to the server with the password
//! of the policy's credential, then lets the client in without asking for
//! one. The client was already identified by the kernel (its process, user
//! and cgroup), so the placeholder it holds proves nothing and is never
//! asked for; the real password never reaches it.
//!
//! The agent answers what the server asks: a cleartext password, an MD5
//! hash, or SCRAM-SHA-256 (whose last step checks that the server, too,
//! knows the password). SCRAM with channel binding only (`-PLUS`) needs TLS
//! upstream and is refused with a clear error.
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocols::postgres::{
    Authentication, BackendFramer, BackendMessage, ProtocolError, ScramClient, encode,
};

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(
        "the server refused the login with the credential of target `{target}` as user `{user}`: {message} (SQLSTATE {sqlstate})"
    )]
    Refused {
        target: String,
        user: String,
        sqlstate: String,
        message: String,
    },
    #[error(
        "the server asks for {method} authentication, which the agent cannot answer with a password credential; allow md5, scram-sha-256 or password for user `{user}` in its pg_hba.conf"
    )]
    Unsupported { method: String, user: String },
    #[error("malformed message from the server during login: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server sent {0} before the login was over")]
    Unexpected(&'static str),
    #[error("the server closed the connection during login")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl LoginError {
    /// The SQLSTATE the client is told: the server's own when it refused.
    pub fn sqlstate(&self) -> &str {
        match self {
            LoginError::Refused { sqlstate, .. } => sqlstate,
            // invalid_authorization_specification
            LoginError::Unsupported { .. } => "28000",
            // connection_failure
            _ => "08006",
        }
    }
}

/// What the client must see before its AuthenticationOk: messages the
/// server sent during the login that are meant for it (a protocol version
/// negotiation, notices).
pub struct LoggedIn {
    pub for_client: Vec<u8>,
}

/// Logs in as `user` with `password` on `upstream`, whose StartupMessage
/// has been sent. Reads no further than AuthenticationOk: the messages that
/// follow it (ParameterStatus, BackendKeyData, ReadyForQuery) stay in
/// `framer` for the session.
pub async fn login(
    upstream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    framer: &mut BackendFramer,
    target: &str,
    user: &str,
    password: &str,
    up: &mut u64,
) -> Result<LoggedIn, LoginError> {
    let mut scram: Option<ScramClient> = None;
    let mut for_client = Vec::new();
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        while let Some(frame) = framer.next()? {
            let answer = match BackendMessage::decode(&frame)? {
                BackendMessage::Authentication(Authentication::Ok) => {
                    return Ok(LoggedIn { for_client });
                }
                BackendMessage::Authentication(Authentication::CleartextPassword) => {
                    encode::password_message(password.as_bytes())
                }
                BackendMessage::Authentication(Authentication::Md5Password { salt }) => {
                    let hash = encode::md5_password(user, password.as_bytes(), salt);
                    encode::password_message(hash.as_bytes())
                }
                BackendMessage::Authentication(Authentication::Sasl { mechanisms }) => {
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(LoginError::Unsupported {
                            method: format!("SASL ({})", mechanisms.join(", ")),
                            user: user.to_string(),
                        });
                    }
                    let client = ScramClient::new(password.as_bytes());
                    let message = client.initial_response()?;
                    scram = Some(client);
                    message
                }
                BackendMessage::Authentication(Authentication::SaslContinue { data }) => {
                    let client = scram
                        .as_mut()
                        .ok_or(ProtocolError::Scram("SASLContinue before SASL".into()))?;
                    client.continue_response(&data)?
                }
                BackendMessage::Authentication(Authentication::SaslFinal { data }) => {
                    scram
                        .as_mut()
                        .ok_or(ProtocolError::Scram("SASLFinal before SASL".into()))?
                        .finish(&data)?;
                    continue;
                }
                BackendMessage::Authentication(other) => {
                    return Err(LoginError::Unsupported {
                        method: method_name(&other).to_string(),
                        user: user.to_string(),
                    });
                }
                BackendMessage::ErrorResponse(fields) => {
                    return Err(LoginError::Refused {
                        target: target.to_string(),
                        user: user.to_string(),
                        sqlstate: fields.get(b'C').unwrap_or("28000").to_string(),
                        message: fields.get(b'M').unwrap_or("no message").to_string(),
                    });
                }
                BackendMessage::NegotiationReply(_) | BackendMessage::NoticeResponse(_) => {
                    for_client.extend_from_slice(frame.bytes());
                    continue;
                }
                other => return Err(LoginError::Unexpected(other.name())),
            };
            upstream.write_all(&answer).await?;
            *up += answer.len() as u64;
        }
        let n = upstream.read(&mut buf).await?;
        if n == 0 {
            return Err(LoginError::Closed);
        }
        framer.push(&buf[..n]);
    }
}

fn method_name(auth: &Authentication) -> &'static str {
    match auth {
        Authentication::KerberosV5 => "Kerberos V5",
        Authentication::Gss | Authentication::GssContinue { .. } => "GSSAPI",
        Authentication::Sspi => "SSPI",
        _ => "an unknown",
    }
}
