//! The control API: JSON over HTTP/1.1 on a unix socket that only root can
//! open (mode 0600). `warden approvals`, `warden status` and `warden policy
//! reload` are its clients.
//!
//! - `GET /v1/status`: what the agent manages and what is wrong;
//! - `POST /v1/policy/reload`: reread the policy file;
//! - `GET /v1/trust`: what a program must trust to talk through the agent
//!   (its CA, its SSH host keys), for `warden run`;
//! - `POST /v1/runs` with `{"cgroup": ..., "reason": ...}`: manage the
//!   cgroup `warden run` made for its program; `POST /v1/runs/release`
//!   with `{"cgroup": ...}` when the program is gone;
//! - `GET /v1/approvals`: the requests waiting;
//! - `GET /v1/approvals/{id}`: one of them, with all its context;
//! - `POST /v1/approvals/{id}/approve`: approve, as the reviewer whose
//!   OIDC ID token is in `Authorization: Bearer ...`;
//! - `POST /v1/approvals/{id}/reject` with `{"reason": "..."}`: reject.
//!
//! Errors are `{"error": "..."}` with a status that says whose fault it
//! is: 401 for a token that does not verify, 403 for a reviewer who may not
//! decide, 404 for a request that no longer waits.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{Approvals, ReviewError, serve_loopback_tls};
use crate::tls::Authority;

/// Where the agent listens, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/warden/control.sock";

const SIGN_IN: &str = "sign in first: send your OIDC ID token as `Authorization: Bearer <token>` \
     (`warden approvals` reads it from --id-token-file or WARDEN_ID_TOKEN)";

/// Request bodies are a reason at most.
const MAX_BODY: usize = 64 * 1024;

/// Binds the socket, root only. A socket file left by an agent that died is
/// replaced; one a live agent listens on is an error.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for the control socket", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another agent serves the control socket {}; stop it, or give this one another path with --control-socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root only", path.display()))?;
    Ok(listener)
}

/// The agent's own operations, for the socket.
pub trait Operations: Send + Sync {
    fn status(&self) -> serde_json::Value;
    /// The new policy's summary, or why the old one stays in force.
    fn reload_policy(&self) -> Result<String, String>;
    fn trust(&self) -> serde_json::Value;
    fn attach_run(&self, cgroup: &Path, reason: &str) -> Result<(), String>;
    fn release_run(&self, cgroup: &Path) -> Result<(), String>;
}

/// What the socket serves: approvals when the policy holds requests for
/// review, the agent's operations when it is a daemon.
#[derive(Clone)]
pub struct Services {
    pub approvals: Option<Arc<Approvals>>,
    pub operations: Option<Arc<dyn Operations>>,
}

/// Who reaches the API, and so what needs a token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The root-only socket: reading needs no token, deciding does.
    Socket,
    /// The TLS port: every call needs a reviewer's ID token.
    Network,
}

/// Serves until `cancel`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    services: Services,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "control socket accept failed");
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, services.clone(), Access::Socket));
    }
    let _ = std::fs::remove_file(&path);
}

/// The same API on a loopback TCP port with TLS (the agent's CA), for
/// tools that cannot reach the socket; every call needs a token there.
pub async fn serve_tls(
    addr: SocketAddr,
    authority: &Authority,
    approvals: Arc<Approvals>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // Over the network: approvals only, never the agent's operations.
    let services = Services {
        approvals: Some(approvals),
        operations: None,
    };
    serve_loopback_tls(addr, authority, "the control API", cancel, move |tls| {
        serve_connection(tls, services.clone(), Access::Network)
    })
    .await
}

async fn serve_connection<S>(io: S, services: Services, access: Access)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let services = services.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, services, access).await) }
    });
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(%error, "control connection ended with an error");
    }
}

enum Route {
    Status,
    Reload,
    Trust,
    AttachRun,
    ReleaseRun,
    List,
    Show(String),
    Approve(String),
    Reject(String),
    Unknown,
}

fn route<B>(req: &Request<B>) -> Route {
    let parts: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Route::Status,
        (&Method::POST, ["v1", "policy", "reload"]) => Route::Reload,
        (&Method::GET, ["v1", "trust"]) => Route::Trust,
        (&Method::POST, ["v1", "runs"]) => Route::AttachRun,
        (&Method::POST, ["v1", "runs", "release"]) => Route::ReleaseRun,
        (&Method::GET, ["v1", "approvals"]) => Route::List,
        (&Method::GET, ["v1", "approvals", id]) => Route::Show(id.to_string()),
        (&Method::POST, ["v1", "approvals", id, "approve"]) => Route::Approve(id.to_string()),
        (&Method::POST, ["v1", "approvals", id, "reject"]) => Route::Reject(id.to_string()),
        _ => Route::Unknown,
    }
}

const NO_APPROVALS: &str =
    "this agent holds nothing for approval: its policy has no `approvals:` section";

async fn handle(
    req: Request<Incoming>,
    services: Services,
    access: Access,
) -> Response<Full<Bytes>> {
    let route = route(&req);
    let operation = matches!(
        route,
        Route::Status | Route::Reload | Route::Trust | Route::AttachRun | Route::ReleaseRun
    );
    if operation {
        let Some(ops) = services.operations else {
            return error(
                StatusCode::NOT_FOUND,
                "this endpoint is the daemon's: `warden run` agents serve approvals only",
            );
        };
        return operate(route, req, ops.as_ref()).await;
    }
    let Some(approvals) = services.approvals else {
        return error(StatusCode::NOT_FOUND, NO_APPROVALS);
    };
    let token = bearer(&req);
    // Over the network, reading what waits is for signed-in people only.
    if access == Access::Network && matches!(route, Route::List | Route::Show(_)) {
        let Some(token) = &token else {
            return error(StatusCode::UNAUTHORIZED, SIGN_IN);
        };
        if let Err(e) = approvals.verifier().verify(token).await {
            return failure(&ReviewError::Token(e));
        }
    }
    match route {
        Route::List => json(StatusCode::OK, &approvals.list()),
        Route::Show(id) => match approvals.get(&id) {
            Some(pending) => json(StatusCode::OK, &pending),
            None => failure(&ReviewError::NotFound(id)),
        },
        Route::Approve(id) | Route::Reject(id) if token.is_none() => {
            let _ = id;
            error(StatusCode::UNAUTHORIZED, SIGN_IN)
        }
        Route::Approve(id) => {
            let token = token.unwrap_or_default();
            match approvals.approve(&id, &token).await {
                Ok(progress) => json(StatusCode::OK, &progress),
                Err(e) => failure(&e),
            }
        }
        Route::Reject(id) => {
            let token = token.unwrap_or_default();
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return error(StatusCode::BAD_REQUEST, "the body is too large"),
            };
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("reason")?.as_str().map(str::to_string))
                .unwrap_or_default();
            match approvals.reject(&id, &token, &reason).await {
                Ok(progress) => json(StatusCode::OK, &progress),
                Err(e) => failure(&e),
            }
        }
        Route::Status
        | Route::Reload
        | Route::Trust
        | Route::AttachRun
        | Route::ReleaseRun
        | Route::Unknown => error(
            StatusCode::NOT_FOUND,
            "no such endpoint: GET /v1/status, POST /v1/policy/reload, GET /v1/approvals, GET /v1/approvals/{id}, POST /v1/approvals/{id}/approve, POST /v1/approvals/{id}/reject",
        ),
    }
}

async fn operate(
    route: Route,
    req: Request<Incoming>,
    ops: &dyn Operations,
) -> Response<Full<Bytes>> {
    let done = |result: Result<(), String>| match result {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({})),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
    };
    match route {
        Route::Status => json(StatusCode::OK, &ops.status()),
        Route::Trust => json(StatusCode::OK, &ops.trust()),
        Route::Reload => match ops.reload_policy() {
            Ok(summary) => json(StatusCode::OK, &serde_json::json!({ "policy": summary })),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
        },
        Route::AttachRun | Route::ReleaseRun => {
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let Some(cgroup) = body.get("cgroup").and_then(|c| c.as_str()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give the cgroup: {\"cgroup\": \"/sys/fs/cgroup/warden/run-123\"}",
                );
            };
            let cgroup = Path::new(cgroup);
            if matches!(route, Route::AttachRun) {
                let reason = body
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or("warden run");
                done(ops.attach_run(cgroup, reason))
            } else {
                done(ops.release_run(cgroup))
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// A small JSON body, or the answer that says what is wrong with it.
async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, Response<Full<Bytes>>> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| error(StatusCode::BAD_REQUEST, "the body is too large"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not JSON: {e}"),
        )
    })
}

fn bearer<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn failure(e: &ReviewError) -> Response<Full<Bytes>> {
    let status = match e {
        ReviewError::NotFound(_) => StatusCode::NOT_FOUND,
        ReviewError::Token(_) => StatusCode::UNAUTHORIZED,
        ReviewError::Refused(_) => StatusCode::FORBIDDEN,
        ReviewError::NoReason => StatusCode::BAD_REQUEST,
    };
    error(status, &e.to_string())
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("a static status and header")
}

/// The client side, for `warden approvals`.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    /// One call; `Ok` carries the status and the JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach the agent's control socket {} (is `warden daemon`, or an agent with an `approvals:` policy, running? are you root? pass --socket)",
                self.socket.display()
            )
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "warden")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let answer = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await
            .context("the control API did not answer")?;
        let status = answer.status();
        let bytes = answer.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }

    /// [`Client::call`], with an answer that is not a success turned into
    /// an error that gives the agent's reason.
    pub async fn call_ok(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, answer) = self.call(method, path, token, body).await?;
        if !status.is_success() {
            let why = answer["error"].as_str().unwrap_or("the agent refused");
            anyhow::bail!("{why}");
        }
        Ok(answer)
    }
}
