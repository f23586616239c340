//! Which statements can show a masked column only as the relay masks it.
//!
//! The relay masks a result column by where PostgreSQL says it comes from (the
//! RowDescription's table and column number), so an alias does not help. That origin
//! is known only for a column selected as it is, at the top of a SELECT, or through a
//! subquery or CTE in its FROM. Anything computed from a masked column (`lower(ssn)`,
//! `ssn::text`, `ssn || ''`, a scalar subquery), or using it where its value steers
//! what comes back (WHERE, ORDER BY, GROUP BY, a join, RETURNING, INSERT … SELECT),
//! would show the value or let it be guessed bit by bit: such statements are refused,
//! as are whole-row references (`to_json(p)`), `*` inside an expression, renamed
//! columns below the top and COPY of a table with masked columns.
//!
//! [`uses`] records, for each statement, every column reference and where it sits;
//! [`judge`] holds them against a role's masked names. Pure: no I/O.

use std::collections::BTreeSet;

use serde_json::Value;

use super::sql::{Refusal, StatementShape};

/// Where a column reference sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// A whole result column of the top SELECT.
    Output,
    /// A whole result column of a subquery or CTE the top SELECT reads from.
    Nested,
    /// Anywhere else: in an expression, a condition, an ordering, another statement.
    Inside,
}

/// One column reference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ColumnUse {
    /// The column's name (the last part); for a `*`, the table's name or "".
    pub name: String,
    pub place: Place,
    /// Given another name (`AS x`) below the top.
    pub renamed: bool,
    /// `*` or `t.*`.
    pub star: bool,
    /// One name alone: a column, or a whole row of the table of that name or alias.
    pub single: bool,
    /// The name before the last, lowercase ("" when none): `p` of `p.ssn`.
    pub qualifier: String,
}

/// What a role masks, as a parse can match it: columns by table, column-name
/// patterns, and the tables known to hold a masked column.
#[derive(Debug, Clone, Default)]
pub struct MaskedNames {
    /// (table, column), lowercase.
    pub columns: Vec<(String, String)>,
    /// Column-name patterns, lowercase, `*` for any characters.
    pub patterns: Vec<String>,
    /// Tables holding a masked column, lowercase (the column rules' and those found
    /// in the database for the patterns).
    pub tables: BTreeSet<String>,
    /// Every column of those tables, (table, column), lowercase: `p.f` where `f` is not
    /// one of them is PostgreSQL's `f(p)`, a function of the whole row.
    pub known: BTreeSet<(String, String)>,
}

impl MaskedNames {
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty() && self.patterns.is_empty()
    }

    /// Whether a column of this name may be masked in a statement naming `tables`.
    pub fn masks(&self, column: &str, tables: &BTreeSet<String>) -> bool {
        let column = column.to_ascii_lowercase();
        self.patterns.iter().any(|p| glob(p, &column))
            || self
                .columns
                .iter()
                .any(|(t, c)| *c == column && tables.contains(t))
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(mut tail) = text.strip_prefix(head) else {
                return false;
            };
            loop {
                if glob(rest, tail) {
                    return true;
                }
                let mut chars = tail.chars();
                if chars.next().is_none() {
                    return false;
                }
                tail = chars.as_str();
            }
        }
    }
}

/// Records the column references of one top-level statement.
pub fn uses(stmt: &Value, s: &mut StatementShape) {
    match stmt.get("SelectStmt") {
        Some(select) => select_stmt(select, Place::Output, false, s),
        None => any(stmt, Place::Inside, s),
    }
}

fn nested(place: Place) -> Place {
    match place {
        Place::Output | Place::Nested => Place::Nested,
        Place::Inside => Place::Inside,
    }
}

/// A SELECT at `place`; `exists`: its result columns are never read (EXISTS).
fn select_stmt(n: &Value, place: Place, exists: bool, s: &mut StatementShape) {
    let place = if n.get("into_clause").is_some_and(|v| !v.is_null()) {
        Place::Inside
    } else {
        place
    };
    let setop = n.get("op").and_then(Value::as_i64).unwrap_or(1) > 1;
    for (k, child) in n.as_object().into_iter().flatten() {
        match k.as_str() {
            "larg" | "rarg" if setop => {
                if !child.is_null() {
                    select_stmt(child, Place::Inside, exists, s);
                }
            }
            "with_clause" => with_clause(child, nested(place), s),
            "target_list" if !exists => targets(child, place, s),
            // EXISTS reads no column of its rows, but PostgreSQL keeps a target list with
            // aggregates or set-returning functions, and it runs.
            "target_list" => {
                for t in child.as_array().into_iter().flatten() {
                    let star = t
                        .pointer("/node/ResTarget/val/node/ColumnRef/fields")
                        .and_then(Value::as_array)
                        .and_then(|f| f.last())
                        .is_some_and(|f| f.pointer("/node/AStar").is_some());
                    if !star {
                        any(t, Place::Inside, s);
                    }
                }
            }
            // ORDER BY 1, GROUP BY 1, DISTINCT ON (1): by a result column's position.
            "sort_clause" | "group_clause" | "distinct_clause" if positional(child) => {
                s.positional = true;
                any(child, Place::Inside, s);
            }
            // Plain DISTINCT may sort its rows by every column.
            "distinct_clause" if child.as_array().is_some_and(|a| !a.is_empty()) => {
                s.positional = true;
                any(child, Place::Inside, s);
            }
            "from_clause" => {
                for item in child.as_array().into_iter().flatten() {
                    from_item(item, place, s);
                }
            }
            _ => any(child, Place::Inside, s),
        }
    }
}

/// Whether a clause names a result column by its position (an integer constant).
fn positional(clause: &Value) -> bool {
    clause.as_array().into_iter().flatten().any(|item| {
        let inner = item
            .pointer("/node/SortBy/node")
            .or_else(|| item.get("node"))
            .unwrap_or(item);
        inner.pointer("/AConst/val/Ival").is_some()
            || inner.pointer("/node/AConst/val/Ival").is_some()
            // ROLLUP, CUBE, GROUPING SETS: positions inside count too.
            || inner.pointer("/GroupingSet/content").is_some_and(positional)
    })
}

fn with_clause(w: &Value, place: Place, s: &mut StatementShape) {
    for cte in w
        .get("ctes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(c) = cte.pointer("/node/CommonTableExpr") else {
            any(cte, Place::Inside, s);
            continue;
        };
        if let Some(name) = c.get("ctename").and_then(Value::as_str) {
            s.row_sources.insert(name.to_ascii_lowercase());
        }
        if c.get("aliascolnames")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            s.renames = true;
        }
        match c.pointer("/ctequery/node/SelectStmt") {
            Some(q) => select_stmt(q, place, false, s),
            None => any(c, Place::Inside, s),
        }
    }
}

fn targets(list: &Value, place: Place, s: &mut StatementShape) {
    for t in list.as_array().into_iter().flatten() {
        let Some(rt) = t.pointer("/node/ResTarget") else {
            any(t, Place::Inside, s);
            continue;
        };
        let renamed = rt
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if let Some(n) = rt
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            s.output_names.insert(n.to_ascii_lowercase());
        }
        match rt.pointer("/val/node/ColumnRef") {
            Some(c) if place != Place::Inside => {
                column_ref(c, place, renamed && place == Place::Nested, s)
            }
            _ => any(rt, Place::Inside, s),
        }
    }
}

fn from_item(item: &Value, place: Place, s: &mut StatementShape) {
    let node = item.get("node").unwrap_or(item);
    if let Some(sub) = node.get("RangeSubselect") {
        alias(sub.get("alias"), s);
        row_source(sub.get("alias"), s);
        match sub.pointer("/subquery/node/SelectStmt") {
            Some(q) => select_stmt(q, nested(place), false, s),
            None => any(sub, Place::Inside, s),
        }
    } else if let Some(j) = node.get("JoinExpr") {
        alias(j.get("alias"), s);
        row_source(j.get("alias"), s);
        if j.get("is_natural").and_then(Value::as_bool) == Some(true) {
            s.natural = true;
        }
        for (k, child) in j.as_object().into_iter().flatten() {
            match k.as_str() {
                "larg" | "rarg" => from_item(child, place, s),
                // USING (a, b): names of columns compared, and merged into one.
                "using_clause" => {
                    for n in child.as_array().into_iter().flatten() {
                        if let Some(name) = n.pointer("/node/String/sval").and_then(Value::as_str) {
                            s.columns.insert(ColumnUse {
                                name: name.to_string(),
                                place: Place::Inside,
                                renamed: false,
                                star: false,
                                single: true,
                                qualifier: String::new(),
                            });
                        }
                    }
                }
                _ => any(child, Place::Inside, s),
            }
        }
    } else {
        if let Some(f) = node.get("RangeFunction") {
            row_source(f.get("alias"), s);
        }
        any(item, Place::Inside, s);
    }
}

/// A FROM item's own name (a subquery's, a join's, a function's): its whole row can be
/// named as one value.
fn row_source(a: Option<&Value>, s: &mut StatementShape) {
    if let Some(name) = a
        .and_then(|a| a.get("aliasname"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        s.row_sources.insert(name.to_ascii_lowercase());
    }
}

fn alias(a: Option<&Value>, s: &mut StatementShape) {
    if a.and_then(|a| a.get("colnames"))
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
    {
        s.renames = true;
    }
}

fn column_ref(c: &Value, place: Place, renamed: bool, s: &mut StatementShape) {
    let fields: Vec<&Value> = c
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let name = |v: &Value| {
        v.pointer("/node/String/sval")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let star = fields
        .last()
        .is_some_and(|f| f.pointer("/node/AStar").is_some());
    let qualifier = fields
        .len()
        .checked_sub(2)
        .and_then(|i| name(fields[i]))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let used = if star {
        ColumnUse {
            name: fields
                .len()
                .checked_sub(2)
                .and_then(|i| name(fields[i]))
                .unwrap_or_default(),
            place,
            renamed,
            star: true,
            single: false,
            qualifier,
        }
    } else {
        ColumnUse {
            name: fields.last().and_then(|f| name(f)).unwrap_or_default(),
            place,
            renamed,
            star: false,
            single: fields.len() == 1,
            qualifier,
        }
    };
    s.columns.insert(used);
}

/// Anything else: every column reference in it is at `place`, every SELECT in it is
/// read at `place` (a scalar subquery's columns are values in an expression).
fn any(v: &Value, place: Place, s: &mut StatementShape) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| any(i, place, s)),
        Value::Object(o) => {
            if o.contains_key("relname") && o.contains_key("schemaname") {
                let table = o
                    .get("relname")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if let Some(a) = o.get("alias").filter(|a| !a.is_null()) {
                    if let Some(name) = a.get("aliasname").and_then(Value::as_str) {
                        s.aliases.insert(name.to_ascii_lowercase(), table.clone());
                    }
                    alias(Some(a), s);
                }
            }
            for (k, child) in o {
                match k.as_str() {
                    "ColumnRef" => column_ref(child, place, false, s),
                    "SelectStmt" => select_stmt(child, place, false, s),
                    "SubLink" => {
                        let exists = child.get("sub_link_type").and_then(Value::as_i64) == Some(1);
                        for (k2, c2) in child.as_object().into_iter().flatten() {
                            match (k2.as_str(), c2.pointer("/node/SelectStmt")) {
                                ("subselect", Some(q)) => select_stmt(q, place, exists, s),
                                _ => any(c2, place, s),
                            }
                        }
                    }
                    _ => any(child, place, s),
                }
            }
        }
        _ => {}
    }
}

/// Whether a shape can show masked values only as masked; the first way it could
/// otherwise.
pub fn judge(masked: &MaskedNames, s: &StatementShape) -> Result<(), Refusal> {
    if masked.is_empty() {
        return Ok(());
    }
    let refuse = |message: String| {
        Err(Refusal {
            rule: "mask",
            message,
        })
    };
    let tables: BTreeSet<String> = s
        .tables
        .iter()
        .map(|(_, t)| t.to_ascii_lowercase())
        .collect();
    let masked_tables: BTreeSet<&String> = tables
        .iter()
        .filter(|t| masked.tables.contains(*t))
        .collect();
    let whole_row = |name: &str| {
        let name = name.to_ascii_lowercase();
        masked.tables.contains(&name) && tables.contains(&name)
            || s.aliases
                .get(&name)
                .is_some_and(|t| masked.tables.contains(t))
    };
    if !masked_tables.is_empty() || !masked.patterns.is_empty() {
        if let Some((_, t)) = s.tables.iter().find(|(_, t)| {
            let t = t.to_ascii_lowercase();
            t.starts_with("pg_stat") && (t.contains("statistic") || t.starts_with("pg_stats"))
        }) {
            return refuse(format!(
                "{t} is refused for a role that masks: the planner's statistics hold sample values of every column"
            ));
        }
        if s.kinds.iter().any(|k| k == "LISTEN") {
            return refuse(
                "LISTEN is refused for a role that masks: a notification's payload has no columns to mask".into(),
            );
        }
    }
    if s.natural && !masked_tables.is_empty() {
        return refuse(
            "NATURAL JOIN is refused in a statement reading masked columns: it compares and merges columns unseen; join ON named columns".into(),
        );
    }
    if let Some(d) = s.dynamic.first() {
        return refuse(format!(
            "{d} is refused for a role that masks: the relay cannot see which columns the SQL it runs reads"
        ));
    }
    let shows_masked = s
        .columns
        .iter()
        .any(|u| u.place != Place::Inside && (u.star || masked.masks(&u.name, &tables)));
    if s.positional && shows_masked && !masked_tables.is_empty() {
        return refuse(
            "ordering, grouping or DISTINCT ON by a column's position is refused where masked columns are shown: the order would tell their values apart; name the column".into(),
        );
    }
    if !masked_tables.is_empty() {
        if let Some(k) = s.kinds.iter().find(|k| k.starts_with("COPY TO")) {
            return refuse(format!(
                "{k} of a table with masked columns is refused: COPY's rows say no column's origin, so the relay could not mask them; SELECT the rows instead"
            ));
        }
        if s.renames {
            return refuse(
                "renaming columns in an alias list is refused in a statement reading masked columns: name them as they are".into(),
            );
        }
    }
    for u in &s.columns {
        if u.star {
            if u.place == Place::Inside && !masked_tables.is_empty() {
                return refuse(
                    "* of a table with masked columns inside an expression is refused: it would carry the masked values unmasked".into(),
                );
            }
            continue;
        }
        if u.single
            && !masked_tables.is_empty()
            && s.row_sources.contains(&u.name.to_ascii_lowercase())
        {
            return refuse(format!(
                "the whole row of {} is refused: it holds columns the relay could not mask; select its columns by name",
                u.name
            ));
        }
        // `p.f` where `p` holds masked columns and `f` is none of its columns is
        // PostgreSQL's `f(p)`: a function of the whole row.
        if !u.single && !u.qualifier.is_empty() && !masked_tables.is_empty() {
            let holder = s
                .aliases
                .get(&u.qualifier)
                .cloned()
                .or_else(|| tables.contains(&u.qualifier).then(|| u.qualifier.clone()));
            let name = u.name.to_ascii_lowercase();
            let known = match holder {
                Some(t) if masked.tables.contains(&t) => masked.known.contains(&(t, name)),
                Some(_) => true,
                // A subquery's, CTE's or join's row: a column of a masked table, or a
                // name the statement gives a result column.
                None => {
                    masked.known.iter().any(|(_, c)| *c == name) || s.output_names.contains(&name)
                }
            };
            if !known {
                return refuse(format!(
                    "{}.{} is refused: it is not a column there, so PostgreSQL would read it as {}({}), a function of a row with masked columns",
                    u.qualifier, u.name, u.name, u.qualifier
                ));
            }
        }
        if u.single && whole_row(&u.name) {
            return refuse(format!(
                "the whole row of {} is refused: it holds masked columns; select its columns by name",
                u.name
            ));
        }
        if masked.masks(&u.name, &tables) {
            if u.place == Place::Inside {
                return refuse(format!(
                    "{} is masked for this role: it may be selected as it is, not computed on, compared, sorted, grouped, joined on or copied",
                    u.name
                ));
            }
            if u.renamed {
                return refuse(format!(
                    "{} is masked for this role: give it another name only in the outermost SELECT",
                    u.name
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sql::{Dialect, Shape};

    fn masked() -> MaskedNames {
        MaskedNames {
            columns: vec![("people".into(), "ssn".into())],
            patterns: vec!["*card*".into()],
            tables: ["people".to_string(), "payments".to_string()].into(),
            known: [
                ("people", "id"),
                ("people", "name"),
                ("people", "ssn"),
                ("payments", "id"),
                ("payments", "card_number"),
            ]
            .map(|(t, c)| (t.to_string(), c.to_string()))
            .into(),
        }
    }

    fn verdict(sql: &str) -> Result<(), String> {
        let shape = Shape::of(sql, Dialect::default()).unwrap();
        for st in &shape.statements {
            judge(&masked(), st).map_err(|r| r.message)?;
        }
        Ok(())
    }

    #[test]
    fn a_masked_column_may_be_selected_as_it_is() {
        for sql in [
            "select ssn from people",
            "select p.ssn as \"SSN\", name from people p where id = 1",
            "select * from people",
            "select * from people order by id",
            "select s.ssn from (select id, ssn from people) s where s.id > 1",
            "with c as (select ssn, id from people) select ssn from c where id = 2",
            "select ssn from people join orders o on o.person = people.id",
            "select id from people where exists (select * from payments where payments.id = people.id)",
            "select card_number from payments",
            "select ssn from orders", // another table's ssn
            "select count(*) from people",
            "select id, ssn from people order by id",
            "select p.ssn, p.id from people p",
            "select s.id, s.x from (select id, lower(name) as x from people) s",
            "select id from people p where exists (select * from payments where payments.id = p.id)",
            "select o.total from orders o",
            "select ssn from people join orders using (id)",
            "select name from people order by 1",
            "select 1",
        ] {
            assert_eq!(verdict(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn whatever_could_show_or_reveal_it_is_refused() {
        for sql in [
            "select lower(ssn) from people",
            "select ssn::text from people",
            "select ssn || '' from people",
            "select substr(ssn, 1, 3) from people",
            "select x from (select lower(ssn) as x from people) s",
            "select x from (select ssn as x from people) s",
            "with c as (select lower(ssn) l from people) select l from c",
            "with c(a) as (select ssn from people) select a from c",
            "select a from (select ssn from people) s(a)",
            "select (select ssn from people limit 1)",
            "select id from people where ssn like '1%'",
            "select id from people order by ssn",
            "select count(*) from people group by ssn",
            "select id from people join orders on orders.ssn = people.ssn",
            "select ssn from people union select 'x'",
            "select ssn, id from people order by 1",
            "select p.to_jsonb from people p",
            "select people.row_to_json from people",
            "select p.text from people p",
            "select s::text from (select ssn from people) s",
            "with c as (select ssn from people) select to_json(c) from c",
            "select (s).ssn from (select ssn from people) s",
            "select j from (people p join orders o on true) j",
            "select s.to_json from (select ssn from people) s",
            "select ssn from people full join people x using (ssn)",
            "select * from people natural full join people",
            "select id from people p where exists (select generate_series(1, (p.ssn like '12%')::int))",
            "select id from people p where exists (select max(1/((p.ssn like '1%')::int - 1)))",
            "select most_common_vals from pg_stats where tablename = 'people'",
            "select ssn, id from people group by rollup(1, 2)",
            "select distinct ssn, id from people",
            "listen people_changes",
            "select * from people order by 2 desc",
            "select distinct on (1) ssn from people",
            "do $$ begin perform 1; end $$",
            "select to_json(p) from people p",
            "select p from people p",
            "select row_to_json(people.*) from people",
            "select people from people",
            "insert into copy_of select ssn from people",
            "create table leak as select ssn from people",
            "select ssn into leak from people",
            "update people set name = ssn where id = 1",
            "update people set name = 'x' where id = 1 returning ssn",
            "delete from people where ssn = '1' returning id",
            "copy people to stdout",
            "copy (select ssn from people) to stdout",
            "select md5(card_number) from payments",
            "select id from payments where card_no = '4'",
            "explain analyze select id from people where ssn = '1'",
        ] {
            assert!(verdict(sql).is_err(), "{sql} should be refused");
        }
    }

    #[test]
    fn glob_matches_runs_of_characters() {
        assert!(glob("*ssn*", "ssn"));
        assert!(glob("*ssn*", "the_ssn_no"));
        assert!(glob("card_*", "card_number"));
        assert!(!glob("card_*", "cards"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
    }
}
