//! Moving one channel's bytes both ways, each direction in its own task, through the
//! recording ([`Tap`]): what the engineer sends is recorded before it is passed on.
//!
//! This must never pass a byte it could not record: a recording that fails, or an sftp
//! stream that cannot be read, cuts the session (fail closed).

use std::sync::Arc;
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelMsg};

use super::sftp;
use crate::recording;
use crate::relay::error::RelayError;
use crate::relay::live::{Cut, GRANT_ENDED};

/// Where a relayed channel's bytes are recorded.
#[derive(Clone)]
pub(super) enum Tap {
    /// An exec or shell: what is typed and shown, into the asciicast.
    Terminal(Arc<std::sync::Mutex<recording::Recorder>>),
    /// sftp: each request with its paths into the asciicast; file contents counted.
    Sftp(
        Arc<std::sync::Mutex<recording::Recorder>>,
        Arc<std::sync::Mutex<sftp::Sftp>>,
    ),
}

impl Tap {
    fn recorder(&self) -> &std::sync::Mutex<recording::Recorder> {
        match self {
            Tap::Terminal(r) | Tap::Sftp(r, _) => r,
        }
    }

    /// Runs `f` on the recorder; Err (why the session must end) when it failed.
    fn with(
        &self,
        f: impl FnOnce(&mut recording::Recorder),
    ) -> std::result::Result<(), RelayError> {
        if recording::with(self.recorder(), f) {
            Ok(())
        } else {
            Err(RelayError::RecordingFailed)
        }
    }

    /// Records what the engineer sent, before it is passed on.
    fn client(&self, data: &[u8]) -> std::result::Result<(), RelayError> {
        match self {
            Tap::Terminal(_) => self.with(|r| r.input(data)),
            Tap::Sftp(_, sftp) => {
                let lines = sftp
                    .lock()
                    .map_err(|_| RelayError::SftpUnreadable)?
                    .requests(data)
                    .map_err(|e| {
                        tracing::warn!(error = %e, "relay: an sftp request stream does not parse");
                        RelayError::SftpUnreadable
                    })?;
                self.with(|r| lines.iter().for_each(|l| r.note(l)))
            }
        }
    }

    /// Records what the target sent back (for sftp, only the handles it hands out).
    fn target(&self, data: &[u8]) -> std::result::Result<(), RelayError> {
        match self {
            Tap::Terminal(_) => self.with(|r| r.output(data)),
            Tap::Sftp(_, sftp) => sftp
                .lock()
                .map_err(|_| RelayError::SftpUnreadable)?
                .replies(data)
                .map_err(|e| {
                    tracing::warn!(error = %e, "relay: an sftp reply stream does not parse");
                    RelayError::SftpUnreadable
                }),
        }
    }
}

/// What one relayed channel moved, and why it was cut (None: it ended by itself).
pub(super) struct Pumped {
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) cut: Option<String>,
}

/// Moves one channel's traffic both ways until either side closes or `kill` fires
/// (an admin, shutdown, or [`crate::relay::watcher`] when the grant ends).
/// Each direction runs in its own task: a direction blocked on flow control must never
/// stop the other from draining (that deadlocks bulk transfers).
///
/// `rec` records the bytes (terminal sessions); `session` is the engineer's SSH
/// session for exit signals and the messages a terminal shows when a session is cut
/// (None for a forwarded port, whose bytes are the application's own).
pub(super) async fn pump(
    client: Channel<Msg>,
    up: Channel<russh::client::Msg>,
    tap: Option<Tap>,
    kill: &Arc<Cut>,
    session: Option<russh::server::Handle>,
) -> Pumped {
    let terminal = session.is_some();
    // Records, and says whether the bytes may pass: a recording that can no longer be
    // written (or an sftp stream that cannot be read) ends the session (fail closed),
    // rather than let it go on unrecorded.
    let recording_cut = kill.clone();
    let record = move |f: &dyn Fn(&Tap) -> std::result::Result<(), RelayError>| match &tap {
        Some(tap) => match f(tap) {
            Ok(()) => true,
            Err(why) => {
                recording_cut.cut(&why.to_string());
                false
            }
        },
        None => true,
    };
    let (record_in, record_out) = (record.clone(), record);
    let client_id = client.id();
    let (mut client_rx, client_tx) = client.split();
    let (mut up_rx, up_tx) = up.split();
    let client_tx = Arc::new(client_tx);
    // Counted as they pass, so a cut session still accounts for what it moved.
    let (counted_in, counted_out) = (
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let count = |c: &std::sync::atomic::AtomicU64, n: usize| {
        c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    };
    // Client → target.
    let n = counted_in.clone();
    let mut inbound = tokio::spawn(async move {
        while let Some(msg) = client_rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    count(&n, data.len());
                    if !record_in(&|t| t.client(&data)) || up_tx.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                } => {
                    let _ = record_in(&|t| t.with(|r| r.resize(col_width, row_height)));
                    let _ = up_tx
                        .window_change(col_width, row_height, pix_width, pix_height)
                        .await;
                }
                ChannelMsg::Signal { signal } => {
                    let _ = up_tx.signal(signal).await;
                }
                ChannelMsg::Eof => {
                    let _ = up_tx.eof().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = up_tx.close().await;
    });
    // Target → client.
    let to_client = client_tx.clone();
    let n = counted_out.clone();
    let mut outbound = tokio::spawn(async move {
        while let Some(msg) = up_rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    count(&n, data.len());
                    if !record_out(&|t| t.target(&data))
                        || to_client.data_bytes(data).await.is_err()
                    {
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    count(&n, data.len());
                    if !record_out(&|t| t.target(&data)) {
                        break;
                    }
                    let _ = to_client.extended_data_bytes(ext, data).await;
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    let _ = to_client.exit_status(exit_status).await;
                }
                // Killed by a signal on the target: the engineer's ssh says so.
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    let _ = record_out(&|t| {
                        t.with(|r| r.note(&format!("exit signal {signal_name:?}")))
                    });
                    if let Some(session) = &session {
                        let _ = session
                            .exit_signal_request(
                                client_id,
                                signal_name,
                                core_dumped,
                                error_message,
                                lang_tag,
                            )
                            .await;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = to_client.eof().await;
                }
                // The target refused the shell, command or subsystem.
                ChannelMsg::Failure => {
                    let _ = to_client
                        .extended_data_bytes(
                            1,
                            b"twokey: the target refused this request\r\n".to_vec(),
                        )
                        .await;
                    let _ = to_client.exit_status(1).await;
                    break;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    });
    let cut = tokio::select! {
        // First, so a task that stopped because of a cut reports the cut.
        biased;
        why = kill.wait() => Some(why),
        _ = &mut outbound => {
            inbound.abort();
            None
        }
        _ = &mut inbound => {
            // The client is done; let the target's last words through, unless a cut
            // (the grant, an admin, the recording) comes first.
            tokio::select! {
                biased;
                why = kill.wait() => Some(why),
                _ = &mut outbound => None,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    outbound.abort();
                    None
                }
            }
        }
    };
    if let Some(why) = &cut {
        inbound.abort();
        outbound.abort();
        if terminal {
            let text = if why == GRANT_ENDED {
                "the grant has ended or was revoked; closing".to_string()
            } else {
                format!("session ended: {why}")
            };
            let _ = client_tx
                .extended_data_bytes(1, format!("\r\ntwokey: {text}\r\n").into_bytes())
                .await;
            let _ = client_tx.exit_status(255).await;
        }
    }
    let _ = client_tx.eof().await;
    let _ = client_tx.close().await;
    use std::sync::atomic::Ordering;
    Pumped {
        bytes_in: counted_in.load(Ordering::Relaxed),
        bytes_out: counted_out.load(Ordering::Relaxed),
        cut,
    }
}
