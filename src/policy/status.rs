//! The closed sets of states the state machine and its neighbours move through, as
//! types: a request `pending → approved | denied | cancelled | expired`, a grant
//! `active → ended | revoked`, an approval's decision, and the states of outbox
//! messages, target host keys and database logins.
//!
//! Each is stored as the same TEXT it always was (the migrations' `CHECK` lists), so
//! no migration is needed: `as_str()`/`Display` write it, `FromStr` and the sqlx
//! decoder read it back, and an unknown string is an error, never a default. Pure: no
//! I/O and no import from the rest of the crate, so `store`, `access`, `web`,
//! `notify`, `dbcreds` and the relay can all use it without a circle.

use std::fmt;
use std::str::FromStr;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::sqlite::{SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Sqlite, Type};

/// A string that is not one of a status set's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStatus {
    /// Which set, e.g. "request status".
    pub kind: &'static str,
    pub value: String,
}

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a {}", self.value, self.kind)
    }
}

impl std::error::Error for UnknownStatus {}

/// Declares a status enum with its stored strings, and every conversion.
macro_rules! status {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal, { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored (and displayed) string.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownStatus;
            fn from_str(s: &str) -> Result<Self, UnknownStatus> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownStatus { kind: $kind, value: s.to_string() }),
                }
            }
        }

        impl Type<Sqlite> for $name {
            fn type_info() -> SqliteTypeInfo {
                <str as Type<Sqlite>>::type_info()
            }
            fn compatible(ty: &SqliteTypeInfo) -> bool {
                <str as Type<Sqlite>>::compatible(ty)
            }
        }

        impl<'q> Encode<'q, Sqlite> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut <Sqlite as sqlx::Database>::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                <&str as Encode<'q, Sqlite>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> Decode<'r, Sqlite> for $name {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                // A value outside the set fails the read: never guessed, never defaulted.
                Ok(<&str as Decode<'r, Sqlite>>::decode(value)?.parse()?)
            }
        }
    };
}

status! {
    /// Where an access request stands. Only `pending` moves, once.
    RequestStatus, "request status", {
        Pending => "pending",
        Approved => "approved",
        Denied => "denied",
        Cancelled => "cancelled",
        /// Not decided within its TTL (the sweeper marks it; until then a pending
        /// request past its TTL reads as expired).
        Expired => "expired",
    }
}

status! {
    /// Where a grant stands. Only `active` moves, once: `ended` by the clock,
    /// `revoked` by a person.
    GrantStatus, "grant status", {
        Active => "active",
        Ended => "ended",
        Revoked => "revoked",
    }
}

status! {
    /// One approver's decision on one request.
    Decision, "decision", {
        Approve => "approve",
        Deny => "deny",
    }
}

status! {
    /// An outbox message: waiting (or being retried), delivered, or no longer needed.
    OutboxStatus, "outbox status", {
        Pending => "pending",
        Sent => "sent",
        Skipped => "skipped",
    }
}

status! {
    /// A target host key the relay saw: waiting for an admin, trusted, refused, or
    /// replaced by a later confirmed key.
    HostKeyStatus, "host key status", {
        Pending => "pending",
        Confirmed => "confirmed",
        Rejected => "rejected",
        Replaced => "replaced",
    }
}

status! {
    /// A grant's database login: being made, made, a failed attempt (retried), or
    /// dropped.
    DbCredentialState, "database login state", {
        Creating => "creating",
        Active => "active",
        Error => "error",
        Dropped => "dropped",
    }
}

status! {
    /// A held action: waiting for its decision, approved (the relay runs it next),
    /// then run once; or refused for good: denied, not decided within the role's
    /// review wait, or withdrawn because its session ended first.
    HeldStatus, "held action status", {
        Pending => "pending",
        Approved => "approved",
        Denied => "denied",
        Expired => "expired",
        Withdrawn => "withdrawn",
        Ran => "ran",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant's string parses back to it, displays as it, and serialises as it.
    fn round_trip<T>(all: &[T], expected: &[&str])
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr<Err = UnknownStatus>,
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        let shown: Vec<String> = all.iter().map(|v| v.to_string()).collect();
        assert_eq!(shown, expected);
        for (&v, text) in all.iter().zip(expected) {
            assert_eq!(text.parse::<T>(), Ok(v), "{text}");
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{text}\""));
            assert_eq!(
                serde_json::from_str::<T>(&format!("\"{text}\"")).unwrap(),
                v
            );
        }
        for bad in ["", "Pending", "ACTIVE", " approve", "unknown"] {
            let err = bad.parse::<T>().unwrap_err();
            assert_eq!(err.value, bad);
            assert!(serde_json::from_str::<T>(&format!("\"{bad}\"")).is_err());
        }
    }

    #[test]
    fn every_status_round_trips_and_unknown_strings_are_errors() {
        use RequestStatus as R;
        round_trip(
            &[R::Pending, R::Approved, R::Denied, R::Cancelled, R::Expired],
            &["pending", "approved", "denied", "cancelled", "expired"],
        );
        round_trip(
            &[
                GrantStatus::Active,
                GrantStatus::Ended,
                GrantStatus::Revoked,
            ],
            &["active", "ended", "revoked"],
        );
        round_trip(&[Decision::Approve, Decision::Deny], &["approve", "deny"]);
        use OutboxStatus as O;
        round_trip(
            &[O::Pending, O::Sent, O::Skipped],
            &["pending", "sent", "skipped"],
        );
        use HostKeyStatus as H;
        round_trip(
            &[H::Pending, H::Confirmed, H::Rejected, H::Replaced],
            &["pending", "confirmed", "rejected", "replaced"],
        );
        use DbCredentialState as D;
        round_trip(
            &[D::Creating, D::Active, D::Error, D::Dropped],
            &["creating", "active", "error", "dropped"],
        );
    }

    #[test]
    fn an_unknown_status_says_which_set() {
        let err = "approvd".parse::<RequestStatus>().unwrap_err();
        assert_eq!(err.to_string(), "\"approvd\" is not a request status");
    }

    #[tokio::test]
    async fn stored_as_the_same_text_and_unknown_text_fails_the_read() {
        let db = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        for &s in RequestStatus::ALL {
            let (text, back): (String, RequestStatus) = sqlx::query_as("SELECT ?1, ?1")
                .bind(s)
                .fetch_one(&db)
                .await
                .unwrap();
            assert_eq!((text.as_str(), back), (s.as_str(), s));
        }
        let bad = sqlx::query_scalar::<_, GrantStatus>("SELECT 'live'")
            .fetch_one(&db)
            .await;
        assert!(bad.is_err());
    }
}
