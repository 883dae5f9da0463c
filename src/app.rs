//! The application layer: the configured sources made ready once, and passes of them run
//! and reported. `deptsync sync`, the demo and the service run their passes through it;
//! what differs between them (a schedule, a story, a command line) stays in theirs.

use std::time::Instant;

use crate::engine::{self, Leasing, PassError, PassReport, PassRequest, Progress};
use crate::model::RunOutcome;
use crate::progress::Display;
use crate::report::SourceRun;
use crate::sources::{Connector, SourceSettings};
use crate::store::{Limits, Store};

/// A configured source ready to run: its settings and its connector.
pub struct ReadySource<'a> {
    pub settings: &'a SourceSettings,
    pub connector: Connector,
}

impl ReadySource<'_> {
    /// The source's name.
    pub fn name(&self) -> &str {
        self.settings.name.as_str()
    }

    /// Whether it is read by update time (windows) rather than as a listing.
    pub fn windowed(&self) -> bool {
        matches!(self.connector, Connector::Windowed(_))
    }
}

/// Builds the connector of each of `sources`, once: an HTTP client of its own whose
/// requests spend its credential's rate budget. Does no I/O.
pub fn ready<'a>(
    sources: impl IntoIterator<Item = &'a SourceSettings>,
) -> Result<Vec<ReadySource<'a>>, reqwest::Error> {
    sources
        .into_iter()
        .map(|settings| {
            Ok(ReadySource {
                settings,
                connector: Connector::new(settings)?,
            })
        })
        .collect()
}

/// Records that the sources `names` are synced from now on, so that `status` counts a
/// source that never succeeded from then. Failing costs only that, so it is logged, not
/// returned.
pub async fn register<St: Store>(store: &St, names: &[String]) {
    if let Err(e) = store.register(names).await {
        tracing::warn!(
            error = %crate::error_chain(&e),
            "could not record the synced sources; status counts them from their first run"
        );
    }
}

/// What bounds the store of `settings`: its statements' timeout and its connections.
pub fn limits(settings: &crate::Settings) -> Limits {
    Limits {
        statement_timeout: settings.database.statement_timeout,
        max_connections: settings.database.max_connections,
    }
}

/// Runs one pass of the source `name` through `connector`, under the lease `leasing`
/// says, its progress told to `progress`, and after a pass that succeeded trims the
/// history the source's `history_retention` no longer keeps: a pass as `sync`, the demo
/// and the service run it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn pass<St: Store>(
    name: &str,
    connector: &Connector,
    history_retention: Option<std::time::Duration>,
    store: &St,
    request: PassRequest,
    leasing: Leasing,
    cancel: &tokio_util::sync::CancellationToken,
    progress: &dyn Progress,
) -> Result<PassReport, PassError> {
    let result =
        engine::run_pass_showing(name, connector, store, request, leasing, cancel, progress).await;
    if let (Ok(report), Some(retention)) = (&result, history_retention)
        && report.outcome == RunOutcome::Succeeded
    {
        trim_history(store, name, retention).await;
    }
    result
}

/// Deletes the versions of `source` that ended more than `retention` ago. Failing keeps
/// them a pass longer, so it is logged, not returned.
async fn trim_history<St: Store>(store: &St, source: &str, retention: std::time::Duration) {
    match store.trim_history(source, retention).await {
        Ok(0) => {}
        Ok(trimmed) => tracing::info!(source, trimmed, "trimmed history past its retention"),
        Err(e) => tracing::warn!(
            source,
            error = %crate::error_chain(&e),
            "could not trim history; the next pass tries again"
        ),
    }
}

/// Runs one pass of `source`, under its lease taken for `lease_ttl`, its progress shown
/// on `display`, and tells how it went. The engine has logged and recorded a failure; a
/// cancelled pass says `cancelled`.
pub async fn run_pass<St: Store>(
    source: &ReadySource<'_>,
    store: &St,
    request: PassRequest,
    lease_ttl: std::time::Duration,
    cancel: &tokio_util::sync::CancellationToken,
    display: &Display,
) -> SourceRun {
    let name = source.name();
    // Dropped when the pass ends, before the next source's: a finished bar stays on
    // screen as a line of its own, and what is printed next cannot be drawn over.
    let progress = display.source(name);
    let started = Instant::now();
    let result = pass(
        name,
        &source.connector,
        source.settings.history_retention,
        store,
        request,
        Leasing::Take { ttl: lease_ttl },
        cancel,
        &progress,
    )
    .await;
    let (shown, result, cancelled) = match result {
        Ok(report) if report.outcome == RunOutcome::Cancelled => {
            ("cancelled", Err("cancelled".to_owned()), true)
        }
        Ok(report) => ("done", Ok(report.totals), false),
        Err(e) => ("failed", Err(crate::error_chain(&e)), false),
    };
    progress.finish(shown);
    SourceRun {
        name: name.to_owned(),
        windowed: source.windowed(),
        elapsed: started.elapsed(),
        requests: None,
        result,
        cancelled,
    }
}
