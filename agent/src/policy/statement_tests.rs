//! Deciding statements: the `sql` matcher (class, tables, functions,
//! database, user), with workloads and targets, first match, `sql_default`,
//! and statement rules kept apart from connection rules.
use std::{net::SocketAddr, path::PathBuf};

use super::tests::{policy, process};
use super::*;

fn who(uid: u32) -> Identity {
    process(uid, "support-bot.service")
}

/// One statement, as the proxy would describe it; `Stmt::new` gives a read
/// of nothing by uid 1000 to 10.0.4.12:5432, database crm, user app.
#[derive(Clone)]
struct Stmt {
    uid: u32,
    destination: &'static str,
    database: Option<&'static str>,
    db_user: Option<&'static str>,
    class: &'static str,
    reads: Vec<String>,
    writes: Vec<String>,
    functions: Vec<String>,
    from_llm: bool,
}

impl Stmt {
    fn new(class: &'static str) -> Stmt {
        Stmt {
            uid: 1000,
            destination: "10.0.4.12:5432",
            database: Some("crm"),
            db_user: Some("app"),
            class,
            reads: Vec::new(),
            writes: Vec::new(),
            functions: Vec::new(),
            from_llm: false,
        }
    }
    fn proposed_by_llm(mut self) -> Stmt {
        self.from_llm = true;
        self
    }
    fn uid(mut self, uid: u32) -> Stmt {
        self.uid = uid;
        self
    }
    fn to(mut self, destination: &'static str) -> Stmt {
        self.destination = destination;
        self
    }
    fn db(mut self, database: Option<&'static str>, user: Option<&'static str>) -> Stmt {
        self.database = database;
        self.db_user = user;
        self
    }
    fn reads(mut self, tables: &[&str]) -> Stmt {
        self.reads = tables.iter().map(|t| t.to_string()).collect();
        self
    }
    fn writes(mut self, tables: &[&str]) -> Stmt {
        self.writes = tables.iter().map(|t| t.to_string()).collect();
        self
    }
    fn calls(mut self, functions: &[&str]) -> Stmt {
        self.functions = functions.iter().map(|f| f.to_string()).collect();
        self
    }

    /// (action, rule) the policy gives.
    fn on(&self, p: &Policy) -> (Action, String) {
        let d = self.decision(p);
        (d.action, d.rule)
    }

    fn decision(&self, p: &Policy) -> Decision {
        let identity = who(self.uid);
        let destination: SocketAddr = self.destination.parse().unwrap();
        p.decide_statement(&StatementRequest {
            identity: &identity,
            destination,
            database: self.database,
            db_user: self.db_user,
            class: self.class,
            tables_read: &self.reads,
            tables_written: &self.writes,
            functions: &self.functions,
            from_llm: self.from_llm,
        })
    }
}

fn allow(rule: &str) -> (Action, String) {
    (Action::Allow, rule.into())
}

fn deny(rule: &str) -> (Action, String) {
    (Action::Deny, rule.into())
}

fn connection(p: &Policy, uid: u32, dest: &str) -> (Action, String) {
    let d = p.decide_connection(&ConnectionRequest {
        identity: &who(uid),
        destination: dest.parse().unwrap(),
        transport: Transport::Tcp,
    });
    (d.action, d.rule)
}

#[test]
fn classes_one_or_a_list() {
    let p = policy(
        r#"
version: 1
rules:
  - { name: no-changes, when: { sql: { class: [write, ddl] } }, action: deny }
  - { name: no-grants, when: { sql: { class: privilege } }, action: deny }
  - { name: not-understood, when: { sql: { class: unknown } }, action: deny }
"#,
    );
    for class in ["write", "ddl"] {
        assert_eq!(Stmt::new(class).on(&p), deny("no-changes"), "{class}");
    }
    assert_eq!(Stmt::new("privilege").on(&p), deny("no-grants"));
    assert_eq!(Stmt::new("unknown").on(&p), deny("not-understood"));
    // A class string the policy does not know is taken as unknown.
    assert_eq!(Stmt::new("vacuum").on(&p), deny("not-understood"));
    assert_eq!(Stmt::new("").on(&p), deny("not-understood"));
    assert_eq!(Stmt::new("WRITE").on(&p), deny("not-understood"));
    for class in ["transaction", "session", "read", "copy", "function"] {
        assert_eq!(Stmt::new(class).on(&p), allow("default"), "{class}");
    }
    // Every class name the policy offers is one a statement can have.
    assert_eq!(STATEMENT_CLASSES.len(), 9);
}

#[test]
fn tables_match_reads_and_writes_without_case() {
    let p = policy(
        r#"
version: 1
rules:
  - { name: crm, when: { sql: { tables: "crm.*" } }, action: deny }
  - { name: cards, when: { sql: { tables: ["*card*", "payments.*"] } }, action: deny }
  - { name: bare-customers, when: { sql: { tables: customers } }, action: deny }
"#,
    );
    let read = Stmt::new("read");
    assert_eq!(read.clone().reads(&["crm.customers"]).on(&p), deny("crm"));
    assert_eq!(
        Stmt::new("write").writes(&["crm.orders"]).on(&p),
        deny("crm")
    );
    // Any table read or written, against any glob.
    assert_eq!(
        Stmt::new("write")
            .reads(&["public.staging"])
            .writes(&["public.x", "payments.ledger"])
            .on(&p),
        deny("cards")
    );
    assert_eq!(
        read.clone().reads(&["public.credit_cards"]).on(&p),
        deny("cards")
    );
    assert_eq!(read.clone().reads(&["CardHolders"]).on(&p), deny("cards"));
    // Case does not matter; quotes are looked through.
    assert_eq!(read.clone().reads(&["CRM.Customers"]).on(&p), deny("crm"));
    assert_eq!(
        read.clone().reads(&["\"CRM\".\"Customers\""]).on(&p),
        deny("crm")
    );
    assert_eq!(
        read.clone().reads(&["\"Payments\".ledger"]).on(&p),
        deny("cards")
    );
    // Names are matched as written: unqualified is not crm.*, and a bare
    // glob matches only the bare name.
    assert_eq!(
        read.clone().reads(&["customers"]).on(&p),
        deny("bare-customers")
    );
    assert_eq!(
        read.clone().reads(&["public.customers"]).on(&p),
        allow("default")
    );
    assert_eq!(read.clone().reads(&["crmx.t"]).on(&p), allow("default"));
    // A statement that names no table never matches a tables matcher.
    assert_eq!(read.clone().calls(&["now"]).on(&p), allow("default"));
    assert_eq!(Stmt::new("unknown").on(&p), allow("default"));
}

#[test]
fn functions_match_any_function_called() {
    let p = policy(
        r#"
version: 1
rules:
  - name: no-file-access
    when: { sql: { functions: ["pg_read_file", "pg_read_binary_file", "pg_catalog.pg_read*", "lo_*"] } }
    action: deny
"#,
    );
    assert_eq!(
        Stmt::new("function")
            .calls(&["count", "pg_read_file"])
            .on(&p),
        deny("no-file-access")
    );
    assert_eq!(
        Stmt::new("function")
            .calls(&["PG_CATALOG.PG_READ_BINARY_FILE"])
            .on(&p),
        deny("no-file-access")
    );
    assert_eq!(
        Stmt::new("function").calls(&["lo_export"]).on(&p),
        deny("no-file-access")
    );
    assert_eq!(
        Stmt::new("read").calls(&["now", "count"]).on(&p),
        allow("default")
    );
    // Tables are not functions.
    assert_eq!(
        Stmt::new("read").reads(&["pg_read_file"]).on(&p),
        allow("default")
    );
}

#[test]
fn database_and_user_match_the_session() {
    let p = policy(
        r#"
version: 1
rules:
  - { name: crm-bot, when: { sql: { database: crm, user: "bot_*" } }, action: deny }
  - { name: analytics, when: { sql: { database: ["analytics", "dw_*"] } }, action: deny }
  - { name: admins, when: { sql: { user: [postgres, admin] } }, action: deny }
"#,
    );
    let s = Stmt::new("read");
    assert_eq!(
        s.clone().db(Some("crm"), Some("bot_ro")).on(&p),
        deny("crm-bot")
    );
    // Both keys must hold.
    assert_eq!(
        s.clone().db(Some("crm"), Some("app")).on(&p),
        allow("default")
    );
    assert_eq!(
        s.clone().db(Some("dw_2024"), Some("app")).on(&p),
        deny("analytics")
    );
    assert_eq!(
        s.clone().db(Some("other"), Some("admin")).on(&p),
        deny("admins")
    );
    // Startup parameters are exact names: case matters.
    assert_eq!(
        s.clone().db(Some("CRM"), Some("bot_ro")).on(&p),
        allow("default")
    );
    // No database sent: PostgreSQL uses the user's name, and so does the policy.
    assert_eq!(
        s.clone().db(None, Some("analytics")).on(&p),
        deny("analytics")
    );
    // Nothing known: a key that needs a value does not hold.
    assert_eq!(s.clone().db(None, None).on(&p), allow("default"));
}

#[test]
fn workload_target_address_port_and_sql_together() {
    let p = policy(
        r#"
version: 1
workloads:
  bot: { match: { unit: "support-bot.service" } }
targets:
  crm-db:   { address: 10.0.4.12, port: 5432, protocol: postgres }
  other-db: { address: 10.0.4.13, port: 5432 }
rules:
  - name: bot-no-writes-to-crm
    when: { workload: bot, target: crm-db, sql: { class: write, tables: "crm.*" } }
    action: deny
  - name: inline-where
    when: { address: 10.0.4.0/24, port: 6432, sql: { class: ddl } }
    action: deny
"#,
    );
    let write = Stmt::new("write").uid(998).writes(&["crm.orders"]);
    assert_eq!(write.on(&p), deny("bot-no-writes-to-crm"));
    assert_eq!(
        write.decision(&p).workload.as_deref(),
        Some("bot"),
        "the decision names the workload"
    );
    // Each part failing alone lets the statement through.
    assert_eq!(write.clone().uid(1000).on(&p), allow("default"));
    assert_eq!(write.clone().to("10.0.4.13:5432").on(&p), allow("default"));
    assert_eq!(
        write.clone().writes(&["public.orders"]).on(&p),
        allow("default")
    );
    let mut read = write.clone();
    read.class = "read";
    assert_eq!(read.on(&p), allow("default"));
    // Inline address and port.
    assert_eq!(
        Stmt::new("ddl").to("10.0.4.9:6432").on(&p),
        deny("inline-where")
    );
    assert_eq!(
        Stmt::new("ddl").to("10.0.4.9:5432").on(&p),
        allow("default")
    );
    assert_eq!(
        Stmt::new("ddl").to("10.0.5.9:6432").on(&p),
        allow("default")
    );
}

#[test]
fn the_first_statement_rule_that_holds_decides() {
    let p = policy(
        r#"
version: 1
rules:
  - { name: reads-of-public-ok, when: { sql: { class: read, tables: "public.*" } }, action: allow }
  - { name: no-reads, when: { sql: { class: read } }, action: deny }
  - { name: reads-again, when: { sql: { class: read } }, action: allow }
  - { name: nothing-else, when: { sql: {} }, action: deny }
"#,
    );
    assert_eq!(
        Stmt::new("read").reads(&["public.t"]).on(&p),
        allow("reads-of-public-ok")
    );
    assert_eq!(Stmt::new("read").reads(&["crm.t"]).on(&p), deny("no-reads"));
    // `sql: {}` holds for every statement.
    assert_eq!(Stmt::new("session").on(&p), deny("nothing-else"));
    assert_eq!(Stmt::new("bogus").on(&p), deny("nothing-else"));
}

#[test]
fn statement_and_connection_rules_are_independent() {
    let p = policy(
        r#"
version: 1
default: deny
targets:
  db: { address: 10.0.4.12, port: 5432, protocol: postgres }
rules:
  - name: no-sql-at-all
    when: { target: db, sql: {} }
    action: deny
  - name: db-connections
    when: { target: db }
    action: allow
  - name: everything-else
    action: deny
"#,
    );
    // The statement rule comes first but never decides a connection.
    assert_eq!(
        connection(&p, 1000, "10.0.4.12:5432"),
        allow("db-connections")
    );
    assert_eq!(
        connection(&p, 1000, "10.0.4.13:5432"),
        deny("everything-else")
    );
    // Connection rules never decide a statement: the catch-all deny and
    // `default: deny` play no part.
    assert_eq!(Stmt::new("read").on(&p), deny("no-sql-at-all"));
    assert_eq!(
        Stmt::new("read").to("10.0.4.13:5432").on(&p),
        allow("default")
    );

    let connections_only =
        policy("version: 1\ndefault: deny\nrules:\n  - { name: all, action: deny }\n");
    assert!(!connections_only.has_statement_rules());
    assert_eq!(Stmt::new("ddl").on(&connections_only), allow("default"));
    assert_eq!(connections_only.statement_rule_count(), 0);
    assert!(p.has_statement_rules());
}

#[test]
fn sql_default() {
    let strict = policy(
        r#"
version: 1
sql_default: deny
rules:
  - { name: reads, when: { sql: { class: [read, transaction, session] } }, action: allow }
"#,
    );
    assert_eq!(strict.sql_default(), Action::Deny);
    assert_eq!(Stmt::new("read").on(&strict), allow("reads"));
    assert_eq!(Stmt::new("write").on(&strict), deny("default"));
    // It decides statements only.
    assert_eq!(connection(&strict, 1, "192.0.2.1:443"), allow("default"));

    // With no statement rule, sql_default: deny still needs asking.
    let none = policy("version: 1\nsql_default: deny\n");
    assert!(none.has_statement_rules());
    assert_eq!(none.statement_rule_count(), 0);
    assert_eq!(Stmt::new("session").on(&none), deny("default"));

    let open = policy("version: 1\nsql_default: allow\n");
    assert_eq!(open.sql_default(), Action::Allow);
    assert!(!open.has_statement_rules());
    assert_eq!(policy("version: 1\n").sql_default(), Action::Allow);
}

#[test]
fn the_embedded_default_allows_every_statement() {
    let p = Policy::embedded_default();
    assert_eq!(p.statement_rule_count(), 0);
    // No statement rule, but its sql_mask masks every statement's rows
    // (mask_tests), so statements are asked about.
    assert!(p.has_statement_rules());
    for class in STATEMENT_CLASSES {
        assert_eq!(Stmt::new(class).on(&p), allow("default"));
    }
}

#[test]
fn unquoting_names() {
    assert_eq!(unquoted("crm.customers"), "crm.customers");
    assert_eq!(unquoted("\"CRM\".customers"), "CRM.customers");
    assert_eq!(unquoted("\"Odd\"\"Name\".\"a.b\""), "Odd\"Name.a.b");
}

#[test]
fn the_sql_guardrails_example_does_what_it_says() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/examples/sql-guardrails.yaml"
    ));
    let p = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let bot = 998;
    let other = 1000;
    assert!(p.has_statement_rules());

    // The support bot may not change the schema or privileges on the CRM
    // database...
    for class in ["ddl", "privilege"] {
        assert_eq!(
            Stmt::new(class).uid(bot).writes(&["crm.customers"]).on(&p),
            deny("bot-no-schema-or-privilege-changes"),
            "{class}"
        );
    }
    // ...while other processes may, and the bot may write data.
    assert_eq!(Stmt::new("ddl").uid(other).on(&p), allow("default"));
    assert_eq!(
        Stmt::new("write").uid(bot).writes(&["crm.tickets"]).on(&p),
        allow("default")
    );
    // Nobody reads card data or the payments schema, whatever the
    // statement's class.
    for (class, table) in [
        ("read", "crm.credit_cards"),
        ("read", "public.CardTokens"),
        ("read", "payments.ledger"),
        ("copy", "payments.refunds"),
        ("write", "crm.card_audit"),
        ("function", "crm.cards"),
    ] {
        for uid in [bot, other] {
            assert_eq!(
                Stmt::new(class).uid(uid).reads(&[table]).on(&p),
                deny("no-card-or-payment-data"),
                "{class} {table} uid {uid}"
            );
        }
    }
    // Reads of the crm schema on the CRM database are allowed, with their
    // results masked by the rule's own mask...
    let crm_read = Stmt::new("read")
        .uid(bot)
        .reads(&["crm.customers", "crm.tickets"]);
    assert_eq!(crm_read.on(&p), allow("mask-crm-reads"));
    let mask = crm_read
        .decision(&p)
        .mask
        .expect("the crm reads are masked");
    assert!(mask.masks_column("email") && mask.masks_column("mobile_phone"));
    assert!(!mask.masks_column("name"));
    let (masked, found) = mask.mask_text("EMP-123456 paid with 4111 1111 1111 1111");
    assert_eq!(found, 2, "{masked}");
    assert!(
        masked.starts_with("[REDACTED:employee_id] paid with"),
        "{masked}"
    );
    assert!(!masked.contains("4111 1111"), "{masked}");
    // ...and every other statement is allowed, with sql_mask.
    let sql_mask = p.sql_mask().expect("the example has a sql_mask");
    assert!(!sql_mask.masks_column("email"));
    let other = Stmt::new("read").uid(bot).reads(&["public.notes"]);
    assert_eq!(other.on(&p), allow("default"));
    assert!(Arc::ptr_eq(
        other.decision(&p).mask.as_ref().unwrap(),
        sql_mask
    ));
    assert_eq!(
        Stmt::new("read")
            .uid(bot)
            .to("10.0.4.13:5432")
            .reads(&["crm.customers"])
            .on(&p),
        allow("default")
    );
    assert_eq!(
        Stmt::new("read").uid(bot).reads(&["paymentsx.t"]).on(&p),
        allow("default")
    );
    for class in ["transaction", "session", "read", "write", "function"] {
        assert_eq!(Stmt::new(class).uid(bot).on(&p), allow("default"));
    }
    // Statement rules only: connections are decided as before.
    assert_eq!(connection(&p, bot, "10.0.4.12:5432"), allow("default"));
    assert_eq!(p.rule_count(), p.statement_rule_count());
}

#[test]
fn from_llm_matches_statements_an_llm_proposed() {
    let p = policy(
        r#"
version: 1
rules:
  - name: llm-writes-denied
    when: { sql: { class: [write], from_llm: true } }
    action: deny
"#,
    );
    assert_eq!(
        Stmt::new("write").proposed_by_llm().on(&p),
        deny("llm-writes-denied")
    );
    assert_eq!(Stmt::new("write").on(&p), allow("default"));
    assert_eq!(Stmt::new("read").proposed_by_llm().on(&p), allow("default"));
}

#[test]
fn from_llm_takes_a_boolean() {
    let src = "version: 1\nrules:\n  - name: x\n    when: { sql: { from_llm: yes please } }\n    action: deny\n";
    let e = Policy::from_yaml(src, "p.yaml").unwrap_err().to_string();
    assert!(e.starts_with("p.yaml:4:"), "{e}");
    assert!(e.contains("`from_llm: true` or `from_llm: false`"), "{e}");
}

#[test]
fn an_approving_rule_holds_the_statement_with_its_approve_and_mask() {
    let p = policy(
        r#"
version: 1
approvals:
  oidc: { issuer: "http://127.0.0.1:9400", client_id: warden }
workloads:
  bot:
    match: { uid: 998 }
    owners: [alice@example.com]
rules:
  - name: bot-writes-need-a-dba
    when: { workload: bot, sql: { class: write, tables: "crm.*" } }
    action: approve
    approve: { groups: [dba], quorum: 2, expires: 30m, message: "a DBA must approve" }
  - name: bot-reads-masked
    when: { workload: bot, sql: { class: read } }
    action: approve
    approve: { groups: [dba] }
    mask: { columns: ["*email*"] }
  - { name: no-ddl, when: { sql: { class: ddl } }, action: deny }
  - { name: bot-to-crm, when: { workload: bot, port: 5432 }, action: allow }
"#,
    );
    let write = Stmt::new("write").uid(998).writes(&["crm.customers"]);
    let d = write.decision(&p);
    assert_eq!(
        (d.action, d.rule.as_str(), d.workload.as_deref()),
        (Action::Approve, "bot-writes-need-a-dba", Some("bot"))
    );
    let approval = d.approval.clone().expect("who approves");
    assert_eq!(
        *approval,
        ApprovalRule {
            groups: vec!["dba".into()],
            quorum: 2,
            expires: Duration::from_secs(30 * 60),
            message: Some("a DBA must approve".into()),
        }
    );
    assert!(d.mask.is_none());
    // One approval per rule, shared by its decisions.
    let again = write.decision(&p);
    assert!(Arc::ptr_eq(&again.approval.unwrap(), &approval));
    assert_eq!(p.owners_of("bot"), ["alice@example.com"]);
    // The rows of an approved statement are masked with the rule's mask.
    let d = Stmt::new("read")
        .uid(998)
        .reads(&["crm.customers"])
        .decision(&p);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Approve, "bot-reads-masked")
    );
    assert_eq!(d.approval.unwrap().groups, ["dba"]);
    let mask = d.mask.expect("the rule's mask");
    assert!(mask.masks_column("contact_email"));
    // Every other decision carries none.
    for (stmt, expected) in [
        (
            Stmt::new("write").writes(&["crm.customers"]),
            allow("default"),
        ),
        (Stmt::new("ddl").uid(998), deny("no-ddl")),
        (
            Stmt::new("write").uid(998).writes(&["hr.people"]),
            allow("default"),
        ),
    ] {
        let d = stmt.decision(&p);
        assert_eq!((d.action, d.rule.clone()), expected);
        assert!(d.approval.is_none(), "{d:?}");
    }
    // Connections are never held: statement rules play no part in them.
    assert_eq!(connection(&p, 998, "10.0.4.12:5432"), allow("bot-to-crm"));
    assert_eq!(connection(&p, 1000, "10.0.4.12:5432"), allow("default"));
    assert!(
        p.decide_connection(&ConnectionRequest {
            identity: &who(998),
            destination: "10.0.4.12:5432".parse().unwrap(),
            transport: Transport::Tcp,
        })
        .approval
        .is_none()
    );
    assert_eq!(
        p.summary(),
        "4 rules, 3 of them for SQL statements, 1 with a mask, 2 holding for approval, 1 \
         workload, 0 targets; approvals by http://127.0.0.1:9400"
    );
}

#[test]
fn the_approvals_example_does_what_it_says() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/examples/approvals.yaml"
    ));
    let p = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let bot = 998;
    let d = Stmt::new("write")
        .uid(bot)
        .writes(&["crm.customers"])
        .decision(&p);
    assert_eq!(
        (d.action, d.rule.as_str()),
        (Action::Approve, "bot-customer-writes")
    );
    let approval = d.approval.unwrap();
    assert_eq!(
        (
            approval.groups.as_slice(),
            approval.quorum,
            approval.expires
        ),
        (&["dba".to_string()][..], 1, Duration::from_secs(30 * 60))
    );
    let d = Stmt::new("ddl").uid(bot).decision(&p);
    assert_eq!(d.rule, "bot-schema-changes");
    assert_eq!(d.approval.unwrap().quorum, 2);
    // Other tables, other processes: allowed.
    assert_eq!(
        Stmt::new("write").uid(bot).writes(&["crm.notes"]).on(&p),
        allow("default")
    );
    assert_eq!(Stmt::new("ddl").on(&p), allow("default"));
    assert_eq!(connection(&p, bot, "10.0.4.12:5432"), allow("default"));
    assert_eq!(
        p.owners_of("support-bot"),
        ["alice@example.com", "bob@example.com"]
    );
    let approvals = p.approvals().unwrap();
    assert_eq!(approvals.oidc.client_id, "warden");
    assert!(approvals.webhook.is_some());
}
