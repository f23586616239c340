//! Pure access rules: who may request, who may approve, when a request's rule is met,
//! what a valid duration, reason and ticket are.
//!
//! No I/O and no clock here: callers pass in what the rules need, so every rule can be
//! table-tested. The access module applies these rules inside its transactions.

use std::collections::BTreeSet;
use std::time::Duration;

pub use crate::config::parse_duration;
use crate::config::{Config, ConfigError, RoleConfig, invalid};

pub mod masking;
pub mod sql;
pub mod status;

pub use status::{
    DbCredentialState, Decision, GrantStatus, HeldStatus, HostKeyStatus, OutboxStatus,
    RequestStatus, UnknownStatus,
};

/// The shortest grant anyone may ask for.
pub const MIN_GRANT_SECS: u64 = 60;
pub const MAX_REASON_CHARS: usize = 2000;
pub const MAX_TICKET_CHARS: usize = 128;
pub const MAX_COMMENT_CHARS: usize = 2000;

/// Who is acting, with the groups they hold right now.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: String,
    pub email: String,
    pub display_name: String,
    /// The stable identity: who issued it, and the subject there.
    pub issuer: String,
    pub subject: String,
    /// Browser sessions that signed in before this (ms) are no longer valid.
    pub sessions_valid_after: i64,
    /// When the groups were last confirmed (by a sign-in, or from config for demo users).
    pub groups_synced_at: Option<i64>,
    pub groups: BTreeSet<String>,
    pub is_admin: bool,
}

impl Actor {
    /// The identity as recorded in audit details.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({ "iss": self.issuer, "sub": self.subject, "email": self.email })
    }
}

impl Actor {
    fn in_any(&self, groups: &[String]) -> bool {
        groups.iter().any(|g| self.groups.contains(g))
    }
}

/// May this actor file a request for this role?
pub fn may_request(actor: &Actor, role: &RoleConfig) -> bool {
    actor.in_any(&role.requester_groups)
}

/// May someone holding `groups` now keep a grant of `role` (`None`: the role is no
/// longer in the policy)? The same rule as [`may_request`]: a grant is only as good as
/// the right to ask for it, so losing the group (or the role leaving the policy) ends
/// what was granted, not only what could be asked next.
pub fn may_hold(groups: &BTreeSet<String>, role: Option<&RoleConfig>) -> bool {
    role.is_some_and(|r| r.requester_groups.iter().any(|g| groups.contains(g)))
}

/// Why an approver may not decide on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecideRefusal {
    /// Separation of duties: nobody decides on their own request, admins included.
    OwnRequest,
    /// Not a member (now) of any approver group of the role.
    NotApprover,
}

impl DecideRefusal {
    pub fn message(&self) -> &'static str {
        match self {
            DecideRefusal::OwnRequest => "you cannot approve or deny your own request",
            DecideRefusal::NotApprover => "you are not in an approver group for this role",
        }
    }
}

/// May this actor approve or deny a request filed by `requester_id`?
/// Group membership is the actor's *current* membership: someone removed from a group
/// loses the right at once.
pub fn may_decide(
    actor: &Actor,
    requester_id: &str,
    role: &RoleConfig,
) -> Result<(), DecideRefusal> {
    // Checked first and unconditionally: there is no admin exemption.
    if actor.user_id == requester_id {
        return Err(DecideRefusal::OwnRequest);
    }
    if !actor.in_any(&role.approver_groups) {
        return Err(DecideRefusal::NotApprover);
    }
    Ok(())
}

/// The role's approver groups that this actor holds, recorded with each approval so the
/// rule is evaluated on membership as of the approval.
pub fn counted_groups(actor: &Actor, role: &RoleConfig) -> Vec<String> {
    role.approver_groups
        .iter()
        .filter(|g| actor.groups.contains(*g))
        .cloned()
        .collect()
}

/// May this actor see a request (and its timeline)?
pub fn may_view(actor: &Actor, requester_id: &str, role: Option<&RoleConfig>) -> bool {
    actor.user_id == requester_id
        || actor.is_admin
        || role.is_some_and(|r| actor.in_any(&r.approver_groups))
}

/// May this actor revoke a live grant? Its approvers and admins may; so may the holder,
/// since giving access back early only ever reduces it.
pub fn may_revoke(actor: &Actor, holder_id: &str, role: Option<&RoleConfig>) -> bool {
    actor.user_id == holder_id
        || actor.is_admin
        || role.is_some_and(|r| actor.in_any(&r.approver_groups))
}

/// One approval as counted by [`rule_met`]: the approver and the approver groups they
/// held when they approved.
pub struct CountedApproval<'a> {
    pub approver_id: &'a str,
    pub groups: &'a [String],
}

/// Is the role's approval rule met by these approvals? Distinct humans count once.
pub fn rule_met(role: &RoleConfig, approvals: &[CountedApproval<'_>]) -> bool {
    rule_met_by(role, role.min_approvals, approvals)
}

/// How many distinct people must approve one of the role's held actions.
pub fn review_approvals(role: &RoleConfig) -> u32 {
    role.review.approvals.unwrap_or(role.min_approvals)
}

/// Is the role's rule for a held action met: [`review_approvals`] distinct people, and
/// every approver group when the role says all groups?
pub fn held_rule_met(role: &RoleConfig, approvals: &[CountedApproval<'_>]) -> bool {
    rule_met_by(role, review_approvals(role), approvals)
}

fn rule_met_by(role: &RoleConfig, needed: u32, approvals: &[CountedApproval<'_>]) -> bool {
    // Only approvals by someone who, as they approved, was in a group the role names as
    // an approver group now: a reload that drops a group drops what it approved.
    let approvals: Vec<&CountedApproval<'_>> = approvals
        .iter()
        .filter(|a| a.groups.iter().any(|g| role.approver_groups.contains(g)))
        .collect();
    let approvers: BTreeSet<&str> = approvals.iter().map(|a| a.approver_id).collect();
    if approvers.len() < needed as usize {
        return false;
    }
    if role.all_groups {
        let covered: BTreeSet<&str> = approvals
            .iter()
            .flat_map(|a| a.groups.iter().map(String::as_str))
            .collect();
        return role
            .approver_groups
            .iter()
            .all(|g| covered.contains(g.as_str()));
    }
    true
}

/// A problem with one input field, shown next to that field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// What a requester typed, before checking.
#[derive(Debug, Clone, Default)]
pub struct RequestInput {
    pub resource: String,
    pub role: String,
    pub duration: String,
    pub reason: String,
    pub ticket: Option<String>,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub duration: Duration,
    pub reason: String,
    pub ticket: Option<String>,
}

/// Checks duration, reason and ticket against the role. Returns every field error at
/// once so a form can show them all.
pub fn check_request(
    input: &RequestInput,
    role: &RoleConfig,
) -> Result<ValidRequest, Vec<FieldError>> {
    let mut errors = Vec::new();
    let max = role.max_duration();
    let duration = match parse_duration(&input.duration) {
        Ok(d) if d.as_secs() < MIN_GRANT_SECS => {
            errors.push(field("duration", "must be at least 1m"));
            d
        }
        Ok(d) if d > max => {
            errors.push(field(
                "duration",
                format!("must be at most {} for this role", format_duration(max)),
            ));
            d
        }
        Ok(d) => d,
        Err(e) => {
            errors.push(field("duration", e));
            Duration::ZERO
        }
    };
    let reason = input.reason.trim().to_string();
    let reason_chars = reason.chars().count();
    if reason_chars < role.reason_min_chars.max(1) {
        errors.push(field(
            "reason",
            if reason.is_empty() {
                "a reason is required".to_string()
            } else {
                format!("must be at least {} characters", role.reason_min_chars)
            },
        ));
    } else if reason_chars > MAX_REASON_CHARS {
        errors.push(field(
            "reason",
            format!("must be at most {MAX_REASON_CHARS} characters"),
        ));
    }
    let ticket = input
        .ticket
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    match &ticket {
        None if role.require_ticket => errors.push(field("ticket", "this role requires a ticket")),
        Some(t) if t.chars().count() > MAX_TICKET_CHARS => errors.push(field(
            "ticket",
            format!("must be at most {MAX_TICKET_CHARS} characters"),
        )),
        Some(t) if t.chars().any(char::is_control) => {
            errors.push(field("ticket", "must not contain control characters"))
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(ValidRequest {
            duration,
            reason,
            ticket,
        })
    } else {
        Err(errors)
    }
}

/// Checks an approver's or revoker's optional comment.
pub fn check_comment(comment: Option<&str>) -> Result<Option<String>, FieldError> {
    let c = comment.map(str::trim).filter(|c| !c.is_empty());
    match c {
        Some(c) if c.chars().count() > MAX_COMMENT_CHARS => Err(field(
            "comment",
            format!("must be at most {MAX_COMMENT_CHARS} characters"),
        )),
        other => Ok(other.map(str::to_string)),
    }
}

/// `5400s` → `"1h30m"`.
pub fn format_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) && !d.is_zero() {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

/// The policy's rules for the configuration: no role may cap grants below the shortest
/// grant anyone may ask for. Run by `server::check_config` after the config's own checks.
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    for (i, r) in config.resources.iter().enumerate() {
        for (j, role) in r.roles.iter().enumerate() {
            let key = format!("resources[{i}].roles[{j}]");
            if role.max_duration < Duration::from_secs(crate::policy::MIN_GRANT_SECS) {
                return Err(invalid(
                    format!("{key}.max_duration"),
                    "must be at least 1m",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(min: u32, all: bool, groups: &[&str]) -> RoleConfig {
        RoleConfig {
            name: "r".into(),
            description: String::new(),
            requester_groups: vec!["engineers".into()],
            approver_groups: groups.iter().map(|g| g.to_string()).collect(),
            min_approvals: min,
            all_groups: all,
            max_duration: Duration::from_secs(4 * 3600),
            pending_ttl: None,
            require_ticket: false,
            reason_min_chars: 3,
            principals: vec![],
            extensions: vec![],
            force_command: None,
            source_address: vec![],
            db_roles: vec![],
            db_grants: vec![],
            connection_limit: 5,
            blocked_commands: vec![],
            review_commands: vec![],
            review: Default::default(),
            transcript_rows: 20,
            sql: Default::default(),
        }
    }

    fn actor(id: &str, groups: &[&str], admin: bool) -> Actor {
        Actor {
            user_id: id.into(),
            email: format!("{id}@example.com"),
            display_name: id.into(),
            issuer: "dev".into(),
            subject: id.into(),
            sessions_valid_after: 0,
            groups_synced_at: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            is_admin: admin,
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("90", 90_000),
            ("0", 0),
            ("0s", 0),
            ("50ms", 50),
            ("1ms", 1),
            ("1500ms", 1500),
            ("1s500ms", 1500),
            ("30m", 1_800_000),
            ("1m30s", 90_000),
            ("1h30m", 5_400_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
            ("1d12h", 129_600_000),
            (" 45s ", 45_000),
            ("366d", 366 * 86_400_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s).unwrap().as_millis(), ms, "{s}");
        }
        for s in [
            "",
            "m",
            "ms",
            "30x",
            "1h30",
            "-5",
            "1.5h",
            "50 ms",
            "50MS",
            "5us",
            "5mss",
            "99999999999999999999h",
            "99999999999999999999",
            "400d",
            "367d",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        assert!(
            parse_duration("30x")
                .unwrap_err()
                .contains("\"30x\" is not a duration")
        );
        assert!(
            parse_duration("400d")
                .unwrap_err()
                .contains("longer than a year")
        );
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(0)), "0s");
        assert_eq!(format_duration(Duration::from_millis(50)), "50ms");
    }

    #[test]
    fn self_decision_refused_even_for_admins() {
        let r = role(1, false, &["sre-leads"]);
        let admin_approver = actor("u1", &["sre-leads", "admins"], true);
        assert_eq!(
            may_decide(&admin_approver, "u1", &r),
            Err(DecideRefusal::OwnRequest)
        );
        assert_eq!(may_decide(&admin_approver, "u2", &r), Ok(()));
        let outsider = actor("u3", &["engineers"], true);
        assert_eq!(
            may_decide(&outsider, "u2", &r),
            Err(DecideRefusal::NotApprover)
        );
    }

    #[test]
    fn rule_counts_distinct_humans() {
        let r = role(2, false, &["sre-leads"]);
        let g = vec!["sre-leads".to_string()];
        let one = [CountedApproval {
            approver_id: "b",
            groups: &g,
        }];
        let same_twice = [
            CountedApproval {
                approver_id: "b",
                groups: &g,
            },
            CountedApproval {
                approver_id: "b",
                groups: &g,
            },
        ];
        let two = [
            CountedApproval {
                approver_id: "b",
                groups: &g,
            },
            CountedApproval {
                approver_id: "c",
                groups: &g,
            },
        ];
        assert!(!rule_met(&r, &one));
        assert!(!rule_met(&r, &same_twice));
        assert!(rule_met(&r, &two));
    }

    #[test]
    fn all_groups_rule_needs_each_group() {
        let r = role(2, true, &["sre-leads", "dbas"]);
        let sre = vec!["sre-leads".to_string()];
        let dba = vec!["dbas".to_string()];
        let both_sre = [
            CountedApproval {
                approver_id: "b",
                groups: &sre,
            },
            CountedApproval {
                approver_id: "c",
                groups: &sre,
            },
        ];
        let mixed = [
            CountedApproval {
                approver_id: "b",
                groups: &sre,
            },
            CountedApproval {
                approver_id: "c",
                groups: &dba,
            },
        ];
        assert!(!rule_met(&r, &both_sre));
        assert!(rule_met(&r, &mixed));
    }

    #[test]
    fn an_approval_by_a_group_the_role_no_longer_names_does_not_count() {
        let contractors = vec!["contractors".to_string()];
        let sre = vec!["sre-leads".to_string()];
        let approvals = [
            CountedApproval {
                approver_id: "b",
                groups: &contractors,
            },
            CountedApproval {
                approver_id: "c",
                groups: &sre,
            },
        ];
        assert!(rule_met(
            &role(2, false, &["sre-leads", "contractors"]),
            &approvals
        ));
        // A reload dropped the contractors: one approval left, of two needed.
        assert!(!rule_met(&role(2, false, &["sre-leads"]), &approvals));
        assert!(rule_met(&role(1, false, &["sre-leads"]), &approvals));
    }

    #[test]
    fn request_checks() {
        let mut r = role(1, false, &["sre-leads"]);
        let input = |d: &str, reason: &str, ticket: Option<&str>| RequestInput {
            resource: "x".into(),
            role: "r".into(),
            duration: d.into(),
            reason: reason.into(),
            ticket: ticket.map(str::to_string),
        };
        assert!(check_request(&input("30m", "fix prod", None), &r).is_ok());
        let fields = |res: Result<ValidRequest, Vec<FieldError>>| -> Vec<&'static str> {
            res.unwrap_err().iter().map(|e| e.field).collect()
        };
        assert_eq!(
            fields(check_request(&input("5h", "fix prod", None), &r)),
            ["duration"]
        );
        assert_eq!(
            fields(check_request(&input("30s", "fix prod", None), &r)),
            ["duration"]
        );
        assert_eq!(
            fields(check_request(&input("soon", "  ", None), &r)),
            ["duration", "reason"]
        );
        r.require_ticket = true;
        assert_eq!(
            fields(check_request(&input("1h", "fix prod", Some(" ")), &r)),
            ["ticket"]
        );
        let ok = check_request(&input("4h", "  fix prod  ", Some("OPS-1")), &r).unwrap();
        assert_eq!(ok.reason, "fix prod");
        assert_eq!(ok.duration.as_secs(), 4 * 3600);
    }

    #[test]
    fn holding_needs_the_right_to_request() {
        let r = role(1, false, &["sre-leads"]);
        let groups = |g: &[&str]| -> BTreeSet<String> { g.iter().map(|s| s.to_string()).collect() };
        for (held, role_present, want) in [
            (&["engineers"][..], true, true),
            (&["engineers", "other"][..], true, true),
            (&[][..], true, false),
            (&["sre-leads"][..], true, false),
            (&["admins"][..], true, false),
            (&["engineers"][..], false, false),
        ] {
            let role = role_present.then_some(&r);
            assert_eq!(
                may_hold(&groups(held), role),
                want,
                "{held:?} {role_present}"
            );
            if let Some(role) = role {
                assert_eq!(may_request(&actor("a", held, false), role), want);
            }
        }
    }

    #[test]
    fn visibility_and_revocation() {
        let r = role(1, false, &["sre-leads"]);
        assert!(may_view(&actor("a", &[], false), "a", Some(&r)));
        assert!(!may_view(&actor("x", &["engineers"], false), "a", Some(&r)));
        assert!(may_view(&actor("b", &["sre-leads"], false), "a", Some(&r)));
        assert!(may_view(&actor("d", &["admins"], true), "a", None));
        assert!(!may_revoke(
            &actor("x", &["engineers"], false),
            "a",
            Some(&r)
        ));
        assert!(may_revoke(
            &actor("b", &["sre-leads"], false),
            "a",
            Some(&r)
        ));
    }

    #[test]
    fn a_role_cap_below_the_shortest_grant_is_refused() {
        use crate::config::demo_config_toml;
        let base = demo_config_toml("127.0.0.1:8080", std::path::Path::new("/tmp/x"));
        check_config(&Config::parse(&base, "t").unwrap()).unwrap();
        for (from, to, key) in [
            (
                "max_duration = \"4h\"",
                "max_duration = \"10s\"",
                "resources[0].roles[0].max_duration",
            ),
            (
                "max_duration = \"1h\"",
                "max_duration = \"59s\"",
                "resources[1].roles[0].max_duration: must be at least 1m",
            ),
        ] {
            let c = Config::parse(&base.replacen(from, to, 1), "t").unwrap();
            c.validate().unwrap();
            let err = check_config(&c).unwrap_err().to_string();
            assert!(err.starts_with(key), "{to}: {err}");
        }
    }
}
