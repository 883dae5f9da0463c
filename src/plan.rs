//! Splitting a time range into the windows an API lets us ask for.
//!
//! Mews accepts an `UpdatedUtc` interval of at most three months. A range is cut into
//! consecutive half-open windows `[start, end)`, each ending at most that many *calendar*
//! months after it starts. Calendar arithmetic clamps to the month's last day, so a window
//! from 30 November ends on 28 (or 29) February: never longer than the API allows, month
//! ends and leap years included. Windows chain end-to-start, so together they cover the
//! range exactly once.

use chrono::{DateTime, Months, Utc};

use crate::model::Window;

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

/// Whether `window` is no longer than `max_months` calendar months. Used by the fakes
/// and by assertions: it is the rule the planner must keep.
pub fn window_fits(window: &Window, max_months: u32) -> bool {
    match window.start.checked_add_months(Months::new(max_months)) {
        Some(limit) => window.end <= limit,
        None => true,
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
