//! What can go wrong in the relay, one variant per distinct case: reaching the target
//! (its address, its host key, the upstream login), keeping the record (the recording,
//! the audit), and the grant ending underneath a session.
//!
//! Each message is the line the engineer is shown (`twokey: cannot open a session on
//! RESOURCE: …`) or that a session's end reason and audit carry, so it names what to do
//! and must never carry a secret (a key, a token, a password). Limits (connections,
//! channels) refuse before any session exists and are logged, not raised.
//! Protocol-neutral: a protocol layer turns its own library's errors into the `reason`
//! text of a variant, so this file imports no protocol.

use super::live::RECORDING_FAILED;

/// Why a relayed session (or forwarded port) could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay runs without its keys (a bug: it is started only with them).
    #[error("relay keys missing")]
    KeysMissing,
    /// The grant's role was removed from the policy since the grant was made.
    #[error("the grant's role is no longer in the policy")]
    RoleGone,
    /// The role names no login on the target.
    #[error("the role has no principal")]
    NoPrincipal,
    /// The resource has no address to connect to.
    #[error("{0} has no address")]
    NoAddress(String),
    /// The host key pinned in config for this resource does not parse.
    #[error("{0}'s pinned host_key is not a key")]
    PinnedKeyInvalid(String),
    /// The store cannot say which host key an admin confirmed: nothing is sent.
    #[error("the relay cannot check the target's host key right now")]
    HostKeyUnchecked,
    /// The target showed a key other than the one pinned in config.
    #[error(
        "{address} presented a host key other than the one pinned for {resource}; nothing was sent to it"
    )]
    HostKeyChanged { address: String, resource: String },
    /// The target showed a key no admin confirmed; the line (from `host_keys::refuse`)
    /// says where it can be reviewed.
    #[error("{0}")]
    HostKeyUnconfirmed(String),
    /// The target's key was refused before it could even be read.
    #[error("{0} presented a host key the relay does not accept")]
    HostKeyRefused(String),
    /// The throwaway session key could not be made.
    #[error("session key: {0}")]
    SessionKey(String),
    /// The upstream CA could not sign the session's certificate.
    #[error("{0}")]
    UpstreamCertificate(crate::Error),
    /// The target did not answer in time.
    #[error("{0} did not answer")]
    UpstreamTimeout(String),
    /// The target could not be reached.
    #[error("cannot connect to {address}: {reason}")]
    UpstreamConnect { address: String, reason: String },
    /// The upstream login broke off.
    #[error("upstream login failed: {0}")]
    UpstreamAuth(String),
    /// The target refused the relay's login.
    #[error("{address} refused the relay's login as {principal}")]
    UpstreamRefused { address: String, principal: String },
    /// The target took too long to complete the login.
    #[error("the target did not complete the login in time")]
    UpstreamLoginTimeout,
    /// The target would not open a session channel.
    #[error("upstream session: {0}")]
    UpstreamSession(String),
    /// The target failed a request on the session (a pty, the command, shell or
    /// subsystem).
    #[error("{0}")]
    UpstreamRequest(String),
    /// The target could not open a forwarded port's destination.
    #[error("the target could not open {destination}: {reason}")]
    ForwardFailed { destination: String, reason: String },
    /// The session was cut (an admin, shutdown, the grant) before it reached the target.
    #[error("session ended: {0}")]
    Cut(String),
    /// The grant ended or was revoked while the target was being reached.
    #[error("the grant has ended or was revoked")]
    GrantEnded,
    /// The recording could not be made or finished.
    #[error("recording: {0}")]
    Recording(#[from] std::io::Error),
    /// A recorder panicked: the recording is not whole.
    #[error("recording lock poisoned")]
    RecordingPoisoned,
    /// The recording can no longer be written (a full disk, say): the session ends.
    #[error("{}", RECORDING_FAILED)]
    RecordingFailed,
    /// An sftp stream could not be read, so cannot be recorded: the session ends.
    #[error("its sftp requests could not be read for the recording")]
    SftpUnreadable,
    /// `session.started` could not be written: the session does not start.
    #[error("session start not audited: {0}")]
    StartNotAudited(crate::Error),
    /// An audit event outside a session's own transaction could not be written.
    #[error("the audit event {action} could not be written: {source}")]
    AuditFailed {
        action: String,
        source: crate::Error,
    },
    /// The store failed while a session was being closed.
    #[error("{0}")]
    Store(#[from] crate::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engineer reads these lines on their terminal and the tests assert on them:
    /// they are the ones the relay printed before it had an error type.
    #[test]
    fn messages_are_the_lines_the_engineer_is_shown() {
        let cases: Vec<(RelayError, &str)> = vec![
            (RelayError::KeysMissing, "relay keys missing"),
            (
                RelayError::RoleGone,
                "the grant's role is no longer in the policy",
            ),
            (RelayError::NoPrincipal, "the role has no principal"),
            (RelayError::NoAddress("web".into()), "web has no address"),
            (
                RelayError::PinnedKeyInvalid("web".into()),
                "web's pinned host_key is not a key",
            ),
            (
                RelayError::HostKeyUnchecked,
                "the relay cannot check the target's host key right now",
            ),
            (
                RelayError::HostKeyChanged {
                    address: "10.0.0.1:22".into(),
                    resource: "web".into(),
                },
                "10.0.0.1:22 presented a host key other than the one pinned for web; nothing was sent to it",
            ),
            (
                RelayError::HostKeyUnconfirmed("as host_keys says".into()),
                "as host_keys says",
            ),
            (
                RelayError::HostKeyRefused("h:22".into()),
                "h:22 presented a host key the relay does not accept",
            ),
            (
                RelayError::UpstreamTimeout("h:22".into()),
                "h:22 did not answer",
            ),
            (
                RelayError::UpstreamConnect {
                    address: "h:22".into(),
                    reason: "refused".into(),
                },
                "cannot connect to h:22: refused",
            ),
            (
                RelayError::UpstreamAuth("eof".into()),
                "upstream login failed: eof",
            ),
            (
                RelayError::UpstreamRefused {
                    address: "h:22".into(),
                    principal: "app".into(),
                },
                "h:22 refused the relay's login as app",
            ),
            (
                RelayError::UpstreamLoginTimeout,
                "the target did not complete the login in time",
            ),
            (
                RelayError::ForwardFailed {
                    destination: "db:5432".into(),
                    reason: "no route".into(),
                },
                "the target could not open db:5432: no route",
            ),
            (
                RelayError::Cut("grant ended".into()),
                "session ended: grant ended",
            ),
            (RelayError::GrantEnded, "the grant has ended or was revoked"),
            (RelayError::RecordingFailed, RECORDING_FAILED),
            (
                RelayError::SftpUnreadable,
                "its sftp requests could not be read for the recording",
            ),
            (
                RelayError::Recording(std::io::Error::other("disk full")),
                "recording: disk full",
            ),
            (RelayError::RecordingPoisoned, "recording lock poisoned"),
        ];
        for (e, line) in cases {
            assert_eq!(e.to_string(), line, "{e:?}");
        }
    }
}
