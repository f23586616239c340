//! Follows a session's messages in both directions and writes its transcript: one
//! entry per statement, with its parameters, duration, outcome and first rows.
//!
//! The server answers in the order it was asked, so the client's statements wait in a
//! queue ([`Pending`]) until their outcome arrives: a Query's statements complete one
//! by one until ReadyForQuery; an Execute completes with its CommandComplete,
//! ErrorResponse or PortalSuspended; after an error in the extended protocol the
//! server skips everything up to the next Sync, and so does the queue. Prepared
//! statements and portals are remembered by name so an Execute is recorded with the
//! statement text and the parameters it ran with.
//!
//! It is also where the relay's [`Judge`] sees every statement before the target does:
//! a Query, Parse or Bind the rules refuse is answered with the message that takes its
//! place ([`super::judge`]), and the server's rejection of that one with the refusal.
//! A function call by OID (the fastpath) is refused always: nothing says which function
//! it calls. Apart from refusals it only reads. Its memory is bounded: at most
//! [`MAX_NAMED`] statements and portals remembered, values cut at [`MAX_VALUE`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::judge::{self, Judge, Parsed, Refused};
use super::mask::{self, Masks};
use super::wire::{Fields, error_fields};
use crate::config::MaskMethod;
use crate::recording::transcript::{Entry, Protocol, Statement, StatementError, Transcript};

/// Prepared statements (and portals) remembered by name: past this a new prepared
/// statement is refused (the relay must judge each Bind), portals are forgotten.
pub const MAX_NAMED: usize = 10_000;
/// Characters of one parameter or value kept in the transcript.
pub const MAX_VALUE: usize = 1024;
/// Characters of a statement's text kept in the transcript.
pub const MAX_SQL: usize = 64 * 1024;

/// A statement sent, waiting for its outcome.
enum Pending {
    Simple {
        st: Statement,
        at: Instant,
        refused: Option<Box<Refused>>,
    },
    Execute {
        st: Statement,
        at: Instant,
        binary: Vec<bool>,
        /// The statement's result columns, as its Describe said: (names, types).
        described: Option<Described>,
        /// The portal it runs, and which Bind made it (a Describe of the portal may
        /// answer after the Execute was sent).
        portal: (String, u64),
    },
    Function {
        st: Statement,
        at: Instant,
        refused: Option<Box<Refused>>,
    },
    /// A Parse, until its ParseComplete (or error): the prepared statement's name, and
    /// what the name held before, put back if the server does not take the Parse.
    Parse(String, Option<Box<Prepared>>),
    /// A Bind, until its BindComplete (or error): the portal's name, and what it held
    /// before, put back if the server does not take the Bind. Until then the relay
    /// goes by the new one, as the server will; a Bind the server refuses or skips
    /// (a named portal that exists, an error before it) leaves the server's portal as
    /// it was, and so the relay's.
    Bind(String, Option<Box<Portal>>),
    /// A Parse or Bind refused: the server rejects what took its place.
    Refused {
        st: Statement,
        refused: Box<Refused>,
    },
    Sync,
}

/// A refusal, for the session's audit: what was refused and by which rule; the text
/// only by its hash (it may hold what must not be logged).
pub struct Refusal {
    pub protocol: Protocol,
    pub sha256: Option<String>,
    pub refused: Refused,
}

/// A statement held for review, as its approvers see it, with the hash that binds
/// their decision to what the relay holds.
#[derive(Debug, Clone)]
pub struct Hold {
    pub sql: String,
    pub params: Vec<Option<String>>,
    pub review: judge::Review,
    /// SHA-256 (hex) of the text, and of the parameters for an Execute.
    pub sha256: String,
}

/// What becomes of a held message when the relay passes it again.
enum Ruling {
    /// Approved and claimed: it goes on, once.
    Run,
    /// Denied, not decided in time, or not filed: refused.
    Refuse(Box<Refused>),
}

/// What a Describe asks about: a statement (true) or a portal, its name and generation.
type Asked = (bool, String, u64);

/// A prepared statement's result columns: names, type OIDs, and each one's mask.
type Described = (Vec<String>, Vec<u32>, Vec<Option<MaskMethod>>);

/// A prepared statement: its text, parameter types, and result columns once described.
#[derive(Clone)]
struct Prepared {
    sql: String,
    types: Vec<u32>,
    described: Option<Described>,
    /// Its parse, judged again at each Bind against the rules as they are then.
    parsed: Arc<Parsed>,
    /// Which Parse made it: a Describe's answer is kept only for the statement it asked about.
    generation: u64,
}

#[derive(Clone)]
struct Portal {
    sql: String,
    statement: Option<String>,
    params: Vec<Option<String>>,
    /// Whether each result column comes back binary (Bind's result formats).
    binary: Vec<bool>,
    /// Some parameter is longer than the transcript keeps (so it cannot be shown whole).
    long_params: bool,
    described: Option<Described>,
    generation: u64,
    /// Its statement's parse, when the relay knows the statement, and the version of
    /// the rules it was judged by at its Bind ([`Judge::version`]).
    parsed: Option<Arc<Parsed>>,
    judged_by: u64,
}

/// The session's transcript and what it needs to follow the conversation.
pub struct Tracker {
    pub transcript: Transcript,
    judge: Judge,
    /// Refusals not yet taken for the audit ([`Tracker::take_refusals`]).
    refusals: Vec<Refusal>,
    rows_cap: usize,
    pending: VecDeque<Pending>,
    statements: HashMap<String, Prepared>,
    /// Statements whose Describe is on its way back, and the one being answered.
    /// Each Describe on its way: what it asks about (a statement or portal, by name
    /// and generation) and how many Syncs and Queries went before it.
    describing: VecDeque<(Asked, u64)>,
    described_now: Option<Asked>,
    /// Generations handed out; Syncs and Queries sent; ReadyForQuery received.
    generations: u64,
    syncs_sent: u64,
    readies: u64,
    portals: HashMap<String, Portal>,
    /// The result being received: its columns and whether each is binary.
    columns: Vec<String>,
    column_binary: Vec<bool>,
    column_types: Vec<u32>,
    /// Each column's mask, when the role masks.
    column_masks: Vec<Option<MaskMethod>>,
    masks: Option<Arc<Masks>>,
    rows: Vec<Vec<Option<String>>>,
    row_count: u64,
    copy_in: u64,
    copy_out: u64,
    /// The statements of a Query completed so far (for `index`).
    simple_index: usize,
    /// After an extended-protocol error, until Sync: what arrives is skipped.
    skipping: bool,
    /// A statement just held ([`Tracker::take_hold`]), and whether one waits.
    hold: Option<Hold>,
    holding: bool,
    /// The ruling on the held statement, by its hash, for when it is passed again.
    ruling: Option<(String, Ruling)>,
    /// The held statement being passed again is refused.
    forced: Option<Box<Refused>>,
    /// The server asked for COPY data (CopyInResponse), until its ReadyForQuery.
    copying_in: bool,
}

impl Tracker {
    pub fn new(transcript: Transcript, rows_cap: usize, judge: Judge) -> Tracker {
        Tracker {
            transcript,
            judge,
            refusals: Vec::new(),
            rows_cap,
            pending: VecDeque::new(),
            statements: HashMap::new(),
            describing: VecDeque::new(),
            generations: 0,
            syncs_sent: 0,
            readies: 0,
            described_now: None,
            portals: HashMap::new(),
            columns: Vec::new(),
            column_binary: Vec::new(),
            column_types: Vec::new(),
            column_masks: Vec::new(),
            masks: None,
            rows: Vec::new(),
            row_count: 0,
            copy_in: 0,
            copy_out: 0,
            simple_index: 0,
            skipping: false,
            hold: None,
            holding: false,
            ruling: None,
            forced: None,
            copying_in: false,
        }
    }

    /// Why the rules as they are now (read again) refuse a held statement, if they do:
    /// a reload may have changed them while it waited.
    pub fn refused_now(&mut self, hold: &Hold) -> Option<Refused> {
        self.judge.refresh();
        self.judge.text(&hold.sql).1.err()
    }

    /// Reads the role's rules again if a reload changed them ([`Judge::refresh`]).
    pub fn refresh_rules(&mut self) {
        self.judge.refresh();
    }

    /// Whether a statement is waiting for its outcome (the session is not idle).
    pub fn busy(&self) -> bool {
        !self.pending.is_empty() || self.holding
    }

    /// Whether the relay must wait for the server's answers before it passes on more of
    /// the client's messages: where the role holds statements, the relay passes one
    /// Sync's (or Query's) worth at a time, so it knows what each name holds at the
    /// server (a Parse or Bind the server refused or skipped) before it judges what
    /// runs next. COPY data the server asked for goes on.
    pub fn awaiting_answers(&self) -> bool {
        self.judge.holds_any() && self.syncs_sent > self.readies && !self.copying_in
    }

    /// The statement the last message was held for, if it was: it has not gone on, and
    /// nothing after it may until [`Tracker::rule`] says what becomes of it.
    pub fn take_hold(&mut self) -> Option<Hold> {
        self.hold.take()
    }

    /// What becomes of the held statement (by its hash) when its message is passed
    /// again: it runs (`None`), or is refused.
    pub fn rule(&mut self, sha256: String, refused: Option<Refused>) {
        self.holding = false;
        self.ruling = Some((
            sha256,
            match refused {
                None => Ruling::Run,
                Some(r) => Ruling::Refuse(Box::new(r)),
            },
        ));
    }

    /// Whether a Query or Execute is held for review: the role's rules hold what it
    /// runs. A ruling on the statement held last applies to the next Query or Execute,
    /// which is that statement passed again (its hash must match, or it is refused). A
    /// message the relay cannot read, or one its rules refuse, is left to
    /// [`Tracker::client_message`].
    fn held(&mut self, t: u8, body: &[u8]) -> Option<Hold> {
        // A role that holds nothing pays nothing here.
        if self.ruling.is_none() && !self.judge.holds_any() {
            return None;
        }
        let ruling = self.ruling.take();
        let mut f = Fields::new(body);
        let found = match t {
            b'Q' => {
                // Unreadable, or refused by the rules as they are now: refused by
                // [`Tracker::client_message`], with the rule's own words.
                let Ok(sql) = f.cstr() else {
                    return None;
                };
                let (parsed, verdict) = self.judge.text(sql);
                if verdict.is_err() {
                    return None;
                }
                Some((
                    sql.to_string(),
                    Vec::new(),
                    sha256_hex(&[sql.as_bytes()]),
                    self.judge.review(&parsed),
                ))
            }
            b'E' => {
                let portal = f.cstr().ok()?;
                match self.portals.get(portal) {
                    Some(p) => {
                        let (parsed, _) = self.judge.text(&p.sql);
                        let review = self.judge.review(&parsed);
                        if review.is_some() && p.long_params {
                            self.forced = Some(Box::new(Refused {
                                hint: judge::Hint::NotRun,
                                ..Refused::plain(
                                    "review",
                                    format!(
                                        "this statement is held for review, and a parameter of it is too long to show its approvers (at most {} bytes each)",
                                        MAX_VALUE / 2
                                    ),
                                )
                            }));
                            return None;
                        }
                        let params = serde_json::to_string(&p.params).unwrap_or_default();
                        let sha = sha256_hex(&[p.sql.as_bytes(), &[0], params.as_bytes()]);
                        Some((p.sql.clone(), p.params.clone(), sha, review))
                    }
                    // A portal the relay did not see made (a cursor) could run anything:
                    // where statements are held, it is not run unseen.
                    None if self.judge.holds_any() => {
                        self.forced = Some(Box::new(Refused::plain(
                            "review",
                            "this role holds statements for review, and the relay does not know what this portal runs: bind it again",
                        )));
                        return None;
                    }
                    None => None,
                }
            }
            _ => return None,
        };
        match (ruling, found) {
            (Some((sha, ruling)), Some((_, _, found_sha, _))) if sha == found_sha => {
                if let Ruling::Refuse(r) = ruling {
                    self.forced = Some(r);
                }
                None
            }
            // The message after a ruling is not the statement ruled on: it cannot be
            // (nothing else comes first), so it is refused, never run unheld.
            (Some(_), _) => {
                self.forced = Some(Box::new(Refused::plain(
                    "review",
                    "the held statement was not the one the relay ruled on",
                )));
                None
            }
            // Approved, and no longer held by the rules (a reload): the ruling
            // stands, above. Not approved yet and held: held now.
            (None, Some((sql, params, sha256, Some(review)))) => Some(Hold {
                sql,
                params,
                review,
                sha256,
            }),
            (None, _) => None,
        }
    }

    /// A note in the transcript.
    pub fn note(&mut self, text: &str) {
        let t = self.transcript.elapsed();
        self.transcript.write(Entry::Note {
            t,
            text: text.to_string(),
        });
    }

    fn statement(&self, protocol: Protocol, sql: &str) -> Statement {
        Statement {
            t: self.transcript.elapsed(),
            protocol: Some(protocol),
            sql: cut(sql, MAX_SQL),
            ..Default::default()
        }
    }

    /// A message from the client, before it goes on to the server: what goes in its
    /// place when it is refused.
    pub fn from_client(&mut self, t: u8, body: &[u8]) -> Option<Vec<u8>> {
        if matches!(t, b'Q' | b'E')
            && let Some(h) = self.held(t, body)
        {
            self.hold = Some(h);
            self.holding = true;
            return None;
        }
        match self.client_message(t, body) {
            Ok(instead) => instead,
            // A Query, Parse, Bind or function call the relay cannot read is not
            // judged, so it does not go on; anything else is passed on for the server
            // to refuse, and the transcript records what the server said.
            Err(_) => match t {
                b'Q' | b'P' | b'B' | b'F' => {
                    // A ruling's refusal meant for this message goes with it.
                    self.forced = None;
                    let refused = Refused::plain("unparsed", "the relay cannot read this message");
                    let st = self.statement(Protocol::Simple, "(a message the relay cannot read)");
                    Some(self.refuse(st, refused, None, t))
                }
                _ => None,
            },
        }
    }

    /// Records a refusal and queues its answer: a Query's or function call's as the
    /// Query's, a Parse's or Bind's as the extended protocol's. `sql` is the text judged.
    fn refuse(&mut self, mut st: Statement, refused: Refused, sql: Option<&str>, t: u8) -> Vec<u8> {
        st.refused = Some(refused.rule.to_string());
        self.refusals.push(Refusal {
            protocol: st.protocol.unwrap_or(Protocol::Simple),
            sha256: sql.map(|s| sha256_hex(&[s.as_bytes()])),
            refused: refused.clone(),
        });
        let refused = Box::new(refused);
        let at = Instant::now();
        match t {
            b'Q' => {
                let refused = Some(refused);
                self.pending.push_back(Pending::Simple { st, at, refused });
                judge::refused_query()
            }
            b'F' => {
                let refused = Some(refused);
                self.pending
                    .push_back(Pending::Function { st, at, refused });
                judge::refused_query()
            }
            b'E' => {
                self.pending.push_back(Pending::Refused { st, refused });
                // A Bind the server rejects before it touches any portal or statement.
                judge::refused_bind("", "")
            }
            _ => {
                self.pending.push_back(Pending::Refused { st, refused });
                // (The caller's Parse or Bind in its place; for one it cannot read, a
                // Parse of the unnamed statement, which cannot succeed.)
                judge::refused_parse("")
            }
        }
    }

    /// The refusals since the last call, for the audit.
    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.refusals)
    }

    fn client_message(
        &mut self,
        t: u8,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, super::wire::WireError> {
        if matches!(t, b'Q' | b'F') {
            // Each ends in a ReadyForQuery, as a Sync does.
            self.syncs_sent += 1;
        }
        let mut f = Fields::new(body);
        match t {
            b'Q' => {
                let sql = f.cstr()?;
                let st = self.statement(Protocol::Simple, sql);
                let (_, verdict) = self.judge.text(sql);
                let verdict = match self.forced.take() {
                    Some(r) => Err(*r),
                    None => verdict,
                };
                if let Err(r) = verdict {
                    return Ok(Some(self.refuse(st, r, Some(sql), t)));
                }
                self.pending.push_back(Pending::Simple {
                    st,
                    at: Instant::now(),
                    refused: None,
                });
            }
            b'P' => {
                let name = f.cstr()?.to_string();
                let sql = f.cstr()?.to_string();
                let n = f.i16()?;
                let types = (0..n).map(|_| f.u32()).collect::<Result<_, _>>()?;
                let (parsed, mut verdict) = self.judge.text(&sql);
                // Every statement the server holds is one the relay holds too, so each
                // Bind is judged again: past the bound, none is added.
                if !name.is_empty()
                    && self.statements.len() >= MAX_NAMED
                    && !self.statements.contains_key(&name)
                {
                    verdict = Err(Refused::plain(
                        "limit",
                        format!(
                            "a session holds at most {MAX_NAMED} prepared statements: close some"
                        ),
                    ));
                }
                if let Err(r) = verdict {
                    let mut st = self.statement(Protocol::Extended, &sql);
                    st.statement = (!name.is_empty()).then(|| name.clone());
                    // The server drops its unnamed statement before it parses a new one;
                    // a named one it keeps (a Parse cannot replace it).
                    if name.is_empty() {
                        self.statements.remove("");
                    }
                    self.refuse(st, r, Some(&sql), t);
                    return Ok(Some(judge::refused_parse(&name)));
                }
                let before = self.statements.get(&name).cloned().map(Box::new);
                self.pending.push_back(Pending::Parse(name.clone(), before));
                self.remember_statement(name, sql, types, parsed);
            }
            b'B' => {
                let portal = f.cstr()?.to_string();
                let name = f.cstr()?.to_string();
                // Where statements are held, what the relay cannot name is not bound: it
                // could be one the server still has and the relay does not.
                if self.judge.holds_any() && !self.statements.contains_key(&name) {
                    let st =
                        self.statement(Protocol::Extended, "(a statement the relay does not know)");
                    let r = Refused::plain(
                        "review",
                        "this role holds statements for review, and the relay does not know this prepared statement: parse it again",
                    );
                    self.refuse(st, r, None, t);
                    return Ok(Some(judge::refused_bind(&portal, &name)));
                }
                // Judged again: the rules may have changed since its Parse. One the relay
                // has not seen does not exist at the server either (its Parse failed or
                // never came), or was made by a PREPARE statement, judged as it ran.
                // What a reload left this session unable to run includes what the
                // relay does not know (a statement a PREPARE made).
                let verdict = match self.statements.get(&name) {
                    Some(p) => self.judge.parsed(&p.parsed),
                    None => self.judge.stale().map_or(Ok(()), Err),
                };
                if let Err(r) = verdict {
                    let known = self.statements.get(&name).map(|p| p.sql.clone());
                    let shown = known
                        .clone()
                        .unwrap_or_else(|| "(a statement the relay does not know)".into());
                    let mut st = self.statement(Protocol::Extended, &shown);
                    st.statement = (!name.is_empty()).then(|| name.clone());
                    self.portals.remove(&portal);
                    self.refuse(st, r, known.as_deref(), t);
                    return Ok(Some(judge::refused_bind(&portal, &name)));
                }
                let formats: Vec<i16> = (0..f.i16()?).map(|_| f.i16()).collect::<Result<_, _>>()?;
                let n = f.i16()?;
                let (types, described) = self
                    .statements
                    .get(&name)
                    .map(|p| (p.types.clone(), p.described.clone()))
                    .unwrap_or_default();
                let mut params = Vec::with_capacity(n.max(0) as usize);
                let mut long_params = false;
                for i in 0..n {
                    let binary = match formats.len() {
                        0 => false,
                        1 => formats[0] == 1,
                        _ => formats.get(i as usize) == Some(&1),
                    };
                    let oid = types.get(i as usize).copied().unwrap_or(0);
                    let v = f.value()?;
                    long_params |= v.is_some_and(|v| v.len() > MAX_VALUE / 2);
                    params.push(v.map(|v| render(v, binary, oid)));
                }
                let results: Vec<i16> = (0..f.i16()?).map(|_| f.i16()).collect::<Result<_, _>>()?;
                let binary = results.iter().map(|&r| r == 1).collect();
                let (sql, parsed) = self
                    .statements
                    .get(&name)
                    .map(|p| (p.sql.clone(), Some(p.parsed.clone())))
                    .unwrap_or_default();
                return self.remember_portal(
                    portal,
                    Portal {
                        sql,
                        statement: (!name.is_empty()).then_some(name),
                        params,
                        binary,
                        long_params,
                        described,
                        generation: 0,
                        parsed,
                        judged_by: self.judge.version(),
                    },
                );
            }
            b'E' => {
                let portal = f.cstr()?;
                let (mut st, binary, described, generation) = match self.portals.get(portal) {
                    Some(p) => {
                        let mut st = self.statement(Protocol::Extended, &p.sql);
                        st.statement = p.statement.clone();
                        st.params = p.params.clone();
                        (st, p.binary.clone(), p.described.clone(), p.generation)
                    }
                    None => (
                        self.statement(
                            Protocol::Extended,
                            &format!("(portal {portal:?}, not seen by the relay)"),
                        ),
                        Vec::new(),
                        None,
                        u64::MAX,
                    ),
                };
                st.protocol = Some(Protocol::Extended);
                // Bound under rules a reload has changed since: judged again. One the
                // relay does not know (a cursor) runs only while the session may run
                // anything.
                let rejudged = match self.portals.get(portal) {
                    Some(Portal {
                        parsed: Some(parsed),
                        judged_by,
                        ..
                    }) if *judged_by != self.judge.version() => self.judge.parsed(parsed).err(),
                    _ => self.judge.stale(),
                };
                if let Some(r) = self.forced.take().map(|r| *r).or(rejudged) {
                    let sql = st.sql.clone();
                    return Ok(Some(self.refuse(st, r, Some(&sql), t)));
                }
                self.pending.push_back(Pending::Execute {
                    st,
                    at: Instant::now(),
                    binary,
                    described,
                    portal: (portal.to_string(), generation),
                });
            }
            b'S' => {
                self.syncs_sent += 1;
                self.pending.push_back(Pending::Sync);
            }
            b'D' => {
                let kind = f.u8()?;
                let name = f.cstr()?;
                let generation = if kind == b'S' {
                    self.statements.get(name).map(|p| p.generation)
                } else {
                    self.portals.get(name).map(|p| p.generation)
                };
                self.describing.push_back((
                    (
                        kind == b'S',
                        name.to_string(),
                        generation.unwrap_or(u64::MAX),
                    ),
                    self.syncs_sent,
                ));
            }
            b'C' => {
                let kind = f.u8()?;
                let name = f.cstr()?;
                if kind == b'S' {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
            }
            b'F' => {
                let oid = f.u32()?;
                let st = self.statement(
                    Protocol::FunctionCall,
                    &format!("(function call, oid {oid})"),
                );
                let r = Refused {
                    functions: Box::new([format!("oid {oid}")]),
                    ..Refused::plain(
                        "function call",
                        "a function call by OID (the protocol's fastpath) is refused: nothing says which function it is; call it in a statement",
                    )
                };
                return Ok(Some(self.refuse(st, r, None, t)));
            }
            b'd' => self.copy_in += body.len() as u64,
            _ => {}
        }
        Ok(None)
    }

    fn remember_statement(
        &mut self,
        name: String,
        sql: String,
        types: Vec<u32>,
        parsed: Arc<Parsed>,
    ) {
        self.statements.insert(
            name,
            Prepared {
                sql,
                types,
                described: None,
                parsed,
                generation: self.generations,
            },
        );
        self.generations += 1;
    }

    /// Remembers a Bind's portal (tentatively: [`Pending::Bind`]); past the bound the
    /// Bind is refused, as a Parse is, so the relay never forgets a portal the server
    /// could still run.
    fn remember_portal(
        &mut self,
        name: String,
        mut p: Portal,
    ) -> Result<Option<Vec<u8>>, super::wire::WireError> {
        if self.portals.len() >= MAX_NAMED && !self.portals.contains_key(&name) {
            let st = self.statement(Protocol::Extended, &p.sql);
            let r = Refused::plain(
                "limit",
                format!(
                    "a session holds at most {MAX_NAMED} portals: close some, or end the transaction"
                ),
            );
            let statement = p.statement.clone().unwrap_or_default();
            self.refuse(st, r, None, b'B');
            return Ok(Some(judge::refused_bind(&name, &statement)));
        }
        p.generation = self.generations;
        self.generations += 1;
        let before = self.portals.insert(name.clone(), p).map(Box::new);
        self.pending.push_back(Pending::Bind(name, before));
        Ok(None)
    }

    /// What a Parse or Bind the server did not take leaves: the name as it was before
    /// (`failed`: the server refused this one, rather than skipped it; an unnamed
    /// statement or portal is then gone, as the server drops it first).
    fn undo(&mut self, p: Pending, failed: bool) {
        match p {
            Pending::Parse(name, before) => match before {
                Some(b) if !(failed && name.is_empty()) => {
                    self.statements.insert(name, *b);
                }
                _ => {
                    self.statements.remove(&name);
                }
            },
            Pending::Bind(name, before) => match before {
                Some(b) if !(failed && name.is_empty()) => {
                    self.portals.insert(name, *b);
                }
                _ => {
                    self.portals.remove(&name);
                }
            },
            _ => {}
        }
    }

    /// A message from the server, before it goes on to the client: what goes in its
    /// place (the refusal, in the place of the server's rejection of what stood in for
    /// a refused statement).
    /// The role's masks, resolved for this session: applied to every result from now
    /// on, and the judge refuses what could show a masked value otherwise.
    pub fn set_masks(&mut self, masks: Arc<Masks>) {
        self.judge.set_masks(masks.clone());
        self.masks = Some(masks);
    }

    /// Each column's mask, from (name, table OID, column number).
    fn mask_plan(&self, columns: &[(String, u32, i16)]) -> Vec<Option<MaskMethod>> {
        self.masks
            .as_ref()
            .map(|m| m.plan(columns))
            .unwrap_or_default()
    }

    pub fn from_server(&mut self, t: u8, body: &[u8]) -> Option<Vec<u8>> {
        if t == b'E' {
            let refused = match self.pending.front() {
                Some(
                    Pending::Simple {
                        refused: Some(r), ..
                    }
                    | Pending::Function {
                        refused: Some(r), ..
                    }
                    | Pending::Refused { refused: r, .. },
                ) if !self.skipping => Some(r.clone()),
                _ => None,
            };
            if let Some(r) = refused {
                let instead = r.error_response();
                let _ = self.server_message(t, &instead[5..]);
                return Some(instead);
            }
        }
        if (t == b'E' || t == b'N')
            && self.masks.is_some()
            && let Some(instead) = mask::without_detail(t, body)
        {
            let _ = self.server_message(t, &instead[5..]);
            return Some(instead);
        }
        match self.server_message(t, body) {
            Ok(instead) => instead,
            // A row the relay cannot read is not passed on where it masks: an empty row.
            Err(_) if t == b'D' && self.masks.is_some() => {
                Some(super::wire::message(b'D', &0i16.to_be_bytes()))
            }
            Err(_) => None,
        }
    }

    /// Follows one server message; the message to send instead, if it must change.
    fn server_message(
        &mut self,
        t: u8,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, super::wire::WireError> {
        match t {
            // The server took the Parse or Bind: what the relay went by stands.
            b'1' => {
                if let Some(Pending::Parse(..)) = self.pending.front() {
                    self.pending.pop_front();
                }
            }
            b'2' => {
                if let Some(Pending::Bind(..)) = self.pending.front() {
                    self.pending.pop_front();
                }
            }
            b'S' => {
                let mut f = Fields::new(body);
                let (name, value) = (f.cstr()?, f.cstr()?);
                self.judge.server_parameter(name, value);
            }
            // A statement's Describe is answered ParameterDescription, then its columns.
            b't' => self.described_now = self.describing.pop_front().map(|(d, _)| d),
            // NoData answers a Describe: of a statement after its 't', else of a portal.
            b'n' if self.described_now.take().is_none() => {
                self.describing.pop_front();
            }
            b'T' if self.described_now.is_some() => {
                let mut f = Fields::new(body);
                let (mut names, mut types, mut origins) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..f.i16()? {
                    let name = f.cstr()?.to_string();
                    origins.push((name.clone(), f.u32()?, f.i16()?));
                    names.push(name);
                    types.push(f.u32()?);
                    f.take(8)?;
                }
                let plan = self.mask_plan(&origins);
                if let Some((_, name, generation)) = self.described_now.take()
                    && let Some(p) = self.statements.get_mut(&name)
                    && p.generation == generation
                {
                    p.described = Some((names, types, plan));
                }
            }
            b'T' => {
                // Read whole before anything is kept: a RowDescription the relay cannot
                // read leaves no columns, and then where the role masks nothing is shown.
                self.columns.clear();
                self.column_binary.clear();
                self.column_types.clear();
                self.column_masks.clear();
                let binary = match self.pending.front() {
                    Some(Pending::Execute { binary, .. }) => binary.clone(),
                    _ => Vec::new(),
                };
                let mut f = Fields::new(body);
                let n = f.i16()?;
                let (mut names, mut types, mut formats, mut origins) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for i in 0..n {
                    let name = f.cstr()?.to_string();
                    origins.push((name.clone(), f.u32()?, f.i16()?));
                    names.push(name);
                    types.push(f.u32()?);
                    f.take(6)?; // type size, type modifier
                    let format = f.i16()?;
                    formats.push(match binary.len() {
                        0 => format == 1,
                        1 => binary[0],
                        _ => binary.get(i as usize).copied().unwrap_or(false),
                    });
                }
                self.column_masks = self.mask_plan(&origins);
                // Not a Query's result: the answer to a portal's Describe, kept on the
                // portal it asked about.
                if !matches!(self.pending.front(), Some(Pending::Simple { .. }))
                    && let Some(((false, name, generation), _)) = self.describing.pop_front()
                    && let Some(p) = self.portals.get_mut(&name)
                    && p.generation == generation
                {
                    p.described = Some((names.clone(), types.clone(), self.column_masks.clone()));
                }
                self.columns = names;
                self.column_types = types;
                self.column_binary = formats;
            }
            b'D' => {
                self.row_count += 1;
                if self.row_count == 1 && self.columns.is_empty() {
                    // No RowDescription for this Execute: the statement's Describe said.
                    // (Looked up now: a pipelined Bind can arrive before the Describe's answer.)
                    let described = match self.pending.front() {
                        Some(Pending::Execute {
                            st,
                            binary,
                            described,
                            ..
                        }) => described
                            .clone()
                            .or_else(|| {
                                let name = st.statement.clone().unwrap_or_default();
                                self.statements.get(&name).and_then(|p| p.described.clone())
                            })
                            .map(|d| (d, binary.clone())),
                        _ => None,
                    };
                    if let Some(((names, types, plan), binary)) = described {
                        self.columns = names.clone();
                        self.column_types = types.clone();
                        self.column_masks = plan;
                        self.column_binary = (0..names.len())
                            .map(|i| match binary.len() {
                                0 => false,
                                1 => binary[0],
                                _ => binary.get(i).copied().unwrap_or(false),
                            })
                            .collect();
                    }
                }
                let masked = match &self.masks {
                    None => None,
                    Some(m) => {
                        // Masks only by a description known to be this result's: a
                        // Query's own, or the one taken for this Execute's statement or
                        // portal (of the same Parse or Bind). Without one, and for any
                        // column past it, nothing is shown.
                        let known: Option<(&[Option<MaskMethod>], &[u32])> =
                            match self.pending.front() {
                                Some(Pending::Simple { .. }) => {
                                    Some((&self.column_masks, &self.column_types))
                                }
                                Some(Pending::Execute {
                                    described, portal, ..
                                }) => described
                                    .as_ref()
                                    .or_else(|| {
                                        self.portals
                                            .get(&portal.0)
                                            .filter(|p| p.generation == portal.1)
                                            .and_then(|p| p.described.as_ref())
                                    })
                                    .map(|(_, types, plan)| (plan.as_slice(), types.as_slice())),
                                _ => None,
                            };
                        let n = Fields::new(body).i16()?.max(0) as usize;
                        let (plan, types) = known.unwrap_or((&[], &[]));
                        if plan.len() < n || plan.iter().any(Option::is_some) {
                            Some(m.data_row(plan, types, body)?)
                        } else {
                            None
                        }
                    }
                };
                let body = masked.as_ref().map_or(body, |m| &m[5..]);
                if self.rows.len() < self.rows_cap {
                    let mut f = Fields::new(body);
                    let n = f.i16()?;
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for i in 0..n {
                        let binary = self.column_binary.get(i as usize).copied().unwrap_or(false);
                        let oid = self.column_types.get(i as usize).copied().unwrap_or(0);
                        row.push(f.value()?.map(|v| render(v, binary, oid)));
                    }
                    self.rows.push(row);
                }
                return Ok(masked);
            }
            b'd' => self.copy_out += body.len() as u64,
            b'C' => {
                let tag = Fields::new(body).cstr()?.to_string();
                self.complete(Some(tag), None, false);
            }
            b'I' => self.complete(None, None, false),
            b's' => self.complete(None, None, true),
            b'E' => {
                let (severity, code, message) = error_fields(body);
                let error = StatementError {
                    severity,
                    code,
                    message: cut(&message, MAX_VALUE * 4),
                };
                // A Bind refused: its portal is as it was; the error is recorded with
                // what the Bind was for (the Execute after it), as before.
                let mut bind_failed = false;
                if let Some(Pending::Bind(..)) = self.pending.front()
                    && let Some(b) = self.pending.pop_front()
                {
                    self.undo(b, true);
                    bind_failed = true;
                }
                let extended = bind_failed
                    || matches!(
                        self.pending.front(),
                        Some(
                            Pending::Execute { .. } | Pending::Parse(..) | Pending::Refused { .. }
                        )
                    );
                self.complete(None, Some(error), false);
                if extended {
                    self.skipping = true;
                }
            }
            b'G' => self.copying_in = true,
            b'Z' => {
                self.copying_in = false;
                // Out of any transaction, the server holds no portals: the relay
                // forgets them too, but for those of Binds still on their way.
                if body.first() == Some(&b'I') {
                    let coming: std::collections::HashSet<String> = self
                        .pending
                        .iter()
                        .filter_map(|p| match p {
                            Pending::Bind(name, _) => Some(name.clone()),
                            _ => None,
                        })
                        .collect();
                    self.portals.retain(|name, _| coming.contains(name));
                    for p in self.pending.iter_mut() {
                        if let Pending::Bind(_, before) = p {
                            *before = None;
                        }
                    }
                }
                self.ready()
            }
            b'A' => {
                let mut f = Fields::new(body);
                let _pid = f.i32()?;
                let channel = f.cstr()?.to_string();
                let payload = cut(f.cstr()?, MAX_VALUE);
                let t = self.transcript.elapsed();
                self.transcript.write(Entry::Notification {
                    t,
                    channel,
                    payload,
                });
            }
            _ => {}
        }
        Ok(None)
    }

    /// The front statement's outcome (for a Query, one of its statements').
    fn complete(&mut self, tag: Option<String>, error: Option<StatementError>, suspended: bool) {
        if self.skipping {
            // An error before Sync: the server skips the rest, so the queue does.
            self.skip_to_sync();
        }
        let (mut st, at, pop) = match self.pending.front() {
            Some(Pending::Simple { st, at, .. }) => {
                let mut st = st.clone();
                st.index = self.simple_index;
                self.simple_index += 1;
                (st, *at, false)
            }
            Some(Pending::Execute { st, at, .. }) | Some(Pending::Function { st, at, .. }) => {
                (st.clone(), *at, true)
            }
            Some(Pending::Refused { st, .. }) => (st.clone(), Instant::now(), true),
            // A Parse that failed at the server (a table that does not exist…).
            Some(Pending::Parse(name, _)) => {
                let sql = self.statements.get(name).map(|p| p.sql.as_str());
                let mut st = self.statement(Protocol::Extended, sql.unwrap_or_default());
                st.statement = (!name.is_empty()).then(|| name.clone());
                (st, Instant::now(), true)
            }
            // A Sync's own error (say, a failed COMMIT at Sync) or nothing asked.
            Some(Pending::Sync | Pending::Bind(..)) | None => {
                if let Some(error) = error {
                    let mut st = self.statement(Protocol::Extended, "(at Sync)");
                    st.error = Some(error);
                    self.transcript.write(Entry::Statement(Box::new(st)));
                }
                self.reset_result();
                return;
            }
        };
        if pop && let Some(p) = self.pending.pop_front() {
            // A Parse the server refused: the name is as the server left it.
            self.undo(p, true);
        }
        st.ms = at.elapsed().as_secs_f64() * 1000.0;
        st.columns = std::mem::take(&mut self.columns);
        st.rows = std::mem::take(&mut self.rows);
        st.row_count = self.row_count;
        st.tag = tag;
        st.error = error;
        st.suspended = suspended;
        st.copy_bytes_in = self.copy_in;
        st.copy_bytes_out = self.copy_out;
        self.transcript.write(Entry::Statement(Box::new(st)));
        self.reset_result();
    }

    fn reset_result(&mut self) {
        self.columns.clear();
        self.column_binary.clear();
        self.column_types.clear();
        self.column_masks.clear();
        self.rows.clear();
        self.row_count = 0;
        self.copy_in = 0;
        self.copy_out = 0;
    }

    /// Everything before the next Sync was skipped by the server: recorded as such.
    fn skip_to_sync(&mut self) {
        while let Some(
            Pending::Execute { .. }
            | Pending::Function { .. }
            | Pending::Parse(..)
            | Pending::Bind(..)
            | Pending::Refused { .. },
        ) = self.pending.front()
        {
            match self.pending.pop_front() {
                Some(
                    Pending::Execute { mut st, .. }
                    | Pending::Function { mut st, .. }
                    | Pending::Refused { mut st, .. },
                ) => {
                    st.skipped = true;
                    self.transcript.write(Entry::Statement(Box::new(st)));
                }
                // Skipped: the server never made it; the name is as it was.
                Some(p @ (Pending::Parse(..) | Pending::Bind(..))) => self.undo(p, false),
                _ => {}
            }
        }
    }

    /// ReadyForQuery: the Query (or everything up to the Sync) is done.
    fn ready(&mut self) {
        if self.skipping {
            self.skip_to_sync();
            self.skipping = false;
        }
        match self.pending.pop_front() {
            Some(
                Pending::Simple { .. } | Pending::Sync | Pending::Parse(..) | Pending::Bind(..),
            )
            | None => {}
            Some(
                Pending::Execute { st, .. }
                | Pending::Function { st, .. }
                | Pending::Refused { st, .. },
            ) => {
                // Outcome lost (should not happen): recorded without one.
                self.transcript.write(Entry::Statement(Box::new(st)));
                if let Some(Pending::Sync) = self.pending.front() {
                    self.pending.pop_front();
                }
            }
        }
        self.simple_index = 0;
        // Describes of this Sync's (or Query's) cycle that were never answered (skipped
        // after an error) are dropped; later cycles' stay.
        self.readies += 1;
        let done = self.readies;
        self.describing.retain(|(_, cycle)| *cycle >= done);
        self.described_now = None;
        self.reset_result();
        self.transcript.flush_if_due();
    }
}

/// A value as text: text format as is; binary format as its type's text where the
/// type is a common one (`oid`: bool, integers, floats, text, uuid); anything else as
/// `\x` and hex. Cut at [`MAX_VALUE`].
fn render(v: &[u8], binary: bool, oid: u32) -> String {
    if !binary && let Ok(s) = std::str::from_utf8(v) {
        return cut(s, MAX_VALUE);
    }
    if binary && let Some(s) = binary_as_text(v, oid) {
        return cut(&s, MAX_VALUE);
    }
    let shown = &v[..v.len().min(MAX_VALUE / 2)];
    let mut s = format!("\\x{}", hex::encode(shown));
    if shown.len() < v.len() {
        s.push('…');
    }
    s
}

/// The text of a binary value of a common type, as PostgreSQL would print it.
fn binary_as_text(v: &[u8], oid: u32) -> Option<String> {
    Some(match (oid, v.len()) {
        (16, 1) => if v[0] == 0 { "f" } else { "t" }.to_string(),
        (21, 2) => i16::from_be_bytes(v.try_into().ok()?).to_string(),
        (23, 4) | (26, 4) => i32::from_be_bytes(v.try_into().ok()?).to_string(),
        (20, 8) => i64::from_be_bytes(v.try_into().ok()?).to_string(),
        (700, 4) => f32::from_be_bytes(v.try_into().ok()?).to_string(),
        (701, 8) => f64::from_be_bytes(v.try_into().ok()?).to_string(),
        // text, varchar, bpchar, name, json: their binary form is their text.
        (25 | 1043 | 1042 | 19 | 114, _) => std::str::from_utf8(v).ok()?.to_string(),
        (2950, 16) => {
            let h = hex::encode(v);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        _ => return None,
    })
}

/// SHA-256 (hex) of the parts, in order.
fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::super::wire::message;
    use super::*;
    use crate::recording::transcript::{self, Header};

    fn tracker(dir: &std::path::Path) -> Tracker {
        let h = Header {
            format: transcript::FORMAT.into(),
            version: 1,
            timestamp: 0,
            session: "s".into(),
            resource: "db".into(),
            user: "u".into(),
            database: "d".into(),
            rows_cap: 2,
        };
        let policy = crate::config::SqlPolicy {
            require_where: false,
            ..Default::default()
        };
        let judge = Judge::new(Arc::new(policy), Arc::default());
        Tracker::new(Transcript::create(dir, &h, 1 << 20).unwrap(), 2, judge)
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn row_description(cols: &[&str]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            b.extend(cstr(c));
            b.extend([0u8; 18]);
            b.extend(0i16.to_be_bytes());
        }
        b
    }

    fn data_row(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                Some(s) => {
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
                None => b.extend((-1i32).to_be_bytes()),
            }
        }
        b
    }

    fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(cstr(stmt));
        b.extend(0i16.to_be_bytes());
        b.extend((params.len() as i16).to_be_bytes());
        for p in params {
            b.extend((p.len() as i32).to_be_bytes());
            b.extend(p.as_bytes());
        }
        b.extend(0i16.to_be_bytes());
        b
    }

    fn statements(t: &mut Tracker) -> Vec<Statement> {
        let done = t.transcript.finish().unwrap();
        let (_, entries) = transcript::read(std::path::Path::new(&done.path)).unwrap();
        entries
            .into_iter()
            .filter_map(|e| match e {
                Entry::Statement(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_query_of_two_statements_is_two_entries_with_rows_capped() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        t.from_client(b'Q', &cstr("select x from t; delete from t"));
        t.from_server(b'T', &row_description(&["x"]));
        for v in ["1", "2", "3"] {
            t.from_server(b'D', &data_row(&[Some(v)]));
        }
        t.from_server(b'C', &cstr("SELECT 3"));
        t.from_server(b'C', &cstr("DELETE 3"));
        assert!(t.busy());
        t.from_server(b'Z', b"I");
        assert!(!t.busy());
        let s = statements(&mut t);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].index, s[1].index), (0, 1));
        assert_eq!(s[0].columns, ["x"]);
        assert_eq!(
            s[0].rows,
            [[Some("1".to_string())], [Some("2".to_string())]]
        );
        assert_eq!(s[0].row_count, 3);
        assert_eq!(s[0].tag.as_deref(), Some("SELECT 3"));
        assert_eq!(s[1].tag.as_deref(), Some("DELETE 3"));
        assert!(s[1].rows.is_empty());
    }

    #[test]
    fn a_pipeline_records_each_execute_and_what_an_error_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        let mut parse = cstr("s1");
        parse.extend(cstr("select $1::int"));
        parse.extend(1i16.to_be_bytes());
        parse.extend(23u32.to_be_bytes());
        t.from_client(b'P', &parse);
        t.from_client(b'B', &bind("", "s1", &["7"]));
        t.from_client(b'E', &[0, 0, 0, 0, 0]);
        t.from_client(b'B', &bind("", "s1", &["oops"]));
        t.from_client(b'E', &[0, 0, 0, 0, 0]);
        t.from_client(b'B', &bind("", "s1", &["9"]));
        t.from_client(b'E', &[0, 0, 0, 0, 0]);
        t.from_client(b'S', b"");
        t.from_client(b'B', &bind("", "s1", &["10"]));
        t.from_client(b'E', &[0, 0, 0, 0, 0]);
        t.from_client(b'S', b"");
        // Server: 1 ParseComplete, BindComplete, row, complete; then an error, skip, Z.
        t.from_server(b'1', b"");
        t.from_server(b'2', b"");
        t.from_server(b'D', &data_row(&[Some("7")]));
        t.from_server(b'C', &cstr("SELECT 1"));
        t.from_server(b'2', b"");
        t.from_server(
            b'E',
            &message(b'E', b"SERROR\0C22P02\0Minvalid input syntax\0\0")[5..],
        );
        t.from_server(b'Z', b"I");
        t.from_server(b'2', b"");
        t.from_server(b'D', &data_row(&[Some("10")]));
        t.from_server(b'C', &cstr("SELECT 1"));
        t.from_server(b'Z', b"I");
        assert!(!t.busy());
        let s = statements(&mut t);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].params, [Some("7".to_string())]);
        assert_eq!(s[0].sql, "select $1::int");
        assert_eq!(s[0].statement.as_deref(), Some("s1"));
        assert_eq!(s[1].error.as_ref().map(|e| e.code.as_str()), Some("22P02"));
        assert_eq!(s[1].params, [Some("oops".to_string())]);
        assert!(s[2].skipped && s[2].params == [Some("9".to_string())]);
        assert_eq!(s[3].rows, [[Some("10".to_string())]]);
    }

    #[test]
    fn binary_results_are_read_with_the_types_a_describe_gave() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        let mut parse = cstr("s1");
        parse.extend(cstr("select $1::int"));
        parse.extend(1i16.to_be_bytes());
        parse.extend(23u32.to_be_bytes());
        t.from_client(b'P', &parse);
        let mut describe = vec![b'S'];
        describe.extend(cstr("s1"));
        t.from_client(b'D', &describe);
        t.from_client(b'S', b"");
        // Pipelined: the Bind and Execute go before the Describe is answered.
        let mut b = cstr("");
        b.extend(cstr("s1"));
        b.extend(1i16.to_be_bytes());
        b.extend(1i16.to_be_bytes());
        b.extend(1i16.to_be_bytes());
        b.extend(4i32.to_be_bytes());
        b.extend(7i32.to_be_bytes());
        b.extend(1i16.to_be_bytes());
        b.extend(1i16.to_be_bytes());
        t.from_client(b'B', &b);
        t.from_client(b'E', &[0, 0, 0, 0, 0]);
        t.from_client(b'S', b"");
        t.from_server(b'1', b"");
        t.from_server(b't', &[0, 1, 0, 0, 0, 23]);
        let mut rd = 1i16.to_be_bytes().to_vec();
        rd.extend(cstr("int4"));
        rd.extend([0u8; 6]);
        rd.extend(23u32.to_be_bytes());
        rd.extend([0u8; 8]);
        t.from_server(b'T', &rd);
        t.from_server(b'Z', b"I");
        t.from_server(b'2', b"");
        let mut row = 1i16.to_be_bytes().to_vec();
        row.extend(4i32.to_be_bytes());
        row.extend(8i32.to_be_bytes());
        t.from_server(b'D', &row);
        t.from_server(b'C', &cstr("SELECT 1"));
        t.from_server(b'Z', b"I");
        let s = statements(&mut t);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].params, [Some("7".to_string())]);
        assert_eq!(s[0].columns, ["int4"]);
        assert_eq!(s[0].rows, [[Some("8".to_string())]]);
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(sql));
        b.extend(0i16.to_be_bytes());
        b
    }

    /// What the server says to the text that took a refused statement's place.
    fn syntax_error() -> Vec<u8> {
        message(
            b'E',
            b"SERROR\0C42601\0Msyntax error at or near \"twokey\"\0\0",
        )[5..]
            .to_vec()
    }

    fn code_of(m: &[u8]) -> String {
        error_fields(&m[5..]).1
    }

    #[test]
    fn a_refused_query_goes_on_as_one_the_server_rejects_and_its_rejection_comes_back_as_the_refusal()
     {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        assert_eq!(t.from_client(b'Q', &cstr("select 1")), None);
        t.from_server(b'C', &cstr("SELECT 1"));
        t.from_server(b'Z', b"I");
        let instead = t.from_client(b'Q', &cstr("select 1; SET ROLE postgres"));
        assert_eq!(instead, Some(judge::refused_query()));
        let refusals = t.take_refusals();
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0].refused.rule, "role escape");
        assert_eq!(refusals[0].refused.kinds, ["SELECT", "SET"]);
        assert!(refusals[0].sha256.as_ref().is_some_and(|h| h.len() == 64));
        let told = t.from_server(b'E', &syntax_error()).unwrap();
        assert_eq!(code_of(&told), "42501");
        assert_eq!(
            t.from_server(b'Z', b"E"),
            None,
            "the transaction state is the server's"
        );
        // A function call by OID: refused, answered the same way.
        assert_eq!(
            t.from_client(b'F', &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0]),
            Some(judge::refused_query())
        );
        assert_eq!(
            code_of(&t.from_server(b'E', &syntax_error()).unwrap()),
            "42501"
        );
        t.from_server(b'Z', b"I");
        // The server's own errors pass as they are.
        assert_eq!(t.from_client(b'Q', &cstr("select nope")), None);
        assert_eq!(t.from_server(b'E', &syntax_error()), None);
        t.from_server(b'Z', b"I");
        assert!(!t.busy());
        let s = statements(&mut t);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[1].refused.as_deref(), Some("role escape"));
        assert_eq!(s[1].error.as_ref().unwrap().code, "42501");
        assert_eq!(s[2].refused.as_deref(), Some("function call"));
        assert_eq!(s[3].refused, None);
    }

    #[test]
    fn a_refused_parse_in_a_pipeline_is_told_where_the_server_fails_and_the_rest_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        assert_eq!(t.from_client(b'P', &parse("s1", "select 1")), None);
        assert_eq!(t.from_client(b'B', &bind("", "s1", &[])), None);
        assert_eq!(t.from_client(b'E', &[0, 0, 0, 0, 0]), None);
        let instead = t.from_client(b'P', &parse("s2", "reset role"));
        assert_eq!(instead, Some(judge::refused_parse("s2")));
        // Its Bind names a statement the server will not have: passed on, skipped there.
        assert_eq!(t.from_client(b'B', &bind("", "s2", &[])), None);
        assert_eq!(t.from_client(b'E', &[0, 0, 0, 0, 0]), None);
        assert_eq!(t.from_client(b'S', b""), None);
        for (typ, body) in [(b'1', vec![]), (b'2', vec![]), (b'C', cstr("SELECT 1"))] {
            assert_eq!(t.from_server(typ, &body), None);
        }
        assert_eq!(
            code_of(&t.from_server(b'E', &syntax_error()).unwrap()),
            "42501"
        );
        assert_eq!(t.from_server(b'Z', b"I"), None);
        assert!(!t.busy());
        // s1 is judged again at each Bind, and still passes.
        assert_eq!(t.from_client(b'B', &bind("", "s1", &[])), None);
        let s = statements(&mut t);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].tag.as_deref(), Some("SELECT 1"));
        assert_eq!(
            (s[1].refused.as_deref(), s[1].sql.as_str()),
            (Some("role escape"), "reset role")
        );
        assert_eq!(s[1].statement.as_deref(), Some("s2"));
        assert!(s[2].skipped);
    }

    /// A tracker whose role holds DELETE for review.
    fn reviewing(dir: &std::path::Path) -> Tracker {
        let mut t = tracker(dir);
        t.judge = Judge::new(
            Arc::new(crate::config::SqlPolicy {
                review: vec!["DELETE".into()],
                ..Default::default()
            }),
            Arc::default(),
        );
        t
    }

    const EXECUTE: &[u8] = &[0, 0, 0, 0, 0];

    #[test]
    fn a_held_statement_waits_and_then_runs_or_is_refused_as_ruled() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = reviewing(dir.path());
        let q = cstr("delete from t where id = 1");
        assert_eq!(t.from_client(b'Q', &q), None);
        let h = t.take_hold().expect("held");
        assert_eq!(h.review.kinds, ["DELETE"]);
        assert!(
            t.busy(),
            "a held statement keeps the session busy (no idle cut)"
        );
        assert!(t.pending.is_empty(), "nothing went on");
        // Passed again before a ruling: held again.
        assert_eq!(t.from_client(b'Q', &q), None);
        assert!(t.take_hold().is_some());
        // Approved: passed again, it goes on as it was.
        t.rule(h.sha256.clone(), None);
        assert_eq!(t.from_client(b'Q', &q), None);
        assert!(t.take_hold().is_none());
        assert_eq!(t.pending.len(), 1);
        // The ruling was used: the same text again is held again.
        assert_eq!(t.from_client(b'Q', &q), None);
        let h = t.take_hold().expect("held again");
        // Denied: refused in its place.
        t.rule(
            h.sha256.clone(),
            Some(Refused::plain("review", "denied by bob")),
        );
        assert_eq!(t.from_client(b'Q', &q), Some(judge::refused_query()));
        // A ruling meets a message that is not the statement ruled on: refused.
        assert_eq!(t.from_client(b'Q', &q), None);
        let h = t.take_hold().unwrap();
        t.rule(h.sha256, None);
        assert_eq!(
            t.from_client(b'Q', &cstr("delete from t where id = 2")),
            Some(judge::refused_query())
        );
        let r = t.take_refusals();
        assert_eq!(
            r.last().unwrap().refused.message.as_ref(),
            "the held statement was not the one the relay ruled on"
        );
    }

    use crate::config::SqlPolicy;

    /// A change of the role's rules.
    type Edit<'a> = &'a dyn Fn(&mut SqlPolicy);

    /// A tracker whose judge follows `demo-db/read` in the demo's configuration, and
    /// the sender that reloads it with `f`'s change.
    fn following(
        dir: &std::path::Path,
        f: impl Fn(&mut crate::config::SqlPolicy),
    ) -> (Tracker, impl Fn(Edit<'_>)) {
        let mut config = crate::config::Config::parse(
            &crate::config::demo_config_toml("127.0.0.1:0", dir),
            "demo",
        )
        .unwrap();
        let edit = move |c: &mut crate::config::Config,
                         f: &dyn Fn(&mut crate::config::SqlPolicy)| {
            let db = c
                .resources
                .iter_mut()
                .find(|r| r.name == "demo-db")
                .unwrap();
            f(&mut db.roles.iter_mut().find(|r| r.name == "read").unwrap().sql);
        };
        edit(&mut config, &f);
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(config.clone()));
        let policy = config.role("demo-db", "read").unwrap().1.sql.clone();
        let mut t = tracker(dir);
        t.judge = Judge::following(Arc::new(policy), rx, "demo-db", "read", Arc::default());
        let reload = move |g: &dyn Fn(&mut crate::config::SqlPolicy)| {
            let mut c = (**tx.borrow()).clone();
            edit(&mut c, g);
            tx.send_replace(Arc::new(c));
        };
        (t, reload)
    }

    #[test]
    fn a_portal_bound_before_a_reload_is_judged_again_at_its_execute() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, reload) = following(dir.path(), |_| {});
        t.refresh_rules();
        assert_eq!(
            t.from_client(b'P', &parse("d", "delete from t where id = 1")),
            None
        );
        t.from_server(b'1', b"");
        assert_eq!(t.from_client(b'B', &bind("p", "d", &[])), None);
        t.from_server(b'2', b"");
        reload(&|p| p.deny.push("DELETE".into()));
        t.refresh_rules();
        assert_eq!(
            t.from_client(b'E', &cstr("p")),
            Some(judge::refused_bind("", ""))
        );
        assert_eq!(t.take_refusals().last().unwrap().refused.rule, "deny");
        // Bound again: refused at the Bind.
        assert_eq!(
            t.from_client(b'B', &bind("q", "d", &[])),
            Some(judge::refused_bind("q", "d"))
        );
        // A portal bound under the rules as they are is not judged twice.
        reload(&|p| p.deny.clear());
        t.refresh_rules();
        assert_eq!(t.from_client(b'B', &bind("r", "d", &[])), None);
        assert_eq!(t.from_client(b'E', &cstr("r")), None);
        assert!(
            t.take_refusals().len() == 1,
            "only the Bind of q was refused since"
        );
    }

    #[test]
    fn after_a_reload_a_session_that_made_a_prepared_statement_or_changed_its_set_up_runs_nothing()
    {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, reload) = following(dir.path(), |_| {});
        let prepare = cstr("prepare p as delete from t where id = $1");
        assert_eq!(t.from_client(b'Q', &prepare), None);
        // A change that does not touch this role's rules changes nothing.
        reload(&|_| {});
        t.refresh_rules();
        assert_eq!(t.from_client(b'Q', &cstr("select 1")), None);
        reload(&|p| p.deny.push("DELETE".into()));
        t.refresh_rules();
        for (m, body) in [
            (b'Q', cstr("execute p(1)")),
            (b'Q', cstr("select 1")),
            (b'B', bind("", "p", &["1"])),
            (b'E', cstr("some_cursor")),
        ] {
            assert!(t.from_client(m, &body).is_some(), "{}", m as char);
        }
        let r = t.take_refusals();
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|r| r.refused.rule == "policy"));
        assert!(r[0].refused.message.contains("prepared statement, cursor"));

        // A session whose masks changed runs nothing until the reload's cut lands.
        let dir = tempfile::tempdir().unwrap();
        let (mut t, reload) = following(dir.path(), |_| {});
        reload(&|p| {
            p.mask = vec![crate::config::MaskRule {
                column: Some("people.ssn".into()),
                name: None,
                method: crate::config::MaskMethod::Full,
            }]
        });
        t.refresh_rules();
        assert_eq!(
            t.from_client(b'Q', &cstr("select ssn from people")),
            Some(judge::refused_query())
        );
        assert!(t.take_refusals()[0].refused.message.contains("masks"));
    }

    #[test]
    fn a_reload_that_denies_an_approved_statement_refuses_it_by_its_rule_and_one_that_stops_holding_it_lets_the_approval_stand()
     {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, reload) = following(dir.path(), |p| p.review = vec!["DELETE".into()]);
        let q = cstr("delete from t where id = 1");
        assert_eq!(t.from_client(b'Q', &q), None);
        let h = t.take_hold().expect("held");
        t.rule(h.sha256, None);
        reload(&|p| p.deny.push("DELETE".into()));
        t.refresh_rules();
        assert_eq!(t.from_client(b'Q', &q), Some(judge::refused_query()));
        assert_eq!(t.take_refusals().last().unwrap().refused.rule, "deny");

        reload(&|p| p.deny.clear());
        t.refresh_rules();
        assert_eq!(t.from_client(b'Q', &q), None);
        let h = t.take_hold().expect("held again");
        t.rule(h.sha256, None);
        reload(&|p| p.review.clear());
        t.refresh_rules();
        assert_eq!(
            t.from_client(b'Q', &q),
            None,
            "approved, and allowed: it runs"
        );
        assert!(t.take_hold().is_none());
        assert!(t.take_refusals().is_empty());
    }

    #[test]
    fn an_execute_is_held_even_right_after_an_error_before_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = reviewing(dir.path());
        // select 1/0 with no Sync: the server's error sets the relay skipping.
        t.from_client(b'P', &parse("", "select 1/0"));
        t.from_client(b'B', &bind("", "", &[]));
        t.from_client(b'E', EXECUTE);
        t.from_server(b'1', b"");
        t.from_server(b'2', b"");
        t.from_server(b'E', &syntax_error());
        assert!(t.skipping);
        // In one write: Sync (the server leaves its error state there), then a DELETE.
        t.from_client(b'S', b"");
        t.from_client(b'P', &parse("d", "delete from t where id = 1"));
        t.from_client(b'B', &bind("", "d", &[]));
        assert_eq!(t.from_client(b'E', EXECUTE), None);
        assert!(t.take_hold().is_some(), "held, skipping or not");
    }

    #[test]
    fn a_parse_or_bind_the_server_refuses_leaves_the_name_as_the_server_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = reviewing(dir.path());
        t.from_client(b'P', &parse("d", "delete from t where id = 1"));
        t.from_client(b'S', b"");
        t.from_server(b'1', b"");
        t.from_server(b'Z', b"I");
        // A second Parse of the name: the server refuses it ("already exists").
        t.from_client(b'P', &parse("d", "select 1"));
        t.from_client(b'S', b"");
        t.from_server(b'E', &syntax_error());
        t.from_server(b'Z', b"I");
        assert_eq!(t.statements["d"].sql, "delete from t where id = 1");
        t.from_client(b'B', &bind("", "d", &[]));
        assert_eq!(t.from_client(b'E', EXECUTE), None);
        assert!(t.take_hold().is_some(), "the server runs the DELETE: held");
        // A named portal bound to the DELETE, then a Bind of the same name that the
        // server refuses (the portal exists): the relay still knows it as the DELETE.
        t.rule(String::new(), Some(Refused::plain("review", "x")));
        t.from_client(b'E', EXECUTE);
        t.from_client(b'S', b"");
        t.from_server(b'2', b"");
        assert_eq!(
            code_of(&t.from_server(b'E', &syntax_error()).unwrap()),
            "42501"
        );
        t.from_server(b'Z', b"I");
        t.from_client(b'B', &bind("p", "d", &[]));
        t.from_client(b'S', b"");
        t.from_server(b'2', b"");
        t.from_server(b'Z', b"T");
        t.from_client(b'P', &parse("s", "select 1"));
        t.from_client(b'B', &bind("p", "s", &[]));
        t.from_client(b'S', b"");
        t.from_server(b'1', b"");
        t.from_server(b'E', &syntax_error());
        t.from_server(b'Z', b"E");
        assert_eq!(t.portals["p"].sql, "delete from t where id = 1");
        // And a Bind the server skips (after an error) leaves it as it was too.
        t.from_client(b'P', &parse("", "select 1/0"));
        t.from_client(b'B', &bind("", "", &[]));
        t.from_client(b'E', EXECUTE);
        t.from_client(b'B', &bind("p", "s", &[]));
        t.from_client(b'S', b"");
        t.from_server(b'1', b"");
        t.from_server(b'2', b"");
        t.from_server(b'E', &syntax_error());
        t.from_server(b'Z', b"E");
        assert_eq!(t.portals["p"].sql, "delete from t where id = 1");
        let mut e = cstr("p");
        e.extend(0i32.to_be_bytes());
        assert_eq!(t.from_client(b'E', &e), None);
        assert!(t.take_hold().is_some());
    }

    #[test]
    fn where_statements_are_held_an_unknown_portal_or_a_long_parameter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = reviewing(dir.path());
        let mut e = cstr("cursor_made_by_declare");
        e.extend(0i32.to_be_bytes());
        assert_eq!(t.from_client(b'E', &e), Some(judge::refused_bind("", "")));
        t.from_client(b'P', &parse("d", "delete from t where id = $1"));
        let long = "9".repeat(MAX_VALUE);
        t.from_client(b'B', &bind("", "d", &[&long]));
        assert_eq!(
            t.from_client(b'E', EXECUTE),
            Some(judge::refused_bind("", ""))
        );
        assert!(t.take_hold().is_none());
        // Without review rules, the unknown portal goes on (the server says what it is).
        let other = tempfile::tempdir().unwrap();
        let mut plain = tracker(other.path());
        assert_eq!(plain.from_client(b'E', &e), None);
    }

    #[test]
    fn where_statements_are_held_the_relay_passes_one_sync_at_a_time_and_binds_only_what_it_knows()
    {
        let dir = tempfile::tempdir().unwrap();
        let mut t = reviewing(dir.path());
        assert!(!t.awaiting_answers());
        t.from_client(b'P', &parse("d", "delete from t where id = 1"));
        assert!(
            !t.awaiting_answers(),
            "within a Sync's worth, messages go on"
        );
        t.from_client(b'S', b"");
        assert!(
            t.awaiting_answers(),
            "the next waits for the server's answers"
        );
        t.from_server(b'1', b"");
        t.from_server(b'Z', b"I");
        assert!(!t.awaiting_answers());
        // COPY data the server asked for goes on.
        t.from_client(b'Q', &cstr("copy t from stdin"));
        assert!(t.awaiting_answers());
        t.from_server(b'G', &[0, 0, 0]);
        assert!(!t.awaiting_answers());
        t.from_server(b'C', &cstr("COPY 0"));
        t.from_server(b'Z', b"I");
        // A statement the relay does not know is not bound.
        assert_eq!(
            t.from_client(b'B', &bind("", "made_elsewhere", &[])),
            Some(judge::refused_bind("", "made_elsewhere"))
        );
        t.from_client(b'S', b"");
        assert_eq!(
            code_of(&t.from_server(b'E', &syntax_error()).unwrap()),
            "42501"
        );
        t.from_server(b'Z', b"I");
        // Out of a transaction, the server holds no portals, nor does the relay.
        t.from_client(b'B', &bind("p", "d", &[]));
        t.from_client(b'S', b"");
        t.from_server(b'2', b"");
        t.from_server(b'Z', b"I");
        assert!(!t.portals.contains_key("p"));
        // A role that holds nothing is pipelined as before.
        let other = tempfile::tempdir().unwrap();
        let mut plain = tracker(other.path());
        plain.from_client(b'S', b"");
        assert!(!plain.awaiting_answers());
    }

    #[test]
    fn past_the_bound_a_new_portal_is_refused_never_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = reviewing(dir.path());
        t.from_client(b'P', &parse("d", "delete from t where id = 1"));
        t.from_client(b'B', &bind("p0", "d", &[]));
        for i in 1..MAX_NAMED {
            t.from_client(b'B', &bind(&format!("p{i}"), "d", &[]));
        }
        let instead = t.from_client(b'B', &bind("one-too-many", "d", &[]));
        assert_eq!(instead, Some(judge::refused_bind("one-too-many", "d")));
        let mut e = cstr("p0");
        e.extend(0i32.to_be_bytes());
        assert_eq!(t.from_client(b'E', &e), None);
        assert!(t.take_hold().is_some(), "p0 is still known, and held");
    }

    #[test]
    fn a_bind_is_judged_against_the_rules_as_they_are_then() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        t.from_client(b'P', &parse("d", "delete from t"));
        t.from_server(b'1', b"");
        // The rules change (require_where now): the next Bind of it is refused.
        t.judge = Judge::new(
            Arc::new(crate::config::SqlPolicy::default()),
            Arc::default(),
        );
        let instead = t.from_client(b'B', &bind("p", "d", &[]));
        assert_eq!(instead, Some(judge::refused_bind("p", "d")));
        t.from_client(b'E', &cstr("p"));
        t.from_client(b'S', b"");
        let bad = message(
            b'E',
            b"SERROR\0C08P01\0Mbind message has 2 parameter formats but 1 parameters\0\0",
        );
        assert_eq!(code_of(&t.from_server(b'E', &bad[5..]).unwrap()), "42501");
        t.from_server(b'Z', b"I");
        let s = statements(&mut t);
        assert_eq!(s[0].refused.as_deref(), Some("require_where"));
        assert!(s[1].skipped);
    }

    #[test]
    fn past_the_bound_a_new_prepared_statement_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        for i in 0..MAX_NAMED {
            assert_eq!(
                t.from_client(b'P', &parse(&format!("s{i}"), "select 1")),
                None
            );
        }
        assert_eq!(
            t.from_client(b'P', &parse("s0", "select 2")),
            None,
            "a name held is replaced"
        );
        assert_eq!(
            t.from_client(b'P', &parse("", "select 2")),
            None,
            "the unnamed one is not counted"
        );
        assert!(
            t.from_client(b'P', &parse("one more", "select 1"))
                .is_some()
        );
        assert_eq!(t.take_refusals().last().unwrap().refused.rule, "limit");
    }

    #[test]
    fn garbage_is_passed_over_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        for typ in [b'Q', b'P', b'B', b'E', b'C', b'F', b'T', b'D', b'A'] {
            for body in [
                &b""[..],
                b"\xff\xff\xff",
                b"\x00\x05abc",
                b"\x7f\xff\x00\x00\x00\x01",
            ] {
                t.from_client(typ, body);
                t.from_server(typ, body);
            }
        }
        t.from_server(b'Z', b"I");
        let _ = statements(&mut t);
    }

    #[test]
    fn binary_and_long_values_are_shown_safely() {
        assert_eq!(render(b"\x00\x01", true, 0), "\\x0001");
        assert_eq!(render(b"\xff", false, 25), "\\xff");
        assert_eq!(render(b"abc", false, 25), "abc");
        assert_eq!(render(&999i32.to_be_bytes(), true, 23), "999");
        assert_eq!(render(&(-5i64).to_be_bytes(), true, 20), "-5");
        assert_eq!(render(&[1], true, 16), "t");
        assert_eq!(
            render(&[1, 2], true, 23),
            "\\x0102",
            "a wrong length is shown raw"
        );
        assert!(render(&vec![b'a'; 5000], false, 25).ends_with('…'));
        assert_eq!(cut("héllo", 2), "h…");
    }
}
