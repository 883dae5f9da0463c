//! The story the demo tells: two passes, what changed between them, and what they did.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::report::{SAMPLE_QUERY, history, indent, query_hints, read_feed, sample_query};
use super::world::{MEWS_START, SOURCE_NAMES, Simulation};
use super::{DEMO_DATABASE_FILE, say};
use crate::Settings;
use crate::app;
use crate::config::redact_url;
use crate::engine::PassRequest;
use crate::model::FeedToken;
use crate::progress::Display;
use crate::report::{SourceRun, pass_table};
use crate::store::AnyStore;

pub(super) async fn demo(
    mut simulation: Simulation,
    database_url: &str,
    fresh_file: bool,
    cancel: &CancellationToken,
    display: &Display,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut text = format!(
        "deptsync demo: four simulated vendor APIs on 127.0.0.1, synced into {}\n",
        redact_url(database_url)
    );
    if fresh_file {
        let removed = remove_demo_files(Path::new("."))?;
        if removed.is_empty() {
            text.push_str("  (a new file in the working directory)\n");
        } else {
            writeln!(
                text,
                "  (made afresh: the previous demo's {} removed)",
                removed.join(", ")
            )?;
        }
    }
    text.push_str("\nUpstream, simulated:\n");
    text.push_str(&simulation.describe());
    say(&text)?;

    // The demo's config goes through the same validation as a user's. DATABASE_URL is
    // not read: the demo never writes into a configured database by accident.
    let toml = simulation.config_toml(database_url, None);
    let settings = Settings::parse(&toml, &|_| None).context("the demo's own config")?;
    let store = AnyStore::open_with(&settings.database.url, &app::limits(&settings))
        .await
        .with_context(|| format!("database {}", settings.database.redacted_url()))?;

    say("\nPass 1: the first sync reads everything.\n")?;
    let first = sync_all(&settings, &store, &simulation, cancel, display).await?;
    let mut text = format!("{}\n", pass_table(&first));
    for note in first_pass_notes(&first) {
        writeln!(text, "  {note}")?;
    }
    say(&text)?;
    simulation.check_rules()?;
    fail_on_errors(&first)?;
    // Where a downstream job that read the change feed after the first pass stands.
    let (first_versions, after_first) = read_feed(&store, FeedToken::START).await?;

    let changes = simulation.change_upstream(Utc::now());
    let mut text = String::from("\nUpstream changes:\n");
    for (source, change) in &changes {
        writeln!(text, "  {source:<15} {change}")?;
    }
    text.push_str(
        "\nPass 2: an incremental sync. Mews says what changed since a time: only that is read.\n\
         The listings cannot: they are read whole, and only what changed is written.\n",
    );
    say(&text)?;
    let second = sync_all(&settings, &store, &simulation, cancel, display).await?;
    let mut text = format!("{}\n", pass_table(&second));
    for note in second_pass_notes(&second) {
        writeln!(text, "  {note}")?;
    }
    say(&text)?;
    simulation.check_rules()?;
    fail_on_errors(&second)?;

    let lines = crate::report::status_lines(&settings, &store).await?;
    say(&format!(
        "\n`deptsync status`:\n{}\n",
        crate::report::status_table(&lines)
    ))?;

    let (changed, next) = read_feed(&store, after_first).await?;
    say(&history(after_first, &first_versions, &changed, next))?;

    let summary = sample_query(&store).await?;
    say(&format!(
        "\nA query over `departments`:\n\n{}\n\n{}\n",
        indent(SAMPLE_QUERY),
        summary
    ))?;

    say(&format!(
        "\nThe demo took {:.1} s. {}",
        started.elapsed().as_secs_f64(),
        query_hints(database_url)
    ))?;
    Ok(())
}

/// Removes the default demo database and the files SQLite and deptsync keep beside it
/// (`-wal`, `-shm`, `-journal`, lock files) from `dir`; returns the names removed. Never
/// called for a database a user named.
pub(super) fn remove_demo_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let database = dir.join(DEMO_DATABASE_FILE);
    // Held until the files are gone: no store opens the file meanwhile.
    let _unused = match crate::store::sqlite::lock_unused(&database) {
        Ok(lock) => lock,
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{DEMO_DATABASE_FILE} is in use by a running deptsync (a `run`, or a `sync` \
             beside `demo --serve`): stop it first, or give the demo another file with \
             --database sqlite://other.db"
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e)
                .with_context(|| format!("checking whether {DEMO_DATABASE_FILE} is in use"));
        }
    };
    let mut names: Vec<String> = ["", "-wal", "-shm", "-journal", ".lock", ".in.use.lock"]
        .iter()
        .map(|suffix| format!("{DEMO_DATABASE_FILE}{suffix}"))
        .collect();
    names.extend(
        SOURCE_NAMES
            .iter()
            .map(|source| format!("{DEMO_DATABASE_FILE}.{source}.lock")),
    );
    let mut removed = Vec::new();
    for name in names {
        let path: PathBuf = dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
        }
    }
    Ok(removed)
}

/// One incremental pass of every source, one after the other as `deptsync sync` runs
/// them, each with its progress bar (or log lines).
pub(super) async fn sync_all(
    settings: &Settings,
    store: &AnyStore,
    simulation: &Simulation,
    cancel: &CancellationToken,
    display: &Display,
) -> anyhow::Result<Vec<SourceRun>> {
    let mut runs = Vec::with_capacity(settings.sources.len());
    for source in app::ready(&settings.sources).context("building the HTTP client")? {
        let requests_before = simulation.requests(source.name());
        let mut run = app::run_pass(
            &source,
            store,
            PassRequest::INCREMENTAL,
            settings.daemon.lease_ttl,
            cancel,
            display,
        )
        .await;
        if run.cancelled {
            anyhow::bail!("interrupted; run the demo again to start afresh");
        }
        run.requests = Some(
            simulation
                .requests(source.name())
                .saturating_sub(requests_before),
        );
        runs.push(run);
    }
    Ok(runs)
}

/// An error naming every source whose pass failed, if any did.
pub(super) fn fail_on_errors(runs: &[SourceRun]) -> anyhow::Result<()> {
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|run| {
            run.result
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", run.name))
        })
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} of the demo's sources failed:\n  {}",
        failed.len(),
        failed.join("\n  ")
    )
}

/// What the first pass's figures mean.
pub(super) fn first_pass_notes(runs: &[SourceRun]) -> Vec<String> {
    runs.iter()
        .filter(|run| run.windowed)
        .filter_map(|run| {
            let totals = run.result.as_ref().ok()?;
            Some(format!(
                "{}: {} windows of at most three months (Mews' longest) from {MEWS_START}, \
                 paced by the source's rate budget (by default 180 requests per 30 s)",
                run.name, totals.windows
            ))
        })
        .collect()
}

/// What the second pass's figures mean.
pub(super) fn second_pass_notes(runs: &[SourceRun]) -> Vec<String> {
    runs.iter()
        .filter_map(|run| {
            let totals = run.result.as_ref().ok()?;
            let counts = &totals.counts;
            let written = counts.inserted + counts.updated + counts.deleted;
            Some(if run.windowed {
                format!(
                    "{}: read only the departments updated since the first pass ({} window{} \
                     from where it ended, less the 5-minute lookback)",
                    run.name,
                    totals.windows,
                    if totals.windows == 1 { "" } else { "s" }
                )
            } else if counts.deleted > 0 {
                format!(
                    "{}: wrote {written} rows; listed twice, because a department missing from \
                     one complete listing is deleted only when a second one confirms it",
                    run.name
                )
            } else {
                format!(
                    "{}: wrote {written} rows; the {} unchanged were left alone",
                    run.name, counts.unchanged
                )
            })
        })
        .collect()
}
