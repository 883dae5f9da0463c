//! `deptsync run`: the service. One runner per source, woken by its cron schedule, under
//! one shutdown tree.
//!
//! - Start: the config is already valid; the database may not be up yet, so connecting
//!   and migrating are retried with backoff until they succeed or a shutdown comes. Then
//!   every source is scheduled, passed once at once, and systemd is told `READY=1`.
//! - A source never has two passes at once: a tick that finds the previous pass still
//!   running is skipped; across processes the store's per-source lock does the same.
//! - A failing pass (the database or the vendor away) never ends the process: it is
//!   recorded when possible, and the source's ticks back off until a pass succeeds.
//! - The watchdog is fed only while every runner shows signs of life: a pass that has
//!   heard nothing from its source or its database for longer than any call of theirs
//!   may take is stuck, and systemd restarts the service.
//! - Shutdown: stop scheduling, cancel the passes (each commits the page in hand and is
//!   recorded as `cancelled`), wait for them at most `shutdown_timeout`, return.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Settings;
use crate::engine::{self, PassError, PassRequest};
use crate::sources::Connector;
use crate::store::{AnyStore, StoreError};

/// The longest wait between two attempts to reach the database at start, and between two
/// passes of a source that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("building the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("scheduling the sources")]
    Scheduler(#[source] JobSchedulerError),
    #[error("listening for metrics on {address}")]
    MetricsListen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The database refused in a way that waiting cannot mend (see
    /// [`StoreError::is_permanent`]): the service ends, and its manager says so.
    #[error("database {database}")]
    Database {
        database: String,
        #[source]
        source: StoreError,
    },
}

/// The service, built from a valid config; [`Daemon::run_until`] runs it.
pub struct Daemon {
    settings: Settings,
    connectors: Vec<Connector>,
}

impl Daemon {
    /// Prepares the service. Does no I/O.
    pub fn build(settings: Settings) -> Result<Daemon, DaemonError> {
        let connectors = crate::app::ready(&settings.sources)
            .map_err(DaemonError::Http)?
            .into_iter()
            .map(|source| source.connector)
            .collect();
        Ok(Daemon {
            settings,
            connectors,
        })
    }

    /// Runs until `shutdown` completes, then stops gracefully. Errors only when the
    /// service cannot start (the metrics address, the scheduler); the database and the
    /// vendors being away are waited out.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics_listener = match self.settings.daemon.metrics_listen {
            None => None,
            Some(address) => Some(
                crate::metrics::bind(address)
                    .await
                    .map_err(|source| DaemonError::MetricsListen { address, source })?,
            ),
        };
        tokio::pin!(shutdown);

        // Served from the start: while the database is not reached yet, /healthz says so.
        let connected: Arc<tokio::sync::OnceCell<AnyStore>> = Arc::default();
        if let Some(listener) = metrics_listener {
            let handle = crate::metrics::install()?;
            let health_store = connected.clone();
            let healthy = move || {
                let store = health_store.get().cloned();
                async move {
                    match store {
                        Some(store) => store.ping().await.is_ok(),
                        None => false,
                    }
                }
            };
            let serving = crate::metrics::serve(listener, handle, healthy, cancel.clone());
            tracker.spawn(async move {
                if let Err(e) = serving.await {
                    tracing::error!(error = %e, "the metrics endpoint stopped");
                }
            });
        }

        tracing::info!(
            database = %self.settings.database.redacted_url(),
            kind = self.settings.database.kind.as_str(),
            "opening the store"
        );
        let store = tokio::select! {
            store = connect_with_backoff(&self.settings) => store.map_err(|source| {
                cancel.cancel();
                DaemonError::Database {
                    database: self.settings.database.redacted_url(),
                    source,
                }
            })?,
            () = &mut shutdown => {
                tracing::info!("shutdown before the database was reached");
                cancel.cancel();
                return Ok(());
            }
        };
        let _ = connected.set(store.clone());
        let names: Vec<String> = self
            .settings
            .sources
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        crate::app::register(&store, &names).await;

        let mut scheduler = JobScheduler::new().await.map_err(DaemonError::Scheduler)?;
        let mut runners = Vec::with_capacity(self.settings.sources.len());
        let call_timeout = crate::store::call_timeout(self.settings.database.statement_timeout);
        for (source, connector) in self.settings.sources.iter().zip(self.connectors) {
            let runner = Arc::new(Runner {
                name: source.name.to_string(),
                connector,
                history_retention: source.history_retention,
                busy: AtomicBool::new(false),
                wake: Notify::new(),
                backoff: Mutex::new(Backoff::default()),
                heartbeat: Heartbeat::default(),
                // The silence a pass may keep: one call to its source, and the database
                // calls around a page (its commit, the record of the run, the unlock).
                stall_limit: crate::sources::http::longest_call(&source.http) + call_timeout * 3,
            });
            let ticking = runner.clone();
            let job = Job::new_async(source.schedule.as_str(), move |_, _| {
                let runner = ticking.clone();
                Box::pin(async move { runner.tick().await })
            })
            .map_err(DaemonError::Scheduler)?;
            scheduler.add(job).await.map_err(DaemonError::Scheduler)?;
            tracker.spawn(runner.clone().run(store.clone(), cancel.clone()));
            runners.push(runner);
        }
        scheduler.start().await.map_err(DaemonError::Scheduler)?;
        for runner in &runners {
            runner.wake.notify_one();
        }
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("running"),
        ]);
        tracing::info!(sources = runners.len(), "deptsync is running");
        if let Some(interval) = sd_notify::watchdog_enabled() {
            tracker.spawn(keep_watchdog_fed(interval, runners.clone(), cancel.clone()));
        }

        shutdown.await;
        tracing::info!("shutting down: stopping after the pages in hand");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        if let Err(e) = scheduler.shutdown().await {
            tracing::warn!(error = %e, "stopping the scheduler");
        }
        cancel.cancel();
        tracker.close();
        let timeout = self.settings.daemon.shutdown_timeout;
        if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
            tracing::warn!(timeout = ?timeout, "passes did not stop in time; leaving them");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "telling systemd");
    }
}

/// Tells systemd the service is alive every half `interval`, while no runner is stuck:
/// one that is makes systemd restart the service after `WatchdogSec`.
async fn keep_watchdog_fed(
    interval: Duration,
    runners: Vec<Arc<Runner>>,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match runners.iter().find(|runner| runner.stuck()) {
            None => notify_systemd(&[sd_notify::NotifyState::Watchdog]),
            Some(stuck) => tracing::error!(
                source = %stuck.name,
                silent_for = ?stuck.heartbeat.silent_for(),
                limit = ?stuck.stall_limit,
                "a pass has heard nothing from its source or its database for longer than \
                 any call may take; no longer telling systemd the service is alive"
            ),
        }
    }
}

/// A runner's last sign of life: its pass started, its source answered, a page or a
/// window was stored.
#[derive(Debug)]
struct Heartbeat {
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Heartbeat {
    fn beat(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    fn silent_for(&self) -> Duration {
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

/// Connects to the database and applies the migrations, retrying an outage with
/// backoff; an error that waiting cannot mend is returned at once.
async fn connect_with_backoff(settings: &Settings) -> Result<AnyStore, StoreError> {
    let mut backoff = Backoff::default();
    loop {
        match AnyStore::open_with(&settings.database.url, settings.database.statement_timeout).await
        {
            Ok(store) => return Ok(store),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                let wait = backoff.failed();
                tracing::error!(
                    database = %settings.database.redacted_url(),
                    error = %engine::error_chain(&e),
                    retry_in = ?wait,
                    "database not ready"
                );
                notify_systemd(&[sd_notify::NotifyState::Status(&format!(
                    "waiting for the database: {}",
                    engine::error_chain(&e)
                ))]);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Exponential backoff: 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    until: Option<tokio::time::Instant>,
}

impl Backoff {
    /// Counts a failure; returns how long to wait before the next attempt.
    fn failed(&mut self) -> Duration {
        let wait = Duration::from_secs(1u64 << self.failures.min(16)).min(MAX_BACKOFF);
        self.failures += 1;
        self.until = Some(tokio::time::Instant::now() + wait);
        wait
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    fn waiting(&self) -> bool {
        self.until
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }
}

/// One source's runner: passes run here, one at a time, when the schedule wakes it.
struct Runner {
    name: String,
    connector: Connector,
    /// How long closed versions of its departments are kept (`None`: for ever).
    history_retention: Option<Duration>,
    busy: AtomicBool,
    wake: Notify,
    backoff: Mutex<Backoff>,
    /// The pass's last sign of life.
    heartbeat: Heartbeat,
    /// How long a pass may go without one before it is stuck.
    stall_limit: Duration,
}

impl Runner {
    /// A tick of the schedule: wakes the runner, unless a pass is still running or the
    /// source is backing off after failures.
    async fn tick(&self) {
        if self.busy.load(Ordering::Acquire) {
            tracing::info!(source = %self.name, "previous pass still running; tick skipped");
            crate::metrics::tick_skipped(&self.name);
            return;
        }
        if self.backoff.lock().await.waiting() {
            tracing::debug!(source = %self.name, "backing off after failed passes; tick skipped");
            return;
        }
        self.wake.notify_one();
    }

    /// A pass is running and has been silent for longer than it may be.
    fn stuck(&self) -> bool {
        self.busy.load(Ordering::Acquire) && self.heartbeat.silent_for() > self.stall_limit
    }

    async fn run(self: Arc<Self>, store: AnyStore, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
            }
            self.heartbeat.beat();
            self.busy.store(true, Ordering::Release);
            // In a task of its own, so that a panic in a pass fails that pass, not the
            // runner: the source keeps its schedule.
            let pass = {
                let (runner, store, cancel) = (self.clone(), store.clone(), cancel.clone());
                tokio::spawn(async move {
                    crate::app::pass(
                        &runner.name,
                        &runner.connector,
                        runner.history_retention,
                        &store,
                        PassRequest::INCREMENTAL,
                        &cancel,
                        &runner.heartbeat,
                    )
                    .await
                })
            };
            let result = pass.await;
            let mut backoff = self.backoff.lock().await;
            match result {
                Err(panic) => {
                    tracing::error!(source = %self.name, error = %crate::printable(&panic.to_string()), "the pass panicked; the next start records it as failed");
                    backoff.failed();
                }
                Ok(Ok(_)) => backoff.succeeded(),
                Ok(Err(PassError::Busy)) => {
                    tracing::info!(source = %self.name, "another process is syncing this source; tick skipped");
                }
                Ok(Err(_)) => {
                    // The engine logged and recorded the failure.
                    let wait = backoff.failed();
                    tracing::info!(source = %self.name, retry_after = ?wait, "next passes back off");
                }
            }
            drop(backoff);
            self.busy.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Progress;

    fn runner(stall_limit: Duration) -> Runner {
        let toml = r#"
            [[sources]]
            name = "hr"
            kind = "data_v1"
            base_url = "http://127.0.0.1:9"
            token = "t"
        "#;
        let settings = Settings::parse(toml, &|_| None).unwrap();
        Runner {
            name: "hr".to_owned(),
            connector: Connector::new(&settings.sources[0]).unwrap(),
            history_retention: None,
            busy: AtomicBool::new(false),
            wake: Notify::new(),
            backoff: Mutex::new(Backoff::default()),
            heartbeat: Heartbeat::default(),
            stall_limit,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_silent_for_longer_than_any_call_may_take_is_stuck() {
        let runner = runner(Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(!runner.stuck(), "an idle runner is never stuck");

        runner.heartbeat.beat();
        runner.busy.store(true, Ordering::Release);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!runner.stuck());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(runner.stuck(), "61 s without a word, for a limit of 60 s");

        // Any sign of life from the pass: the source answered.
        runner.heartbeat.answered();
        assert!(!runner.stuck());
    }
}
