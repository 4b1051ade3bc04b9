//! The HTTPS half of `cargo xtask bench`: LLM API calls and plain uploads
//! over TLS, directly and through the agent, as ratios and added latency.
//!
//! The server runs in the bench's process (tokio, hyper, rustls) with a
//! certificate for `localhost` from a throwaway CA; it speaks OpenAI's wire
//! format on `/v1/chat/completions` (whole answers and SSE streams) and
//! takes bodies of any size on `/upload`. The client runs as a separate
//! process (`xtask bench-http-client`), once directly and once under
//! `warden run`, on one keep-alive connection, and times itself.
//!
//! Through the agent, TLS is intercepted (the client trusts the agent's CA
//! through the `SSL_CERT_FILE` bundle that `warden run` sets) and the agent
//! applies its embedded default policy: prompt DLP on the chat requests,
//! masking of the answers, streams chunk by chunk, one audit row per
//! request. No body carries a sensitive value, so this measures the cost
//! of inspecting clean traffic, not of redacting. `/upload` is no LLM path:
//! the agent decodes its head and passes its body through.
use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::Command,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    header,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{target_dir, warden_bin};

/// What each round asks of the client.
pub struct HttpLoad {
    /// Sequential non-streaming chat completions.
    pub requests: u32,
    /// Sequential 1 MiB uploads.
    pub mib: u32,
    /// Sequential streaming chat completions.
    pub streams: u32,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The bench server's port on 127.0.0.1 (its certificate names `localhost`).
    #[arg(long)]
    port: u16,
    /// The bench CA (PEM); the certificates in $SSL_CERT_FILE are trusted too.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    requests: u32,
    #[arg(long)]
    mib: u32,
    #[arg(long)]
    streams: u32,
}

/// Content chunks in each streamed answer (the request's `max_tokens`).
const STREAM_CHUNKS: u32 = 50;
const UPLOAD: usize = 1 << 20;
const MODEL: &str = "gpt-4o-mini-2024-07-18";
/// Any one request, warm-up included, taking longer than this is a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The figures one client run reports, as it prints them.
struct Figures {
    small_p50_us: f64,
    small_p99_us: f64,
    small_rps: f64,
    large_mib_s: f64,
    stream_p50_us: f64,
}

/// Run `rounds` rounds, direct then through the agent in each, and print
/// the table. `direct_only` skips the agent (to check the client and the
/// server without a `warden` binary).
pub fn run(load: &HttpLoad, rounds: u32, direct_only: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("warden-bench-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_pem, tls) = server_tls()?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).with_context(|| format!("writing {}", ca.display()))?;
    let addr = start_server(tls)?;

    let mut direct = Vec::new();
    let mut agent = Vec::new();
    for round in 0..rounds {
        eprintln!("HTTPS round {} of {}", round + 1, rounds);
        direct.push(measure(None, addr, &ca, load)?);
        if !direct_only {
            agent.push(measure(Some(&dir), addr, &ca, load)?);
        }
    }

    println!(
        "\nHTTPS on loopback, one keep-alive HTTP/1.1 connection: {} chat completions, \
         {} x 1 MiB uploads, {} streams of {STREAM_CHUNKS} chunks, best of {rounds} rounds",
        load.requests, load.mib, load.streams
    );
    println!(
        "(through the agent: TLS intercepted, default policy: prompt DLP and answer masking \
         on clean traffic, nothing to redact)"
    );
    println!(
        "{:<34} {:>12} {:>14} {:>8} {:>11}",
        "figure", "direct", "through agent", "ratio", "added (us)"
    );
    // The name, whether it is a latency (lower is better), the figure.
    type Row = (&'static str, bool, fn(&Figures) -> f64);
    let rows: [Row; 5] = [
        ("chat completion p50 (us)", true, |f| f.small_p50_us),
        ("chat completion p99 (us)", true, |f| f.small_p99_us),
        ("chat completions (req/s)", false, |f| f.small_rps),
        ("1 MiB uploads (MiB/s)", false, |f| f.large_mib_s),
        ("stream, 50 chunks, p50 (us)", true, |f| f.stream_p50_us),
    ];
    for (name, latency, figure) in rows {
        // The best round: the lowest latency, the highest rate.
        let best = |v: &[Figures]| {
            let each = v.iter().map(figure);
            if latency {
                each.fold(f64::MAX, f64::min)
            } else {
                each.fold(0.0, f64::max)
            }
        };
        let d = best(&direct);
        if direct_only {
            println!("{name:<34} {d:>12.1} {:>14} {:>8} {:>11}", "-", "-", "-");
            continue;
        }
        let a = best(&agent);
        let added = if latency {
            format!("{:.1}", a - d)
        } else {
            "-".into()
        };
        println!("{name:<34} {d:>12.1} {a:>14.1} {:>8.2} {added:>11}", a / d);
    }
    println!(
        "(latency ratio: agent/direct, lower is better; rate ratio: agent/direct, higher is better; \
         added: agent - direct)"
    );
    // Kept on failure (the `?`s above), for the agent's audit.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One client run: directly, or under `warden run` with its state and
/// audit under `dir`.
fn measure(
    through_agent: Option<&Path>,
    addr: SocketAddr,
    ca: &Path,
    load: &HttpLoad,
) -> anyhow::Result<Figures> {
    let client = target_dir().join("release/xtask");
    let mut cmd = match through_agent {
        Some(dir) => {
            let mut c = Command::new(warden_bin());
            c.arg("run")
                .arg("--audit-dir")
                .arg(dir.join("audit"))
                .arg("--upstream-ca")
                .arg(ca)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--")
                .arg(&client);
            c
        }
        None => Command::new(&client),
    };
    let out = cmd
        .arg("bench-http-client")
        .arg(format!("--port={}", addr.port()))
        .arg("--ca")
        .arg(ca)
        .arg(format!("--requests={}", load.requests))
        .arg(format!("--mib={}", load.mib))
        .arg(format!("--streams={}", load.streams))
        .env("WARDEN_LOG", "warden=warn")
        .output()
        .context("starting the HTTPS bench client")?;
    let path = if through_agent.is_some() {
        "through the agent"
    } else {
        "direct"
    };
    if !out.status.success() {
        bail!(
            "HTTPS bench client ({path}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("HTTPS bench client ({path}) printed no {name}: {text}"))
    };
    Ok(Figures {
        small_p50_us: field("small_p50_us")?,
        small_p99_us: field("small_p99_us")?,
        small_rps: field("small_rps")?,
        large_mib_s: field("large_mib_s")?,
        stream_p50_us: field("stream_p50_us")?,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throwaway CA (its PEM) and a server config for `localhost` signed by it.
fn server_tls() -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Warden bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &ca)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca.pem(), Arc::new(config)))
}

/// The server, on its own thread and single-threaded runtime; its address.
fn start_server(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    thread::spawn(move || {
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).expect("a tokio listener");
            let acceptor = TlsAcceptor::from(tls);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // HTTP/1.1, keep-alive on (hyper's default).
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service_fn(handle))
                        .await;
                });
            }
        })
    });
    Ok(addr)
}

type ServerBody = BoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>) -> Result<Response<ServerBody>, hyper::Error> {
    let path = req.uri().path().to_owned();
    if req.method() != hyper::Method::POST {
        return Ok(json(
            StatusCode::METHOD_NOT_ALLOWED,
            error_json("POST only"),
        ));
    }
    if path == "/upload" {
        // Counted as it arrives, never held whole.
        let mut body = req.into_body();
        let mut bytes = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                bytes += data.len();
            }
        }
        return Ok(json(StatusCode::OK, format!("{{\"bytes\":{bytes}}}")));
    }
    if path != "/v1/chat/completions" {
        return Ok(json(StatusCode::NOT_FOUND, error_json("no such route")));
    }
    let body = req.into_body().collect().await?.to_bytes();
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(json(StatusCode::BAD_REQUEST, error_json("invalid JSON")));
    };
    let max_tokens = request["max_tokens"]
        .as_u64()
        .unwrap_or(STREAM_CHUNKS.into())
        .clamp(1, 4096) as usize;
    if request["stream"].as_bool() == Some(true) {
        let usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        let body = SseBody::new(stream_events(max_tokens, usage));
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-request-id", "req_bench")
            .body(body.boxed())
            .expect("a valid response");
        return Ok(resp);
    }
    Ok(json(StatusCode::OK, completion_json()))
}

fn json(status: StatusCode, body: String) -> Response<ServerBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", "req_bench")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a valid response")
}

fn error_json(message: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": "invalid_request_error"}}).to_string()
}

const ANSWER: &str = "Send the service SIGHUP after logrotate moves the files: it reopens its \
                      log files without dropping requests.";

/// A non-streamed answer as OpenAI's chat completions API shapes it.
fn completion_json() -> String {
    serde_json::json!({
        "id": "chatcmpl-bench0001",
        "object": "chat.completion",
        "created": 1_764_000_000,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ANSWER, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 52,
            "completion_tokens": 24,
            "total_tokens": 76,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench"
    })
    .to_string()
}

/// A streamed answer's events: the role, `n` word-sized deltas, the finish,
/// the usage when asked for, then `[DONE]`.
fn stream_events(n: usize, usage: bool) -> VecDeque<Bytes> {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let c = serde_json::json!({
            "id": "chatcmpl-bench0002",
            "object": "chat.completion.chunk",
            "created": 1_764_000_000,
            "model": MODEL,
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut events = VecDeque::with_capacity(n + 4);
    events.push_back(chunk(
        serde_json::json!({"role": "assistant", "content": "", "refusal": null}),
        serde_json::Value::Null,
    ));
    let words: Vec<&str> = ANSWER.split(' ').collect();
    for i in 0..n {
        let word = words[i % words.len()];
        let content = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        events.push_back(chunk(
            serde_json::json!({"content": content}),
            serde_json::Value::Null,
        ));
    }
    events.push_back(chunk(serde_json::json!({}), "stop".into()));
    if usage {
        let c = serde_json::json!({
            "id": "chatcmpl-bench0002",
            "object": "chat.completion.chunk",
            "created": 1_764_000_000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": {"prompt_tokens": 52, "completion_tokens": n, "total_tokens": 52 + n}
        });
        events.push_back(Bytes::from(format!("data: {c}\n\n")));
    }
    events.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// An SSE body that yields between events, so that hyper writes each one
/// on its own as a server generating tokens does (without the model's
/// delay), rather than gathering the whole answer into one write.
struct SseBody {
    events: VecDeque<Bytes>,
    pause: bool,
}

impl SseBody {
    fn new(events: VecDeque<Bytes>) -> Self {
        Self {
            events,
            pause: false,
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.pause && !self.events.is_empty() {
            self.pause = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pause = true;
        Poll::Ready(self.events.pop_front().map(|e| Ok(Frame::data(e))))
    }

    fn is_end_stream(&self) -> bool {
        self.events.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A ~300-byte chat request, as an SDK sends it.
fn chat_request(stream: bool) -> Bytes {
    let mut body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a concise assistant for the platform team's internal wiki. Answer in one short paragraph."},
            {"role": "user", "content": "How do I rotate the build service's log files without restarting it or losing requests?"}
        ],
        "temperature": 0.2,
        "max_tokens": STREAM_CHUNKS,
        "stream": stream
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// The client: `bench-http-client`, run directly or under `warden run`.
pub fn client(args: &ClientArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(client_main(args))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn client_main(args: &ClientArgs) -> anyhow::Result<()> {
    ensure!(
        args.requests > 0 && args.mib > 0 && args.streams > 0,
        "--requests, --mib and --streams must be at least 1"
    );
    let mut roots = rustls::RootCertStore::empty();
    let mut files = vec![args.ca.clone()];
    files.extend(std::env::var_os("SSL_CERT_FILE").map(PathBuf::from));
    for file in &files {
        let pem = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", file.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        ensure!(added > 0, "no CA certificate in {}", file.display());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];

    let tcp = TcpStream::connect(("127.0.0.1", args.port))
        .await
        .context("connecting to the bench server")?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake with the bench server")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("bench-http-client: the connection failed: {e}");
        }
    });
    let host = format!("localhost:{}", args.port);

    let small = chat_request(false);
    let streamed = chat_request(true);
    let upload = Bytes::from(vec![0x5au8; UPLOAD]);

    // Warm-up, checking each answer whole once.
    for _ in 0..20 {
        let answer = send(&mut sender, &host, "/v1/chat/completions", &small).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&answer).context("the chat completion is not JSON")?;
        ensure!(
            v["object"] == "chat.completion" && v["choices"][0]["message"]["content"] == ANSWER,
            "unexpected chat completion: {v}"
        );
    }
    for _ in 0..5 {
        let answer = send(&mut sender, &host, "/v1/chat/completions", &streamed).await?;
        check_stream(&answer)?;
    }
    for _ in 0..2 {
        let answer = send(&mut sender, &host, "/upload", &upload).await?;
        ensure!(
            answer == format!("{{\"bytes\":{UPLOAD}}}").as_bytes(),
            "unexpected upload answer: {}",
            String::from_utf8_lossy(&answer)
        );
    }

    // 1. Small: sequential chat completions.
    let mut samples = Vec::with_capacity(args.requests as usize);
    let start = Instant::now();
    for _ in 0..args.requests {
        let t = Instant::now();
        send(&mut sender, &host, "/v1/chat/completions", &small).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let small_rps = f64::from(args.requests) / start.elapsed().as_secs_f64();
    let small_p50 = percentile(&mut samples, 0.5);
    let small_p99 = percentile(&mut samples, 0.99);

    // 2. Large: sequential 1 MiB uploads.
    let start = Instant::now();
    for _ in 0..args.mib {
        let answer = send(&mut sender, &host, "/upload", &upload).await?;
        ensure!(answer.len() < 64, "unexpected upload answer");
    }
    let large_mib_s = f64::from(args.mib) / start.elapsed().as_secs_f64();

    // 3. Streams: request to the last byte.
    let mut samples = Vec::with_capacity(args.streams as usize);
    for _ in 0..args.streams {
        let t = Instant::now();
        let answer = send(&mut sender, &host, "/v1/chat/completions", &streamed).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(
            answer.ends_with(b"data: [DONE]\n\n"),
            "a stream did not end with [DONE]"
        );
    }
    let stream_p50 = percentile(&mut samples, 0.5);

    println!(
        "small_p50_us={small_p50:.1} small_p99_us={small_p99:.1} small_rps={small_rps:.1} \
         large_mib_s={large_mib_s:.1} stream_p50_us={stream_p50:.1}"
    );
    Ok(())
}

/// One POST on the keep-alive connection; the answer's body, read to its end.
async fn send(sender: &mut Sender, host: &str, path: &str, body: &Bytes) -> anyhow::Result<Bytes> {
    let content_type = if path == "/upload" {
        "application/octet-stream"
    } else {
        "application/json"
    };
    let req = Request::post(path)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "warden-bench/1")
        .header(header::AUTHORIZATION, "Bearer bench-placeholder")
        .body(Full::new(body.clone()))?;
    let exchange = async {
        sender.ready().await.context("the connection closed")?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to POST {path}"))?
            .to_bytes();
        ensure!(
            status == StatusCode::OK,
            "POST {path}: {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(body)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("POST {path}: no answer in {REQUEST_TIMEOUT:?}"))?
}

/// A streamed answer: every event a chunk, the deltas the answer's words,
/// a finish and `[DONE]` at the end.
fn check_stream(answer: &[u8]) -> anyhow::Result<()> {
    let text = std::str::from_utf8(answer).context("the stream is not UTF-8")?;
    let mut content = String::new();
    let mut finished = false;
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .with_context(|| format!("not an SSE data event: {event:?}"))?;
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(data)
            .with_context(|| format!("a stream event is not JSON: {data}"))?;
        ensure!(v["object"] == "chat.completion.chunk", "not a chunk: {v}");
        if let Some(delta) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(delta);
        }
        finished |= v["choices"][0]["finish_reason"] == "stop";
    }
    let words = content.split(' ').count();
    ensure!(
        finished && done && words == STREAM_CHUNKS as usize,
        "unexpected stream: finished={finished} done={done} words={words}"
    );
    Ok(())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}
