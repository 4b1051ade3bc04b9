//! SQL classification: what a statement does, which tables it reads and
//! writes, which functions it calls. The rules are in docs/postgres.md.
//!
//! The guiding rule: what the classifier cannot fully understand gets the
//! most dangerous class it could have, never `read`. A statement that does
//! not parse is `unknown`; so is one with a construct the walker does not
//! analyse.
use std::fmt;
use std::str::FromStr;

use sqlparser::ast as sql;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::lex::split_statements;

/// What a statement does, from least to most dangerous: the derived order
/// is the danger order, so `class >= StatementClass::Write` asks "at least
/// as dangerous as a write".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatementClass {
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, ...
    Transaction,
    /// SET, SHOW, RESET, DISCARD, LISTEN, DEALLOCATE, CLOSE.
    Session,
    /// SELECT (and VALUES, FETCH, EXPLAIN without ANALYZE) calling only
    /// allowlisted functions.
    Read,
    /// INSERT, UPDATE, DELETE, MERGE, TRUNCATE, NOTIFY, LOCK, SELECT ... FOR
    /// UPDATE/SHARE, and any statement with a data-modifying WITH.
    Write,
    /// COPY to the client or from the client: bulk data that row masking
    /// does not see.
    Copy,
    /// CREATE, ALTER, DROP, COMMENT, VACUUM, ANALYZE, REFRESH, SELECT INTO.
    Ddl,
    /// A CALL, or a statement calling a function that is not on the
    /// allowlist of side-effect-free built-ins: its effects are unknown.
    Function,
    /// Roles and privileges (GRANT, REVOKE, CREATE/ALTER/DROP ROLE, SET ROLE,
    /// SET SESSION AUTHORIZATION, ALTER ... OWNER TO, row-level security,
    /// policies), and what reaches the server's host: COPY with a file or
    /// PROGRAM, LOAD, foreign servers and user mappings.
    Privilege,
    /// Not understood: a parse error, a DO block, EXECUTE of a prepared
    /// statement, an unknown statement kind. Treated as the most dangerous.
    Unknown,
}

impl StatementClass {
    /// Every class, least dangerous first.
    pub const ALL: [StatementClass; 9] = [
        StatementClass::Transaction,
        StatementClass::Session,
        StatementClass::Read,
        StatementClass::Write,
        StatementClass::Copy,
        StatementClass::Ddl,
        StatementClass::Function,
        StatementClass::Privilege,
        StatementClass::Unknown,
    ];

    /// The name used in policies and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementClass::Transaction => "transaction",
            StatementClass::Session => "session",
            StatementClass::Read => "read",
            StatementClass::Write => "write",
            StatementClass::Copy => "copy",
            StatementClass::Ddl => "ddl",
            StatementClass::Function => "function",
            StatementClass::Privilege => "privilege",
            StatementClass::Unknown => "unknown",
        }
    }

    /// The danger rank, 0 (transaction) to 8 (unknown).
    pub fn danger(self) -> u8 {
        self as u8
    }

    /// Whether this class is at least as dangerous as `other`.
    pub fn at_least(self, other: StatementClass) -> bool {
        self >= other
    }
}

impl fmt::Display for StatementClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a name that is not a statement class.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown statement class {0:?} (expected one of transaction, session, read, write, copy, ddl, function, privilege, unknown)"
)]
pub struct UnknownClass(pub String);

impl FromStr for StatementClass {
    type Err = UnknownClass;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StatementClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownClass(s.to_string()))
    }
}

/// One classified statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The statement's own text, trimmed.
    pub text: String,
    pub class: StatementClass,
    /// Tables and views read, schema-qualified as written; unquoted names
    /// lowercased, a name that needs quotes shown quoted (`"CRM".customers`).
    pub reads: Vec<String>,
    /// Tables written, created, altered, dropped or locked, named likewise.
    pub writes: Vec<String>,
    /// Functions called, named likewise (`pg_catalog.now`, `count`).
    pub functions: Vec<String>,
    /// Why the statement does not parse, for class `unknown`.
    pub parse_error: Option<String>,
    /// Why the class is more dangerous than the statement's kind suggests
    /// (a data-modifying WITH, a function off the allowlist, ...).
    pub note: Option<&'static str>,
}

/// Classifies every statement in `sql` (a simple query may hold several).
/// Blank input gives an empty list.
pub fn classify(sql: &str) -> Vec<Statement> {
    split_statements(sql)
        .into_iter()
        .map(classify_one)
        .collect()
}

/// The most dangerous class among `statements`, `None` if there are none.
pub fn most_dangerous(statements: &[Statement]) -> Option<StatementClass> {
    statements.iter().map(|s| s.class).max()
}

/// Nesting above which a statement is not parsed at all.
const MAX_NESTING: usize = 100;
/// Operator chains longer than this are not parsed at all.
const MAX_CHAIN: usize = 20_000;
/// Up to this nesting and chain length a statement is parsed on the
/// caller's stack; beyond, on a helper thread with [`BIG_STACK`].
const INLINE_NESTING: usize = if cfg!(debug_assertions) { 4 } else { 8 };
const INLINE_CHAIN: usize = 500;
const BIG_STACK: usize = 64 << 20;

fn unknown(text: &str, note: Option<&'static str>) -> Statement {
    Statement {
        text: text.to_string(),
        class: StatementClass::Unknown,
        reads: Vec::new(),
        writes: Vec::new(),
        functions: Vec::new(),
        parse_error: None,
        note,
    }
}

/// Parses and walks one statement, keeping the stack bounded: sqlparser
/// recurses without limit on some inputs (nested JOINs without parentheses)
/// and drops long operator chains recursively, and a stack overflow would
/// abort the whole agent. Inputs that could go deep are estimated from their
/// tokens first: moderately deep ones are analysed on a helper thread with a
/// large stack, the rest are `unknown` without being parsed.
fn classify_one(text: &str) -> Statement {
    let c = super::lex::complexity(text);
    if c.nesting > MAX_NESTING || c.chain > MAX_CHAIN {
        return unknown(text, Some("nested too deeply to analyse safely"));
    }
    if c.nesting <= INLINE_NESTING && c.chain <= INLINE_CHAIN {
        return std::panic::catch_unwind(|| analyse(text))
            .unwrap_or_else(|_| unknown(text, Some("the SQL parser failed on this statement")));
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("warden-sql".into())
            .stack_size(BIG_STACK)
            .spawn_scoped(scope, || analyse(text))
            .ok()
            .and_then(|h| h.join().ok())
    })
    .unwrap_or_else(|| unknown(text, Some("the SQL parser failed on this statement")))
}

fn analyse(text: &str) -> Statement {
    let dialect = PostgreSqlDialect {};
    let parsed = Parser::new(&dialect)
        .try_with_sql(text)
        .and_then(|mut p| p.parse_statements());
    let mut out = unknown(text, None);
    match parsed {
        Err(e) => {
            out.parse_error = Some(e.to_string());
            let first = text
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .find(|w| !w.is_empty())
                .unwrap_or("");
            if first.eq_ignore_ascii_case("do") {
                out.note = Some("DO runs an anonymous procedural code block");
            }
        }
        Ok(stmts) if stmts.len() == 1 => {
            let mut w = Walker::default();
            w.statement(&stmts[0]);
            if w.unsafe_function {
                w.escalate(
                    StatementClass::Function,
                    "calls a function that is not on the allowlist of side-effect-free built-ins",
                );
            }
            if w.locks {
                for t in w.reads.clone() {
                    push_unique(&mut w.writes, t);
                }
            }
            out.class = w.class;
            out.reads = w.reads;
            out.writes = w.writes;
            out.functions = w.functions;
            out.note = w.note;
        }
        Ok(_) => {
            out.note =
                Some("the parser and the statement splitter disagree on where statements end");
        }
    }
    out
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// A name as the server resolves it: unquoted folded to lower case; shown
/// quoted when it needs quotes, so different spellings of one name agree.
fn canonical_ident(i: &sql::Ident) -> String {
    let v = if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_ascii_lowercase()
    };
    let plain = v
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'$');
    if plain {
        v
    } else {
        format!("\"{}\"", v.replace('"', "\"\""))
    }
}

/// Functions without side effects beyond their result, callable from any
/// statement without making it class `function`. Unqualified or in
/// `pg_catalog` only: `public.lower` is somebody's function. Grouped:
/// aggregates, window functions, conditionals, strings, numbers, formatting,
/// date and time, session information, arrays, JSON, UUIDs.
const SAFE_FUNCTIONS: &str = "\
    array_agg avg bit_and bit_or bit_xor bool_and bool_or count corr covar_pop covar_samp \
    every json_agg json_object_agg jsonb_agg jsonb_object_agg max min mode \
    percentile_cont percentile_disc regr_avgx regr_avgy regr_count regr_intercept regr_r2 \
    regr_slope regr_sxx regr_sxy regr_syy stddev stddev_pop stddev_samp string_agg sum \
    var_pop var_samp variance xmlagg \
    cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank \
    rank row_number \
    array coalesce greatest least nullif row \
    ascii btrim char_length character_length chr concat concat_ws convert_from convert_to \
    decode encode format initcap left length lower lpad ltrim md5 normalize octet_length \
    bit_length overlay position quote_ident quote_literal quote_nullable regexp_count \
    regexp_instr regexp_like regexp_match regexp_matches regexp_replace \
    regexp_split_to_array regexp_split_to_table regexp_substr repeat replace reverse \
    right rpad rtrim split_part starts_with string_to_array string_to_table strpos substr \
    substring to_ascii to_hex translate trim unistr upper sha224 sha256 sha384 sha512 \
    abs acos asin atan atan2 cbrt ceil ceiling cos cot degrees div exp factorial floor \
    gcd lcm ln log log10 mod pi power pow radians random round scale sign sin sqrt tan \
    trunc width_bucket \
    to_char to_date to_number to_timestamp \
    age clock_timestamp current_date current_time current_timestamp date_add date_bin \
    date_part date_subtract date_trunc extract isfinite justify_days justify_hours \
    justify_interval localtime localtimestamp make_date make_interval make_time \
    make_timestamp make_timestamptz now statement_timestamp timeofday \
    transaction_timestamp \
    current_catalog current_database current_role current_schema current_schemas \
    current_setting current_user session_user user version pg_backend_pid pg_typeof \
    format_type \
    array_append array_cat array_dims array_fill array_length array_lower array_ndims \
    array_position array_positions array_prepend array_remove array_replace \
    array_to_string array_upper cardinality generate_series generate_subscripts \
    trim_array unnest \
    array_to_json json_array_elements json_array_elements_text json_array_length \
    json_build_array json_build_object json_each json_each_text json_extract_path \
    json_extract_path_text json_object json_object_keys json_populate_record \
    json_strip_nulls json_typeof jsonb_array_elements jsonb_array_elements_text \
    jsonb_array_length jsonb_build_array jsonb_build_object jsonb_each jsonb_each_text \
    jsonb_extract_path jsonb_extract_path_text jsonb_insert jsonb_object \
    jsonb_object_keys jsonb_path_exists jsonb_path_match jsonb_path_query \
    jsonb_path_query_array jsonb_path_query_first jsonb_populate_record jsonb_pretty \
    jsonb_set jsonb_strip_nulls jsonb_typeof row_to_json to_json to_jsonb \
    gen_random_uuid uuidv4 uuidv7 ";

/// Functions that change only a sequence: fine inside a statement that is
/// already a write, a write themselves otherwise.
const SEQUENCE_FUNCTIONS: &[&str] = &["currval", "lastval", "nextval"];

fn is_safe_function(parts: &[String], in_write: bool) -> bool {
    let name = match parts {
        [name] => name,
        [schema, name] if schema == "pg_catalog" => name,
        _ => return false,
    };
    SAFE_FUNCTIONS.split_ascii_whitespace().any(|f| f == name)
        || (in_write && SEQUENCE_FUNCTIONS.contains(&name.as_str()))
}

/// The deepest nesting the walker follows; deeper is `unknown`.
const MAX_DEPTH: usize = 200;

/// Walks one parsed statement, collecting what it touches.
struct Walker {
    class: StatementClass,
    note: Option<&'static str>,
    reads: Vec<String>,
    writes: Vec<String>,
    functions: Vec<String>,
    unsafe_function: bool,
    locks: bool,
    /// CTE names visible at this point.
    ctes: Vec<String>,
    /// Inside INSERT/UPDATE/DELETE/MERGE (sequence functions are expected).
    in_write: bool,
    depth: usize,
}

impl Default for Walker {
    fn default() -> Self {
        Self {
            class: StatementClass::Transaction,
            note: None,
            reads: Vec::new(),
            writes: Vec::new(),
            functions: Vec::new(),
            unsafe_function: false,
            locks: false,
            ctes: Vec::new(),
            in_write: false,
            depth: 0,
        }
    }
}

impl Walker {
    fn escalate(&mut self, class: StatementClass, note: &'static str) {
        if class > self.class {
            self.class = class;
            self.note = Some(note);
        }
    }

    fn base(&mut self, class: StatementClass) {
        if class > self.class {
            self.class = class;
        }
    }

    fn opaque(&mut self, note: &'static str) {
        self.escalate(StatementClass::Unknown, note);
    }

    fn name(&mut self, name: &sql::ObjectName) -> Option<Vec<String>> {
        let mut parts = Vec::with_capacity(name.0.len());
        for p in &name.0 {
            match p {
                sql::ObjectNamePart::Identifier(i) => parts.push(canonical_ident(i)),
                sql::ObjectNamePart::Function(_) => {
                    self.opaque("a name computed by a function");
                    return None;
                }
            }
        }
        Some(parts)
    }

    fn read_name(&mut self, name: &sql::ObjectName) {
        if let Some(parts) = self.name(name) {
            if parts.len() == 1 && self.ctes.contains(&parts[0]) {
                return;
            }
            push_unique(&mut self.reads, parts.join("."));
        }
    }

    fn write_name(&mut self, name: &sql::ObjectName) -> Option<String> {
        let n = self.name(name)?.join(".");
        push_unique(&mut self.writes, n.clone());
        Some(n)
    }

    fn record_function(&mut self, parts: Vec<String>) {
        if !is_safe_function(&parts, self.in_write) {
            self.unsafe_function = true;
        }
        push_unique(&mut self.functions, parts.join("."));
    }

    /// Runs `f` in a separate walker whose statement does not execute now
    /// (a view's query, EXPLAIN without ANALYZE): its tables count as read,
    /// its functions are listed, but nothing it would do escalates.
    fn not_executed(&mut self, f: impl FnOnce(&mut Walker)) {
        let mut inner = Walker {
            depth: self.depth,
            ctes: self.ctes.clone(),
            ..Walker::default()
        };
        f(&mut inner);
        for t in inner.reads.into_iter().chain(inner.writes) {
            push_unique(&mut self.reads, t);
        }
        for fun in inner.functions {
            push_unique(&mut self.functions, fun);
        }
    }

    fn enter(&mut self) -> bool {
        if self.depth >= MAX_DEPTH {
            self.opaque("nested too deeply to analyse");
            return false;
        }
        self.depth += 1;
        true
    }

    fn statement(&mut self, s: &sql::Statement) {
        use StatementClass as C;
        use sql::Statement as S;
        if !self.enter() {
            return;
        }
        match s {
            S::Query(q) => {
                // `WITH ... INSERT` is a Query whose body writes.
                let writes = matches!(
                    *q.body,
                    sql::SetExpr::Insert(_)
                        | sql::SetExpr::Update(_)
                        | sql::SetExpr::Delete(_)
                        | sql::SetExpr::Merge(_)
                );
                self.base(if writes { C::Write } else { C::Read });
                self.query(q);
            }
            S::Insert(i) => self.insert(i),
            S::Update(u) => self.update(u),
            S::Delete(d) => self.delete(d),
            S::Merge(m) => self.merge(m),
            S::Copy {
                source, to, target, ..
            } => {
                self.base(C::Copy);
                match target {
                    sql::CopyTarget::Stdin | sql::CopyTarget::Stdout => {}
                    sql::CopyTarget::Program { .. } => self.escalate(
                        C::Privilege,
                        "COPY with PROGRAM runs a shell command on the database server",
                    ),
                    sql::CopyTarget::File { .. } => self.escalate(
                        C::Privilege,
                        "COPY with a file name reads or writes the database server's filesystem",
                    ),
                }
                match (source, *to) {
                    (sql::CopySource::Table { table_name, .. }, true) => self.read_name(table_name),
                    (sql::CopySource::Table { table_name, .. }, false) => {
                        self.write_name(table_name);
                    }
                    (sql::CopySource::Query(q), true) => self.query(q),
                    (sql::CopySource::Query(_), false) => self.opaque("COPY (query) FROM"),
                }
            }
            S::Explain {
                analyze,
                options,
                statement,
                ..
            } => {
                let analyze = *analyze
                    || options.iter().flatten().any(|o| {
                        o.name.value.eq_ignore_ascii_case("analyze")
                            && !o.arg.as_ref().is_some_and(is_false)
                    });
                if analyze {
                    self.statement(statement);
                } else {
                    self.base(C::Read);
                    self.not_executed(|w| w.statement(statement));
                }
            }
            S::ExplainTable { table_name, .. } => {
                self.base(C::Read);
                self.read_name(table_name);
            }
            S::Call(f) => {
                self.escalate(C::Function, "CALL runs a procedure");
                self.function(f);
            }
            S::Prepare { statement, .. } => {
                self.statement(statement);
                if self.note.is_none() {
                    self.note = Some("PREPARE is classified as the statement it prepares");
                }
            }
            S::Execute { .. } => {
                self.opaque("EXECUTE runs a prepared statement the classifier cannot see")
            }
            S::Declare { stmts, .. } => {
                self.base(C::Read);
                for d in stmts {
                    match &d.for_query {
                        Some(q) => self.query(q),
                        None => self.opaque("DECLARE without a cursor query"),
                    }
                }
            }
            S::Fetch { .. } => self.base(C::Read),
            S::Close { .. }
            | S::Deallocate { .. }
            | S::Discard { .. }
            | S::LISTEN { .. }
            | S::UNLISTEN { .. }
            | S::ShowVariable { .. }
            | S::ShowVariables { .. }
            | S::ShowStatus { .. } => self.base(C::Session),
            S::NOTIFY { .. } => self.escalate(C::Write, "NOTIFY sends a message to other sessions"),
            S::StartTransaction {
                statements,
                exception,
                ..
            } => {
                if statements.is_empty() && exception.is_none() {
                    self.base(C::Transaction);
                } else {
                    self.opaque("a procedural block");
                }
            }
            S::Commit { .. }
            | S::Rollback { .. }
            | S::Savepoint { .. }
            | S::ReleaseSavepoint { .. } => self.base(C::Transaction),
            S::Set(set) => self.set(set),
            S::Reset(r) => match &r.reset {
                sql::Reset::SessionAuthorization => {
                    self.escalate(C::Privilege, "changes the session's role")
                }
                sql::Reset::ConfigurationParameter(name) if is_role_setting(name) => {
                    self.escalate(C::Privilege, "changes the session's role")
                }
                _ => self.base(C::Session),
            },
            S::Grant(_)
            | S::Revoke(_)
            | S::GrantRole(_)
            | S::RevokeRole(_)
            | S::Deny(_)
            | S::AlterDefaultPrivileges(_)
            | S::CreateRole(_)
            | S::AlterRole { .. }
            | S::CreateUser(_)
            | S::AlterUser(_)
            | S::CreatePolicy(_)
            | S::AlterPolicy(_)
            | S::DropPolicy(_) => self.base(C::Privilege),
            S::CreateServer(_) | S::CreateUserMapping(_) | S::CreateForeignDataWrapper(_) => self
                .escalate(
                    C::Privilege,
                    "foreign servers and user mappings reach other systems with stored credentials",
                ),
            S::Load { .. } | S::Install { .. } => {
                self.escalate(C::Privilege, "LOAD loads a shared library into the server")
            }
            S::Drop {
                object_type, names, ..
            } => match object_type {
                sql::ObjectType::Role | sql::ObjectType::User | sql::ObjectType::Group => {
                    self.base(C::Privilege)
                }
                _ => {
                    self.base(C::Ddl);
                    if matches!(
                        object_type,
                        sql::ObjectType::Table
                            | sql::ObjectType::View
                            | sql::ObjectType::MaterializedView
                            | sql::ObjectType::ForeignTable
                    ) {
                        for n in names {
                            self.write_name(n);
                        }
                    }
                }
            },
            S::AlterTable(at) => {
                self.base(C::Ddl);
                self.write_name(&at.name);
                if at.operations.iter().any(|op| {
                    matches!(
                        op,
                        sql::AlterTableOperation::OwnerTo { .. }
                            | sql::AlterTableOperation::EnableRowLevelSecurity
                            | sql::AlterTableOperation::DisableRowLevelSecurity
                            | sql::AlterTableOperation::ForceRowLevelSecurity
                            | sql::AlterTableOperation::NoForceRowLevelSecurity
                    )
                }) {
                    self.escalate(
                        C::Privilege,
                        "changes a table's owner or its row-level security",
                    );
                }
            }
            S::CreateTable(ct) => {
                self.base(C::Ddl);
                self.write_name(&ct.name);
                if let Some(q) = &ct.query {
                    self.query(q);
                }
                if let Some(src) = &ct.clone {
                    self.read_name(src);
                }
            }
            S::CreateView(cv) => {
                self.base(C::Ddl);
                self.write_name(&cv.name);
                if cv.materialized {
                    // WITH DATA (the default) runs the query now.
                    self.query(&cv.query);
                } else {
                    self.not_executed(|w| w.query(&cv.query));
                }
            }
            S::CreateIndex(ci) => {
                self.base(C::Ddl);
                self.write_name(&ci.table_name);
            }
            S::Truncate(t) => {
                self.base(C::Write);
                for target in &t.table_names {
                    self.write_name(&target.name);
                }
            }
            S::Lock(l) => {
                self.escalate(C::Write, "LOCK TABLE blocks other sessions");
                for target in &l.tables {
                    self.write_name(&target.name);
                }
            }
            S::RefreshMaterializedView(r) => {
                self.base(C::Ddl);
                self.write_name(&r.name);
            }
            S::Analyze(_)
            | S::Vacuum(_)
            | S::Comment { .. }
            | S::CreateSchema { .. }
            | S::CreateDatabase { .. }
            | S::CreateFunction(_)
            | S::CreateProcedure { .. }
            | S::CreateTrigger(_)
            | S::DropTrigger(_)
            | S::CreateSequence { .. }
            | S::CreateType { .. }
            | S::CreateDomain(_)
            | S::CreateExtension(_)
            | S::DropExtension(_)
            | S::CreateCollation(_)
            | S::CreateRule(_)
            | S::CreateOperator(_)
            | S::CreateOperatorFamily(_)
            | S::CreateOperatorClass(_)
            | S::CreateTextSearch(_)
            | S::CreateAggregate(_)
            | S::CreateForeignTable(_)
            | S::AlterSchema(_)
            | S::AlterIndex { .. }
            | S::AlterView(_)
            | S::AlterFunction(_)
            | S::AlterType(_)
            | S::AlterCollation(_)
            | S::AlterOperator(_)
            | S::AlterOperatorFamily(_)
            | S::AlterOperatorClass(_)
            | S::AlterTextSearch(_)
            | S::AlterTrigger(_)
            | S::DropFunction(_)
            | S::DropDomain(_)
            | S::DropProcedure { .. }
            | S::DropRule(_)
            | S::DropOperator(_)
            | S::DropOperatorFamily(_)
            | S::DropOperatorClass(_) => self.base(C::Ddl),
            _ => self.opaque("a kind of statement the classifier does not know"),
        }
        self.depth -= 1;
    }

    fn set(&mut self, set: &sql::Set) {
        use StatementClass as C;
        match set {
            sql::Set::SetRole { .. } | sql::Set::SetSessionAuthorization(_) => {
                self.base(C::Privilege)
            }
            sql::Set::SetTransaction { .. } => self.base(C::Transaction),
            sql::Set::SingleAssignment { variable, .. } if is_role_setting(variable) => {
                self.base(C::Privilege)
            }
            sql::Set::ParenthesizedAssignments { variables, .. }
                if variables.iter().any(is_role_setting) =>
            {
                self.base(C::Privilege)
            }
            sql::Set::MultipleAssignments { assignments }
                if assignments.iter().any(|a| is_role_setting(&a.name)) =>
            {
                self.base(C::Privilege)
            }
            _ => self.base(C::Session),
        }
    }

    fn query(&mut self, q: &sql::Query) {
        if !self.enter() {
            return;
        }
        let scope = self.ctes.len();
        if let Some(with) = &q.with {
            let names: Vec<String> = with
                .cte_tables
                .iter()
                .map(|c| canonical_ident(&c.alias.name))
                .collect();
            if with.recursive {
                self.ctes.extend(names.iter().cloned());
            }
            for (cte, name) in with.cte_tables.iter().zip(names) {
                // A plain WITH sees only the CTEs before it: `WITH t AS
                // (SELECT * FROM t)` reads the real table t.
                self.query(&cte.query);
                if !with.recursive {
                    self.ctes.push(name);
                }
            }
        }
        self.set_expr(&q.body);
        if let Some(ob) = &q.order_by {
            self.order_by(ob);
        }
        match &q.limit_clause {
            None => {}
            Some(sql::LimitClause::LimitOffset {
                limit,
                offset,
                limit_by,
            }) => {
                self.opt_expr(limit.as_ref());
                if let Some(o) = offset {
                    self.expr(&o.value);
                }
                self.exprs(limit_by);
            }
            Some(sql::LimitClause::OffsetCommaLimit { offset, limit }) => {
                self.expr(offset);
                self.expr(limit);
            }
        }
        if let Some(f) = &q.fetch {
            self.opt_expr(f.quantity.as_ref());
        }
        if !q.locks.is_empty() {
            self.locks = true;
            self.escalate(
                StatementClass::Write,
                "SELECT ... FOR UPDATE/SHARE locks rows as a write does",
            );
        }
        if q.for_clause.is_some()
            || q.settings.is_some()
            || q.format_clause.is_some()
            || !q.pipe_operators.is_empty()
        {
            self.opaque("syntax of another SQL dialect");
        }
        self.ctes.truncate(scope);
        self.depth -= 1;
    }

    fn set_expr(&mut self, e: &sql::SetExpr) {
        if !self.enter() {
            return;
        }
        match e {
            sql::SetExpr::Select(s) => self.select(s),
            sql::SetExpr::Query(q) => self.query(q),
            sql::SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            sql::SetExpr::Values(v) => self.values(v),
            sql::SetExpr::Insert(s)
            | sql::SetExpr::Update(s)
            | sql::SetExpr::Delete(s)
            | sql::SetExpr::Merge(s) => {
                self.escalate(StatementClass::Write, "a WITH clause modifies data");
                self.statement(s);
            }
            sql::SetExpr::Table(t) => match &t.table_name {
                Some(table) => {
                    let mut parts: Vec<sql::Ident> = t.schema_name.iter().cloned().collect();
                    parts.push(table.clone());
                    self.read_name(&sql::ObjectName::from(parts));
                }
                None => self.opaque("TABLE without a name"),
            },
        }
        self.depth -= 1;
    }

    fn select(&mut self, s: &sql::Select) {
        if s.top.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || !s.connect_by.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || s.qualify.is_some()
            || s.value_table_mode.is_some()
            || s.exclude.is_some()
            || s.select_modifiers.is_some()
            || !matches!(s.flavor, sql::SelectFlavor::Standard)
        {
            self.opaque("syntax of another SQL dialect");
        }
        if let Some(sql::Distinct::On(exprs)) = &s.distinct {
            self.exprs(exprs);
        }
        self.select_items(&s.projection);
        if let Some(into) = &s.into {
            self.escalate(StatementClass::Ddl, "SELECT INTO creates a table");
            for t in &into.targets {
                match t {
                    sql::Expr::Identifier(i) => {
                        self.write_name(&sql::ObjectName::from(i.clone()));
                    }
                    sql::Expr::CompoundIdentifier(parts) => {
                        self.write_name(&sql::ObjectName::from(parts.clone()));
                    }
                    _ => self.opaque("SELECT INTO an expression"),
                }
            }
        }
        for t in &s.from {
            self.table_with_joins(t);
        }
        self.opt_expr(s.selection.as_ref());
        match &s.group_by {
            sql::GroupByExpr::Expressions(exprs, _) => self.exprs(exprs),
            sql::GroupByExpr::All(_) => {}
        }
        self.opt_expr(s.having.as_ref());
        for w in &s.named_window {
            if let sql::NamedWindowExpr::WindowSpec(spec) = &w.1 {
                self.window_spec(spec);
            }
        }
    }

    fn select_items(&mut self, items: &[sql::SelectItem]) {
        for item in items {
            match item {
                sql::SelectItem::UnnamedExpr(e)
                | sql::SelectItem::ExprWithAlias { expr: e, .. }
                | sql::SelectItem::ExprWithAliases { expr: e, .. } => self.expr(e),
                sql::SelectItem::QualifiedWildcard(kind, _) => {
                    if let sql::SelectItemQualifiedWildcardKind::Expr(e) = kind {
                        self.expr(e);
                    }
                }
                sql::SelectItem::Wildcard(_) => {}
            }
        }
    }

    fn values(&mut self, v: &sql::Values) {
        for row in &v.rows {
            self.exprs(row);
        }
    }

    fn returning(&mut self, items: Option<&Vec<sql::SelectItem>>, targets: &[String]) {
        if let Some(items) = items {
            // RETURNING hands the written rows back: the target is read too.
            for t in targets {
                push_unique(&mut self.reads, t.clone());
            }
            self.select_items(items);
        }
    }

    fn output(&mut self, output: Option<&sql::OutputClause>, targets: &[String]) {
        match output {
            None => {}
            Some(sql::OutputClause::Returning { select_items, .. }) => {
                self.returning(Some(select_items), targets)
            }
            Some(sql::OutputClause::Output { .. }) => self.opaque("syntax of another SQL dialect"),
        }
    }

    /// The table a DML statement writes: a plain table name, else unknown.
    fn write_target(&mut self, t: &sql::TableFactor) -> Option<String> {
        match t {
            sql::TableFactor::Table {
                name, args: None, ..
            } => self.write_name(name),
            _ => {
                self.opaque("a write to something other than a table");
                None
            }
        }
    }

    fn assignments(&mut self, assignments: &[sql::Assignment]) {
        for a in assignments {
            self.expr(&a.value);
        }
    }

    fn insert(&mut self, i: &sql::Insert) {
        self.base(StatementClass::Write);
        let outer = std::mem::replace(&mut self.in_write, true);
        let mut targets = Vec::new();
        match &i.table {
            sql::TableObject::TableName(name) => targets.extend(self.write_name(name)),
            _ => self.opaque("INSERT into something other than a table"),
        }
        if let Some(src) = &i.source {
            self.query(src);
        }
        self.assignments(&i.assignments);
        match &i.on {
            None => {}
            Some(sql::OnInsert::OnConflict(oc)) => {
                if let sql::OnConflictAction::DoUpdate(du) = &oc.action {
                    self.assignments(&du.assignments);
                    self.opt_expr(du.selection.as_ref());
                }
            }
            Some(sql::OnInsert::DuplicateKeyUpdate(a)) => self.assignments(a),
            Some(_) => self.opaque("an INSERT clause the classifier does not know"),
        }
        self.returning(i.returning.as_ref(), &targets);
        self.output(i.output.as_ref(), &targets);
        if i.partitioned.is_some()
            || i.multi_table_insert_type.is_some()
            || !i.multi_table_into_clauses.is_empty()
            || !i.multi_table_when_clauses.is_empty()
            || i.multi_table_else_clause.is_some()
            || i.settings.is_some()
            || i.format_clause.is_some()
        {
            self.opaque("syntax of another SQL dialect");
        }
        self.in_write = outer;
    }

    fn update(&mut self, u: &sql::Update) {
        self.base(StatementClass::Write);
        let outer = std::mem::replace(&mut self.in_write, true);
        let targets: Vec<String> = self.write_target(&u.table.relation).into_iter().collect();
        for j in &u.table.joins {
            self.join(j);
        }
        match &u.from {
            None => {}
            Some(
                sql::UpdateTableFromKind::BeforeSet(v) | sql::UpdateTableFromKind::AfterSet(v),
            ) => {
                for t in v {
                    self.table_with_joins(t);
                }
            }
        }
        self.assignments(&u.assignments);
        self.opt_expr(u.selection.as_ref());
        self.order_by_exprs(&u.order_by);
        self.opt_expr(u.limit.as_ref());
        self.returning(u.returning.as_ref(), &targets);
        self.output(u.output.as_ref(), &targets);
        if u.or.is_some() || u.settings.is_some() {
            self.opaque("syntax of another SQL dialect");
        }
        self.in_write = outer;
    }

    fn delete(&mut self, d: &sql::Delete) {
        self.base(StatementClass::Write);
        let outer = std::mem::replace(&mut self.in_write, true);
        let from = match &d.from {
            sql::FromTable::WithFromKeyword(v) | sql::FromTable::WithoutKeyword(v) => v,
        };
        let mut targets = Vec::new();
        if d.tables.is_empty() {
            for t in from {
                targets.extend(self.write_target(&t.relation));
                for j in &t.joins {
                    self.join(j);
                }
            }
        } else {
            for n in &d.tables {
                targets.extend(self.write_name(n));
            }
            for t in from {
                self.table_with_joins(t);
            }
        }
        for t in d.using.iter().flatten() {
            self.table_with_joins(t);
        }
        self.opt_expr(d.selection.as_ref());
        self.order_by_exprs(&d.order_by);
        self.opt_expr(d.limit.as_ref());
        self.returning(d.returning.as_ref(), &targets);
        self.output(d.output.as_ref(), &targets);
        if d.settings.is_some() {
            self.opaque("syntax of another SQL dialect");
        }
        self.in_write = outer;
    }

    fn merge(&mut self, m: &sql::Merge) {
        self.base(StatementClass::Write);
        let outer = std::mem::replace(&mut self.in_write, true);
        let targets: Vec<String> = self.write_target(&m.table).into_iter().collect();
        self.table_factor(&m.source);
        self.expr(&m.on);
        for c in &m.clauses {
            self.opt_expr(c.predicate.as_ref());
            match &c.action {
                sql::MergeAction::Insert(ins) => {
                    if let sql::MergeInsertKind::Values(v) = &ins.kind {
                        self.values(v);
                    }
                    self.opt_expr(ins.insert_predicate.as_ref());
                }
                sql::MergeAction::Update(up) => {
                    if let sql::MergeUpdateKind::Set(a) = &up.kind {
                        self.assignments(a);
                    }
                    self.opt_expr(up.update_predicate.as_ref());
                    self.opt_expr(up.delete_predicate.as_ref());
                }
                sql::MergeAction::Delete { .. } | sql::MergeAction::DoNothing { .. } => {}
            }
        }
        self.output(m.output.as_ref(), &targets);
        self.in_write = outer;
    }

    fn table_with_joins(&mut self, t: &sql::TableWithJoins) {
        self.table_factor(&t.relation);
        for j in &t.joins {
            self.join(j);
        }
    }

    fn join(&mut self, j: &sql::Join) {
        use sql::JoinOperator as J;
        self.table_factor(&j.relation);
        let constraint = match &j.join_operator {
            J::Join(c)
            | J::Inner(c)
            | J::Left(c)
            | J::LeftOuter(c)
            | J::Right(c)
            | J::RightOuter(c)
            | J::FullOuter(c)
            | J::CrossJoin(c)
            | J::Semi(c)
            | J::LeftSemi(c)
            | J::RightSemi(c)
            | J::Anti(c)
            | J::LeftAnti(c)
            | J::RightAnti(c)
            | J::StraightJoin(c) => Some(c),
            J::AsOf {
                match_condition,
                constraint,
            } => {
                self.expr(match_condition);
                Some(constraint)
            }
            J::CrossApply | J::OuterApply | J::ArrayJoin | J::LeftArrayJoin | J::InnerArrayJoin => {
                None
            }
        };
        if let Some(sql::JoinConstraint::On(e)) = constraint {
            self.expr(e);
        }
    }

    fn table_factor(&mut self, t: &sql::TableFactor) {
        use sql::TableFactor as T;
        if !self.enter() {
            return;
        }
        match t {
            T::Table {
                name,
                args,
                with_hints,
                version,
                partitions,
                json_path,
                index_directives,
                ..
            } => {
                match args {
                    // `FROM generate_series(1, 3)`: a function, not a table.
                    Some(args) => {
                        if let Some(parts) = self.name(name) {
                            self.record_function(parts);
                        }
                        self.function_args(&args.args);
                        if args.settings.is_some() {
                            self.opaque("syntax of another SQL dialect");
                        }
                    }
                    None => self.read_name(name),
                }
                self.exprs(with_hints);
                if version.is_some()
                    || !partitions.is_empty()
                    || json_path.is_some()
                    || !index_directives.is_empty()
                {
                    self.opaque("syntax of another SQL dialect");
                }
            }
            T::Derived { subquery, .. } => self.query(subquery),
            T::TableFunction { expr, .. } => self.expr(expr),
            T::Function { name, args, .. } => {
                if let Some(parts) = self.name(name) {
                    self.record_function(parts);
                }
                self.function_args(args);
            }
            T::UNNEST { array_exprs, .. } => {
                self.record_function(vec!["unnest".to_string()]);
                self.exprs(array_exprs);
            }
            T::NestedJoin {
                table_with_joins, ..
            } => self.table_with_joins(table_with_joins),
            T::JsonTable { .. }
            | T::OpenJsonTable { .. }
            | T::XmlTable { .. }
            | T::Pivot { .. }
            | T::Unpivot { .. }
            | T::UnpivotExpr { .. }
            | T::MatchRecognize { .. }
            | T::SemanticView { .. } => {
                self.opaque("a table expression the classifier does not analyse")
            }
        }
        self.depth -= 1;
    }

    fn function(&mut self, f: &sql::Function) {
        if let Some(parts) = self.name(&f.name) {
            self.record_function(parts);
        }
        self.function_arguments(&f.parameters);
        self.function_arguments(&f.args);
        self.order_by_exprs(&f.within_group);
        if let Some(filter) = &f.filter {
            self.expr(filter);
        }
        if let Some(sql::WindowType::WindowSpec(spec)) = &f.over {
            self.window_spec(spec);
        }
    }

    fn function_arguments(&mut self, a: &sql::FunctionArguments) {
        match a {
            sql::FunctionArguments::None => {}
            sql::FunctionArguments::Subquery(q) => self.query(q),
            sql::FunctionArguments::List(list) => {
                self.function_args(&list.args);
                for c in &list.clauses {
                    match c {
                        sql::FunctionArgumentClause::OrderBy(o) => self.order_by_exprs(o),
                        sql::FunctionArgumentClause::Limit(e)
                        | sql::FunctionArgumentClause::Where(e) => self.expr(e),
                        sql::FunctionArgumentClause::Having(h) => self.expr(&h.1),
                        sql::FunctionArgumentClause::IgnoreOrRespectNulls(_)
                        | sql::FunctionArgumentClause::OnOverflow(_)
                        | sql::FunctionArgumentClause::Separator(_)
                        | sql::FunctionArgumentClause::JsonNullClause(_)
                        | sql::FunctionArgumentClause::JsonReturningClause(_) => {}
                    }
                }
            }
        }
    }

    fn function_args(&mut self, args: &[sql::FunctionArg]) {
        for a in args {
            let arg = match a {
                sql::FunctionArg::Named { arg, .. } => arg,
                sql::FunctionArg::ExprNamed { name, arg, .. } => {
                    self.expr(name);
                    arg
                }
                sql::FunctionArg::Unnamed(arg) => arg,
            };
            if let sql::FunctionArgExpr::Expr(e) = arg {
                self.expr(e);
            }
        }
    }

    fn window_spec(&mut self, spec: &sql::WindowSpec) {
        self.exprs(&spec.partition_by);
        self.order_by_exprs(&spec.order_by);
        if let Some(frame) = &spec.window_frame {
            for bound in std::iter::once(&frame.start_bound).chain(frame.end_bound.as_ref()) {
                match bound {
                    sql::WindowFrameBound::Preceding(Some(e))
                    | sql::WindowFrameBound::Following(Some(e)) => self.expr(e),
                    _ => {}
                }
            }
        }
    }

    fn order_by(&mut self, ob: &sql::OrderBy) {
        if let sql::OrderByKind::Expressions(v) = &ob.kind {
            self.order_by_exprs(v);
        }
        if ob.interpolate.is_some() {
            self.opaque("syntax of another SQL dialect");
        }
    }

    fn order_by_exprs(&mut self, v: &[sql::OrderByExpr]) {
        for o in v {
            self.expr(&o.expr);
            if o.with_fill.is_some() {
                self.opaque("syntax of another SQL dialect");
            }
        }
    }

    fn subscript(&mut self, s: &sql::Subscript) {
        match s {
            sql::Subscript::Index { index } => self.expr(index),
            sql::Subscript::Slice {
                lower_bound,
                upper_bound,
                stride,
            } => {
                self.opt_expr(lower_bound.as_ref());
                self.opt_expr(upper_bound.as_ref());
                self.opt_expr(stride.as_ref());
            }
        }
    }

    fn custom_operator(&mut self, parts: &[String]) {
        let schema_is_catalog = parts.len() == 2 && parts[0].eq_ignore_ascii_case("pg_catalog");
        if !schema_is_catalog {
            self.unsafe_function = true;
        }
        push_unique(
            &mut self.functions,
            format!("operator({})", parts.join(".")),
        );
    }

    fn exprs(&mut self, v: &[sql::Expr]) {
        for e in v {
            self.expr(e);
        }
    }

    fn opt_expr(&mut self, e: Option<&sql::Expr>) {
        if let Some(e) = e {
            self.expr(e);
        }
    }

    fn expr(&mut self, e: &sql::Expr) {
        use sql::Expr as E;
        // Left-deep operator chains (`a AND b AND ...`, `1 + 2 + ...`) are
        // walked in a loop, left to right, not by recursion.
        if let E::BinaryOp { .. } = e {
            let mut spine = Vec::new();
            let mut leftmost = e;
            while let E::BinaryOp { left, op, right } = leftmost {
                spine.push((op, right));
                leftmost = left;
            }
            self.expr(leftmost);
            for (op, right) in spine.into_iter().rev() {
                if let sql::BinaryOperator::PGCustomBinaryOperator(parts) = op {
                    self.custom_operator(parts);
                }
                self.expr(right);
            }
            return;
        }
        if !self.enter() {
            return;
        }
        match e {
            E::Identifier(_)
            | E::CompoundIdentifier(_)
            | E::Value(_)
            | E::TypedString(_)
            | E::Wildcard(_)
            | E::QualifiedWildcard(..)
            | E::MatchAgainst { .. } => {}
            E::CompoundFieldAccess { root, access_chain } => {
                self.expr(root);
                for a in access_chain {
                    match a {
                        sql::AccessExpr::Dot(e) => self.expr(e),
                        sql::AccessExpr::Subscript(s) => self.subscript(s),
                    }
                }
            }
            E::JsonAccess { value, path } => {
                self.expr(value);
                for el in &path.path {
                    match el {
                        sql::JsonPathElem::Bracket { key }
                        | sql::JsonPathElem::ColonBracket { key } => self.expr(key),
                        sql::JsonPathElem::Dot { .. } => {}
                    }
                }
            }
            E::IsFalse(x)
            | E::IsNotFalse(x)
            | E::IsTrue(x)
            | E::IsNotTrue(x)
            | E::IsNull(x)
            | E::IsNotNull(x)
            | E::IsUnknown(x)
            | E::IsNotUnknown(x)
            | E::Nested(x)
            | E::OuterJoin(x)
            | E::Prior(x) => self.expr(x),
            E::IsDistinctFrom(a, b) | E::IsNotDistinctFrom(a, b) => {
                self.expr(a);
                self.expr(b);
            }
            E::IsJson { expr, .. } | E::IsNormalized { expr, .. } => self.expr(expr),
            E::In { expr, target, .. } => {
                self.expr(expr);
                match target {
                    sql::InTarget::List(v) => self.exprs(v),
                    sql::InTarget::Subquery(q) => self.query(q),
                    sql::InTarget::Unnest(e) => self.expr(e),
                    sql::InTarget::Table { name, args } => {
                        self.read_name(name);
                        if let Some(args) = args {
                            self.function_args(args);
                        }
                    }
                }
            }
            E::Between {
                expr, low, high, ..
            } => {
                self.expr(expr);
                self.expr(low);
                self.expr(high);
            }
            // Handled above; kept for exhaustiveness.
            E::BinaryOp { .. } => {}
            E::AnyOp {
                left,
                compare_op,
                right,
                ..
            }
            | E::AllOp {
                left,
                compare_op,
                right,
            } => {
                if let sql::BinaryOperator::PGCustomBinaryOperator(parts) = compare_op {
                    self.custom_operator(parts);
                }
                self.expr(left);
                self.expr(right);
            }
            E::Like {
                expr,
                pattern,
                escape_char,
                ..
            }
            | E::ILike {
                expr,
                pattern,
                escape_char,
                ..
            }
            | E::SimilarTo {
                expr,
                pattern,
                escape_char,
                ..
            } => {
                self.expr(expr);
                self.expr(pattern);
                self.opt_expr(escape_char.as_deref());
            }
            E::RLike { expr, pattern, .. } => {
                self.expr(expr);
                self.expr(pattern);
            }
            E::UnaryOp { expr, .. }
            | E::Cast { expr, .. }
            | E::Extract { expr, .. }
            | E::Ceil { expr, .. }
            | E::Floor { expr, .. }
            | E::Collate { expr, .. }
            | E::Named { expr, .. } => self.expr(expr),
            E::Prefixed { value, .. } => self.expr(value),
            E::Convert { expr, styles, .. } => {
                self.expr(expr);
                self.exprs(styles);
            }
            E::AtTimeZone {
                timestamp,
                time_zone,
            } => {
                self.expr(timestamp);
                self.expr(time_zone);
            }
            E::Position { expr, r#in } => {
                self.expr(expr);
                self.expr(r#in);
            }
            E::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                self.expr(expr);
                self.opt_expr(substring_from.as_deref());
                self.opt_expr(substring_for.as_deref());
            }
            E::Trim {
                expr,
                trim_what,
                trim_characters,
                ..
            } => {
                self.expr(expr);
                self.opt_expr(trim_what.as_deref());
                if let Some(v) = trim_characters {
                    self.exprs(v);
                }
            }
            E::Overlay {
                expr,
                overlay_what,
                overlay_from,
                overlay_for,
            } => {
                self.expr(expr);
                self.expr(overlay_what);
                self.expr(overlay_from);
                self.opt_expr(overlay_for.as_deref());
            }
            E::Function(f) => self.function(f),
            E::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                self.opt_expr(operand.as_deref());
                for c in conditions {
                    self.expr(&c.condition);
                    self.expr(&c.result);
                }
                self.opt_expr(else_result.as_deref());
            }
            E::Exists { subquery, .. } => self.query(subquery),
            E::Subquery(q) => self.query(q),
            E::GroupingSets(v) | E::Cube(v) | E::Rollup(v) => {
                for inner in v {
                    self.exprs(inner);
                }
            }
            E::Tuple(v) => self.exprs(v),
            E::Struct { values, .. } => self.exprs(values),
            E::Dictionary(fields) => {
                for f in fields {
                    self.expr(&f.value);
                }
            }
            E::Map(m) => {
                for entry in &m.entries {
                    self.expr(&entry.key);
                    self.expr(&entry.value);
                }
            }
            E::Array(a) => self.exprs(&a.elem),
            E::Interval(i) => self.expr(&i.value),
            E::Lambda(l) => self.expr(&l.body),
            E::MemberOf(m) => {
                self.expr(&m.value);
                self.expr(&m.array);
            }
        }
        self.depth -= 1;
    }
}

/// `role` or `session_authorization`: settings that change who the session is.
fn is_role_setting(name: &sql::ObjectName) -> bool {
    match name.0.as_slice() {
        [sql::ObjectNamePart::Identifier(i)] => {
            i.value.eq_ignore_ascii_case("role")
                || i.value.eq_ignore_ascii_case("session_authorization")
        }
        _ => false,
    }
}

/// An EXPLAIN option value that turns the option off.
fn is_false(e: &sql::Expr) -> bool {
    match e {
        sql::Expr::Value(v) => match &v.value {
            sql::Value::Boolean(b) => !b,
            sql::Value::Number(n, _) => n == "0",
            sql::Value::SingleQuotedString(s) => {
                matches!(
                    s.to_ascii_lowercase().as_str(),
                    "off" | "false" | "0" | "no"
                )
            }
            _ => false,
        },
        sql::Expr::Identifier(i) => {
            matches!(
                i.value.to_ascii_lowercase().as_str(),
                "off" | "false" | "no"
            )
        }
        _ => false,
    }
}
