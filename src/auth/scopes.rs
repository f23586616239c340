//! What an API token may do. A token carries a set of scopes; each API endpoint names
//! the scope it needs, and a token without it is refused (403) whatever its owner could
//! do in the browser. A token never holds more than its owner: scopes only narrow.
//!
//! - `requests`: file and read one's own requests, cancel them or revoke one's own
//!   grant, and get certificates and database logins for one's own grants.
//! - `approve`: read the requests one may decide, approve or deny them, and revoke
//!   others' grants where one's groups allow it.

use std::collections::BTreeSet;
use std::fmt;

/// One scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Requests,
    Approve,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Requests, Scope::Approve];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Requests => "requests",
            Scope::Approve => "approve",
        }
    }

    fn parse(word: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == word)
    }

    /// What the scope lets a token do, in words for consent and token pages.
    pub fn describe(self) -> &'static str {
        match self {
            Scope::Requests => {
                "file and read your own requests, cancel them, and get SSH certificates and database logins for your grants"
            }
            Scope::Approve => {
                "read the requests you may decide, approve or deny them, and revoke grants you may revoke"
            }
        }
    }
}

/// A token's scopes (never empty once parsed for a new token).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    /// Only `requests`: what tokens get unless more is asked for.
    pub fn requests() -> Scopes {
        Scopes([Scope::Requests].into_iter().collect())
    }

    /// `requests` and `approve`.
    pub fn all() -> Scopes {
        Scopes(Scope::ALL.into_iter().collect())
    }

    /// Parses what a person typed (`requests,approve` or `requests approve`): unknown
    /// or no scopes are an error naming the choices.
    pub fn parse(text: &str) -> Result<Scopes, String> {
        let mut set = BTreeSet::new();
        for word in text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
        {
            match Scope::parse(word) {
                Some(s) => {
                    set.insert(s);
                }
                None => {
                    return Err(format!(
                        "unknown scope {word:?}: the scopes are \"requests\" and \"approve\""
                    ));
                }
            }
        }
        if set.is_empty() {
            return Err("name at least one scope: \"requests\", \"approve\" or both".into());
        }
        Ok(Scopes(set))
    }

    /// Reads a stored value. Fails closed: an unknown word grants nothing.
    pub fn from_db(text: &str) -> Scopes {
        Scopes(text.split_whitespace().filter_map(Scope::parse).collect())
    }

    /// The stored form: space-separated, in a fixed order.
    pub fn to_db(&self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
    }

    pub fn contains(&self, scope: Scope) -> bool {
        self.0.contains(&scope)
    }

    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_strictly_and_read_back_failing_closed() {
        assert_eq!(Scopes::parse("requests").unwrap(), Scopes::requests());
        assert_eq!(Scopes::parse("approve, requests").unwrap(), Scopes::all());
        assert_eq!(
            Scopes::parse("requests approve requests").unwrap(),
            Scopes::all()
        );
        assert_eq!(Scopes::all().to_db(), "requests approve");
        for bad in ["", " , ", "admin", "requests,Approve", "requests,*"] {
            assert!(Scopes::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Scopes::from_db("requests approve"), Scopes::all());
        assert_eq!(Scopes::from_db("requests admin"), Scopes::requests());
        assert!(!Scopes::from_db("APPROVE *").contains(Scope::Approve));
        assert!(!Scopes::from_db("").contains(Scope::Requests));
    }
}
