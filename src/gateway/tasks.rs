//! The owner of every task kvgate spawns. [`Tasks::spawn`] is the one place that calls
//! `tokio::spawn` (clippy's `disallowed-methods` refuses it elsewhere): each task gets a name,
//! is tracked, and ends when its owner shuts down — [`Tasks::shutdown`] stops them all and
//! waits for them, within a bound, naming any that did not end. The [`Task`] handle a spawn
//! returns aborts its task when dropped, so a task can also belong to a smaller owner (a pool
//! member's scraper, a listener), or be [detached](Task::detach) to live until it ends or its
//! owner shuts down (a request's stream). [`Tasks::spawn_blocking`] runs blocking work (a file
//! read) the same way, on the runtime's blocking threads.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Spawns tasks and stops them. Cheap to clone: every clone spawns into, and shuts down, the
/// same set.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Tasks running, by name: what a shutdown that runs out of time reports.
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Tasks {
    /// An owner with no tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `future` as task `name` until it returns, its handle is dropped, or the owner shuts
    /// down (then the future is dropped at its next await point). Spawned after a shutdown, it
    /// ends at once. `name` is the task's tracing span and what [`Tasks::running`] counts.
    pub fn spawn<T, F>(&self, name: &'static str, future: F) -> Task<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        // A token of its own: polling it locks only its own waiter list, not the one every task
        // would share (a stream's task is polled at each message).
        let stop = self.stop.child_token();
        let alive = Alive::new(name, self.running.clone());
        let owned = async move {
            let _alive = alive;
            tokio::select! {
                biased;
                () = stop.cancelled() => None,
                out = future => Some(out),
            }
        };
        let owned = self.tracker.track_future(owned.instrument(tracing::debug_span!("task", name)));
        #[allow(clippy::disallowed_methods, reason = "the one spawn: tracked, named, and stopped by its owner")]
        let handle = tokio::spawn(owned);
        Task { handle, detached: false }
    }

    /// Runs blocking `work` (a file read) on the runtime's blocking threads as task `name`.
    /// Tracked like any task: a shutdown waits for it within its bound and names it if it is
    /// still running. But it cannot be stopped once started — only skipped if the owner is
    /// already shutting down — and dropping its handle only lets go of its output; so `work`
    /// must end by itself (a bounded read of a regular file does).
    pub fn spawn_blocking<T, F>(&self, name: &'static str, work: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let alive = Alive::new(name, self.running.clone());
        let (stop, tracked) = (self.stop.clone(), self.tracker.token());
        let owned = move || {
            let _owned = (alive, tracked);
            let _span = tracing::debug_span!("task", name).entered();
            (!stop.is_cancelled()).then(work)
        };
        #[allow(clippy::disallowed_methods, reason = "the one blocking spawn: tracked, named, waited for by its owner")]
        let handle = tokio::task::spawn_blocking(owned);
        Task { handle, detached: false }
    }

    /// The names of the tasks running, with how many run under each.
    pub fn running(&self) -> Vec<(&'static str, usize)> {
        self.running.lock().iter().map(|(name, n)| (*name, *n)).collect()
    }

    /// Tells every task to stop, without waiting (what dropping a server does).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops every task and waits up to `bound` for them to end; whether they all did. Those
    /// still running after it (a task blocking its thread does not see the stop) are logged by
    /// name.
    pub async fn shutdown(&self, bound: Duration) -> bool {
        self.stop();
        self.tracker.close();
        if tokio::time::timeout(bound, self.tracker.wait()).await.is_ok() {
            return true;
        }
        tracing::warn!(?bound, still_running = ?self.running(), "tasks did not stop in time");
        false
    }
}

/// A spawned task: awaiting it gives its output (`None` if it did not complete: stopped by its
/// owner, aborted, or panicked); dropping it aborts it, unless it was detached.
#[derive(Debug)]
#[must_use = "dropping a Task aborts it; `detach` it to let it run"]
pub struct Task<T = ()> {
    handle: JoinHandle<Option<T>>,
    detached: bool,
}

impl<T> Task<T> {
    /// Lets the task run until it ends or its owner shuts down.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl<T> Future for Task<T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        Pin::new(&mut self.handle).poll(cx).map(|joined| joined.ok().flatten())
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if !self.detached {
            self.handle.abort();
        }
    }
}

/// Counts its task under its name while the task's future exists (it is dropped however the
/// task ends).
struct Alive {
    name: &'static str,
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Alive {
    fn new(name: &'static str, running: Arc<Mutex<BTreeMap<&'static str, usize>>>) -> Self {
        *running.lock().entry(name).or_default() += 1;
        Self { name, running }
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        let mut running = self.running.lock();
        if let Some(n) = running.get_mut(self.name) {
            *n -= 1;
            if *n == 0 {
                running.remove(self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a two-thread runtime, as kvgate runs.
    fn check<F: Future<Output = ()>>(body: impl FnOnce() -> F) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(body());
    }

    #[test]
    fn a_shutdown_ends_tasks_that_would_run_forever_and_waits_for_them() {
        check(|| async {
            let tasks = Tasks::new();
            let (dropped_tx, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
            tasks
                .spawn("forever", async move {
                    let _tell = dropped_tx;
                    std::future::pending::<()>().await;
                })
                .detach();
            tasks
                .spawn("ticker", async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                })
                .detach();
            assert_eq!(tasks.running(), [("forever", 1), ("ticker", 1)]);
            assert!(tasks.shutdown(Duration::from_secs(10)).await, "every task ended");
            // Ended, not merely told: the futures are gone once the shutdown returns.
            assert!(tasks.running().is_empty(), "{:?}", tasks.running());
            assert!(dropped.try_recv().is_err_and(|e| e == tokio::sync::mpsc::error::TryRecvError::Disconnected));
        });
    }

    #[test]
    fn a_task_spawned_after_the_shutdown_ends_at_once() {
        check(|| async {
            let tasks = Tasks::new();
            assert!(tasks.shutdown(Duration::from_secs(1)).await);
            assert_eq!(tasks.spawn("late", std::future::pending::<()>()).await, None);
            assert!(tasks.running().is_empty());
        });
    }

    #[test]
    fn a_dropped_handle_aborts_its_task_and_a_finished_one_gives_its_output() {
        check(|| async {
            let tasks = Tasks::new();
            assert_eq!(tasks.spawn("answer", async { 42 }).await, Some(42));
            drop(tasks.spawn("forever", std::future::pending::<()>()));
            let clone = tasks.clone();
            assert!(clone.shutdown(Duration::from_secs(10)).await, "the aborted task counts as ended");
            assert!(tasks.running().is_empty());
        });
    }

    #[test]
    fn blocking_work_is_tracked_until_it_ends() {
        check(|| async {
            let tasks = Tasks::new();
            let (go_tx, go) = std::sync::mpsc::channel::<()>();
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let work = tasks.spawn_blocking("read", move || {
                let _ = started_tx.send(());
                go.recv().map(|()| 7).ok()
            });
            assert_eq!(tasks.running(), [("read", 1)]);
            started.await.expect("the work started");
            assert!(!tasks.shutdown(Duration::from_millis(20)).await, "it runs until its work ends");
            go_tx.send(()).expect("the work waits");
            assert_eq!(work.await, Some(Some(7)));
            assert!(tasks.shutdown(Duration::from_secs(10)).await);
            assert!(tasks.running().is_empty());
            assert_eq!(tasks.spawn_blocking("late", || 1).await, None, "skipped after a shutdown");
        });
    }

    #[test]
    fn a_task_that_blocks_its_thread_outlives_the_bound_and_is_named() {
        check(|| async {
            let tasks = Tasks::new();
            let (started_tx, started) = tokio::sync::oneshot::channel();
            tasks
                .spawn("blocking", async move {
                    let _ = started_tx.send(());
                    std::thread::sleep(Duration::from_millis(500));
                })
                .detach();
            started.await.expect("the task started");
            assert!(!tasks.shutdown(Duration::from_millis(20)).await, "the bound ran out");
            assert_eq!(tasks.running(), [("blocking", 1)]);
            assert!(tasks.shutdown(Duration::from_secs(10)).await, "it ends once its thread is free");
        });
    }
}
