//! The current [`Topology`], kept up to date by one refresher task.
//!
//! Triggers (a `MOVED` reply, a connection error to a node, the periodic
//! tick) only wake the refresher through a channel that holds one wake-up;
//! the refresher waits a short jittered moment, then takes whatever
//! wake-ups arrived meanwhile, so a burst of triggers (every client hitting
//! the same moved slot) becomes one `CLUSTER SLOTS` round, not one per
//! request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use super::slots::SLOTS;
use super::topology::{fetch, Topology};
use crate::net::Backoff;
use crate::upstream::Connector;

/// Triggers within this window (plus jitter) share one refresh.
const COLLAPSE: Duration = Duration::from_millis(20);

/// The cluster's slot map as nearcache currently believes it.
pub struct ClusterView {
    current: watch::Sender<Option<Arc<Topology>>>,
    wake: mpsc::Sender<()>,
    stop: Arc<Notify>,
    stopped: AtomicBool,
    refreshes: AtomicU64,
    /// Per slot, how many published views gave it another owner than the
    /// view before, counted under the watch's lock as each is published: a
    /// subscriber that missed a view (the watch keeps only the latest)
    /// still learns which slots moved, even away and back
    /// ([`ClusterView::owner_changes`]).
    owner_changes: Box<[AtomicU32]>,
    /// Why the last refresh failed (cleared by a successful one): told to
    /// clients while no view is known, so a wrong password or a TLS
    /// mismatch is not just "not known yet".
    last_error: parking_lot::Mutex<Option<String>>,
    connector: Connector,
    seeds: Vec<String>,
    interval: Duration,
}

impl ClusterView {
    /// Starts the refresher; the first view is asked of the seeds at once.
    pub fn start(connector: Connector) -> Arc<ClusterView> {
        let cfg = connector.config();
        let seeds = cfg
            .url
            .cluster
            .as_ref()
            .map(|c| c.addresses())
            .unwrap_or_else(|| vec![cfg.url.address()]);
        let (wake, woken) = mpsc::channel(1);
        let view = Arc::new(ClusterView {
            current: watch::channel(None).0,
            wake,
            stop: Arc::new(Notify::new()),
            stopped: AtomicBool::new(false),
            refreshes: AtomicU64::new(0),
            owner_changes: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            last_error: parking_lot::Mutex::new(None),
            interval: cfg.cluster.refresh_interval,
            connector,
            seeds,
        });
        tokio::spawn(refresher(Arc::downgrade(&view), woken));
        view
    }

    /// The latest view, once one node has answered.
    pub fn current(&self) -> Option<Arc<Topology>> {
        self.current.borrow().clone()
    }

    /// Sees every change of view (a new `Arc` each time the map changes).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Topology>>> {
        self.current.subscribe()
    }

    /// Asks for a refresh soon; concurrent calls collapse into one.
    pub fn refresh(&self) {
        // Full means a refresh is already due: this trigger is part of it.
        let _ = self.wake.try_send(());
    }

    /// A `MOVED` reply: the slot's new owner is known now, the rest of the
    /// map is probably out of date too (slots move in batches).
    pub fn moved(&self, slot: u16, addr: &str) {
        self.current.send_if_modified(|cur| match cur {
            Some(t) if t.owner(slot) != Some(addr) => {
                *cur = Some(Arc::new(t.with_owner(slot, addr)));
                self.owner_changes[slot as usize].fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        });
        self.refresh();
    }

    /// Why no view is known: "not known yet", with the last refresh's
    /// error when one failed.
    pub fn unknown(&self) -> String {
        match &*self.last_error.lock() {
            Some(e) => format!("the cluster's slot map is not known yet: {e}"),
            None => "the cluster's slot map is not known yet".into(),
        }
    }

    /// Did the last refresh get an answer (false while every node it
    /// asked failed; the last view is kept meanwhile)?
    pub fn answered(&self) -> bool {
        self.last_error.lock().is_none()
    }

    /// Per slot, how many published views changed its owner. Read while
    /// holding a borrow of a [`ClusterView::subscribe`] receiver, it counts
    /// up to the view borrowed (a view is published with its counts under
    /// the watch's lock).
    pub fn owner_changes(&self) -> Vec<u32> {
        self.owner_changes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// How many published views changed the owner of `slot`.
    pub fn owner_changes_of(&self, slot: u16) -> u32 {
        self.owner_changes
            .get(slot as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts the slots whose owner differs between `old` and `new`.
    fn count_owner_changes(&self, old: Option<&Topology>, new: &Topology) {
        for (s, count) in self.owner_changes.iter().enumerate() {
            if old.and_then(|t| t.owner(s as u16)) != new.owner(s as u16) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many `CLUSTER SLOTS` rounds have run (for tests and metrics).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_one();
    }

    /// Known masters first (the likeliest to know), then the seeds.
    fn candidates(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .current()
            .map(|t| t.masters().to_vec())
            .unwrap_or_default();
        for s in &self.seeds {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }
}

/// A few milliseconds that differ between sidecars, so a thousand of them
/// hit by the same slot move do not ask the cluster in the same instant.
fn jitter() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_millis(u64::from(nanos % 30))
}

/// Holds the view only while refreshing, so dropping every other `Arc`
/// ends the task at its next wake-up even without [`ClusterView::stop`].
async fn refresher(view: std::sync::Weak<ClusterView>, mut woken: mpsc::Receiver<()>) {
    let mut backoff = None::<Backoff>;
    loop {
        let Some(v) = view.upgrade() else { return };
        if v.stopped.load(Ordering::Acquire) {
            return;
        }
        let candidates = v.candidates();
        let current = v.current();
        let result = fetch(&v.connector, &candidates, current.as_deref()).await;
        v.refreshes.fetch_add(1, Ordering::Relaxed);
        let wait = match result {
            Ok(t) => {
                backoff = None;
                *v.last_error.lock() = None;
                v.current.send_if_modified(|cur| {
                    if cur.as_deref() == Some(&t) {
                        return false;
                    }
                    info!(masters = ?t.masters(), covered = t.covered(), "cluster slot map changed");
                    v.count_owner_changes(cur.as_deref(), &t);
                    *cur = Some(Arc::new(t));
                    true
                });
                v.interval
            }
            Err(e) => {
                warn!(error = %e, "cluster slot map refresh failed");
                *v.last_error.lock() = Some(e.detail());
                let b = backoff.get_or_insert_with(|| {
                    Backoff::new(v.connector.config().reconnect_backoff_max)
                });
                // Without any view yet, retry soon; with one, keep it until
                // a node answers.
                b.step().min(v.interval)
            }
        };
        let stop = v.stop.clone();
        drop(v);
        let woke = tokio::select! {
            w = woken.recv() => w.is_some(),
            _ = stop.notified() => return,
            _ = tokio::time::sleep(wait) => false,
        };
        if woke {
            tokio::time::sleep(COLLAPSE + jitter()).await;
            // Triggers during the pause are answered by the coming round.
            while woken.try_recv().is_ok() {}
        }
    }
}
