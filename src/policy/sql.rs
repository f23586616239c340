//! What a SQL statement is, as PostgreSQL's own grammar parses it, and whether a role's
//! rules let it run.
//!
//! [`Shape::of`] parses the text with libpg_query (the server's scanner and grammar, as
//! a library) and walks the *whole* tree: every statement of a multi-statement string,
//! every statement nested in another (a DELETE in a CTE, under EXPLAIN, PREPARE, a rule
//! or a view), every table named, every function called. Spelling cannot hide anything
//! the parser sees: comments, case, quoted identifiers, `U&''` and `E''` strings and
//! dollar quotes are already resolved when the tree is walked. [`judge`] then holds a
//! shape against a role's [`SqlPolicy`]; text that does not parse is refused, never
//! passed on.
//!
//! What no parse can see is said here, not hidden: the body of a `DO` block or of a
//! function in a string, SQL text passed to functions that run it (`query_to_xml`,
//! `dblink`), tables read by functions given their name (`table_to_xml`), what a view or
//! a function already on the server does when called. The first three are refused
//! unless the role allows "dynamic SQL"; the last is the database's own permissions'
//! business.
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::config::SqlPolicy;

/// What one message's SQL text is: its statements, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub statements: Vec<StatementShape>,
}

/// One top-level statement, with everything nested in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatementShape {
    /// Every statement kind found, the outer one first: `SELECT`, `DELETE`,
    /// `DROP TABLE`, `COPY TO`, `COPY PROGRAM`, `CREATE FUNCTION`…
    pub kinds: Vec<String>,
    /// Every table (or view, sequence, index) named: (schema, or "" when unqualified; name).
    pub tables: BTreeSet<(String, String)>,
    /// Every function called, by its last name part (`pg_catalog.pg_read_file` is
    /// `pg_read_file`); also the last part of dotted column references, which
    /// PostgreSQL also reads as a call (`t.f` is `f(t)`).
    pub functions: BTreeSet<String>,
    /// Settings changed (`SET`, `RESET`, `set_config`): the name as PostgreSQL folds it
    /// (lowercase), and the new value when it is a constant (`None`: a `RESET`,
    /// `DEFAULT`, or a value the relay cannot see).
    pub settings: Vec<Setting>,
    /// A `set_config` whose setting's name is not a constant: any setting could change.
    pub unseen_setting: bool,
    /// `DELETE` or `UPDATE` without a `WHERE`.
    pub unbounded: Vec<&'static str>,
    /// Asks for a read-write transaction (`BEGIN READ WRITE`, `SET TRANSACTION READ WRITE`).
    pub read_write: bool,
    /// SQL the parse cannot see into: `DO`, a function body in a string, a function that
    /// runs SQL text or reads tables it is given by name.
    pub dynamic: Vec<String>,
    /// Every column reference and where it sits (for masking, [`super::masking`]).
    pub columns: BTreeSet<super::masking::ColumnUse>,
    /// Table aliases: alias → table, lowercase.
    pub aliases: std::collections::BTreeMap<String, String>,
    /// Some alias list renames columns (`s(a, b)`, `WITH c(a) AS …`).
    pub renames: bool,
    /// Orders, groups or picks DISTINCT ON by a result column's position.
    pub positional: bool,
    /// Names of FROM items other than tables (subqueries, CTEs, joins, functions).
    pub row_sources: BTreeSet<String>,
    /// Names given to result columns (`AS x`), lowercase.
    pub output_names: BTreeSet<String>,
    /// Some join is NATURAL.
    pub natural: bool,
}

/// A setting changed by a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    /// `Some` for a constant new value; `None` for a reset to the session's default.
    pub value: Option<String>,
    /// A reset, or `SET … TO DEFAULT`: back to what the session started with.
    pub reset: bool,
}

/// Why a statement does not run: the rule, in the words the policy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A short name for the rule, as audited: `unparsed`, `role escape`, `deny`, …
    pub rule: &'static str,
    /// One line the engineer can act on.
    pub message: String,
}

/// Why the text is not a shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unparsed(pub String);

/// How the server reads string literals, which the parse must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dialect {
    /// `standard_conforming_strings`: when off, a backslash in a plain `''` string
    /// escapes the next character, so a quote can end where the server does not think
    /// it does. The relay follows what the server reports and refuses changing it.
    pub standard_strings: bool,
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect {
            standard_strings: true,
        }
    }
}

impl Shape {
    /// Parses `sql` as the server would and walks every node of it.
    pub fn of(sql: &str, dialect: Dialect) -> Result<Shape, Unparsed> {
        let options = if dialect.standard_strings {
            pg_query::ParserOptions::DEFAULT
        } else {
            pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
        };
        let parsed = pg_query::parse(sql, options).map_err(|e| Unparsed(error_text(e)))?;
        let tree = serde_json::to_value(&parsed.protobuf)
            .map_err(|e| Unparsed(format!("the parse could not be read: {e}")))?;
        let statements = tree
            .get("stmts")
            .and_then(Value::as_array)
            .map(|stmts| {
                stmts
                    .iter()
                    .map(|raw| {
                        let mut s = StatementShape::default();
                        if let Some(stmt) = raw.get("stmt") {
                            walk(stmt, &mut s);
                            super::masking::uses(stmt.get("node").unwrap_or(stmt), &mut s);
                        }
                        s
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Shape { statements })
    }

    /// Every kind of every statement, once each, in order.
    pub fn kinds(&self) -> Vec<&str> {
        let mut seen = Vec::new();
        for k in self.statements.iter().flat_map(|s| s.kinds.iter()) {
            if !seen.contains(&k.as_str()) {
                seen.push(k.as_str());
            }
        }
        seen
    }
}

fn error_text(e: pg_query::Error) -> String {
    match e {
        pg_query::Error::Parse(m) => m,
        other => other.to_string(),
    }
}

/// Visits every value of the tree. A node of the grammar is an object with one key in
/// CamelCase (its type) when it sits in a `Node`; typed fields (a DELETE's `relation`,
/// a CALL's `funccall`) carry no type name, so tables and calls are also recognised by
/// their fields.
fn walk(v: &Value, s: &mut StatementShape) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, s)),
        Value::Object(o) => {
            if o.contains_key("relname") && o.contains_key("schemaname") {
                s.tables
                    .insert((text(o.get("schemaname")), text(o.get("relname"))));
            }
            if o.contains_key("funcname") && o.contains_key("agg_star") {
                function_call(o, s);
            }
            for (k, child) in o {
                if k.starts_with(|c: char| c.is_ascii_uppercase()) {
                    node(k, child, s);
                }
                walk(child, s);
            }
        }
        _ => {}
    }
}

/// A node of the grammar, by its type name.
fn node(kind: &str, n: &Value, s: &mut StatementShape) {
    match kind {
        "RawStmt" => {}
        "ColumnRef" => {
            let fields = n.get("fields").and_then(Value::as_array);
            if let Some(last) = fields.filter(|f| f.len() > 1).and_then(|f| f.last())
                && let Some(name) = string_node(last)
            {
                s.functions.insert(name);
            }
        }
        k if k.ends_with("Stmt") => statement(k, n, s),
        _ => {}
    }
}

/// A statement node: its kind, and what the kind alone does not say.
fn statement(kind: &str, n: &Value, s: &mut StatementShape) {
    let flag = |f: &str| n.get(f).and_then(Value::as_bool).unwrap_or(false);
    let present = |f: &str| n.get(f).is_some_and(|v| !v.is_null());
    let objtype = |f: &str| object_type(n.get(f));
    let name = match kind {
        "SelectStmt" => {
            if present("into_clause") {
                "CREATE TABLE AS".to_string()
            } else if n
                .get("locking_clause")
                .and_then(Value::as_array)
                .is_some_and(|l| !l.is_empty())
            {
                "SELECT FOR UPDATE".to_string()
            } else {
                "SELECT".to_string()
            }
        }
        "DeleteStmt" | "UpdateStmt" => {
            let k = if kind == "DeleteStmt" {
                "DELETE"
            } else {
                "UPDATE"
            };
            if !present("where_clause") {
                s.unbounded.push(k);
            }
            k.to_string()
        }
        "CopyStmt" => {
            let way = if flag("is_from") {
                "COPY FROM"
            } else {
                "COPY TO"
            };
            if flag("is_program") {
                s.kinds.push(way.to_string());
                "COPY PROGRAM".to_string()
            } else if !text(n.get("filename")).is_empty() {
                s.kinds.push(way.to_string());
                "COPY FILE".to_string()
            } else {
                way.to_string()
            }
        }
        "DropStmt" => {
            let t = objtype("remove_type");
            if RELATION_TYPES.contains(&t.as_str()) {
                for object in n
                    .get("objects")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(parts) =
                        object.pointer("/node/List/items").and_then(Value::as_array)
                    {
                        let parts: Vec<String> = parts.iter().filter_map(string_node).collect();
                        if let Some((name, rest)) = parts.split_last() {
                            let schema = rest.last().cloned().unwrap_or_default();
                            s.tables.insert((schema, name.clone()));
                        }
                    }
                }
            }
            format!("DROP {t}")
        }
        "AlterTableStmt" => format!("ALTER {}", objtype("objtype")),
        "RenameStmt" => format!("ALTER {}", objtype("rename_type")),
        "AlterObjectSchemaStmt" => format!("ALTER {}", objtype("object_type")),
        "CreateStmt" => "CREATE TABLE".into(),
        "IndexStmt" => "CREATE INDEX".into(),
        "ViewStmt" => "CREATE VIEW".into(),
        "CreateTableAsStmt" => match objtype("objtype").as_str() {
            "MATVIEW" => "CREATE MATERIALIZED VIEW".into(),
            _ => "CREATE TABLE AS".into(),
        },
        "CreateFunctionStmt" => {
            let k = if flag("is_procedure") {
                "CREATE PROCEDURE"
            } else {
                "CREATE FUNCTION"
            };
            // A SQL-standard body (BEGIN ATOMIC …) is parsed and walked; a body in a
            // string is text the parse never sees.
            if !present("sql_body") {
                s.dynamic.push(format!("the body of {k}"));
            }
            k.into()
        }
        "GrantStmt" => if flag("is_grant") { "GRANT" } else { "REVOKE" }.into(),
        "GrantRoleStmt" => if flag("is_grant") {
            "GRANT ROLE"
        } else {
            "REVOKE ROLE"
        }
        .into(),
        "VariableSetStmt" => variable_set(n, s),
        "VariableShowStmt" => "SHOW".into(),
        "TransactionStmt" => {
            if read_write_asked(n.get("options")) {
                s.read_write = true;
            }
            match n.get("kind").and_then(Value::as_i64).unwrap_or(0) {
                1 => "BEGIN",
                2 => "START TRANSACTION",
                3 => "COMMIT",
                4 => "ROLLBACK",
                5 => "SAVEPOINT",
                6 => "RELEASE",
                7 => "ROLLBACK TO",
                8 => "PREPARE TRANSACTION",
                9 => "COMMIT PREPARED",
                10 => "ROLLBACK PREPARED",
                _ => "TRANSACTION",
            }
            .into()
        }
        "DoStmt" => {
            s.dynamic.push("a DO block".into());
            "DO".into()
        }
        "ExplainStmt" => "EXPLAIN".into(),
        "CallStmt" => "CALL".into(),
        "VacuumStmt" => if flag("is_vacuumcmd") {
            "VACUUM"
        } else {
            "ANALYZE"
        }
        .into(),
        "FetchStmt" => if flag("ismove") { "MOVE" } else { "FETCH" }.into(),
        "DeclareCursorStmt" => "DECLARE CURSOR".into(),
        "ClosePortalStmt" => "CLOSE".into(),
        "CheckPointStmt" => "CHECKPOINT".into(),
        "CreatedbStmt" => "CREATE DATABASE".into(),
        "DropdbStmt" => "DROP DATABASE".into(),
        "CreateTrigStmt" => "CREATE TRIGGER".into(),
        "CreateEventTrigStmt" => "CREATE EVENT TRIGGER".into(),
        "RuleStmt" => "CREATE RULE".into(),
        "CreateSeqStmt" => "CREATE SEQUENCE".into(),
        "RefreshMatViewStmt" => "REFRESH MATERIALIZED VIEW".into(),
        "CreateExtensionStmt" => "CREATE EXTENSION".into(),
        "CreateSchemaStmt" => "CREATE SCHEMA".into(),
        "CreateRoleStmt" => "CREATE ROLE".into(),
        "DropRoleStmt" => "DROP ROLE".into(),
        "AlterRoleStmt" => "ALTER ROLE".into(),
        "AlterRoleSetStmt" => "ALTER ROLE SET".into(),
        "AlterSystemStmt" => "ALTER SYSTEM".into(),
        "AlterDatabaseSetStmt" => "ALTER DATABASE SET".into(),
        other => words(other.trim_end_matches("Stmt")),
    };
    s.kinds.push(name);
}

/// `SET`, `RESET`, `SET LOCAL`, `SET TRANSACTION …`, `SET SESSION CHARACTERISTICS …`.
fn variable_set(n: &Value, s: &mut StatementShape) -> String {
    let kind = n.get("kind").and_then(Value::as_i64).unwrap_or(0);
    let name = text(n.get("name"));
    if kind == 4 {
        // SET TRANSACTION / SESSION CHARACTERISTICS AS TRANSACTION: a list of options.
        if read_write_asked(n.get("args")) {
            s.read_write = true;
        }
        return "SET".into();
    }
    if kind == 6 {
        // RESET ALL: every setting back to the session's start (role and session
        // authorization are not among them in PostgreSQL).
        s.settings.push(Setting {
            name: "all".into(),
            value: None,
            reset: true,
        });
        return "RESET".into();
    }
    let reset = matches!(kind, 2 | 5);
    let value = n
        .get("args")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(constant);
    s.settings.push(Setting {
        // GUC names are matched without regard to case, quoted or not.
        name: name.to_ascii_lowercase(),
        value,
        reset,
    });
    if kind == 5 { "RESET" } else { "SET" }.into()
}

/// A call: its name, and what `set_config` would change.
fn function_call(o: &serde_json::Map<String, Value>, s: &mut StatementShape) {
    let Some(name) = o
        .get("funcname")
        .and_then(Value::as_array)
        .and_then(|parts| parts.last())
        .and_then(string_node)
    else {
        return;
    };
    let args = o.get("args").and_then(Value::as_array);
    if name == "set_config" {
        let arg = |i: usize| args.and_then(|a| a.get(i)).and_then(constant);
        match arg(0) {
            Some(setting) => s.settings.push(Setting {
                name: setting.to_ascii_lowercase(),
                value: arg(1),
                reset: false,
            }),
            None => s.unseen_setting = true,
        }
    }
    if DYNAMIC_FUNCTIONS.contains(&name.as_str()) {
        s.dynamic
            .push(format!("{name}(), which runs SQL or reads tables by name"));
    }
    s.functions.insert(name);
}

/// Whether a transaction's options ask for READ WRITE.
fn read_write_asked(options: Option<&Value>) -> bool {
    options
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| o.pointer("/node/DefElem"))
        .any(|d| {
            text(d.get("defname")) == "transaction_read_only"
                && d.pointer("/arg/node/AConst/val/Ival/ival")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    == 0
        })
}

/// A constant's text (a string, a number, a boolean, or a bare word such as `on`).
fn constant(v: &Value) -> Option<String> {
    let val = v.pointer("/node/AConst/val")?;
    if let Some(s) = val.pointer("/Sval/sval").and_then(Value::as_str) {
        return Some(s.to_string());
    }
    if let Some(i) = val.pointer("/Ival/ival").and_then(Value::as_i64) {
        return Some(i.to_string());
    }
    if let Some(f) = val.pointer("/Fval/fval").and_then(Value::as_str) {
        return Some(f.to_string());
    }
    if let Some(b) = val.pointer("/Boolval/boolval").and_then(Value::as_bool) {
        return Some(if b { "on" } else { "off" }.to_string());
    }
    // The parse leaves an Ival of 0 out of its fields altogether.
    val.get("Ival").map(|_| "0".to_string())
}

fn string_node(v: &Value) -> Option<String> {
    v.pointer("/node/String/sval")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn text(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or_default().to_string()
}

fn object_type(v: Option<&Value>) -> String {
    v.and_then(Value::as_i64)
        .and_then(|i| pg_query::protobuf::ObjectType::try_from(i as i32).ok())
        .map(|t| {
            t.as_str_name()
                .trim_start_matches("OBJECT_")
                .replace('_', " ")
        })
        .unwrap_or_else(|| "OBJECT".into())
}

/// `AlterEventTrig` → `ALTER EVENT TRIG`.
fn words(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.char_indices() {
        if i > 0 && c.is_ascii_uppercase() {
            out.push(' ');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Object types whose names are tables, views, sequences or indexes.
const RELATION_TYPES: &[&str] = &[
    "TABLE",
    "VIEW",
    "MATVIEW",
    "INDEX",
    "SEQUENCE",
    "FOREIGN TABLE",
];

/// Functions that run SQL text the parse never sees, or read tables named in a value.
const DYNAMIC_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_send_query",
];

/// What a read-only role may run: statements that cannot write (the session is also
/// made read-only at the database, which stops a write hidden in a function).
const READ_ONLY_KINDS: &[&str] = &[
    "SELECT",
    "SHOW",
    "EXPLAIN",
    "SET",
    "RESET",
    "BEGIN",
    "START TRANSACTION",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "ROLLBACK TO",
    "DECLARE CURSOR",
    "FETCH",
    "MOVE",
    "CLOSE",
    "PREPARE",
    "EXECUTE",
    "DEALLOCATE",
    "LISTEN",
    "UNLISTEN",
    "DISCARD",
];

/// Calls a read-only role may not make: they act outside the transaction, so a
/// read-only transaction does not stop them.
const SIDE_EFFECT_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_promote",
    "pg_log_backend_memory_contexts",
    "pg_notify",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_create",
    "lo_creat",
    "lo_put",
    "lo_from_bytea",
    "lo_truncate",
    "lowrite",
    "pg_file_write",
    "pg_file_unlink",
    "pg_file_rename",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_drop_replication_slot",
    "set_config",
];

/// The statement verbs a `deny` rule may start with.
pub const STATEMENT_VERBS: &[&str] = &[
    "ALTER",
    "ANALYZE",
    "BEGIN",
    "CALL",
    "CHECKPOINT",
    "CLOSE",
    "CLUSTER",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DISCARD",
    "DO",
    "DROP",
    "EXECUTE",
    "EXPLAIN",
    "FETCH",
    "GRANT",
    "IMPORT",
    "INSERT",
    "LISTEN",
    "LOAD",
    "LOCK",
    "MERGE",
    "MOVE",
    "NOTIFY",
    "PREPARE",
    "REASSIGN",
    "REFRESH",
    "REINDEX",
    "RELEASE",
    "RESET",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SECURITY",
    "SELECT",
    "SET",
    "SHOW",
    "START",
    "TRUNCATE",
    "UNLISTEN",
    "UPDATE",
    "VACUUM",
];

/// Client encodings whose characters can end in a byte that is a quote or a backslash
/// in ASCII: the server would then read the text differently from the relay. PostgreSQL
/// allows them only on the client side for the same reason.
const UNSAFE_ENCODINGS: &[&str] = &[
    "sjis",
    "shiftjis",
    "mskanji",
    "win932",
    "windows932",
    "shiftjis2004",
    "big5",
    "win950",
    "windows950",
    "gbk",
    "cp936",
    "win936",
    "windows936",
    "gb18030",
    "uhc",
    "win949",
    "windows949",
    "johab",
];

/// A role's statement rules in plain words, as the Policy page shows them; what holds
/// for every role comes last.
pub fn in_words(p: &SqlPolicy) -> Vec<String> {
    let mut words = Vec::new();
    if p.read_only {
        words.push(
            "read-only: only what cannot write, and the session is read-only at the database too"
                .to_string(),
        );
    }
    if !p.deny.is_empty() {
        words.push(format!("refused: {}", p.deny.join(", ")));
    }
    if !p.deny_tables.is_empty() {
        words.push(format!(
            "tables refused wherever named: {}",
            p.deny_tables.join(", ")
        ));
    }
    if !p.deny_functions.is_empty() {
        let calls: Vec<String> = p.deny_functions.iter().map(|f| format!("{f}()")).collect();
        words.push(format!(
            "functions refused wherever called: {}",
            calls.join(", ")
        ));
    }
    if !p.review.is_empty() {
        words.push(format!(
            "held for review (runs once approved): {}",
            p.review.join(", ")
        ));
    }
    if !p.review_tables.is_empty() {
        words.push(format!(
            "every statement naming these tables held for review: {}",
            p.review_tables.join(", ")
        ));
    }
    if p.require_where {
        words.push("DELETE and UPDATE need a WHERE".to_string());
    }
    words.push(if p.allow_dynamic_sql {
        "DO blocks and SQL in strings allowed: the relay cannot see what they run".to_string()
    } else {
        "DO blocks and SQL in strings refused (the relay cannot see what they run)".to_string()
    });
    if let Some(path) = &p.search_path {
        words.push(format!("search_path fixed to {path}"));
    }
    if !p.mask.is_empty() {
        let rules: Vec<String> = p
            .mask
            .iter()
            .map(|m| {
                let what = match (&m.column, &m.name) {
                    (Some(c), _) => c.clone(),
                    (None, Some(n)) => format!("columns named {n}"),
                    _ => String::new(),
                };
                let how = match m.method {
                    crate::config::MaskMethod::Full => "hidden",
                    crate::config::MaskMethod::Last4 => "last 4 shown",
                    crate::config::MaskMethod::Hash => "hashed",
                };
                format!("{what} ({how})")
            })
            .collect();
        words.push(format!(
            "masked: {}; views reading them masked whole",
            rules.join(", ")
        ));
    }
    words.push("always refused: changing role or session authorization, changing how the server reads text, text PostgreSQL does not parse, fastpath function calls".to_string());
    words
}

/// Whether a client encoding can be read by the relay as the server reads it.
pub fn safe_client_encoding(name: &str) -> bool {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    !clean.is_empty() && !UNSAFE_ENCODINGS.contains(&clean.as_str())
}

/// Whether a role's rules let this shape run; the first rule it breaks if not.
///
/// Some refusals hold for every role, whatever its rules: text that does not parse
/// (decided by the caller, before a shape exists), leaving the grant's own database
/// role (`SET ROLE`, `SET SESSION AUTHORIZATION`, their `RESET`s, `set_config` of them,
/// `ALTER ROLE … SET`), and changing how the server reads the text the relay judges
/// (`standard_conforming_strings`, a client encoding the relay cannot read alike).
pub fn judge(policy: &SqlPolicy, shape: &Shape) -> Result<(), Refusal> {
    let several = shape.statements.len() > 1;
    for (i, s) in shape.statements.iter().enumerate() {
        judge_one(policy, s).map_err(|mut r| {
            if several {
                r.message = format!(
                    "statement {} of {}: {}",
                    i + 1,
                    shape.statements.len(),
                    r.message
                );
            }
            r
        })?;
    }
    Ok(())
}

fn refuse(rule: &'static str, message: String) -> Result<(), Refusal> {
    Err(Refusal { rule, message })
}

fn judge_one(policy: &SqlPolicy, s: &StatementShape) -> Result<(), Refusal> {
    // Always: the grant's database role is the boundary.
    if s.unseen_setting {
        return refuse(
            "role escape",
            "set_config with a setting name that is not a constant is refused: the relay cannot tell what it changes".into(),
        );
    }
    for set in &s.settings {
        match set.name.as_str() {
            "role" | "session_authorization" => {
                return refuse(
                    "role escape",
                    format!(
                        "changing {} is refused: a session stays the grant's own database role",
                        set.name
                    ),
                );
            }
            "standard_conforming_strings" if !set.reset && !is_on(set.value.as_deref()) => {
                return refuse(
                    "parser safety",
                    "turning standard_conforming_strings off is refused: the relay must read strings as the server does".into(),
                );
            }
            "client_encoding"
                if !set.reset && !set.value.as_deref().is_some_and(safe_client_encoding) =>
            {
                return refuse(
                    "parser safety",
                    "this client encoding is refused through the relay: use UTF8".into(),
                );
            }
            "search_path" if policy.search_path.is_some() && !set.reset => {
                return refuse(
                    "search_path",
                    "the search_path of this role is fixed by its policy".into(),
                );
            }
            "default_transaction_read_only" | "transaction_read_only"
                if policy.read_only && !set.reset && !is_on(set.value.as_deref()) =>
            {
                return refuse(
                    "read only",
                    "this role is read-only: the session's transactions stay read-only".into(),
                );
            }
            _ => {}
        }
    }
    if let Some(k) = s.kinds.iter().find(|k| k.starts_with("ALTER ROLE")) {
        return refuse(
            "role escape",
            format!("{k} is refused: the grant's database role is made and ended by twokey"),
        );
    }
    if s.tables.iter().any(|(_, t)| t == "pg_settings")
        && s.kinds.iter().any(|k| k != "SELECT" && k != "EXPLAIN")
    {
        return refuse(
            "role escape",
            "writing to pg_settings is refused: it changes settings the relay must see".into(),
        );
    }
    if !policy.allow_dynamic_sql
        && let Some(d) = s.dynamic.first()
    {
        return refuse(
            "dynamic SQL",
            format!(
                "{d} is refused: the relay cannot see the SQL it runs (the role does not allow dynamic SQL)"
            ),
        );
    }
    for kind in &s.kinds {
        if let Some(rule) = policy.deny.iter().find(|r| kind_matches(kind, r)) {
            return refuse(
                "deny",
                format!("{kind} is not allowed for this role (deny = {rule:?})"),
            );
        }
    }
    if policy.read_only {
        if let Some(kind) = s
            .kinds
            .iter()
            .find(|k| !READ_ONLY_KINDS.contains(&k.as_str()))
        {
            return refuse(
                "read only",
                format!("{kind} is refused: this role is read-only"),
            );
        }
        if s.read_write {
            return refuse(
                "read only",
                "a read-write transaction is refused: this role is read-only".into(),
            );
        }
        if let Some(f) = s
            .functions
            .iter()
            .find(|f| SIDE_EFFECT_FUNCTIONS.contains(&f.as_str()))
        {
            return refuse(
                "read only",
                format!("{f}() is refused: this role is read-only"),
            );
        }
    }
    for (schema, table) in &s.tables {
        if let Some(rule) = policy
            .deny_tables
            .iter()
            .find(|r| table_matches(schema, table, r, policy.search_path.as_deref()))
        {
            let named = if schema.is_empty() {
                table.clone()
            } else {
                format!("{schema}.{table}")
            };
            return refuse(
                "deny_tables",
                format!("{named} is not allowed for this role (deny_tables = {rule:?})"),
            );
        }
    }
    if let Some(f) = s.functions.iter().find(|f| {
        policy
            .deny_functions
            .iter()
            .any(|r| r.eq_ignore_ascii_case(f))
    }) {
        return refuse(
            "deny_functions",
            format!("{f}() is not allowed for this role (deny_functions)"),
        );
    }
    // A prepared statement's text is judged (and held) at its Parse or PREPARE; SQL's
    // EXECUTE names it, and the relay does not follow the name: where statements are
    // held, it is refused.
    if (!policy.review.is_empty() || !policy.review_tables.is_empty())
        && s.kinds.iter().any(|k| k == "EXECUTE")
    {
        return refuse(
            "review",
            "EXECUTE of a prepared statement is refused for a role that holds statements for review: send the statement itself (or bind it through the protocol)".into(),
        );
    }
    // What is held for review must be held where it runs: a statement that keeps one
    // for later (PREPARE, a rule, a function body) would let it run unheld.
    if let Some(outer) = s.kinds.first().filter(|k| DEFERS.contains(&k.as_str()))
        && let Some(why) = review_one(policy, s)
    {
        return refuse(
            "review",
            format!(
                "{outer} of a statement that is held for review is refused ({why}): send the statement itself, and it waits for approval"
            ),
        );
    }
    if policy.require_where
        && let Some(k) = s.unbounded.first()
    {
        return refuse(
            "require_where",
            format!("{k} without a WHERE clause is refused for this role (require_where)"),
        );
    }
    Ok(())
}

/// Statements that keep the statements nested in them to run later, unseen by the
/// relay when they do (`EXECUTE p`, a rule firing, a function called).
const DEFERS: &[&str] = &[
    "PREPARE",
    "CREATE RULE",
    "CREATE FUNCTION",
    "CREATE PROCEDURE",
    "CREATE VIEW",
    "CREATE MATERIALIZED VIEW",
];

/// Whether the text makes (or may make, unseen) something at the server that runs
/// statements later, where the relay does not judge them again: a prepared statement,
/// a cursor, a rule, a function or procedure, a view, a trigger.
pub fn keeps_for_later(shape: &Shape) -> bool {
    shape.statements.iter().any(|s| {
        // Any kind, not the first only (`CREATE SCHEMA … CREATE VIEW`, `EXPLAIN ANALYZE
        // CREATE MATERIALIZED VIEW`), and what the parse cannot see into at all.
        !s.dynamic.is_empty()
            || s.kinds.iter().any(|k| {
                DEFERS.contains(&k.as_str())
                    || matches!(
                        k.as_str(),
                        "DECLARE CURSOR" | "CREATE TRIGGER" | "CREATE EVENT TRIGGER"
                    )
            })
    })
}

/// Why the role holds this statement for another person's approval (its `review` and
/// `review_tables` rules), or `None` when it runs as it is. Asked only of a statement
/// [`judge`] let through.
pub fn review(policy: &SqlPolicy, shape: &Shape) -> Option<String> {
    shape.statements.iter().find_map(|s| review_one(policy, s))
}

fn review_one(policy: &SqlPolicy, s: &StatementShape) -> Option<String> {
    for kind in &s.kinds {
        if let Some(rule) = policy.review.iter().find(|r| kind_matches(kind, r)) {
            return Some(format!("{kind} is held for review (review = {rule:?})"));
        }
    }
    for (schema, table) in &s.tables {
        if let Some(rule) = policy
            .review_tables
            .iter()
            .find(|r| table_matches(schema, table, r, policy.search_path.as_deref()))
        {
            let named = if schema.is_empty() {
                table.clone()
            } else {
                format!("{schema}.{table}")
            };
            return Some(format!(
                "{named} is held for review (review_tables = {rule:?})"
            ));
        }
    }
    None
}

fn is_on(v: Option<&str>) -> bool {
    v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "1" | "yes"))
}

/// A kind matches a rule that is the kind or its first words: `DROP` matches `DROP TABLE`.
pub fn kind_matches(kind: &str, rule: &str) -> bool {
    let rule = rule.trim();
    kind.eq_ignore_ascii_case(rule)
        || (kind.len() > rule.len()
            && kind.is_char_boundary(rule.len())
            && kind[..rule.len()].eq_ignore_ascii_case(rule)
            && kind.as_bytes()[rule.len()] == b' ')
}

/// A table rule: `name` (in any schema), `schema.name`, or `schema.*`. An unqualified
/// name in a statement might be any schema's, so it matches `schema.name` by its name
/// alone, and `schema.*` when that schema is on the role's fixed search_path.
pub fn table_matches(schema: &str, table: &str, rule: &str, search_path: Option<&str>) -> bool {
    let rule = rule.trim().to_ascii_lowercase();
    match rule.split_once('.') {
        None => table == rule,
        Some((rs, "*")) => {
            schema == rs
                || (schema.is_empty()
                    && search_path
                        .is_some_and(|p| p.split(',').any(|s| s.trim().trim_matches('"') == rs)))
        }
        Some((rs, rn)) => table == rn && (schema.is_empty() || schema == rs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Shape {
        Shape::of(sql, Dialect::default()).unwrap_or_else(|e| panic!("{sql}: {}", e.0))
    }

    fn policy(f: impl FnOnce(&mut SqlPolicy)) -> SqlPolicy {
        let mut p = SqlPolicy::default();
        f(&mut p);
        p
    }

    /// As the relay decides: what does not parse is refused too.
    #[test]
    fn what_keeps_statements_for_later_is_seen_wherever_it_is_nested() {
        let later = |sql: &str| keeps_for_later(&Shape::of(sql, Dialect::default()).unwrap());
        for sql in [
            "prepare p as delete from t",
            "declare c cursor with hold for select 1",
            "create schema s create view v as select 1",
            "explain analyze create materialized view mv as select 1",
            "create temp view v as select 1",
            "do $$ begin perform 1; end $$",
            "create function f() returns int language sql as 'select 1'",
        ] {
            assert!(later(sql), "{sql}");
        }
        for sql in [
            "select 1",
            "delete from t where id = 1",
            "create table t2 as select 1",
        ] {
            assert!(!later(sql), "{sql}");
        }
    }

    fn verdict(p: &SqlPolicy, sql: &str) -> Result<(), &'static str> {
        match Shape::of(sql, Dialect::default()) {
            Ok(s) => judge(p, &s).map_err(|r| r.rule),
            Err(_) => Err("unparsed"),
        }
    }

    /// Each of `refused` is refused by `rule` (a parse failure never stands in for a
    /// rule), and each of `run` runs.
    fn verdicts(p: &SqlPolicy, rule: Option<&str>, refused: &[&str], run: &[&str]) {
        for sql in refused {
            match verdict(p, sql) {
                Err(r) => {
                    assert_ne!(r, "unparsed", "{sql} should parse");
                    if let Some(rule) = rule {
                        assert_eq!(r, rule, "{sql}");
                    }
                }
                Ok(()) => panic!("{sql} should be refused"),
            }
        }
        for sql in run {
            assert_eq!(verdict(p, sql), Ok(()), "{sql} should run");
        }
    }

    #[test]
    fn review_holds_by_kind_and_table_wherever_they_are_and_refuses_deferring_them() {
        let p = policy(|p| {
            p.review = vec!["DELETE".into(), "ALTER TABLE".into()];
            p.review_tables = vec!["public.payments".into()];
        });
        let held = |sql: &str| review(&p, &shape(sql));
        for sql in [
            "delete from t where id = 1",
            "DeLeTe /* x */ FROM t WHERE id = 1",
            "with d as (delete from t where id = 1 returning *) select * from d",
            "explain analyze delete from t where id = 1",
            "select 1; delete from t where id = 2",
            "alter table t add column c int",
            "select * from payments",
            "update public.payments set x = 1 where id = 1",
            "select * from (select * from \"payments\") s",
        ] {
            assert!(held(sql).is_some(), "{sql} should be held");
            assert_eq!(verdict(&p, sql), Ok(()), "{sql} is held, not refused");
        }
        assert_eq!(
            held("delete from t where id = 1").as_deref(),
            Some("DELETE is held for review (review = \"DELETE\")")
        );
        for sql in [
            "select 1",
            "update t set x = 1 where id = 1",
            "alter index i rename to j",
            "select * from other.payments",
            "insert into t values (1)",
        ] {
            assert_eq!(held(sql), None, "{sql} runs unheld");
        }
        verdicts(
            &p,
            Some("review"),
            &[
                "prepare p as delete from t where id = 1",
                "prepare p as select * from payments",
                "create rule r as on insert to t do also delete from u where id = 1",
                "create function f() returns void language sql begin atomic delete from t where id = 1; end",
            ],
            &["prepare p as select 1"],
        );
        for sql in [
            "execute p",
            "explain analyze execute p",
            "create table x as execute p",
        ] {
            assert_eq!(verdict(&p, sql), Err("review"), "{sql}");
            assert_eq!(
                verdict(&SqlPolicy::default(), sql),
                Ok(()),
                "{sql} without review rules"
            );
        }
        assert_eq!(
            verdict(&p, "create view v as select * from payments"),
            Err("review")
        );
    }

    #[test]
    fn every_nested_statement_is_found() {
        let cases: &[(&str, &[&str])] = &[
            ("select 1", &["SELECT"]),
            (
                "with d as (delete from t returning *) select * from d",
                &["SELECT", "DELETE"],
            ),
            (
                "explain analyze delete from t where id = 1",
                &["EXPLAIN", "DELETE"],
            ),
            ("prepare p as delete from t", &["PREPARE", "DELETE"]),
            (
                "create rule r as on insert to t do instead delete from u",
                &["CREATE RULE", "DELETE"],
            ),
            ("drop table t", &["DROP TABLE"]),
            ("DrOp /* x */ TaBlE t", &["DROP TABLE"]),
            ("copy t to program 'id'", &["COPY TO", "COPY PROGRAM"]),
            ("copy t from '/etc/passwd'", &["COPY FROM", "COPY FILE"]),
            ("copy (select 1) to stdout", &["COPY TO", "SELECT"]),
            ("select 1 into x", &["CREATE TABLE AS"]),
            ("do $$ begin drop table t; end $$", &["DO"]),
            (
                "create function f() returns int language sql as 'select 1'",
                &["CREATE FUNCTION"],
            ),
            ("grant select on t to public", &["GRANT"]),
            ("alter table t add column c int", &["ALTER TABLE"]),
            ("truncate t", &["TRUNCATE"]),
            ("begin read write", &["BEGIN"]),
            ("vacuum t", &["VACUUM"]),
        ];
        for (sql, kinds) in cases {
            let s = shape(sql);
            assert_eq!(s.kinds(), kinds.to_vec(), "{sql}");
        }
    }

    #[test]
    fn tables_and_functions_are_found_wherever_they_are() {
        let s = shape(
            "with x as (select pg_catalog.pg_read_file('/etc/passwd') from public.secrets) \
             delete from audit.log using \"Other\" where id in (select lo_export(1, '/tmp/x'))",
        );
        let st = &s.statements[0];
        for t in [("public", "secrets"), ("audit", "log"), ("", "Other")] {
            assert!(
                st.tables.contains(&(t.0.to_string(), t.1.to_string())),
                "{t:?} in {:?}",
                st.tables
            );
        }
        for f in ["pg_read_file", "lo_export"] {
            assert!(st.functions.contains(f), "{f} in {:?}", st.functions);
        }
        let drop = shape("drop table app.orders, t");
        assert!(
            drop.statements[0]
                .tables
                .contains(&("app".into(), "orders".into()))
        );
        assert!(drop.statements[0].tables.contains(&("".into(), "t".into())));
        let call = shape("call public.p(1)");
        assert!(call.statements[0].functions.contains("p"));
    }

    #[test]
    fn stacked_statements_are_each_judged() {
        let p = policy(|p| p.deny = vec!["DROP".into()]);
        assert_eq!(verdict(&p, "select 1; drop table t"), Err("deny"));
        let r = judge(&p, &shape("select 1; select 2; drop table t")).unwrap_err();
        assert!(
            r.message.starts_with("statement 3 of 3: DROP TABLE"),
            "{}",
            r.message
        );
        assert_eq!(verdict(&p, "select 1; select 2"), Ok(()));
    }

    #[test]
    fn spellings_of_a_denied_statement_are_all_refused() {
        let p = policy(|p| {
            p.deny = vec!["DROP".into(), "TRUNCATE".into(), "COPY PROGRAM".into()];
            p.deny_functions = vec!["pg_read_file".into()];
            p.deny_tables = vec!["public.secrets".into()];
        });
        verdicts(
            &p,
            None,
            &[
                "drop table t",
                "DROP TABLE t",
                "/* hi */ drop -- c\n table t",
                "drop table \"t\"",
                "drop table U&\"\\0074\"",
                "select 1; drop table t",
                "with x as (select 1) select * from x; truncate t",
                "copy t to program 'id'",
                "select pg_read_file('/etc/passwd')",
                "select PG_READ_FILE('/etc/passwd')",
                "select pg_catalog.pg_read_file($1)",
                "select * from pg_read_file('/x') as f",
                "select * from secrets",
                "select * from public.secrets s",
                "select * from PUBLIC.SECRETS",
                "select * from \"secrets\"",
                "select * from U&\"secr\\0065ts\"",
                "select (select count(*) from secrets)",
                "table secrets",
                "select $$drop table t$$; drop table t",
            ],
            &[
                "select 'drop table t'",
                "select $$drop table t$$",
                "select E'\\x44ROP TABLE t'",
                "select * from other.secrets",
                "select 1 -- drop table t",
            ],
        );
    }

    #[test]
    fn a_comment_inside_a_keyword_does_not_parse_and_is_refused() {
        assert_eq!(
            verdict(&SqlPolicy::default(), "dr/**/op table t"),
            Err("unparsed")
        );
    }

    #[test]
    fn role_escapes_are_refused_for_every_role() {
        let p = SqlPolicy {
            allow_dynamic_sql: true,
            ..SqlPolicy::default()
        };
        verdicts(
            &p,
            None,
            &[
                "set role postgres",
                "SET LOCAL ROLE admin",
                "set session authorization postgres",
                "reset role",
                "reset session authorization",
                "set \"ROLE\" = 'postgres'",
                "select set_config('role', 'postgres', false)",
                "select set_config($1, 'x', false)",
                "alter role current_user set role = 'x'",
                "update pg_settings set setting = 'off' where name = 'standard_conforming_strings'",
                "set standard_conforming_strings = off",
                "select set_config('standard_conforming_strings', 'off', false)",
                "set client_encoding = 'SJIS'",
                "set names 'gbk'",
            ],
            &[
                "set statement_timeout = '5s'",
                "set client_encoding = 'UTF8'",
                "reset all",
                "set standard_conforming_strings = on",
                "select current_setting('role')",
            ],
        );
    }

    #[test]
    fn dynamic_sql_is_refused_unless_allowed() {
        let strict = SqlPolicy::default();
        let loose = SqlPolicy {
            allow_dynamic_sql: true,
            ..SqlPolicy::default()
        };
        for sql in [
            "do $$ begin drop table t; end $$",
            "DO LANGUAGE plpgsql 'begin null; end'",
            "select query_to_xml('select * from secrets', true, true, '')",
            "select table_to_xml('secrets'::regclass, true, true, '')",
            "create function f() returns void language plpgsql as $$ begin delete from t; end $$",
        ] {
            assert_eq!(verdict(&strict, sql), Err("dynamic SQL"), "{sql}");
            assert_eq!(verdict(&loose, sql), Ok(()), "{sql}");
        }
        // A SQL-standard body is parsed: what it does is seen.
        let sql = "create function f() returns int language sql begin atomic select 1; end";
        assert_eq!(verdict(&strict, sql), Ok(()));
    }

    #[test]
    fn read_only_admits_only_what_cannot_write() {
        let p = policy(|p| p.read_only = true);
        for sql in [
            "select * from t",
            "show search_path",
            "begin; select 1; commit",
            "begin read only",
            "explain select 1",
            "set statement_timeout = 1000",
            "declare c cursor for select 1",
        ] {
            assert_eq!(verdict(&p, sql), Ok(()), "{sql} should run");
        }
        for sql in [
            "insert into t values (1)",
            "update t set a = 1 where id = 1",
            "with d as (delete from t where id = 1 returning *) select * from d",
            "explain analyze delete from t where id = 1",
            "select 1 into x",
            "select * from t for update",
            "create table x (a int)",
            "begin read write",
            "start transaction read write",
            "set transaction read write",
            "set session characteristics as transaction read write",
            "set default_transaction_read_only = off",
            "set transaction_read_only to false",
            "select pg_terminate_backend(1)",
            "select set_config('default_transaction_read_only', 'off', false)",
            "notify x",
            "copy t from stdin",
        ] {
            assert!(verdict(&p, sql).is_err(), "{sql} should be refused");
        }
    }

    #[test]
    fn unbounded_writes_are_refused_when_where_is_required() {
        let p = policy(|p| p.require_where = true);
        assert_eq!(verdict(&p, "delete from t"), Err("require_where"));
        assert_eq!(verdict(&p, "update t set a = 1"), Err("require_where"));
        assert_eq!(
            verdict(&p, "with x as (delete from t) select 1"),
            Err("require_where")
        );
        assert_eq!(verdict(&p, "delete from t where id = 1"), Ok(()));
        let off = policy(|p| p.require_where = false);
        assert_eq!(verdict(&off, "delete from t"), Ok(()));
    }

    #[test]
    fn schema_rules_reach_unqualified_names_only_through_a_fixed_search_path() {
        assert!(table_matches("audit", "log", "audit.*", None));
        assert!(!table_matches("", "log", "audit.*", None));
        assert!(table_matches("", "log", "audit.*", Some("audit, public")));
        assert!(!table_matches("", "log", "audit.*", Some("public")));
        assert!(table_matches("", "secrets", "public.secrets", None));
        assert!(!table_matches("other", "secrets", "public.secrets", None));
        assert!(table_matches("other", "secrets", "secrets", None));
    }

    #[test]
    fn kinds_match_their_rule_by_whole_words() {
        assert!(kind_matches("DROP TABLE", "DROP"));
        assert!(kind_matches("DROP TABLE", "drop table"));
        assert!(!kind_matches("DROP TABLE", "DROP T"));
        assert!(!kind_matches("DROPX", "DROP"));
        assert!(kind_matches("COPY PROGRAM", "COPY"));
    }

    #[test]
    fn what_does_not_parse_is_an_error_not_a_shape() {
        for sql in [
            "selec 1",
            "SELECT FROM FROM t",
            "drop table",
            "select 'unterminated",
        ] {
            assert!(Shape::of(sql, Dialect::default()).is_err(), "{sql}");
        }
    }

    #[test]
    fn backslashes_are_read_as_the_server_reads_them() {
        // With standard_conforming_strings off, `\'` does not end the string: what
        // follows is one literal to the server, and must be one to the relay too.
        let sql = "select 'a\\' , ' ; drop table t; --'";
        let on = Shape::of(sql, Dialect::default()).unwrap();
        assert_eq!(on.kinds(), vec!["SELECT"]);
        let off = Shape::of(
            sql,
            Dialect {
                standard_strings: false,
            },
        );
        let off = off.map(|s| s.kinds().iter().map(|k| k.to_string()).collect::<Vec<_>>());
        assert_ne!(
            off,
            Ok(vec!["SELECT".to_string()]),
            "the two readings differ"
        );
    }

    #[test]
    fn unsafe_client_encodings_are_recognised_by_any_spelling() {
        for e in ["SJIS", "Shift_JIS", "gbk", "GB-18030", "big5", "WIN932"] {
            assert!(!safe_client_encoding(e), "{e}");
        }
        for e in ["UTF8", "utf-8", "LATIN1", "SQL_ASCII", "EUC_JP"] {
            assert!(safe_client_encoding(e), "{e}");
        }
    }
}
