//! The reviewers' web page: HTTPS on a loopback address with a certificate
//! of the agent's CA, sign-in through the identity provider (authorization
//! code flow with PKCE), the pending list, one request's context, approve
//! or reject with a reason. Plain server-rendered HTML, usable with a
//! keyboard; nothing of a request is shown to someone not signed in.
//!
//! Decisions go through [`Approvals`] with the reviewer's own ID token, so
//! the page grants nothing the control API would refuse.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use openidconnect::url::form_urlencoded;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Approvals, Pending, Progress,
    oidc::{Reviewer, SignIn},
    serve_loopback_tls,
};
use crate::tls::Authority;

const COOKIE: &str = "warden_review";
/// A signed-in session lasts this long (the ID token may expire sooner:
/// then decisions are refused and the reviewer signs in again).
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// A sign-in must come back from the provider within this.
const SIGN_IN_TTL: Duration = Duration::from_secs(600);
const MAX_FORM: usize = 16 * 1024;

struct Session {
    token: String,
    reviewer: Reviewer,
    csrf: String,
    since: Instant,
    /// What the last decision did, shown once: (is an error, message).
    flash: Option<(bool, String)>,
}

struct Page {
    approvals: Arc<Approvals>,
    origin: String,
    sessions: Mutex<HashMap<String, Session>>,
    sign_ins: Mutex<HashMap<String, (SignIn, Instant)>>,
}

/// Binds `addr` (loopback only) and serves until `cancel`.
pub async fn start(
    addr: SocketAddr,
    authority: &Authority,
    approvals: Arc<Approvals>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let page = Arc::new(Page {
        approvals,
        origin: format!("https://{addr}"),
        sessions: Mutex::default(),
        sign_ins: Mutex::default(),
    });
    serve_loopback_tls(addr, authority, "the review page", cancel, move |tls| {
        let page = page.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let page = page.clone();
                async move { Ok::<_, std::convert::Infallible>(page.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await
}

type Answer = Response<Full<Bytes>>;

impl Page {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Answer {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        // An encoded path cannot smuggle another route in: ids are UUIDs.
        let session = self.session_of(&req);
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/login") => self.login().await,
            (Method::GET, "/callback") => self.callback(&query).await,
            (Method::GET, "/") => match session {
                Some((id, reviewer, csrf)) => {
                    let flash = lock(&self.sessions)
                        .get_mut(&id)
                        .and_then(|s| s.flash.take());
                    self.list(&reviewer, &csrf, flash)
                }
                None => signed_out(),
            },
            (Method::GET, p) if p.starts_with("/approvals/") => match session {
                Some((id, reviewer, csrf)) => {
                    self.show(&id, &p["/approvals/".len()..], &reviewer, &csrf)
                }
                None => redirect("/"),
            },
            (Method::POST, "/logout") => {
                if let Some((id, _, csrf)) = session {
                    let form = read_form(req).await;
                    if form.get("csrf") == Some(&csrf) {
                        lock(&self.sessions).remove(&id);
                    }
                }
                let mut answer = redirect("/");
                answer.headers_mut().insert(
                    header::SET_COOKIE,
                    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax")
                        .parse()
                        .expect("a static cookie"),
                );
                answer
            }
            (Method::POST, p) if p.starts_with("/approvals/") => {
                let Some((id, _, csrf)) = session else {
                    return redirect("/");
                };
                let form = read_form(req).await;
                if form.get("csrf") != Some(&csrf) {
                    return error_page(StatusCode::FORBIDDEN, "the form is stale: reload the page");
                }
                self.decide(&id, &p["/approvals/".len()..], &form).await
            }
            _ => error_page(StatusCode::NOT_FOUND, "no such page"),
        }
    }

    /// The session the request's cookie names: its id, reviewer, CSRF token.
    fn session_of<B>(&self, req: &Request<B>) -> Option<(String, Reviewer, String)> {
        let id = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value.to_string())?;
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| s.since.elapsed() < SESSION_TTL);
        sessions
            .get(&id)
            .map(|s| (id.clone(), s.reviewer.clone(), s.csrf.clone()))
    }

    async fn login(&self) -> Answer {
        let redirect_uri = format!("{}/callback", self.origin);
        match self.approvals.verifier().sign_in(&redirect_uri).await {
            Ok((url, sign_in)) => {
                let mut pending = lock(&self.sign_ins);
                pending.retain(|_, (_, at)| at.elapsed() < SIGN_IN_TTL);
                pending.insert(sign_in.state.clone(), (sign_in, Instant::now()));
                redirect(&url)
            }
            Err(e) => error_page(StatusCode::BAD_GATEWAY, &e.to_string()),
        }
    }

    async fn callback(&self, query: &str) -> Answer {
        let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        if let Some(error) = params.get("error") {
            return error_page(
                StatusCode::UNAUTHORIZED,
                &format!("the identity provider refused the sign-in: {error}"),
            );
        }
        let (Some(state), Some(code)) = (params.get("state"), params.get("code")) else {
            return error_page(
                StatusCode::BAD_REQUEST,
                "the callback lacks its state or code: sign in again",
            );
        };
        let Some((sign_in, at)) = lock(&self.sign_ins).remove(state) else {
            return error_page(
                StatusCode::BAD_REQUEST,
                "this sign-in is unknown or already used: sign in again",
            );
        };
        if at.elapsed() >= SIGN_IN_TTL {
            return error_page(
                StatusCode::BAD_REQUEST,
                "this sign-in took too long: sign in again",
            );
        }
        match self
            .approvals
            .verifier()
            .finish_sign_in(&sign_in, code)
            .await
        {
            Ok((token, reviewer)) => {
                let id = random_token();
                tracing::info!(
                    reviewer = reviewer.display(),
                    "reviewer signed in to the review page"
                );
                lock(&self.sessions).insert(
                    id.clone(),
                    Session {
                        token,
                        reviewer,
                        csrf: random_token(),
                        since: Instant::now(),
                        flash: None,
                    },
                );
                let mut answer = redirect("/");
                answer.headers_mut().insert(
                    header::SET_COOKIE,
                    format!("{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Lax")
                        .parse()
                        .expect("a cookie of URL-safe characters"),
                );
                answer
            }
            Err(e) => error_page(StatusCode::UNAUTHORIZED, &format!("sign-in failed: {e}")),
        }
    }

    fn list(&self, reviewer: &Reviewer, csrf: &str, flash: Option<(bool, String)>) -> Answer {
        let mut body = header_html(reviewer, csrf);
        match flash {
            Some((false, done)) => body.push_str(&format!(
                "<p id=\"flash\" role=\"status\">{}</p>",
                esc(&done)
            )),
            Some((true, error)) => body.push_str(&format!(
                "<p id=\"error\" role=\"alert\">{}</p>",
                esc(&error)
            )),
            None => {}
        }
        let pending = self.approvals.list();
        if pending.is_empty() {
            body.push_str("<p id=\"empty\">No request waits for approval.</p>");
        } else {
            body.push_str(
                "<table id=\"pending\"><caption>Requests waiting</caption><thead><tr>\
                 <th scope=\"col\">Request</th><th scope=\"col\">From</th><th scope=\"col\">To</th>\
                 <th scope=\"col\">Rule</th><th scope=\"col\">Approvals</th><th scope=\"col\">Expires</th>\
                 </tr></thead><tbody>",
            );
            for p in &pending {
                let mut summary: String = p.request.chars().take(80).collect();
                if p.request.chars().count() > 80 {
                    summary.push('…');
                }
                body.push_str(&format!(
                    "<tr><td><a class=\"request\" href=\"/approvals/{id}\">{summary}</a></td><td>{from}</td>\
                     <td>{to}</td><td>{rule}</td><td>{n}/{q}</td><td>{expires}</td></tr>",
                    id = esc(&p.id),
                    summary = esc(&summary),
                    from = esc(&requester(p)),
                    to = esc(&p.destination),
                    rule = esc(&p.rule),
                    n = p.approved_by.len(),
                    q = p.quorum,
                    expires = esc(&p.expires_at),
                ));
            }
            body.push_str("</tbody></table>");
        }
        html(StatusCode::OK, "Warden approvals", &body)
    }

    fn show(&self, session: &str, id: &str, reviewer: &Reviewer, csrf: &str) -> Answer {
        let Some(p) = self.approvals.get(id) else {
            self.flash(
                session,
                true,
                "this request no longer waits: it was decided or expired".into(),
            );
            return redirect("/");
        };
        let mut body = header_html(reviewer, csrf);
        body.push_str("<p><a href=\"/\">All requests</a></p>");
        body.push_str(&format!("<h2>{} request</h2>", esc(p.protocol)));
        body.push_str(&format!("<pre id=\"request\">{}</pre>", esc(&p.request)));
        let mut rows = vec![
            ("Requester", requester(&p)),
            ("Process", process(&p)),
            ("Destination", p.destination.clone()),
            ("Rule", p.rule.clone()),
            (
                "Approvers",
                format!("one of {} ({} needed)", p.groups.join(", "), p.quorum),
            ),
            ("Approved by", p.approved_by.join(", ")),
            ("Held since", p.created.clone()),
            ("Expires", p.expires_at.clone()),
        ];
        for (key, value) in &p.context {
            rows.push((key, value.clone()));
        }
        if let Some(c) = &p.caused_by {
            rows.push((
                "Proposed by the LLM call",
                format!(
                    "session {} request {} ({} match)",
                    c.session_id, c.seq, c.kind
                ),
            ));
        }
        body.push_str("<dl id=\"context\">");
        for (key, value) in rows {
            body.push_str(&format!("<dt>{}</dt><dd>{}</dd>", esc(key), esc(&value)));
        }
        body.push_str("</dl>");
        let id = esc(&p.id);
        let csrf = esc(csrf);
        body.push_str(&format!(
            "<form method=\"post\" action=\"/approvals/{id}/approve\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button id=\"approve\" type=\"submit\">Approve</button></form>\
             <form method=\"post\" action=\"/approvals/{id}/reject\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"reason\">Reason</label> <input id=\"reason\" name=\"reason\" required>\
             <button id=\"reject\" type=\"submit\">Reject</button></form>"
        ));
        html(StatusCode::OK, "Warden approval", &body)
    }

    async fn decide(&self, session: &str, rest: &str, form: &HashMap<String, String>) -> Answer {
        let Some((id, verb)) = rest.split_once('/') else {
            return error_page(StatusCode::NOT_FOUND, "no such page");
        };
        let Some(token) = lock(&self.sessions).get(session).map(|s| s.token.clone()) else {
            return redirect("/");
        };
        let outcome = match verb {
            "approve" => self.approvals.approve(id, &token).await,
            "reject" => {
                let reason = form.get("reason").map(String::as_str).unwrap_or_default();
                self.approvals.reject(id, &token, reason).await
            }
            _ => return error_page(StatusCode::NOT_FOUND, "no such page"),
        };
        let (failed, message) = match outcome {
            Ok(Progress::Released { .. }) => (false, format!("Approved {id}: it runs now.")),
            Ok(Progress::Waiting { approvals, quorum }) => (
                false,
                format!("Approved {id}: {approvals} of {quorum} approvals, it waits for more."),
            ),
            Ok(Progress::Rejected) => (false, format!("Rejected {id}: it will not run.")),
            Err(e) => (true, e.to_string()),
        };
        self.flash(session, failed, message);
        redirect("/")
    }

    fn flash(&self, session: &str, failed: bool, message: String) {
        if let Some(s) = lock(&self.sessions).get_mut(session) {
            s.flash = Some((failed, message));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_form(req: Request<Incoming>) -> HashMap<String, String> {
    match Limited::new(req.into_body(), MAX_FORM).collect().await {
        Ok(body) => form_urlencoded::parse(&body.to_bytes())
            .into_owned()
            .collect(),
        Err(_) => HashMap::new(),
    }
}

fn random_token() -> String {
    openidconnect::CsrfToken::new_random().secret().clone()
}

fn requester(p: &Pending) -> String {
    let r = &p.requester;
    let who = r
        .workload
        .clone()
        .or_else(|| r.exe.clone())
        .unwrap_or_default();
    format!(
        "{who} (pid {}, user {})",
        r.pid,
        r.user.clone().unwrap_or_else(|| r.uid.to_string())
    )
}

/// The executable (what workloads match on), never the command line, which
/// may carry secrets.
fn process(p: &Pending) -> String {
    let r = &p.requester;
    let mut parts = vec![r.exe.clone().unwrap_or_else(|| "unknown executable".into())];
    parts.extend(r.unit.clone().map(|u| format!("unit {u}")));
    parts.extend(r.container.clone().map(|c| format!("container {c}")));
    parts.extend(r.cgroup.clone().map(|c| format!("cgroup {c}")));
    parts.join("; ")
}

fn header_html(reviewer: &Reviewer, csrf: &str) -> String {
    format!(
        "<header><h1>Warden approvals</h1><p id=\"who\">Signed in as {} ({})</p>\
         <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button id=\"sign-out\" type=\"submit\">Sign out</button></form></header><main>",
        esc(reviewer.display()),
        esc(&reviewer.groups.join(", ")),
        esc(csrf)
    )
}

fn signed_out() -> Answer {
    html(
        StatusCode::OK,
        "Warden approvals",
        "<header><h1>Warden approvals</h1></header><main>\
         <p>Reviewers sign in with the identity provider to see what waits.</p>\
         <p><a id=\"sign-in\" href=\"/login\">Sign in</a></p>",
    )
}

fn error_page(status: StatusCode, message: &str) -> Answer {
    html(
        status,
        "Warden approvals",
        &format!(
            "<header><h1>Warden approvals</h1></header><main><p id=\"error\" role=\"alert\">{}</p>\
             <p><a href=\"/\">Back</a></p>",
            esc(message)
        ),
    )
}

fn html(status: StatusCode, title: &str, body: &str) -> Answer {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title></head>\
         <body>{body}</main></body></html>",
        esc(title)
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header(
            "content-security-policy",
            "default-src 'none'; form-action 'self'",
        )
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
        .body(Full::new(Bytes::from(page)))
        .expect("static headers")
}

fn redirect(to: &str) -> Answer {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| error_page(StatusCode::BAD_GATEWAY, "bad redirect"))
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }
}
