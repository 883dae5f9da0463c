//! `cargo bench --bench fleet`: many sources on several replicas of the service.
//!
//! 1,000 sources of the four kinds (250 of each, every one its own file under
//! `sources.d/`, served by one in-process fake per kind answering each request in
//! 100 ms), three `deptsync run` replicas against one PostgreSQL database (of
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`), every source
//! due every minute, with the service's default lease and pool settings. Once every
//! source has been synced once, the bench watches three whole minutes of firings, then
//! kills one replica with `SIGKILL` a moment after a firing, while its passes run, and
//! times until every source it held has been synced by another. It reports:
//!
//! - passes per source per firing (each should be exactly one: no firing missed, none
//!   run twice), and whether two passes of a source ever overlapped;
//! - how the passes spread over the replicas, and how long after its firing a pass
//!   started;
//! - each replica's CPU seconds over the watched minutes and its peak resident memory;
//! - the most database connections the replicas held at once (sampled every 100 ms),
//!   against the bound (replicas × `max_connections`);
//! - the takeover: from the kill to the last of the killed replica's sources synced by
//!   another, and the killed replica's commits after the kill (zero).
//!
//! The figures are printed as a table and written as JSON to `target/bench-fleet.json`.
//! Quick mode (no `--bench` argument, as under `cargo test --all-targets`, or `--quick`)
//! runs 40 sources due every 10 s with 3 s leases, asserting the same correctness (one
//! pass per source per firing, no overlap, the takeover, nothing committed by the killed
//! replica); no mode asserts any speed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use comfy_table::Table;
use serde_json::json;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, Row};

use deptsync::fakes::data_v1::{self, FakeDataV1};
use deptsync::fakes::mews::{self, FakeMews};
use deptsync::fakes::procurify::{self, FakeProcurify};
use deptsync::fakes::snapbooks::{self, FakeSnapbooks};

/// How big a run is.
struct Mode {
    quick: bool,
    /// Sources of each of the four kinds.
    per_kind: usize,
    replicas: usize,
    /// Every source's schedule, and how often it fires.
    schedule: &'static str,
    period: TimeDelta,
    /// Firings watched.
    firings: i32,
    /// `[daemon]` settings beyond the defaults.
    daemon: &'static str,
    /// How long after a firing the replica is killed (its passes under way).
    kill_after: Duration,
    /// The lease's time to live the config gives.
    lease_ttl: Duration,
}

impl Mode {
    fn from_args() -> Mode {
        let args: Vec<String> = std::env::args().collect();
        let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--quick");
        if quick {
            Mode {
                quick,
                per_kind: 10,
                replicas: 3,
                schedule: "*/10 * * * * *",
                period: TimeDelta::seconds(10),
                firings: 2,
                daemon: "lease_ttl = \"3s\"\nmax_concurrent_passes = 2\n",
                kill_after: Duration::from_millis(400),
                lease_ttl: Duration::from_secs(3),
            }
        } else {
            Mode {
                quick,
                per_kind: 250,
                replicas: 3,
                schedule: "0 * * * * *",
                period: TimeDelta::minutes(1),
                firings: 3,
                daemon: "",
                kill_after: Duration::from_secs(2),
                lease_ttl: deptsync::store::lease::DEFAULT_TTL,
            }
        }
    }
}

/// How long each fake takes to answer a request.
const ANSWER: Duration = Duration::from_millis(100);
/// Departments each fake serves to each of its sources.
const DEPARTMENTS: usize = 20;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = runtime.block_on(run(Mode::from_args()));
    runtime.shutdown_background();
    outcome
}

/// The four fakes, serving every source of their kind.
struct Fakes {
    mews: FakeMews,
    procurify: FakeProcurify,
    snapbooks: FakeSnapbooks,
    data: FakeDataV1,
}

impl Fakes {
    async fn start() -> anyhow::Result<Fakes> {
        let now = Utc::now();
        let mews = FakeMews::start().await?;
        mews.generate(
            DEPARTMENTS,
            1,
            now - TimeDelta::hours(20),
            now - TimeDelta::hours(1),
        );
        mews.set_delay(ANSWER);
        let procurify = FakeProcurify::start().await?;
        procurify.generate(DEPARTMENTS, 2);
        procurify.shared.set_delay(ANSWER);
        let snapbooks = FakeSnapbooks::start(&[1]).await?;
        for id in 0..DEPARTMENTS as i64 {
            snapbooks.put(id + 1, &format!("Department {id}"), 1, Some(true));
        }
        snapbooks.shared.set_delay(ANSWER);
        let data = FakeDataV1::start().await?;
        for id in 0..DEPARTMENTS {
            data.put(&format!("d{id}"), None, &format!("Department {id}"));
        }
        data.shared.set_delay(ANSWER);
        Ok(Fakes {
            mews,
            procurify,
            snapbooks,
            data,
        })
    }

    /// The `[[sources]]` table of source number `i`, of one kind or another, every one
    /// due on `schedule`. Sources of a kind share its fake's credentials, so the
    /// credentials' rate budget is lifted: the fleet is measured, not the vendors.
    fn source(&self, i: usize, schedule: &str) -> String {
        let common = format!("schedule = \"{schedule}\"\nrate_limit = \"1000000/1s\"\n");
        let start = (Utc::now() - TimeDelta::days(2))
            .trunc_subsecs(0)
            .to_rfc3339();
        match i % 4 {
            0 => format!(
                "[[sources]]\nname = \"mews-{i}\"\nkind = \"mews\"\nbase_url = \"{}\"\nclient_token = \"{}\"\naccess_token = \"{}\"\nstart = \"{start}\"\npage_size = 100\n{common}",
                self.mews.base_url,
                mews::CLIENT_TOKEN,
                mews::ACCESS_TOKEN
            ),
            1 => format!(
                "[[sources]]\nname = \"procurify-{i}\"\nkind = \"procurify\"\nbase_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\npage_size = 100\n{common}",
                self.procurify.base_url,
                procurify::CLIENT_ID,
                procurify::CLIENT_SECRET
            ),
            2 => format!(
                "[[sources]]\nname = \"snapbooks-{i}\"\nkind = \"snapbooks\"\nbase_url = \"{}\"\ntoken = \"{}\"\npage_size = 100\n{common}",
                self.snapbooks.base_url,
                snapbooks::TOKEN
            ),
            _ => format!(
                "[[sources]]\nname = \"data-{i}\"\nkind = \"data_v1\"\nbase_url = \"{}\"\ntoken = \"{}\"\n{common}",
                self.data.base_url,
                data_v1::TOKEN
            ),
        }
    }
}

/// A `deptsync run` process.
struct Replica {
    child: Child,
    /// The name it holds leases under, once it has said it is alive.
    holder: Option<String>,
}

impl Replica {
    fn start(config: &Path, log: &Path) -> anyhow::Result<Replica> {
        let log =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(env!("CARGO_BIN_EXE_deptsync"))
            .args(["run", "--config", &config.to_string_lossy()])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deptsync run")?;
        Ok(Replica {
            child,
            holder: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds so far and peak resident memory (MiB), from `/proc`.
    fn usage(&self) -> anyhow::Result<(f64, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // After the command's name (in parentheses, which may hold spaces): state is
        // field 3; utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("a /proc stat line")?
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let peak_kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Ok((ticks / per_second, peak_kib / 1024.0))
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on a child this process spawned and has not reaped.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// SIGTERM, and its exit within 30 s.
    fn stop(mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGTERM);
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "a replica exited with {status}");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        bail!("a replica did not stop within 30 s of SIGTERM")
    }
}

/// A pass as the bench looks at it.
struct Pass {
    source: String,
    holder: String,
    status: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    /// The firing of its schedule it served.
    due_at: Option<DateTime<Utc>>,
}

async fn passes(pool: &PgPool) -> anyhow::Result<Vec<Pass>> {
    let rows = sqlx::query(
        "SELECT source, holder, status, started_at, finished_at, due_at FROM sync_runs
         ORDER BY source, started_at",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Pass {
                source: row.try_get("source")?,
                holder: row
                    .try_get::<Option<String>, _>("holder")?
                    .unwrap_or_default(),
                status: row.try_get("status")?,
                started_at: row.try_get("started_at")?,
                finished_at: row.try_get("finished_at")?,
                due_at: row.try_get("due_at")?,
            })
        })
        .collect()
}

/// The first firing of a schedule of `period` after `t` (periods divide a day).
fn next_firing(t: DateTime<Utc>, period: TimeDelta) -> DateTime<Utc> {
    let period_ms = period.num_milliseconds();
    let ms = t.timestamp_millis();
    DateTime::from_timestamp_millis((ms / period_ms + 1) * period_ms).unwrap_or(t)
}

async fn sleep_until(t: DateTime<Utc>) {
    if let Ok(wait) = (t - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(mode: Mode) -> anyhow::Result<()> {
    let server = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("deptsync_bench_fleet_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&server)
        .await
        .with_context(|| format!("the bench needs PostgreSQL at {server}"))?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await?;
    let mut url = reqwest::Url::parse(&server)?;
    url.set_path(&name);
    let workdir =
        std::env::temp_dir().join(format!("deptsync-bench-fleet-{}", uuid::Uuid::new_v4()));
    let outcome = measure(&mode, url.as_str(), &workdir).await;
    let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    let report = outcome?;
    dropped?;
    let _ = std::fs::remove_dir_all(&workdir);
    report.print();
    let file = report.write_json(mode.quick)?;
    println!("figures written to {}", file.display());
    Ok(())
}

async fn measure(mode: &Mode, url: &str, workdir: &Path) -> anyhow::Result<Report> {
    let fakes = Fakes::start().await?;
    let sources = mode.per_kind * 4;
    std::fs::create_dir_all(workdir.join("sources.d"))?;
    for i in 0..sources {
        std::fs::write(
            workdir.join(format!("sources.d/{i:04}.toml")),
            fakes.source(i, mode.schedule),
        )?;
    }
    let config = workdir.join("deptsync.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n\n[daemon]\n{}\n[include]\nsources = \"sources.d/*.toml\"\n",
            mode.daemon
        ),
    )?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await?;

    // Three replicas at once, on an empty database: they migrate it together too.
    let mut replicas: Vec<Replica> = (0..mode.replicas)
        .map(|i| Replica::start(&config, &workdir.join(format!("replica-{i}.log"))))
        .collect::<anyhow::Result<_>>()?;
    let connections = sample_connections(url.to_owned());

    // Every source synced once (new sources are due at once).
    let deadline = Utc::now() + TimeDelta::minutes(5);
    loop {
        let synced: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT source) FROM sync_runs WHERE status = 'succeeded'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        if synced as usize == sources {
            break;
        }
        ensure!(
            Utc::now() < deadline,
            "only {synced} of {sources} sources synced in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for replica in &mut replicas {
        replica.holder =
            sqlx::query_scalar("SELECT holder FROM replicas WHERE holder LIKE '%:' || $1 || ':%'")
                .bind(replica.pid().to_string())
                .fetch_optional(&pool)
                .await?;
    }

    // The watched firings.
    let first = next_firing(Utc::now(), mode.period);
    sleep_until(first).await;
    let cpu_before: Vec<f64> = replicas
        .iter()
        .map(|r| r.usage().map(|u| u.0))
        .collect::<anyhow::Result<_>>()?;
    let end = first + mode.period * mode.firings;
    sleep_until(end).await;
    let usage_end: Vec<(f64, f64)> = replicas
        .iter()
        .map(Replica::usage)
        .collect::<anyhow::Result<_>>()?;

    // The next firing is under way: the replica holding the most leases dies with its
    // passes.
    sleep_until(end + TimeDelta::from_std(mode.kill_after)?).await;
    let deadline = Utc::now() + mode.period;
    let busiest = loop {
        let busiest: Option<String> = sqlx::query_scalar(
            "SELECT holder FROM source_leases WHERE holder IS NOT NULL
             GROUP BY holder ORDER BY count(*) DESC, holder LIMIT 1",
        )
        .fetch_optional(&pool)
        .await?;
        let index = busiest.and_then(|busiest| {
            replicas
                .iter()
                .position(|r| r.holder.as_deref() == Some(busiest.as_str()))
        });
        if let Some(index) = index {
            break index;
        }
        ensure!(
            Utc::now() < deadline,
            "no replica held a lease after the firing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The killed replica first, in every figure per replica.
    replicas.swap(0, busiest);
    let mut cpu_before = cpu_before;
    let mut usage_end = usage_end;
    cpu_before.swap(0, busiest);
    usage_end.swap(0, busiest);
    let mut victim = replicas.remove(0);
    let victim_holder = victim
        .holder
        .clone()
        .context("the killed replica never said it was alive")?;
    let victim_usage = victim.usage()?;
    victim.child.kill()?;
    let killed_at = Utc::now();
    victim.child.wait()?;
    let held: Vec<String> =
        sqlx::query_scalar("SELECT source FROM source_leases WHERE holder = $1 ORDER BY source")
            .bind(&victim_holder)
            .fetch_all(&pool)
            .await?;
    ensure!(
        !held.is_empty(),
        "the killed replica's passes all ended before the kill"
    );
    let victim_pages: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(pages), 0)::bigint FROM sync_runs WHERE holder = $1",
    )
    .bind(&victim_holder)
    .fetch_one(&pool)
    .await?;

    // Each source it held synced by another.
    let deadline = Utc::now() + TimeDelta::from_std(mode.lease_ttl * 4)? + mode.period;
    let taken_over_by = loop {
        let done: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT source, min(finished_at) FROM sync_runs
             WHERE source = ANY($1) AND holder <> $2 AND status = 'succeeded'
               AND started_at > $3
             GROUP BY source",
        )
        .bind(&held)
        .bind(&victim_holder)
        .bind(killed_at)
        .fetch_all(&pool)
        .await?;
        if done.len() == held.len() {
            break done
                .into_iter()
                .map(|(_, at)| at)
                .max()
                .unwrap_or(killed_at);
        }
        ensure!(
            Utc::now() < deadline,
            "{} of the {} sources the killed replica held were not taken over",
            held.len() - done.len(),
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let takeover = (taken_over_by - killed_at).to_std()?;
    // Long enough after the takeover for any late commit to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim_pages_after: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(pages), 0)::bigint FROM sync_runs WHERE holder = $1",
    )
    .bind(&victim_holder)
    .fetch_one(&pool)
    .await?;
    let victim_runs_after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_runs WHERE holder = $1 AND started_at > $2")
            .bind(&victim_holder)
            .bind(killed_at)
            .fetch_one(&pool)
            .await?;

    let holders: Vec<String> = std::iter::once(victim_holder.clone())
        .chain(replicas.iter().filter_map(|r| r.holder.clone()))
        .collect();
    for replica in replicas {
        replica.stop()?;
    }
    let max_connections = connections.finish().await;
    let all = passes(&pool).await?;
    pool.close().await;

    // One pass per source per watched firing: each run records the firing it served.
    let mut per_firing: BTreeMap<(&str, DateTime<Utc>), usize> = BTreeMap::new();
    let mut delays = Vec::new();
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for pass in all.iter().filter(|p| p.status == "succeeded") {
        let Some(due) = pass.due_at.filter(|due| (first..end).contains(due)) else {
            continue;
        };
        *per_firing.entry((&pass.source, due)).or_default() += 1;
        delays.push((pass.started_at - due).num_milliseconds() as f64 / 1000.0);
        *spread.entry(pass.holder.clone()).or_default() += 1;
    }
    let names: BTreeSet<&str> = all.iter().map(|p| p.source.as_str()).collect();
    let expected = names.len() * mode.firings as usize;
    let missed = expected.saturating_sub(per_firing.len());
    let doubled = per_firing.values().filter(|n| **n > 1).count();
    let (min_per, max_per) = if missed > 0 {
        (0, per_firing.values().copied().max().unwrap_or(0))
    } else {
        (
            per_firing.values().copied().min().unwrap_or(0),
            per_firing.values().copied().max().unwrap_or(0),
        )
    };
    let mut overlaps = 0;
    for pair in all.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.source == b.source && a.finished_at.is_some_and(|f| b.started_at < f) {
            overlaps += 1;
        }
    }
    delays.sort_by(f64::total_cmp);
    let watched = (end - first).num_seconds() as f64;

    let report = Report {
        quick: mode.quick,
        sources: names.len(),
        replicas: mode.replicas,
        schedule: mode.schedule,
        firings: mode.firings,
        min_per,
        max_per,
        missed,
        doubled,
        overlaps,
        spread: holders
            .iter()
            .map(|h| spread.get(h).copied().unwrap_or(0))
            .collect(),
        delay_median: percentile(&delays, 0.5),
        delay_p99: percentile(&delays, 0.99),
        delay_max: delays.last().copied().unwrap_or(0.0),
        cpu: std::iter::once(victim_usage.0 - cpu_before[0])
            .chain(
                usage_end
                    .iter()
                    .zip(&cpu_before)
                    .skip(1)
                    .map(|(end, before)| end.0 - before),
            )
            .map(|cpu| cpu * 60.0 / watched)
            .collect(),
        rss: std::iter::once(victim_usage.1)
            .chain(usage_end.iter().skip(1).map(|u| u.1))
            .collect(),
        max_connections,
        connection_bound: mode.replicas * deptsync::store::DEFAULT_MAX_CONNECTIONS as usize,
        held: held.len(),
        takeover,
        lease_ttl: mode.lease_ttl,
        commits_after_kill: (victim_pages_after - victim_pages) + victim_runs_after,
    };
    report.check()?;
    Ok(report)
}

/// Samples how many connections deptsync holds to the database, every 100 ms.
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<usize>,
}

fn sample_connections(url: String) -> Sampler {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let Ok(mut connection) = PgConnection::connect(&url).await else {
            return 0;
        };
        let mut most = 0;
        loop {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'deptsync'",
            )
            .fetch_one(&mut connection)
            .await
            .unwrap_or(0);
            most = most.max(held as usize);
            tokio::select! {
                _ = &mut stopped => return most,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    Sampler { stop, task }
}

impl Sampler {
    async fn finish(self) -> usize {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

struct Report {
    quick: bool,
    sources: usize,
    replicas: usize,
    schedule: &'static str,
    firings: i32,
    min_per: usize,
    max_per: usize,
    missed: usize,
    doubled: usize,
    overlaps: usize,
    /// Passes of the watched firings per replica (the killed one first).
    spread: Vec<usize>,
    delay_median: f64,
    delay_p99: f64,
    delay_max: f64,
    /// CPU seconds per minute per replica over the watched firings.
    cpu: Vec<f64>,
    /// Peak resident memory per replica, MiB.
    rss: Vec<f64>,
    max_connections: usize,
    connection_bound: usize,
    held: usize,
    takeover: Duration,
    lease_ttl: Duration,
    commits_after_kill: i64,
}

impl Report {
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.missed == 0 && self.doubled == 0 && self.min_per == 1 && self.max_per == 1,
            "passes per source per firing: {} to {}, {} firings missed, {} run twice",
            self.min_per,
            self.max_per,
            self.missed,
            self.doubled
        );
        ensure!(
            self.overlaps == 0,
            "{} passes overlapped another of their source",
            self.overlaps
        );
        ensure!(
            self.spread.iter().all(|n| *n > 0),
            "a replica ran no pass: {:?}",
            self.spread
        );
        ensure!(
            self.max_connections <= self.connection_bound,
            "{} connections, more than the pools allow ({})",
            self.max_connections,
            self.connection_bound
        );
        ensure!(
            self.commits_after_kill == 0,
            "the killed replica committed after the kill"
        );
        Ok(())
    }

    fn print(&self) {
        let mut table = Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header(["FLEET", "MEASURED"]);
        let total: usize = self.spread.iter().sum();
        let shares: Vec<String> = self
            .spread
            .iter()
            .map(|n| format!("{n} ({:.1}%)", *n as f64 * 100.0 / total.max(1) as f64))
            .collect();
        let list = |values: &[f64], unit: &str| {
            values
                .iter()
                .map(|v| format!("{v:.1}{unit}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (what, value) in [
            (
                "mode".to_owned(),
                if self.quick {
                    "quick (small numbers; no speed asserted)"
                } else {
                    "full"
                }
                .to_owned(),
            ),
            (
                "sources, replicas, schedule".to_owned(),
                format!(
                    "{} sources, {} replicas, \"{}\"",
                    self.sources, self.replicas, self.schedule
                ),
            ),
            (
                format!("passes per source per firing ({} firings)", self.firings),
                format!(
                    "{} to {}; {} missed, {} run twice, {} overlapping",
                    self.min_per, self.max_per, self.missed, self.doubled, self.overlaps
                ),
            ),
            (
                "passes per replica (killed one first)".to_owned(),
                shares.join(", "),
            ),
            (
                "pass start after its firing".to_owned(),
                format!(
                    "median {:.2} s, p99 {:.2} s, max {:.2} s",
                    self.delay_median, self.delay_p99, self.delay_max
                ),
            ),
            ("CPU per replica".to_owned(), list(&self.cpu, " s/min")),
            (
                "peak memory per replica".to_owned(),
                list(&self.rss, " MiB"),
            ),
            (
                "database connections, most at once".to_owned(),
                format!(
                    "{} (bound: {})",
                    self.max_connections, self.connection_bound
                ),
            ),
            (
                "kill -9: last held source synced by another".to_owned(),
                format!(
                    "{:.1} s after the kill, {} sources held, lease {:?}",
                    self.takeover.as_secs_f64(),
                    self.held,
                    self.lease_ttl
                ),
            ),
            (
                "commits by the killed replica after the kill".to_owned(),
                self.commits_after_kill.to_string(),
            ),
        ] {
            table.add_row([what, value]);
        }
        println!("{table}");
    }

    fn write_json(&self, quick: bool) -> anyhow::Result<PathBuf> {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&target)?;
        let file = target.join(if quick {
            "bench-fleet-quick.json"
        } else {
            "bench-fleet.json"
        });
        let value = json!({
            "mode": if self.quick { "quick" } else { "full" },
            "sources": self.sources,
            "replicas": self.replicas,
            "schedule": self.schedule,
            "firings": self.firings,
            "passes_per_source_per_firing": { "min": self.min_per, "max": self.max_per },
            "missed": self.missed,
            "doubled": self.doubled,
            "overlaps": self.overlaps,
            "passes_per_replica": self.spread,
            "start_delay_seconds": {
                "median": self.delay_median, "p99": self.delay_p99, "max": self.delay_max
            },
            "cpu_seconds_per_minute": self.cpu,
            "peak_rss_mib": self.rss,
            "max_connections": self.max_connections,
            "connection_bound": self.connection_bound,
            "takeover": {
                "held": self.held,
                "seconds": self.takeover.as_secs_f64(),
                "lease_ttl_seconds": self.lease_ttl.as_secs_f64(),
                "commits_after_kill": self.commits_after_kill,
            },
        });
        std::fs::write(&file, serde_json::to_string_pretty(&value)?)?;
        Ok(file)
    }
}
