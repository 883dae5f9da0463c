//! Splitting a time range into the windows an API lets us ask for.
//!
//! Mews accepts an `UpdatedUtc` interval of at most three months. A range is cut into
//! consecutive half-open windows `[start, end)`, each ending at most that many *calendar*
//! months after it starts. Calendar arithmetic clamps to the month's last day, so a window
//! from 30 November ends on 28 (or 29) February: never longer than the API allows, month
//! ends and leap years included. Windows chain end-to-start, so together they cover the
//! range exactly once.
//!
//! [`plan_pass`] makes a windowed pass's ledger from those windows: a new plan, or an
//! interrupted pass's windows resumed and planned on.

use chrono::{DateTime, Months, Utc};

use super::{PassError, PassRequest};
use crate::model::{BackfillRange, Ledger, LedgerWindow, SyncState, Window, WindowState};
use crate::sources::WindowedMode;

/// The windows covering `[from, to)`, each at most `max_months` calendar months long.
///
/// An empty or inverted range yields no windows. `max_months` must be at least one; the
/// config layer guarantees it (a zero would mean no window can ever be asked for).
pub fn plan_windows(from: DateTime<Utc>, to: DateTime<Utc>, max_months: u32) -> Vec<Window> {
    let step = Months::new(max_months.max(1));
    let mut windows = Vec::new();
    let mut start = from;
    while start < to {
        let end = start.checked_add_months(step).map_or(to, |end| end.min(to));
        windows.push(Window { start, end });
        start = end;
    }
    windows
}

/// Whether `window` is no longer than `max_months` calendar months: the rule the planner
/// must keep, which its tests check.
#[cfg(test)]
fn window_fits(window: &Window, max_months: u32) -> bool {
    match window.start.checked_add_months(Months::new(max_months)) {
        Some(limit) => window.end <= limit,
        None => true,
    }
}

/// The ledger a windowed pass works through: the interrupted pass's windows not done yet
/// (each at its cursor) planned on to the new end, or a new plan.
pub(super) fn plan_pass(
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
    // Nothing can have been read up to an instant ahead of the database's clock: a
    // saved mark or pass end there was left by a host whose clock was fast, and is read
    // as the clock's now (and the mark moved back when the pass ends).
    let not_ahead = |instant: DateTime<Utc>, what: &str| {
        if instant <= now {
            return instant;
        }
        tracing::warn!(
            source,
            saved = what,
            %instant,
            %now,
            "a saved position is ahead of the database's clock (a host whose clock was fast \
             saved it); reading from the database's now less the lookback"
        );
        now
    };
    match request {
        PassRequest::Incremental { .. } => {
            if let Some(mut saved) = state.incremental {
                saved.until = not_ahead(saved.until, "pass end");
                return Ok(resume(saved, now, start));
            }
            let from = match state.high_water_mark {
                Some(mark) => looking_back(not_ahead(mark, "high-water mark"), start),
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
    }

    #[test]
    fn empty_and_inverted_ranges_have_no_windows() {
        assert!(plan_windows(at(2024, 1, 1), at(2024, 1, 1), 3).is_empty());
        assert!(plan_windows(at(2024, 2, 1), at(2024, 1, 1), 3).is_empty());
    }

    #[test]
    fn a_tiny_range_is_one_window() {
        let from = at(2024, 1, 1);
        let to = from + chrono::Duration::seconds(1);
        assert_eq!(
            plan_windows(from, to, 3),
            vec![Window {
                start: from,
                end: to
            }]
        );
    }

    #[test]
    fn a_year_is_four_quarters() {
        let windows = plan_windows(at(2023, 1, 1), at(2024, 1, 1), 3);
        let ends: Vec<_> = windows.iter().map(|w| w.end).collect();
        assert_eq!(
            ends,
            vec![
                at(2023, 4, 1),
                at(2023, 7, 1),
                at(2023, 10, 1),
                at(2024, 1, 1)
            ]
        );
    }

    #[test]
    fn month_ends_clamp_to_the_shorter_month() {
        let windows = plan_windows(at(2023, 11, 30), at(2024, 6, 1), 3);
        assert_eq!(windows[0].end, at(2024, 2, 29), "leap year february");
        let windows = plan_windows(at(2022, 11, 30), at(2023, 6, 1), 3);
        assert_eq!(windows[0].end, at(2023, 2, 28), "common year february");
        let windows = plan_windows(at(2024, 1, 31), at(2024, 12, 1), 3);
        assert_eq!(windows[0].end, at(2024, 4, 30));
    }

    #[test]
    fn a_leap_day_start_ends_three_months_later() {
        let windows = plan_windows(at(2024, 2, 29), at(2025, 1, 1), 3);
        assert_eq!(windows[0].end, at(2024, 5, 29));
        assert!(windows.iter().all(|w| window_fits(w, 3)));
    }

    #[test]
    fn the_last_window_ends_at_the_range_end() {
        let to = at(2024, 5, 17) + chrono::Duration::milliseconds(1234);
        let windows = plan_windows(at(2024, 1, 1), to, 3);
        assert_eq!(windows.last().unwrap().end, to);
    }

    proptest! {
        #[test]
        fn windows_cover_the_range_exactly_and_fit(
            from_secs in 0i64..4_000_000_000,
            len_secs in 0i64..400_000_000,
            months in 1u32..13,
        ) {
            let from = DateTime::from_timestamp(from_secs, 0).unwrap();
            let to = from + chrono::Duration::seconds(len_secs);
            let windows = plan_windows(from, to, months);
            if len_secs == 0 {
                prop_assert!(windows.is_empty());
            } else {
                prop_assert_eq!(windows.first().unwrap().start, from);
                prop_assert_eq!(windows.last().unwrap().end, to);
            }
            for pair in windows.windows(2) {
                prop_assert_eq!(pair[0].end, pair[1].start);
            }
            for window in &windows {
                prop_assert!(window.start < window.end);
                prop_assert!(window_fits(window, months));
            }
        }
    }
}

#[cfg(test)]
mod pass_tests {
    use super::*;
    use crate::model::RunMode;
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
    fn a_mark_ahead_of_the_clock_is_read_from_now_less_the_lookback() {
        let now = at(2021, 1, 2);
        let state = SyncState {
            high_water_mark: Some(now + chrono::Duration::minutes(30)),
            ..SyncState::default()
        };
        let plan = plan_pass("s", mode(), state, PassRequest::INCREMENTAL, now).unwrap();
        assert_eq!(
            windows(&plan),
            vec![Window {
                start: now - chrono::Duration::minutes(5),
                end: now
            }]
        );
        assert_eq!(plan.until, now, "the pass ends at the clock's now");
    }

    #[test]
    fn an_interrupted_pass_that_planned_past_the_clock_ends_at_now() {
        let now = at(2021, 1, 2);
        let ahead = Window {
            start: now - chrono::Duration::hours(1),
            end: now + chrono::Duration::minutes(30),
        };
        let state = SyncState {
            incremental: Some(Ledger {
                until: ahead.end,
                backfill: None,
                windows: vec![LedgerWindow {
                    window: ahead,
                    state: WindowState::Pending,
                }],
            }),
            ..SyncState::default()
        };
        let plan = plan_pass("s", mode(), state, PassRequest::INCREMENTAL, now).unwrap();
        assert_eq!(plan.until, now);
        assert!(
            windows(&plan).contains(&ahead),
            "its window is read as it was"
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
