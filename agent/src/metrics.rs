//! Prometheus metrics: what the agent did, counted by protocol and
//! decision, served as the Prometheus text format on a loopback port.
//!
//! Almost everything is observed in one place, the [`AuditSink`]: every
//! connection, request and approval step passes through it as a row, and it
//! counts the rows before queuing them (so a row the audit drops is still
//! counted here). The exceptions are what no row says: the connections open
//! right now and the setup time of each (the proxy), the approvals waiting
//! (read at each scrape), and the rows written and dropped (the audit
//! writer).
//!
//! docs/operations.md lists the families for operators.
//!
//! [`AuditSink`]: crate::audit::AuditSink
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    approvals::Approvals,
    audit::{ApprovalRow, ConnectionRow, EventRow, RequestRow},
};

/// Upper bounds (seconds) of the latency buckets: from half a millisecond
/// (a statement the agent answers itself, a cached read) to a minute (a
/// long LLM answer); slower falls in `+Inf`.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolDecision {
    protocol: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolDirection {
    protocol: &'static str,
    /// "up" (client to server) or "down"; for masked values, "request"
    /// (redacted before it left) or "response" (masked in the answer).
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolStep {
    protocol: &'static str,
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadProvider {
    workload: String,
    provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The agent's metric families; shared (`Arc`) by the audit sink, the
/// proxy and the endpoint.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<ProtocolDecision, Counter>,
    connections_open: Gauge,
    connection_bytes: Family<ProtocolDirection, Counter>,
    connection_setup: Histogram,
    requests: Family<ProtocolDecision, Counter>,
    request_duration: HistogramFamily<ProtocolLabel>,
    masked_values: Family<ProtocolDirection, Counter>,
    approval_steps: Family<ProtocolStep, Counter>,
    approvals_pending: Gauge,
    audit_written: Family<TableLabel, Counter>,
    audit_dropped: Family<TableLabel, Counter>,
    events: Family<EventLabel, Counter>,
    llm_tokens: Family<WorkloadProvider, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            connections_open: Gauge::default(),
            connection_bytes: Family::default(),
            connection_setup: latency_histogram(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            masked_values: Family::default(),
            approval_steps: Family::default(),
            approvals_pending: Gauge::default(),
            audit_written: Family::default(),
            audit_dropped: Family::default(),
            events: Family::default(),
            llm_tokens: Family::default(),
        };
        m.registry.register(
            "warden_build",
            "The agent's version, as a label; the value is always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        m.registry.register(
            "warden_connections",
            "TCP connections (and refused UDP datagrams) that ended, by detected protocol and the policy's decision",
            m.connections.clone(),
        );
        m.registry.register(
            "warden_connections_open",
            "Connections the proxy holds right now",
            m.connections_open.clone(),
        );
        m.registry.register(
            "warden_connection_bytes",
            "Bytes relayed, counted when their connection ends; up is client to server",
            m.connection_bytes.clone(),
        );
        m.registry.register(
            "warden_connection_setup_seconds",
            "Time from accepting a redirected connection to the upstream connection being open: the kernel record lookup, the policy decision and the upstream TCP handshake, which the client waits for before its first byte goes through",
            m.connection_setup.clone(),
        );
        m.registry.register(
            "warden_requests",
            "Requests decoded inside connections (SQL statements, HTTP requests and LLM calls, SSH channel requests), by protocol and decision",
            m.requests.clone(),
        );
        m.registry.register(
            "warden_request_duration_seconds",
            "Time from a request reaching the agent to the end of its answer, as its audit row says (start_time to end_time): PostgreSQL, statement sent to statement settled; HTTP, request head to response body end; SSH, channel request to channel close",
            m.request_duration.clone(),
        );
        m.registry.register(
            "warden_masked_values",
            "Values masked in answers (direction=response) or redacted from LLM prompts before they left (direction=request)",
            m.masked_values.clone(),
        );
        m.registry.register(
            "warden_approval_steps",
            "Steps of requests held for approval (requested, approved, rejected, expired, refused, executed, abandoned)",
            m.approval_steps.clone(),
        );
        m.registry.register(
            "warden_approvals_pending",
            "Requests waiting for reviewers right now",
            m.approvals_pending.clone(),
        );
        m.registry.register(
            "warden_audit_rows_written",
            "Audit rows written to Parquet files, by table",
            m.audit_written.clone(),
        );
        m.registry.register(
            "warden_audit_rows_dropped",
            "Audit rows lost, by table: the writer fell behind or could not write for too long",
            m.audit_dropped.clone(),
        );
        m.registry.register(
            "warden_events",
            "The agent's events, as in the audit's events table: policy reloads and refused reloads, cgroups attached and released, audit outages",
            m.events.clone(),
        );
        m.registry.register(
            "warden_llm_tokens",
            "LLM tokens that workloads' calls used, as their budgets count them: the usage the provider reported, or an estimate (4 bytes of text per token) for an answer without usage; counted when the answer ends, by workload and provider",
            m.llm_tokens.clone(),
        );
        m
    }

    pub fn observe_connection(&self, row: &ConnectionRow) {
        self.connections
            .get_or_create(&ProtocolDecision {
                protocol: row.protocol,
                decision: row.decision,
            })
            .inc();
        for (direction, bytes) in [("up", row.bytes_up), ("down", row.bytes_down)] {
            self.connection_bytes
                .get_or_create(&ProtocolDirection {
                    protocol: row.protocol,
                    direction,
                })
                .inc_by(bytes);
        }
    }

    pub fn observe_request(&self, row: &RequestRow) {
        self.requests
            .get_or_create(&ProtocolDecision {
                protocol: row.protocol,
                decision: row.decision,
            })
            .inc();
        self.request_duration
            .get_or_create(&ProtocolLabel {
                protocol: row.protocol,
            })
            .observe(seconds_between(row.start_time, row.end_time));
        let redacted = row.llm.as_ref().map_or(0, |l| l.redacted);
        for (direction, count) in [("response", row.masked), ("request", redacted)] {
            if count > 0 {
                self.masked_values
                    .get_or_create(&ProtocolDirection {
                        protocol: row.protocol,
                        direction,
                    })
                    .inc_by(count);
            }
        }
    }

    pub fn observe_approval(&self, row: &ApprovalRow) {
        self.approval_steps
            .get_or_create(&ProtocolStep {
                protocol: row.protocol,
                step: row.step.as_str(),
            })
            .inc();
    }

    pub fn observe_event(&self, row: &EventRow) {
        self.events
            .get_or_create(&EventLabel {
                event: row.event.as_str(),
            })
            .inc();
    }

    /// Tokens an LLM call of `workload` used, counted by the budgets'
    /// ledger ([`crate::budget::TokenLedger`]).
    pub fn llm_tokens(&self, workload: &str, provider: &'static str, tokens: u64) {
        self.llm_tokens
            .get_or_create(&WorkloadProvider {
                workload: workload.to_string(),
                provider,
            })
            .inc_by(tokens);
    }

    pub fn rows_written(&self, table: &'static str, rows: u64) {
        self.audit_written
            .get_or_create(&TableLabel { table })
            .inc_by(rows);
    }

    pub fn rows_dropped(&self, table: &'static str, rows: u64) {
        self.audit_dropped
            .get_or_create(&TableLabel { table })
            .inc_by(rows);
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.clone())
    }

    /// A connection's upstream is open, `since` its accept.
    pub fn connection_set_up(&self, since: Instant) {
        self.connection_setup.observe(since.elapsed().as_secs_f64());
    }

    /// The families in the Prometheus text format (version 0.0.4).
    pub fn encode(&self, approvals_pending: usize) -> String {
        self.approvals_pending
            .set(i64::try_from(approvals_pending).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// An open connection, for `warden_connections_open`.
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

fn seconds_between(start: DateTime<Utc>, end: DateTime<Utc>) -> f64 {
    (end - start)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Serves `GET /metrics` on `addr` (loopback only) until `cancel`; returns
/// the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    approvals: Option<Arc<Approvals>>,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the metrics endpoint listens on loopback only ({addr} is not): give --metrics-listen 127.0.0.1:PORT, and let Prometheus scrape through a local exporter or a sidecar on the same host"
    );
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics endpoint on {addr}; choose a free port with --metrics-listen")
    })?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics endpoint listening at /metrics");
    crate::loopback::spawn_accept_loop(listener, "metrics endpoint", cancel, move |stream| {
        let metrics = metrics.clone();
        let approvals = approvals.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&req, &metrics, approvals.as_deref());
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        }
    });
    Ok(bound)
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    approvals: Option<&Approvals>,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let pending = approvals.map_or(0, |a| a.list().len());
            (
                StatusCode::OK,
                prometheus_text::CONTENT_TYPE,
                metrics.encode(pending),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr},
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        audit::{ApprovalStep, AuditConfig, AuditWriter},
        identity::Identity,
    };

    fn destination() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5432)
    }

    fn connection(protocol: &'static str, decision: &'static str) -> ConnectionRow {
        let now = Utc::now();
        ConnectionRow {
            session_id: "s".into(),
            start_time: now,
            end_time: now,
            transport: "tcp",
            identity: Identity::default(),
            workload: None,
            destination: destination(),
            protocol,
            server_name: None,
            tls: None,
            decision,
            rule: "default".into(),
            bytes_up: 100,
            bytes_down: 2000,
            error: None,
        }
    }

    fn request(decision: &'static str, took: chrono::Duration) -> RequestRow {
        let start = Utc::now();
        RequestRow {
            session_id: "s".into(),
            seq: 1,
            start_time: start,
            end_time: start + took,
            identity: Identity::default(),
            workload: None,
            destination: destination(),
            protocol: "postgres",
            database: None,
            db_user: None,
            statement: Some("SELECT 1".into()),
            statement_class: Some("read"),
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            functions: Vec::new(),
            fingerprint: None,
            rows: Some(1),
            masked: 0,
            decision,
            rule: "default".into(),
            error: None,
            sqlstate: None,
            http: None,
            llm: None,
            ssh: None,
            caused_by: None,
            approval_id: None,
        }
    }

    /// Each sample line of the text format: `name{labels}` to its value.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample is `series value`");
                (series.to_string(), value.parse().expect("a number"))
            })
            .collect()
    }

    fn sample(samples: &HashMap<String, f64>, series: &str) -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series}; have {samples:#?}"))
    }

    #[test]
    fn rows_become_samples_with_their_labels() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.observe_request(&request("allow", chrono::Duration::milliseconds(2)));
        }
        m.observe_request(&RequestRow {
            masked: 2,
            ..request("deny", chrono::Duration::seconds(3))
        });
        m.observe_connection(&connection("postgres", "allow"));
        m.observe_connection(&connection("none", "deny"));
        m.observe_approval(&ApprovalRow {
            time: Utc::now(),
            approval_id: "a".into(),
            step: ApprovalStep::Requested,
            session_id: "s".into(),
            protocol: "http",
            identity: Identity::default(),
            workload: None,
            destination: destination(),
            rule: "hold".into(),
            request: "POST x/y".into(),
            reviewer: None,
            reviewer_email: None,
            reviewer_groups: Vec::new(),
            approvals: 0,
            quorum: 1,
            reason: None,
            expires_at: Utc::now(),
        });
        let text = m.encode(2);
        let s = samples(&text);

        let r = |decision: &str| {
            sample(
                &s,
                &format!(r#"warden_requests_total{{protocol="postgres",decision="{decision}"}}"#),
            )
        };
        assert_eq!(r("allow"), 3.0);
        assert_eq!(r("deny"), 1.0);
        assert_eq!(
            sample(
                &s,
                r#"warden_connections_total{protocol="postgres",decision="allow"}"#
            ),
            1.0
        );
        assert_eq!(
            sample(
                &s,
                r#"warden_connections_total{protocol="none",decision="deny"}"#
            ),
            1.0
        );
        assert_eq!(
            sample(
                &s,
                r#"warden_connection_bytes_total{protocol="postgres",direction="down"}"#
            ),
            2000.0
        );
        assert_eq!(
            sample(
                &s,
                r#"warden_masked_values_total{protocol="postgres",direction="response"}"#
            ),
            2.0
        );
        assert_eq!(
            sample(
                &s,
                r#"warden_approval_steps_total{protocol="http",step="requested"}"#
            ),
            1.0
        );
        assert_eq!(sample(&s, "warden_approvals_pending"), 2.0);
        assert_eq!(
            sample(
                &s,
                &format!(
                    r#"warden_build_info{{version="{}"}}"#,
                    env!("CARGO_PKG_VERSION")
                )
            ),
            1.0
        );
        // Every family says what it is.
        assert!(text.contains("# TYPE warden_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE warden_requests_total counter\n"));
        assert!(text.contains("# HELP warden_connection_setup_seconds Time from accepting"));
    }

    #[test]
    fn latencies_land_in_their_buckets() {
        let m = Metrics::new();
        m.observe_request(&request("allow", chrono::Duration::milliseconds(2)));
        m.observe_request(&request("allow", chrono::Duration::seconds(3)));
        // An end before the start (a clock step) counts as zero, not negative.
        m.observe_request(&request("allow", chrono::Duration::milliseconds(-5)));
        let s = samples(&m.encode(0));
        let bucket = |le: &str| {
            sample(
                &s,
                &format!(
                    r#"warden_request_duration_seconds_bucket{{protocol="postgres",le="{le}"}}"#
                ),
            )
        };
        assert_eq!(bucket("0.0005"), 1.0);
        assert_eq!(bucket("0.001"), 1.0);
        assert_eq!(bucket("0.0025"), 2.0);
        assert_eq!(bucket("2.5"), 2.0);
        assert_eq!(bucket("5"), 3.0);
        assert_eq!(bucket("+Inf"), 3.0);
        assert_eq!(
            sample(
                &s,
                r#"warden_request_duration_seconds_count{protocol="postgres"}"#
            ),
            3.0
        );
        let sum = sample(
            &s,
            r#"warden_request_duration_seconds_sum{protocol="postgres"}"#,
        );
        assert!((sum - 3.002).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn open_connections_count_until_their_guard_drops() {
        let m = Arc::new(Metrics::new());
        let first = m.connection_opened();
        let second = m.connection_opened();
        assert_eq!(
            sample(&samples(&m.encode(0)), "warden_connections_open"),
            2.0
        );
        drop(first);
        assert_eq!(
            sample(&samples(&m.encode(0)), "warden_connections_open"),
            1.0
        );
        drop(second);
        assert_eq!(
            sample(&samples(&m.encode(0)), "warden_connections_open"),
            0.0
        );
    }

    #[test]
    fn events_are_counted_by_kind() {
        use crate::audit::Event;
        let m = Metrics::new();
        m.observe_event(&EventRow::now(Event::PolicyReloaded, "ok"));
        m.observe_event(&EventRow::now(Event::PolicyReloaded, "ok again"));
        m.observe_event(&EventRow::now(Event::PolicyReloadRefused, "line 3"));
        let s = samples(&m.encode(0));
        assert_eq!(
            sample(&s, r#"warden_events_total{event="policy_reloaded"}"#),
            2.0
        );
        assert_eq!(
            sample(&s, r#"warden_events_total{event="policy_reload_refused"}"#),
            1.0
        );
    }

    #[tokio::test]
    async fn the_audit_counts_rows_written_and_dropped_by_table() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let config = AuditConfig {
            dir: tmp.path().to_path_buf(),
            ..AuditConfig::default()
        };
        // On the current-thread test runtime the writer does not run until
        // this test awaits: the channel of 4 keeps the first 4 rows.
        let (sink, writer) = AuditWriter::start_with_capacity(config, 4, Some(m.clone())).unwrap();
        for _ in 0..3 {
            sink.record(connection("postgres", "allow"));
        }
        for _ in 0..3 {
            sink.record_request(request("allow", chrono::Duration::milliseconds(1)));
        }
        assert_eq!(writer.shutdown().await.unwrap(), 4);
        let s = samples(&m.encode(0));
        let audit = |what: &str, table: &str| {
            sample(
                &s,
                &format!(r#"warden_audit_rows_{what}_total{{table="{table}"}}"#),
            )
        };
        assert_eq!(audit("written", "connections"), 3.0);
        assert_eq!(audit("written", "requests"), 1.0);
        assert_eq!(audit("dropped", "requests"), 2.0);
        assert!(!s.contains_key(r#"warden_audit_rows_dropped_total{table="connections"}"#));
        // The sink counts what passed it, written or not.
        assert_eq!(
            sample(
                &s,
                r#"warden_requests_total{protocol="postgres",decision="allow"}"#
            ),
            3.0
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn serves_the_text_format_on_loopback_only() {
        let m = Arc::new(Metrics::new());
        m.observe_request(&request("deny", chrono::Duration::milliseconds(1)));
        let cancel = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            m.clone(),
            None,
            cancel.clone(),
        )
        .await
        .unwrap();

        let answer = get(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("\nwarden_requests_total{protocol=\"postgres\",decision=\"deny\"} 1\n"),
            "{answer}"
        );
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404 "));

        let err = serve("0.0.0.0:0".parse().unwrap(), m, None, cancel.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("loopback only"), "{err}");

        cancel.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
