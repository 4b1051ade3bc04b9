//! Pods of this node as the Kubernetes API server knows them, for what the
//! node's files do not hold: labels on containerd nodes. One list, then a
//! watch from the list's resourceVersion; a watch that ends is resumed
//! where it stopped, one the server finds too old (410 Gone) starts over
//! with a list.
//!
//! The daemon's service account needs get, list and watch on pods (the
//! chart's ClusterRole); a field selector keeps the answers to this node.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{PodInfo, valid_uid};
use crate::approvals::fetch::{FetchError, Fetcher, read_body};

/// Where Kubernetes mounts a pod's service-account credentials.
pub const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A node runs at most a few hundred pods of some kilobytes each.
const MAX_LIST: usize = 64 << 20;
const LIST_READ: Duration = Duration::from_secs(60);
/// One watch event is one pod.
const MAX_EVENT: usize = 4 << 20;
/// The server ends a watch after this; the next starts where it stopped.
const WATCH_SECONDS: u64 = 300;
/// A watch silent for longer than it should last is a dead connection.
const SILENCE: Duration = Duration::from_secs(WATCH_SECONDS + 60);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How to reach the API server, resolved from the daemon's configuration
/// and, in a pod, its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSettings {
    /// `https://host:port`, no path.
    pub server: String,
    pub node_name: String,
    /// Reread before each request: projected tokens are rotated.
    pub token_file: PathBuf,
    /// The cluster's CA, the only one trusted for the server.
    pub ca_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "reading the service-account token {path}: {source}; mount one there or set kubernetes_api.token_file"
    )]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{url}: {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: {reason}")]
    Read { url: String, reason: String },
    #[error("{url}: not what the Kubernetes API answers: {reason}")]
    Malformed { url: String, reason: String },
}

/// What the watcher tells the daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum ApiEvent {
    /// The pod with this UID came, or its labels or account changed.
    Changed(String),
    /// The pods known are the server's: after a list, or a watch that
    /// resumed after failures.
    Synced { pods: usize },
    /// Reaching or reading the server failed; it is tried again.
    Failed(String),
}

/// The node's pods by UID, as last heard from the server.
#[derive(Clone, Default)]
pub struct ApiPods(Arc<Mutex<HashMap<String, PodInfo>>>);

impl ApiPods {
    pub fn pod(&self, uid: &str) -> Option<PodInfo> {
        self.lock().get(uid).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodInfo>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a list's pods in place of what was known; the UIDs that are
    /// new or changed.
    fn replace(&self, fresh: HashMap<String, PodInfo>) -> Vec<String> {
        let mut pods = self.lock();
        let changed = fresh
            .iter()
            .filter(|(uid, info)| pods.get(*uid) != Some(info))
            .map(|(uid, _)| uid.clone())
            .collect();
        *pods = fresh;
        changed
    }

    /// True when this changed what was known.
    fn upsert(&self, info: PodInfo) -> bool {
        let mut pods = self.lock();
        if pods.get(&info.uid) == Some(&info) {
            return false;
        }
        pods.insert(info.uid.clone(), info);
        true
    }

    fn remove(&self, uid: &str) {
        self.lock().remove(uid);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Starts following the node's pods; the events end when the receiver is
/// dropped.
pub fn spawn(settings: ApiSettings, fetcher: Fetcher) -> (ApiPods, mpsc::Receiver<ApiEvent>) {
    let pods = ApiPods::default();
    let (events, rx) = mpsc::channel(256);
    let watcher = Watcher {
        settings,
        fetcher,
        pods: pods.clone(),
        events,
    };
    tokio::spawn(watcher.run());
    (pods, rx)
}

struct Watcher {
    settings: ApiSettings,
    fetcher: Fetcher,
    pods: ApiPods,
    events: mpsc::Sender<ApiEvent>,
}

/// How a watch ended without an error.
enum WatchEnd {
    /// Normally (the server's timeout): resume from this version.
    Resume(String),
    /// The version is too old for the server: list again.
    Relist,
}

impl Watcher {
    async fn run(self) {
        let mut version: Option<String> = None;
        let mut backoff = BACKOFF_FIRST;
        let mut failing = false;
        while !self.events.is_closed() {
            let started = Instant::now();
            let step = match &version {
                None => self.list().await.map(|v| {
                    failing = false;
                    WatchEnd::Resume(v)
                }),
                Some(v) => self.watch(v, &mut failing).await,
            };
            match step {
                Ok(WatchEnd::Resume(v)) => {
                    version = Some(v);
                    // A server that ends watches at once must not make this spin.
                    if started.elapsed() < Duration::from_secs(1) {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    } else {
                        backoff = BACKOFF_FIRST;
                    }
                }
                Ok(WatchEnd::Relist) => version = None,
                Err(e) => {
                    failing = true;
                    if self
                        .events
                        .send(ApiEvent::Failed(e.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn url(&self, watch_from: Option<&str>) -> String {
        let mut url = format!(
            "{}/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
            self.settings.server,
            percent_encode(&self.settings.node_name)
        );
        if let Some(version) = watch_from {
            url.push_str(&format!(
                "&watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
                percent_encode(version)
            ));
        }
        url
    }

    async fn get(&self, url: &str) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        let token = read_token(&self.settings.token_file)?;
        let request = http::Request::get(url)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("warden/", env!("CARGO_PKG_VERSION")),
            )
            .body(Vec::new())
            .map_err(|e| ApiError::Malformed {
                url: url.to_string(),
                reason: format!("cannot make the request: {e}"),
            })?;
        Ok(self.fetcher.open(request).await?)
    }

    /// Lists the node's pods; the list's resourceVersion.
    async fn list(&self) -> Result<String, ApiError> {
        let url = self.url(None);
        let answer = self.get(&url).await?;
        let status = answer.status();
        let body = tokio::time::timeout(LIST_READ, read_body(answer.into_body(), MAX_LIST))
            .await
            .map_err(|_| ApiError::Read {
                url: url.clone(),
                reason: format!("the list did not come within {LIST_READ:?}"),
            })?
            .map_err(|reason| ApiError::Read {
                url: url.clone(),
                reason,
            })?;
        if !status.is_success() {
            return Err(refused(&url, status.as_u16(), &body));
        }
        let list: PodList = serde_json::from_slice(&body).map_err(|e| ApiError::Malformed {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let fresh: HashMap<String, PodInfo> = list
            .items
            .into_iter()
            .filter_map(|pod| pod.info(&self.settings.node_name))
            .map(|info| (info.uid.clone(), info))
            .collect();
        let pods = fresh.len();
        for uid in self.pods.replace(fresh) {
            self.send(ApiEvent::Changed(uid)).await;
        }
        self.send(ApiEvent::Synced { pods }).await;
        list.metadata
            .resource_version
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::Malformed {
                url,
                reason: "the pod list has no metadata.resourceVersion".into(),
            })
    }

    async fn watch(&self, version: &str, failing: &mut bool) -> Result<WatchEnd, ApiError> {
        let url = self.url(Some(version));
        let answer = self.get(&url).await?;
        let status = answer.status();
        if status == http::StatusCode::GONE {
            return Ok(WatchEnd::Relist);
        }
        let mut body = answer.into_body();
        if !status.is_success() {
            let text = read_body(body, MAX_EVENT).await.unwrap_or_default();
            return Err(refused(&url, status.as_u16(), &text));
        }
        if std::mem::take(failing) {
            self.send(ApiEvent::Synced {
                pods: self.pods.len(),
            })
            .await;
        }
        let mut lines = Lines::default();
        let mut version = version.to_string();
        let read_error = |reason: String| ApiError::Read {
            url: url.clone(),
            reason,
        };
        loop {
            let frame = match tokio::time::timeout(SILENCE, body.frame()).await {
                Err(_) => {
                    return Err(read_error(format!(
                        "the watch said nothing for {SILENCE:?}"
                    )));
                }
                Ok(None) => return Ok(WatchEnd::Resume(version)),
                Ok(Some(frame)) => frame.map_err(|e| read_error(e.to_string()))?,
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for line in lines.push(data).map_err(read_error)? {
                let event = Event::parse(&line, &self.settings.node_name).map_err(|reason| {
                    ApiError::Malformed {
                        url: url.clone(),
                        reason,
                    }
                })?;
                match event {
                    Event::Pod { version: v, info } => {
                        version = v;
                        let uid = info.uid.clone();
                        if self.pods.upsert(info) {
                            self.send(ApiEvent::Changed(uid)).await;
                        }
                    }
                    Event::Gone { version: v, uid } => {
                        version = v;
                        self.pods.remove(&uid);
                    }
                    Event::Bookmark { version: v } => version = v,
                    Event::TooOld => return Ok(WatchEnd::Relist),
                    Event::Error { code, message } => {
                        return Err(ApiError::Refused {
                            url: url.clone(),
                            status: code,
                            message,
                        });
                    }
                }
            }
        }
    }

    async fn send(&self, event: ApiEvent) {
        // A closed channel ends the loop in run().
        let _ = self.events.send(event).await;
    }
}

fn read_token(path: &Path) -> Result<String, ApiError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|source| ApiError::Token {
            path: path.to_path_buf(),
            source,
        })
}

/// An error answer, with the Status object's message when there is one and
/// what to do for the two a misconfigured daemon meets.
fn refused(url: &str, status: u16, body: &[u8]) -> ApiError {
    let said = serde_json::from_slice::<Status>(body)
        .ok()
        .and_then(|s| s.message)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let hint = match status {
        401 => {
            "; the server did not take the token: is kubernetes_api.token_file the daemon's service-account token, and current?"
        }
        403 => {
            "; give the daemon's service account get, list and watch on pods (the chart's ClusterRole does)"
        }
        _ => "",
    };
    ApiError::Refused {
        url: url.to_string(),
        status,
        message: format!("{said}{hint}"),
    }
}

/// Query values here are node names and resource versions: DNS labels and
/// digits, but a configuration may say anything.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Splits a watch's body into its lines, one JSON event each.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.pending.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                lines.push(line);
            }
        }
        if self.pending.len() > MAX_EVENT {
            return Err(format!("a watch event is over {MAX_EVENT} bytes"));
        }
        Ok(lines)
    }
}

/// One watch event, as far as the daemon cares.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Pod { version: String, info: PodInfo },
    Gone { version: String, uid: String },
    Bookmark { version: String },
    TooOld,
    Error { code: u16, message: String },
}

impl Event {
    fn parse(line: &[u8], node: &str) -> Result<Event, String> {
        let raw: RawEvent = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let pod = || -> Result<Pod, String> {
            serde_json::from_value(raw.object.clone())
                .map_err(|e| format!("{} event: {e}", raw.kind))
        };
        match raw.kind.as_str() {
            "ADDED" | "MODIFIED" | "DELETED" => {
                let pod = pod()?;
                let version = pod.version()?;
                let uid = pod.metadata.uid.clone();
                match pod.info(node) {
                    Some(info) if raw.kind != "DELETED" => Ok(Event::Pod { version, info }),
                    // Deleted, or no longer this node's pod.
                    _ => Ok(Event::Gone { version, uid }),
                }
            }
            "BOOKMARK" => Ok(Event::Bookmark {
                version: pod()?.version()?,
            }),
            "ERROR" => {
                let status: Status =
                    serde_json::from_value(raw.object).map_err(|e| format!("ERROR event: {e}"))?;
                match status.code {
                    Some(410) => Ok(Event::TooOld),
                    code => Ok(Event::Error {
                        code: code.unwrap_or(500),
                        message: status.message.unwrap_or_default(),
                    }),
                }
            }
            other => Err(format!("unknown watch event type {other:?}")),
        }
    }
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

#[derive(Deserialize)]
struct Status {
    code: Option<u16>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct PodList {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: Option<String>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: PodMeta,
    #[serde(default)]
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    resource_version: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
}

impl Pod {
    fn version(&self) -> Result<String, String> {
        self.metadata
            .resource_version
            .clone()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| "an object without metadata.resourceVersion".to_string())
    }

    /// The pod as the daemon selects it; None for another node's pod (the
    /// field selector should have kept those away) or one without a name.
    fn info(self, node: &str) -> Option<PodInfo> {
        let m = self.metadata;
        let ours = self.spec.node_name.as_deref() == Some(node)
            && valid_uid(&m.uid)
            && !m.namespace.is_empty()
            && !m.name.is_empty();
        ours.then_some(PodInfo {
            namespace: m.namespace,
            name: m.name,
            uid: m.uid,
            service_account: self.spec.service_account_name,
            labels: m.labels,
        })
    }
}

#[cfg(test)]
mod tests;
