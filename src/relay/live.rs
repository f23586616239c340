//! The live-session registry: every open session, the grant it runs on, and its cut.
//!
//! Every relayed session (and forwarded port), whatever its protocol, is registered
//! here with the grant it runs on and a [`Cut`] that ends it: an admin ending one, a
//! stopping server ending all, an untrusted host key ending those on a resource, and
//! [`super::watcher`] ending those whose grant is no longer rightfully live. The one watcher
//! asks the store about all live sessions at once, so a second protocol adds no second
//! watcher. This must never keep a session alive on a grant the store did not just
//! confirm: a store that cannot answer cuts (fail closed).

use std::sync::Arc;

/// Why a session on a grant that ended or was revoked was cut.
pub(crate) const GRANT_ENDED: &str = "grant ended";
/// Why a session ends when its recording can no longer be written (a full disk, say).
pub(crate) const RECORDING_FAILED: &str = "its recording could not be written";

/// Why a live session is being ended from outside it, and the signal to end it.
#[derive(Default)]
pub struct Cut {
    notify: tokio::sync::Notify,
    reason: std::sync::Mutex<Option<String>>,
}

impl Cut {
    /// Ends the session with `reason` (the first reason given is kept).
    pub(crate) fn cut(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.notify.notify_one();
    }

    /// The reason it was cut for, if it was.
    pub(crate) fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Waits for the cut; returns its reason.
    pub(crate) async fn wait(&self) -> String {
        self.notify.notified().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "ended".into())
    }
}

/// Live sessions, so an admin can end one and a stopping server can end them all.
#[derive(Default)]
pub struct LiveSessions {
    /// Session (or forward) id → its cut, and the grant it runs on.
    map: std::sync::Mutex<std::collections::HashMap<String, (Arc<Cut>, String)>>,
}

impl LiveSessions {
    /// Puts a session (or forward) on the list; its cut is returned.
    pub(crate) fn register(&self, id: &str, grant_id: &str) -> Arc<Cut> {
        let c = Arc::new(Cut::default());
        if let Ok(mut m) = self.map.lock() {
            m.insert(id.to_string(), (c.clone(), grant_id.to_string()));
        }
        c
    }

    /// The grants live sessions run on.
    pub(crate) fn grant_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .map
            .lock()
            .map(|m| m.values().map(|(_, g)| g.clone()).collect())
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Ends, with `reason`, every session whose grant `keep` does not accept.
    pub(crate) fn cut_where(&self, keep: impl Fn(&str) -> bool, reason: &str) -> usize {
        let doomed: Vec<Arc<Cut>> = self
            .map
            .lock()
            .map(|m| {
                m.values()
                    .filter(|(_, g)| !keep(g))
                    .map(|(c, _)| c.clone())
                    .collect()
            })
            .unwrap_or_default();
        for c in &doomed {
            c.cut(reason);
        }
        doomed.len()
    }

    pub(crate) fn remove(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(id);
        }
    }

    /// An administrator ends a live session; false if it is not live here.
    pub fn terminate(&self, id: &str) -> bool {
        match self
            .map
            .lock()
            .ok()
            .and_then(|m| m.get(id).map(|(c, _)| c.clone()))
        {
            Some(c) => {
                c.cut("terminated by an administrator");
                true
            }
            None => false,
        }
    }

    /// Ends every live session, each with `reason`.
    pub fn cut_all(&self, reason: &str) {
        self.cut_where(|_| false, reason);
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.map.lock().is_ok_and(|m| m.contains_key(id))
    }

    pub fn is_empty(&self) -> bool {
        self.map.lock().map_or(true, |m| m.is_empty())
    }
}

/// Takes a session off the live list when dropped.
pub(crate) struct Registered<'a>(pub(crate) &'a LiveSessions, pub(crate) &'a str);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}
