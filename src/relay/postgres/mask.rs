//! Masking on the way back: which result columns a role masks, found by where
//! PostgreSQL says each comes from (the RowDescription's table OID and column number,
//! so an alias does not help) or by a column-name pattern; and the values rewritten
//! in every DataRow, text or binary, before the client and the transcript see them.
//!
//! The role's rules are resolved against the target's catalog once per session, on
//! the upstream connection as the grant's role, before the client is let in
//! ([`catalog_query`], [`Masks::resolve`]). What a parse must refuse so that nothing
//! reaches the client other than through a masked column is `policy::masking`'s.
//!
//! A masked value of a text type becomes `****` (full), `****` and its last four
//! characters (last4), or `h:` and 16 hex digits of HMAC-SHA-256 under twokey's mask
//! key (hash: equal values give equal hashes); of any other type it becomes NULL,
//! since no text would parse as that type. A NULL stays NULL.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{MaskMethod, MaskRule};
use crate::policy::masking::{MaskedNames, glob};

use super::wire::{self, Fields, WireError};

/// What a masked column's value is replaced with (full).
const HIDDEN: &str = "****";

/// Text, varchar, bpchar, name, unknown: types whose binary form is their text.
const TEXT_TYPES: &[u32] = &[25, 1043, 1042, 19, 705];

/// A session's masks: by origin, by name pattern, and the names for the parse.
#[derive(Debug, Default)]
pub struct Masks {
    by_origin: HashMap<(u32, i16), MaskMethod>,
    patterns: Vec<(String, MaskMethod)>,
    pub names: MaskedNames,
    key: [u8; 32],
}

/// The key of the `hash` method: `DATA_DIR/relay_mask_key`, made at first need.
/// Replicas must share it for their hashes to agree (as they share the CA).
pub fn load_or_create_key(data_dir: &Path) -> crate::Result<[u8; 32]> {
    use rand::RngCore;
    let path = data_dir.join("relay_mask_key");
    if !path.exists() {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        match crate::keyfile::write_private("mask key", &path, hex::encode(key).as_bytes()) {
            Ok(()) => {}
            Err(_) if path.exists() => {}
            Err(e) => return Err(e),
        }
    }
    crate::keyfile::check_private_mode("mask key", &path)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| crate::Error::Internal(format!("mask key {}: {e}", path.display())))?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            crate::Error::Internal(format!("mask key {} is not 64 hex digits", path.display()))
        })
}

fn quoted(s: &str) -> String {
    format!("'{}'", s.to_ascii_lowercase().replace('\'', "''"))
}

/// The catalog query that finds the columns a role's rules name: (table OID, column
/// number, schema, table, column, whether a view's, masked), one row each, and every
/// column of every view that reads one; then every other column of those tables and
/// views (masked false), so the parse knows their columns. Names are validated
/// identifiers.
pub fn catalog_query(rules: &[MaskRule]) -> String {
    let mut conditions = Vec::new();
    for r in rules {
        if let Some(c) = &r.column {
            let parts: Vec<&str> = c.split('.').collect();
            let cond = match parts.as_slice() {
                [t, col] => format!(
                    "(lower(c.relname) = {} AND lower(a.attname) = {})",
                    quoted(t),
                    quoted(col)
                ),
                [sch, t, col] => format!(
                    "(lower(n.nspname) = {} AND lower(c.relname) = {} AND lower(a.attname) = {})",
                    quoted(sch),
                    quoted(t),
                    quoted(col)
                ),
                _ => continue,
            };
            conditions.push(cond);
        }
        if let Some(p) = &r.name {
            let like = p
                .to_ascii_lowercase()
                .replace('!', "!!")
                .replace('_', "!_")
                .replace('%', "!%")
                .replace('*', "%");
            conditions.push(format!(
                "(lower(a.attname) LIKE '{}' ESCAPE '!' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg!_%' ESCAPE '!')",
                like.replace('\'', "''")
            ));
        }
    }
    if conditions.is_empty() {
        conditions.push("false".into());
    }
    // Views (and views of views) reading a masked column are masked whole: the
    // catalog says which columns a view reads, not which of its columns each becomes.
    format!(
        "WITH RECURSIVE masked(oid, attnum, nspname, relname, attname, derived) AS (\
         SELECT c.oid, a.attnum, n.nspname::text, c.relname::text, a.attname::text, false \
         FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f') \
         AND ({}) \
         UNION \
         SELECT v.oid, va.attnum, vn.nspname::text, v.relname::text, va.attname::text, true \
         FROM masked m \
         JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_catalog.pg_class'::regclass \
           AND d.refobjid = m.oid AND d.refobjsubid = m.attnum \
           AND d.classid = 'pg_catalog.pg_rewrite'::regclass \
         JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
         JOIN pg_catalog.pg_class v ON v.oid = r.ev_class AND v.oid <> m.oid \
         JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace \
         JOIN pg_catalog.pg_attribute va ON va.attrelid = v.oid AND va.attnum > 0 AND NOT va.attisdropped\
         ) SELECT oid::int8, attnum, nspname, relname, attname, derived, true FROM masked \
         UNION ALL SELECT a.attrelid::int8, a.attnum, '', c.relname::text, a.attname::text, false, false \
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         WHERE a.attrelid IN (SELECT oid FROM masked) AND a.attnum > 0 AND NOT a.attisdropped",
        conditions.join(" OR ")
    )
}

/// The rule a column falls under first, if any.
fn rule_for(rules: &[MaskRule], schema: &str, table: &str, column: &str) -> Option<MaskMethod> {
    let (schema, table, column) = (
        schema.to_ascii_lowercase(),
        table.to_ascii_lowercase(),
        column.to_ascii_lowercase(),
    );
    rules.iter().find_map(|r| {
        let hit = match (&r.column, &r.name) {
            (Some(c), _) => {
                let c = c.to_ascii_lowercase();
                let parts: Vec<&str> = c.split('.').collect();
                match parts.as_slice() {
                    [t, col] => *t == table && *col == column,
                    [s, t, col] => *s == schema && *t == table && *col == column,
                    _ => false,
                }
            }
            (None, Some(p)) => glob(&p.to_ascii_lowercase(), &column),
            _ => false,
        };
        hit.then_some(r.method)
    })
}

impl Masks {
    /// The masks of `rules`, given the catalog query's rows.
    pub fn resolve(rules: &[MaskRule], rows: &[Vec<Option<String>>], key: [u8; 32]) -> Masks {
        let mut by_origin = HashMap::new();
        let mut tables = BTreeSet::new();
        let mut view_columns = Vec::new();
        let mut known = BTreeSet::new();
        for row in rows {
            let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            let (Ok(oid), Ok(attnum)) = (get(0).parse::<u32>(), get(1).parse::<i16>()) else {
                continue;
            };
            let (schema, table, column) = (get(2), get(3), get(4));
            known.insert((table.to_ascii_lowercase(), column.to_ascii_lowercase()));
            if get(6) == "f" {
                continue;
            }
            let derived = get(5) == "t";
            let method =
                rule_for(rules, &schema, &table, &column).or(derived.then_some(MaskMethod::Full));
            if let Some(m) = method {
                by_origin.entry((oid, attnum)).or_insert(m);
                tables.insert(table.to_ascii_lowercase());
                if derived {
                    view_columns.push((table.to_ascii_lowercase(), column.to_ascii_lowercase()));
                }
            }
        }
        let mut columns = view_columns;
        let mut patterns = Vec::new();
        for r in rules {
            if let Some(c) = &r.column {
                let c = c.to_ascii_lowercase();
                let parts: Vec<&str> = c.split('.').collect();
                if let [.., t, col] = parts.as_slice() {
                    columns.push((t.to_string(), col.to_string()));
                    tables.insert(t.to_string());
                }
            } else if let Some(p) = &r.name {
                patterns.push((p.to_ascii_lowercase(), r.method));
            }
        }
        Masks {
            by_origin,
            names: MaskedNames {
                columns,
                patterns: patterns.iter().map(|(p, _)| p.clone()).collect(),
                tables,
                known,
            },
            patterns,
            key,
        }
    }

    /// Each result column's mask: by origin, else by its name.
    pub fn plan(&self, columns: &[(String, u32, i16)]) -> Vec<Option<MaskMethod>> {
        columns
            .iter()
            .map(|(name, oid, attnum)| {
                self.by_origin.get(&(*oid, *attnum)).copied().or_else(|| {
                    let name = name.to_ascii_lowercase();
                    self.patterns
                        .iter()
                        .find(|(p, _)| glob(p, &name))
                        // Matched by name alone, the value may be the client's own: a
                        // hash of it would let guesses be checked against real hashes.
                        .map(|(_, m)| match m {
                            MaskMethod::Hash => MaskMethod::Full,
                            other => *other,
                        })
                })
            })
            .collect()
    }

    /// A value as the client may see it: `None` for NULL.
    fn value(&self, method: MaskMethod, type_oid: u32, v: &[u8]) -> Option<Vec<u8>> {
        if !TEXT_TYPES.contains(&type_oid) {
            return None;
        }
        let shown = match method {
            MaskMethod::Full => HIDDEN.to_string(),
            MaskMethod::Last4 => {
                let text = String::from_utf8_lossy(v);
                let n = text.chars().count();
                if n <= 4 {
                    HIDDEN.to_string()
                } else {
                    let tail: String = text.chars().skip(n - 4).collect();
                    format!("{HIDDEN}{tail}")
                }
            }
            MaskMethod::Hash => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
                mac.update(v);
                let digest = mac.finalize().into_bytes();
                format!("h:{}", hex::encode(&digest[..8]))
            }
        };
        Some(shown.into_bytes())
    }

    /// A DataRow with the masked columns' values replaced (and any past the plan's
    /// end): the whole message.
    pub fn data_row(
        &self,
        plan: &[Option<MaskMethod>],
        types: &[u32],
        body: &[u8],
    ) -> Result<Vec<u8>, WireError> {
        let mut f = Fields::new(body);
        let n = f.i16()?;
        let mut out = Vec::with_capacity(body.len());
        out.extend_from_slice(&n.to_be_bytes());
        for i in 0..n.max(0) as usize {
            let v = f.value()?;
            // A column past the plan is one the relay cannot place: not shown.
            let method = match plan.get(i) {
                Some(m) => *m,
                None => Some(MaskMethod::Full),
            };
            let v = match (v, method) {
                (Some(v), Some(m)) => self.value(m, types.get(i).copied().unwrap_or(0), v),
                (v, None) => v.map(<[u8]>::to_vec),
                (None, Some(_)) => None,
            };
            match v {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(&v);
                }
            }
        }
        Ok(wire::message(b'D', &out))
    }
}

/// An ErrorResponse or NoticeResponse without its DETAIL, which can quote a row's
/// values ("Key (ssn)=(…) already exists", "Failing row contains (…)"): the whole
/// message, or `None` when it has no DETAIL.
pub fn without_detail(t: u8, body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let mut had = false;
    let mut rest = body;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = after.iter().position(|&b| b == 0)?;
        let value = &after[..end];
        rest = &after[end + 1..];
        out.push(code);
        if code == b'D' {
            had = true;
            out.extend_from_slice(b"(withheld by twokey: this role masks columns)");
        } else {
            out.extend_from_slice(value);
        }
        out.push(0);
    }
    out.push(0);
    had.then(|| wire::message(t, &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<MaskRule> {
        vec![
            MaskRule {
                column: Some("people.ssn".into()),
                name: None,
                method: MaskMethod::Last4,
            },
            MaskRule {
                column: None,
                name: Some("*card*".into()),
                method: MaskMethod::Hash,
            },
        ]
    }

    fn row(v: &[Option<&str>]) -> Vec<u8> {
        let mut b = (v.len() as i16).to_be_bytes().to_vec();
        for x in v {
            match x {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        b
    }

    fn values(m: &[u8]) -> Vec<Option<String>> {
        let mut f = Fields::new(&m[5..]);
        (0..f.i16().unwrap())
            .map(|_| {
                f.value()
                    .unwrap()
                    .map(|v| String::from_utf8_lossy(v).to_string())
            })
            .collect()
    }

    #[test]
    fn columns_are_masked_by_origin_and_by_name_and_values_by_method() {
        let catalog = vec![
            ["16384", "2", "public", "people", "ssn", "f", "t"],
            ["16390", "3", "public", "payments", "card_no", "f", "t"],
            ["16384", "1", "", "people", "id", "f", "f"],
        ]
        .into_iter()
        .map(|r| r.into_iter().map(|s| Some(s.to_string())).collect())
        .collect::<Vec<_>>();
        let m = Masks::resolve(&rules(), &catalog, [7; 32]);
        assert!(m.names.tables.contains("payments") && m.names.tables.contains("people"));
        let plan = m.plan(&[
            ("x".into(), 16384, 2),
            ("id".into(), 16384, 1),
            ("cc".into(), 16390, 3),
            ("n".into(), 16384, 2),
        ]);
        assert!(m.names.known.contains(&("people".into(), "id".into())));
        // By name alone, never a hash.
        assert_eq!(
            m.plan(&[("my_card".into(), 0, 0)]),
            [Some(MaskMethod::Full)]
        );
        assert_eq!(
            plan,
            [
                Some(MaskMethod::Last4),
                None,
                Some(MaskMethod::Hash),
                Some(MaskMethod::Last4)
            ]
        );
        let out = m
            .data_row(
                &plan,
                &[25, 23, 25, 23],
                &row(&[Some("123-45-6789"), Some("7"), Some("4111"), Some("5")]),
            )
            .unwrap();
        let v = values(&out);
        assert_eq!(v[0].as_deref(), Some("****6789"));
        assert_eq!(v[1].as_deref(), Some("7"));
        let h = v[2].clone().unwrap();
        assert!(h.starts_with("h:") && h.len() == 18, "{h}");
        // The same value, the same hash; a number cannot hold text: NULL.
        let again = values(
            &m.data_row(
                &plan,
                &[25, 23, 25, 23],
                &row(&[None, None, Some("4111"), Some("5")]),
            )
            .unwrap(),
        );
        assert_eq!(again[2], v[2]);
        assert_eq!(again[0], None);
        assert_eq!(v[3], None);
    }

    #[test]
    fn the_catalog_query_names_each_rule() {
        let q = catalog_query(&rules());
        assert!(
            q.contains("lower(c.relname) = 'people' AND lower(a.attname) = 'ssn'"),
            "{q}"
        );
        assert!(q.contains("LIKE '%card%' ESCAPE '!'"), "{q}");
        let q = catalog_query(&[MaskRule {
            column: None,
            name: Some("card_*".into()),
            method: MaskMethod::Full,
        }]);
        assert!(q.contains("LIKE 'card!_%'"), "{q}");
    }

    #[test]
    fn a_detail_is_withheld() {
        let body = b"SERROR\0C23505\0Mduplicate key\0DKey (ssn)=(123) already exists.\0\0";
        let out = without_detail(b'E', body).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("123") && text.contains("withheld"), "{text}");
        assert!(without_detail(b'E', b"SERROR\0C1\0Mx\0\0").is_none());
    }
}
