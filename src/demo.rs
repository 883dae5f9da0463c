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
//! [`Settings::parse`], and each pass is [`engine::run_pass_showing`], as `deptsync sync`
//! runs it. `--serve` only starts the simulated APIs and prints a config that points at
//! them, for `sync`, `run` and `status` by hand.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Settings;
use crate::app;
use crate::config::redact_url;
use crate::engine::PassRequest;
use crate::fakes::data_v1::{self, FakeDataV1};
use crate::fakes::mews::{self, FakeDepartment, FakeMews};
use crate::fakes::procurify::{self, FakeProcurify};
use crate::fakes::snapbooks::{self, FakeSnapbooks};
use crate::progress::Display;
use crate::report::{SourceRun, pass_table, table};
use crate::store::{AnyStore, DatabaseKind};

/// The database of a demo not told otherwise: an SQLite file in the working directory,
/// removed and made afresh by every demo.
pub const DEMO_DATABASE_URL: &str = "sqlite://deptsync-demo.db";
/// The file [`DEMO_DATABASE_URL`] names.
const DEMO_DATABASE_FILE: &str = "deptsync-demo.db";

/// The last line of the config `demo --serve` prints: whoever reads it (a person, a test)
/// knows the config is whole.
pub const SERVE_CONFIG_END: &str = "# end of the demo config";

const MEWS_SOURCE: &str = "demo-mews";
const PROCURIFY_SOURCE: &str = "demo-procurify";
const SNAPBOOKS_SOURCE: &str = "demo-snapbooks";
const HR_SOURCE: &str = "demo-hr";
const SOURCE_NAMES: [&str; 4] = [MEWS_SOURCE, PROCURIFY_SOURCE, SNAPBOOKS_SOURCE, HR_SOURCE];

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

async fn demo(
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
    let store = AnyStore::open_with(&settings.database.url, settings.database.statement_timeout)
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
fn remove_demo_files(dir: &Path) -> anyhow::Result<Vec<String>> {
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
async fn sync_all(
    settings: &Settings,
    store: &AnyStore,
    simulation: &Simulation,
    cancel: &CancellationToken,
    display: &Display,
) -> anyhow::Result<Vec<SourceRun>> {
    let mut runs = Vec::with_capacity(settings.sources.len());
    for source in app::ready(&settings.sources).context("building the HTTP client")? {
        let requests_before = simulation.requests(source.name());
        let mut run =
            app::run_pass(&source, store, PassRequest::INCREMENTAL, cancel, display).await;
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
fn fail_on_errors(runs: &[SourceRun]) -> anyhow::Result<()> {
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
fn first_pass_notes(runs: &[SourceRun]) -> Vec<String> {
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
fn second_pass_notes(runs: &[SourceRun]) -> Vec<String> {
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

/// The sample query: SQL that SQLite and PostgreSQL both speak.
const SAMPLE_QUERY: &str = "\
SELECT source,
       SUM(CASE WHEN deleted_at IS NULL AND is_active THEN 1 ELSE 0 END)     AS active,
       SUM(CASE WHEN deleted_at IS NULL AND NOT is_active THEN 1 ELSE 0 END) AS inactive,
       SUM(CASE WHEN deleted_at IS NOT NULL THEN 1 ELSE 0 END)               AS deleted,
       SUM(CASE WHEN last_changed_at > first_synced_at THEN 1 ELSE 0 END)    AS changed,
       MAX(last_changed_at)                                                  AS last_changed
FROM departments
GROUP BY source
ORDER BY source";

/// One row of [`SAMPLE_QUERY`].
struct SampleRow {
    source: String,
    active: i64,
    inactive: i64,
    deleted: i64,
    changed: i64,
    last_changed: String,
}

/// Runs [`SAMPLE_QUERY`] on whichever store the demo writes to; returns its table.
async fn sample_query(store: &AnyStore) -> anyhow::Result<comfy_table::Table> {
    type Counts = (String, i64, i64, i64, i64);
    let rows: Vec<SampleRow> = match store {
        AnyStore::Postgres(store) => {
            sqlx::query_as::<_, (String, i64, i64, i64, i64, Option<DateTime<Utc>>)>(SAMPLE_QUERY)
                .fetch_all(store.pool())
                .await
                .context("running the sample query")?
                .into_iter()
                .map(|(source, active, inactive, deleted, changed, last)| {
                    let counts: Counts = (source, active, inactive, deleted, changed);
                    sample_row(counts, last)
                })
                .collect()
        }
        AnyStore::Sqlite(store) => {
            // SQLite keeps instants as RFC 3339 text.
            sqlx::query_as::<_, (String, i64, i64, i64, i64, Option<String>)>(SAMPLE_QUERY)
                .fetch_all(store.pool())
                .await
                .context("running the sample query")?
                .into_iter()
                .map(|(source, active, inactive, deleted, changed, last)| {
                    let last = last
                        .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
                        .map(|t| t.with_timezone(&Utc));
                    sample_row((source, active, inactive, deleted, changed), last)
                })
                .collect()
        }
    };
    let mut table = table();
    table.set_header([
        "source",
        "active",
        "inactive",
        "deleted",
        "changed",
        "last_changed (UTC)",
    ]);
    for row in rows {
        table.add_row([
            row.source,
            row.active.to_string(),
            row.inactive.to_string(),
            row.deleted.to_string(),
            row.changed.to_string(),
            row.last_changed,
        ]);
    }
    Ok(table)
}

fn sample_row(
    (source, active, inactive, deleted, changed): (String, i64, i64, i64, i64),
    last_changed: Option<DateTime<Utc>>,
) -> SampleRow {
    SampleRow {
        source,
        active,
        inactive,
        deleted,
        changed,
        last_changed: last_changed.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        ),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How to query the database the demo leaves behind.
fn query_hints(database_url: &str) -> String {
    let changed = "SELECT source, external_id, name, is_active, deleted_at FROM departments \
                   WHERE last_changed_at > first_synced_at ORDER BY source, name";
    let tree = format!(
        "WITH RECURSIVE tree(id, path) AS (SELECT external_id, name FROM departments \
         WHERE source = '{HR_SOURCE}' AND parent_external_id IS NULL UNION ALL \
         SELECT d.external_id, tree.path || ' / ' || d.name FROM departments d JOIN tree \
         ON d.parent_external_id = tree.id WHERE d.source = '{HR_SOURCE}') \
         SELECT path FROM tree ORDER BY path LIMIT 12"
    );
    match crate::store::sqlite::database_path(database_url) {
        Ok(path) => {
            let file = shell_word(&path.display().to_string());
            format!(
                "The database is left for you to query:\n\n  \
                 sqlite3 -readonly {file} \"{changed}\"\n  \
                 sqlite3 -readonly {file} \"{tree}\"\n"
            )
        }
        Err(_) => {
            let url = shell_word(&redact_url(database_url));
            format!(
                "The database is left for you to query:\n\n  \
                 psql {url} -c \"{changed}\"\n  \
                 psql {url} -c \"{tree}\"\n"
            )
        }
    }
}

/// `text` as one word of a POSIX shell command line.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@%+=,".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------
// The simulated upstreams and what they hold.

/// Every demo shows the same departments: the generator is seeded.
const SEED: u64 = 0x00de_9751_2026;
/// Where the simulated world's history ends (two days before it): a fixed instant, so
/// that every demo, and every `demo --serve`, holds the same departments, updated at the
/// same times.
const DEMO_EPOCH_DAYS: i64 = 20_454; // 2026-01-01

fn demo_epoch() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::days(DEMO_EPOCH_DAYS)
}

/// The Mews source's `start`: the earliest update the first pass reads.
const MEWS_START: &str = "2021-01-01T00:00:00Z";
/// [`MEWS_START`] in days after the Unix epoch.
const MEWS_START_DAYS: i64 = 18_628;
/// Mews' documented limit, enforced by the simulated Mews as the vendor does (deptsync's
/// own budget, 180 per 30 s, keeps under it).
const MEWS_LIMIT: usize = 200;
const MEWS_LIMIT_PERIOD: Duration = Duration::from_secs(30);

const HOTELS: usize = 80;
/// Departments every hotel has.
const HOTEL_CORE: [&str; 8] = [
    "Front Office",
    "Housekeeping",
    "Food & Beverage",
    "Maintenance",
    "Sales & Marketing",
    "Finance",
    "Human Resources",
    "Reservations",
];
/// Departments some hotels have.
const HOTEL_OPTIONAL: [&str; 24] = [
    "Spa",
    "Concierge",
    "Restaurant",
    "Bar",
    "Room Service",
    "Banqueting",
    "Kitchen",
    "Laundry",
    "Security",
    "IT",
    "Revenue Management",
    "Guest Relations",
    "Fitness Centre",
    "Parking",
    "Events",
    "Purchasing",
    "Night Audit",
    "Minibar",
    "Business Centre",
    "Pool",
    "Kids Club",
    "Gift Shop",
    "Transport",
    "Engineering",
];

const BRANCHES: i64 = 45;
/// Departments every Procurify branch has.
const BRANCH_CORE: [&str; 3] = ["Operations", "Finance", "Sales"];
const BRANCH_OPTIONAL: [&str; 18] = [
    "Engineering",
    "Marketing",
    "IT",
    "Legal",
    "Procurement",
    "Facilities",
    "Customer Success",
    "Human Resources",
    "Research & Development",
    "Quality Assurance",
    "Warehouse",
    "Executive",
    "Product",
    "Design",
    "Security",
    "Fleet",
    "Events",
    "Training",
];

/// The accountant's client accounts on Snapbooks.
const CLIENT_ACCOUNTS: std::ops::RangeInclusive<i64> = 4501..=4530;
const SNAPBOOKS_NAMES: [&str; 24] = [
    "Administrasjon",
    "Salg",
    "Lager",
    "Verksted",
    "Regnskap",
    "Butikk",
    "Kantine",
    "Prosjekt",
    "Service",
    "Marked",
    "Innkjøp",
    "Produksjon",
    "Logistikk",
    "IT",
    "HR",
    "Kundeservice",
    "Drift",
    "Utvikling",
    "Transport",
    "Bygg",
    "Renhold",
    "Vedlikehold",
    "Økonomi",
    "Ledelse",
];

/// The tenant's organization: divisions and their departments; teams per city below.
const DIVISIONS: [(&str, [&str; 6]); 8] = [
    (
        "Operations",
        [
            "Logistics",
            "Facilities",
            "Procurement",
            "Quality",
            "Fleet",
            "Planning",
        ],
    ),
    (
        "Commercial",
        [
            "Sales",
            "Marketing",
            "Partnerships",
            "Pricing",
            "Key Accounts",
            "Brand",
        ],
    ),
    (
        "Finance",
        [
            "Accounting",
            "Treasury",
            "Controlling",
            "Tax",
            "Payroll",
            "Audit",
        ],
    ),
    (
        "People",
        [
            "Recruitment",
            "Learning",
            "Compensation",
            "Employee Relations",
            "Health & Safety",
            "Workplace",
        ],
    ),
    (
        "Technology",
        [
            "Platform",
            "Data",
            "Security",
            "IT Support",
            "Product",
            "Infrastructure",
        ],
    ),
    (
        "Legal & Compliance",
        [
            "Contracts",
            "Privacy",
            "Compliance",
            "Corporate Law",
            "Risk",
            "Ethics",
        ],
    ),
    (
        "Customer Care",
        [
            "Support",
            "Onboarding",
            "Success",
            "Complaints",
            "Field Service",
            "Quality Desk",
        ],
    ),
    (
        "Supply Chain",
        [
            "Sourcing",
            "Warehousing",
            "Distribution",
            "Inventory",
            "Imports",
            "Returns",
        ],
    ),
];
const CITIES: [&str; 8] = [
    "Oslo",
    "Bergen",
    "Trondheim",
    "Stavanger",
    "Tromsø",
    "Kristiansand",
    "Bodø",
    "Ålesund",
];

/// A Procurify department as the demo keeps track of it.
#[derive(Debug, Clone)]
struct ProcurifyDepartment {
    id: i64,
    name: String,
    branch: i64,
    active: bool,
}

/// A Snapbooks department; `is_active: None` leaves the field out (active).
#[derive(Debug, Clone)]
struct SnapbooksDepartment {
    id: i64,
    name: String,
    account: i64,
    is_active: Option<bool>,
}

/// A department of the tenant's tree.
#[derive(Debug, Clone)]
struct HrDepartment {
    id: String,
    parent: Option<String>,
    name: String,
}

/// What the simulated APIs hold.
struct Upstream {
    hotels: Vec<Uuid>,
    mews: Vec<FakeDepartment>,
    procurify: Vec<ProcurifyDepartment>,
    snapbooks: Vec<SnapbooksDepartment>,
    hr: Vec<HrDepartment>,
}

fn uuid(rng: &mut fastrand::Rng) -> Uuid {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// An instant in `[from, to)`, in whole seconds (`from` when the range is empty).
fn instant_between(
    rng: &mut fastrand::Rng,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> DateTime<Utc> {
    let span = (to - from).num_seconds().max(1);
    (from + TimeDelta::seconds(rng.i64(0..span))).trunc_subsecs(0)
}

/// `count` names of `pool`, in a random order.
fn some_of<'a>(rng: &mut fastrand::Rng, pool: &[&'a str], count: usize) -> Vec<&'a str> {
    let mut names = pool.to_vec();
    rng.shuffle(&mut names);
    names.truncate(count);
    names
}

fn mews_start() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + TimeDelta::days(MEWS_START_DAYS)
}

impl Upstream {
    /// The departments of every simulated API, as of `now`: the same on every run but
    /// for the instants, which end two days before `now`.
    fn generate(now: DateTime<Utc>) -> Upstream {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let history_end = now - TimeDelta::days(2);

        let mut hotels = Vec::with_capacity(HOTELS);
        let mut mews = Vec::new();
        for _ in 0..HOTELS {
            let enterprise = uuid(&mut rng);
            hotels.push(enterprise);
            let joined = instant_between(&mut rng, mews_start(), now - TimeDelta::days(180));
            let extra = rng.usize(8..=16);
            let names = HOTEL_CORE
                .iter()
                .copied()
                .chain(some_of(&mut rng, &HOTEL_OPTIONAL, extra));
            for name in names.collect::<Vec<_>>() {
                let updated = instant_between(&mut rng, joined + TimeDelta::days(1), history_end);
                let created = instant_between(&mut rng, joined, updated);
                let mut department = FakeDepartment::new(uuid(&mut rng), enterprise, name, updated);
                department.json["CreatedUtc"] = json!(mews::format_utc(created));
                if rng.f64() < 0.03 {
                    department.json["IsActive"] = json!(false);
                }
                mews.push(department);
            }
        }

        let mut procurify = Vec::new();
        for branch in 1..=BRANCHES {
            let extra = rng.usize(6..=14);
            let names = BRANCH_CORE
                .iter()
                .copied()
                .chain(some_of(&mut rng, &BRANCH_OPTIONAL, extra))
                .collect::<Vec<_>>();
            for name in names {
                procurify.push(ProcurifyDepartment {
                    id: procurify.len() as i64 + 1,
                    name: name.to_owned(),
                    branch,
                    active: rng.f64() >= 0.04,
                });
            }
        }

        let mut snapbooks = Vec::new();
        for account in CLIENT_ACCOUNTS {
            let count = rng.usize(10..=22);
            for name in some_of(&mut rng, &SNAPBOOKS_NAMES, count) {
                let is_active = match rng.f64() {
                    p if p < 0.12 => Some(false),
                    p if p < 0.40 => None,
                    _ => Some(true),
                };
                snapbooks.push(SnapbooksDepartment {
                    id: 10_001 + snapbooks.len() as i64,
                    name: name.to_owned(),
                    account,
                    is_active,
                });
            }
        }

        let mut hr = vec![HrDepartment {
            id: "ORG".to_owned(),
            parent: None,
            name: "Nordlys Group".to_owned(),
        }];
        for (d, (division, departments)) in DIVISIONS.iter().enumerate() {
            let division_id = format!("DIV-{}", d + 1);
            hr.push(HrDepartment {
                id: division_id.clone(),
                parent: Some("ORG".to_owned()),
                name: (*division).to_owned(),
            });
            for (p, department) in departments.iter().enumerate() {
                let department_id = format!("DEP-{}-{}", d + 1, p + 1);
                hr.push(HrDepartment {
                    id: department_id.clone(),
                    parent: Some(division_id.clone()),
                    name: (*department).to_owned(),
                });
                let teams = rng.usize(3..=7);
                for (t, city) in some_of(&mut rng, &CITIES, teams).into_iter().enumerate() {
                    hr.push(HrDepartment {
                        id: format!("TEAM-{}-{}-{}", d + 1, p + 1, t + 1),
                        parent: Some(department_id.clone()),
                        name: format!("{department} {city}"),
                    });
                }
            }
        }

        Upstream {
            hotels,
            mews,
            procurify,
            snapbooks,
            hr,
        }
    }

    fn department_count(&self) -> usize {
        self.mews.len() + self.procurify.len() + self.snapbooks.len() + self.hr.len()
    }

    fn client_accounts(&self) -> Vec<i64> {
        let mut accounts: Vec<i64> = self.snapbooks.iter().map(|d| d.account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        accounts
    }
}

/// The four simulated APIs, serving, and what they hold.
struct Simulation {
    mews: FakeMews,
    procurify: FakeProcurify,
    snapbooks: FakeSnapbooks,
    hr: FakeDataV1,
    upstream: Upstream,
}

/// A Mews department updated at `updated`, as a change upstream makes it.
fn touch(department: &mut FakeDepartment, updated: DateTime<Utc>) {
    department.updated = updated;
    department.json["UpdatedUtc"] = json!(mews::format_utc(updated));
}

impl Simulation {
    /// Starts the four APIs on ephemeral loopback ports, holding `upstream`.
    async fn start(upstream: Upstream) -> std::io::Result<Simulation> {
        let mews = FakeMews::start().await?;
        mews.enforce_rate_limit(MEWS_LIMIT, MEWS_LIMIT_PERIOD);
        for department in &upstream.mews {
            mews.insert(department.clone());
        }
        let procurify = FakeProcurify::start().await?;
        for d in &upstream.procurify {
            procurify.put(d.id, &d.name, d.branch, d.active);
        }
        let snapbooks = FakeSnapbooks::start(&upstream.client_accounts()).await?;
        for d in &upstream.snapbooks {
            snapbooks.put(d.id, &d.name, d.account, d.is_active);
        }
        let hr = FakeDataV1::start().await?;
        for d in &upstream.hr {
            hr.put(&d.id, d.parent.as_deref(), &d.name);
        }
        Ok(Simulation {
            mews,
            procurify,
            snapbooks,
            hr,
            upstream,
        })
    }

    /// Requests the simulated API behind source `name` has answered so far.
    fn requests(&self, name: &str) -> usize {
        match name {
            MEWS_SOURCE => self.mews.shared.requests(),
            PROCURIFY_SOURCE => self.procurify.shared.requests(),
            SNAPBOOKS_SOURCE => self.snapbooks.shared.requests(),
            HR_SOURCE => self.hr.shared.requests(),
            _ => 0,
        }
    }

    /// Fails when deptsync broke a rule of a vendor's API: the simulated APIs record
    /// every breach (and refuse the request).
    fn check_rules(&self) -> anyhow::Result<()> {
        let breaches: Vec<String> = [
            (MEWS_SOURCE, self.mews.shared.violations()),
            (PROCURIFY_SOURCE, self.procurify.shared.violations()),
            (SNAPBOOKS_SOURCE, self.snapbooks.shared.violations()),
            (HR_SOURCE, self.hr.shared.violations()),
        ]
        .into_iter()
        .flat_map(|(name, violations)| violations.into_iter().map(move |v| format!("{name}: {v}")))
        .collect();
        if breaches.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "deptsync broke the rules of a simulated API:\n  {}",
            breaches.join("\n  ")
        )
    }

    /// One line per API: what it is, where, and what it holds.
    fn describe(&self) -> String {
        let upstream = &self.upstream;
        let inactive_mews = upstream
            .mews
            .iter()
            .filter(|d| d.json["IsActive"] == json!(false))
            .count();
        let oldest = upstream.mews.iter().map(|d| d.updated).min();
        let newest = upstream.mews.iter().map(|d| d.updated).max();
        let month = |t: Option<DateTime<Utc>>| {
            t.map_or_else(String::new, |t| t.format("%Y-%m").to_string())
        };
        let inactive_snapbooks = upstream
            .snapbooks
            .iter()
            .filter(|d| d.is_active == Some(false))
            .count();
        let inactive_procurify = upstream.procurify.iter().filter(|d| !d.active).count();
        let roots = upstream.hr.iter().filter(|d| d.parent.is_none()).count();
        let lines = [
            (
                MEWS_SOURCE,
                "Mews Connector API",
                &self.mews.base_url,
                format!(
                    "{} departments of {} hotels ({inactive_mews} inactive), updated {} to {}",
                    upstream.mews.len(),
                    upstream.hotels.len(),
                    month(oldest),
                    month(newest)
                ),
            ),
            (
                PROCURIFY_SOURCE,
                "Procurify API v3",
                &self.procurify.base_url,
                format!(
                    "{} departments of {BRANCHES} branches ({inactive_procurify} inactive)",
                    upstream.procurify.len()
                ),
            ),
            (
                SNAPBOOKS_SOURCE,
                "Snapbooks API v2",
                &self.snapbooks.base_url,
                format!(
                    "{} departments of {} client accounts ({inactive_snapbooks} inactive)",
                    upstream.snapbooks.len(),
                    upstream.client_accounts().len()
                ),
            ),
            (
                HR_SOURCE,
                "tenant data API",
                &self.hr.base_url,
                format!(
                    "{} departments in a tree ({roots} root, divisions, departments, teams)",
                    upstream.hr.len()
                ),
            ),
        ];
        let mut table = table();
        for (name, api, url, holds) in lines {
            table.add_row([name.to_owned(), api.to_owned(), url.clone(), holds]);
        }
        format!("{table}\n")
    }

    /// The config of the four sources, pointing at the simulated APIs, with the database
    /// at `database_url` and, when given, a `schedule` for `run`.
    fn config_toml(&self, database_url: &str, schedule: Option<&str>) -> String {
        let schedule = schedule
            .map(|s| format!("schedule = {}\n", toml_string(s)))
            .unwrap_or_default();
        format!(
            r#"[database]
url = {database}

[[sources]]
name = "{MEWS_SOURCE}"
kind = "mews"
base_url = "{mews_url}"
client_token = "{mews_client}"
access_token = "{mews_access}"
start = "{MEWS_START}"
page_size = 100
{schedule}
[[sources]]
name = "{PROCURIFY_SOURCE}"
kind = "procurify"
base_url = "{procurify_url}"
client_id = "{procurify_id}"
client_secret = "{procurify_secret}"
page_size = 100
{schedule}
[[sources]]
name = "{SNAPBOOKS_SOURCE}"
kind = "snapbooks"
base_url = "{snapbooks_url}"
token = "{snapbooks_token}"
page_size = 100
{schedule}
[[sources]]
name = "{HR_SOURCE}"
kind = "data_v1"
base_url = "{hr_url}"
token = "{hr_token}"
{schedule}"#,
            database = toml_string(database_url),
            mews_url = self.mews.base_url,
            mews_client = mews::CLIENT_TOKEN,
            mews_access = mews::ACCESS_TOKEN,
            procurify_url = self.procurify.base_url,
            procurify_id = procurify::CLIENT_ID,
            procurify_secret = procurify::CLIENT_SECRET,
            snapbooks_url = self.snapbooks.base_url,
            snapbooks_token = snapbooks::TOKEN,
            hr_url = self.hr.base_url,
            hr_token = data_v1::TOKEN,
        )
    }

    /// Changes every API a little, as people do between two syncs; returns what changed,
    /// per source. Mews changes are updated at `now` (less a second, so that they sit
    /// inside the next pass's range however soon it starts).
    fn change_upstream(&mut self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let updated = now.trunc_subsecs(0) - TimeDelta::seconds(1);
        vec![
            (MEWS_SOURCE, self.change_mews(updated)),
            (PROCURIFY_SOURCE, self.change_procurify()),
            (SNAPBOOKS_SOURCE, self.change_snapbooks()),
            (HR_SOURCE, self.change_hr()),
        ]
    }

    fn change_mews(&mut self, updated: DateTime<Utc>) -> String {
        let mut rng = fastrand::Rng::with_seed(SEED + 1);
        let mut changed = Vec::new();
        let spas = self.upstream.mews.iter().enumerate();
        let spas: Vec<usize> = spas
            .filter(|(_, d)| d.name() == "Spa")
            .map(|(i, _)| i)
            .take(3)
            .collect();
        for &i in &spas {
            let department = &mut self.upstream.mews[i];
            department.json["Name"] = json!("Spa & Wellness");
            touch(department, updated);
            changed.push(department.clone());
        }
        let laundries: Vec<usize> = (self.upstream.mews.iter().enumerate())
            .filter(|(_, d)| d.name() == "Laundry" && d.json["IsActive"] == json!(true))
            .map(|(i, _)| i)
            .take(2)
            .collect();
        for &i in &laundries {
            let department = &mut self.upstream.mews[i];
            department.json["IsActive"] = json!(false);
            touch(department, updated);
            changed.push(department.clone());
        }
        let hotel = uuid(&mut rng);
        self.upstream.hotels.push(hotel);
        let names: Vec<&str> = HOTEL_CORE
            .iter()
            .copied()
            .chain(some_of(&mut rng, &HOTEL_OPTIONAL, 10))
            .collect();
        for name in &names {
            let mut department = FakeDepartment::new(uuid(&mut rng), hotel, name, updated);
            department.json["CreatedUtc"] = json!(mews::format_utc(updated));
            changed.push(department);
        }
        let rooftop_hotels: Vec<Uuid> = self.upstream.hotels.iter().take(2).copied().collect();
        for &enterprise in &rooftop_hotels {
            let mut department =
                FakeDepartment::new(uuid(&mut rng), enterprise, "Rooftop Bar", updated);
            department.json["CreatedUtc"] = json!(mews::format_utc(updated));
            changed.push(department);
        }
        let new = names.len() + rooftop_hotels.len();
        for department in &changed[spas.len() + laundries.len()..] {
            self.upstream.mews.push(department.clone());
        }
        for department in changed {
            self.mews.insert(department);
        }
        format!(
            "{} renamed (Spa to Spa & Wellness), {} deactivated (Laundry, outsourced), a new hotel \
             with {} departments, a Rooftop Bar at {} hotels: {new} new, all updated now",
            spas.len(),
            laundries.len(),
            names.len(),
            rooftop_hotels.len()
        )
    }

    fn change_procurify(&mut self) -> String {
        let departments = &mut self.upstream.procurify;
        let mut renamed = 0;
        for branch in [3, 4] {
            if let Some(d) = departments
                .iter_mut()
                .find(|d| d.name == "Sales" && d.branch == branch)
            {
                d.name = "Sales & Business Development".to_owned();
                self.procurify.put(d.id, &d.name, d.branch, d.active);
                renamed += 1;
            }
        }
        let mut deactivated = 0;
        for branch in [5, 6] {
            if let Some(d) = departments
                .iter_mut()
                .find(|d| d.name == "Finance" && d.branch == branch)
            {
                d.active = false;
                self.procurify.put(d.id, &d.name, d.branch, d.active);
                deactivated += 1;
            }
        }
        let mut removed = Vec::new();
        if let Some(at) = departments
            .iter()
            .position(|d| d.name == "Operations" && d.branch == 7)
        {
            let gone = departments.remove(at);
            self.procurify.remove(gone.id);
            removed.push(format!("{} of branch {}", gone.name, gone.branch));
        }
        let first_new_id = departments.iter().map(|d| d.id).max().unwrap_or(0) + 1;
        let new_branches = 1..=3;
        let added = new_branches.clone().count();
        for (id, branch) in (first_new_id..).zip(new_branches) {
            let new = ProcurifyDepartment {
                id,
                name: "Sustainability".to_owned(),
                branch,
                active: true,
            };
            self.procurify
                .put(new.id, &new.name, new.branch, new.active);
            departments.push(new);
        }
        format!(
            "{renamed} renamed (Sales to Sales & Business Development), {deactivated} deactivated \
             (Finance, centralised), {} removed ({}), {added} new (Sustainability)",
            removed.len(),
            removed.join(", ")
        )
    }

    fn change_snapbooks(&mut self) -> String {
        let departments = &mut self.upstream.snapbooks;
        let active = |d: &SnapbooksDepartment| d.is_active != Some(false);
        let mut deactivated = 0;
        for d in departments
            .iter_mut()
            .filter(|d| d.name == "Kantine" && active(d))
            .take(3)
        {
            d.is_active = Some(false);
            self.snapbooks.put(d.id, &d.name, d.account, d.is_active);
            deactivated += 1;
        }
        let mut reactivated = 0;
        if let Some(d) = departments
            .iter_mut()
            .find(|d| d.name != "Kantine" && d.is_active == Some(false))
        {
            d.is_active = Some(true);
            self.snapbooks.put(d.id, &d.name, d.account, d.is_active);
            reactivated += 1;
        }
        let mut renamed = 0;
        if let Some(d) = departments.iter_mut().find(|d| d.name == "Lager") {
            d.name = "Lager og logistikk".to_owned();
            self.snapbooks.put(d.id, &d.name, d.account, d.is_active);
            renamed += 1;
        }
        let first_new_id = departments.iter().map(|d| d.id).max().unwrap_or(10_000) + 1;
        let new_accounts: Vec<i64> = CLIENT_ACCOUNTS.take(2).collect();
        let added = new_accounts.len();
        for (id, account) in (first_new_id..).zip(new_accounts) {
            let new = SnapbooksDepartment {
                id,
                name: "Netthandel".to_owned(),
                account,
                is_active: Some(true),
            };
            self.snapbooks
                .put(new.id, &new.name, new.account, new.is_active);
            departments.push(new);
        }
        format!(
            "{deactivated} deactivated (Kantine), {reactivated} reactivated, {renamed} renamed \
             (Lager to Lager og logistikk), {added} new (Netthandel, an online shop)"
        )
    }

    fn change_hr(&mut self) -> String {
        let departments = &mut self.upstream.hr;
        let mut renamed = 0;
        if let Some(d) = departments.iter_mut().find(|d| d.name == "Customer Care") {
            d.name = "Customer Experience".to_owned();
            self.hr.put(&d.id, d.parent.as_deref(), &d.name);
            renamed += 1;
        }
        // A team moves to another department: a new parent_external_id.
        let onboarding = departments
            .iter()
            .find(|d| d.name == "Onboarding")
            .map(|d| d.id.clone());
        let support = departments
            .iter()
            .find(|d| d.name == "Support")
            .map(|d| d.id.clone());
        let mut moved = 0;
        if let (Some(onboarding), Some(support)) = (onboarding, support)
            && let Some(team) = departments
                .iter_mut()
                .find(|d| d.parent.as_deref() == Some(support.as_str()))
        {
            team.parent = Some(onboarding);
            self.hr.put(&team.id, team.parent.as_deref(), &team.name);
            moved += 1;
        }
        let mut removed = Vec::new();
        let imports = departments
            .iter()
            .find(|d| d.name == "Imports")
            .map(|d| d.id.clone());
        if let Some(at) = imports.and_then(|imports| {
            departments
                .iter()
                .rposition(|d| d.parent.as_deref() == Some(imports.as_str()))
        }) {
            let gone = departments.remove(at);
            self.hr.remove(&gone.id);
            removed.push(gone.name);
        }
        let mut added = 0;
        for department in ["Data", "Security"] {
            let Some(parent) = departments
                .iter()
                .find(|d| d.name == department)
                .map(|d| d.id.clone())
            else {
                continue;
            };
            let new = HrDepartment {
                id: format!("{parent}-NARVIK").replace("DEP-", "TEAM-"),
                parent: Some(parent),
                name: format!("{department} Narvik"),
            };
            self.hr.put(&new.id, new.parent.as_deref(), &new.name);
            departments.push(new);
            added += 1;
        }
        format!(
            "{renamed} renamed (Customer Care to Customer Experience), {moved} team moved to \
             another department, {} removed ({}), {added} new (teams in Narvik)",
            removed.len(),
            removed.join(", ")
        )
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04X}", u32::from(c));
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn the_mews_start_is_the_one_configured() {
        assert_eq!(mews::format_utc(mews_start()), MEWS_START);
    }

    #[test]
    fn the_upstream_is_a_few_thousand_departments_the_same_on_every_run() {
        let now = Utc::now();
        let upstream = Upstream::generate(now);
        let again = Upstream::generate(now);
        assert_eq!(upstream.department_count(), again.department_count());
        assert!(
            (2_000..5_000).contains(&upstream.department_count()),
            "{}",
            upstream.department_count()
        );
        assert!(upstream.mews.len() > 1_000);
        // Updated over several years, all before the first pass.
        let years: std::collections::BTreeSet<_> = upstream
            .mews
            .iter()
            .map(|d| d.updated.format("%Y").to_string())
            .collect();
        assert!(years.len() >= 5, "{years:?}");
        assert!(
            upstream
                .mews
                .iter()
                .all(|d| d.updated < now - TimeDelta::days(1))
        );
        assert!(
            upstream
                .snapbooks
                .iter()
                .any(|d| d.is_active == Some(false))
        );
        assert!(upstream.snapbooks.iter().any(|d| d.is_active.is_none()));
        // The tree hangs together: every parent is a department.
        let ids: std::collections::HashSet<&str> =
            upstream.hr.iter().map(|d| d.id.as_str()).collect();
        assert!(
            upstream
                .hr
                .iter()
                .filter_map(|d| d.parent.as_deref())
                .all(|parent| ids.contains(parent))
        );
    }

    #[test]
    fn ids_are_unique_per_source() {
        let upstream = Upstream::generate(Utc::now());
        let unique = |ids: Vec<String>| {
            let count = ids.len();
            let set: std::collections::HashSet<_> = ids.into_iter().collect();
            set.len() == count
        };
        assert!(unique(
            upstream.mews.iter().map(|d| d.id.to_string()).collect()
        ));
        assert!(unique(
            upstream
                .procurify
                .iter()
                .map(|d| d.id.to_string())
                .collect()
        ));
        assert!(unique(
            upstream
                .snapbooks
                .iter()
                .map(|d| d.id.to_string())
                .collect()
        ));
        assert!(unique(upstream.hr.iter().map(|d| d.id.clone()).collect()));
    }

    #[tokio::test]
    async fn the_config_points_at_the_simulated_apis_and_passes_validation() {
        let simulation = Simulation::start(Upstream::generate(Utc::now()))
            .await
            .unwrap();
        for schedule in [None, Some("0 * * * * *")] {
            let toml = simulation.config_toml("sqlite://some dir/demo \"x\".db", schedule);
            let settings = Settings::parse(&toml, &|_| None).unwrap();
            let names: Vec<&str> = settings.sources.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, SOURCE_NAMES);
            assert_eq!(
                settings.database.url.expose_secret(),
                "sqlite://some dir/demo \"x\".db"
            );
        }
        assert!(
            simulation
                .config_toml(DEMO_DATABASE_URL, None)
                .contains(&simulation.mews.base_url)
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("sqlite://x.db"), "\"sqlite://x.db\"");
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("deptsync-demo.db"), "deptsync-demo.db");
        assert_eq!(shell_word("my demo.db"), "'my demo.db'");
        assert_eq!(shell_word("it's.db"), r"'it'\''s.db'");
    }
}
