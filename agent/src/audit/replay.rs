//! `warden audit replay SESSION_ID`: one session (a database connection, an
//! HTTP keep-alive connection...) as a timeline: its connection row (who,
//! where, decision, bytes, times), then its requests in `seq` order, each
//! with its offset from the session's start, its duration, decision and rule,
//! and what it was, then the steps of the approvals its requests waited for
//! (`approvals`), in time order. It reads through the same tables as
//! `warden audit sql` ([`AuditQuery`]), with SQL.
use std::{collections::HashMap, fmt::Write as _, io::Write, sync::Arc};

use arrow::{
    array::{
        Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch,
        StringArray, TimestampMicrosecondArray,
    },
    compute::cast,
    datatypes::{DataType, Field, TimeUnit},
};
use chrono::{DateTime, SecondsFormat};

use super::query::{AuditQuery, QueryError};

/// Prints the session's timeline. A session id that matches no row is an
/// error; so is a prefix that matches several sessions (a prefix that
/// matches one is enough).
pub async fn replay(
    query: &AuditQuery,
    session: &str,
    out: &mut dyn Write,
) -> Result<(), QueryError> {
    let mut rows = load(query, session).await?;
    let mut id = session.to_string();
    if rows.is_empty() {
        id = resolve_prefix(query, session).await?;
        rows = load(query, &id).await?;
    }
    out.write_all(render(&id, &rows).as_bytes())?;
    out.flush()?;
    Ok(())
}

/// A session's rows.
struct Session {
    /// Its connection rows (at most one, normally).
    conn: Cells,
    /// Its requests in order.
    reqs: Cells,
    /// The steps of its approvals, in time order.
    steps: Cells,
}

impl Session {
    fn is_empty(&self) -> bool {
        self.conn.is_empty() && self.reqs.is_empty() && self.steps.is_empty()
    }
}

async fn load(query: &AuditQuery, session: &str) -> Result<Session, QueryError> {
    let id = sql_string(session);
    let conn = query
        .collect(&format!(
            "SELECT * FROM connections WHERE session_id = {id} ORDER BY end_time"
        ))
        .await?;
    let reqs = query
        .collect(&format!(
            "SELECT * FROM requests WHERE session_id = {id} ORDER BY seq, start_time"
        ))
        .await?;
    let steps = query
        .collect(&format!(
            "SELECT * FROM approvals WHERE session_id = {id} ORDER BY start_time"
        ))
        .await?;
    Ok(Session {
        conn: Cells::new(conn)?,
        reqs: Cells::new(reqs)?,
        steps: Cells::new(steps)?,
    })
}

/// The one session whose id starts with `prefix`.
async fn resolve_prefix(query: &AuditQuery, prefix: &str) -> Result<String, QueryError> {
    let not_found = || {
        QueryError::NotFound(format!(
            "no session {prefix:?} in the audit under {dir}: neither `connections` nor `requests` has a row \
             with that session_id. A connection's row is written when it ends and a request's when it \
             completes, each at its table's next rotation (every 60 s by default, and at the agent's \
             shutdown). Recent sessions: warden audit sql --audit-dir {dir} \"SELECT session_id, start_time, \
             exe, dst_addr, protocol FROM connections ORDER BY start_time DESC LIMIT 20\"",
            dir = query.dir().display()
        ))
    };
    // LIKE would read `%`, `_` and `\` as patterns.
    if prefix.is_empty() || prefix.contains(['%', '_', '\\']) {
        return Err(not_found());
    }
    let pattern = sql_string(&format!("{prefix}%"));
    let found = Cells::new(
        query
            .collect(&format!(
                "SELECT DISTINCT session_id FROM (SELECT session_id FROM connections \
                 UNION ALL SELECT session_id FROM requests UNION ALL SELECT session_id FROM approvals) \
                 WHERE session_id LIKE {pattern} \
                 ORDER BY session_id LIMIT 6"
            ))
            .await?,
    )?;
    let ids: Vec<String> = (0..found.len())
        .filter_map(|i| found.str("session_id", i))
        .collect();
    match ids.as_slice() {
        [] => Err(not_found()),
        [one] => Ok(one.clone()),
        several => Err(QueryError::NotFound(format!(
            "several sessions start with {prefix:?} ({}{}): give more of the id",
            several[..several.len().min(5)].join(", "),
            if several.len() > 5 { ", ..." } else { "" }
        ))),
    }
}

/// A string as an SQL literal.
fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The timeline as text.
fn render(id: &str, session: &Session) -> String {
    let Session { conn, reqs, steps } = session;
    let mut s = String::new();
    let _ = writeln!(s, "session {id}");
    let start = if !conn.is_empty() {
        connection(&mut s, conn, reqs);
        conn.micros("start_time", 0)
    } else {
        // A request held for approval has no `requests` row before it
        // completes: its steps say who and where then.
        let (first, what) = if reqs.is_empty() {
            (steps, "approval step")
        } else {
            (reqs, "request")
        };
        let _ = writeln!(
            s,
            "connection: no row yet (the connection is still open, or the agent stopped before it \
             ended); offsets are from its first {what}"
        );
        who(&mut s, first);
        if let Some(line) = database(reqs) {
            let _ = writeln!(s, "  database  {line}");
        }
        first.micros("start_time", 0)
    };
    let start = start.unwrap_or_default();
    if reqs.is_empty() {
        let _ = writeln!(s, "requests: none decoded");
    } else {
        requests(&mut s, reqs, start);
    }
    if !steps.is_empty() {
        approvals(&mut s, steps, start);
    }
    s
}

/// The requests, one per line.
fn requests(s: &mut String, reqs: &Cells, start: i64) {
    let _ = writeln!(s, "requests: {}", reqs.len());
    let lines: Vec<[String; 4]> = (0..reqs.len())
        .map(|i| {
            let offset = offset(reqs, i, start);
            let duration = reqs
                .float("duration_ms", i)
                .map_or_else(|| "?".to_string(), |d| format!("{d:.3} ms"));
            let verdict = format!(
                "{} {}",
                reqs.str("decision", i).unwrap_or_default(),
                reqs.str("rule", i).unwrap_or_default()
            );
            [offset, duration, verdict, request(reqs, i)]
        })
        .collect();
    let [w0, w1, w2, _] = widths(&lines);
    for [offset, duration, verdict, what] in &lines {
        let _ = writeln!(
            s,
            "  {offset:>w0$}  {duration:>w1$}  {verdict:<w2$}  {what}"
        );
    }
}

/// The widest cell of each column, in characters, to align them.
fn widths<const N: usize>(lines: &[[String; N]]) -> [usize; N] {
    let mut widths = [0; N];
    for line in lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// The approval steps, one per line: offset, step, approval id, details.
fn approvals(s: &mut String, steps: &Cells, start: i64) {
    let _ = writeln!(s, "approvals: {}", steps.len());
    let lines: Vec<[String; 4]> = (0..steps.len())
        .map(|i| {
            [
                offset(steps, i, start),
                steps.str("step", i).unwrap_or_default(),
                steps.str("approval_id", i).unwrap_or_default(),
                approval_step(steps, i),
            ]
        })
        .collect();
    let [w0, w1, w2, _] = widths(&lines);
    for [offset, step, id, what] in &lines {
        let line = format!("  {offset:>w0$}  {step:<w1$}  {id:<w2$}  {what}");
        let _ = writeln!(s, "{}", line.trim_end());
    }
}

/// What step `i` of an approval says: the held request when it starts, the
/// reviewer and the count of approvals later, the reason if any.
fn approval_step(a: &Cells, i: usize) -> String {
    let step = a.str("step", i).unwrap_or_default();
    let count = || {
        format!(
            "{}/{} approvals",
            a.int("approvals", i).unwrap_or_default(),
            a.int("quorum", i).unwrap_or_default()
        )
    };
    let mut parts = Vec::new();
    if step == "requested" {
        parts.push(format!("rule {}", a.str("rule", i).unwrap_or_default()));
        parts.push(format!("quorum {}", a.int("quorum", i).unwrap_or_default()));
        parts.push(format!("expires {}", time(a.micros("expires_at", i))));
    } else {
        if let Some(reviewer) = a.str("reviewer", i) {
            let mut by = format!("by {reviewer}");
            if let Some(email) = a.str("reviewer_email", i) {
                let _ = write!(by, " <{email}>");
            }
            parts.push(by);
        }
        if matches!(step.as_str(), "approved" | "executed") {
            parts.push(count());
        }
    }
    if let Some(reason) = a.str("reason", i) {
        parts.push(format!("reason: {}", one_line(&reason)));
    }
    let mut s = parts.join(", ");
    if step == "requested" {
        let _ = write!(
            s,
            ": {}",
            one_line(&a.str("request", i).unwrap_or_default())
        );
    }
    s
}

/// Row `i`'s start as an offset from the session's.
fn offset(c: &Cells, i: usize, start: i64) -> String {
    c.micros("start_time", i).map_or_else(
        || "?".to_string(),
        |t| format!("+{:.3} ms", (t - start) as f64 / 1000.0),
    )
}

/// The connection's row: who, where, decision, bytes, times, error.
fn connection(s: &mut String, c: &Cells, reqs: &Cells) {
    let _ = writeln!(s, "connection");
    who(s, c);
    let mut place = format!(
        "{} {}",
        c.str("transport", 0).unwrap_or_default(),
        endpoint(c, 0)
    );
    if let Some(p) = c.str("protocol", 0) {
        let _ = write!(place, ", protocol {p}");
    }
    if let Some(n) = c.str("server_name", 0) {
        let _ = write!(place, ", server name {n}");
    }
    if let Some(t) = c.str("tls", 0) {
        let _ = write!(place, ", tls {t}");
    }
    let _ = writeln!(s, "  where     {place}");
    if let Some(line) = database(reqs) {
        let _ = writeln!(s, "  database  {line}");
    }
    let _ = writeln!(
        s,
        "  decision  {} (rule {})",
        c.str("decision", 0).unwrap_or_default(),
        c.str("rule", 0).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  bytes     {} up, {} down",
        c.int("bytes_up", 0).unwrap_or_default(),
        c.int("bytes_down", 0).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  time      {} to {} ({:.3} ms)",
        time(c.micros("start_time", 0)),
        time(c.micros("end_time", 0)),
        c.float("duration_ms", 0).unwrap_or_default()
    );
    if let Some(e) = c.str("error", 0) {
        let _ = writeln!(s, "  error     {}", one_line(&e));
    }
    if c.len() > 1 {
        let _ = writeln!(
            s,
            "  note      {} connection rows share this session id; this is the last to end",
            c.len()
        );
    }
}

/// The process (every table of traffic carries it): pid, command, user,
/// unit, workload.
fn who(s: &mut String, c: &Cells) {
    if c.is_empty() {
        return;
    }
    let mut line = format!("pid {}", c.int("pid", 0).unwrap_or_default());
    if let Some(comm) = c.str("comm", 0) {
        let _ = write!(line, " {comm}");
    }
    if let Some(exe) = c.str("exe", 0) {
        let _ = write!(line, " ({exe})");
    }
    match (c.str("user", 0), c.int("uid", 0)) {
        (Some(user), Some(uid)) => {
            let _ = write!(line, ", user {user} (uid {uid})");
        }
        (None, Some(uid)) => {
            let _ = write!(line, ", uid {uid}");
        }
        (Some(user), None) => {
            let _ = write!(line, ", user {user}");
        }
        (None, None) => {}
    }
    for (label, column) in [
        ("unit", "unit"),
        ("container", "container_id"),
        ("workload", "workload"),
    ] {
        if let Some(v) = c.str(column, 0) {
            let _ = write!(line, ", {label} {v}");
        }
    }
    let _ = writeln!(s, "  who       {line}");
    if let Some(cmdline) = c.str("cmdline", 0) {
        let _ = writeln!(s, "  command   {}", one_line(&cmdline));
    }
    if c.str("transport", 0).is_none() {
        // A requests row: where it went is on it too.
        let _ = writeln!(s, "  where     {}", endpoint(c, 0));
    }
}

/// `database crm as app`, from the first request that names them.
fn database(reqs: &Cells) -> Option<String> {
    (0..reqs.len()).find_map(|i| {
        let db = reqs.str("database", i);
        let user = reqs.str("db_user", i);
        match (db, user) {
            (None, None) => None,
            (db, user) => Some(format!(
                "{}{}",
                db.unwrap_or_else(|| "?".into()),
                user.map(|u| format!(" as {u}")).unwrap_or_default()
            )),
        }
    })
}

fn endpoint(c: &Cells, i: usize) -> String {
    let addr = c.str("dst_addr", i).unwrap_or_default();
    let port = c.int("dst_port", i).unwrap_or_default();
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// What request `i` was, on one line.
fn request(r: &Cells, i: usize) -> String {
    let mut s = format!("#{} ", r.int("seq", i).unwrap_or_default());
    let protocol = r.str("protocol", i).unwrap_or_default();
    if protocol == "postgres"
        || (r.str("http_method", i).is_none() && r.str("statement", i).is_some())
    {
        let _ = write!(
            s,
            "SQL {}: {}",
            r.str("statement_class", i).as_deref().unwrap_or("unknown"),
            r.str("statement", i)
                .map_or_else(|| "(no statement)".into(), |t| one_line(&t))
        );
        if let Some(rows) = r.int("rows", i) {
            let _ = write!(s, " -> {rows} row{}", if rows == 1 { "" } else { "s" });
        }
        if let Some(m) = r.int("masked", i).filter(|m| *m > 0) {
            let _ = write!(s, ", masked {m}");
        }
    } else if let Some(method) = r.str("http_method", i) {
        let _ = write!(
            s,
            "{method} {} {} -> {}",
            r.str("http_host", i).as_deref().unwrap_or("?"),
            r.str("http_path", i).as_deref().unwrap_or("?"),
            r.int("http_status", i)
                .map_or_else(|| "no status".into(), |c| c.to_string())
        );
        if protocol == "llm" {
            s.push_str(" | ");
            s.push_str(&llm(r, i));
        } else if let Some(m) = r.int("masked", i).filter(|m| *m > 0) {
            let _ = write!(s, ", masked {m}");
        }
    } else if protocol == "ssh" {
        let channel = r.str("ssh_channel", i).unwrap_or_default();
        let _ = write!(
            s,
            "SSH {channel} as {}",
            r.str("ssh_user", i).as_deref().unwrap_or("?")
        );
        if let Some(command) = r.str("command", i) {
            let _ = write!(s, ": {}", one_line(&command));
        }
        if let Some(status) = r.int("exit_status", i) {
            let _ = write!(s, " -> exit {status}");
        }
        if let Some(recording) = r.str("recording", i) {
            let _ = write!(s, " | recording {recording}");
        }
    } else {
        let _ = write!(s, "{protocol} request");
    }
    if let Some(approval) = r.str("approval_id", i) {
        let _ = write!(s, " | approval {approval}");
    }
    match (r.str("sqlstate", i), r.str("error", i)) {
        (Some(state), Some(e)) => {
            let _ = write!(s, " | error {state}: {}", one_line(&e));
        }
        (None, Some(e)) => {
            let _ = write!(s, " | error: {}", one_line(&e));
        }
        (Some(state), None) => {
            let _ = write!(s, " | error {state}");
        }
        (None, None) => {}
    }
    s
}

/// The LLM columns: API, model, tokens, redactions and maskings, tool calls.
fn llm(r: &Cells, i: usize) -> String {
    let mut s = format!(
        "{} {}, model {}",
        r.str("llm_provider", i).unwrap_or_default(),
        r.str("llm_endpoint", i).unwrap_or_default(),
        r.str("llm_model", i).as_deref().unwrap_or("?")
    );
    if r.flag("llm_stream", i) == Some(true) {
        s.push_str(", streamed");
    }
    let tokens = |c| {
        r.int(c, i)
            .map_or_else(|| "?".to_string(), |n| n.to_string())
    };
    let _ = write!(
        s,
        ", tokens {} in / {} out, redacted {}, masked {}",
        tokens("input_tokens"),
        tokens("output_tokens"),
        r.int("redacted", i).unwrap_or_default(),
        r.int("masked", i).unwrap_or_default()
    );
    let calls = r.list("tool_calls", i);
    if calls.is_empty() {
        s.push_str(", no tool calls");
    } else {
        let calls: Vec<String> = calls.iter().map(|c| tool_call(c)).collect();
        let _ = write!(s, ", tool calls: {}", calls.join(", "));
    }
    s
}

/// `{"name": "f", "arguments": ...}` as `f(arguments)`.
fn tool_call(json: &str) -> String {
    let Ok(serde_json::Value::Object(call)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return one_line(json);
    };
    let name = call.get("name").and_then(|n| n.as_str()).unwrap_or("?");
    let args = match call.get("arguments") {
        Some(serde_json::Value::String(a)) => a.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    one_line(&format!("{name}({args})"))
}

/// Line breaks and tabs as spaces, so that a request stays on its line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if matches!(c, '\n' | '\r' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn time(micros: Option<i64>) -> String {
    micros
        .and_then(DateTime::from_timestamp_micros)
        .map_or_else(
            || "?".into(),
            |t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        )
}

/// The cells of a query's result by column name, whatever the engine's
/// exact types (strings as views, narrower integers...).
struct Cells {
    columns: HashMap<String, ArrayRef>,
    rows: usize,
}

impl Cells {
    fn new(batch: RecordBatch) -> Result<Self, QueryError> {
        let rows = batch.num_rows();
        let schema = batch.schema();
        let mut columns = HashMap::new();
        for (field, array) in schema.fields().iter().zip(batch.columns()) {
            let target = match array.data_type() {
                DataType::Utf8View | DataType::LargeUtf8 | DataType::Dictionary(..) => {
                    Some(DataType::Utf8)
                }
                DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64 => Some(DataType::Int64),
                DataType::Float16 | DataType::Float32 => Some(DataType::Float64),
                DataType::Timestamp(unit, tz)
                    if *unit != TimeUnit::Microsecond || tz.as_deref() != Some("UTC") =>
                {
                    Some(DataType::Timestamp(
                        TimeUnit::Microsecond,
                        Some("UTC".into()),
                    ))
                }
                DataType::LargeList(_) | DataType::ListView(_) | DataType::FixedSizeList(..) => {
                    Some(DataType::List(Arc::new(Field::new_list_field(
                        DataType::Utf8,
                        true,
                    ))))
                }
                _ => None,
            };
            let array = match target {
                Some(t) => cast(array, &t)?,
                None => array.clone(),
            };
            columns.insert(field.name().clone(), array);
        }
        Ok(Cells { columns, rows })
    }

    fn len(&self) -> usize {
        self.rows
    }

    fn is_empty(&self) -> bool {
        self.rows == 0
    }

    fn get<T: 'static>(&self, column: &str, row: usize) -> Option<&T> {
        let array = self.columns.get(column)?;
        if row >= array.len() || array.is_null(row) {
            return None;
        }
        array.as_any().downcast_ref::<T>()
    }

    fn str(&self, column: &str, row: usize) -> Option<String> {
        self.get::<StringArray>(column, row)
            .map(|a| a.value(row).to_string())
    }

    fn int(&self, column: &str, row: usize) -> Option<i64> {
        self.get::<Int64Array>(column, row).map(|a| a.value(row))
    }

    fn float(&self, column: &str, row: usize) -> Option<f64> {
        self.get::<Float64Array>(column, row).map(|a| a.value(row))
    }

    fn flag(&self, column: &str, row: usize) -> Option<bool> {
        self.get::<BooleanArray>(column, row).map(|a| a.value(row))
    }

    fn micros(&self, column: &str, row: usize) -> Option<i64> {
        self.get::<TimestampMicrosecondArray>(column, row)
            .map(|a| a.value(row))
    }

    /// A list of strings; a null list (a file older than the column) is empty.
    fn list(&self, column: &str, row: usize) -> Vec<String> {
        let Some(list) = self.get::<ListArray>(column, row) else {
            return Vec::new();
        };
        let values = list.value(row);
        let Ok(values) = cast(&values, &DataType::Utf8) else {
            return Vec::new();
        };
        values
            .as_string::<i32>()
            .iter()
            .flatten()
            .map(str::to_string)
            .collect()
    }
}
