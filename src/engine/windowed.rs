//! A windowed pass: the windows of its ledger read several at once, each page committed
//! with its window's new position.

use std::collections::{HashSet, VecDeque};

use chrono::{DateTime, SubsecRound, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use super::plan::plan_pass;
use super::{Finished, MAX_PAGES, PassError, PassRequest, Reader, Writer, too_many_pages};
use crate::model::{Checkpoint, RunMode, SyncState, Window, WindowState};
use crate::sources::{Page, SourceError, WindowedSource};
use crate::store::Store;

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

/// Reads the windows of the pass's ledger, several at once, while the writer stores
/// their pages one transaction at a time, each with its window's new position.
pub(super) async fn read<S: WindowedSource, St: Store>(
    reader: &Reader<'_, S>,
    writer: &mut Writer<'_, St>,
    state: SyncState,
    request: PassRequest,
) -> Result<Finished, PassError> {
    let windowed = reader.source.windowing();
    // The database's clock, never this host's: a replica whose clock is fast would leave
    // a mark past updates not yet committed upstream. Whole seconds keep the windows
    // sent to the vendor and the stored marks readable.
    let now = writer.clock().await?.trunc_subsecs(0);
    let ledger = plan_pass(writer.name, windowed, state, request, now)?;
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
    writer.progress.windows_planned(outstanding.len() as u64);
    if outstanding.is_empty() {
        return Ok(Finished::Completed);
    }
    let mode = ledger.mode();
    let ledger_starts = ledger.windows.iter().map(|w| w.window.start).collect();
    writer
        .commit(Page::default(), &Checkpoint::Ledger(ledger), || {
            "the pass's plan".to_owned()
        })
        .await?;
    // At least one (a channel of none cannot be made).
    let concurrency = (windowed.concurrent_windows as usize).max(1);
    let (events, received) = mpsc::channel(concurrency);
    let (read, written) = tokio::join!(
        reader.read_windows(outstanding, ledger_starts, concurrency, events),
        writer.write_windows(mode, received),
    );
    // A store failure first: it is why the readers stopped.
    written?;
    read
}

impl<S: WindowedSource> Reader<'_, S> {
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
            let fetching = self
                .source
                .fetch_window_page(&window, cursor.as_deref(), page_size);
            let Some(fetched) = self.fetch(fetching).await else {
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

impl<St: Store> Writer<'_, St> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
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
}
