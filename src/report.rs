//! What passes read and wrote, as the tables a person reads after `sync` and in the demo.

use std::time::Duration;

use crate::engine::PassTotals;

/// How one source's pass went.
pub struct SourceRun {
    pub name: String,
    /// Read by update time (windows), not as a listing.
    pub windowed: bool,
    pub elapsed: Duration,
    /// Requests the upstream answered during the pass, when known (the demo counts them).
    pub requests: Option<usize>,
    /// The pass's totals, or why it failed.
    pub result: Result<PassTotals, String>,
}

/// A table without borders, as deptsync prints them.
pub fn table() -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table
}

/// What each source's pass read and wrote.
pub fn pass_table(runs: &[SourceRun]) -> comfy_table::Table {
    let mut table = table();
    table.set_header([
        "SOURCE",
        "REQUESTS",
        "PAGES",
        "READ",
        "INSERTED",
        "UPDATED",
        "UNCHANGED",
        "DELETED",
        "TIME",
    ]);
    for run in runs {
        let time = format!("{:.1} s", run.elapsed.as_secs_f64());
        let requests = run
            .requests
            .map_or_else(|| "-".to_owned(), |requests| requests.to_string());
        let mut row = vec![run.name.clone(), requests];
        match &run.result {
            Ok(totals) => {
                let counts = &totals.counts;
                let read = counts.inserted + counts.updated + counts.unchanged + counts.rejected;
                row.extend(
                    [
                        totals.pages,
                        read,
                        counts.inserted,
                        counts.updated,
                        counts.unchanged,
                        counts.deleted,
                    ]
                    .map(|n| n.to_string()),
                );
            }
            Err(reason) => {
                let state = if reason == "cancelled" {
                    "cancelled"
                } else {
                    "failed"
                };
                row.push(state.to_owned());
                row.extend(std::iter::repeat_n(String::new(), 5));
            }
        }
        row.push(time);
        table.add_row(row);
    }
    table
}
