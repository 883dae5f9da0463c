//! One pass of one source: plan, fetch, store each page with its checkpoint.
//!
//! The engine knows neither vendor nor SQL: it asks a [`Source`] for pages and hands each
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

use std::collections::{HashSet, VecDeque};

use chrono::{DateTime, SubsecRound, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::{
    BackfillRange, Checkpoint, DeletionPolicy, Ledger, LedgerWindow, ListingProgress, PageCounts,
    RunId, RunMode, RunOutcome, SyncState, Window, WindowState, WithheldDeletions,
};
use crate::plan::plan_windows;
use crate::sources::{Page, PageRequest, Source, SourceError, SyncMode, WindowedMode};
use crate::store::{Store, StoreError};

/// The smallest window a 408 can halve down to.
const MIN_WINDOW: chrono::Duration = chrono::Duration::hours(1);
/// The fewest records a page a 408 can halve the page size down to.
const MIN_PAGE_SIZE: u32 = 10;

/// `window` cut in two at its middle (whole seconds), unless it is already at the floor.
/// The ledger keys a window by its start, and a resumed pass's windows may overlap: a
/// middle that is already the start of a window in `ledger_starts` moves a second
/// earlier.
fn halve(window: &Window, ledger_starts: &HashSet<DateTime<Utc>>) -> Option<[Window; 2]> {
    let span = window.end - window.start;
    if span < MIN_WINDOW * 2 {
        return None;
    }
    let mut middle = (window.start + span / 2).trunc_subsecs(0);
    while ledger_starts.contains(&middle) {
        middle -= chrono::Duration::seconds(1);
    }
    (middle > window.start).then_some([
        Window {
            start: window.start,
            end: middle,
        },
        Window {
            start: middle,
            end: window.end,
        },
    ])
}

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

/// How many times one pass starts a listing again after it changed under its page numbers.
const MAX_LISTING_RESTARTS: u32 = 3;

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
    /// Another process (or another pass in this one) holds the source's lock.
    #[error("another process is syncing this source now")]
    Busy,
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

/// The ledger a windowed pass works through: the interrupted pass's windows not done yet
/// (each at its cursor) planned on to the new end, or a new plan.
fn plan_pass(
    source: &str,
    windowed: WindowedMode,
    state: SyncState,
    request: PassRequest,
    now: DateTime<Utc>,
) -> Result<Ledger, PassError> {
    let WindowedMode {
        start,
        lookback,
        max_window_months,
        ..
    } = windowed;
    let lookback = chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
    // `lookback` before `point`, but not before `floor`.
    let looking_back = |point: DateTime<Utc>, floor: DateTime<Utc>| {
        point
            .checked_sub_signed(lookback)
            .unwrap_or(floor)
            .max(floor)
    };
    let pending = |from: DateTime<Utc>, to: DateTime<Utc>| {
        plan_windows(from, to, max_window_months)
            .into_iter()
            .map(|window| LedgerWindow {
                window,
                state: WindowState::Pending,
            })
    };
    // An interrupted pass resumes its windows not done, each at its cursor, then plans on
    // to `to`, re-reading `lookback` before the interrupted pass's end first, as every
    // plan does before the point it continues from: an update the vendor committed late
    // may sit there, in a part of a window read before it became visible.
    let resume = |saved: Ledger, to: DateTime<Utc>, floor: DateTime<Utc>| {
        let mut windows: Vec<LedgerWindow> = saved.outstanding().cloned().collect();
        tracing::info!(
            source,
            windows_left = windows.len(),
            "resuming the interrupted pass"
        );
        let until = saved.until.max(to);
        let mut from = looking_back(saved.until, floor);
        // The ledger keys a window by its start: when a resumed window starts there, the
        // re-read starts a second earlier (reading more is always safe).
        while windows.iter().any(|w| w.window.start == from) {
            from -= chrono::Duration::seconds(1);
        }
        windows.extend(pending(from, until));
        Ledger {
            until,
            backfill: saved.backfill,
            windows,
        }
    };
    match request {
        PassRequest::Incremental { .. } => {
            if let Some(saved) = state.incremental {
                return Ok(resume(saved, now, start));
            }
            let from = match state.high_water_mark {
                Some(mark) => looking_back(mark, start),
                None => start,
            };
            Ok(Ledger {
                until: now,
                backfill: None,
                windows: pending(from, now).collect(),
            })
        }
        PassRequest::Backfill { from, to } => {
            let until = to.unwrap_or(now);
            if from >= until {
                return Err(PassError::EmptyBackfill { from, to: until });
            }
            let range = BackfillRange {
                from,
                requested_to: to,
            };
            match state.backfill.filter(|saved| saved.backfill == Some(range)) {
                Some(saved) => Ok(resume(saved, until, from)),
                None => {
                    tracing::info!(source, %from, to = %until, "starting a backfill");
                    Ok(Ledger {
                        until,
                        backfill: Some(range),
                        windows: pending(from, until).collect(),
                    })
                }
            }
        }
    }
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

/// Runs one pass of `source`, recorded in `sync_runs` from start to end, holding the
/// source's lock throughout ([`PassError::Busy`] when another holds it).
///
/// Returns the report of a pass that succeeded or was cancelled, and the error of one
/// that failed (after recording it). Cancellation stops between pages, or abandons the
/// request in flight; a page that is being committed is always committed.
#[tracing::instrument(skip_all, fields(source = name, run_id = tracing::field::Empty))]
pub async fn run_pass<S: Source, St: Store>(
    name: &str,
    source: &S,
    store: &St,
    request: PassRequest,
    cancel: &CancellationToken,
) -> Result<PassReport, PassError> {
    run_pass_showing(name, source, store, request, cancel, &NoProgress).await
}

/// [`run_pass`], telling `progress` how it goes.
pub async fn run_pass_showing<S: Source, St: Store>(
    name: &str,
    source: &S,
    store: &St,
    request: PassRequest,
    cancel: &CancellationToken,
    progress: &dyn Progress,
) -> Result<PassReport, PassError> {
    let mut lease = store
        .try_lock(name)
        .await
        .map_err(|source| PassError::Bookkeeping {
            context: "taking the source's lock",
            source,
        })?
        .ok_or(PassError::Busy)?;
    let started = std::time::Instant::now();
    let ran = run_locked_pass(name, source, store, &mut lease, request, cancel, progress).await;
    // Unlocked before the end is recorded: a commit given up half way leaves its
    // transaction open on the lock's connection, holding the run's row, and closing that
    // connection is what lets the record of the failure through.
    store.unlock(lease).await;
    let (run_id, result, totals) = ran?;
    let outcome = match &result {
        Ok(Finished::Completed) => RunOutcome::Succeeded,
        Ok(Finished::Cancelled) => RunOutcome::Cancelled,
        Err(e) => RunOutcome::Failed {
            error: error_chain(e),
        },
    };
    record_end(store, run_id, &outcome).await;
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

/// A pass under the source's lock: its run recorded as started, then read and stored.
/// Returns the run, how the pass ended and what it stored; an error only when the run
/// could not even be recorded.
async fn run_locked_pass<S: Source, St: Store>(
    name: &str,
    source: &S,
    store: &St,
    lease: &mut St::Lease,
    request: PassRequest,
    cancel: &CancellationToken,
    progress: &dyn Progress,
) -> Result<(RunId, Result<Finished, PassError>, PassTotals), PassError> {
    let run_id = store
        .start_run(lease, name, request.mode())
        .await
        .map_err(|source| PassError::Bookkeeping {
            context: "recording the start of the run",
            source,
        })?;
    tracing::Span::current().record("run_id", tracing::field::display(run_id));
    let mut pass = Pass {
        reader: Reader {
            source,
            cancel,
            progress,
        },
        writer: Writer {
            name,
            store,
            lease,
            run_id,
            totals: PassTotals::default(),
            progress,
        },
    };
    let result = pass.run(request).await;
    Ok((run_id, result, pass.writer.totals))
}

/// Records how the run ended, trying for a few seconds: the failure being recorded may be
/// the database going away, and a short outage should not lose the reason. What cannot be
/// recorded is closed by the next pass as abandoned.
async fn record_end<St: Store>(store: &St, run_id: RunId, outcome: &RunOutcome) {
    let mut wait = std::time::Duration::from_millis(250);
    for attempt in 1..=5 {
        match store.finish_run(run_id, outcome).await {
            Ok(()) => return,
            // A database that does not answer at all is not waited for again: the pass
            // ends now, and the next one closes the run as abandoned.
            Err(e @ StoreError::Unanswered { .. }) => {
                tracing::warn!(error = %error_chain(&e), "could not record the end of the run");
                return;
            }
            Err(e) if attempt == 5 => {
                tracing::warn!(error = %error_chain(&e), "could not record the end of the run");
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

/// One pass in progress: the side that reads pages and the side that stores them. They
/// are apart so that reading the next pages and storing the last one can overlap.
struct Pass<'a, S, St: Store> {
    reader: Reader<'a, S>,
    writer: Writer<'a, St>,
}

/// Fetches pages from the source, until the pass is cancelled.
struct Reader<'a, S> {
    source: &'a S,
    cancel: &'a CancellationToken,
    progress: &'a dyn Progress,
}

/// Stores pages with their checkpoints, and counts what it stored.
struct Writer<'a, St: Store> {
    name: &'a str,
    store: &'a St,
    /// The source's lock; every write of the pass goes through it.
    lease: &'a mut St::Lease,
    run_id: RunId,
    totals: PassTotals,
    progress: &'a dyn Progress,
}

/// Where a page of a window is, for errors and logs.
fn window_page(number: u64, window: &Window) -> String {
    format!("page {number} of window {window}")
}

/// What the reading side of a windowed pass tells the writing side, in order.
enum WindowEvent {
    /// Page `number` of `window` to store; `stored` is answered once it is.
    Page {
        window: Window,
        number: u64,
        page: Page,
        stored: oneshot::Sender<()>,
    },
    /// The upstream found `window` too heavy: it is replaced by `halves`, read afresh.
    Split { window: Window, halves: [Window; 2] },
}

/// One window to read: from `cursor` (from its start when `None`), `page_size` records
/// a page.
struct WindowRequest {
    window: Window,
    cursor: Option<String>,
    page_size: u32,
}

/// How the reading of one window ended.
enum WindowRead {
    Done,
    /// Too heavy: read `halves` instead, `page_size` records a page.
    Split {
        halves: [Window; 2],
        page_size: u32,
    },
    Cancelled,
    /// The writing side stopped (it failed; its error is the pass's).
    WriterStopped,
}

impl<S: Source> Reader<'_, S> {
    /// The page at `request`, or `None` when the pass is cancelled first.
    async fn fetch(&self, request: PageRequest<'_>) -> Option<Result<Page, SourceError>> {
        let fetched = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => None,
            fetched = self.source.fetch_page(request) => Some(fetched),
        };
        self.progress.answered();
        fetched
    }

    /// Reads the `outstanding` windows (each from its cursor), `concurrency` at a time, and
    /// sends their pages to the writer. The source's rate budget, shared by every window,
    /// bounds the request rate; `concurrency` only keeps it busy while pages are slow.
    /// `ledger_starts` holds the start of every window of the ledger (a split adds one).
    async fn read_windows(
        &self,
        outstanding: Vec<WindowRequest>,
        ledger_starts: HashSet<DateTime<Utc>>,
        concurrency: usize,
        writer: mpsc::Sender<WindowEvent>,
    ) -> Result<Finished, PassError> {
        let ledger_starts = std::sync::Mutex::new(ledger_starts);
        let mut queue: VecDeque<_> = outstanding.into();
        let mut reading = FuturesUnordered::new();
        loop {
            while reading.len() < concurrency
                && let Some(request) = queue.pop_front()
            {
                reading.push(self.read_window(request, &ledger_starts, &writer));
            }
            match reading.next().await {
                None => return Ok(Finished::Completed),
                Some(Ok(WindowRead::Done)) => {}
                Some(Ok(WindowRead::Split { halves, page_size })) => {
                    for window in halves.into_iter().rev() {
                        queue.push_front(WindowRequest {
                            window,
                            cursor: None,
                            page_size,
                        });
                    }
                }
                // The other windows' requests are abandoned; their committed pages stay.
                Some(Ok(WindowRead::Cancelled | WindowRead::WriterStopped)) => {
                    return Ok(Finished::Cancelled);
                }
                Some(Err(e)) => return Err(e),
            }
        }
    }

    /// Reads one window from its cursor to its end. It fetches the next page only once
    /// the last one is stored: a window has at most one page in flight, so a resume
    /// repeats at most one page of it.
    ///
    /// Two answers make it ask again rather than fail. A 408 (too heavy) makes it ask for
    /// less: a window not started yet is split in two halves, each read with half the
    /// page size; one under way keeps its position and asks for half as many records a
    /// page (down to [`MIN_PAGE_SIZE`]), then is split once the page size is at that
    /// floor. A 400 for a request with a cursor (the vendor no longer takes it, as after
    /// a long pause) drops the cursor once and reads the window again from its start:
    /// upserts make the repeat harmless, and no saved position makes every pass fail.
    async fn read_window(
        &self,
        request: WindowRequest,
        ledger_starts: &std::sync::Mutex<HashSet<DateTime<Utc>>>,
        writer: &mpsc::Sender<WindowEvent>,
    ) -> Result<WindowRead, PassError> {
        let WindowRequest {
            window,
            mut cursor,
            mut page_size,
        } = request;
        let mut page_number = 0;
        let mut seen_cursors = HashSet::new();
        let mut dropped_a_cursor = false;
        loop {
            page_number += 1;
            let at = || window_page(page_number, &window);
            let request = PageRequest::Window {
                window: &window,
                cursor: cursor.as_deref(),
                page_size,
            };
            let Some(fetched) = self.fetch(request).await else {
                return Ok(WindowRead::Cancelled);
            };
            let mut page = match fetched {
                Ok(page) => page,
                Err(SourceError::TooHeavy { request_id }) => {
                    // Never more than asked for, even below the floor.
                    let smaller = (page_size / 2).max(MIN_PAGE_SIZE.min(page_size));
                    // Split a window not started yet, or one whose page size is at its
                    // floor; otherwise keep the position and ask for fewer a page.
                    let split = if cursor.is_none() || smaller == page_size {
                        let mut starts = ledger_starts.lock().unwrap_or_else(|p| p.into_inner());
                        let halves = halve(&window, &starts);
                        if let Some([_, second]) = halves {
                            starts.insert(second.start);
                        }
                        halves
                    } else {
                        None
                    };
                    let logged_id = request_id.as_deref().unwrap_or("");
                    if let Some(halves) = split {
                        tracing::warn!(%window, page_size = smaller, request_id = logged_id, "too heavy for the upstream; halving the window and the page size");
                        // A cursor belongs to the window it was issued for: the halves are
                        // read afresh.
                        let split = WindowEvent::Split { window, halves };
                        if writer.send(split).await.is_err() {
                            return Ok(WindowRead::WriterStopped);
                        }
                        return Ok(WindowRead::Split {
                            halves,
                            page_size: smaller,
                        });
                    }
                    if smaller < page_size {
                        tracing::warn!(%window, page_size = smaller, request_id = logged_id, "too heavy for the upstream; asking for fewer records a page");
                        page_size = smaller;
                        page_number -= 1;
                        continue;
                    }
                    return Err(PassError::Fetch {
                        at: format!(
                            "{} (already at the smallest window and {MIN_PAGE_SIZE} records a page)",
                            at()
                        ),
                        source: SourceError::TooHeavy { request_id },
                    });
                }
                Err(SourceError::Http {
                    status: 400,
                    message,
                    request_id,
                }) if cursor.is_some() && !dropped_a_cursor => {
                    tracing::warn!(
                        %window,
                        cursor = %crate::printable(cursor.as_deref().unwrap_or("")),
                        message = %crate::printable(&message),
                        request_id = %crate::printable(request_id.as_deref().unwrap_or("")),
                        "the upstream refused the cursor; reading the window again from its start"
                    );
                    dropped_a_cursor = true;
                    cursor = None;
                    seen_cursors.clear();
                    page_number = 0;
                    continue;
                }
                Err(source) => return Err(PassError::Fetch { at: at(), source }),
            };
            let next_cursor = page.next_cursor.clone();
            if let Some(next) = &next_cursor
                && !seen_cursors.insert(next.clone())
            {
                let source = SourceError::Protocol {
                    message: format!(
                        "cursor {next} came back a second time; paging would never end"
                    ),
                    request_id: page.request_id.take(),
                };
                return Err(PassError::Fetch { at: at(), source });
            }
            if next_cursor.is_some() && page_number >= MAX_PAGES {
                return Err(too_many_pages(at(), page.request_id.take()));
            }
            let (stored, is_stored) = oneshot::channel();
            let event = WindowEvent::Page {
                window,
                number: page_number,
                page,
                stored,
            };
            if writer.send(event).await.is_err() || is_stored.await.is_err() {
                return Ok(WindowRead::WriterStopped);
            }
            match next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(WindowRead::Done),
            }
        }
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
            .set_scope(self.lease, self.name, Some(&scope), reset)
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
                self.run_id,
                self.name,
                &departments,
                &rejected,
                checkpoint,
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

    /// Stores what the readers send, in the order they send it, each page with its
    /// window's new position in the `mode` ledger. Ends when every reader has stopped.
    async fn write_windows(
        &mut self,
        mode: RunMode,
        mut events: mpsc::Receiver<WindowEvent>,
    ) -> Result<(), PassError> {
        while let Some(event) = events.recv().await {
            match event {
                WindowEvent::Page {
                    window,
                    number,
                    mut page,
                    stored,
                } => {
                    let cursor = page.next_cursor.take();
                    let done = cursor.is_none();
                    let checkpoint = Checkpoint::Window {
                        mode,
                        window,
                        cursor,
                    };
                    let at = || window_page(number, &window);
                    self.commit(page, &checkpoint, at).await?;
                    if done {
                        self.totals.windows += 1;
                        self.progress.window_done();
                    }
                    // The reader may have stopped meanwhile; the page is stored either way.
                    let _ = stored.send(());
                }
                WindowEvent::Split { window, halves } => {
                    self.progress.window_split();
                    let split = Checkpoint::Split {
                        mode,
                        window,
                        halves,
                    };
                    self.commit(Page::default(), &split, || {
                        format!("the split of window {window}")
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }
}

impl<S: Source, St: Store> Pass<'_, S, St> {
    async fn run(&mut self, request: PassRequest) -> Result<Finished, PassError> {
        let writer = &self.writer;
        let state = writer
            .store
            .load_state(writer.name)
            .await
            .map_err(|source| PassError::Bookkeeping {
                context: "loading the sync state",
                source,
            })?;
        let state = self
            .writer
            .settle_scope(state, self.reader.source.scope())
            .await?;
        match (self.reader.source.mode(), request) {
            (SyncMode::Windowed(windowed), request) => {
                self.read_windows(windowed, state, request).await
            }
            (SyncMode::FullListing(_), PassRequest::Backfill { .. }) => {
                Err(PassError::BackfillUnsupported)
            }
            (SyncMode::FullListing(listing), PassRequest::Incremental { allow_mass_delete }) => {
                let deletions = DeletionPolicy {
                    max_delete_fraction: (!allow_mass_delete)
                        .then_some(listing.max_delete_fraction),
                    scopes: listing.scopes,
                };
                let saved = (state.listing, state.pending_confirmation);
                self.read_listing(saved, deletions, listing.scope_noun)
                    .await
            }
        }
    }

    /// Reads the windows of the pass's ledger, several at once, while the writer stores
    /// their pages one transaction at a time, each with its window's new position.
    async fn read_windows(
        &mut self,
        windowed: WindowedMode,
        state: SyncState,
        request: PassRequest,
    ) -> Result<Finished, PassError> {
        // Whole seconds keep the windows sent to the vendor and the stored marks readable.
        let now = Utc::now().trunc_subsecs(0);
        let ledger = plan_pass(self.writer.name, windowed, state, request, now)?;
        let outstanding: Vec<WindowRequest> = ledger
            .outstanding()
            .map(|entry| WindowRequest {
                window: entry.window,
                cursor: match &entry.state {
                    WindowState::InProgress { cursor } => Some(cursor.clone()),
                    _ => None,
                },
                page_size: windowed.page_size,
            })
            .collect();
        tracing::info!(windows = outstanding.len(), "pass planned");
        self.writer
            .progress
            .windows_planned(outstanding.len() as u64);
        if outstanding.is_empty() {
            return Ok(Finished::Completed);
        }
        let mode = ledger.mode();
        let ledger_starts = ledger.windows.iter().map(|w| w.window.start).collect();
        self.writer
            .commit(Page::default(), &Checkpoint::Ledger(ledger), || {
                "the pass's plan".to_owned()
            })
            .await?;
        // At least one (a channel of none cannot be made).
        let concurrency = (windowed.concurrent_windows as usize).max(1);
        let (events, received) = mpsc::channel(concurrency);
        let (read, written) = tokio::join!(
            self.reader
                .read_windows(outstanding, ledger_starts, concurrency, events),
            self.writer.write_windows(mode, received),
        );
        // A store failure first: it is why the readers stopped.
        written?;
        read
    }

    /// Reads the whole listing, resuming the listing a pass left half way, or confirming
    /// the one that awaits confirmation (`saved`). `deletions` says what the listings may
    /// delete; `scope_noun` names the source's scopes in errors.
    async fn read_listing(
        &mut self,
        saved: (Option<ListingProgress>, Option<Uuid>),
        deletions: DeletionPolicy,
        scope_noun: &'static str,
    ) -> Result<Finished, PassError> {
        let (saved, pending_confirmation) = saved;
        let new_listing = |confirms: Option<Uuid>| ListingProgress {
            listing_id: Uuid::new_v4(),
            cursor: None,
            confirms,
        };
        let mut listing = match saved {
            Some(saved) => {
                tracing::info!(
                    cursor = saved.cursor.as_deref().unwrap_or(""),
                    "resuming the interrupted listing"
                );
                saved
            }
            None => new_listing(pending_confirmation),
        };
        let mut restarts = 0;
        let mut page_number = 0;
        // The page fetched while the last one was stored, if any.
        let mut prefetched = None;
        loop {
            page_number += 1;
            let at = || format!("page {page_number} of the listing");
            let request = PageRequest::Listing {
                cursor: listing.cursor.as_deref(),
            };
            let fetched = match prefetched.take() {
                Some(fetched) => fetched,
                None => self.reader.fetch(request).await,
            };
            let Some(fetched) = fetched else {
                return Ok(Finished::Cancelled);
            };
            let mut page = match fetched {
                Ok(page) => page,
                Err(SourceError::ListingChanged(reason)) => {
                    // Pages may have shifted: what this listing saw proves nothing.
                    let abandoned = Checkpoint::ListingAbandoned {
                        listing_id: listing.listing_id,
                    };
                    self.writer.commit(Page::default(), &abandoned, at).await?;
                    if restarts == MAX_LISTING_RESTARTS {
                        return Err(PassError::Fetch {
                            at: at(),
                            source: SourceError::ListingChanged(format!(
                                "{reason} (started again {MAX_LISTING_RESTARTS} times; nothing deleted)"
                            )),
                        });
                    }
                    tracing::warn!(reason = %crate::printable(&reason), "the listing changed while it was read; starting it again");
                    restarts += 1;
                    page_number = 0;
                    listing = new_listing(listing.confirms);
                    continue;
                }
                Err(source) => return Err(PassError::Fetch { at: at(), source }),
            };
            let next_cursor = page.next_cursor.take();
            if next_cursor.is_some() && page_number >= MAX_PAGES {
                return Err(too_many_pages(at(), page.request_id.take()));
            }
            let checkpoint = match &next_cursor {
                Some(cursor) => Checkpoint::Listing(ListingProgress {
                    listing_id: listing.listing_id,
                    cursor: Some(cursor.clone()),
                    confirms: listing.confirms,
                }),
                None => Checkpoint::ListingDone {
                    listing_id: listing.listing_id,
                    confirms: listing.confirms,
                    deletions: deletions.clone(),
                },
            };
            // The next page is fetched while this one is stored.
            let next_request = next_cursor.as_deref().map(|cursor| PageRequest::Listing {
                cursor: Some(cursor),
            });
            let (counts, next) =
                tokio::try_join!(self.writer.commit(page, &checkpoint, at), async {
                    Ok(match next_request {
                        Some(request) => Some(self.reader.fetch(request).await),
                        None => None,
                    })
                },)?;
            prefetched = next;
            if counts.awaiting_confirmation > 0 {
                // Page numbers may have shifted under the listing: a department it missed
                // is deleted only if a second complete listing misses it too.
                tracing::info!(
                    missing = counts.awaiting_confirmation,
                    "departments missing from the listing; reading it once more to confirm"
                );
                listing = new_listing(Some(listing.listing_id));
                page_number = 0;
                continue;
            }
            if let (false, Some(max_delete_fraction)) = (
                counts.withheld_deletions.is_empty(),
                deletions.max_delete_fraction,
            ) {
                return Err(PassError::MassDeletion {
                    withheld: counts.withheld_deletions,
                    scope_noun,
                    max_delete_fraction,
                });
            }
            match next_cursor {
                Some(cursor) => listing.cursor = Some(cursor),
                None => return Ok(Finished::Completed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
    }

    fn mode() -> WindowedMode {
        WindowedMode {
            start: at(2020, 1, 1),
            lookback: Duration::from_secs(300),
            max_window_months: 3,
            concurrent_windows: 4,
            page_size: 1000,
        }
    }

    fn windows(ledger: &Ledger) -> Vec<Window> {
        ledger.windows.iter().map(|w| w.window).collect()
    }

    #[test]
    fn a_split_never_starts_a_half_where_a_window_of_the_ledger_starts() {
        let window = Window {
            start: at(2020, 1, 1),
            end: at(2020, 1, 1) + chrono::Duration::hours(4),
        };
        let middle = at(2020, 1, 1) + chrono::Duration::hours(2);
        let [first, second] = halve(&window, &HashSet::new()).unwrap();
        assert_eq!((first.end, second.start), (middle, middle));
        let taken = HashSet::from([middle]);
        let [first, second] = halve(&window, &taken).unwrap();
        let earlier = middle - chrono::Duration::seconds(1);
        assert_eq!((first.end, second.start), (earlier, earlier));
        let short = Window {
            start: window.start,
            end: window.start + chrono::Duration::minutes(90),
        };
        assert_eq!(halve(&short, &HashSet::new()), None);
    }

    #[test]
    fn a_first_pass_reads_from_start() {
        let plan = plan_pass(
            "s",
            mode(),
            SyncState::default(),
            PassRequest::INCREMENTAL,
            at(2021, 1, 1),
        )
        .unwrap();
        assert_eq!(plan.windows.len(), 4);
        assert_eq!(plan.windows[0].window.start, at(2020, 1, 1));
        assert!(plan.windows.iter().all(|w| w.state == WindowState::Pending));
        assert_eq!(
            (plan.until, plan.mode()),
            (at(2021, 1, 1), RunMode::Incremental)
        );
    }

    #[test]
    fn a_later_pass_reads_from_the_mark_less_the_lookback() {
        let state = SyncState {
            high_water_mark: Some(at(2021, 1, 1)),
            ..SyncState::default()
        };
        let now = at(2021, 1, 2);
        let plan = plan_pass("s", mode(), state, PassRequest::INCREMENTAL, now).unwrap();
        assert_eq!(
            windows(&plan),
            vec![Window {
                start: at(2021, 1, 1) - chrono::Duration::minutes(5),
                end: now
            }]
        );
    }

    #[test]
    fn an_interrupted_pass_resumes_its_open_windows_then_plans_to_now() {
        let window = |m: u32| Window {
            start: at(2020, m, 1),
            end: at(2020, m + 3, 1),
        };
        let state = SyncState {
            incremental: Some(Ledger {
                until: at(2020, 10, 1),
                backfill: None,
                windows: vec![
                    LedgerWindow {
                        window: window(1),
                        state: WindowState::Done,
                    },
                    LedgerWindow {
                        window: window(4),
                        state: WindowState::InProgress {
                            cursor: "c".to_owned(),
                        },
                    },
                    LedgerWindow {
                        window: window(7),
                        state: WindowState::Pending,
                    },
                ],
            }),
            ..SyncState::default()
        };
        let now = at(2020, 12, 15);
        let plan = plan_pass("s", mode(), state, PassRequest::INCREMENTAL, now).unwrap();
        assert_eq!(
            plan.windows[0].state,
            WindowState::InProgress {
                cursor: "c".to_owned()
            }
        );
        assert_eq!(
            windows(&plan),
            vec![
                window(4),
                window(7),
                Window {
                    start: at(2020, 10, 1) - chrono::Duration::minutes(5),
                    end: now
                }
            ],
            "done windows are not read again; the pass goes on to now from the lookback \
             before the interrupted pass's end"
        );
        assert_eq!(plan.until, now);
    }

    #[test]
    fn a_resumed_pass_rereads_the_lookback_even_when_now_has_not_moved() {
        let until = at(2020, 10, 1);
        // A resumed window that starts exactly where the re-read would.
        let resumed = LedgerWindow {
            window: Window {
                start: until - chrono::Duration::minutes(5),
                end: until,
            },
            state: WindowState::InProgress {
                cursor: "c".to_owned(),
            },
        };
        let state = SyncState {
            incremental: Some(Ledger {
                until,
                backfill: None,
                windows: vec![resumed.clone()],
            }),
            ..SyncState::default()
        };
        let plan = plan_pass("s", mode(), state, PassRequest::INCREMENTAL, until).unwrap();
        assert_eq!(
            plan.windows,
            vec![
                resumed,
                LedgerWindow {
                    window: Window {
                        start: until - chrono::Duration::seconds(301),
                        end: until
                    },
                    state: WindowState::Pending
                }
            ],
            "one window per start in the ledger; the re-read starts a second earlier"
        );
    }

    #[test]
    fn a_backfill_resumes_only_the_same_range() {
        let open = LedgerWindow {
            window: Window {
                start: at(2020, 4, 1),
                end: at(2020, 7, 1),
            },
            state: WindowState::InProgress {
                cursor: "c".to_owned(),
            },
        };
        let range = BackfillRange {
            from: at(2020, 1, 1),
            requested_to: Some(at(2021, 1, 1)),
        };
        let state = SyncState {
            backfill: Some(Ledger {
                until: at(2021, 1, 1),
                backfill: Some(range),
                windows: vec![open.clone()],
            }),
            ..SyncState::default()
        };
        let same = PassRequest::Backfill {
            from: at(2020, 1, 1),
            to: Some(at(2021, 1, 1)),
        };
        let plan = plan_pass("s", mode(), state.clone(), same, at(2022, 1, 1)).unwrap();
        let reread = LedgerWindow {
            window: Window {
                start: at(2021, 1, 1) - chrono::Duration::minutes(5),
                end: at(2021, 1, 1),
            },
            state: WindowState::Pending,
        };
        assert_eq!(plan.windows, vec![open, reread]);
        assert_eq!(plan.mode(), RunMode::Backfill);
        let other = PassRequest::Backfill {
            from: at(2020, 2, 1),
            to: Some(at(2021, 1, 1)),
        };
        let plan = plan_pass("s", mode(), state, other, at(2022, 1, 1)).unwrap();
        assert_eq!(plan.windows[0].window.start, at(2020, 2, 1));
        assert_eq!(plan.windows[0].state, WindowState::Pending);
        assert_eq!(plan.until, at(2021, 1, 1));
    }

    #[test]
    fn an_empty_backfill_is_an_error() {
        let request = PassRequest::Backfill {
            from: at(2021, 1, 1),
            to: Some(at(2020, 1, 1)),
        };
        assert!(plan_pass("s", mode(), SyncState::default(), request, at(2022, 1, 1)).is_err());
    }
}
