//! Where a recording masks what is typed: at a password prompt, in a terminal.
//!
//! Only the spotting of a secret prompt and the state of one masked span live here; the
//! bounds (one line, [`MASK_CAP`] characters, never while the target echoes) are
//! applied by [`super::asciicast::Recorder`] as it records. This must never widen what
//! can be masked: a target must not be able to steer it into hiding commands.

/// A masked span that ended, and the output seen since.
pub(super) struct Ended {
    pub(super) typed: String,
    pub(super) seen: String,
}

/// One masked span: what was typed in it (at most [`MASK_CAP`] characters), kept only
/// so that it can be written in clear if the span turns out not to be a secret.
pub(super) struct Mask {
    pub(super) typed: String,
}

/// The most characters one masked span hides; a longer line is not a secret, and is
/// recorded in clear from its start.
pub const MASK_CAP: usize = 128;

/// Words that make a prompt ending in `:` a secret one (sudo, ssh-keygen, psql, MFA).
const SECRET_PROMPTS: &[&str] = &[
    "password",
    "passphrase",
    "passcode",
    "pin",
    "token",
    "secret",
    "otp",
    "verification code",
];

/// Whether `line` (the text since the last newline) asks for a secret.
pub(super) fn asks_for_secret(line: &str) -> bool {
    let line = line.trim_end().to_lowercase();
    let Some(prompt) = line.strip_suffix(':') else {
        return false;
    };
    SECRET_PROMPTS.iter().any(|w| {
        prompt.rmatch_indices(w).any(|(i, _)| {
            // A whole word: "pin" is not "ping".
            let before = prompt[..i].chars().next_back();
            let after = prompt[i + w.len()..].chars().next();
            !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::asks_for_secret;

    #[test]
    fn secret_prompts_are_spotted() {
        for p in [
            "[sudo] password for alice: ",
            "Password:",
            "Enter passphrase for key '/root/.ssh/id_ed25519': ",
            "Password for user postgres: ",
            "Verification code: ",
            "PIN:",
        ] {
            assert!(asks_for_secret(p), "{p:?}");
        }
        for p in ["alice@host:~$ ", "ping: ", "password changed", "Name: ", ""] {
            assert!(!asks_for_secret(p), "{p:?}");
        }
    }
}
