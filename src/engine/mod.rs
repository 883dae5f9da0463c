//! One pass of one source: plan, fetch, store each page with its checkpoint.
//!
//! The engine knows neither vendor nor SQL: it asks a source for pages and hands each
//! one to a [`Store`] together with the position that follows it, in one commit. That is
//! the whole recovery story: after a crash, [`Store::load_state`] returns the position
//! after the last committed page, so a rerun repeats at most the page that was in flight
//! (one per window read at once) and never skips one.
//!
//! A windowed pass reads `[high-water mark - lookback, now)` (the first time, from the
//! source's `start`) in windows the source allows; when its last page is committed the
//! high-water mark becomes the pass's `now`. An interrupted pass resumes every window of
//! its ledger not done, each at its cursor, then plans on from there to the new `now`. A backfill reads a
//! range given by a person, keeps its own progress, and never touches the high-water mark.
//!
//! A full-listing pass reads the whole listing under a listing id; the store records the
//! ids each page saw under it. When a complete listing misses live departments, a second
//! listing confirms it, and the commit of its last page marks deleted what both missed
//! (unless that is more than the source's `max_delete_fraction` of the rows live when the
//! first began). A listing that fails or stops half way deletes nothing; the next pass
//! resumes it. A listing that changed under its page numbers starts again.
//!
//! - this module: a pass from its lease to its record, its errors and its report, and the
//!   two sides every pass has: the [`Reader`] that fetches pages and the [`Writer`] that
//!   commits them. A pass runs under its source's lease ([`crate::store::lease`]), which
//!   it renews every third of its time to live while it runs: a pass whose lease another
//!   process took over (this one paused, or cut off from the database past the lease's
//!   expiry) stops, writes nothing more (its store refuses it) and fails as having lost
//!   its lease;
//! - [`windowed`]: reading a windowed source's windows, several at once;
//! - [`listing`]: reading a listing source's whole listing, and confirming it;
//! - [`plan`]: the ledger of windows a windowed pass works through.

use std::future::Future;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::model::{
    Checkpoint, PageCounts, RunId, RunMode, RunOutcome, SyncState, WithheldDeletions,
};
use crate::sources::{Connector, Page, Source, SourceError};
use crate::store::{Commit, Lease, PassEnd, Store, StoreError};

mod listing;
pub(crate) mod plan;
mod windowed;

/// The most pages one pass reads of one window, or of one listing: far past any real one
/// (10 million departments at 1000 a page), so that an upstream that goes on promising a
/// next page for ever fails the pass (in under an hour at Mews' request rate) instead of
/// running it for ever. A resumed pass counts afresh, so such an upstream fails every
/// pass, and a listing that never ends never deletes.
const MAX_PAGES: u64 = 10_000;

/// The error of a window or listing that went past [`MAX_PAGES`].
fn too_many_pages(at: String, request_id: Option<String>) -> PassError {
    PassError::Fetch {
        at,
        source: SourceError::Protocol {
            message: format!("more than {MAX_PAGES} pages; paging would never end"),
            request_id,
        },
    }
}

/// What a pass should read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassRequest {
    /// Everything updated since the last pass (windowed sources), or the whole listing
    /// (full-listing sources). `allow_mass_delete` is a person's confirmation that a
    /// listing may delete more than the source's `max_delete_fraction`.
    Incremental { allow_mass_delete: bool },
    /// `[from, to)` again (`to`: now when not given), resuming the same backfill if one
    /// was interrupted. Only for windowed sources.
    Backfill {
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
    },
}

impl PassRequest {
    /// The regular pass, with no confirmation of mass deletions.
    pub const INCREMENTAL: PassRequest = PassRequest::Incremental {
        allow_mass_delete: false,
    };

    fn mode(&self) -> RunMode {
        match self {
            PassRequest::Incremental { .. } => RunMode::Incremental,
            PassRequest::Backfill { .. } => RunMode::Backfill,
        }
    }
}

/// The totals of a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassTotals {
    pub pages: u64,
    pub windows: u64,
    pub counts: PageCounts,
}

impl PassTotals {
    fn add(&mut self, page: &PageCounts) {
        self.pages += 1;
        self.counts.inserted += page.inserted;
        self.counts.updated += page.updated;
        self.counts.unchanged += page.unchanged;
        self.counts.rejected += page.rejected;
        self.counts.deleted += page.deleted;
    }
}

/// A pass that ran to its end or was cancelled (its progress is committed).
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    pub run_id: RunId,
    pub outcome: RunOutcome,
    pub totals: PassTotals,
}

/// Why a pass failed. The display of the whole chain is what `sync_runs.error` keeps.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("fetching {at}")]
    Fetch {
        at: String,
        #[source]
        source: SourceError,
    },
    #[error("storing {at}")]
    Store {
        at: String,
        #[source]
        source: StoreError,
    },
    #[error("{context}")]
    Bookkeeping {
        context: &'static str,
        #[source]
        source: StoreError,
    },
    /// Another process (or another pass in this one) holds the source's lease.
    #[error("another process is syncing this source now")]
    Busy,
    /// The pass lost its source's lease while it ran: another process took the source
    /// over (this one was paused, or too slow), or no renewal got through before the
    /// lease lapsed. Nothing more of the pass was written.
    #[error("lost its lease (fence {fence}): {why}; nothing more of this pass was written")]
    LostLease { fence: i64, why: LeaseLoss },
    #[error("backfill range is empty: --from {from} is not before --to {to}")]
    EmptyBackfill {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    #[error("a backfill re-reads update-time windows; this source is read in full on every pass")]
    BackfillUnsupported,
    #[error(
        "{}; if they really are gone, confirm with \
         `deptsync sync --source NAME --allow-mass-delete`",
        withheld_message(withheld, scope_noun, *max_delete_fraction)
    )]
    MassDeletion {
        withheld: Vec<WithheldDeletions>,
        scope_noun: &'static str,
        max_delete_fraction: f64,
    },
}

pub use crate::error_chain;

/// How a pass lost its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLoss {
    /// Another process holds it now (a write or a renewal was refused by the fence).
    TakenOver,
    /// No renewal got through before it lapsed: another process may take the source.
    Lapsed,
}

impl std::fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeaseLoss::TakenOver => "another process took the source over",
            LeaseLoss::Lapsed => {
                "it could not be renewed before it lapsed (the database did not answer)"
            }
        })
    }
}

impl PassError {
    /// This error as the pass ends with it, its lease under `fence` having been `lost`
    /// (or not): a write the fence refused is a lost lease, and so is any failure after
    /// the lease was lost.
    fn or_lost_lease(self, fence: i64, lost: Option<LeaseLoss>) -> PassError {
        let refused = matches!(
            self,
            PassError::Store {
                source: StoreError::LeaseLost { .. },
                ..
            } | PassError::Bookkeeping {
                source: StoreError::LeaseLost { .. },
                ..
            }
        );
        match (refused, lost) {
            (true, _) => PassError::LostLease {
                fence,
                why: LeaseLoss::TakenOver,
            },
            (false, Some(why)) => PassError::LostLease { fence, why },
            (false, None) => self,
        }
    }
}

/// What the mass-deletion guard held back, in words: for the whole source, or for each
/// scope that would have lost too many.
fn withheld_message(
    withheld: &[WithheldDeletions],
    scope_noun: &str,
    max_delete_fraction: f64,
) -> String {
    if let Some(whole) = withheld.iter().find(|w| w.scope.is_none()) {
        return format!(
            "the complete listing would mark {} of {} live departments deleted, more than \
             max_delete_fraction {max_delete_fraction} allows; nothing was deleted",
            whole.would_delete, whole.live
        );
    }
    let scopes: Vec<String> = withheld
        .iter()
        .map(|w| {
            format!(
                "{scope_noun} {} would lose {} of {} live departments",
                w.scope.as_deref().unwrap_or_default(),
                w.would_delete,
                w.live
            )
        })
        .collect();
    format!(
        "{}, more than max_delete_fraction {max_delete_fraction} allows (one {scope_noun} \
         coming back empty is what a permission change or a vendor fault looks like); \
         nothing of {} was deleted, the other deletions were made",
        scopes.join("; "),
        if withheld.len() == 1 { "it" } else { "them" }
    )
}

/// What a pass tells a progress display as it goes. Every method has a default that
/// ignores the news, so a display implements only what it shows.
pub trait Progress: Send + Sync {
    /// A windowed pass has `windows` windows to read (resumed ones included).
    fn windows_planned(&self, windows: u64) {
        let _ = windows;
    }
    /// A window was read to its end.
    fn window_done(&self) {}
    /// A window was split in two: one more to read.
    fn window_split(&self) {}
    /// A page of `records` records (departments and rejected ones) was stored.
    fn page_stored(&self, records: u64) {
        let _ = records;
    }
    /// The source answered a request for a page (with the page or with an error).
    fn answered(&self) {}
}

/// Shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

/// How a pass comes by its source's lease.
#[derive(Debug, Clone)]
pub enum Leasing {
    /// Takes it, for this long, if no process holds it ([`PassError::Busy`] otherwise):
    /// `sync`, the demo.
    Take { ttl: Duration },
    /// Taken already: a service claimed the source.
    Held(Lease),
}

impl Leasing {
    /// Takes the lease, for the default time to live.
    pub const TAKE: Leasing = Leasing::Take {
        ttl: crate::store::lease::DEFAULT_TTL,
    };
}

/// Runs one pass of `source`, recorded in `sync_runs` from start to end, under the
/// source's lease, taken for the default time ([`PassError::Busy`] when another holds
/// it).
///
/// Returns the report of a pass that succeeded or was cancelled, and the error of one
/// that failed (after recording it). Cancellation stops between pages, or abandons the
/// request in flight; a page that is being committed is always committed.
pub async fn run_pass<St: Store>(
    name: &str,
    source: &Connector,
    store: &St,
    request: PassRequest,
    cancel: &CancellationToken,
) -> Result<PassReport, PassError> {
    run_pass_showing(
        name,
        source,
        store,
        request,
        Leasing::TAKE,
        cancel,
        &NoProgress,
    )
    .await
}

/// [`run_pass`], under the lease `leasing` says, telling `progress` how it goes. The
/// lease is given back at the end. Everything the pass logs is in its span, which names
/// the source and the run.
#[tracing::instrument(skip_all, fields(source = name, run_id = tracing::field::Empty))]
pub async fn run_pass_showing<St: Store>(
    name: &str,
    source: &Connector,
    store: &St,
    request: PassRequest,
    leasing: Leasing,
    cancel: &CancellationToken,
    progress: &dyn Progress,
) -> Result<PassReport, PassError> {
    let mut lease = match leasing {
        Leasing::Held(lease) => lease,
        Leasing::Take { ttl } => store
            .try_lease(name, ttl)
            .await
            .map_err(|source| PassError::Bookkeeping {
                context: "taking the source's lease",
                source,
            })?
            .ok_or(PassError::Busy)?,
    };
    let started = std::time::Instant::now();
    // Stopped by the caller, or by the lease being lost.
    let stop = cancel.child_token();
    let ended = CancellationToken::new();
    let kept = lease.clone();
    let (ran, lapsed) = tokio::join!(
        async {
            let ran =
                run_locked_pass(name, source, store, &mut lease, request, &stop, progress).await;
            ended.cancel();
            ran
        },
        keep_lease(store, kept, &ended, &stop),
    );
    // However the pass noticed (a refused write, a refused or failed renewal), a lost
    // lease ends it as one.
    let fence = lease.fence;
    let ran = ran
        .map_err(|e| e.or_lost_lease(fence, lapsed))
        .map(|(run_id, result, totals)| {
            let result = match (result, lapsed) {
                (Ok(Finished::Cancelled), Some(why)) => Err(PassError::LostLease { fence, why }),
                (result, _) => result.map_err(|e| e.or_lost_lease(fence, lapsed)),
            };
            (run_id, result, totals)
        });
    if matches!(
        &ran,
        Err(PassError::LostLease { .. }) | Ok((_, Err(PassError::LostLease { .. }), _))
    ) {
        crate::metrics::lease_lost(name);
    }
    let end = match &ran {
        Ok((_, Ok(Finished::Completed), _)) => PassEnd::Succeeded,
        Ok((_, Ok(Finished::Cancelled), _)) => PassEnd::Cancelled,
        _ => PassEnd::Failed,
    };
    let (run_id, result, totals) = match ran {
        Ok(ran) => ran,
        Err(e) => {
            release(store, &lease, end).await;
            return Err(e);
        }
    };
    let outcome = match &result {
        Ok(Finished::Completed) => RunOutcome::Succeeded,
        Ok(Finished::Cancelled) => RunOutcome::Cancelled,
        Err(e) => RunOutcome::Failed {
            error: error_chain(e),
        },
    };
    // Recorded under the lease, so that the next holder never finds this run still
    // running.
    record_end(store, run_id, &outcome).await;
    release(store, &lease, end).await;
    crate::metrics::pass_finished(name, outcome.status(), started.elapsed());
    match result {
        Ok(_) => {
            tracing::info!(
                outcome = outcome.status(),
                pages = totals.pages,
                windows = totals.windows,
                inserted = totals.counts.inserted,
                updated = totals.counts.updated,
                unchanged = totals.counts.unchanged,
                deleted = totals.counts.deleted,
                rejected = totals.counts.rejected,
                "pass finished"
            );
            Ok(PassReport {
                run_id,
                outcome,
                totals,
            })
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), pages = totals.pages, "pass failed");
            Err(e)
        }
    }
}

/// Renews `lease` every third of its time to live until the pass has `ended`. When it is
/// lost (another holder took the source over, or no renewal got through before it
/// lapsed: each is given only the time left), stops the pass and says how.
async fn keep_lease<St: Store>(
    store: &St,
    lease: Lease,
    ended: &CancellationToken,
    stop: &CancellationToken,
) -> Option<LeaseLoss> {
    let mut lapses = tokio::time::Instant::now() + lease.ttl;
    loop {
        tokio::select! {
            () = ended.cancelled() => return None,
            () = tokio::time::sleep(lease.ttl / 3) => {}
        }
        let renewing = tokio::time::Instant::now();
        match tokio::time::timeout_at(lapses, store.renew(&lease)).await {
            Ok(Ok(true)) => lapses = renewing + lease.ttl,
            Ok(Ok(false)) => {
                tracing::warn!(
                    fence = lease.fence,
                    "another process took the source's lease over; stopping this pass"
                );
                stop.cancel();
                return Some(LeaseLoss::TakenOver);
            }
            Ok(Err(e)) if tokio::time::Instant::now() < lapses => tracing::warn!(
                error = %error_chain(&e),
                "renewing the source's lease; trying again"
            ),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    ttl = ?lease.ttl,
                    "the source's lease could not be renewed before it lapsed; stopping this pass"
                );
                stop.cancel();
                return Some(LeaseLoss::Lapsed);
            }
        }
    }
}

/// A pass under the source's lease: its run recorded as started, then read and stored.
/// Returns the run, how the pass ended and what it stored; an error only when the run
/// could not even be recorded.
async fn run_locked_pass<St: Store>(
    name: &str,
    connector: &Connector,
    store: &St,
    lease: &mut Lease,
    request: PassRequest,
    cancel: &CancellationToken,
    progress: &dyn Progress,
) -> Result<(RunId, Result<Finished, PassError>, PassTotals), PassError> {
    let run_id = store
        .start_run(lease, request.mode())
        .await
        .map_err(|source| PassError::Bookkeeping {
            context: "recording the start of the run",
            source,
        })?;
    tracing::Span::current().record("run_id", tracing::field::display(run_id));
    let mut writer = Writer {
        name,
        store,
        lease,
        run_id,
        totals: PassTotals::default(),
        progress,
    };
    let result = read(connector, &mut writer, request, cancel, progress).await;
    Ok((run_id, result, writer.totals))
}

/// Reads the pass of `connector` that `request` asks for, `writer` storing its pages.
async fn read<St: Store>(
    connector: &Connector,
    writer: &mut Writer<'_, St>,
    request: PassRequest,
    cancel: &CancellationToken,
    progress: &dyn Progress,
) -> Result<Finished, PassError> {
    let state = writer.load_state(connector.scope()).await?;
    match connector {
        Connector::Windowed(source) => {
            let reader = Reader::new(source, cancel, progress);
            windowed::read(&reader, writer, state, request).await
        }
        Connector::Listing(source) => {
            let PassRequest::Incremental { allow_mass_delete } = request else {
                return Err(PassError::BackfillUnsupported);
            };
            let reader = Reader::new(source, cancel, progress);
            listing::read(&reader, writer, state, allow_mass_delete).await
        }
    }
}

/// Gives the lease back, the pass having ended as `end`. A lost lease is no longer the
/// pass's to give back (the store changes nothing); one that cannot be given back lapses
/// on its own, after its time to live.
async fn release<St: Store>(store: &St, lease: &Lease, end: PassEnd) {
    retried("give the source's lease back", || store.release(lease, end)).await;
}

/// Records how the run ended. What cannot be recorded is closed by the next pass as
/// abandoned.
async fn record_end<St: Store>(store: &St, run_id: RunId, outcome: &RunOutcome) {
    retried("record the end of the run", || {
        store.finish_run(run_id, outcome)
    })
    .await;
}

/// Makes the store call `call` at the end of a pass, trying for a few seconds: the
/// failure that ended the pass may be the database going away, and a short outage
/// should not lose the run's reason nor keep its source's lease. A database that does
/// not answer at all is not waited for again: the pass ends now. `what` failing is
/// logged.
async fn retried<F>(what: &'static str, call: impl Fn() -> F)
where
    F: Future<Output = Result<(), StoreError>>,
{
    let mut wait = std::time::Duration::from_millis(250);
    for attempt in 1..=5 {
        match call().await {
            Ok(()) => return,
            Err(e) if e.went_unanswered() => {
                tracing::warn!(error = %error_chain(&e), "could not {what}");
                return;
            }
            Err(e) if attempt == 5 => {
                tracing::warn!(error = %error_chain(&e), "could not {what}");
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

enum Finished {
    Completed,
    Cancelled,
}

/// Fetches pages from the source, until the pass is cancelled.
pub(crate) struct Reader<'a, S> {
    source: &'a S,
    cancel: &'a CancellationToken,
    progress: &'a dyn Progress,
}

/// Stores pages with their checkpoints, and counts what it stored.
pub(crate) struct Writer<'a, St: Store> {
    name: &'a str,
    store: &'a St,
    /// The source's lease; every write of the pass is made under it.
    lease: &'a mut Lease,
    run_id: RunId,
    totals: PassTotals,
    progress: &'a dyn Progress,
}

impl<'a, S> Reader<'a, S> {
    fn new(source: &'a S, cancel: &'a CancellationToken, progress: &'a dyn Progress) -> Self {
        Reader {
            source,
            cancel,
            progress,
        }
    }

    /// What `fetching` (a page's request) gets, or `None` when the pass is cancelled
    /// first.
    #[tracing::instrument(name = "fetch_page", level = "debug", skip_all)]
    async fn fetch(
        &self,
        fetching: impl Future<Output = Result<Page, SourceError>>,
    ) -> Option<Result<Page, SourceError>> {
        let fetched = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => None,
            fetched = fetching => Some(fetched),
        };
        self.progress.answered();
        fetched
    }
}

/// Why a pass dropped its source's position: the settings that decide what it reads
/// changed since the position was saved.
const SETTINGS_CHANGED: &str =
    "its settings changed what it reads (kind, base URL, the scopes it names or start)";
/// Why a pass dropped its source's position: the position was saved before deptsync kept
/// a record of the settings it was read with.
const SETTINGS_UNRECORDED: &str = "no record of the settings its position was read with";

impl<St: Store> Writer<'_, St> {
    /// The database's clock now: what a pass plans to.
    async fn clock(&self) -> Result<chrono::DateTime<chrono::Utc>, PassError> {
        self.store
            .clock()
            .await
            .map_err(|source| PassError::Bookkeeping {
                context: "reading the database's clock",
                source,
            })
    }

    /// The source's saved position, made sure to be one of its current settings (whose
    /// fingerprint is `scope`).
    async fn load_state(&mut self, scope: String) -> Result<SyncState, PassError> {
        let state =
            self.store
                .load_state(self.name)
                .await
                .map_err(|source| PassError::Bookkeeping {
                    context: "loading the sync state",
                    source,
                })?;
        self.settle_scope(state, scope).await
    }

    /// Makes sure the saved position in `state` is a position of the source's current
    /// settings, whose fingerprint is `scope`. When they changed (or the position does
    /// not say), the position is dropped, rows staying, so that this pass reads again
    /// from `start` or starts a new listing: a position of other settings would leave out
    /// for good what the new settings add (an enterprise's departments updated long ago).
    async fn settle_scope(
        &mut self,
        state: SyncState,
        scope: String,
    ) -> Result<SyncState, PassError> {
        if state.scope.as_deref() == Some(scope.as_str()) {
            return Ok(state);
        }
        let bare = SyncState {
            scope: state.scope.clone(),
            ..SyncState::default()
        };
        let reset = match (&state.scope, state == bare) {
            (_, true) => None,
            (Some(_), false) => Some(SETTINGS_CHANGED),
            (None, false) => Some(SETTINGS_UNRECORDED),
        };
        if let Some(reason) = reset {
            tracing::warn!(
                reason,
                "the saved position is not one of these settings; dropping it (rows stay) \
                 and reading again from start"
            );
        }
        self.store
            .set_scope(self.lease, Some(&scope), reset)
            .await
            .map_err(|source| PassError::Bookkeeping {
                context: "recording what the source's position is a position of",
                source,
            })?;
        Ok(match reset {
            Some(_) => SyncState {
                scope: Some(scope),
                ..SyncState::default()
            },
            None => SyncState {
                scope: Some(scope),
                ..state
            },
        })
    }

    /// Commits `page` with `checkpoint`, after setting aside the records that cannot be
    /// stored, and counts it.
    #[tracing::instrument(name = "commit_page", level = "debug", skip_all)]
    async fn commit(
        &mut self,
        page: Page,
        checkpoint: &Checkpoint,
        at: impl Fn() -> String,
    ) -> Result<PageCounts, PassError> {
        let mut departments = Vec::with_capacity(page.departments.len());
        let mut rejected = page.rejected;
        for department in page.departments {
            match department.storage_problem() {
                None => departments.push(department),
                Some(reason) => rejected.push(department.into_rejected(reason)),
            }
        }
        for record in &rejected {
            tracing::warn!(
                external_id = %crate::printable(record.external_id.as_deref().unwrap_or("")),
                reason = %crate::printable(&record.reason),
                "record rejected"
            );
        }
        let counts = self
            .store
            .commit_page(
                self.lease,
                &Commit {
                    run: self.run_id,
                    source: self.name,
                    departments: &departments,
                    rejected: &rejected,
                    checkpoint,
                },
            )
            .await
            .map_err(|source| PassError::Store { at: at(), source })?;
        if checkpoint.follows_page() {
            self.progress
                .page_stored((departments.len() + rejected.len()) as u64);
            self.totals.add(&counts);
            crate::metrics::page_committed(self.name, &counts);
            tracing::debug!(at = %at(), ?counts, "page committed");
        }
        Ok(counts)
    }
}
