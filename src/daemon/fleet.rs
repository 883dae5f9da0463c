//! The sources this replica schedules with the fleet, and the passes it runs of them.
//!
//! Every replica runs the same loop ([`Fleet::claim`]): it says it is alive and claims
//! its share of the due sources whose lease is free, as many as it has room for
//! (`max_concurrent_passes`), then runs a pass of each under the lease it claimed. The
//! schedule is the fleet's: a claim moves the source's next due time to its schedule's
//! next firing, so each firing runs once among all replicas, and a replica that died
//! leaves its sources to the others when their leases lapse (the rules are in
//! [`crate::store::lease`]). A pass holds a database connection only while it reads or
//! writes, so a replica's connections are its pool's, whatever the number of sources.
//!
//! A reload ([`Fleet::reload`]) swaps the set of sources: a new one is due at once, a
//! removed one stops after the page in hand and is never claimed here again, a changed
//! one runs with its new settings from its next pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Settings;
use crate::config::Schedule;
use crate::engine::{self, Leasing, PassRequest};
use crate::sources::Connector;
use crate::store::lease::Claimed;
use crate::store::{AnyStore, Lease, PassEnd, Store};

/// A source this replica schedules: what its passes need.
struct FleetSource {
    name: String,
    connector: Connector,
    schedule: Schedule,
    /// How long closed versions of its departments are kept (`None`: for ever).
    history_retention: Option<Duration>,
    /// How long a pass may go without a sign of life before it is stuck: one call to its
    /// source, and the database calls around a page (its commit, the record of the run,
    /// the lease's release).
    stall_limit: Duration,
}

/// A pass running in this replica.
pub(super) struct RunningPass {
    /// The pass's last sign of life.
    pub heartbeat: Arc<Heartbeat>,
    pub stall_limit: Duration,
    /// Stops it after the page in hand (its source was removed, or a shutdown).
    cancel: CancellationToken,
}

impl RunningPass {
    /// Whether the pass has been silent for longer than it may be.
    pub fn stuck(&self) -> bool {
        self.heartbeat.silent_for() > self.stall_limit
    }
}

/// The longest a replica goes without looking for due sources.
pub(super) const POLL: Duration = Duration::from_secs(1);

/// Why a replica looks for due sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Its poll (a source due, or a second gone), a start or a reload.
    Poll,
    /// One of its passes ended: a slot is free.
    PassEnded,
}

/// The passes running in this replica, by source: shared with the watchdog.
pub(super) type Running = Arc<Mutex<HashMap<String, RunningPass>>>;

/// This replica's share of the fleet.
pub(super) struct Fleet {
    store: AnyStore,
    sources: BTreeMap<String, Arc<FleetSource>>,
    running: Running,
    /// The passes' tasks; each ends with its source's name.
    passes: JoinSet<String>,
    /// How many passes may run at once.
    room: usize,
    /// How long a claimed lease lasts without renewal.
    ttl: Duration,
    /// The bound on one database call, for the stall limits.
    call_timeout: Duration,
    /// Whether the current sources are on the fleet's schedule yet.
    scheduled: bool,
    /// Whether the last claim failed (so that an outage is logged once, not every poll).
    failing: bool,
    /// Whether more sources were due than the last claim took (it had no more room, or
    /// others were claiming them): a pass that ends looks for them at once rather than at
    /// the next poll.
    more_due: bool,
    /// When to look next: when the next source is due, and at most a poll after the last
    /// look (a source new to the fleet, another replica's failure).
    next_look: tokio::time::Instant,
    /// Cancelled at shutdown: every pass stops after the page in hand.
    shutdown: CancellationToken,
}

impl Fleet {
    /// The fleet's work for `settings`' sources, whose `connectors` are built (in the
    /// same order). Does no I/O.
    pub fn new(store: AnyStore, settings: &Settings, connectors: Vec<Connector>) -> Fleet {
        let call_timeout = crate::store::call_timeout(settings.database.statement_timeout);
        Fleet {
            store,
            sources: sources(settings, connectors, call_timeout),
            running: Running::default(),
            passes: JoinSet::new(),
            room: settings.daemon.max_concurrent_passes,
            ttl: settings.daemon.lease_ttl,
            call_timeout,
            scheduled: false,
            failing: false,
            more_due: true,
            next_look: tokio::time::Instant::now(),
            shutdown: CancellationToken::new(),
        }
    }

    /// The passes running, for the watchdog.
    pub fn running(&self) -> Running {
        self.running.clone()
    }

    /// How many sources this replica schedules.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// When to look for due sources next.
    pub fn next_look(&self) -> tokio::time::Instant {
        self.next_look
    }

    /// Waits for the next pass to end; never, while none runs.
    pub async fn pass_ended(&mut self) {
        match self.passes.join_next().await {
            Some(Ok(name)) => {
                self.running_passes().remove(&name);
            }
            // The task only awaits the pass's own task, whose panic it reports.
            Some(Err(e)) => tracing::error!(error = %e, "a pass's task ended abnormally"),
            None => std::future::pending().await,
        }
    }

    fn running_passes(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningPass>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts the sources on the fleet's schedule if they are not yet, then claims this
    /// replica's share of those due, as many as it has room for, and starts a pass of
    /// each: on every poll, and when a pass ended only if the last claim found more due
    /// than it had room for (so that a burst of passes ending does not ask the database
    /// each time). A database away is logged (once) and waited out: the next call tries
    /// again.
    pub async fn claim(&mut self, wake: Wake) {
        let room = self.room.saturating_sub(self.running_passes().len());
        if wake == Wake::PassEnded && !self.more_due {
            return;
        }
        let looked = tokio::time::Instant::now();
        self.next_look = looked + POLL;
        if room == 0 || self.shutdown.is_cancelled() {
            return;
        }
        let claimed = match self.schedule_and_claim(room).await {
            Ok(Claimed {
                leases,
                more_due,
                next_due_in,
            }) => {
                self.more_due = more_due;
                if std::mem::take(&mut self.failing) {
                    tracing::info!("the database answers again; claiming due sources");
                }
                if let Some(next_due_in) = next_due_in {
                    // Not sooner than a few milliseconds: the clocks may differ that much.
                    let wait = next_due_in.clamp(Duration::from_millis(10), POLL);
                    self.next_look = looked + wait;
                }
                leases
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(
                        error = %engine::error_chain(&e),
                        "cannot claim due sources; trying again every second"
                    );
                }
                return;
            }
        };
        for lease in claimed {
            self.start(lease);
        }
    }

    async fn schedule_and_claim(
        &mut self,
        room: usize,
    ) -> Result<Claimed, crate::store::StoreError> {
        let sources = &self.sources;
        let next_due = |name: &str, now_ms: i64| {
            sources
                .get(name)
                .and_then(|source| next_firing(&source.schedule, now_ms))
        };
        if !self.scheduled {
            let scheduled: Vec<(&str, &str)> = sources
                .values()
                .map(|source| (source.name.as_str(), source.schedule.as_str()))
                .collect();
            self.store.schedule(&scheduled, &next_due).await?;
            let names: Vec<String> = sources.keys().cloned().collect();
            crate::app::register(&self.store, &names).await;
            self.scheduled = true;
        }
        let names: Vec<&str> = {
            let running = self.running_passes();
            sources
                .keys()
                .map(String::as_str)
                .filter(|name| !running.contains_key(*name))
                .collect()
        };
        self.store.claim(&names, room, self.ttl, &next_due).await
    }

    /// Starts a pass of the source `lease` was claimed for.
    fn start(&mut self, lease: Lease) {
        let Some(source) = self.sources.get(&lease.source).cloned() else {
            // Claimed among this replica's sources, which change only between claims: not
            // reached. Were it, the lease would lapse on its own.
            tracing::error!(source = %lease.source, "claimed a source this replica does not have");
            return;
        };
        let heartbeat = Arc::new(Heartbeat::default());
        let cancel = self.shutdown.child_token();
        self.running_passes().insert(
            source.name.clone(),
            RunningPass {
                heartbeat: heartbeat.clone(),
                stall_limit: source.stall_limit,
                cancel: cancel.clone(),
            },
        );
        let store = self.store.clone();
        let claimed = lease.clone();
        self.passes.spawn(async move {
            let name = source.name.clone();
            // In a task of its own, so that a panic in a pass fails that pass, not the
            // replica: its lease is given back as failed (the source backs off), and the
            // next pass records the run as abandoned.
            let panicking = store.clone();
            let pass = tokio::spawn(async move {
                crate::app::pass(
                    &source.name,
                    &source.connector,
                    source.history_retention,
                    &store,
                    PassRequest::INCREMENTAL,
                    Leasing::Held(lease),
                    &cancel,
                    &*heartbeat,
                )
                .await
            });
            if let Err(panic) = pass.await {
                tracing::error!(
                    source = %name,
                    error = %crate::printable(&panic.to_string()),
                    "the pass panicked; the next one records it as failed"
                );
                if let Err(e) = panicking.release(&claimed, PassEnd::Failed).await {
                    tracing::warn!(source = %name, error = %engine::error_chain(&e), "could not give the lease back; it lapses on its own");
                }
            }
            name
        });
    }

    /// Makes `settings` the configuration: `connectors` are its sources' (in order).
    /// Sources new to this replica are put on the schedule (due at once when new to the
    /// fleet); removed ones stop after the page in hand; the others run with their new
    /// settings from their next pass.
    pub fn reload(&mut self, settings: &Settings, connectors: Vec<Connector>) {
        let new = sources(settings, connectors, self.call_timeout);
        let removed: Vec<&String> = self
            .sources
            .keys()
            .filter(|name| !new.contains_key(*name))
            .collect();
        let added = new
            .keys()
            .filter(|name| !self.sources.contains_key(*name))
            .count();
        for name in &removed {
            if let Some(pass) = self.running_passes().get(*name) {
                tracing::info!(source = %name, "removed from the configuration; stopping its pass after the page in hand");
                pass.cancel.cancel();
            }
        }
        tracing::info!(
            sources = new.len(),
            added,
            removed = removed.len(),
            "configuration reloaded"
        );
        self.sources = new;
        self.room = settings.daemon.max_concurrent_passes;
        self.ttl = settings.daemon.lease_ttl;
        self.scheduled = false;
    }

    /// Stops every pass after the page in hand and waits for them at most `timeout`;
    /// then tells the fleet this replica is gone (it would be forgotten anyway), within
    /// a second.
    pub async fn stop(mut self, timeout: Duration) {
        self.shutdown.cancel();
        let passes = async { while self.passes.join_next().await.is_some() {} };
        if tokio::time::timeout(timeout, passes).await.is_err() {
            tracing::warn!(timeout = ?timeout, "passes did not stop in time; leaving them");
        }
        match tokio::time::timeout(Duration::from_secs(1), self.store.replica_stops()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %engine::error_chain(&e), "could not tell the fleet this replica stops")
            }
            Err(_) => tracing::warn!(
                "the database did not answer in time; the fleet forgets this replica on its own"
            ),
        }
    }
}

/// The sources of `settings`, by name, with their `connectors`.
fn sources(
    settings: &Settings,
    connectors: Vec<Connector>,
    call_timeout: Duration,
) -> BTreeMap<String, Arc<FleetSource>> {
    settings
        .sources
        .iter()
        .zip(connectors)
        .map(|(source, connector)| {
            let source = FleetSource {
                name: source.name.to_string(),
                connector,
                schedule: source.schedule.clone(),
                history_retention: source.history_retention,
                stall_limit: crate::sources::http::longest_call(&source.http) + call_timeout * 3,
            };
            (source.name.clone(), Arc::new(source))
        })
        .collect()
}

/// When `schedule` fires next after the instant `now_ms` (ms since the epoch).
fn next_firing(schedule: &Schedule, now_ms: i64) -> Option<i64> {
    let now = DateTime::<Utc>::from_timestamp_millis(now_ms)?;
    schedule.next_after(now).map(|next| next.timestamp_millis())
}

/// A pass's last sign of life: it started, its source answered, a page or a window was
/// stored.
#[derive(Debug)]
pub(super) struct Heartbeat {
    last: Mutex<tokio::time::Instant>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            last: Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Heartbeat {
    fn beat(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    pub fn silent_for(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

impl engine::Progress for Heartbeat {
    fn windows_planned(&self, _: u64) {
        self.beat();
    }
    fn window_done(&self) {
        self.beat();
    }
    fn window_split(&self) {
        self.beat();
    }
    fn page_stored(&self, _: u64) {
        self.beat();
    }
    fn answered(&self) {
        self.beat();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Progress;

    #[tokio::test(start_paused = true)]
    async fn a_pass_silent_for_longer_than_any_call_may_take_is_stuck() {
        let pass = RunningPass {
            heartbeat: Arc::new(Heartbeat::default()),
            stall_limit: Duration::from_secs(60),
            cancel: CancellationToken::new(),
        };
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!pass.stuck());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(pass.stuck(), "61 s without a word, for a limit of 60 s");

        // Any sign of life from the pass: the source answered.
        pass.heartbeat.answered();
        assert!(!pass.stuck());
    }

    #[test]
    fn a_source_is_due_next_at_its_schedules_next_firing() {
        let every_minute = Schedule::parse("0 * * * * *").unwrap();
        let at = DateTime::parse_from_rfc3339("2026-11-30T12:01:00.300Z")
            .unwrap()
            .timestamp_millis();
        let next = DateTime::parse_from_rfc3339("2026-11-30T12:02:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(next_firing(&every_minute, at), Some(next));
    }
}
