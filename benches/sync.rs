//! `cargo bench --bench sync`: how close deptsync comes to what bounds a department sync.
//!
//! Two things bound it: what PostgreSQL can take (its `COPY` speed) and what the vendor lets
//! a client ask for (Mews: 200 requests per access token in 30 s). In one run, against the
//! PostgreSQL server of `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and the fake upstreams of the integration tests, this program measures:
//!
//! 1. the ceiling: `COPY` of N generated departments into an empty table shaped like
//!    `departments`;
//! 2. a full Mews sync of the same N from a fake that answers at once (the source's rate
//!    budget lifted, so that deptsync's own speed is what is measured), against the ceiling;
//! 3. a full Procurify listing of N, then a second pass with nothing changed upstream: its
//!    time and the rows it wrote to `departments` (from `pg_stat_user_tables`), asserting
//!    that it wrote none to `department_history` (a current version is its department's
//!    row, so none written there means no version either);
//! 4. deptsync's peak resident memory for the Mews sync of N and of 5 × N;
//! 5. a Mews sync with 300 ms pages and Mews' 200 requests per 30 s enforced, over a seven
//!    year history, with the source's default rate budget: the request rate it achieves.
//!
//! Every sync keeps history: each check of a sync's rows also checks one current version
//! per department, so the figures of steps 2 to 4 include writing it.
//!
//! Every sync runs the real `deptsync` binary as a child process, in a database of its own
//! (`deptsync_bench_<uuid>`, dropped at the end), so that time and memory are deptsync's,
//! not the fakes'. The figures are printed as one table and written as JSON to
//! `target/bench-sync.json` (`target/bench-sync-quick.json` in quick mode).
//!
//! Quick mode (no `--bench` argument, as under `cargo test --all-targets`, or `--quick`)
//! runs the same steps on small numbers, asserting correctness only. `BENCH_N` sets N.
//! No mode asserts any speed: timings on shared machines are noise.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Months, SubsecRound, Utc};
use comfy_table::Table;
use serde_json::json;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use deptsync::fakes::mews::{self, FakeMews, GeneratedDepartment};
use deptsync::fakes::procurify::{self, FakeProcurify};
use launcher::{ChildRun, Launcher};

/// Enterprises (Mews) and branches (Procurify) the generated departments spread over.
const SCOPES: u16 = 8;
/// Mews' documented limit, enforced by the fake in the rate-limited run.
const MEWS_LIMIT: usize = 200;
const MEWS_LIMIT_PERIOD: Duration = Duration::from_secs(30);
/// How long the fake takes to answer each page in the rate-limited run.
const SLOW_PAGE: Duration = Duration::from_millis(300);
/// Windows a Mews pass reads at once (the source's default, written out).
const CONCURRENT_WINDOWS: u32 = 4;
/// A budget no sync here comes near: lifts the source's own when deptsync's speed is measured.
const UNLIMITED: &str = "1000000/1s";
const PROCURIFY_PAGE_SIZE: u32 = 1000;
/// Loads of the ceiling; their median is reported.
const COPY_ROUNDS: usize = 3;

/// How big each step is.
struct Sizes {
    quick: bool,
    /// N.
    departments: usize,
    /// The departments of the rate-limited run.
    rate_limited_departments: usize,
}

impl Sizes {
    fn from_args() -> anyhow::Result<Sizes> {
        let args: Vec<String> = std::env::args().collect();
        let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--quick");
        let departments = match std::env::var("BENCH_N") {
            Ok(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("BENCH_N={n:?} is not a positive number"))?,
            Err(_) if quick => 2_000,
            Err(_) => 200_000,
        };
        Ok(if quick {
            // One page per window: the run shows the limit is kept, not the rate reached.
            Sizes {
                quick,
                departments,
                rate_limited_departments: 1_000,
            }
        } else {
            // About 330 pages of 1000 plus a short one per window: a minute under the
            // default budget of 180 per 30 s.
            Sizes {
                quick,
                departments,
                rate_limited_departments: 330_000,
            }
        })
    }
}

/// One database made for one step, dropped at the end of the run.
struct Database {
    name: String,
    url: String,
}

/// What the run needs throughout: the server, a scratch directory, the databases made.
struct Bench {
    sizes: Sizes,
    launcher: Arc<Mutex<Launcher>>,
    /// The most the launcher itself ever held resident, which a child's figure may include.
    launcher_peak_kib: u64,
    server: String,
    workdir: PathBuf,
    databases: Vec<String>,
    /// Seven years ago, in whole seconds: the `start` of every Mews source.
    history_start: DateTime<Utc>,
    /// The latest update time the generated departments may have.
    history_end: DateTime<Utc>,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(launcher::ARG) {
        return launcher::serve();
    }
    // First, while this process is small: see `launcher`.
    let launcher = Launcher::start()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = runtime.block_on(run(launcher));
    runtime.shutdown_background();
    outcome
}

async fn run(launcher: Launcher) -> anyhow::Result<()> {
    let sizes = Sizes::from_args()?;
    let server = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let workdir = std::env::temp_dir().join(format!("deptsync-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let now = Utc::now().trunc_subsecs(0);
    let mut bench = Bench {
        sizes,
        launcher: Arc::new(Mutex::new(launcher)),
        launcher_peak_kib: 0,
        server,
        workdir,
        databases: Vec::new(),
        history_start: now
            .checked_sub_months(Months::new(7 * 12))
            .context("seven years ago is out of range")?,
        history_end: now - chrono::Duration::minutes(1),
    };
    let outcome = bench.measure().await;
    let cleanup = bench.clean_up().await;
    let stopped = Arc::into_inner(bench.launcher)
        .context("the launcher is still in use")?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("the launcher's lock is poisoned"))?
        .stop();
    let report = outcome?;
    cleanup?;
    stopped?;
    report.print();
    let file = report.write_json()?;
    println!("figures written to {}", file.display());
    Ok(())
}

impl Bench {
    async fn measure(&mut self) -> anyhow::Result<Report> {
        let machine = self.machine().await?;
        let n = self.sizes.departments;
        eprintln!(
            "bench: {} mode, N = {n}, machine: {machine}",
            if self.sizes.quick { "quick" } else { "full" }
        );

        eprintln!("bench: COPY ceiling");
        let ceiling = self.copy_ceiling(n).await?;
        eprintln!("bench:   {:.0} departments/s", ceiling.per_second());
        eprintln!("bench: Mews full sync of N");
        let mews = self.mews_sync(n).await?;
        eprintln!(
            "bench:   {:.0} departments/s, {:.2} of the ceiling",
            mews.throughput.per_second(),
            mews.throughput.ratio_to(&ceiling)
        );
        eprintln!("bench: Procurify, two passes");
        let procurify = self.procurify_two_passes(n).await?;
        eprintln!(
            "bench:   first {:.2} s, nothing changed {:.2} s ({:.2} of the first)",
            procurify.first.took.as_secs_f64(),
            procurify.second.as_secs_f64(),
            procurify.second_pass_ratio()
        );
        eprintln!("bench: Mews full sync of 5 x N");
        let mews_five = self.mews_sync(5 * n).await?;
        eprintln!("bench: Mews with 300 ms pages and 200 requests per 30 s");
        let rate_limited = self.rate_limited().await?;
        Ok(Report {
            quick: self.sizes.quick,
            n,
            machine,
            ceiling,
            mews,
            procurify,
            mews_five,
            rate_limited,
            launcher_peak_mib: self.launcher_peak_kib as f64 / 1024.0,
        })
    }

    async fn machine(&self) -> anyhow::Result<Machine> {
        let mut admin = self.admin().await?;
        let postgres: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut admin)
            .await?;
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        Ok(Machine {
            cores,
            cpu,
            postgres,
        })
    }

    async fn admin(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.server).await.with_context(|| {
            format!(
                "the bench needs PostgreSQL at {} (set DATABASE_URL)",
                self.server
            )
        })
    }

    async fn fresh_database(&mut self) -> anyhow::Result<Database> {
        let name = format!("deptsync_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = self.admin().await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        self.databases.push(name.clone());
        let mut url = reqwest::Url::parse(&self.server).context("DATABASE_URL is not a URL")?;
        url.set_path(&name);
        Ok(Database {
            name,
            url: url.to_string(),
        })
    }

    async fn drop_database(&mut self, database: &Database) -> anyhow::Result<()> {
        let mut admin = self.admin().await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            database.name
        ))
        .execute(&mut admin)
        .await
        .with_context(|| format!("dropping database {}", database.name))?;
        self.databases.retain(|name| *name != database.name);
        Ok(())
    }

    async fn clean_up(&mut self) -> anyhow::Result<()> {
        let mut admin = self.admin().await?;
        for name in std::mem::take(&mut self.databases) {
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .with_context(|| format!("dropping database {name}"))?;
        }
        std::fs::remove_dir_all(&self.workdir)
            .with_context(|| format!("removing {}", self.workdir.display()))
    }

    /// Writes a config of `database` and `sources` (TOML `[[sources]]` tables).
    fn config(&self, label: &str, database: &Database, sources: &str) -> anyhow::Result<PathBuf> {
        let path = self.workdir.join(format!("{label}.toml"));
        let text = format!("[database]\nurl = \"{}\"\n\n{sources}", database.url);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn mews_source(&self, fake: &FakeMews, rate_limit: Option<&str>) -> String {
        let rate_limit = rate_limit.map_or(String::new(), |r| format!("rate_limit = \"{r}\"\n"));
        format!(
            r#"[[sources]]
name = "mews-bench"
kind = "mews"
base_url = "{base_url}"
client_token = "{client}"
access_token = "{access}"
start = "{start}"
concurrent_windows = {CONCURRENT_WINDOWS}
{rate_limit}"#,
            base_url = fake.base_url,
            client = mews::CLIENT_TOKEN,
            access = mews::ACCESS_TOKEN,
            start = mews::format_utc(self.history_start),
        )
    }

    /// Runs `deptsync --config CONFIG ARGS...` through the launcher; fails unless it
    /// exits 0.
    async fn deptsync(&mut self, config: &Path, args: &[&str]) -> anyhow::Result<ChildRun> {
        let label = config
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let log = self.workdir.join(format!("{label}-{}.log", args.join("-")));
        let request = launcher::Request {
            args: ["--config", &config.to_string_lossy()]
                .into_iter()
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            log: log.clone(),
        };
        let launcher = self.launcher.clone();
        let reply = tokio::task::spawn_blocking(move || {
            launcher
                .lock()
                .map_err(|_| anyhow::anyhow!("the launcher's lock is poisoned"))?
                .run(&request)
        })
        .await??;
        let run = reply.map_err(|e| anyhow::anyhow!("launching deptsync: {e}"))?;
        self.launcher_peak_kib = self.launcher_peak_kib.max(run.launcher_peak_kib);
        if run.exit_code != Some(0) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "deptsync {} {}: {}\n{}",
                label,
                args.join(" "),
                run.ending(),
                tail.join("\n")
            );
        }
        Ok(run)
    }

    /// Step 1: `COPY` of N generated departments into a copy of `departments`.
    async fn copy_ceiling(&mut self, n: usize) -> anyhow::Result<Throughput> {
        let database = self.fresh_database().await?;
        // A config whose source is never reached: `migrate` only needs the database.
        let fake = FakeMews::start().await?;
        let config = self.config("ceiling", &database, &self.mews_source(&fake, None))?;
        self.deptsync(&config, &["migrate"]).await?;

        let mut connection = PgConnection::connect(&database.url).await?;
        sqlx::query("CREATE TABLE bench_ceiling (LIKE departments INCLUDING ALL)")
            .execute(&mut connection)
            .await?;
        let csv = departments_csv(self.generated(n));

        // The median of a few loads, each into the emptied table: one alone is noisy.
        let mut took = Vec::new();
        for _ in 0..COPY_ROUNDS {
            sqlx::query("TRUNCATE bench_ceiling")
                .execute(&mut connection)
                .await?;
            checkpoint(&mut connection).await;
            let started = Instant::now();
            let mut copy = connection
                .copy_in_raw(
                    "COPY bench_ceiling (source, external_id, scope_id, name, is_active, \
                     source_created_at, source_updated_at, raw) FROM STDIN (FORMAT csv)",
                )
                .await?;
            for chunk in csv.as_bytes().chunks(1 << 20) {
                copy.send(chunk).await?;
            }
            let copied = copy.finish().await?;
            took.push(started.elapsed());
            ensure!(copied == n as u64, "COPY loaded {copied} rows, not {n}");
        }
        took.sort();
        drop(connection);
        self.drop_database(&database).await?;
        Ok(Throughput::new(n, took[took.len() / 2]))
    }

    /// The Mews history of `n` departments every Mews step uses.
    fn generated(&self, n: usize) -> impl Iterator<Item = GeneratedDepartment> {
        mews::history(n, SCOPES.into(), self.history_start, self.history_end)
    }

    /// Steps 2 and 4: a full Mews sync of `n` departments from a fake that answers at once.
    async fn mews_sync(&mut self, n: usize) -> anyhow::Result<SyncFigures> {
        let fake = FakeMews::start().await?;
        fake.load(self.generated(n));
        let database = self.fresh_database().await?;
        let label = format!("mews-{n}");
        let config = self.config(&label, &database, &self.mews_source(&fake, Some(UNLIMITED)))?;
        self.deptsync(&config, &["migrate"]).await?;
        let mut connection = PgConnection::connect(&database.url).await?;
        checkpoint(&mut connection).await;

        let fake_cpu_before = own_cpu();
        let run = self.deptsync(&config, &["sync"]).await?;
        let fake_cpu = own_cpu().saturating_sub(fake_cpu_before);
        expect_departments(&mut connection, n).await?;
        expect_no_violations("Mews", &fake.shared.violations())?;
        let requests = fake.shared.requests();
        fake.clear();
        drop(connection);
        self.drop_database(&database).await?;
        Ok(SyncFigures {
            throughput: Throughput::new(n, run.wall),
            requests,
            max_rss_mib: run.max_rss_mib(),
            cpu: Cpu {
                deptsync: run.cpu,
                fake: fake_cpu,
            },
        })
    }

    /// Step 3: a full Procurify listing of N, then one more with nothing changed.
    async fn procurify_two_passes(&mut self, n: usize) -> anyhow::Result<ProcurifyFigures> {
        let fake = FakeProcurify::start().await?;
        fake.generate(n, SCOPES.into());
        let database = self.fresh_database().await?;
        let source = format!(
            r#"[[sources]]
name = "procurify-bench"
kind = "procurify"
base_url = "{base_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
page_size = {PROCURIFY_PAGE_SIZE}
"#,
            base_url = fake.base_url,
            client_id = procurify::CLIENT_ID,
            client_secret = procurify::CLIENT_SECRET,
        );
        let config = self.config("procurify", &database, &source)?;
        self.deptsync(&config, &["migrate"]).await?;
        let mut connection = PgConnection::connect(&database.url).await?;
        checkpoint(&mut connection).await;

        let fake_cpu_before = own_cpu();
        let first = self.deptsync(&config, &["sync"]).await?;
        let fake_cpu = own_cpu().saturating_sub(fake_cpu_before);
        expect_departments(&mut connection, n).await?;
        let written_before = rows_written(&mut connection).await?;
        checkpoint(&mut connection).await;
        let second = self.deptsync(&config, &["sync"]).await?;
        expect_departments(&mut connection, n).await?;
        let written_after = rows_written(&mut connection).await?;
        let written = written_after.0 - written_before.0;
        let versions_written = written_after.1 - written_before.1;
        // Nothing changed: no version may be written, whatever the speed.
        ensure!(
            versions_written == 0,
            "a pass where nothing changed wrote {versions_written} rows of department_history"
        );
        expect_no_violations("Procurify", &fake.shared.violations())?;
        fake.clear();
        drop(connection);
        self.drop_database(&database).await?;
        Ok(ProcurifyFigures {
            first: Throughput::new(n, first.wall),
            second: second.wall,
            second_rows_written: written,
            max_rss_mib: first.max_rss_mib().max(second.max_rss_mib()),
            first_cpu: Cpu {
                deptsync: first.cpu,
                fake: fake_cpu,
            },
        })
    }

    /// Step 5: Mews with slow pages and its request limit enforced, under the default budget.
    async fn rate_limited(&mut self) -> anyhow::Result<RateLimitedFigures> {
        let n = self.sizes.rate_limited_departments;
        let fake = FakeMews::start().await?;
        fake.load(self.generated(n));
        fake.set_delay(SLOW_PAGE);
        fake.enforce_rate_limit(MEWS_LIMIT, MEWS_LIMIT_PERIOD);
        let database = self.fresh_database().await?;
        let config = self.config(
            "mews-rate-limited",
            &database,
            &self.mews_source(&fake, None),
        )?;
        self.deptsync(&config, &["migrate"]).await?;
        let mut connection = PgConnection::connect(&database.url).await?;

        let run = self.deptsync(&config, &["sync"]).await?;
        expect_departments(&mut connection, n).await?;
        expect_no_violations("Mews (rate-limited)", &fake.shared.violations())?;
        let mut arrivals = fake.shared.arrivals();
        arrivals.sort();
        let requests = arrivals.len();
        let span = match (arrivals.first(), arrivals.last()) {
            (Some(first), Some(last)) => *last - *first,
            _ => bail!("the rate-limited sync made no request"),
        };
        // n requests spaced evenly take n - 1 intervals.
        let per_second = if span.is_zero() {
            0.0
        } else {
            (requests - 1) as f64 / span.as_secs_f64()
        };
        let allowed = MEWS_LIMIT as f64 / MEWS_LIMIT_PERIOD.as_secs_f64();
        let busiest = fake.shared.busiest(MEWS_LIMIT_PERIOD);
        fake.clear();
        drop(connection);
        self.drop_database(&database).await?;
        Ok(RateLimitedFigures {
            departments: n,
            wall: run.wall,
            requests,
            per_second,
            fraction_of_allowed: per_second / allowed,
            busiest_period: busiest,
        })
    }
}

/// The records as `COPY ... (FORMAT csv)` takes them, in the columns deptsync fills.
fn departments_csv(departments: impl Iterator<Item = GeneratedDepartment>) -> String {
    let mut csv = String::new();
    for department in departments {
        let raw = std::str::from_utf8(&department.json).expect("the generator writes UTF-8");
        writeln!(
            csv,
            "mews-bench,{},{},{},true,{},{},{}",
            department.id,
            department.enterprise_id,
            csv_quoted(&department.name),
            mews::format_utc(department.created),
            mews::format_utc(department.updated),
            csv_quoted(raw),
        )
        .expect("writing to a String cannot fail");
    }
    csv
}

fn csv_quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// Flushes dirty pages before a timed step, so that it does not pay for the last one's.
/// Best effort: only a superuser may.
async fn checkpoint(connection: &mut PgConnection) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(connection).await {
        eprintln!("bench: CHECKPOINT skipped: {e}");
    }
}

/// `departments` holds `n` live rows, and `department_versions` one current version of
/// each (no department changed since its first sync).
async fn expect_departments(connection: &mut PgConnection, n: usize) -> anyhow::Result<()> {
    let (total, live): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE deleted_at IS NULL) FROM departments",
    )
    .fetch_one(&mut *connection)
    .await?;
    ensure!(
        total == n as i64 && live == n as i64,
        "departments holds {total} rows ({live} live), not {n}"
    );
    let (versions, current): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE valid_to IS NULL) FROM department_versions",
    )
    .fetch_one(connection)
    .await?;
    ensure!(
        versions == n as i64 && current == n as i64,
        "department_versions holds {versions} versions ({current} current), not {n}"
    );
    Ok(())
}

fn expect_no_violations(fake: &str, violations: &[String]) -> anyhow::Result<()> {
    ensure!(
        violations.is_empty(),
        "deptsync broke the {fake} API's rules: {violations:#?}"
    );
    Ok(())
}

/// Rows inserted, updated and deleted so far in `departments` and in
/// `department_history` (where versions that ended go), once the statistics of the backends that wrote them (a child
/// that has exited) have reached the collector.
async fn rows_written(connection: &mut PgConnection) -> anyhow::Result<(i64, i64)> {
    const SQL: &str = "SELECT \
         COALESCE(sum(n_tup_ins + n_tup_upd + n_tup_del) \
                  FILTER (WHERE relname = 'departments'), 0)::bigint, \
         COALESCE(sum(n_tup_ins + n_tup_upd + n_tup_del) \
                  FILTER (WHERE relname = 'department_history'), 0)::bigint \
         FROM pg_stat_user_tables";
    let mut last: Option<(i64, i64)> = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *connection)
            .await?;
        let written: (i64, i64) = sqlx::query_as(SQL).fetch_one(&mut *connection).await?;
        if last == Some(written) {
            return Ok(written);
        }
        last = Some(written);
    }
    bail!("the statistics of departments kept moving for 10 s")
}

struct Machine {
    cores: usize,
    cpu: String,
    postgres: String,
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cores, {}, PostgreSQL {}",
            self.cores, self.cpu, self.postgres
        )
    }
}

#[derive(Clone, Copy)]
struct Throughput {
    departments: usize,
    took: Duration,
}

impl Throughput {
    fn new(departments: usize, took: Duration) -> Throughput {
        Throughput { departments, took }
    }

    fn per_second(&self) -> f64 {
        self.departments as f64 / self.took.as_secs_f64().max(f64::EPSILON)
    }

    /// This speed as a share of `ceiling`'s.
    fn ratio_to(&self, ceiling: &Throughput) -> f64 {
        self.per_second() / ceiling.per_second()
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "departments": self.departments,
            "seconds": self.took.as_secs_f64(),
            "departments_per_second": self.per_second(),
        })
    }
}

struct SyncFigures {
    throughput: Throughput,
    requests: usize,
    max_rss_mib: f64,
    cpu: Cpu,
}

/// Processor time spent during one sync: by deptsync, and by the bench serving the fake
/// (which should stay small beside deptsync's, or the fake would be what is measured).
struct Cpu {
    deptsync: Duration,
    fake: Duration,
}

impl Cpu {
    fn describe(&self) -> String {
        format!(
            "CPU: deptsync {}, fake {}",
            seconds(self.deptsync),
            seconds(self.fake)
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "deptsync_seconds": self.deptsync.as_secs_f64(),
            "fake_seconds": self.fake.as_secs_f64(),
        })
    }
}

/// User and system time of this process (the fakes and the bench) so far.
fn own_cpu() -> Duration {
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live local.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    launcher::cpu_time(&usage)
}

struct ProcurifyFigures {
    first: Throughput,
    second: Duration,
    second_rows_written: i64,
    max_rss_mib: f64,
    first_cpu: Cpu,
}

impl ProcurifyFigures {
    /// The second pass's time as a share of the first's.
    fn second_pass_ratio(&self) -> f64 {
        self.second.as_secs_f64() / self.first.took.as_secs_f64()
    }
}

struct RateLimitedFigures {
    departments: usize,
    wall: Duration,
    requests: usize,
    per_second: f64,
    fraction_of_allowed: f64,
    busiest_period: usize,
}

struct Report {
    quick: bool,
    n: usize,
    machine: Machine,
    ceiling: Throughput,
    mews: SyncFigures,
    procurify: ProcurifyFigures,
    mews_five: SyncFigures,
    rate_limited: RateLimitedFigures,
    /// The most of a child's peak memory that may be the launcher's.
    launcher_peak_mib: f64,
}

impl Report {
    fn print(&self) {
        let n = self.n;
        let rate = &self.rate_limited;
        let mut table = Table::new();
        table.set_header(vec!["measure", "figure", "detail"]);
        let mode = if self.quick {
            "quick (no speed is asserted; the figures are small-N noise)"
        } else {
            "full"
        };
        table.add_row(vec![
            "machine".to_owned(),
            self.machine.to_string(),
            format!("mode: {mode}"),
        ]);
        table.add_row(vec![
            "N".to_owned(),
            thousands(n as u64),
            format!("departments over 7 years, {SCOPES} enterprises / branches"),
        ]);
        table.add_row(vec![
            "COPY ceiling".to_owned(),
            format!(
                "{} departments/s",
                thousands(self.ceiling.per_second() as u64)
            ),
            format!("N in {}", seconds(self.ceiling.took)),
        ]);
        table.add_row(vec![
            "Mews full sync".to_owned(),
            format!(
                "{} departments/s",
                thousands(self.mews.throughput.per_second() as u64)
            ),
            format!(
                "N in {}, {:.2} of the ceiling; {} requests, {CONCURRENT_WINDOWS} windows at once, budget lifted; {}",
                seconds(self.mews.throughput.took),
                self.mews.throughput.ratio_to(&self.ceiling),
                self.mews.requests,
                self.mews.cpu.describe(),
            ),
        ]);
        table.add_row(vec![
            "Procurify first pass".to_owned(),
            format!(
                "{} departments/s",
                thousands(self.procurify.first.per_second() as u64)
            ),
            format!(
                "N in {}, {:.2} of the ceiling; pages of {PROCURIFY_PAGE_SIZE}; {}",
                seconds(self.procurify.first.took),
                self.procurify.first.ratio_to(&self.ceiling),
                self.procurify.first_cpu.describe(),
            ),
        ]);
        table.add_row(vec![
            "Procurify pass, nothing changed".to_owned(),
            seconds(self.procurify.second),
            format!(
                "{} rows written to departments (a version is a row's), none to department_history (asserted); {:.2} of the first pass's time",
                self.procurify.second_rows_written,
                self.procurify.second_pass_ratio()
            ),
        ]);
        table.add_row(vec![
            "peak memory, Mews sync of N".to_owned(),
            format!("{:.1} MiB", self.mews.max_rss_mib),
            format!(
                "deptsync's peak resident set (wait4 ru_maxrss; at most {:.1} MiB of it the launcher's)",
                self.launcher_peak_mib
            ),
        ]);
        table.add_row(vec![
            "peak memory, Mews sync of 5 × N".to_owned(),
            format!("{:.1} MiB", self.mews_five.max_rss_mib),
            format!(
                "5 × N in {} ({} departments/s)",
                seconds(self.mews_five.throughput.took),
                thousands(self.mews_five.throughput.per_second() as u64)
            ),
        ]);
        table.add_row(vec![
            "Mews, 300 ms pages, 200 req/30 s".to_owned(),
            format!("{:.2} requests/s", rate.per_second),
            format!(
                "{:.0}% of the allowed {:.2}/s; {} requests in {}, at most {} in any 30 s; {} departments, default budget",
                rate.fraction_of_allowed * 100.0,
                MEWS_LIMIT as f64 / MEWS_LIMIT_PERIOD.as_secs_f64(),
                rate.requests,
                seconds(rate.wall),
                rate.busiest_period,
                thousands(rate.departments as u64),
            ),
        ]);
        println!("{table}");
    }

    fn json(&self) -> serde_json::Value {
        let rate = &self.rate_limited;
        json!({
            "mode": if self.quick { "quick" } else { "full" },
            "n": self.n,
            "machine": {
                "cores": self.machine.cores,
                "cpu": self.machine.cpu,
                "postgres": self.machine.postgres,
            },
            "copy_ceiling": self.ceiling.json(),
            "mews_full_sync": {
                "throughput": self.mews.throughput.json(),
                "ratio_to_ceiling": self.mews.throughput.ratio_to(&self.ceiling),
                "requests": self.mews.requests,
                "concurrent_windows": CONCURRENT_WINDOWS,
                "cpu": self.mews.cpu.json(),
            },
            "procurify": {
                "page_size": PROCURIFY_PAGE_SIZE,
                "first_pass": self.procurify.first.json(),
                "first_pass_ratio_to_ceiling": self.procurify.first.ratio_to(&self.ceiling),
                "first_pass_cpu": self.procurify.first_cpu.json(),
                "second_pass": {
                    "seconds": self.procurify.second.as_secs_f64(),
                    "rows_written": self.procurify.second_rows_written,
                    "ratio_to_first": self.procurify.second_pass_ratio(),
                },
                "peak_rss_mib": self.procurify.max_rss_mib,
            },
            "peak_rss_mib": {
                "mews_n": self.mews.max_rss_mib,
                "mews_5n": self.mews_five.max_rss_mib,
                "launcher_at_most": self.launcher_peak_mib,
            },
            "mews_5n_sync": {
                "throughput": self.mews_five.throughput.json(),
                "cpu": self.mews_five.cpu.json(),
            },
            "mews_rate_limited": {
                "departments": rate.departments,
                "page_delay_ms": SLOW_PAGE.as_millis() as u64,
                "limit": { "requests": MEWS_LIMIT, "per_seconds": MEWS_LIMIT_PERIOD.as_secs() },
                "seconds": rate.wall.as_secs_f64(),
                "requests": rate.requests,
                "requests_per_second": rate.per_second,
                "fraction_of_allowed": rate.fraction_of_allowed,
                "busiest_30s": rate.busiest_period,
            },
        })
    }

    /// Writes the figures under `target/` (`CARGO_TARGET_DIR` when set).
    fn write_json(&self) -> anyhow::Result<PathBuf> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        std::fs::create_dir_all(&target)?;
        let name = if self.quick {
            "bench-sync-quick.json"
        } else {
            "bench-sync.json"
        };
        let path = target.join(name);
        let text = serde_json::to_string_pretty(&self.json())?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// 1234567 as "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|group| std::str::from_utf8(group).expect("digits are ASCII"))
        .collect();
    groups.join(",")
}

mod launcher {
    //! Why every deptsync is spawned by a launcher process rather than by the bench.
    //!
    //! Linux charges a process's `ru_maxrss` with the peak resident set of the memory it ran
    //! in before `exec`, and a child spawned with `posix_spawn` (as std does, `CLONE_VM`)
    //! runs in its parent's memory until then: here the bench's, fakes and all, hundreds of
    //! MiB. So this same binary, started with [`ARG`] before the bench has grown, spawns
    //! each deptsync and reaps it with `wait4`; a child's figure then carries at most the
    //! launcher's own few MiB, which it reports too.

    use std::io::{BufRead, BufReader, Write};
    use std::path::PathBuf;
    use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use serde::{Deserialize, Serialize};

    /// The first argument that makes this binary the launcher.
    pub const ARG: &str = "--deptsync-launcher";

    /// One deptsync to run: its arguments and the file its output goes to.
    #[derive(Serialize, Deserialize)]
    pub struct Request {
        pub args: Vec<String>,
        pub log: PathBuf,
    }

    /// How one deptsync went.
    #[derive(Serialize, Deserialize)]
    pub struct ChildRun {
        /// `None` when a signal ended it.
        pub exit_code: Option<i32>,
        pub wait_status: i32,
        pub wall: Duration,
        /// The child's peak resident set, from `wait4`.
        pub max_rss_kib: u64,
        /// The child's user and system time, from `wait4`.
        pub cpu: Duration,
        /// The launcher's own peak resident set (`VmHWM`): the most of `max_rss_kib` that
        /// may be the launcher's rather than deptsync's.
        pub launcher_peak_kib: u64,
    }

    impl ChildRun {
        pub fn max_rss_mib(&self) -> f64 {
            self.max_rss_kib as f64 / 1024.0
        }

        pub fn ending(&self) -> String {
            match self.exit_code {
                Some(code) => format!("exited {code}"),
                None => format!("ended with wait status {:#x}", self.wait_status),
            }
        }
    }

    /// The bench's end of a launcher: one request line in, one reply line out.
    pub struct Launcher {
        process: Child,
        requests: ChildStdin,
        replies: BufReader<ChildStdout>,
    }

    impl Launcher {
        pub fn start() -> anyhow::Result<Launcher> {
            let exe = std::env::current_exe().context("finding the bench's own binary")?;
            let mut process = Command::new(exe)
                .arg(ARG)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the launcher")?;
            let requests = process.stdin.take().context("the launcher's stdin")?;
            let replies = BufReader::new(process.stdout.take().context("the launcher's stdout")?);
            Ok(Launcher {
                process,
                requests,
                replies,
            })
        }

        /// Runs one deptsync to its end (blocking).
        pub fn run(&mut self, request: &Request) -> anyhow::Result<Result<ChildRun, String>> {
            let mut line = serde_json::to_string(request)?;
            line.push('\n');
            self.requests
                .write_all(line.as_bytes())
                .and_then(|()| self.requests.flush())
                .context("sending the launcher a request")?;
            let mut reply = String::new();
            let read = self
                .replies
                .read_line(&mut reply)
                .context("reading the launcher's reply")?;
            anyhow::ensure!(read > 0, "the launcher ended");
            serde_json::from_str(&reply).context("the launcher's reply")
        }

        /// Ends the launcher (at the end of its input) and waits for it.
        pub fn stop(self) -> anyhow::Result<()> {
            let Launcher {
                mut process,
                requests,
                replies,
            } = self;
            drop(requests);
            drop(replies);
            let status = process.wait().context("waiting for the launcher")?;
            anyhow::ensure!(status.success(), "the launcher {status}");
            Ok(())
        }
    }

    /// The launcher: runs each request read from stdin, answers on stdout, until stdin ends.
    pub fn serve() -> anyhow::Result<()> {
        let mut replies = std::io::stdout().lock();
        for line in std::io::stdin().lock().lines() {
            let request: Request = serde_json::from_str(&line?).context("a launcher request")?;
            let reply = spawn_and_reap(&request).map_err(|e| format!("{e:#}"));
            let mut line = serde_json::to_string(&reply)?;
            line.push('\n');
            replies.write_all(line.as_bytes())?;
            replies.flush()?;
        }
        Ok(())
    }

    fn spawn_and_reap(request: &Request) -> anyhow::Result<ChildRun> {
        let log = std::fs::File::create(&request.log)
            .with_context(|| format!("creating {}", request.log.display()))?;
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_deptsync"))
            .args(&request.args)
            // DATABASE_URL would override the config's database.
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deptsync")?;
        let pid = libc::pid_t::try_from(child.id()).context("a pid out of range")?;
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `pid` is this process's child and not reaped yet (`child` is never
            // waited on); both pointers are to live locals.
            let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if reaped == pid {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error).context("waiting for deptsync");
            }
        }
        let wall = started.elapsed();
        // Reaped already: dropping `Child` neither waits nor kills.
        drop(child);
        Ok(ChildRun {
            exit_code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            wait_status: status,
            wall,
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            cpu: cpu_time(&usage),
            launcher_peak_kib: own_peak_kib(),
        })
    }

    /// User plus system time of `usage`.
    pub fn cpu_time(usage: &libc::rusage) -> Duration {
        let time = |t: libc::timeval| {
            Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        time(usage.ru_utime) + time(usage.ru_stime)
    }

    /// This process's peak resident set, from `/proc/self/status` (0 where there is none).
    fn own_peak_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmHWM:"))
                    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}
