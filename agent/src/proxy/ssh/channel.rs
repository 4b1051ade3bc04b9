//! One SSH session channel, relayed between the client and the server:
//! its exec, shell or subsystem request is decided by the policy (and may
//! be held for approval), what the server shows is recorded, and the
//! channel's end writes its `requests` row.
//!
//! Requests that want a reply are answered in order: the ones passed on
//! wait for the server's answer before the next is read.
//!
//! The client's data goes to the server through a queue of its own
//! ([`Upload`]): russh hands a channel's messages over from the
//! connection's single loop, so a channel task that waited for the
//! server's window while holding that loop would stop the client's window
//! updates too, and a download that fills both windows would never end.
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, client,
    server::{self, Msg},
};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::Shared;
use crate::{
    approvals::HoldRequest,
    audit::{
        SshFields,
        recording::{CastHeader, Recording},
    },
    lineage::Link,
    policy::{Action, SshChannel},
};

/// Client data queued for the server beyond this makes the channel stop
/// reading the client until half of it is sent.
const UPLOAD_HIGH_WATER: usize = 16 << 20;

/// What goes to the server in the order the client sent it.
enum Upward {
    Data(Bytes),
    Extended(u32, Bytes),
    Eof,
}

/// The client-to-server queue and what it holds, in bytes.
struct Upload {
    tx: mpsc::UnboundedSender<Upward>,
    pending: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl Upload {
    /// Starts the task that writes the queue to the server, at the pace
    /// of the server's window.
    fn start(
        to_server: Arc<ChannelWriteHalf<client::Msg>>,
    ) -> (Upload, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(Notify::new());
        let task = {
            let pending = pending.clone();
            let drained = drained.clone();
            tokio::spawn(async move {
                while let Some(item) = rx.recv().await {
                    let (len, sent) = match item {
                        Upward::Data(data) => (data.len(), to_server.data_bytes(data).await),
                        Upward::Extended(ext, data) => {
                            (data.len(), to_server.extended_data_bytes(ext, data).await)
                        }
                        Upward::Eof => (0, to_server.eof().await),
                    };
                    let left = pending.fetch_sub(len, Ordering::AcqRel) - len;
                    if left <= UPLOAD_HIGH_WATER / 2 {
                        drained.notify_waiters();
                    }
                    if sent.is_err() {
                        break;
                    }
                }
                // Whatever could not be sent no longer counts.
                pending.store(0, Ordering::Release);
                drained.notify_waiters();
            })
        };
        (
            Upload {
                tx,
                pending,
                drained,
            },
            task,
        )
    }

    /// Queues `item`; waits while too much is queued already.
    async fn send(&self, item: Upward) {
        let len = match &item {
            Upward::Data(d) | Upward::Extended(_, d) => d.len(),
            Upward::Eof => 0,
        };
        self.pending.fetch_add(len, Ordering::AcqRel);
        if self.tx.send(item).is_err() {
            return;
        }
        while self.pending.load(Ordering::Acquire) > UPLOAD_HIGH_WATER {
            let drained = self.drained.notified();
            if self.pending.load(Ordering::Acquire) <= UPLOAD_HIGH_WATER {
                break;
            }
            drained.await;
        }
    }
}

/// The exit status a refused exec or shell ends with (as a shell's "cannot
/// execute").
pub const REFUSED_EXIT: u32 = 126;

pub(super) struct SessionChannel {
    pub shared: Arc<Shared>,
    pub user: String,
    pub handle: server::Handle,
    /// The channel's number within the connection, for the recording's name.
    pub number: u64,
}

/// The terminal the client asked for.
struct Pty {
    term: String,
    cols: u32,
    rows: u32,
}

/// What both directions of a channel share.
#[derive(Default)]
struct Output {
    recording: Option<Recording>,
    exit_status: Option<u32>,
}

/// The exec, shell or subsystem the channel runs, once allowed.
struct Running {
    start: DateTime<Utc>,
    channel: SshChannel,
    command: Option<String>,
    rule: String,
    approval_id: Option<String>,
    caused_by: Option<Link>,
}

impl SessionChannel {
    pub async fn run(self, client: Channel<Msg>, upstream: Channel<client::Msg>) {
        let id = client.id();
        let (mut from_client, to_client) = client.split();
        let (from_server, to_server) = upstream.split();
        let to_server = Arc::new(to_server);
        self.shared
            .upstream_channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, to_server.clone());
        let (upload, uploading) = Upload::start(to_server.clone());
        let to_client = Arc::new(to_client);
        let output = Arc::new(Mutex::new(Output::default()));
        let (replies_tx, mut replies) = mpsc::unbounded_channel();
        let down = tokio::spawn(server_to_client(
            from_server,
            to_client.clone(),
            self.handle.clone(),
            id,
            output.clone(),
            replies_tx,
        ));
        let mut pty: Option<Pty> = None;
        let mut running: Option<Running> = None;
        let mut closed_by_agent = false;

        while let Some(msg) = from_client.wait().await {
            // An exec, shell or subsystem request, decided after the match.
            let mut asked = None;
            match msg {
                ChannelMsg::RequestPty {
                    want_reply,
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                } => {
                    let sent = to_server
                        .request_pty(
                            true,
                            &term,
                            col_width,
                            row_height,
                            pix_width,
                            pix_height,
                            &terminal_modes,
                        )
                        .await;
                    let ok = sent.is_ok() && replies.recv().await.unwrap_or(false);
                    if ok {
                        pty = Some(Pty {
                            term,
                            cols: col_width,
                            rows: row_height,
                        });
                    }
                    self.reply(id, want_reply, ok).await;
                }
                ChannelMsg::SetEnv {
                    want_reply,
                    variable_name,
                    variable_value,
                } => {
                    let sent = to_server
                        .set_env(want_reply, variable_name, variable_value)
                        .await;
                    if want_reply {
                        let ok = sent.is_ok() && replies.recv().await.unwrap_or(false);
                        self.reply(id, true, ok).await;
                    }
                }
                ChannelMsg::RequestShell { want_reply } => {
                    asked = Some(Start {
                        id,
                        channel: SshChannel::Shell,
                        command: None,
                        want_reply,
                        pty: pty.as_ref(),
                    });
                }
                ChannelMsg::Exec {
                    want_reply,
                    command,
                } => {
                    asked = Some(Start {
                        id,
                        channel: SshChannel::Exec,
                        command: Some(String::from_utf8_lossy(&command).into_owned()),
                        want_reply,
                        pty: pty.as_ref(),
                    });
                }
                ChannelMsg::RequestSubsystem { want_reply, name } => {
                    asked = Some(Start {
                        id,
                        channel: SshChannel::Subsystem,
                        command: Some(name),
                        want_reply,
                        pty: None,
                    });
                }
                ChannelMsg::Data { data } if !closed_by_agent => {
                    upload.send(Upward::Data(data)).await;
                }
                ChannelMsg::ExtendedData { data, ext } if !closed_by_agent => {
                    upload.send(Upward::Extended(ext, data)).await;
                }
                ChannelMsg::Eof => upload.send(Upward::Eof).await,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                } => {
                    let _ = to_server
                        .window_change(col_width, row_height, pix_width, pix_height)
                        .await;
                }
                ChannelMsg::Signal { signal } => {
                    let _ = to_server.signal(signal).await;
                }
                ChannelMsg::Close => break,
                // X11 and agent forwarding are answered by the
                // connection's handler; the rest needs nothing.
                _ => {}
            }
            if let Some(start) = asked {
                // One exec, shell or subsystem per channel, as servers allow.
                if running.is_some() || closed_by_agent {
                    self.reply(id, start.want_reply, false).await;
                    continue;
                }
                running = self
                    .start(start, &to_client, &to_server, &mut replies, &output)
                    .await;
                closed_by_agent |= running.is_none();
            }
        }
        // The client closed the channel (after the server did, as clients
        // wait for the exit status), or went away: what the server sends
        // now has no one to go to. What the client sent goes before the close.
        drop(upload);
        let _ = uploading.await;
        self.shared
            .upstream_channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let _ = to_server.close().await;
        down.abort();
        let _ = to_client.close().await;
        if let Some(running) = running {
            self.finish(running, &output);
        }
    }

    async fn reply(&self, id: ChannelId, want_reply: bool, ok: bool) {
        if !want_reply {
            return;
        }
        let _ = if ok {
            self.handle.channel_success(id).await
        } else {
            self.handle.channel_failure(id).await
        };
    }

    /// Decides an exec, shell or subsystem request; passes it on when
    /// allowed (or approved), or refuses it on the channel. Some while the
    /// request runs.
    async fn start(
        &self,
        start: Start<'_>,
        to_client: &ChannelWriteHalf<Msg>,
        to_server: &ChannelWriteHalf<client::Msg>,
        replies: &mut mpsc::UnboundedReceiver<bool>,
        output: &Mutex<Output>,
    ) -> Option<Running> {
        let Start {
            id,
            channel,
            command,
            want_reply,
            pty,
        } = start;
        let started = Utc::now();
        // An exec an LLM answer proposed names that exchange.
        let caused_by = match (channel, &command) {
            (SshChannel::Exec, Some(c)) => self
                .shared
                .s
                .lineage
                .claim_command(self.shared.s.identity.cgroup_id, c),
            _ => None,
        };
        let decision =
            self.shared
                .decide(&self.user, channel, command.as_deref(), caused_by.is_some());
        let newline = if pty.is_some() { "\r\n" } else { "\n" };
        let what = match (channel, &command) {
            (SshChannel::Exec, Some(c)) => format!("command {c:?}"),
            (SshChannel::Subsystem, Some(name)) => format!("subsystem {name:?}"),
            _ => "interactive shell".to_string(),
        };
        let mut approval_id = None;
        let refusal = match decision.action {
            Action::Allow => None,
            Action::Deny => Some(format!("warden: {what} denied by rule {:?}", decision.rule)),
            Action::Approve => match self
                .hold(&decision, channel, &command, &caused_by, to_client, newline)
                .await
            {
                Ok(id) => {
                    approval_id = Some(id);
                    None
                }
                Err((id, why)) => {
                    approval_id = id;
                    Some(format!("warden: {what} {why}"))
                }
            },
        };
        if let Some(message) = refusal {
            self.refuse(
                id, channel, want_reply, &message, newline, to_client, to_server,
            )
            .await;
            let mut row = self.shared.row(
                started,
                "deny",
                decision.rule,
                SshFields {
                    user: self.user.clone(),
                    channel: channel.as_str(),
                    command,
                    exit_status: (channel != SshChannel::Subsystem).then_some(REFUSED_EXIT),
                    recording: None,
                },
            );
            row.approval_id = approval_id;
            row.caused_by = caused_by;
            row.error = Some(message);
            self.shared.s.audit.record_request(row);
            return None;
        }

        let sent = match (channel, &command) {
            (SshChannel::Exec, Some(c)) => to_server.exec(true, c.as_bytes()).await,
            (SshChannel::Subsystem, Some(name)) => {
                to_server.request_subsystem(true, name.as_str()).await
            }
            _ => to_server.request_shell(true).await,
        };
        let ok = sent.is_ok() && replies.recv().await.unwrap_or(false);
        if ok && channel != SshChannel::Subsystem {
            output.lock().unwrap_or_else(|e| e.into_inner()).recording =
                self.record(channel, command.as_deref(), pty, started);
        }
        self.reply(id, want_reply, ok).await;
        Some(Running {
            start: started,
            channel,
            command,
            rule: decision.rule,
            approval_id,
            caused_by,
        })
    }

    /// Holds the request for reviewers, telling the client on stderr.
    /// Ok(approval id) once approved; Err((id, why)) otherwise.
    async fn hold(
        &self,
        decision: &crate::policy::Decision,
        channel: SshChannel,
        command: &Option<String>,
        caused_by: &Option<Link>,
        to_client: &ChannelWriteHalf<Msg>,
        newline: &str,
    ) -> Result<String, (Option<String>, String)> {
        let s = &self.shared.s;
        let (Some(approvals), Some(rule)) = (&s.approvals, &decision.approval) else {
            return Err((
                None,
                format!(
                    "held by rule {:?} for approval, and this agent serves no approvals",
                    decision.rule
                ),
            ));
        };
        let mut context = std::collections::BTreeMap::new();
        context.insert("ssh user", self.user.clone());
        context.insert("channel", channel.as_str().to_string());
        context.insert("target", s.login.target.clone());
        let mut ticket = approvals.submit(HoldRequest {
            session_id: s.session_id.clone(),
            protocol: "ssh",
            identity: s.identity.clone(),
            workload: s.workload.clone(),
            destination: s.destination,
            rule: decision.rule.clone(),
            // A shell has no command: the reviewer sees "shell".
            request: command
                .clone()
                .unwrap_or_else(|| channel.as_str().to_string()),
            context,
            caused_by: caused_by.clone(),
            approval: rule.clone(),
        });
        let notice = format!("warden: {}{newline}", ticket.notice());
        let _ = to_client
            .extended_data_bytes(1, bytes::Bytes::from(notice))
            .await;
        let resolution = ticket.wait().await;
        let id = ticket.id().to_string();
        match resolution.refusal(&id) {
            None => {
                ticket.executed();
                Ok(id)
            }
            Some(why) => Err((
                Some(id),
                format!("held by rule {:?} and {why}", decision.rule),
            )),
        }
    }

    /// Ends a refused request on its channel: the reason on stderr and an
    /// exit status for an exec or a shell, a failure for a subsystem; the
    /// connection stays usable for other channels.
    #[allow(clippy::too_many_arguments)]
    async fn refuse(
        &self,
        id: ChannelId,
        channel: SshChannel,
        want_reply: bool,
        message: &str,
        newline: &str,
        to_client: &ChannelWriteHalf<Msg>,
        to_server: &ChannelWriteHalf<client::Msg>,
    ) {
        if channel == SshChannel::Subsystem {
            self.reply(id, want_reply, false).await;
        } else {
            self.reply(id, want_reply, true).await;
            let text = bytes::Bytes::from(format!("{message}{newline}"));
            let _ = to_client.extended_data_bytes(1, text).await;
            let _ = to_client.exit_status(REFUSED_EXIT).await;
        }
        let _ = to_client.eof().await;
        let _ = to_client.close().await;
        // Last: the server's close ends the task that also closes the client's side.
        let _ = to_server.close().await;
    }

    fn record(
        &self,
        channel: SshChannel,
        command: Option<&str>,
        pty: Option<&Pty>,
        started: DateTime<Utc>,
    ) -> Option<Recording> {
        let dir = self.shared.s.recordings.as_ref()?;
        let s = &self.shared.s;
        let title = format!("{}@{} ({})", self.user, s.destination, channel.as_str());
        let header = CastHeader {
            width: pty.map_or(80, |p| p.cols),
            height: pty.map_or(24, |p| p.rows),
            started,
            command,
            title: &title,
            term: pty.map(|p| p.term.as_str()),
        };
        let name = format!("{}-{}", s.session_id, self.number);
        match Recording::create(dir, &name, &header) {
            Ok(recording) => Some(recording),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot record the SSH channel");
                None
            }
        }
    }

    fn finish(&self, running: Running, output: &Mutex<Output>) {
        let (recording, exit_status) = {
            let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
            (out.recording.take(), out.exit_status)
        };
        let recording = recording.and_then(|r| match r.finish() {
            Ok(path) => Some(path.display().to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "the SSH recording could not be completed");
                None
            }
        });
        // A held request that ran is an allowed one; its `approval_id` says
        // who released it.
        let mut row = self.shared.row(
            running.start,
            "allow",
            running.rule,
            SshFields {
                user: self.user.clone(),
                channel: running.channel.as_str(),
                command: running.command,
                exit_status,
                recording,
            },
        );
        row.approval_id = running.approval_id;
        row.caused_by = running.caused_by;
        self.shared.s.audit.record_request(row);
    }
}

struct Start<'a> {
    id: ChannelId,
    channel: SshChannel,
    command: Option<String>,
    want_reply: bool,
    pty: Option<&'a Pty>,
}

/// The server's side of the channel, to the client: output (recorded),
/// exit status, end, and the answers to requests passed on.
async fn server_to_client(
    mut from_server: ChannelReadHalf,
    to_client: Arc<ChannelWriteHalf<Msg>>,
    handle: server::Handle,
    id: ChannelId,
    output: Arc<Mutex<Output>>,
    replies: mpsc::UnboundedSender<bool>,
) {
    let record = |data: &[u8]| {
        let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(recording) = out.recording.as_mut()
            && let Err(e) = recording.output(data)
        {
            tracing::warn!(error = %e, "SSH recording stopped");
            out.recording = None;
        }
    };
    while let Some(msg) = from_server.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                record(&data);
                if to_client.data_bytes(data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                record(&data);
                if to_client.extended_data_bytes(ext, data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::Eof => {
                let _ = to_client.eof().await;
            }
            ChannelMsg::ExitStatus { exit_status } => {
                output.lock().unwrap_or_else(|e| e.into_inner()).exit_status = Some(exit_status);
                let _ = to_client.exit_status(exit_status).await;
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                let _ = handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await;
            }
            ChannelMsg::Success => {
                let _ = replies.send(true);
            }
            ChannelMsg::Failure => {
                let _ = replies.send(false);
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = to_client.close().await;
}

/// A forwarded TCP channel, bytes both ways until either side ends.
pub(super) async fn pipe(client: Channel<Msg>, upstream: Channel<client::Msg>) {
    let mut a = client.into_stream();
    let mut b = upstream.into_stream();
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}
