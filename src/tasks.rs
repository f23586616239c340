//! Background work that runs on a tick: the sweeper, the outbox, the database-login
//! reconciler, the relay's cut watcher. The loop is written once, here.
//!
//! Stopping drains: each task finishes the pass it is in (an audit event half-written,
//! a message half-sent, a role half-dropped stays whole) and then returns. A pass that
//! does not finish within [`DRAIN_LIMIT`] is aborted, and that is logged by name: a
//! stuck peer must not hold shutdown for ever. This module must never decide anything
//! itself; it only says when the jobs run.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// How long [`Tasks::drain`] waits for the passes in flight before aborting them.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// A set of ticking background tasks that stop together.
pub struct Tasks {
    stop: watch::Sender<bool>,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            running: Vec::new(),
        }
    }

    /// Runs `pass` at once and then every `every` (a pass that overruns delays the next
    /// one; ticks are never bunched up), and also whenever `wake` is notified. A zero
    /// interval starts nothing: the job is switched off.
    pub fn every<F, Fut>(
        &mut self,
        name: &'static str,
        every: Duration,
        wake: Option<Arc<Notify>>,
        mut pass: F,
    ) where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        if every.is_zero() {
            return;
        }
        let mut stop = self.stop.subscribe();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Stop is checked first: once asked, no new pass starts.
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                    _ = woken(wake.as_deref()) => {}
                }
                pass().await;
            }
        });
        self.running.push((name, task));
    }

    /// Asks every task to stop after its current pass and waits for them, at most
    /// [`DRAIN_LIMIT`] in all; what is still running then is aborted and logged.
    pub async fn drain(self) {
        self.drain_within(DRAIN_LIMIT).await
    }

    /// [`Tasks::drain`], waiting at most `limit`.
    pub async fn drain_within(self, limit: Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + limit;
        for (name, mut task) in self.running {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "background task failed"),
                Err(_) => {
                    tracing::warn!(
                        task = name,
                        "background task did not finish its pass in time; aborted"
                    );
                    task.abort();
                }
            }
        }
    }
}

/// Resolves when `wake` is notified; never, when there is none.
async fn woken(wake: Option<&Notify>) {
    match wake {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A job that counts its passes.
    fn counter(n: &Arc<AtomicUsize>) -> impl FnMut() -> std::future::Ready<()> + Send + 'static {
        let n = n.clone();
        move || {
            n.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        }
    }

    /// Waits (bounded) until `n` reaches `at_least`.
    async fn reaches(n: &AtomicUsize, at_least: usize) -> bool {
        for _ in 0..500 {
            if n.load(Ordering::SeqCst) >= at_least {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn runs_at_once_and_on_wake_and_nothing_after_drain() {
        let passes = Arc::new(AtomicUsize::new(0));
        let wake = Arc::new(Notify::new());
        let mut tasks = Tasks::new();
        tasks.every(
            "count",
            Duration::from_secs(3600),
            Some(wake.clone()),
            counter(&passes),
        );
        assert!(reaches(&passes, 1).await, "first pass at once");
        wake.notify_one();
        assert!(reaches(&passes, 2).await, "a wake runs a pass");
        tasks.drain().await;
        let after = passes.load(Ordering::SeqCst);
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            passes.load(Ordering::SeqCst),
            after,
            "nothing runs after drain"
        );
    }

    #[tokio::test]
    async fn ticks_repeat() {
        let passes = Arc::new(AtomicUsize::new(0));
        let mut tasks = Tasks::new();
        tasks.every("tick", Duration::from_millis(5), None, counter(&passes));
        assert!(reaches(&passes, 3).await, "one pass per tick");
        tasks.drain().await;
    }

    #[tokio::test]
    async fn drain_lets_the_pass_in_flight_finish() {
        let finished = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let mut tasks = Tasks::new();
        let (f, s, r) = (finished.clone(), started.clone(), release.clone());
        tasks.every("slow", Duration::from_secs(3600), None, move || {
            let (f, s, r) = (f.clone(), s.clone(), r.clone());
            async move {
                s.notify_one();
                r.notified().await;
                f.fetch_add(1, Ordering::SeqCst);
            }
        });
        started.notified().await;
        let drained = tokio::spawn(tasks.drain());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!drained.is_finished(), "drain waits for the pass in flight");
        release.notify_one();
        drained.await.unwrap();
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the pass was not cut short"
        );
    }

    #[tokio::test]
    async fn drain_aborts_a_pass_that_hangs() {
        let started = Arc::new(Notify::new());
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut tasks = Tasks::new();
        let (s, d) = (started.clone(), dropped.clone());
        tasks.every("stuck", Duration::from_secs(3600), None, move || {
            let (s, d) = (s.clone(), d.clone());
            async move {
                struct OnDrop(Arc<AtomicUsize>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let _guard = OnDrop(d);
                s.notify_one();
                std::future::pending::<()>().await;
            }
        });
        started.notified().await;
        tasks.drain_within(Duration::from_millis(30)).await;
        assert!(reaches(&dropped, 1).await, "the stuck pass was aborted");
    }

    #[tokio::test]
    async fn a_zero_interval_starts_nothing() {
        let mut tasks = Tasks::new();
        tasks.every("off", Duration::ZERO, None, || async {});
        assert!(tasks.running.is_empty());
        tasks.drain().await;
    }
}
