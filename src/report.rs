//! What a person reads of deptsync's work: what passes read and wrote (after `sync`, in
//! the demo), and where each source stands (`status`, and the demo's end).

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};

use crate::Settings;
use crate::config::Schedule;
use crate::engine::PassTotals;
use crate::model::{DepartmentVersion, SourceStatus};
use crate::store::{AnyStore, Store};

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
    /// The pass was cancelled (what it committed is kept).
    pub cancelled: bool,
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
            Err(_) => {
                let state = if run.cancelled { "cancelled" } else { "failed" };
                row.push(state.to_owned());
                row.extend(std::iter::repeat_n(String::new(), 5));
            }
        }
        row.push(time);
        table.add_row(row);
    }
    table
}

/// A source as `status` shows it: what the store knows, and what the schedule says.
#[derive(serde::Serialize)]
pub struct StatusLine {
    #[serde(flatten)]
    status: SourceStatus,
    schedule: Option<String>,
    next_run_at: Option<DateTime<Utc>>,
    /// No success for three of the schedule's intervals.
    pub stale: bool,
}

impl StatusLine {
    pub fn new(
        status: SourceStatus,
        schedule: Option<&Schedule>,
        now: DateTime<Utc>,
    ) -> StatusLine {
        // A source that never succeeded counts from its first run, or from when the
        // service first had it due; one no service has had yet is not late.
        let since = status
            .last_success_at
            .or(status.first_run_at)
            .or(status.registered_at);
        let stale = schedule
            .and_then(|s| s.interval_after(now))
            .zip(since)
            .is_some_and(|(interval, since)| now - since > interval * 3);
        let mut status = status;
        if status.first_run_at.is_none() && !stale {
            status.state = "not run yet".to_owned();
        }
        StatusLine {
            schedule: schedule.map(|s| s.as_str().to_owned()),
            // The fleet's due time once a service has scheduled it (a backoff included).
            next_run_at: status
                .next_due_at
                .or_else(|| schedule.and_then(|s| s.next_after(now))),
            stale,
            status,
        }
    }
}

/// Every configured source (and any other the store has seen) as `status` shows it.
pub async fn status_lines(
    settings: &Settings,
    store: &AnyStore,
) -> anyhow::Result<Vec<StatusLine>> {
    let names: Vec<String> = settings
        .sources
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    let statuses = store
        .status(&names)
        .await
        .context("has `deptsync migrate` run on this database?")?;
    let now = Utc::now();
    let lines: Vec<StatusLine> = statuses
        .into_iter()
        .map(|status| {
            let schedule = settings
                .sources
                .iter()
                .find(|s| s.name.as_str() == status.source)
                .map(|s| &s.schedule);
            StatusLine::new(status, schedule, now)
        })
        .collect();
    Ok(lines)
}

/// The status lines as the table `status` prints.
pub fn status_table(lines: &[StatusLine]) -> comfy_table::Table {
    let time = |t: Option<DateTime<Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
    };
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header([
            "SOURCE",
            "STATE",
            "LAST RUN (UTC)",
            "LAST SUCCESS",
            "LIVE",
            "DELETED",
            "REJECTED",
            "POSITION",
            "NEXT RUN",
            "LEASE",
            "LAST ERROR",
        ]);
    for line in lines {
        let s = &line.status;
        let mut state = s.state.clone();
        if s.backfill_in_progress {
            state.push_str(" +backfill");
        }
        if line.stale {
            state.push_str(" (STALE)");
        }
        // Errors and positions quote vendors: nothing of theirs reaches the terminal raw.
        let error = match (&s.last_error, s.last_error_at) {
            (Some(error), at) => {
                let short: String = error.chars().take(100).collect();
                format!("{} {}", time(at), crate::printable(&short))
            }
            (None, _) => "-".to_owned(),
        };
        table.add_row([
            s.source.clone(),
            state,
            time(s.last_run_started_at),
            time(s.last_success_at),
            s.live_rows.to_string(),
            s.deleted_rows.to_string(),
            s.rejected_records.to_string(),
            crate::printable(&position(s)).into_owned(),
            time(line.next_run_at),
            lease(s),
            error,
        ]);
    }
    table
}

/// A line for each source whose deletions the mass-deletion guard withholds, pass after
/// pass: what, since when, and how a person confirms them.
pub fn withheld_lines(lines: &[StatusLine]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| {
            let source = &line.status.source;
            let withheld = line.status.withheld_deletions.as_ref()?;
            let scopes = match withheld.scopes {
                0 => String::new(),
                1 => " (in one scope)".to_owned(),
                n => format!(" (in {n} scopes)"),
            };
            Some(format!(
                "{source}: deletions withheld since {}: {} of {} live departments{scopes}, \
                 confirm with `deptsync sync --source {source} --allow-mass-delete`",
                withheld.since.format("%Y-%m-%d %H:%M:%S"),
                withheld.would_delete,
                withheld.live,
            ))
        })
        .collect()
}

/// Who holds the source's lease and until when (`-`: nobody).
fn lease(status: &SourceStatus) -> String {
    match (&status.lease_holder, status.lease_expires_at) {
        (Some(holder), Some(until)) => format!(
            "{} until {} (fence {})",
            crate::printable(holder),
            until.format("%H:%M:%S"),
            status.lease_fence.unwrap_or_default()
        ),
        _ => "-".to_owned(),
    }
}

/// Where a source stands; while no pass has succeeded since its position was dropped,
/// when and why it was.
fn position(status: &SourceStatus) -> String {
    match (&status.reset, status.reset_at) {
        (Some(reason), Some(at)) if status.last_success_at.is_none_or(|ok| ok < at) => format!(
            "{}; reading again from start since {}: {reason}",
            status.position,
            at.format("%Y-%m-%d %H:%M:%S")
        ),
        _ => status.position.clone(),
    }
}

/// A version as `deptsync changes` prints it without `--json`: tab-separated.
pub fn change_line(version: &DepartmentVersion) -> String {
    let state = match (version.deleted, version.is_active) {
        (true, _) => "deleted",
        (false, true) => "active",
        (false, false) => "inactive",
    };
    // A vendor's name or id may hold a tab or a line break: escaped, each version stays
    // one line of tab-separated fields.
    let field = |text: &str| text.escape_debug().to_string();
    format!(
        "{}\t{}\t{}\t{state}\tfrom {}",
        field(&version.source),
        field(&version.external_id),
        field(&version.name),
        version
            .valid_from
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}
