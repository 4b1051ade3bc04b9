//! HTTP on the data path, HTTP/1.1 and HTTP/2 (hyper), over intercepted
//! TLS or plaintext: each request is decided on its own, in this order:
//!
//! 1. read: method, host and path; an LLM API call's body is read whole
//!    (bounded by [`MAX_INSPECTED_BODY`]) and decoded (model, prompt...);
//!    a workload token is taken out of its header and verified (a request
//!    with a token that does not verify goes no further);
//! 2. decide: the policy's verdict for this request;
//! 3. redact: prompt DLP, findings replaced (or the request refused)
//!    before anything leaves the host;
//! 4. inject: the real credential in place of the app's placeholder;
//! 5. forward: on the agent's own connection to the original destination;
//! 6. answer: an LLM answer is masked, streams included, chunk by chunk;
//!    every other body passes through as it comes, never buffered whole;
//! 7. log: one `requests` row when the answer's body ends (or is dropped).
//!
//! The client's connection and the upstream connection are paired one to
//! one, as the opaque relay pairs them: the client's keep-alive is the
//! server's, and when the server closes the connection the client's is
//! closed too, after the request in flight.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::{body::Incoming, client::conn as client_conn, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Mutex, oneshot},
};

use super::{io::Counted, relay::Transferred, token::WorkloadTokens};
use crate::{
    approvals::{Approvals, HoldRequest, Ticket},
    audit::{AuditSink, HttpFields, LlmFields, RequestRow},
    identity::Identity,
    lineage::{Exchange as Proposer, HttpTarget, Lineage},
    masking::Masker,
    policy::{
        Action, Credential, CredentialHeader, HttpDecision, HttpRequest, LivePolicy, LlmInfo,
        OnDetect, PresentedToken, PromptAudit,
    },
    protocols::llm::{self, Endpoint, LlmRequest, Provider, StreamMasker},
};

/// The largest LLM request or (non-streamed) answer body the agent reads
/// whole to inspect. A larger request is refused (413): it cannot be
/// checked, so it does not leave the host; a larger answer is refused
/// (502) for the same reason.
pub const MAX_INSPECTED_BODY: usize = 32 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What every request of one connection shares.
pub struct HttpSession {
    pub session_id: String,
    pub identity: Identity,
    pub workload: Option<String>,
    pub destination: SocketAddr,
    /// The TLS name the client asked for, used when a request names no host.
    pub server_name: Option<String>,
    pub audit: AuditSink,
    pub policy: Arc<LivePolicy>,
    pub lineage: Arc<Lineage>,
    /// Where requests a rule holds wait for reviewers.
    pub approvals: Option<Arc<Approvals>>,
    pub workload_tokens: Arc<WorkloadTokens>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP handshake with the server: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("HTTP from the client: {0}")]
    Client(#[source] BoxError),
}

/// Serve the client's requests until either side closes. `upstream_h2`:
/// the server agreed to HTTP/2 (ALPN); the client's side follows what the
/// client speaks.
pub async fn serve<C, U>(
    client: C,
    upstream: U,
    upstream_h2: bool,
    session: HttpSession,
) -> (Transferred, Result<(), HttpError>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let client = Counted::new(client, up.clone());
    let upstream = Counted::new(upstream, down.clone());
    let moved = || Transferred {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    };

    // The upstream connection, driven on its own task; `closed` says when it ends.
    let (closed_tx, closed) = oneshot::channel::<()>();
    let sender = if upstream_h2 {
        match client_conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream)).await {
            Ok((send, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                    let _ = closed_tx.send(());
                });
                Sender::H2(send)
            }
            Err(e) => return (moved(), Err(HttpError::Handshake(e))),
        }
    } else {
        match client_conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok((send, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                    let _ = closed_tx.send(());
                });
                Sender::H1(Mutex::new(send))
            }
            Err(e) => return (moved(), Err(HttpError::Handshake(e))),
        }
    };

    let exchange = Arc::new(Exchange {
        session,
        sender,
        seq: AtomicU64::new(0),
    });
    let service = service_fn(move |req| {
        let exchange = exchange.clone();
        async move { Ok::<_, Infallible>(exchange.handle(req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = closed => {
            // The server is gone: finish what is in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // A client that closes first makes our closing write fail: that is the
    // usual end of a keep-alive connection, not an error.
    let result = result.or_else(|e| match e.downcast_ref::<hyper::Error>() {
        Some(h) if h.is_shutdown() => Ok(()),
        _ => Err(e),
    });
    (moved(), result.map_err(HttpError::Client))
}

enum Sender {
    /// HTTP/1.1 carries one request at a time, as the client's side does.
    H1(Mutex<client_conn::http1::SendRequest<Body>>),
    H2(client_conn::http2::SendRequest<Body>),
}

impl Sender {
    async fn send(&self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(send) => {
                let mut send = send.lock().await;
                send.ready().await?;
                send.send_request(req).await
            }
            Sender::H2(send) => {
                let mut send = send.clone();
                send.ready().await?;
                send.send_request(req).await
            }
        }
    }

    fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

struct Exchange {
    session: HttpSession,
    sender: Sender,
    seq: AtomicU64,
}

/// An LLM API call, decoded.
struct Call {
    provider: Provider,
    endpoint: Endpoint,
    request: Option<LlmRequest>,
}

impl Call {
    /// The prompt's length, for estimating the input tokens of an answer
    /// that reports no usage.
    fn prompt_bytes(&self) -> usize {
        self.request.as_ref().map_or(0, |r| r.prompt.len())
    }
}

impl Exchange {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let s = &self.session;
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_string());
        let host = request_host(&req).or_else(|| s.server_name.clone());
        let mut row = RequestRow {
            session_id: s.session_id.clone(),
            seq,
            start_time: Utc::now(),
            end_time: Utc::now(),
            identity: s.identity.clone(),
            workload: s.workload.clone(),
            destination: s.destination,
            protocol: "http",
            database: None,
            db_user: None,
            statement: None,
            statement_class: None,
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            functions: Vec::new(),
            fingerprint: None,
            rows: None,
            masked: 0,
            decision: "allow",
            rule: String::new(),
            error: None,
            sqlstate: None,
            http: Some(HttpFields {
                method: method.clone(),
                host: host.clone(),
                path: path.clone(),
                status: None,
                ..HttpFields::default()
            }),
            llm: None,
            ssh: None,
            caused_by: None,
            approval_id: None,
        };

        // 1. read
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let mut call = None;
        let mut body = match llm::recognise(&method, &path) {
            None => Some(body.map_err(BoxError::from).boxed()),
            Some((provider, endpoint)) => {
                row.protocol = "llm";
                row.llm = Some(LlmFields {
                    provider: provider.as_str(),
                    endpoint: endpoint.as_str(),
                    ..LlmFields::default()
                });
                let bytes = match Limited::new(body, MAX_INSPECTED_BODY).collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(e) => {
                        let (status, message) = if e.is::<http_body_util::LengthLimitError>() {
                            (
                                StatusCode::PAYLOAD_TOO_LARGE,
                                format!(
                                    "the request body is over {} MiB, the most Warden inspects: it was not sent",
                                    MAX_INSPECTED_BODY >> 20
                                ),
                            )
                        } else {
                            (
                                StatusCode::BAD_REQUEST,
                                format!("reading the request body: {e}"),
                            )
                        };
                        row.rule = "inspection".into();
                        return self.refuse(row, Some(provider), status, &message);
                    }
                };
                let request = llm::parse_request(provider, endpoint, &bytes).ok();
                call = Some(Call {
                    provider,
                    endpoint,
                    request,
                });
                parts.extensions.insert(InspectedBody(bytes));
                None
            }
        };

        // A request to a URL an LLM answer carried (an LLM call itself is
        // the exchange, not its product).
        if call.is_none()
            && let Some(host) = host.as_deref()
        {
            row.caused_by = s.lineage.claim_http(
                s.identity.cgroup_id,
                &HttpTarget {
                    host,
                    port: s.destination.port(),
                    path_and_query: &path_and_query,
                },
            );
        }

        // A workload token adds to who asked; its header never goes on.
        let provider = call.as_ref().map(|c| c.provider);
        let policy = s.policy.current();
        let token = match policy.workload_tokens() {
            None => None,
            Some(settings) => match s.workload_tokens.take(settings, &mut parts.headers).await {
                None => None,
                Some(Ok(token)) => Some(token),
                Some(Err(reason)) => {
                    row.rule = TOKEN_RULE.into();
                    return self.refuse(row, provider, StatusCode::UNAUTHORIZED, &reason);
                }
            },
        };
        if let (Some(fields), Some(token)) = (row.http.as_mut(), &token) {
            fields.token_issuer = Some(token.issuer.clone());
            fields.token_subject = Some(token.subject.clone());
        }

        // 2. decide
        let decision = policy.decide_http(&HttpRequest {
            identity: &s.identity,
            destination: s.destination,
            host: host.as_deref(),
            method: &method,
            path: &path,
            llm: call.as_ref().map(|c| LlmInfo {
                provider: c.provider.as_str(),
                endpoint: c.endpoint.as_str(),
                model: c.request.as_ref().and_then(|r| r.model.as_deref()),
                max_tokens: c.request.as_ref().and_then(|r| r.max_tokens),
                stream: c.request.as_ref().is_some_and(|r| r.stream),
            }),
            from_llm: row.caused_by.is_some(),
            token: token.as_ref().map(|t| PresentedToken {
                issuer: &t.issuer,
                subject: &t.subject,
            }),
        });
        row.rule = decision.rule.clone();
        if let (Some(fields), Some(req)) = (
            row.llm.as_mut(),
            call.as_ref().and_then(|c| c.request.as_ref()),
        ) {
            fields.model = req.model.clone();
            fields.stream = req.stream;
        }
        if decision.action == Action::Deny {
            let reason = decision
                .reason
                .clone()
                .unwrap_or_else(|| format!("denied by rule {:?}", decision.rule));
            return self.refuse(row, provider, StatusCode::FORBIDDEN, &reason);
        }
        // A workload whose daily token budget is spent: refused before it
        // leaves the host (and before reviewers are asked).
        if let (Some(provider), Some(workload)) = (provider, row.workload.as_deref())
            && let Some(budget) = policy.budget_of(workload)
            && let Err(over) = s.audit.tokens().check(budget, provider.as_str()).await
        {
            row.rule = budget.audit_rule();
            return self.refuse_over_budget(row, provider, &over.message(budget));
        }
        drop(policy);
        // Held: the client's request waits (its connection open) for reviewers.
        let ticket = match &decision.approval {
            Some(rule) if decision.action == Action::Approve => {
                // The path without its query, as the audit keeps it.
                let request = format!("{method} {}{path}", host.as_deref().unwrap_or_default());
                // Reviewers see who the workload token says asked, next to
                // the process.
                let context = token
                    .iter()
                    .flat_map(|t| {
                        [
                            ("token_issuer", t.issuer.clone()),
                            ("token_subject", t.subject.clone()),
                        ]
                    })
                    .collect();
                match hold(
                    s,
                    rule,
                    &decision.rule,
                    request,
                    context,
                    row.caused_by.clone(),
                )
                .await
                {
                    Ok(ticket) => {
                        row.approval_id = Some(ticket.id().to_string());
                        Some(ticket)
                    }
                    Err((id, reason)) => {
                        row.approval_id = id;
                        return self.refuse(row, provider, StatusCode::FORBIDDEN, &reason);
                    }
                }
            }
            _ => None,
        };

        // 3. redact
        if let Some(call) = &call {
            let inspected = parts
                .extensions
                .remove::<InspectedBody>()
                .map(|b| b.0)
                .unwrap_or_default();
            let sent = match self.redact(call, inspected, &decision, &mut row) {
                Ok(sent) => sent,
                Err(reason) => {
                    return self.refuse(row, provider, StatusCode::FORBIDDEN, &reason);
                }
            };
            parts.headers.remove(header::CONTENT_LENGTH);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(sent.len()));
            body = Some(
                Full::new(sent)
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            );
        }

        // 4. inject
        if let Some(credential) = &decision.credential {
            inject(&mut parts.headers, credential, provider);
        }
        let mask_json = call.is_none() && !upgrade && decision.mask_any_json;
        if mask_json {
            // The answer is read to be masked: it must come uncompressed.
            parts.headers.remove(header::ACCEPT_ENCODING);
        }

        // 5. forward
        let req = match self.upstream_request(parts, body.take().unwrap_or_else(empty), upgrade) {
            Ok(r) => r,
            Err(message) => return self.refuse(row, provider, StatusCode::BAD_REQUEST, &message),
        };
        let mut resp = match self.sender.send(req).await {
            Ok(r) => {
                if let Some(ticket) = ticket {
                    ticket.executed();
                }
                r
            }
            Err(e) => {
                let message = format!("the server did not answer: {e}");
                let mut resp = self.refuse(row, provider, StatusCode::BAD_GATEWAY, &message);
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
        if let Some(fields) = row.http.as_mut() {
            fields.status = Some(resp.status().as_u16());
        }

        // 6. answer
        let stream = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        match call {
            Some(call) if stream => {
                let masker =
                    StreamMasker::new(call.provider, call.endpoint, decision.mask_response.clone());
                resp.headers_mut().remove(header::CONTENT_LENGTH);
                let (parts, body) = resp.into_parts();
                let body = MaskedStream {
                    inner: body,
                    masker,
                    prompt_bytes: call.prompt_bytes(),
                    flushed: false,
                    lineage: s.lineage.clone(),
                    log: Some(Log {
                        row,
                        audit: s.audit.clone(),
                    }),
                };
                Response::from_parts(parts, body.boxed())
            }
            Some(call) => {
                let (mut parts, body) = resp.into_parts();
                let bytes = match Limited::new(body, MAX_INSPECTED_BODY).collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        let message = format!("reading the server's answer: {e}");
                        return self.refuse(row, provider, StatusCode::BAD_GATEWAY, &message);
                    }
                };
                let bytes = self.mask_answer(&call, bytes, &decision, &mut row);
                parts.headers.remove(header::CONTENT_LENGTH);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                row.end_time = Utc::now();
                s.audit.tokens().spend(&row, call.prompt_bytes());
                s.audit.record_request(row);
                Response::from_parts(parts, full(bytes))
            }
            None if mask_json && is_json(resp.headers()) => {
                let (mut parts, body) = resp.into_parts();
                if parts
                    .headers
                    .get(header::CONTENT_ENCODING)
                    .is_some_and(|e| e.as_bytes() != b"identity")
                {
                    let message = "the server compressed an answer that the policy masks; Warden \
                                   asked for it uncompressed and does not pass on what it cannot read";
                    return self.refuse(row, None, StatusCode::BAD_GATEWAY, message);
                }
                let bytes = match Limited::new(body, MAX_INSPECTED_BODY).collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        let message = format!(
                            "reading the server's answer, which the policy masks (at most {} MiB): {e}",
                            MAX_INSPECTED_BODY >> 20
                        );
                        return self.refuse(row, None, StatusCode::BAD_GATEWAY, &message);
                    }
                };
                let bytes = match &decision.mask_response {
                    Some(masker) => mask_json_body(masker, bytes, &mut row),
                    None => bytes,
                };
                parts.headers.remove(header::CONTENT_LENGTH);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                row.end_time = Utc::now();
                s.audit.record_request(row);
                Response::from_parts(parts, full(bytes))
            }
            None => {
                if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let server_upgrade = hyper::upgrade::on(&mut resp);
                    if let Some(client_upgrade) = client_upgrade {
                        tokio::spawn(splice_upgraded(client_upgrade, server_upgrade));
                    }
                }
                let (parts, body) = resp.into_parts();
                let body = Logged {
                    inner: body,
                    log: Some(Log {
                        row,
                        audit: s.audit.clone(),
                    }),
                };
                Response::from_parts(parts, body.boxed())
            }
        }
    }

    /// Prompt DLP on an LLM request's body: the bytes to send, or why the
    /// request must not leave the host.
    fn redact(
        &self,
        call: &Call,
        body: Bytes,
        decision: &HttpDecision,
        row: &mut RequestRow,
    ) -> Result<Bytes, String> {
        let mut request = call.request.clone();
        let mut sent = body;
        if let Some(redact) = &decision.redact {
            let found =
                match llm::redact_request(call.provider, call.endpoint, &sent, &redact.masker) {
                    Ok(found) => found,
                    // Not the JSON the API takes: the server will refuse it, but
                    // what it says must still not leave the host unchecked.
                    Err(_) => match std::str::from_utf8(&sent) {
                        Ok(text) => match redact.masker.mask_text(text) {
                            (Cow::Owned(masked), n) => Some((masked.into_bytes(), n)),
                            _ => None,
                        },
                        Err(_) => None,
                    },
                };
            if let Some((redacted, count)) = found {
                if redact.on_detect == OnDetect::Deny {
                    return Err(format!(
                        "the request carries {count} sensitive value(s) that rule {:?} does not let leave the host",
                        decision.rule
                    ));
                }
                if let Some(fields) = row.llm.as_mut() {
                    fields.redacted = u64::from(count);
                }
                sent = Bytes::from(redacted);
                request = llm::parse_request(call.provider, call.endpoint, &sent).ok();
            }
        }
        if let (Some(fields), Some(request)) = (row.llm.as_mut(), request) {
            match decision.prompts {
                PromptAudit::Full => {
                    fields.prompt_sha256 = Some(sha256_hex(&request.prompt));
                    fields.prompt = Some(request.prompt);
                }
                PromptAudit::Digest => fields.prompt_sha256 = Some(sha256_hex(&request.prompt)),
                PromptAudit::None => {}
            }
        }
        Ok(sent)
    }

    /// A whole (not streamed) LLM answer: masked, and decoded for the audit.
    fn mask_answer(
        &self,
        call: &Call,
        bytes: Bytes,
        decision: &HttpDecision,
        row: &mut RequestRow,
    ) -> Bytes {
        let mut out = bytes;
        if let Some(masker) = &decision.mask_response
            && let Ok(Some((masked, count))) =
                llm::mask_response(call.provider, call.endpoint, &out, masker)
        {
            row.masked = u64::from(count);
            out = Bytes::from(masked);
        }
        if let (Some(fields), Ok(answer)) = (
            row.llm.as_mut(),
            llm::parse_response(call.provider, call.endpoint, &out),
        ) {
            fill_answer(fields, &answer);
            self.propose(row, &answer);
        }
        out
    }

    /// What the answer proposes (SQL in tool calls or text), for the
    /// statements the app sends next.
    fn propose(&self, row: &RequestRow, answer: &llm::LlmResponse) {
        propose(&self.session.lineage, row, answer);
    }

    /// The request as the server gets it: hop-by-hop headers dropped, the
    /// URI in the form the upstream protocol wants.
    fn upstream_request(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        upgrade: bool,
    ) -> Result<Request<Body>, String> {
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .or_else(|| self.session.server_name.clone());
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if self.sender.is_h2() {
            let authority = authority.ok_or("the request names no host")?;
            parts.uri = Uri::builder()
                .scheme("https")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
                .map_err(|e| format!("the request's target: {e}"))?;
            parts.version = http::Version::HTTP_2;
        } else {
            if !parts.headers.contains_key(header::HOST)
                && let Some(authority) = &authority
            {
                let value = HeaderValue::from_str(authority)
                    .map_err(|e| format!("the request's host: {e}"))?;
                parts.headers.insert(header::HOST, value);
            }
            parts.uri = path
                .parse()
                .map_err(|e| format!("the request's target: {e}"))?;
            parts.version = http::Version::HTTP_11;
        }
        Ok(Request::from_parts(parts, body))
    }

    /// The agent's own answer: the provider's error shape for an LLM call
    /// (so the SDK raises a readable error), the same JSON shape otherwise.
    fn refuse(
        &self,
        mut row: RequestRow,
        provider: Option<Provider>,
        status: StatusCode,
        message: &str,
    ) -> Response<Body> {
        if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
            row.decision = "deny";
        }
        let body = llm::error_body(provider.unwrap_or(Provider::OpenAi), message);
        self.answer_refusal(row, status, message, body)
    }

    /// A refusal because the workload's daily token budget is spent: 429,
    /// the provider's rate-limit shape, and `x-should-retry: false`, which
    /// the openai and anthropic SDKs obey instead of retrying a 429 (no
    /// retry can succeed before the budget resets).
    fn refuse_over_budget(
        &self,
        mut row: RequestRow,
        provider: Provider,
        message: &str,
    ) -> Response<Body> {
        row.decision = "deny";
        let body = llm::budget_error_body(provider, message);
        let mut resp = self.answer_refusal(row, StatusCode::TOO_MANY_REQUESTS, message, body);
        resp.headers_mut()
            .insert("x-should-retry", HeaderValue::from_static("false"));
        resp
    }

    /// Audits a refused request and answers it with `body`.
    fn answer_refusal(
        &self,
        mut row: RequestRow,
        status: StatusCode,
        message: &str,
        body: Vec<u8>,
    ) -> Response<Body> {
        if let Some(fields) = row.http.as_mut() {
            fields.status = Some(status.as_u16());
        }
        row.error = Some(message.to_string());
        row.end_time = Utc::now();
        let rule = row.rule.clone();
        self.session.audit.record_request(row);
        let mut resp = Response::new(full(Bytes::from(body)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(rule) = HeaderValue::from_str(&rule) {
            headers.insert("x-warden-rule", rule);
        }
        resp
    }
}

/// The rule a request refused for its workload token is audited under.
const TOKEN_RULE: &str = "workload_tokens";

/// The LLM request body, read whole for inspection, carried from step 1 to 3.
#[derive(Clone)]
struct InspectedBody(Bytes);

/// Holds a request until reviewers decide: the ticket of an approved one,
/// else the approval's id (if one was made) and why the request does not
/// run.
async fn hold(
    s: &HttpSession,
    rule: &Arc<crate::policy::ApprovalRule>,
    rule_name: &str,
    request: String,
    context: BTreeMap<&'static str, String>,
    caused_by: Option<crate::lineage::Link>,
) -> Result<Ticket, (Option<String>, String)> {
    let Some(approvals) = &s.approvals else {
        return Err((
            None,
            format!("held by rule {rule_name:?} for approval, and this agent serves no approvals"),
        ));
    };
    let mut ticket = approvals.submit(HoldRequest {
        session_id: s.session_id.clone(),
        protocol: "http",
        identity: s.identity.clone(),
        workload: s.workload.clone(),
        destination: s.destination,
        rule: rule_name.to_string(),
        request,
        context,
        caused_by,
        approval: rule.clone(),
    });
    let resolution = ticket.wait().await;
    let id = ticket.id().to_string();
    match resolution.refusal(&id) {
        None => Ok(ticket),
        Some(why) => Err((Some(id), format!("held by rule {rule_name:?} and {why}"))),
    }
}

fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.uri().host().map(str::to_string).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| {
                h.parse::<http::uri::Authority>()
                    .map_or(h.to_string(), |a| a.host().to_string())
            })
    })?;
    let host = raw.trim_start_matches('[').trim_end_matches(']');
    Some(host.to_ascii_lowercase())
}

/// `application/json` or a `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase())
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"))
}

/// A JSON answer with the mask's fields and detector findings masked; an
/// answer that is not JSON after all is scanned as text.
fn mask_json_body(masker: &Masker, bytes: Bytes, row: &mut RequestRow) -> Bytes {
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        let masked = masker.mask_json(&mut value);
        row.masked += u64::from(masked);
        return match serde_json::to_vec(&value) {
            Ok(out) if masked > 0 => Bytes::from(out),
            _ => bytes,
        };
    }
    match std::str::from_utf8(&bytes).map(|text| masker.mask_text(text)) {
        Ok((Cow::Owned(text), n)) => {
            row.masked += u64::from(n);
            Bytes::from(text)
        }
        _ => bytes,
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Connection-scoped headers belong to one hop; an upgrade keeps the two
/// that ask for it.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !(t.is_empty() || upgrade && t == "upgrade"))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The real secret in place of whatever the app sent: `x-api-key` for the
/// Anthropic API (or when the policy says so), `Authorization: Bearer`
/// otherwise. The app's own value of the other header is dropped too, so
/// that a placeholder never reaches the server.
fn inject(headers: &mut HeaderMap, credential: &Credential, provider: Option<Provider>) {
    let header = credential.header().unwrap_or(match provider {
        Some(Provider::Anthropic) => CredentialHeader::XApiKey,
        _ => CredentialHeader::Authorization,
    });
    let (name, value) = match header {
        CredentialHeader::Authorization => (
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", credential.secret)),
        ),
        CredentialHeader::XApiKey => (
            http::HeaderName::from_static("x-api-key"),
            HeaderValue::from_str(&credential.secret),
        ),
    };
    headers.remove(header::AUTHORIZATION);
    headers.remove("x-api-key");
    if let Ok(mut value) = value {
        value.set_sensitive(true);
        headers.insert(name, value);
    }
}

fn fill_answer(fields: &mut LlmFields, answer: &llm::LlmResponse) {
    if answer.model.is_some() {
        fields.model.clone_from(&answer.model);
    }
    fields.response = (!answer.text.is_empty()).then(|| answer.text.clone());
    fields.tool_calls = answer
        .tool_calls
        .iter()
        .map(|c| serde_json::json!({ "name": c.name, "arguments": c.arguments }).to_string())
        .collect();
    fields.input_tokens = answer.input_tokens;
    fields.output_tokens = answer.output_tokens;
}

fn propose(lineage: &Lineage, row: &RequestRow, answer: &llm::LlmResponse) {
    let exchange = Proposer {
        session_id: row.session_id.clone(),
        seq: row.seq,
    };
    lineage.record_answer(row.identity.cgroup_id, &exchange, answer);
}

fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// Both sides of an upgraded connection (WebSocket...), relayed as bytes.
async fn splice_upgraded(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(server)) = tokio::join!(client, server) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut server = TokioIo::new(server);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// The row of a request whose answer is still streaming, written once
/// when the body ends or is dropped.
struct Log {
    row: RequestRow,
    audit: AuditSink,
}

impl Log {
    fn write(mut self, error: Option<String>) {
        self.row.end_time = Utc::now();
        if self.row.error.is_none() {
            self.row.error = error;
        }
        self.audit.record_request(self.row);
    }
}

/// A body passed through as it comes, logged when it ends.
struct Logged {
    inner: Incoming,
    log: Option<Log>,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &polled {
            None => {
                if let Some(log) = self.log.take() {
                    log.write(None);
                }
            }
            Some(Err(e)) => {
                if let Some(log) = self.log.take() {
                    log.write(Some(format!("the server's body: {e}")));
                }
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(polled.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.write(Some("the client left before the end of the answer".into()));
        }
    }
}

/// A streamed (SSE) LLM answer, masked chunk by chunk.
struct MaskedStream {
    inner: Incoming,
    masker: StreamMasker,
    /// For the estimate of the input tokens when the stream reports none.
    prompt_bytes: usize,
    flushed: bool,
    lineage: Arc<Lineage>,
    log: Option<Log>,
}

impl MaskedStream {
    fn finish_log(&mut self, error: Option<String>) {
        if let Some(mut log) = self.log.take() {
            log.row.masked = self.masker.masked();
            if let Some(fields) = log.row.llm.as_mut() {
                fill_answer(fields, self.masker.response());
            }
            propose(&self.lineage, &log.row, self.masker.response());
            // What the stream carried counts, also when the app left early.
            log.audit.tokens().spend(&log.row, self.prompt_bytes);
            log.write(error);
        }
    }
}

impl HttpBody for MaskedStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.flushed {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.masker.feed(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => {
                    this.finish_log(Some(format!("the server's stream: {e}")));
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    this.flushed = true;
                    let out = this.masker.finish();
                    this.finish_log(None);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }
}

impl Drop for MaskedStream {
    fn drop(&mut self) {
        self.finish_log(Some("the client left before the end of the stream".into()));
    }
}
