//! The command line: what each subcommand does, over the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, Settings, SourceSettings};
use crate::engine::{self, PassRequest, error_chain};
use crate::model::{RunOutcome, SourceStatus};
use crate::sources::{Connector, Source, SyncMode, http};
use crate::store::Store;
use crate::store::postgres::{IfMissing, PgStore};

/// Keeps an SQL copy of the departments held in several SaaS APIs.
#[derive(Debug, Parser)]
#[command(name = "deptsync", version, about)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One incremental pass of every source (or the named ones), or a backfill.
    Sync(SyncArgs),
    /// The last run, last success, state, rows and last error of every source.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply the database migrations that have not run yet.
    Migrate,
    /// Validate the config, then try the database and each source's credentials.
    Check,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Sync only this source (repeatable).
    #[arg(long = "source", value_name = "NAME")]
    pub sources: Vec<String>,
    /// Re-read a range of update times (needs one --source and --from).
    #[arg(long, requires = "from")]
    pub backfill: bool,
    /// Start of the backfill range (RFC 3339, inclusive).
    #[arg(long, value_name = "RFC3339", requires = "backfill")]
    pub from: Option<DateTime<Utc>>,
    /// End of the backfill range (RFC 3339, exclusive; default: now).
    #[arg(long, value_name = "RFC3339", requires = "backfill")]
    pub to: Option<DateTime<Utc>>,
    /// Confirm that a full listing may mark more than the source's max_delete_fraction of
    /// its departments deleted.
    #[arg(long, conflicts_with = "backfill")]
    pub allow_mass_delete: bool,
}

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// Some work failed; the rest was done.
    Failure = 1,
    /// The config or the command line is wrong; nothing was done.
    BadConfig = 2,
}

/// An error that says which exit code it deserves.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Config(_) | CliError::Usage(_) => Exit::BadConfig,
            CliError::Failed(_) => Exit::Failure,
        }
    }
}

/// Runs the command; `cancel` is triggered by a signal (or by a test).
pub async fn run(cli: Cli, cancel: CancellationToken) -> Result<Exit, CliError> {
    let settings = Settings::load(&cli.config, &config::process_env)?;
    match cli.command {
        Command::Sync(args) => sync(&settings, args, cancel).await,
        Command::Status { json } => status(&settings, json).await,
        Command::Migrate => {
            connect(&settings).await?;
            tracing::info!("migrations applied");
            Ok(Exit::Success)
        }
        Command::Check => check(&settings).await,
    }
}

/// Connects to the database and applies pending migrations.
async fn connect(settings: &Settings) -> anyhow::Result<PgStore> {
    let url = settings.database.redacted_url();
    let store = PgStore::connect(&settings.database.url, IfMissing::Create)
        .await
        .with_context(|| format!("database {url}"))?;
    store
        .migrate()
        .await
        .with_context(|| format!("database {url}"))?;
    Ok(store)
}

/// The sources `names` asks for (all when empty), in config order, each once.
fn select_sources<'a>(
    settings: &'a Settings,
    names: &[String],
) -> Result<Vec<&'a SourceSettings>, CliError> {
    let configured = |name: &str| settings.sources.iter().any(|s| s.name.as_str() == name);
    if let Some(unknown) = names.iter().find(|name| !configured(name)) {
        let known: Vec<_> = settings.sources.iter().map(|s| s.name.as_str()).collect();
        return Err(CliError::Usage(format!(
            "--source {unknown}: no such source in the config (known: {})",
            known.join(", ")
        )));
    }
    Ok(settings
        .sources
        .iter()
        .filter(|s| names.is_empty() || names.iter().any(|name| name == s.name.as_str()))
        .collect())
}

async fn sync(
    settings: &Settings,
    args: SyncArgs,
    cancel: CancellationToken,
) -> Result<Exit, CliError> {
    let selected = select_sources(settings, &args.sources)?;
    let client = http::build_client().context("building the HTTP client")?;
    let request = match (args.backfill, args.from) {
        (true, Some(from)) => {
            if selected.len() != 1 || args.sources.is_empty() {
                return Err(CliError::Usage(
                    "--backfill needs exactly one --source".to_owned(),
                ));
            }
            let mode = Connector::new(selected[0], &client).mode();
            if !matches!(mode, SyncMode::Windowed { .. }) {
                return Err(CliError::Usage(format!(
                    "--backfill: source {} is read in full on every pass; a plain sync re-reads everything",
                    selected[0].name
                )));
            }
            if let Some(to) = args.to.filter(|to| *to <= from) {
                return Err(CliError::Usage(format!(
                    "--to {to} must be after --from {from}"
                )));
            }
            PassRequest::Backfill { from, to: args.to }
        }
        (true, None) => return Err(CliError::Usage("--backfill needs --from".to_owned())),
        (false, _) => PassRequest::Incremental {
            allow_mass_delete: args.allow_mass_delete,
        },
    };
    if selected.is_empty() {
        tracing::warn!("the config has no sources; nothing to sync");
        return Ok(Exit::Success);
    }

    let store = connect(settings).await?;
    let mut failed = Vec::new();
    for source_settings in selected {
        if cancel.is_cancelled() {
            break;
        }
        let name = source_settings.name.as_str();
        let connector = Connector::new(source_settings, &client);
        match engine::run_pass(name, &connector, &store, request, &cancel).await {
            Ok(report) if report.outcome == RunOutcome::Cancelled => {
                tracing::warn!(
                    source = name,
                    "pass cancelled; the next sync resumes where it stopped"
                );
            }
            Ok(_) => {}
            Err(e) => failed.push(format!("{name}: {}", error_chain(&e))),
        }
    }
    if cancel.is_cancelled() {
        return Err(CliError::Failed(anyhow::anyhow!(
            "interrupted; committed pages are kept and the next sync resumes"
        )));
    }
    if failed.is_empty() {
        Ok(Exit::Success)
    } else {
        Err(CliError::Failed(anyhow::anyhow!(
            "{} of the sources failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        )))
    }
}

async fn status(settings: &Settings, json: bool) -> Result<Exit, CliError> {
    let store = PgStore::connect(&settings.database.url, IfMissing::Fail)
        .await
        .with_context(|| format!("database {}", settings.database.redacted_url()))?;
    let names: Vec<String> = settings
        .sources
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    let statuses = store
        .status(&names)
        .await
        .context("has `deptsync migrate` run on this database?")?;
    let mut out = std::io::stdout().lock();
    let written = if json {
        serde_json::to_writer_pretty(&mut out, &statuses)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        write_status_table(&mut out, &statuses)
    };
    written.context("writing the status")?;
    Ok(Exit::Success)
}

fn write_status_table(out: &mut impl Write, statuses: &[SourceStatus]) -> std::io::Result<()> {
    let time = |t: Option<DateTime<Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
    };
    let rows: Vec<[String; 8]> = statuses
        .iter()
        .map(|s| {
            let state = if s.backfill_in_progress {
                format!("{} (backfill pending)", s.state)
            } else {
                s.state.clone()
            };
            [
                s.source.clone(),
                state,
                time(s.last_run_started_at),
                time(s.last_success_at),
                s.live_rows.to_string(),
                s.deleted_rows.to_string(),
                s.rejected_records.to_string(),
                s.last_error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| e.chars().take(120).collect()),
            ]
        })
        .collect();
    let header = [
        "SOURCE",
        "STATE",
        "LAST RUN (UTC)",
        "LAST SUCCESS (UTC)",
        "LIVE",
        "DELETED",
        "REJECTED",
        "LAST ERROR",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

async fn check(settings: &Settings) -> Result<Exit, CliError> {
    let url = settings.database.redacted_url();
    connect(settings).await?;
    tracing::info!(database = %url, "database reachable and migrated");
    let client = http::build_client().context("building the HTTP client")?;
    let mut failed = Vec::new();
    for source_settings in &settings.sources {
        let name = source_settings.name.as_str();
        match Connector::new(source_settings, &client).check().await {
            Ok(()) => tracing::info!(source = name, "credentials accepted"),
            Err(e) => {
                tracing::error!(source = name, error = %error_chain(&e), "check failed");
                failed.push(format!("{name}: {}", error_chain(&e)));
            }
        }
    }
    if failed.is_empty() {
        Ok(Exit::Success)
    } else {
        Err(CliError::Failed(anyhow::anyhow!(
            "{} of the sources failed the check:\n  {}",
            failed.len(),
            failed.join("\n  ")
        )))
    }
}
