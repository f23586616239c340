//! What the relay decides about each statement before it reaches the target: parsed
//! with PostgreSQL's own grammar ([`crate::policy::sql`]) and judged against the role's
//! rules. A refused statement never reaches the target as sent; the tracker puts in its
//! place one the server is sure to reject at the same point of the conversation, so
//! the server's answers keep their order and a transaction fails as it would on an
//! error, and the server's rejection reaches the client as the relay's refusal.
//!
//! Shapes are cached by exact text (and the way the server reads string literals), for
//! all sessions: a prepared statement re-sent or a query a tool repeats is parsed once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::config::{Config, SqlPolicy};
use crate::policy::sql::{self, Dialect, Shape};

use super::wire;

/// Texts cached at most; past this the cache starts over.
const CACHED: usize = 4096;
/// Texts longer than this are parsed every time rather than kept.
const CACHED_TEXT: usize = 16 * 1024;

/// What the relay put in the place of a refused statement: text the server cannot
/// parse, so it answers with an error exactly where the statement's outcome goes.
pub const REFUSED_TEXT: &str = "twokey refused";

/// Parsed shapes shared by all sessions of a relay.
#[derive(Default)]
pub struct Shapes {
    /// By text: as read with standard_conforming_strings off, and on.
    by_dialect: [Mutex<HashMap<String, Arc<Parsed>>>; 2],
}

/// A text's parse: its shape, or why it does not parse.
pub type Parsed = Result<Shape, sql::Unparsed>;

impl Shapes {
    /// The shape of `text` as a server with `dialect` reads it.
    pub fn of(&self, text: &str, dialect: Dialect) -> Arc<Parsed> {
        let map = &self.by_dialect[usize::from(dialect.standard_strings)];
        if text.len() <= CACHED_TEXT
            && let Some(p) = map.lock().ok().and_then(|m| m.get(text).cloned())
        {
            return p;
        }
        let parsed = Arc::new(Shape::of(text, dialect));
        if text.len() <= CACHED_TEXT
            && let Ok(mut m) = map.lock()
        {
            if m.len() >= CACHED {
                m.clear();
            }
            m.insert(text.to_string(), parsed.clone());
        }
        parsed
    }
}

/// A statement the relay will not pass on: the rule, what to tell the client, and what
/// the statement was (for the audit event; never its text).
#[derive(Debug, Clone)]
pub struct Refused {
    pub rule: &'static str,
    /// Why, in words that hold nothing of the statement's text (audited).
    pub message: Box<str>,
    /// What only the client is told: the parser's own words, which can quote the text.
    pub detail: Option<Box<str>>,
    /// What the client is told to do next.
    pub hint: Hint,
    pub kinds: Vec<String>,
    pub tables: Vec<String>,
    pub functions: Box<[String]>,
}

/// The hint of a refusal: what the engineer can do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// The role's rules refuse it.
    AskForRole,
    /// Held for review and not approved (denied, not decided in time).
    NotApproved,
    /// Held for review, and twokey could not file or run it.
    NotRun,
}

impl Hint {
    pub fn words(self) -> &'static str {
        match self {
            Hint::AskForRole => {
                "the role of your grant does not allow it; ask for a role that does"
            }
            Hint::NotApproved => {
                "it did not run; send it again when an approver can say yes, or send something they can approve"
            }
            Hint::NotRun => "it did not run; try again in a moment",
        }
    }
}

impl Refused {
    /// A refusal by a rule that is not about what the statement names.
    pub fn plain(rule: &'static str, message: impl Into<Box<str>>) -> Refused {
        Refused {
            rule,
            message: message.into(),
            detail: None,
            hint: Hint::AskForRole,
            kinds: Vec::new(),
            tables: Vec::new(),
            functions: Box::default(),
        }
    }

    /// The ErrorResponse the client gets in the place of the server's.
    pub fn error_response(&self) -> Vec<u8> {
        wire::error_response(
            "ERROR",
            "42501",
            &match &self.detail {
                None => format!(
                    "twokey refused this statement ({}): {}",
                    self.rule, self.message
                ),
                Some(d) => format!(
                    "twokey refused this statement ({}): {}: {d}",
                    self.rule, self.message
                ),
            },
            Some(self.hint.words()),
        )
    }
}

/// Benchmarks only (cargo feature `bench-unjudged`): while set, nothing is parsed or
/// judged, so `benches/pg_relay.rs` can print what judging costs. No configuration
/// reaches it, and a build without the feature has no such switch.
#[cfg(feature = "bench-unjudged")]
pub static UNJUDGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One session's judge: the role's rules, how the server reads strings now, and the
/// relay's shared cache.
pub struct Judge {
    policy: Arc<SqlPolicy>,
    /// The running configuration, when the rules follow its reloads.
    follows: Option<Follows>,
    /// Why nothing more runs in this session, when a reload made it so: the role was
    /// removed, or changed in a way the session cannot take (the reload ends it too).
    stale: Option<&'static str>,
    /// The rules the session was set up with (its masks, parameters, holding).
    at_start: Arc<SqlPolicy>,
    /// The session made something at the server that runs statements later, which the
    /// relay does not judge again ([`sql::keeps_for_later`]).
    made_for_later: std::cell::Cell<bool>,
    /// How many times the rules changed in this session.
    version: u64,
    dialect: Dialect,
    shapes: Arc<Shapes>,
    /// What the role masks, once resolved for the session.
    masks: Option<Arc<super::mask::Masks>>,
}

const ROLE_REMOVED: &str = "the role of your grant is no longer in the policy";
const SET_UP_DIFFERENTLY: &str = "the role's rules changed in a way this session cannot take (its masks, read_only, search_path or held statements): connect again";
const MADE_FOR_LATER: &str = "the role's rules changed after this session made a prepared statement, cursor, view, rule or function at the server, which twokey cannot judge again: connect again";

/// Whether a session set up under `old` cannot run under `new`: what its start set up
/// (masks resolved against the catalog, parameters sent to the target) differs, or
/// `new` holds statements for review where `old` held none (a session passes one Sync
/// at a time only from its start).
pub fn set_up_differently(old: &SqlPolicy, new: &SqlPolicy) -> bool {
    let holds = |p: &SqlPolicy| !(p.review.is_empty() && p.review_tables.is_empty());
    old.mask != new.mask
        || old.read_only != new.read_only
        || old.search_path != new.search_path
        || (!holds(old) && holds(new))
}

/// Where a session's judge reads its role's rules again after a reload.
struct Follows {
    updates: watch::Receiver<Arc<Config>>,
    resource: String,
    role: String,
}

impl Judge {
    /// A judge of fixed rules.
    pub fn new(policy: Arc<SqlPolicy>, shapes: Arc<Shapes>) -> Judge {
        Judge {
            at_start: policy.clone(),
            policy,
            follows: None,
            stale: None,
            made_for_later: std::cell::Cell::new(false),
            version: 0,
            dialect: Dialect::default(),
            shapes,
            masks: None,
        }
    }

    /// A judge of `role`'s rules on `resource` that follows reloads of the running
    /// configuration ([`Judge::refresh`]); `policy` is the role's rules in the value
    /// `updates` last saw.
    pub fn following(
        policy: Arc<SqlPolicy>,
        updates: watch::Receiver<Arc<Config>>,
        resource: &str,
        role: &str,
        shapes: Arc<Shapes>,
    ) -> Judge {
        Judge {
            follows: Some(Follows {
                updates,
                resource: resource.to_string(),
                role: role.to_string(),
            }),
            ..Judge::new(policy, shapes)
        }
    }

    /// Reads the role's rules again if the configuration was reloaded since: a rule
    /// changed applies to the next statement judged, a prepared statement's included.
    /// Cheap when nothing changed (one atomic load).
    pub fn refresh(&mut self) {
        let Some(f) = &mut self.follows else {
            return;
        };
        // A sender gone (the server stopping) keeps the rules as they are.
        if !f.updates.has_changed().unwrap_or(false) {
            return;
        }
        let config = f.updates.borrow_and_update().clone();
        self.version += 1;
        let Some((_, role)) = config.role(&f.resource, &f.role) else {
            self.stale = Some(ROLE_REMOVED);
            return;
        };
        if role.sql == *self.policy {
            return;
        }
        if set_up_differently(&self.at_start, &role.sql) {
            self.stale = Some(SET_UP_DIFFERENTLY);
        } else if self.made_for_later.get() {
            self.stale = Some(MADE_FOR_LATER);
        }
        self.policy = Arc::new(role.sql.clone());
    }

    /// Changes each time the rules do: what was judged by another version is judged
    /// again before it runs.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// From now on, statements that could show a masked value unmasked are refused.
    pub fn set_masks(&mut self, masks: Arc<super::mask::Masks>) {
        self.masks = Some(masks);
    }

    /// Follows what the server says it is (its `standard_conforming_strings`).
    pub fn server_parameter(&mut self, name: &str, value: &str) {
        if name == "standard_conforming_strings" {
            self.dialect.standard_strings = value == "on";
        }
    }

    /// The text parsed (cached), judged.
    pub fn text(&self, text: &str) -> (Arc<Parsed>, Result<(), Refused>) {
        #[cfg(feature = "bench-unjudged")]
        if UNJUDGED.load(std::sync::atomic::Ordering::Relaxed) {
            return (Arc::new(Ok(Shape::default())), Ok(()));
        }
        let parsed = self.shapes.of(text, self.dialect);
        let verdict = self.parsed(&parsed);
        (parsed, verdict)
    }

    /// A parse judged against the rules as they are now.
    pub fn parsed(&self, parsed: &Parsed) -> Result<(), Refused> {
        if let Some(r) = self.stale() {
            return Err(r);
        }
        let verdict = self.judged(parsed);
        if verdict.is_ok()
            && self.follows.is_some()
            && let Ok(shape) = parsed
            && sql::keeps_for_later(shape)
        {
            self.made_for_later.set(true);
        }
        verdict
    }

    /// The refusal of everything, when a reload left this session unable to run
    /// anything more.
    pub fn stale(&self) -> Option<Refused> {
        self.stale.map(|why| Refused::plain("policy", why))
    }

    fn judged(&self, parsed: &Parsed) -> Result<(), Refused> {
        match parsed {
            Err(sql::Unparsed(why)) => Err(Refused {
                detail: Some(why.as_str().into()),
                ..Refused::plain("unparsed", "PostgreSQL's grammar does not parse it")
            }),
            Ok(shape) => sql::judge(&self.policy, shape)
                .and_then(|()| match &self.masks {
                    Some(m) => shape
                        .statements
                        .iter()
                        .try_for_each(|st| crate::policy::masking::judge(&m.names, st)),
                    None => Ok(()),
                })
                .map_err(|r| Refused {
                    rule: r.rule,
                    message: r.message.into(),
                    detail: None,
                    hint: Hint::AskForRole,
                    kinds: shape.kinds().into_iter().map(str::to_string).collect(),
                    tables: tables_of(shape),
                    functions: shape
                        .statements
                        .iter()
                        .flat_map(|s| s.functions.iter().cloned())
                        .collect(),
                }),
        }
    }
}

/// Why the role holds a statement for review, and what it is: kinds and tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    pub why: String,
    pub kinds: Vec<String>,
    pub tables: Vec<String>,
}

impl Judge {
    /// Whether the role holds any statement for review.
    pub fn holds_any(&self) -> bool {
        !self.policy.review.is_empty() || !self.policy.review_tables.is_empty()
    }

    /// Whether the role holds a statement its rules let through for another person's
    /// approval, and why.
    pub fn review(&self, parsed: &Parsed) -> Option<Review> {
        #[cfg(feature = "bench-unjudged")]
        if UNJUDGED.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let shape = parsed.as_ref().ok()?;
        let why = sql::review(&self.policy, shape)?;
        Some(Review {
            why,
            kinds: shape.kinds().into_iter().map(str::to_string).collect(),
            tables: tables_of(shape),
        })
    }
}

fn tables_of(shape: &Shape) -> Vec<String> {
    shape
        .statements
        .iter()
        .flat_map(|s| s.tables.iter())
        .map(|(schema, t)| {
            if schema.is_empty() {
                t.clone()
            } else {
                format!("{schema}.{t}")
            }
        })
        .collect()
}

/// The Query that takes a refused Query's (or function call's) place.
pub fn refused_query() -> Vec<u8> {
    let mut b = REFUSED_TEXT.as_bytes().to_vec();
    b.push(0);
    wire::message(b'Q', &b)
}

/// The Parse that takes a refused Parse's place: the same statement name, so the
/// server's statements stay as they would have after a failed Parse.
pub fn refused_parse(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(REFUSED_TEXT.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    wire::message(b'P', &b)
}

/// The Bind that takes a refused Bind's place: two parameter formats for one
/// parameter, which the server rejects before it looks at anything else it runs.
pub fn refused_bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut b = portal.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(statement.as_bytes());
    b.push(0);
    b.extend_from_slice(&2i16.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    wire::message(b'B', &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_answers_the_same_parse_and_keeps_dialects_apart() {
        let shapes = Arc::new(Shapes::default());
        let judge = Judge::new(Arc::new(SqlPolicy::default()), shapes.clone());
        let (a, va) = judge.text("select 1");
        let (b, _) = judge.text("select 1");
        assert!(Arc::ptr_eq(&a, &b) && va.is_ok());
        let off = Dialect {
            standard_strings: false,
        };
        assert!(!Arc::ptr_eq(&a, &shapes.of("select 1", off)));
        let (_, v) = judge.text("select 1;; set role postgres");
        let r = v.unwrap_err();
        assert_eq!(r.rule, "role escape");
        assert_eq!(r.kinds, ["SELECT", "SET"]);
        // The parser's words quote the text: the client reads them, the audit does not.
        let (_, v) = judge.text("alter role x password 'hunter2");
        let r = v.unwrap_err();
        assert_eq!(r.rule, "unparsed");
        assert!(!r.message.contains("hunter2"), "{}", r.message);
        let (_, _, told) = wire::error_fields(&r.error_response()[5..]);
        assert!(told.contains("unterminated quoted string"), "{told}");
    }

    #[test]
    fn a_refusal_names_its_rule_and_the_replacements_are_well_formed() {
        let shapes = Arc::new(Shapes::default());
        let judge = Judge::new(Arc::new(SqlPolicy::default()), shapes);
        let r = judge.text("delete from t").1.unwrap_err();
        let e = r.error_response();
        let (_, code, text) = wire::error_fields(&e[5..]);
        assert_eq!(code, "42501");
        assert!(text.contains("(require_where)"), "{text}");
        for m in [refused_query(), refused_parse("s1"), refused_bind("", "s1")] {
            assert_eq!(wire::frame(&m, 1024).unwrap(), Some((m[0], m.len())));
        }
    }
}
