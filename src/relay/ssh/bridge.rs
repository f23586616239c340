//! One relayed session: the engineer's channel to the target's, opened and closed
//! through the shared lifecycle (`session.started` before anything reaches the target,
//! `session.ended` with the recording's hash after), recorded, cut when its grant ends.
//! Also a forwarded port (`ssh -L`), counted and audited rather than recorded.
//!
//! This must never run what cannot be recorded or audited: a recording that cannot be
//! written, or a start that cannot be audited, ends the session before the target
//! hears of it.

use std::sync::Arc;
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use serde_json::json;

use super::pump::{Tap, pump};
use super::upstream::{connect_upstream, open_upstream};
use super::{commands, sftp};
use crate::recording;
use crate::relay::admission::Admitted;
use crate::relay::error::RelayError;
use crate::relay::lifecycle::{self, audit};
use crate::relay::live::RECORDING_FAILED;
use crate::relay::live::Registered;
use crate::state::AppState;

/// One relayed session: client channel ⇄ upstream channel, recorded, cut at the end.
///
/// After the first request (exec, shell or subsystem) opens the upstream channel, each
/// direction runs in its own task: a direction blocked on flow control must never stop
/// the other from draining (that deadlocks bulk transfers).
pub(super) async fn bridge(
    state: AppState,
    admitted: Admitted,
    mut client: Channel<Msg>,
    session: russh::server::Handle,
) -> std::result::Result<(), RelayError> {
    let session_id = uuid::Uuid::new_v4().to_string();
    let g = admitted.grant.clone();
    let rec = Arc::new(std::sync::Mutex::new(
        lifecycle::recording_for(&state, &session_id).map_err(RelayError::Recording)?,
    ));
    let with_rec = |f: &dyn Fn(&mut recording::Recorder)| recording::with(&rec, f);
    let recording_path = rec
        .lock()
        .map(|r| r.path().display().to_string())
        .unwrap_or_default();
    let instance = state
        .relay
        .as_ref()
        .map(|k| k.instance.id.clone())
        .unwrap_or_default();
    // The session row and its audit event, together: a session that cannot be audited
    // as started does not start (fail closed), and the engineer is told.
    let started = lifecycle::open(
        &state,
        &lifecycle::Opening {
            id: &session_id,
            admitted: &admitted,
            recording: &recording_path,
            instance: &instance,
            protocol: "ssh",
        },
    )
    .await;
    if let Err(e) = started {
        tracing::error!(error = %e, session = %session_id, "relay: the session's start could not be audited; it does not start");
        let _ = std::fs::remove_file(&recording_path);
        explain(
            client,
            "this session cannot be audited right now, so it does not start".into(),
        )
        .await;
        return Err(RelayError::StartNotAudited(e));
    }
    let kill = state.live_sessions.register(&session_id, &g.id);
    // Live until this function returns: after the end is audited, or on any error.
    let _live = Registered(&state.live_sessions, &session_id);

    let outcome: std::result::Result<(u64, u64, String), RelayError> = async {
        // Setup: a pty perhaps, then the one request that starts the session.
        let mut pending_pty = None;
        let mut sftp = None;
        // What the client sent while its command was held: passed on once it starts.
        let mut early = Early::default();
        let mut end_reason = "closed".to_string();
        let start = loop {
            let msg = tokio::select! {
                m = client.wait() => m,
                why = kill.wait() => {
                    end_reason = why;
                    None
                }
            };
            let Some(msg) = msg else {
                break None;
            };
            match msg {
                ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                    ..
                } => {
                    let _ = with_rec(&|r| {
                        r.resize(col_width, row_height);
                        r.terminal();
                    });
                    pending_pty = Some((
                        term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        terminal_modes,
                    ));
                }
                ChannelMsg::Exec { command, .. } => {
                    // What is judged must be what runs: bytes that are not UTF-8 would
                    // be judged as something else.
                    // The role's lists as they are when the command comes (a reload
                    // may have changed them since the channel opened).
                    let Some((blocked, review)) = command_rules(&state, &g) else {
                        let why = "twokey: the role of your grant is no longer in the policy\r\n";
                        let _ = client.extended_data_bytes(1, why.as_bytes().to_vec()).await;
                        let _ = client.exit_status(126).await;
                        end_reason = "refused: role removed".into();
                        break None;
                    };
                    let judged = !blocked.is_empty() || !review.is_empty();
                    let Ok(cmd) = String::from_utf8(command.to_vec()) else {
                        if judged {
                            let why = "twokey: the command is refused: commands are judged for this role, and this one is not UTF-8\r\n";
                            let _ = client.extended_data_bytes(1, why.as_bytes().to_vec()).await;
                            let _ = client.exit_status(126).await;
                            end_reason = "refused: not UTF-8".into();
                            break None;
                        }
                        let _ = with_rec(&|r| r.input(&command));
                        break Some(Start::Exec(command));
                    };
                    if let Some(p) = commands::blocked_by(&blocked, &cmd) {
                        // Blocked whether or not this can be audited (a failure is
                        // logged): the refusal never depends on the audit.
                        let _ = audit(
                            &state,
                            &g.user_email,
                            "session.command_blocked",
                            &g.id,
                            json!({
                                "session_id": session_id, "command": cmd, "pattern": p,
                            }),
                        )
                        .await;
                        let why = format!(
                            "twokey: the command is blocked for this role (matches {p:?})\r\n"
                        );
                        let _ = client.extended_data_bytes(1, why.into_bytes()).await;
                        let _ = client.exit_status(126).await;
                        end_reason = "blocked".into();
                        break None;
                    }
                    if let Some(p) = commands::blocked_by(&review, &cmd) {
                        let pty = pending_pty.is_some();
                        let held = hold_command(
                            &state, &g, &session_id, &cmd, &p, &mut client, &kill, &mut early, pty,
                        )
                        .await;
                        let _ = with_rec(&|r| r.note(&held.note));
                        if !held.runs {
                            let _ = client
                                .extended_data_bytes(1, format!("twokey: {}\r\n", held.told).into_bytes())
                                .await;
                            let _ = client.exit_status(126).await;
                            end_reason = held.note;
                            break None;
                        }
                        let _ = client
                            .extended_data_bytes(1, format!("twokey: {}\r\n", held.told).into_bytes())
                            .await;
                    }
                    let _ = with_rec(&|r| r.input(&command));
                    break Some(Start::Exec(command));
                }
                ChannelMsg::RequestShell { .. } => break Some(Start::Shell),
                ChannelMsg::RequestSubsystem { name, .. } => {
                    let _ = with_rec(&|r| r.note(&format!("subsystem {name}")));
                    // sftp (and scp, which speaks sftp since OpenSSH 9) is read as it
                    // passes, so every file it touches is recorded. Any other subsystem
                    // is a byte stream the relay cannot record: refused.
                    if name != "sftp" {
                        let why = format!(
                            "twokey: the subsystem {name:?} is refused: only sftp can be recorded\r\n"
                        );
                        let _ = client.extended_data_bytes(1, why.into_bytes()).await;
                        let _ = client.exit_status(1).await;
                        end_reason = format!("subsystem {name:?} refused");
                        break None;
                    }
                    sftp = Some(Arc::new(std::sync::Mutex::new(sftp::Sftp::default())));
                    break Some(Start::Subsystem(name));
                }
                ChannelMsg::Close | ChannelMsg::Eof => break None,
                _ => {}
            }
        };

        // Nothing starts that cannot be recorded (a full disk, say).
        let start = match start {
            Some(_) if !with_rec(&|r| r.flush()) => {
                let why = format!("twokey: session ended: {RECORDING_FAILED}\r\n");
                let _ = client.extended_data_bytes(1, why.into_bytes()).await;
                let _ = client.exit_status(255).await;
                end_reason = RECORDING_FAILED.into();
                None
            }
            start => start,
        };

        // The one request that starts it, sent once the target is reached.
        let upstream = match start {
            None => None,
            Some(start) => {
                let up = open_upstream(&state, &admitted, &session_id, pending_pty.take(), &kill);
                let (h, ch) = match up.await {
                    Ok(up) => up,
                    Err(e) => return Err(tell_failure(&client, &g.resource, e).await),
                };
                match start {
                    Start::Exec(command) => ch.exec(true, command).await,
                    Start::Shell => ch.request_shell(true).await,
                    Start::Subsystem(name) => ch.request_subsystem(true, name).await,
                }
                .map_err(|e| RelayError::UpstreamRequest(e.to_string()))?;
                // What the client sent while its command waited, recorded and passed on.
                if !early.data.is_empty() {
                    let _ = with_rec(&|r| r.input(&early.data));
                    ch.data(&early.data[..])
                        .await
                        .map_err(|e| RelayError::UpstreamRequest(e.to_string()))?;
                }
                if early.eof {
                    let _ = ch.eof().await;
                }
                Some((h, ch))
            }
        };

        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        if let Some((_handle, up)) = upstream {
            let tap = match &sftp {
                Some(s) => Tap::Sftp(rec.clone(), s.clone()),
                None => Tap::Terminal(rec.clone()),
            };
            let pumped = pump(client, up, Some(tap), &kill, Some(session)).await;
            if let Some(s) = &sftp {
                let open = s.lock().map(|mut s| s.unclosed()).unwrap_or_default();
                let _ = with_rec(&|r| open.iter().for_each(|l| r.note(l)));
            }
            (bytes_in, bytes_out) = (pumped.bytes_in, pumped.bytes_out);
            if let Some(why) = pumped.cut {
                end_reason = why;
            }
        } else {
            let _ = client.eof().await;
            let _ = client.close().await;
        }
        Ok((bytes_in, bytes_out, end_reason))
    }
    .await;
    let (bytes_in, bytes_out, end_reason) = match outcome {
        Ok(o) => o,
        // Whatever failed (the target unreachable, its host key not the pinned one),
        // the engineer heard it (tell_failure) and the session is still closed and
        // accounted for.
        Err(e) => {
            tracing::warn!(error = %e, session = %session_id, "relay session failed");
            (0, 0, format!("failed: {e}"))
        }
    };
    // A command still held when its session ended never runs.
    if let Err(e) = crate::access::held::withdraw_session(&state, &session_id, &end_reason).await {
        tracing::warn!(error = %e, session = %session_id, "relay: cannot withdraw the session's held command; the sweeper will");
    }
    let done = match rec.lock().map_err(|_| RelayError::RecordingPoisoned) {
        Ok(mut r) => r.finish().map_err(RelayError::Recording),
        Err(e) => Err(e),
    };
    lifecycle::close(
        &state,
        lifecycle::Closing {
            id: &session_id,
            grant: &g,
            reason: &end_reason,
            bytes_in,
            bytes_out,
            recording: done,
            recording_path: &recording_path,
        },
    )
    .await
    .map_err(RelayError::Store)
}

/// A forwarded port (`ssh -L`), when the role allows it: the target's sshd opens the
/// connection, over the relay's own upstream login. Its bytes are the application's,
/// so they are counted and audited, not recorded; it is cut like any session.
pub(super) async fn forward(
    state: AppState,
    admitted: Admitted,
    client: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    (host, port): (String, u32),
    (from_host, from_port): (String, u32),
) {
    let id = uuid::Uuid::new_v4().to_string();
    let g = &admitted.grant;
    let destination = format!("{host}:{port}");
    let cut = state.live_sessions.register(&id, &g.id);
    let _live = Registered(&state.live_sessions, &id);
    let opened = async {
        let handle = tokio::time::timeout(
            Duration::from_secs(20),
            connect_upstream(&state, &admitted, &id),
        )
        .await
        .map_err(|_| RelayError::UpstreamLoginTimeout)??;
        let up = handle
            .channel_open_direct_tcpip(host.clone(), port, from_host, from_port)
            .await
            .map_err(|e| RelayError::ForwardFailed {
                destination: destination.clone(),
                reason: e.to_string(),
            })?;
        Ok::<_, RelayError>((handle, up))
    }
    .await;
    let (_handle, up) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(error = %e, "relay: a forwarded port could not be opened");
            // Refused whether or not this can be audited (a failure is logged).
            let _ = audit(
                &state,
                &g.user_email,
                "session.forward_failed",
                &g.id,
                json!({ "forward_id": id, "destination": destination, "error": e.to_string() }),
            )
            .await;
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    // Audited before any byte passes: a forward that cannot be audited is refused.
    if audit(
        &state,
        &g.user_email,
        "session.forward_opened",
        &g.id,
        json!({ "forward_id": id, "destination": destination }),
    )
    .await
    .is_err()
    {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    }
    reply.accept().await;
    let pumped = pump(client, up, None, &cut, None).await;
    // The forward is over: nothing is left to refuse, and a failure is logged (its
    // opening was audited before any byte passed).
    let _ = audit(
        &state,
        &g.user_email,
        "session.forward_closed",
        &g.id,
        json!({
            "forward_id": id, "destination": destination,
            "reason": pumped.cut.unwrap_or_else(|| "closed".into()),
            "bytes_from_client": pumped.bytes_in, "bytes_to_client": pumped.bytes_out,
        }),
    )
    .await;
}

/// Tells the engineer why their session could not start, closes the channel, and
/// hands the error back for the audit.
async fn tell_failure(client: &Channel<Msg>, resource: &str, e: RelayError) -> RelayError {
    let _ = client
        .extended_data_bytes(
            1,
            format!("twokey: cannot open a session on {resource}: {e}\r\n").into_bytes(),
        )
        .await;
    let _ = client.exit_status(255).await;
    let _ = client.eof().await;
    let _ = client.close().await;
    e
}

/// The request that starts a relayed session.
/// Input a client sent while its command was held: kept (up to [`EARLY_MAX`]) to pass
/// on once the command starts, with the client's EOF if it sent one.
#[derive(Default)]
struct Early {
    data: Vec<u8>,
    eof: bool,
}

/// Input kept while a command is held; past this the command is refused (its input
/// would be lost).
const EARLY_MAX: usize = 1 << 20;

/// How often a held command's decision is looked for.
const HELD_CHECK: Duration = Duration::from_millis(200);

/// What became of a held command: whether it runs, what the engineer is told, and the
/// recording's note.
struct HeldOutcome {
    runs: bool,
    told: String,
    note: String,
}

/// The role's `blocked_commands` and `review_commands` as they are now; none when a
/// reload removed the role.
fn command_rules(
    state: &AppState,
    g: &crate::store::GrantRow,
) -> Option<(Vec<String>, Vec<String>)> {
    state
        .config()
        .role(&g.resource, &g.role)
        .map(|(_, r)| (r.blocked_commands.clone(), r.review_commands.clone()))
}

/// An exec command the role holds for review (`review_commands`): filed for its
/// approvers, the engineer told on stderr where it waits, and waited on until it is
/// decided, its wait runs out, the session is cut or the client closes. Approved (and
/// claimed, so it runs once), it runs; anything else refuses it.
#[allow(clippy::too_many_arguments)]
async fn hold_command(
    state: &AppState,
    g: &crate::store::GrantRow,
    session_id: &str,
    cmd: &str,
    pattern: &str,
    client: &mut Channel<Msg>,
    kill: &Arc<crate::relay::live::Cut>,
    early: &mut Early,
    pty: bool,
) -> HeldOutcome {
    use crate::access::held;
    use crate::policy::{Decision, HeldStatus};
    use sha2::Digest;
    let refused = |told: String| HeldOutcome {
        runs: false,
        note: format!("held command refused: {told}"),
        told,
    };
    let sha = hex::encode(sha2::Sha256::digest(cmd.as_bytes()));
    let why = format!("the command matches {pattern:?} (review_commands)");
    let filed = held::file(
        state,
        &held::Filing {
            session_id,
            grant: g,
            protocol: "ssh",
            action: cmd,
            params: &[],
            action_sha256: &sha,
            parse: &crate::store::HeldParse {
                kinds: commands::simple_commands(cmd),
                tables: Vec::new(),
            },
            why: &why,
        },
    )
    .await;
    let h = match filed {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, session = %session_id, "relay: a held command could not be filed; it is refused");
            return refused("the command is held for review, and twokey could not file it right now; it did not run".into());
        }
    };
    let until = crate::clock::from_millis(h.expires_at).format("%H:%M:%S UTC");
    let groups = state
        .config()
        .role(&h.resource, &h.role)
        .map(|(_, r)| r.approver_groups.join(", "))
        .unwrap_or_default();
    let url = format!("{}/held/{}", state.config().public_url(), h.id);
    let _ = client
        .extended_data_bytes(
            1,
            format!(
                "twokey: this command is held for review: {why}. It runs once {} of {groups} approve it (not you); it waits until {until}: {url}\r\n",
                h.required_approvals
            )
            .into_bytes(),
        )
        .await;
    let mut tick = tokio::time::interval(HELD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            why = kill.wait() => {
                let _ = held::end(state, &h.id, HeldStatus::Withdrawn, &format!("its session ended: {why}")).await;
                return refused(format!("session ended: {why}; the held command did not run"));
            }
            msg = client.wait() => match msg {
                // Ctrl-C on a terminal: the engineer withdraws it.
                Some(ChannelMsg::Data { data }) if pty && data.contains(&3) => {
                    let _ = held::end(state, &h.id, HeldStatus::Withdrawn, "cancelled by the engineer").await;
                    return refused("cancelled by you while it waited; the held command did not run".into());
                }
                Some(ChannelMsg::Data { data }) if early.data.len() + data.len() <= EARLY_MAX => {
                    early.data.extend_from_slice(&data);
                    continue;
                }
                Some(ChannelMsg::Data { .. }) => {
                    let _ = held::end(state, &h.id, HeldStatus::Withdrawn, "its input overflowed while it waited").await;
                    return refused("the command's input is too large to keep while it waits; it did not run".into());
                }
                Some(ChannelMsg::Eof) => {
                    early.eof = true;
                    continue;
                }
                None | Some(ChannelMsg::Close) => {
                    let _ = held::end(state, &h.id, HeldStatus::Withdrawn, "the client left while it waited").await;
                    return refused("the client left; the held command did not run".into());
                }
                Some(_) => continue,
            },
        }
        let mut decisions = Vec::new();
        let status = match held::standing(state, &h.id).await {
            Ok((status, d)) => {
                decisions = d;
                status
            }
            // The wait ends at its time even when the store cannot answer.
            Err(_) if state.now_ms() >= h.expires_at => HeldStatus::Expired,
            Err(e) => {
                tracing::warn!(error = %e, held = %h.id, "relay: cannot read a held command's decision; will retry");
                continue;
            }
        };
        let who = |d: Decision| crate::access::held::who_decided(&decisions, d);
        return match status {
            HeldStatus::Pending => continue,
            // Approved as the session is cut: never claimed.
            HeldStatus::Approved if let Some(why) = kill.reason() => {
                let _ = held::end(state, &h.id, HeldStatus::Withdrawn, &format!("its session ended: {why}")).await;
                refused(format!("session ended: {why}; the held command did not run"))
            }
            // Approved, and a reload blocked it since: the rules have the last word.
            HeldStatus::Approved
                if let Some(why) = match command_rules(state, g) {
                    None => Some("the role of your grant is no longer in the policy".to_string()),
                    Some((blocked, _)) => commands::blocked_by(&blocked, cmd)
                        .map(|p| format!("the command is now blocked for this role (matches {p:?})")),
                } =>
            {
                let _ = held::end(state, &h.id, HeldStatus::Withdrawn, &why).await;
                refused(format!("{why}; it did not run"))
            }
            HeldStatus::Approved => match held::claim_run(state, &h.id).await {
                Ok(true) => {
                    let by = who(Decision::Approve);
                    HeldOutcome {
                        runs: true,
                        told: format!("approved by {by}: running it once"),
                        note: format!("held command approved by {by}; run once ({})", h.id),
                    }
                }
                Ok(false) => refused(
                    "the command was approved, but its grant is no longer live; it did not run"
                        .into(),
                ),
                Err(_) if state.now_ms() >= h.expires_at => refused(
                    "the command was approved, but twokey could not record that it runs; it did not run"
                        .into(),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, held = %h.id, "relay: cannot claim an approved command; will retry");
                    continue;
                }
            },
            HeldStatus::Denied => refused(format!(
                "the command was denied by {}; it did not run",
                who(Decision::Deny)
            )),
            HeldStatus::Expired => {
                let _ = held::end(
                    state,
                    &h.id,
                    HeldStatus::Expired,
                    "not decided within the role's review wait",
                )
                .await;
                refused(format!(
                    "the command was not approved by {until}; it did not run"
                ))
            }
            HeldStatus::Withdrawn | HeldStatus::Ran => refused(format!(
                "the command is {status} and cannot run again; it did not run"
            )),
        };
    }
}

enum Start {
    Exec(Vec<u8>),
    Shell,
    Subsystem(String),
}

/// Tells a refused engineer why, on stderr, and closes.
pub(super) async fn explain(mut channel: Channel<Msg>, why: String) {
    // Wait for the shell or exec request so the client shows what follows.
    while let Some(msg) = channel.wait().await {
        if matches!(
            msg,
            ChannelMsg::Exec { .. } | ChannelMsg::RequestShell { .. }
        ) {
            break;
        }
    }
    let _ = channel
        .extended_data_bytes(1, format!("twokey: {why}\r\n").into_bytes())
        .await;
    let _ = channel.exit_status(1).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}
