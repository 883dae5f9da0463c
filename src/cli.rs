//! The command line: what each subcommand does, over the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::Settings;
use crate::app;
use crate::config::{self, ConfigError};
use crate::daemon::{Daemon, DaemonError};
use crate::engine::{PassRequest, error_chain};
use crate::model::FeedToken;
use crate::progress::Display;
use crate::report::{change_line, pass_table, status_lines, status_table, withheld_lines};
use crate::sources::Source;
use crate::sources::SourceSettings;
use crate::store::{AnyStore, IfMissing, PassEnd, Store};

/// Keeps an SQL copy of the departments held in several SaaS APIs.
#[derive(Debug, Parser)]
#[command(name = "deptsync", version, about)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    /// Log lines as plain text, or as JSON objects for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as a service: every source on its schedule until SIGTERM or SIGINT.
    Run,
    /// One incremental pass of every source (or the named ones), or a backfill.
    Sync(SyncArgs),
    /// The last run, last success, state, rows, position, last error and next run of
    /// every source. Exits 3 when a source has had no success for three of its intervals.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the versions of departments written after a token, and then the token to
    /// pass next time: a change feed that never skips a commit, for downstream jobs.
    Changes(ChangesArgs),
    /// Apply the database migrations that have not run yet.
    Migrate,
    /// Validate the config, then try the database and each source's credentials.
    Check,
    /// Drop a source's saved position (high-water mark, window ledgers, the listing in
    /// progress; rows stay), so that its next pass reads everything again from `start`.
    Reset(ResetArgs),
    /// See deptsync at work with nothing set up: simulated Mews, Procurify, Snapbooks and
    /// HR APIs on loopback ports, synced into a fresh database, changed, synced again;
    /// then `status` and a query over `departments`. Needs no config file (--config is
    /// not read).
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
}

/// The options of `deptsync demo`.
#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The database to sync into. Default: the SQLite file deptsync-demo.db in the working
    /// directory, removed and made afresh by every demo. DATABASE_URL is not read, so that
    /// the demo never writes into the service's database by accident.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Only start the simulated APIs, print a config (TOML) that points at them, and serve
    /// until Ctrl-C: for trying `sync`, `run` and `status` by hand.
    #[arg(long)]
    pub serve: bool,
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
    #[arg(long, value_name = "RFC3339", requires = "backfill", value_parser = instant)]
    pub from: Option<DateTime<Utc>>,
    /// End of the backfill range (RFC 3339, exclusive; default: now).
    #[arg(long, value_name = "RFC3339", requires = "backfill", value_parser = instant)]
    pub to: Option<DateTime<Utc>>,
    /// Confirm that a full listing may mark more than the source's max_delete_fraction of
    /// its departments deleted.
    #[arg(long, conflicts_with = "backfill")]
    pub allow_mass_delete: bool,
}

#[derive(Debug, Args)]
pub struct ChangesArgs {
    /// The token the last run printed (its last line); without it, from the beginning.
    #[arg(long, value_name = "TOKEN")]
    pub since: Option<FeedToken>,
    /// Only this source's versions (repeatable).
    #[arg(long = "source", value_name = "NAME")]
    pub sources: Vec<String>,
    /// One JSON object per version, then `{"next":"TOKEN"}`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The source whose position to drop.
    #[arg(long = "source", value_name = "NAME")]
    pub source: String,
    /// Do not ask for confirmation (needed when not on a terminal).
    #[arg(long)]
    pub yes: bool,
}

/// Why a source's position was dropped by `deptsync reset`, as `status` shows it.
pub const RESET_BY_OPERATOR: &str = "reset by an operator (`deptsync reset`)";

/// An instant on the command line, or what form it should have.
fn instant(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}: expected an RFC 3339 time like 2024-01-01T00:00:00Z"))
}

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// Some work failed; the rest was done.
    Failure = 1,
    /// The config or the command line is wrong; nothing was done.
    BadConfig = 2,
    /// `status`: a source has had no success for three of its intervals.
    Stale = 3,
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
pub async fn run(cli: Cli, cancel: CancellationToken, display: Display) -> Result<Exit, CliError> {
    // Every command but the demo (which makes its own) starts from the config file.
    let load = || Settings::load(&cli.config, &config::process_env);
    match cli.command {
        Command::Run => {
            let daemon = Daemon::build(load()?)
                .context("starting the service")?
                .reloading_from(cli.config.clone());
            match daemon
                .run_reloading(cancel.cancelled_owned(), reload_on_sighup())
                .await
            {
                Ok(()) => Ok(Exit::Success),
                // The address is the config's: restarting cannot mend it (the unit does
                // not restart on exit 2).
                Err(e @ DaemonError::MetricsListen { .. }) => Err(CliError::Usage(format!(
                    "field `daemon.metrics_listen`: {}",
                    error_chain(&e)
                ))),
                Err(e) => Err(CliError::Failed(
                    anyhow::Error::new(e).context("running the service"),
                )),
            }
        }
        Command::Sync(args) => sync(&load()?, args, cancel, &display).await,
        Command::Status { json } => status(&load()?, json).await,
        Command::Changes(args) => changes(&load()?, args).await,
        Command::Migrate => migrate(&load()?).await,
        Command::Check => check(&load()?).await,
        Command::Reset(args) => reset(&load()?, args).await,
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo(args, cancel, &display).await,
    }
}

#[cfg(feature = "demo")]
async fn demo(
    args: DemoArgs,
    cancel: CancellationToken,
    display: &Display,
) -> Result<Exit, CliError> {
    let options = crate::demo::DemoOptions {
        database: args.database,
        serve: args.serve,
    };
    match crate::demo::run(options, cancel, display).await {
        Ok(()) => Ok(Exit::Success),
        Err(crate::demo::DemoError::Usage(message)) => Err(CliError::Usage(message)),
        Err(crate::demo::DemoError::Failed(e)) => Err(CliError::Failed(e)),
    }
}

/// A reload asked for each `SIGHUP` (`systemctl reload`): several before one is read
/// make one reload.
fn reload_on_sighup() -> tokio::sync::mpsc::Receiver<()> {
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangups) => {
                while hangups.recv().await.is_some() {
                    tracing::info!("SIGHUP: reading the configuration again");
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) =
                        reload.try_send(())
                    {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads are off"),
        }
        #[cfg(not(unix))]
        let _ = reload;
    });
    reloads
}

/// Connects to the database (creating it when missing) and applies pending migrations.
async fn connect(settings: &Settings) -> anyhow::Result<AnyStore> {
    AnyStore::open_with(&settings.database.url, &crate::app::limits(settings))
        .await
        .with_context(|| format!("database {}", settings.database.redacted_url()))
}

/// Applies the migrations that have not run yet, and says how many there were.
async fn migrate(settings: &Settings) -> Result<Exit, CliError> {
    let database = || format!("database {}", settings.database.redacted_url());
    let store = AnyStore::connect_with(
        &settings.database.url,
        IfMissing::Create,
        &crate::app::limits(settings),
    )
    .await
    .with_context(database)?;
    let before = store.applied_migrations().await.with_context(database)?;
    store.migrate().await.with_context(database)?;
    let after = store.applied_migrations().await.with_context(database)?;
    match after - before {
        0 => tracing::info!(migrations = after, "the database is up to date"),
        applied => tracing::info!(applied, migrations = after, "migrations applied"),
    }
    Ok(Exit::Success)
}

/// Success, or the sources that `failed` and why.
fn summary(failed: Vec<String>, what: &str) -> Result<Exit, CliError> {
    if failed.is_empty() {
        return Ok(Exit::Success);
    }
    Err(CliError::Failed(anyhow::anyhow!(
        "{} of the sources failed{what}:\n  {}",
        failed.len(),
        failed.join("\n  ")
    )))
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
    display: &Display,
) -> Result<Exit, CliError> {
    let selected =
        app::ready(select_sources(settings, &args.sources)?).context("building the HTTP client")?;
    let request = match (args.backfill, args.from) {
        (true, Some(from)) => {
            if selected.len() != 1 || args.sources.is_empty() {
                return Err(CliError::Usage(
                    "--backfill needs exactly one --source".to_owned(),
                ));
            }
            if !selected[0].windowed() {
                return Err(CliError::Usage(format!(
                    "--backfill: source {} is read in full on every pass; a plain sync re-reads everything",
                    selected[0].name()
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
    if args.allow_mass_delete {
        let never_delete: Vec<&str> = selected
            .iter()
            .filter(|source| source.windowed())
            .map(|source| source.name())
            .collect();
        if !never_delete.is_empty() && never_delete.len() == selected.len() {
            return Err(CliError::Usage(format!(
                "--allow-mass-delete: {} never deletes (read by update time, not as a \
                 listing); nothing to confirm",
                never_delete.join(", ")
            )));
        }
    }
    if selected.is_empty() {
        tracing::warn!("the config has no sources; nothing to sync");
        return Ok(Exit::Success);
    }

    let store = connect(settings).await?;
    // A source synced by cron, with no service, counts for `status` from now too.
    let names: Vec<String> = selected.iter().map(|s| s.name().to_owned()).collect();
    app::register(&store, &names).await;
    let mut failed = Vec::new();
    let mut runs = Vec::new();
    for source in &selected {
        if cancel.is_cancelled() {
            break;
        }
        let run = app::run_pass(
            source,
            &store,
            request,
            settings.daemon.lease_ttl,
            &cancel,
            display,
        )
        .await;
        match &run.result {
            Err(_) if run.cancelled => tracing::warn!(
                source = run.name,
                "pass cancelled; the next sync resumes where it stopped"
            ),
            Err(error) => failed.push(format!("{}: {error}", run.name)),
            Ok(_) => {}
        }
        runs.push(run);
    }
    // What each pass read and wrote, on stdout (the logs are on stderr).
    if !runs.is_empty() {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", pass_table(&runs)).context("writing the summary")?;
    }
    if cancel.is_cancelled() {
        return Err(CliError::Failed(anyhow::anyhow!(
            "interrupted; committed pages are kept and the next sync resumes"
        )));
    }
    summary(failed, "")
}

/// Drops a source's saved position, under its lease, after a person confirmed it.
async fn reset(settings: &Settings, args: ResetArgs) -> Result<Exit, CliError> {
    // Only a configured source may be reset (a typo must not pass silently).
    select_sources(settings, std::slice::from_ref(&args.source))?;
    let name = args.source.as_str();
    let what = format!(
        "this drops the saved position of source {name} (its rows stay); its next pass \
         reads everything again from its start"
    );
    if !args.yes && !confirmed(&what)? {
        return Err(CliError::Usage(format!(
            "{what}: confirm with --yes (nothing was changed)"
        )));
    }
    let store = connect(settings).await?;
    let mut lease = store
        .try_lease(name, settings.daemon.lease_ttl)
        .await
        .context("taking the source's lease")?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "another process is syncing this source now; nothing was changed (try again \
                 once its pass has ended)"
            )
        })?;
    let dropped = store
        .set_scope(&mut lease, None, Some(RESET_BY_OPERATOR))
        .await;
    if let Err(e) = store.release(&lease, PassEnd::Cancelled).await {
        tracing::warn!(error = %crate::error_chain(&e), "could not give the source's lease back; it lapses on its own");
    }
    dropped.context("dropping the source's position")?;
    tracing::warn!(
        source = name,
        "position dropped by an operator; the next pass reads everything again from start"
    );
    Ok(Exit::Success)
}

/// Whether the person at the terminal answers yes to `question`; never on anything but
/// a terminal, where no one can answer.
fn confirmed(question: &str) -> anyhow::Result<bool> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    let mut stderr = std::io::stderr().lock();
    write!(stderr, "{question}. Go on? [y/N] ").context("asking for confirmation")?;
    stderr.flush().context("asking for confirmation")?;
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes"))
}

/// Connects to the database for reading: one that does not exist is an error, not
/// created empty, and no migration is applied (the service's to do).
async fn connect_to_read(settings: &Settings) -> anyhow::Result<AnyStore> {
    AnyStore::connect_with(
        &settings.database.url,
        IfMissing::Fail,
        &crate::app::limits(settings),
    )
    .await
    .with_context(|| format!("database {}", settings.database.redacted_url()))
}

/// Prints the change feed after `--since`, batch by batch, and the token to read on from.
async fn changes(settings: &Settings, args: ChangesArgs) -> Result<Exit, CliError> {
    select_sources(settings, &args.sources)?;
    let store = connect_to_read(settings).await?;
    let since = args.since.unwrap_or(FeedToken::START);
    let mut feed = store
        .changes(since, &args.sources)
        .await
        .context("reading the change feed")?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(batch) = feed.next_batch().await.context("reading the change feed")? {
        for version in &batch {
            if args.json {
                serde_json::to_writer(&mut out, version).map_err(std::io::Error::from)
            } else {
                write!(out, "{}", change_line(version))
            }
            .and_then(|()| writeln!(out))
            .context("writing the changes")?;
        }
    }
    let next = feed.next_token().to_string();
    if args.json {
        writeln!(out, "{}", serde_json::json!({ "next": next }))
    } else {
        writeln!(out, "next: {next}")
    }
    .and_then(|()| out.flush())
    .context("writing the changes")?;
    Ok(Exit::Success)
}

async fn status(settings: &Settings, json: bool) -> Result<Exit, CliError> {
    let store = connect_to_read(settings).await?;
    let lines = status_lines(settings, &store).await?;
    let mut out = std::io::stdout().lock();
    let written = if json {
        serde_json::to_writer_pretty(&mut out, &lines)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        writeln!(out, "{}", status_table(&lines)).and_then(|()| {
            withheld_lines(&lines)
                .iter()
                .try_for_each(|line| writeln!(out, "{}", crate::printable(line)))
        })
    };
    written.context("writing the status")?;
    if lines.iter().any(|line| line.stale) {
        return Ok(Exit::Stale);
    }
    Ok(Exit::Success)
}

async fn check(settings: &Settings) -> Result<Exit, CliError> {
    if settings.sources.is_empty() {
        return Err(CliError::Usage(
            "the config has no sources: nothing would be synced (add a [[sources]] table)"
                .to_owned(),
        ));
    }
    let url = settings.database.redacted_url();
    connect(settings).await?;
    tracing::info!(database = %url, "database reachable and migrated");
    let mut failed = Vec::new();
    for source in app::ready(&settings.sources).context("building the HTTP client")? {
        let name = source.name();
        match source.connector.check().await {
            Ok(()) => tracing::info!(source = name, "credentials accepted"),
            Err(e) => {
                tracing::error!(source = name, error = %error_chain(&e), "check failed");
                failed.push(format!("{name}: {}", error_chain(&e)));
            }
        }
    }
    summary(failed, " the check")
}
