//! `deptsync demo`: deptsync's whole job on a machine with nothing but Rust installed.
//!
//! The demo starts the simulated vendor APIs of [`crate::fakes`] on loopback ports, with a
//! few thousand generated departments: hotels on Mews, whose departments were updated
//! over several years; company branches on Procurify; an accountant's client accounts on
//! Snapbooks, some departments inactive; an organization tree on a tenant data API. Then:
//!
//! 1. a first pass syncs all four into the embedded SQLite file `deptsync-demo.db` (or
//!    `--database`), showing progress;
//! 2. things change upstream: renames, deactivations, a department gone from two
//!    listings, new departments (on Mews, all updated now);
//! 3. a second pass shows that only the changes were read (Mews reads from where the
//!    first pass ended) or written (a listing is read whole, but unchanged rows are left
//!    alone);
//! 4. `deptsync status` and a query over `departments`, and how to query the file.
//!
//! It goes through the doors a user does: its config is TOML validated by
//! [`Settings::parse`], and each pass is [`crate::app::run_pass`], as `deptsync sync`
//! runs it. `--serve` only starts the simulated APIs and prints a config that points at
//! them, for `sync`, `run` and `status` by hand.
//!
//! - this module: the command's entry, and `--serve`;
//! - [`story`]: the demo's two passes and what it says of them;
//! - [`world`]: the simulated vendors, their generated departments and the changes made
//!   to them;
//! - [`report`]: the sample query and how to query the file.

mod report;
mod story;
mod world;

use story::demo;
use world::{Simulation, Upstream, demo_epoch};

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::redact_url;
use crate::progress::Display;
use crate::store::DatabaseKind;

/// The database of a demo not told otherwise: an SQLite file in the working directory,
/// removed and made afresh by every demo.
pub const DEMO_DATABASE_URL: &str = "sqlite://deptsync-demo.db";
/// The file [`DEMO_DATABASE_URL`] names.
const DEMO_DATABASE_FILE: &str = "deptsync-demo.db";

/// The last line of the config `demo --serve` prints: whoever reads it (a person, a test)
/// knows the config is whole.
pub const SERVE_CONFIG_END: &str = "# end of the demo config";

/// What `deptsync demo` was asked for.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// The database to sync into; [`DEMO_DATABASE_URL`] when `None`.
    pub database: Option<String>,
    /// Only serve the simulated APIs and print a config for them, until cancelled.
    pub serve: bool,
}

/// Why the demo did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The command line is wrong (`--database` names no store): nothing was done.
    #[error("{0}")]
    Usage(String),
    /// Something failed on the way.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Runs the demo (or, with `serve`, serves until `cancel`), writing its report to stdout.
pub async fn run(
    options: DemoOptions,
    cancel: CancellationToken,
    display: &Display,
) -> Result<(), DemoError> {
    let database_url = match options.database {
        Some(url) => {
            DatabaseKind::of_url(&url).map_err(|message| {
                DemoError::Usage(format!("--database {}", redacted(&url, &message)))
            })?;
            url
        }
        None => DEMO_DATABASE_URL.to_owned(),
    };
    // The same world on every run: its history ends at a fixed instant, not at now.
    let mut simulation = Simulation::start(Upstream::generate(demo_epoch()))
        .await
        .context("starting the simulated APIs on 127.0.0.1")?;
    if options.serve {
        // The world as the demo leaves it (its changes made), so that a sync into the
        // demo's database finds what the demo stored: nothing to delete or revert.
        simulation.change_upstream(Utc::now());
        serve(&simulation, &database_url, &cancel).await?;
        return Ok(());
    }
    let fresh_file = database_url == DEMO_DATABASE_URL;
    demo(simulation, &database_url, fresh_file, &cancel, display).await?;
    Ok(())
}

/// The URL without its password, and what is wrong with it.
fn redacted(url: &str, message: &str) -> String {
    format!("{} {message}", redact_url(url))
}

/// Writes `text` to stdout at once (the bars and logs are on stderr).
fn say(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

async fn serve(
    simulation: &Simulation,
    database_url: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mut text = String::new();
    writeln!(
        text,
        "# deptsync demo --serve: four simulated vendor APIs on 127.0.0.1 with {} departments,\n\
         # serving until Ctrl-C. Save this config (`deptsync demo --serve > demo.toml`), then,\n\
         # while it serves, from the same directory:\n\
         #   deptsync --config demo.toml sync      # one pass of every source\n\
         #   deptsync --config demo.toml status    # where each source stands\n\
         #   deptsync --config demo.toml run       # the service: every source every minute\n\
         # The tokens are the simulator's own. deploy/deptsync.example.toml explains every field.",
        simulation.upstream.department_count()
    )?;
    text.push('\n');
    text.push_str(&simulation.config_toml(database_url, Some("0 * * * * *")));
    writeln!(text, "{SERVE_CONFIG_END}")?;
    say(&text)?;
    tracing::info!("the simulated APIs serve until Ctrl-C");
    cancel.cancelled().await;
    Ok(())
}
