//! `deptsync run`: the service, one replica of a fleet that may count one or many, under
//! one shutdown tree.
//!
//! - Start: the config is already valid; the database may not be up yet, so connecting
//!   and migrating are retried with backoff until they succeed or a shutdown comes. Then
//!   systemd is told `READY=1`, and the replica claims its share of the due sources.
//! - The schedule is the fleet's, in the database ([`fleet`]): each firing of a source's
//!   schedule runs once among the replicas, under the source's lease, whose fence lets
//!   only its holder write (a holder that lost it stops within the lease's time to live,
//!   and writes nothing more). A replica looks for due sources when the next is due, at
//!   least every second, and when a pass ends while more are due.
//! - A failing pass (the database or the vendor away) never ends the process: it is
//!   recorded when possible, and the source's next passes back off.
//! - `SIGHUP` (`systemctl reload`) reads the config file again: new sources start,
//!   removed ones stop after the page in hand, changed ones run with their new settings
//!   from their next pass; a config that does not validate is refused, the running one
//!   kept.
//! - The watchdog is fed only while no pass is stuck: a pass that has heard nothing from
//!   its source or its database for longer than any call of theirs may take, and systemd
//!   restarts the service.
//! - Shutdown: stop claiming, cancel the passes (each commits the page in hand, is
//!   recorded as `cancelled`, and leaves its source due again for another replica), wait
//!   for them at most `shutdown_timeout`, return.

mod fleet;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Settings;
use crate::engine;
use crate::sources::Connector;
use crate::store::{AnyStore, StoreError};
use fleet::{Fleet, Running, Wake};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("building the HTTP client")]
    Http(#[source] reqwest::Error),
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
    /// Where a reload reads the config from (none: a reload keeps the running one).
    config_path: Option<PathBuf>,
}

impl Daemon {
    /// Prepares the service. Does no I/O.
    pub fn build(settings: Settings) -> Result<Daemon, DaemonError> {
        let connectors = connectors(&settings).map_err(DaemonError::Http)?;
        Ok(Daemon {
            settings,
            connectors,
            config_path: None,
        })
    }

    /// Reloads read the config file at `path`.
    pub fn reloading_from(self, path: PathBuf) -> Daemon {
        Daemon {
            config_path: Some(path),
            ..self
        }
    }

    /// Runs until `shutdown` completes, then stops gracefully. Errors only when the
    /// service cannot start (the metrics address); the database and the vendors being
    /// away are waited out.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        let (_keep, reloads) = mpsc::channel(1);
        self.run_reloading(shutdown, reloads).await
    }

    /// [`Daemon::run_until`], reading the config again whenever `reloads` says so.
    pub async fn run_reloading(
        self,
        shutdown: impl Future<Output = ()> + Send,
        mut reloads: mpsc::Receiver<()>,
    ) -> Result<(), DaemonError> {
        let Daemon {
            mut settings,
            connectors: configured,
            config_path,
        } = self;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics_listener = match settings.daemon.metrics_listen {
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
            database = %settings.database.redacted_url(),
            kind = settings.database.kind.as_str(),
            "opening the store"
        );
        let store = tokio::select! {
            store = connect_with_backoff(&settings) => store.map_err(|source| {
                cancel.cancel();
                DaemonError::Database {
                    database: settings.database.redacted_url(),
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

        let mut fleet = Fleet::new(store.clone(), &settings, configured);
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("running"),
        ]);
        tracing::info!(
            sources = fleet.len(),
            replica = %store.holder(),
            "deptsync is running"
        );
        if let Some(interval) = sd_notify::watchdog_enabled() {
            tracker.spawn(keep_watchdog_fed(interval, fleet.running(), cancel.clone()));
        }

        let mut wake = Wake::Poll;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = fleet.claim(wake) => {}
            }
            let next_look = fleet.next_look();
            wake = tokio::select! {
                () = &mut shutdown => break,
                Some(()) = reloads.recv() => {
                    if let Some(reloaded) = reload_settings(config_path.as_deref(), &settings) {
                        match connectors(&reloaded) {
                            Ok(connectors) => {
                                fleet.reload(&reloaded, connectors);
                                settings = reloaded;
                            }
                            Err(e) => tracing::error!(
                                error = %engine::error_chain(&e),
                                "building the HTTP clients of the new configuration; keeping the running one"
                            ),
                        }
                    }
                    Wake::Poll
                }
                () = fleet.pass_ended() => Wake::PassEnded,
                () = tokio::time::sleep_until(next_look) => Wake::Poll,
            };
        }

        tracing::info!("shutting down: stopping after the pages in hand");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        fleet.stop(settings.daemon.shutdown_timeout).await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The config file at `path` read again and validated; `None` (said in the log) when it
/// does not validate, or there is none to read. What only a restart changes is compared
/// with `running`.
fn reload_settings(path: Option<&std::path::Path>, running: &Settings) -> Option<Settings> {
    let Some(path) = path else {
        tracing::warn!(
            "reload asked, but the service was started without a config file; nothing changed"
        );
        return None;
    };
    match Settings::load(path, &crate::config::process_env) {
        Ok(settings) => {
            let restart_only = settings.database.url.expose_secret()
                != running.database.url.expose_secret()
                || crate::app::limits(&settings) != crate::app::limits(running)
                || settings.daemon.metrics_listen != running.daemon.metrics_listen;
            if restart_only {
                tracing::warn!(
                    "the [database] settings and metrics_listen change only with a restart; \
                     the running ones are kept"
                );
            }
            Some(settings)
        }
        Err(e) => {
            tracing::error!(
                config = %path.display(),
                error = %e,
                "the new configuration does not validate; keeping the running one"
            );
            None
        }
    }
}

/// The connectors of `settings`' sources, in order.
fn connectors(settings: &Settings) -> Result<Vec<Connector>, reqwest::Error> {
    Ok(crate::app::ready(&settings.sources)?
        .into_iter()
        .map(|source| source.connector)
        .collect())
}

fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "telling systemd");
    }
}

/// Tells systemd the service is alive every half `interval`, while no pass is stuck:
/// one that is makes systemd restart the service after `WatchdogSec`.
async fn keep_watchdog_fed(interval: Duration, running: Running, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let stuck = running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, pass)| pass.stuck())
            .map(|(source, pass)| {
                (
                    source.clone(),
                    pass.heartbeat.silent_for(),
                    pass.stall_limit,
                )
            });
        match stuck {
            None => notify_systemd(&[sd_notify::NotifyState::Watchdog]),
            Some((source, silent_for, limit)) => tracing::error!(
                %source,
                ?silent_for,
                ?limit,
                "a pass has heard nothing from its source or its database for longer than \
                 any call may take; no longer telling systemd the service is alive"
            ),
        }
    }
}

/// Connects to the database and applies the migrations, retrying an outage with
/// backoff; an error that waiting cannot mend is returned at once.
async fn connect_with_backoff(settings: &Settings) -> Result<AnyStore, StoreError> {
    let mut failures = 0;
    loop {
        match AnyStore::open_with(&settings.database.url, &crate::app::limits(settings)).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                failures += 1;
                let wait = crate::store::lease::backoff(failures);
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
