//! `warden audit sql` and `warden audit tail`: the audit files read back
//! with SQL (DataFusion), on the host that wrote them.
//!
//! [`AuditQuery`] registers the tables, `connections`, `requests`,
//! `approvals` and `events`, as listing tables over `<dir>/connections/`,
//! `<dir>/requests/` and so on: every
//! `*.parquet` file under them (the writer's `.<name>.tmp` files never
//! match), with the Hive partitions `date=YYYY-MM-DD/hour=H` as the
//! columns `date` (a date) and `hour` (an integer), as DuckDB's and Spark's
//! Hive partitioning show them. The tables have the writer's current
//! schema with every column nullable: files of an older schema version lack
//! the newer columns, which read as null. `warden audit replay`
//! ([`super::replay`]) queries the same tables.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs,
    future::Future,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arrow::{
    array::RecordBatch,
    datatypes::{DataType, Field, Schema, SchemaRef},
    util::display::{ArrayFormatter, FormatOptions},
};
use datafusion::{
    common::Column,
    datasource::{
        MemTable, TableProvider,
        file_format::parquet::ParquetFormat,
        listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl},
    },
    error::DataFusionError,
    prelude::{DataFrame, Expr, SQLOptions, SessionConfig, SessionContext, cast},
};
use futures::StreamExt;

use super::{
    APPROVALS_TABLE, CONNECTIONS_TABLE, EVENTS_TABLE, REQUESTS_TABLE, approvals_schema,
    connections_schema, events_schema, requests_schema,
};

/// Where the tables are documented; said with every error about a query.
pub const TABLES_HINT: &str = "The audit has four tables: `connections` (one row per connection; \
docs/audit.md, \"The `connections` table\"), `requests` (one row per SQL statement, HTTP request \
or LLM call; docs/audit.md, \"The `requests` table\"), `approvals` (one row per step of a request \
held for approval; docs/audit.md, \"The `approvals` table\") and `events` (the agent's own: start, \
stop, audit outages; docs/audit.md, \"The `events` table\"), all with the partition columns `date` \
and `hour`. `connections` and `requests` join on `session_id`, `requests` and `approvals` on \
`approval_id`. `DESCRIBE requests` lists a table's columns.";

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned text with a header.
    Table,
    /// RFC 4180 CSV with a header line.
    Csv,
    /// One JSON object per row and line (nulls included).
    Json,
}

/// One of the audit tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditTable {
    Connections,
    Requests,
    Approvals,
    Events,
}

impl AuditTable {
    pub fn name(self) -> &'static str {
        match self {
            AuditTable::Connections => CONNECTIONS_TABLE,
            AuditTable::Requests => REQUESTS_TABLE,
            AuditTable::Approvals => APPROVALS_TABLE,
            AuditTable::Events => EVENTS_TABLE,
        }
    }

    /// The schema of the files (without `date` and `hour`) as the engine
    /// reads them: the writer's current one with every column nullable, so
    /// that files written before a column existed read with nulls in it.
    pub fn file_schema(self) -> SchemaRef {
        let schema = match self {
            AuditTable::Connections => connections_schema(),
            AuditTable::Requests => requests_schema(),
            AuditTable::Approvals => approvals_schema(),
            AuditTable::Events => events_schema(),
        };
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
    }
}

/// The Hive partition columns and their types, as DuckDB (with
/// `hive_partitioning`) and Spark type them: `date` a date, `hour` an integer.
pub fn partition_columns() -> Vec<(String, DataType)> {
    vec![
        ("date".to_string(), DataType::Date32),
        ("hour".to_string(), DataType::Int32),
    ]
}

/// The partition columns as the listing reads them from the paths: `hour`
/// stays the directory's text there, and the table casts it. Typed as an
/// integer in the listing, an equality on both `date` and `hour` would make
/// DataFusion list the prefix `date=.../hour=5` and miss the zero-padded
/// `hour=05` directories that earlier builds wrote.
fn listed_partition_columns() -> Vec<(String, DataType)> {
    vec![
        ("date".to_string(), DataType::Date32),
        ("hour".to_string(), DataType::Utf8),
    ]
}

/// What can go wrong with a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL does not parse or plan (a typo, an unknown table or column).
    #[error("{message}\n{TABLES_HINT}")]
    Sql { message: String },
    /// The query planned but failed while running (an unreadable file, a
    /// failed cast...).
    #[error("the query failed: {message}")]
    Run { message: String },
    /// A request the audit cannot answer (e.g. a session with no rows).
    #[error("{0}")]
    NotFound(String),
    /// Writing the results failed (for example, stdout was closed).
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

impl QueryError {
    /// Whether it is only the reader of the output going away (`| head`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, QueryError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }

    fn run(e: &DataFusionError) -> Self {
        QueryError::Run {
            message: describe(e),
        }
    }
}

impl From<arrow::error::ArrowError> for QueryError {
    fn from(e: arrow::error::ArrowError) -> Self {
        match e {
            arrow::error::ArrowError::IoError(_, io) => QueryError::Output(io),
            e => QueryError::Run {
                message: e.to_string(),
            },
        }
    }
}

/// A DataFusion error as one readable line: the root cause, without the
/// engine's wrapping (`SQL error: ParserError("...")`).
fn describe(e: &DataFusionError) -> String {
    match e.find_root() {
        DataFusionError::SQL(parse, _) => {
            let text = parse.to_string();
            let text = text.strip_prefix("sql parser error: ").unwrap_or(&text);
            format!("the SQL does not parse: {text}")
        }
        root => root.strip_backtrace(),
    }
}

/// The audit tables of one audit directory, ready for SQL.
pub struct AuditQuery {
    ctx: SessionContext,
    dir: PathBuf,
}

impl AuditQuery {
    /// Registers `connections`, `requests`, `approvals` and `events` over
    /// `<dir>`. A table whose directory is missing (an audit written before
    /// the table existed) is an empty table.
    pub fn open(dir: &Path) -> Result<Self, QueryError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("warden", "audit");
        let ctx = SessionContext::new_with_config(config);
        for table in [
            AuditTable::Connections,
            AuditTable::Requests,
            AuditTable::Approvals,
            AuditTable::Events,
        ] {
            let provider = table_provider(&ctx, &dir.join(table.name()), table)?;
            ctx.register_table(table.name(), provider)
                .map_err(|e| QueryError::run(&e))?;
        }
        Ok(AuditQuery {
            ctx,
            dir: dir.to_path_buf(),
        })
    }

    /// The audit directory the tables read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Plans one read-only statement: queries, `DESCRIBE`, `SHOW`, `EXPLAIN`;
    /// nothing that writes (`COPY ... TO`, `INSERT`, `CREATE`).
    pub async fn plan(&self, sql: &str) -> Result<DataFrame, QueryError> {
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false);
        self.ctx
            .sql_with_options(sql, options)
            .await
            .map_err(|e| QueryError::Sql {
                message: describe(&e),
            })
    }

    /// Runs the statement and returns all its rows in one batch.
    pub async fn collect(&self, sql: &str) -> Result<RecordBatch, QueryError> {
        let df = self.plan(sql).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.map_err(|e| QueryError::run(&e))?;
        Ok(arrow::compute::concat_batches(&schema, &batches)?)
    }

    /// Runs the statement and prints its rows to `out`; returns how many.
    /// CSV and JSON stream; the table format needs every row first to align
    /// the columns.
    pub async fn print(
        &self,
        sql: &str,
        format: Format,
        out: &mut dyn Write,
    ) -> Result<usize, QueryError> {
        let df = self.plan(sql).await?;
        print_dataframe(df, format, out).await
    }
}

/// The table over `dir`: a listing of its `*.parquet` files with the
/// partition columns (an empty table when `dir` does not exist), seen
/// through a projection that types `hour` (see [`listed_partition_columns`]).
fn table_provider(
    ctx: &SessionContext,
    dir: &Path,
    table: AuditTable,
) -> Result<Arc<dyn TableProvider>, QueryError> {
    let file_schema = table.file_schema();
    let listed: Arc<dyn TableProvider> = if dir.is_dir() {
        // A trailing slash makes it a directory (a collection) for the engine.
        let url =
            ListingTableUrl::parse(format!("{}/", dir.display())).map_err(|e| QueryError::Run {
                message: format!("cannot read {}: {}", dir.display(), describe(&e)),
            })?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            // `.part-....parquet.tmp` files being written never match.
            .with_file_extension(".parquet")
            .with_table_partition_cols(listed_partition_columns());
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(file_schema.clone());
        Arc::new(ListingTable::try_new(config).map_err(|e| QueryError::run(&e))?)
    } else {
        let mut fields: Vec<Field> = file_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(
            listed_partition_columns()
                .into_iter()
                .map(|(name, ty)| Field::new(name, ty, true)),
        );
        let empty = MemTable::try_new(Arc::new(Schema::new(fields)), vec![vec![]])
            .map_err(|e| QueryError::run(&e))?;
        Arc::new(empty)
    };
    let mut columns: Vec<Expr> = file_schema
        .fields()
        .iter()
        .map(|f| Expr::Column(Column::new_unqualified(f.name())))
        .collect();
    for (name, ty) in partition_columns() {
        columns.push(cast(Expr::Column(Column::new_unqualified(&name)), ty).alias(name));
    }
    let view = ctx
        .read_table(listed)
        .and_then(|df| df.select(columns))
        .map_err(|e| QueryError::run(&e))?;
    Ok(view.into_view())
}

/// Prints the rows of `df` to `out` in `format`; returns how many.
pub async fn print_dataframe(
    df: DataFrame,
    format: Format,
    out: &mut dyn Write,
) -> Result<usize, QueryError> {
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await.map_err(|e| QueryError::run(&e))?;
    let mut printer = Printer::new(format, schema);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| QueryError::run(&e))?;
        printer.batch(&batch, out)?;
    }
    printer.finish(out)
}

/// Writes batches in one of the [`Format`]s.
struct Printer {
    format: Format,
    schema: SchemaRef,
    /// The table format's rows, kept until the end to align the columns.
    held: Vec<RecordBatch>,
    header_done: bool,
    rows: usize,
}

impl Printer {
    fn new(format: Format, schema: SchemaRef) -> Self {
        Printer {
            format,
            schema,
            held: Vec::new(),
            header_done: false,
            rows: 0,
        }
    }

    fn batch(&mut self, batch: &RecordBatch, out: &mut dyn Write) -> Result<(), QueryError> {
        self.rows += batch.num_rows();
        match self.format {
            Format::Table => self.held.push(batch.clone()),
            Format::Json => {
                let mut writer = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(&mut *out);
                writer.write(batch)?;
                writer.finish()?;
            }
            Format::Csv => {
                if !self.header_done {
                    let names: Vec<String> = self
                        .schema
                        .fields()
                        .iter()
                        .map(|f| csv_field(f.name()))
                        .collect();
                    writeln!(out, "{}", names.join(","))?;
                    self.header_done = true;
                }
                write_csv(batch, out)?;
            }
        }
        Ok(())
    }

    fn finish(self, out: &mut dyn Write) -> Result<usize, QueryError> {
        match self.format {
            Format::Table => {
                let table = arrow::util::pretty::pretty_format_batches_with_schema(
                    self.schema,
                    &self.held,
                )?;
                writeln!(out, "{table}")?;
                writeln!(
                    out,
                    "{} row{}",
                    self.rows,
                    if self.rows == 1 { "" } else { "s" }
                )?;
            }
            Format::Csv if !self.header_done => {
                let names: Vec<String> = self
                    .schema
                    .fields()
                    .iter()
                    .map(|f| csv_field(f.name()))
                    .collect();
                writeln!(out, "{}", names.join(","))?;
            }
            Format::Csv | Format::Json => {}
        }
        out.flush()?;
        Ok(self.rows)
    }
}

/// Timestamps print as RFC 3339 (`...Z` for the audit's UTC columns), nulls
/// as empty cells.
fn cell_options() -> FormatOptions<'static> {
    FormatOptions::default().with_null("")
}

fn write_csv(batch: &RecordBatch, out: &mut dyn Write) -> Result<(), QueryError> {
    let options = cell_options();
    let formatters = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()?;
    let mut line = String::new();
    for row in 0..batch.num_rows() {
        line.clear();
        for (i, f) in formatters.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let mut cell = String::new();
            let _ = write!(cell, "{}", f.value(row));
            line.push_str(&csv_field(&cell));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `warden audit tail`'s settings.
#[derive(Clone, Debug)]
pub struct TailOptions {
    pub table: AuditTable,
    /// [`Format::Json`] or [`Format::Table`] (one table per file).
    pub format: Format,
    /// Print the files already there first.
    pub from_start: bool,
    /// How often to look for new files.
    pub poll: Duration,
}

impl TailOptions {
    pub const DEFAULT_POLL: Duration = Duration::from_millis(500);
}

/// Prints the rows of each new file of the table as it appears (all the
/// files first with `from_start`), in file order, until `stop` completes.
///
/// It polls the directory tree rather than using inotify: the writer adds a
/// file per table about once a minute, so a walk every 500 ms costs little
/// (directories whose mtime has not changed are not read again); polling
/// needs no watch per partition directory (new `date=`/`hour=` directories
/// appear all the time), no new dependency, and works where inotify sees
/// nothing (NFS, some bind and overlay mounts). A renamed-in `.parquet` is
/// always complete (files.rs), so a file is read once, when first seen.
pub async fn tail(
    dir: &Path,
    options: &TailOptions,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> Result<(), QueryError> {
    let table = options.table;
    let mut scanner = Scanner::new(dir.join(table.name()));
    let mut pending = scanner.scan();
    if !options.from_start {
        pending.clear();
    }
    let reader = FileReader::new(table);
    tokio::pin!(stop);
    loop {
        for file in pending {
            match reader.dataframe(&file).await {
                Ok(df) => {
                    let format = match options.format {
                        Format::Table => {
                            writeln!(out, "{}", file.display())?;
                            Format::Table
                        }
                        other => other,
                    };
                    match print_dataframe(df, format, out).await {
                        Ok(_) => {}
                        Err(e @ QueryError::Output(_)) => return Err(e),
                        Err(e) => warn_skipped(&file, &e),
                    }
                }
                Err(e) => warn_skipped(&file, &e),
            }
        }
        out.flush()?;
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(options.poll) => {}
        }
        pending = scanner.scan();
    }
}

fn warn_skipped(file: &Path, e: &QueryError) {
    // A file removed by retention between the listing and the read, or damaged.
    eprintln!("warden: audit tail: skipping {}: {e}", file.display());
}

/// Reads one file of a table as the table's rows, with `date` and `hour`
/// from its path.
struct FileReader {
    ctx: SessionContext,
    table: AuditTable,
}

impl FileReader {
    const NAME: &'static str = "audit_file";

    fn new(table: AuditTable) -> Self {
        FileReader {
            ctx: SessionContext::new(),
            table,
        }
    }

    async fn dataframe(&self, file: &Path) -> Result<DataFrame, QueryError> {
        let url =
            ListingTableUrl::parse(file.display().to_string()).map_err(|e| QueryError::run(&e))?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(self.table.file_schema());
        let listing = ListingTable::try_new(config).map_err(|e| QueryError::run(&e))?;
        self.ctx
            .deregister_table(Self::NAME)
            .map_err(|e| QueryError::run(&e))?;
        self.ctx
            .register_table(Self::NAME, Arc::new(listing))
            .map_err(|e| QueryError::run(&e))?;
        let (date, hour) = partition_literals(file);
        let sql = format!(
            "SELECT *, {date} AS date, {hour} AS hour FROM {}",
            Self::NAME
        );
        self.ctx.sql(&sql).await.map_err(|e| QueryError::run(&e))
    }
}

/// `date` and `hour` of a file's path as SQL literals (null when the path
/// has no such well-formed directory).
fn partition_literals(file: &Path) -> (String, String) {
    let mut date = "CAST(NULL AS DATE)".to_string();
    let mut hour = "CAST(NULL AS INT)".to_string();
    for part in file.iter().filter_map(|p| p.to_str()) {
        if let Some(d) = part.strip_prefix("date=")
            && d.len() == 10
            && d.chars().all(|c| c.is_ascii_digit() || c == '-')
        {
            date = format!("DATE '{d}'");
        } else if let Some(h) = part.strip_prefix("hour=")
            && let Ok(h) = h.parse::<u8>()
        {
            hour = format!("CAST({h} AS INT)");
        }
    }
    (date, hour)
}

/// Finds the `*.parquet` files that appeared under a table's directory since
/// the last scan.
struct Scanner {
    root: PathBuf,
    seen: HashSet<PathBuf>,
    /// Directories read so far: their mtime then, and their subdirectories.
    dirs: HashMap<PathBuf, (SystemTime, Vec<PathBuf>)>,
}

/// A directory modified this recently is read again even if its mtime did
/// not change: a file renamed in during the same mtime tick as the last read
/// would not change it.
const RACY: Duration = Duration::from_secs(2);

impl Scanner {
    fn new(root: PathBuf) -> Self {
        Scanner {
            root,
            seen: HashSet::new(),
            dirs: HashMap::new(),
        }
    }

    /// The files not returned before, sorted by path (partition, then the
    /// name, which starts with the time it was written).
    fn scan(&mut self) -> Vec<PathBuf> {
        let mut new = Vec::new();
        let root = self.root.clone();
        self.visit(&root, &mut new);
        new.sort();
        new
    }

    fn visit(&mut self, dir: &Path, new: &mut Vec<PathBuf>) {
        let Ok(mtime) = fs::metadata(dir).and_then(|m| m.modified()) else {
            self.dirs.remove(dir);
            return;
        };
        let recent = mtime.elapsed().map_or(true, |age| age < RACY);
        let subdirs = match self.dirs.get(dir) {
            Some((then, subdirs)) if *then == mtime && !recent => subdirs.clone(),
            _ => {
                let subdirs = self.read(dir, new);
                self.dirs
                    .insert(dir.to_path_buf(), (mtime, subdirs.clone()));
                subdirs
            }
        };
        for sub in subdirs {
            self.visit(&sub, new);
        }
    }

    /// Lists `dir`: collects its new `*.parquet` files, returns its
    /// partition subdirectories.
    fn read(&mut self, dir: &Path, new: &mut Vec<PathBuf>) -> Vec<PathBuf> {
        let mut subdirs = Vec::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return subdirs;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue; // `.<name>.parquet.tmp` being written
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() && name.contains('=') {
                subdirs.push(path);
            } else if kind.is_file() && name.ends_with(".parquet") && self.seen.insert(path.clone())
            {
                new.push(path);
            }
        }
        subdirs.sort();
        subdirs
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, SocketAddr},
        sync::Mutex,
    };

    use arrow::array::{Int16Array, RecordBatch};
    use chrono::{DateTime, TimeZone, Utc};
    use parquet::{
        arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
        file::{metadata::KeyValue, properties::WriterProperties},
    };

    use super::*;
    use crate::{
        audit::{
            ApprovalRow, ApprovalStep, AuditConfig, AuditWriter, ConnectionRow, HttpFields,
            LlmFields, REQUESTS_SCHEMA_VERSION, RequestRow, replay::replay,
        },
        identity::Identity,
    };

    fn at(h: u32, mi: u32, s: u32, micros: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 4, h, mi, s).single().unwrap()
            + chrono::Duration::microseconds(micros)
    }

    fn identity(pid: u32) -> Identity {
        Identity {
            pid,
            tid: pid,
            uid: 1001,
            gid: 1001,
            user: Some("alice".into()),
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            cmdline: Some("python3 bot.py".into()),
            cgroup_id: 42,
            cgroup_path: Some("/system.slice/bot.service".into()),
            unit: Some("bot.service".into()),
            container_id: None,
            pod: None,
        }
    }

    fn conn(session: &str, start: DateTime<Utc>, protocol: &'static str) -> ConnectionRow {
        ConnectionRow {
            session_id: session.into(),
            start_time: start,
            end_time: start + chrono::Duration::milliseconds(1500),
            transport: "tcp",
            identity: identity(4242),
            workload: Some("bot".into()),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 5432),
            protocol,
            server_name: None,
            tls: None,
            decision: "allow",
            rule: "default".into(),
            bytes_up: 100,
            bytes_down: 2000,
            error: None,
        }
    }

    fn statement(session: &str, seq: u64, start: DateTime<Utc>, sql: &str) -> RequestRow {
        RequestRow {
            session_id: session.into(),
            seq,
            start_time: start,
            end_time: start + chrono::Duration::microseconds(2_500),
            identity: identity(4242),
            workload: Some("bot".into()),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 5432),
            protocol: "postgres",
            database: Some("crm".into()),
            db_user: Some("app".into()),
            statement: Some(sql.into()),
            statement_class: Some("read"),
            tables_read: vec!["crm.customers".into()],
            tables_written: Vec::new(),
            functions: Vec::new(),
            fingerprint: Some(sql.into()),
            rows: Some(1),
            masked: 0,
            decision: "allow",
            rule: "allow-crm".into(),
            error: None,
            sqlstate: None,
            http: None,
            llm: None,
            ssh: None,
            caused_by: None,
            approval_id: None,
        }
    }

    fn llm_call(session: &str, seq: u64, start: DateTime<Utc>) -> RequestRow {
        RequestRow {
            protocol: "llm",
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 443),
            database: None,
            db_user: None,
            statement: None,
            statement_class: None,
            tables_read: Vec::new(),
            fingerprint: None,
            rows: None,
            masked: 2,
            rule: "llm-ok".into(),
            end_time: start + chrono::Duration::microseconds(800_000),
            http: Some(HttpFields {
                method: "POST".into(),
                host: Some("api.openai.com".into()),
                path: "/v1/chat/completions".into(),
                status: Some(200),
                ..HttpFields::default()
            }),
            llm: Some(LlmFields {
                provider: "openai",
                endpoint: "chat",
                model: Some("gpt-4o".into()),
                stream: true,
                prompt: Some("user: weather in Paris?".into()),
                prompt_sha256: Some("ab".repeat(32)),
                response: Some("".into()),
                tool_calls: vec![
                    r#"{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}"#.into(),
                ],
                input_tokens: Some(12),
                output_tokens: Some(34),
                redacted: 1,
            }),
            ..statement(session, seq, start, "")
        }
    }

    /// A step of approval `id` of session `session`'s held DELETE.
    fn step(
        id: &str,
        session: &str,
        step: ApprovalStep,
        time: DateTime<Utc>,
        reviewer: Option<&str>,
    ) -> ApprovalRow {
        ApprovalRow {
            time,
            approval_id: id.into(),
            step,
            session_id: session.into(),
            protocol: "postgres",
            identity: identity(4242),
            workload: Some("bot".into()),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 5432),
            rule: "deletes-need-review".into(),
            request: "DELETE FROM crm.customers WHERE id = 42".into(),
            reviewer: reviewer.map(str::to_string),
            reviewer_email: reviewer.map(|r| format!("{r}@example.com")),
            reviewer_groups: reviewer.map_or_else(Vec::new, |_| vec!["dba".to_string()]),
            approvals: 0,
            quorum: 2,
            reason: None,
            expires_at: at(6, 0, 0, 0),
        }
    }

    /// Writes the rows with the real writer, as the agent does.
    async fn write(dir: &Path, conns: Vec<ConnectionRow>, reqs: Vec<RequestRow>) {
        write_all(dir, conns, reqs, Vec::new()).await;
    }

    async fn write_all(
        dir: &Path,
        conns: Vec<ConnectionRow>,
        reqs: Vec<RequestRow>,
        steps: Vec<ApprovalRow>,
    ) {
        let config = AuditConfig {
            dir: dir.to_path_buf(),
            rotate_every: Duration::from_secs(3600),
            rotate_bytes: 64 << 20,
            journal_every: AuditConfig::DEFAULT_JOURNAL_EVERY,
            retention: None,
        };
        let (sink, writer) = AuditWriter::start(config).unwrap();
        for c in conns {
            sink.record(c);
        }
        for r in reqs {
            sink.record_request(r);
        }
        for a in steps {
            sink.record_approval(a);
        }
        writer.shutdown().await.unwrap();
    }

    /// Two postgres sessions (s-1 with two statements, s-2 with one, in the
    /// next hour) and a denied HTTPS connection s-3 with an LLM call.
    async fn sample(dir: &Path) {
        let mut denied = conn("s-3", at(5, 30, 0, 0), "https");
        denied.decision = "deny";
        denied.rule = "no-llm".into();
        write(
            dir,
            vec![
                conn("s-1", at(5, 6, 7, 0), "postgres"),
                conn("s-2", at(6, 0, 1, 0), "postgres"),
                denied,
            ],
            vec![
                statement("s-1", 1, at(5, 6, 7, 10_000), "SELECT 1"),
                statement("s-1", 2, at(5, 6, 7, 20_000), "SELECT 2"),
                statement("s-2", 1, at(6, 0, 1, 5_000), "SELECT 3"),
                llm_call("s-3", 1, at(5, 30, 0, 1_000)),
            ],
        )
        .await;
    }

    async fn json(q: &AuditQuery, sql: &str) -> Vec<String> {
        let mut out = Vec::new();
        q.print(sql, Format::Json, &mut out).await.unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    async fn text(q: &AuditQuery, sql: &str, format: Format) -> String {
        let mut out = Vec::new();
        q.print(sql, format, &mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn group_by_over_both_tables_and_a_join_on_session_id() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path()).await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(
            json(
                &q,
                "SELECT protocol, decision, count(*) AS n FROM connections \
                 GROUP BY protocol, decision ORDER BY protocol"
            )
            .await,
            [
                r#"{"protocol":"https","decision":"deny","n":1}"#,
                r#"{"protocol":"postgres","decision":"allow","n":2}"#,
            ]
        );
        assert_eq!(
            json(
                &q,
                "SELECT c.protocol AS conn, r.protocol AS req, c.decision, count(*) AS n, \
                 sum(r.rows) AS rows FROM requests r JOIN connections c ON r.session_id = c.session_id \
                 GROUP BY c.protocol, r.protocol, c.decision ORDER BY n DESC"
            )
            .await,
            [
                r#"{"conn":"postgres","req":"postgres","decision":"allow","n":3,"rows":3}"#,
                r#"{"conn":"https","req":"llm","decision":"deny","n":1,"rows":null}"#,
            ]
        );
        // The statements of a session, in order, with the lists and
        // timestamps as RFC 3339 UTC.
        assert_eq!(
            json(
                &q,
                "SELECT seq, statement, tables_read, start_time FROM requests \
                 WHERE session_id = 's-1' ORDER BY seq"
            )
            .await,
            [
                r#"{"seq":1,"statement":"SELECT 1","tables_read":["crm.customers"],"start_time":"2025-03-04T05:06:07.010Z"}"#,
                r#"{"seq":2,"statement":"SELECT 2","tables_read":["crm.customers"],"start_time":"2025-03-04T05:06:07.020Z"}"#,
            ]
        );
        // The list functions work on the list columns.
        assert_eq!(
            json(
                &q,
                "SELECT count(*) AS n FROM requests WHERE array_has(tables_read, 'crm.customers')"
            )
            .await,
            [r#"{"n":3}"#]
        );
    }

    #[tokio::test]
    async fn partition_columns_come_from_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path()).await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(
            json(
                &q,
                "SELECT date, hour, count(*) AS n FROM connections GROUP BY date, hour ORDER BY hour"
            )
            .await,
            [
                r#"{"date":"2025-03-04","hour":5,"n":2}"#,
                r#"{"date":"2025-03-04","hour":6,"n":1}"#,
            ]
        );
        for filter in [
            "date = '2025-03-04' AND hour = 6",
            "hour = 6",
            "hour = 6 AND date = DATE '2025-03-04'",
            "date = '2025-03-04' AND hour IN (6, 7)",
            "date >= '2025-03-04' AND hour > 5",
        ] {
            assert_eq!(
                json(
                    &q,
                    &format!("SELECT session_id FROM requests WHERE {filter}")
                )
                .await,
                [r#"{"session_id":"s-2"}"#],
                "{filter}"
            );
        }
        assert_eq!(
            json(
                &q,
                "SELECT count(*) AS n FROM requests WHERE date = '2025-03-05' OR hour = 4"
            )
            .await,
            [r#"{"n":0}"#]
        );
        let describe = text(&q, "DESCRIBE requests", Format::Csv).await;
        assert!(describe.contains("date,Date32"), "{describe}");
        assert!(describe.contains("hour,Int32"), "{describe}");
    }

    /// Writes `row` as a `requests` file of an older schema `version` in
    /// `dest`: a file the writer made, cut down to the columns before
    /// `first_missing` (the first column the version lacked). Returns what
    /// it wrote.
    async fn old_requests_file(
        dest: &Path,
        row: RequestRow,
        version: i16,
        first_missing: &str,
    ) -> RecordBatch {
        let scratch = tempfile::tempdir().unwrap();
        write(scratch.path(), Vec::new(), vec![row]).await;
        let mut dirs = vec![scratch.path().join("requests")];
        let mut file = None;
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "parquet") {
                    file = Some(path);
                }
            }
        }
        let file = file.expect("the writer wrote a file");
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(fs::File::open(&file).unwrap()).unwrap();
        let batch = reader.build().unwrap().next().unwrap().unwrap();
        let kept: Vec<usize> = (0..requests_schema().index_of(first_missing).unwrap()).collect();
        let old = batch.project(&kept).unwrap();
        let mut columns = old.columns().to_vec();
        columns[0] = Arc::new(Int16Array::from(vec![version; old.num_rows()]));
        let old = RecordBatch::try_new(old.schema(), columns).unwrap();
        fs::create_dir_all(dest).unwrap();
        let props = WriterProperties::builder()
            .set_key_value_metadata(Some(vec![
                KeyValue::new("warden.schema_version".into(), version.to_string()),
                KeyValue::new("warden.table".into(), "requests".to_string()),
            ]))
            .build();
        let name = format!("part-20250304T050100-1-{version:06}.parquet");
        let out = fs::File::create(dest.join(name)).unwrap();
        let mut writer = ArrowWriter::try_new(out, old.schema(), Some(props)).unwrap();
        writer.write(&old).unwrap();
        writer.close().unwrap();
        old
    }

    #[tokio::test]
    async fn files_of_an_older_schema_read_with_nulls_in_the_newer_columns() {
        let tmp = tempfile::tempdir().unwrap();
        // A current file (the LLM call), and a version 1 file: a file the
        // writer made, cut down to the old column set.
        write(
            tmp.path(),
            Vec::new(),
            vec![llm_call("s-new", 1, at(7, 0, 0, 0))],
        )
        .await;
        let old = old_requests_file(
            &tmp.path().join("requests/date=2025-03-04/hour=05"),
            statement("s-old", 1, at(5, 0, 0, 0), "SELECT old"),
            1,
            "http_method",
        )
        .await;
        assert!(old.schema().index_of("tool_calls").is_err());

        let q = AuditQuery::open(tmp.path()).unwrap();
        let current = format!(
            r#"{{"schema_version":{REQUESTS_SCHEMA_VERSION},{}"#,
            r#""session_id":"s-new","statement":null,"http_method":"POST","llm_model":"gpt-4o","tool_calls":["{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}"],"redacted":1,"input_tokens":12}"#
        );
        assert_eq!(
            json(
                &q,
                "SELECT schema_version, session_id, statement, http_method, llm_model, tool_calls, \
                 redacted, input_tokens FROM requests ORDER BY schema_version"
            )
            .await,
            [
                r#"{"schema_version":1,"session_id":"s-old","statement":"SELECT old","http_method":null,"llm_model":null,"tool_calls":null,"redacted":null,"input_tokens":null}"#.to_string(),
                current,
            ]
        );
        // And the replay of an old session works too.
        let mut out = Vec::new();
        replay(&q, "s-old", &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("#1 SQL read: SELECT old -> 1 row"), "{out}");
    }

    #[tokio::test]
    async fn missing_or_empty_table_directories_are_empty_tables() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nothing-here");
        let q = AuditQuery::open(&missing).unwrap();
        let sql = "SELECT (SELECT count(*) FROM connections) AS c, (SELECT count(*) FROM requests) AS r, \
             (SELECT count(*) FROM approvals) AS a";
        assert_eq!(json(&q, sql).await, [r#"{"c":0,"r":0,"a":0}"#]);
        // The columns are there even so.
        assert_eq!(
            json(&q, "SELECT session_id, date, hour FROM requests").await,
            Vec::<String>::new()
        );
        assert_eq!(
            json(
                &q,
                "SELECT step, count(*) AS n FROM approvals GROUP BY step"
            )
            .await,
            Vec::<String>::new()
        );
        // The writer makes every directory even without rows.
        write(tmp.path(), Vec::new(), Vec::new()).await;
        assert!(tmp.path().join("requests").is_dir());
        assert!(tmp.path().join("approvals").is_dir());
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(json(&q, sql).await, [r#"{"c":0,"r":0,"a":0}"#]);
        // An audit written before the approvals table existed: no
        // directory, an empty table, and joins on it still plan.
        fs::remove_dir(tmp.path().join("approvals")).unwrap();
        write(
            tmp.path(),
            Vec::new(),
            vec![statement("s-1", 1, at(5, 0, 0, 0), "SELECT 1")],
        )
        .await;
        fs::remove_dir(tmp.path().join("approvals")).unwrap();
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(json(&q, sql).await, [r#"{"c":0,"r":1,"a":0}"#]);
        assert_eq!(
            json(
                &q,
                "SELECT r.statement, a.reviewer FROM requests r \
                 LEFT JOIN approvals a ON a.approval_id = r.approval_id"
            )
            .await,
            [r#"{"statement":"SELECT 1","reviewer":null}"#]
        );
        let table = text(&q, "SELECT session_id FROM connections", Format::Table).await;
        assert!(
            table.contains("session_id") && table.contains("0 rows"),
            "{table}"
        );
    }

    #[tokio::test]
    async fn temporary_files_being_written_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path()).await;
        let part = tmp.path().join("connections/date=2025-03-04/hour=5");
        let real = fs::read_dir(&part).unwrap().next().unwrap().unwrap().path();
        // A complete copy not yet renamed, and a half-written one.
        fs::copy(
            &real,
            part.join(".part-20250304T060000-9-000001.parquet.tmp"),
        )
        .unwrap();
        fs::write(
            part.join(".part-20250304T060000-9-000002.parquet.tmp"),
            b"PAR1 half",
        )
        .unwrap();
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(
            json(&q, "SELECT count(*) AS n FROM connections").await,
            [r#"{"n":3}"#]
        );
    }

    #[tokio::test]
    async fn sql_errors_say_what_is_wrong_and_where_the_tables_are_documented() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path()).await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let error = |sql: &'static str| {
            let q = &q;
            async move {
                let mut out = Vec::new();
                let e = q.print(sql, Format::Json, &mut out).await.unwrap_err();
                assert!(matches!(e, QueryError::Sql { .. }), "{sql}: {e:?}");
                assert!(out.is_empty());
                let text = e.to_string();
                assert!(text.contains("docs/audit.md"), "{text}");
                assert!(
                    text.contains("`connections`") && text.contains("`requests`"),
                    "{text}"
                );
                text
            }
        };
        let text = error("SELEC * FROM requests").await;
        assert!(text.starts_with("the SQL does not parse: "), "{text}");
        assert!(text.contains("SELEC"), "{text}");
        let text = error("SELECT nope FROM requests").await;
        assert!(text.contains("nope"), "{text}");
        let text = error("SELECT * FROM statements").await;
        assert!(
            text.contains("statements") && text.contains("not found"),
            "{text}"
        );
        // Nothing that writes.
        let text = error("COPY (SELECT 1) TO '/tmp/x.csv'").await;
        assert!(text.contains("COPY"), "{text}");
        let text = error("CREATE TABLE t AS SELECT 1").await;
        assert!(text.contains("DDL"), "{text}");
    }

    #[tokio::test]
    async fn csv_and_table_formats() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path()).await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let csv = text(
            &q,
            "SELECT session_id, 'a,\"b\"' AS quoted, start_time, rows FROM requests \
             WHERE protocol = 'llm'",
            Format::Csv,
        )
        .await;
        assert_eq!(
            csv,
            "session_id,quoted,start_time,rows\ns-3,\"a,\"\"b\"\"\",2025-03-04T05:30:00.001Z,\n"
        );
        let empty = text(
            &q,
            "SELECT session_id FROM requests WHERE false",
            Format::Csv,
        )
        .await;
        assert_eq!(empty, "session_id\n");
        let table = text(
            &q,
            "SELECT session_id, seq FROM requests WHERE session_id = 's-1' ORDER BY seq",
            Format::Table,
        )
        .await;
        assert!(table.contains("| session_id | seq |"), "{table}");
        assert!(table.contains("| s-1        | 2   |"), "{table}");
        assert!(table.ends_with("2 rows\n"), "{table}");
    }

    async fn replayed(q: &AuditQuery, session: &str) -> Result<String, QueryError> {
        let mut out = Vec::new();
        replay(q, session, &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn replay_shows_the_connection_then_each_request_in_order_with_timings() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = conn("s-9", at(5, 6, 7, 0), "https");
        c.destination = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 443);
        c.server_name = Some("api.openai.com".into());
        c.tls = Some("intercepted");
        let mut denied = statement("s-9", 3, at(5, 6, 7, 30_000), "DROP TABLE\n  orders");
        denied.decision = "deny";
        denied.rule = "no-ddl".into();
        denied.statement_class = Some("ddl");
        denied.rows = None;
        denied.sqlstate = Some("42501".into());
        denied.error = Some("permission denied by Warden policy rule \"no-ddl\"".into());
        write(
            tmp.path(),
            vec![c, conn("s-other", at(5, 0, 0, 0), "postgres")],
            // Recorded out of order: the replay sorts by seq.
            vec![
                denied,
                llm_call("s-9", 2, at(5, 6, 7, 12_345)),
                statement("s-9", 1, at(5, 6, 7, 1_000), "SELECT * FROM crm.customers"),
                statement("s-other", 1, at(5, 0, 0, 0), "SELECT 42"),
            ],
        )
        .await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let out = replayed(&q, "s-9").await.unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "session s-9", "{out}");
        assert!(
            out.contains(
                "  who       pid 4242 python3 (/usr/bin/python3), user alice (uid 1001), unit bot.service, workload bot\n"
            ),
            "{out}"
        );
        assert!(out.contains("  command   python3 bot.py\n"), "{out}");
        assert!(
            out.contains(
                "  where     tcp 10.0.0.9:443, protocol https, server name api.openai.com, tls intercepted\n"
            ),
            "{out}"
        );
        assert!(out.contains("  database  crm as app\n"), "{out}");
        assert!(out.contains("  decision  allow (rule default)\n"), "{out}");
        assert!(out.contains("  bytes     100 up, 2000 down\n"), "{out}");
        assert!(
            out.contains(
                "  time      2025-03-04T05:06:07Z to 2025-03-04T05:06:08.500Z (1500.000 ms)\n"
            ),
            "{out}"
        );
        let requests: Vec<&str> = lines
            .iter()
            .skip_while(|l| !l.starts_with("requests: 3"))
            .skip(1)
            .copied()
            .collect();
        assert_eq!(
            requests,
            [
                "   +1.000 ms    2.500 ms  allow allow-crm  #1 SQL read: SELECT * FROM crm.customers -> 1 row",
                "  +12.345 ms  800.000 ms  allow llm-ok     #2 POST api.openai.com /v1/chat/completions -> 200 | openai chat, model gpt-4o, streamed, tokens 12 in / 34 out, redacted 1, masked 2, tool calls: get_weather({\"city\":\"Paris\"})",
                "  +30.000 ms    2.500 ms  deny no-ddl      #3 SQL ddl: DROP TABLE   orders | error 42501: permission denied by Warden policy rule \"no-ddl\"",
            ],
            "{out}"
        );
        // A unique prefix is enough.
        let several = replayed(&q, "s-").await.unwrap_err().to_string();
        assert!(
            several.contains("several sessions") && several.contains("s-9"),
            "{several}"
        );
        assert_eq!(
            replayed(&q, "s-o").await.unwrap().lines().next(),
            Some("session s-other")
        );
        // No such session.
        let e = replayed(&q, "nope").await.unwrap_err();
        assert!(matches!(e, QueryError::NotFound(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("no session \"nope\"") && e.contains("warden audit sql"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn replay_of_a_session_still_open_uses_its_requests() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            Vec::new(),
            vec![
                statement("open", 1, at(5, 0, 0, 0), "BEGIN"),
                statement("open", 2, at(5, 0, 0, 1_500), "SELECT 1"),
            ],
        )
        .await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let out = replayed(&q, "open").await.unwrap();
        assert!(out.contains("connection: no row yet"), "{out}");
        assert!(out.contains("  who       pid 4242 python3"), "{out}");
        assert!(out.contains("  where     10.0.0.5:5432\n"), "{out}");
        assert!(
            out.contains("  +0.000 ms  2.500 ms  allow allow-crm  #1 SQL read: BEGIN -> 1 row\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "  +1.500 ms  2.500 ms  allow allow-crm  #2 SQL read: SELECT 1 -> 1 row\n"
            ),
            "{out}"
        );
    }

    #[tokio::test]
    async fn replay_shows_ssh_commands_with_their_exit_and_recording() {
        let tmp = tempfile::tempdir().unwrap();
        let ssh = |seq, command: Option<&str>, channel, exit, recording: Option<&str>| RequestRow {
            protocol: "ssh",
            database: None,
            db_user: None,
            statement: None,
            statement_class: None,
            rows: None,
            ssh: Some(crate::audit::SshFields {
                user: "deploy".into(),
                channel,
                command: command.map(str::to_string),
                exit_status: exit,
                recording: recording.map(str::to_string),
            }),
            ..statement("s-ssh", seq, at(5, 0, 0, seq as i64 * 1_000), "")
        };
        let mut denied = ssh(2, Some("rm -rf /srv"), "exec", Some(126), None);
        denied.decision = "deny";
        denied.rule = "no-rm".into();
        write(
            tmp.path(),
            Vec::new(),
            vec![
                ssh(
                    1,
                    Some("uname -a"),
                    "exec",
                    Some(0),
                    Some("/audit/recordings/s-ssh-1.cast"),
                ),
                denied,
                ssh(3, None, "shell", None, None),
            ],
        )
        .await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let out = replayed(&q, "s-ssh").await.unwrap();
        assert!(
            out.contains("#1 SSH exec as deploy: uname -a -> exit 0 | recording /audit/recordings/s-ssh-1.cast\n"),
            "{out}"
        );
        assert!(out.contains("deny no-rm "), "{out}");
        assert!(
            out.contains("#2 SSH exec as deploy: rm -rf /srv -> exit 126\n"),
            "{out}"
        );
        assert!(!out.contains("database"), "{out}");
        assert!(out.contains("#3 SSH shell as deploy\n"), "{out}");
    }

    /// A writer the test can read while `tail` holds it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tail_prints_the_rows_of_new_files_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            Vec::new(),
            vec![statement("before", 1, at(5, 0, 0, 0), "SELECT 'before'")],
        )
        .await;
        let options = TailOptions {
            table: AuditTable::Requests,
            format: Format::Json,
            from_start: false,
            poll: Duration::from_millis(50),
        };
        let out = Shared::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut sink = out.clone();
        let following = tail(tmp.path(), &options, &mut sink, async {
            let _ = stop_rx.await;
        });
        let writing = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Two files of one rotation (two partitions), then one more.
            write(
                tmp.path(),
                Vec::new(),
                vec![
                    statement("a", 2, at(7, 0, 0, 0), "SELECT 'later hour'"),
                    statement("a", 1, at(6, 0, 0, 0), "SELECT 'earlier hour'"),
                ],
            )
            .await;
            until("two rows", || out.lines().len() == 2).await;
            write(
                tmp.path(),
                vec![conn("a", at(6, 0, 0, 0), "postgres")],
                // Another partition: the writers of this test share a pid
                // and their file numbers, and could write the same name
                // within one second.
                vec![statement("b", 1, at(8, 30, 0, 0), "SELECT 'third'")],
            )
            .await;
            until("three rows", || out.lines().len() == 3).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop_tx.send(()).unwrap();
        };
        let (followed, ()) = tokio::join!(following, writing);
        followed.unwrap();
        let lines = out.lines();
        let statements: Vec<&str> = lines
            .iter()
            .map(|l| {
                let start = l.find("\"statement\":\"").unwrap() + 13;
                &l[start..start + l[start..].find('"').unwrap()]
            })
            .collect();
        // The connections row is not in the requests table; the rows of
        // the file written before tail started are not printed.
        assert_eq!(
            statements,
            [
                "SELECT 'earlier hour'",
                "SELECT 'later hour'",
                "SELECT 'third'"
            ]
        );
        assert!(
            lines[0].contains(r#""date":"2025-03-04","hour":6"#),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(r#""date":"2025-03-04","hour":7"#),
            "{}",
            lines[1]
        );
        assert!(lines[0].contains(r#""tool_calls":[]"#), "{}", lines[0]);

        // --from-start prints the files already there, connections too.
        let out = Shared::default();
        let options = TailOptions {
            table: AuditTable::Connections,
            format: Format::Table,
            from_start: true,
            poll: Duration::from_millis(50),
        };
        let mut sink = out.clone();
        tail(
            tmp.path(),
            &options,
            &mut sink,
            tokio::time::sleep(Duration::from_millis(100)),
        )
        .await
        .unwrap();
        let text = out.lines().join("\n");
        assert!(
            text.contains("connections/date=2025-03-04/hour=6/part-"),
            "{text}"
        );
        assert!(text.contains("| a "), "{text}");
    }

    /// Session s-1: a DELETE held, refused to its requester, approved by
    /// bob and dave, then run; session s-2: a DROP held and rejected.
    async fn approvals_sample(dir: &Path) {
        let mut refused = step(
            "ap-1",
            "s-1",
            ApprovalStep::Refused,
            at(5, 0, 5, 0),
            Some("alice"),
        );
        refused.reason = Some("the requester cannot approve".into());
        let mut bob = step(
            "ap-1",
            "s-1",
            ApprovalStep::Approved,
            at(5, 0, 10, 0),
            Some("bob"),
        );
        bob.approvals = 1;
        let mut dave = step(
            "ap-1",
            "s-1",
            ApprovalStep::Approved,
            at(5, 0, 20, 0),
            Some("dave"),
        );
        dave.approvals = 2;
        let mut executed = step(
            "ap-1",
            "s-1",
            ApprovalStep::Executed,
            at(5, 0, 20, 1_000),
            None,
        );
        executed.approvals = 2;
        let mut rejected = step(
            "ap-2",
            "s-2",
            ApprovalStep::Rejected,
            at(6, 1, 0, 0),
            Some("carol"),
        );
        rejected.request = "DROP TABLE crm.orders".into();
        rejected.reason = Some("not during the freeze".into());
        let mut held = statement(
            "s-1",
            2,
            at(5, 0, 0, 2_000),
            "DELETE FROM crm.customers WHERE id = 42",
        );
        held.statement_class = Some("write");
        held.end_time = at(5, 0, 20, 3_000);
        held.approval_id = Some("ap-1".into());
        let mut dropped = statement("s-2", 1, at(6, 0, 0, 0), "DROP TABLE crm.orders");
        dropped.statement_class = Some("ddl");
        dropped.decision = "deny";
        dropped.rule = "deletes-need-review".into();
        dropped.rows = None;
        dropped.approval_id = Some("ap-2".into());
        write_all(
            dir,
            vec![conn("s-1", at(5, 0, 0, 0), "postgres")],
            vec![
                statement("s-1", 1, at(5, 0, 0, 1_000), "SELECT 1"),
                held,
                dropped,
            ],
            vec![
                // Recorded out of order: queries sort.
                executed,
                step(
                    "ap-1",
                    "s-1",
                    ApprovalStep::Requested,
                    at(5, 0, 0, 2_000),
                    None,
                ),
                refused,
                bob,
                dave,
                step("ap-2", "s-2", ApprovalStep::Requested, at(6, 0, 0, 0), None),
                rejected,
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn approvals_group_by_step_and_join_requests_on_approval_id() {
        let tmp = tempfile::tempdir().unwrap();
        approvals_sample(tmp.path()).await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(
            json(
                &q,
                "SELECT step, count(*) AS n FROM approvals GROUP BY step ORDER BY step"
            )
            .await,
            [
                r#"{"step":"approved","n":2}"#,
                r#"{"step":"executed","n":1}"#,
                r#"{"step":"refused","n":1}"#,
                r#"{"step":"rejected","n":1}"#,
                r#"{"step":"requested","n":2}"#,
            ]
        );
        // Who approved (or rejected) which statement.
        assert_eq!(
            json(
                &q,
                "SELECT r.session_id, r.seq, r.statement, a.step, a.reviewer, a.reviewer_groups, \
                 a.approvals, a.quorum, a.reason FROM requests r \
                 JOIN approvals a ON a.approval_id = r.approval_id \
                 WHERE a.step IN ('approved', 'rejected') ORDER BY a.start_time"
            )
            .await,
            [
                r#"{"session_id":"s-1","seq":2,"statement":"DELETE FROM crm.customers WHERE id = 42","step":"approved","reviewer":"bob","reviewer_groups":["dba"],"approvals":1,"quorum":2,"reason":null}"#,
                r#"{"session_id":"s-1","seq":2,"statement":"DELETE FROM crm.customers WHERE id = 42","step":"approved","reviewer":"dave","reviewer_groups":["dba"],"approvals":2,"quorum":2,"reason":null}"#,
                r#"{"session_id":"s-2","seq":1,"statement":"DROP TABLE crm.orders","step":"rejected","reviewer":"carol","reviewer_groups":["dba"],"approvals":0,"quorum":2,"reason":"not during the freeze"}"#,
            ]
        );
        // Partitions, the requester's identity and the time columns.
        assert_eq!(
            json(
                &q,
                "SELECT date, hour, approval_id, comm, user, dst_addr, dst_port, expires_at \
                 FROM approvals WHERE step = 'requested' ORDER BY start_time"
            )
            .await,
            [
                r#"{"date":"2025-03-04","hour":5,"approval_id":"ap-1","comm":"python3","user":"alice","dst_addr":"10.0.0.5","dst_port":5432,"expires_at":"2025-03-04T06:00:00Z"}"#,
                r#"{"date":"2025-03-04","hour":6,"approval_id":"ap-2","comm":"python3","user":"alice","dst_addr":"10.0.0.5","dst_port":5432,"expires_at":"2025-03-04T06:00:00Z"}"#,
            ]
        );
        // How long approvals took, from the request to the last step.
        assert_eq!(
            json(
                &q,
                "SELECT approval_id, max(start_time) - min(start_time) AS waited \
                 FROM approvals GROUP BY approval_id ORDER BY approval_id"
            )
            .await
            .len(),
            2
        );
        let describe = text(&q, "DESCRIBE approvals", Format::Csv).await;
        assert!(describe.contains("reviewer_groups,List("), "{describe}");
        assert!(describe.contains("hour,Int32"), "{describe}");
    }

    #[tokio::test]
    async fn requests_files_before_and_after_the_approval_id_column_read_together() {
        let tmp = tempfile::tempdir().unwrap();
        let mut held = statement("s-new", 1, at(7, 0, 0, 0), "DELETE FROM t");
        held.approval_id = Some("ap-9".into());
        write_all(
            tmp.path(),
            Vec::new(),
            vec![held],
            vec![step(
                "ap-9",
                "s-new",
                ApprovalStep::Executed,
                at(7, 0, 1, 0),
                Some("bob"),
            )],
        )
        .await;
        // A version 3 file: every column but approval_id.
        let old = old_requests_file(
            &tmp.path().join("requests/date=2025-03-04/hour=5"),
            statement("s-old", 1, at(5, 0, 0, 0), "SELECT old"),
            3,
            "approval_id",
        )
        .await;
        assert!(old.schema().index_of("approval_id").is_err());
        assert!(old.schema().index_of("caused_by_match").is_ok());
        let q = AuditQuery::open(tmp.path()).unwrap();
        assert_eq!(
            json(
                &q,
                "SELECT schema_version, session_id, approval_id FROM requests ORDER BY schema_version"
            )
            .await,
            [
                r#"{"schema_version":3,"session_id":"s-old","approval_id":null}"#.to_string(),
                format!(
                    r#"{{"schema_version":{REQUESTS_SCHEMA_VERSION},"session_id":"s-new","approval_id":"ap-9"}}"#
                ),
            ]
        );
        assert_eq!(
            json(
                &q,
                "SELECT r.session_id, a.reviewer FROM requests r \
                 LEFT JOIN approvals a ON a.approval_id = r.approval_id ORDER BY r.session_id"
            )
            .await,
            [
                r#"{"session_id":"s-new","reviewer":"bob"}"#,
                r#"{"session_id":"s-old","reviewer":null}"#,
            ]
        );
    }

    #[tokio::test]
    async fn replay_shows_the_approval_steps_of_the_session_in_time_order() {
        let tmp = tempfile::tempdir().unwrap();
        approvals_sample(tmp.path()).await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let out = replayed(&q, "s-1").await.unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let requests: Vec<&str> = lines
            .iter()
            .skip_while(|l| !l.starts_with("requests: 2"))
            .skip(1)
            .take(2)
            .copied()
            .collect();
        assert_eq!(
            requests,
            [
                "  +1.000 ms      2.500 ms  allow allow-crm  #1 SQL read: SELECT 1 -> 1 row",
                "  +2.000 ms  20001.000 ms  allow allow-crm  #2 SQL write: DELETE FROM crm.customers WHERE id = 42 -> 1 row | approval ap-1",
            ],
            "{out}"
        );
        let steps: Vec<&str> = lines
            .iter()
            .skip_while(|l| !l.starts_with("approvals: 5"))
            .skip(1)
            .copied()
            .collect();
        assert_eq!(
            steps,
            [
                "      +2.000 ms  requested  ap-1  rule deletes-need-review, quorum 2, expires 2025-03-04T06:00:00Z: DELETE FROM crm.customers WHERE id = 42",
                "   +5000.000 ms  refused    ap-1  by alice <alice@example.com>, reason: the requester cannot approve",
                "  +10000.000 ms  approved   ap-1  by bob <bob@example.com>, 1/2 approvals",
                "  +20000.000 ms  approved   ap-1  by dave <dave@example.com>, 2/2 approvals",
                "  +20001.000 ms  executed   ap-1  2/2 approvals",
            ],
            "{out}"
        );
        // A session whose held request has no row yet (it still waits):
        // its steps are its timeline.
        write_all(
            tmp.path(),
            Vec::new(),
            Vec::new(),
            vec![step(
                "ap-3",
                "s-waiting",
                ApprovalStep::Requested,
                at(8, 0, 0, 0),
                None,
            )],
        )
        .await;
        let q = AuditQuery::open(tmp.path()).unwrap();
        let out = replayed(&q, "s-wait").await.unwrap();
        assert!(out.starts_with("session s-waiting\n"), "{out}");
        assert!(
            out.contains("offsets are from its first approval step"),
            "{out}"
        );
        assert!(out.contains("  who       pid 4242 python3"), "{out}");
        assert!(out.contains("  where     10.0.0.5:5432\n"), "{out}");
        assert!(
            out.contains("requests: none decoded\napprovals: 1\n"),
            "{out}"
        );
        assert!(
            out.contains("  +0.000 ms  requested  ap-3  rule deletes-need-review"),
            "{out}"
        );
    }

    #[test]
    fn partition_literals_of_paths() {
        let (d, h) = partition_literals(Path::new(
            "/a/requests/date=2025-03-04/hour=05/part-1.parquet",
        ));
        assert_eq!(
            (d.as_str(), h.as_str()),
            ("DATE '2025-03-04'", "CAST(5 AS INT)")
        );
        let (d, h) = partition_literals(Path::new(
            "/a/requests/date=x'; DROP/hour=zz/part-1.parquet",
        ));
        assert_eq!(
            (d.as_str(), h.as_str()),
            ("CAST(NULL AS DATE)", "CAST(NULL AS INT)")
        );
    }
}
