//! Several replicas of the service (the real binary) on one database, directly and
//! through a PgBouncer in transaction pooling mode: one holder per lease, fences that
//! refuse a holder woken up too late, takeovers after a crash, and reloads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deptsync::fakes::data_v1::{self, FakeDataV1};

use crate::helpers::{TempDir, TestDb, run_binary, stderr, through_pgbouncer, wait_for};

/// Where a replica's config points: straight at the server, or through the PgBouncer.
#[derive(Debug, Clone, Copy)]
enum Route {
    Direct,
    PgBouncer,
}

impl Route {
    fn url(self, db: &TestDb) -> String {
        match self {
            Route::Direct => db.url.clone(),
            Route::PgBouncer => through_pgbouncer(&db.url),
        }
    }
}

/// A `[[sources]]` table: a data API source `name` on `fake`, passed every `schedule`.
fn source(fake: &FakeDataV1, name: &str, schedule: &str) -> String {
    format!(
        "[[sources]]\nname = \"{name}\"\nkind = \"data_v1\"\nbase_url = \"{}\"\ntoken = \"{}\"\nschedule = \"{schedule}\"\n\n",
        fake.base_url,
        data_v1::TOKEN
    )
}

/// A config for `url`, leases lasting `lease_ttl`, with `sources`.
fn config(url: &str, lease_ttl: &str, sources: &str) -> String {
    format!("[database]\nurl = \"{url}\"\n\n[daemon]\nlease_ttl = \"{lease_ttl}\"\n\n{sources}")
}

/// A `deptsync run` process, its log in a file.
struct Replica {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Replica {
    fn start(dir: &TempDir, name: &str, config: &Path) -> Replica {
        let log = dir.join(&format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_deptsync"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn,deptsync=info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Replica { child, log }
    }

    fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then its exit within 20 s.
    async fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("a replica did not stop: {}", self.log()))
            .unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.log());
        self.log()
    }

    /// Gone at once (SIGKILL), as in a crash.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// A run as the tests look at it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Run {
    source: String,
    holder: Option<String>,
    fence: Option<i64>,
    status: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    due_at: Option<DateTime<Utc>>,
    pages: i64,
    error: Option<String>,
}

async fn runs(db: &TestDb) -> Vec<Run> {
    sqlx::query_as(
        "SELECT source, holder, fence, status, started_at, finished_at, due_at, pages, error
         FROM sync_runs ORDER BY source, started_at",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_pass_through_pgbouncer_in_transaction_pooling_mode() {
    let db = TestDb::unmigrated().await;
    let fake = FakeDataV1::start().await.unwrap();
    for i in 0..50 {
        fake.put(&format!("d{i}"), None, &format!("Department {i}"));
    }
    let dir = TempDir::new();
    let file = dir.join("deptsync.toml");
    let url = through_pgbouncer(&db.url);
    std::fs::write(
        &file,
        config(&url, "5s", &source(&fake, "hr", "0 * * * * *")),
    )
    .unwrap();
    let path = file.to_str().unwrap();

    // Migrated through it, then a first pass, a pass that changes nothing, a deletion
    // confirmed by a second listing: each transaction on whichever server connection
    // PgBouncer hands out.
    for round in 0..4 {
        if round == 2 {
            fake.remove("d7");
        }
        let output = run_binary(&["sync", "--config", path], &[]).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    let live: i64 = db
        .scalar("SELECT count(*) FROM departments WHERE deleted_at IS NULL")
        .await;
    assert_eq!(live, 49);
    let output = run_binary(&["status", "--config", path], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = run_binary(&["changes", "--config", path], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let leases: i64 = db
        .scalar("SELECT count(*) FROM source_leases WHERE holder IS NULL AND fence = 4")
        .await;
    assert_eq!(
        leases, 1,
        "four passes, four holders, each gave the lease back"
    );
}

async fn two_replicas_never_commit_for_one_source_in_one_lease(route: Route) {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    fake.shared.set_delay(Duration::from_millis(300));
    let dir = TempDir::new();
    let file = dir.join("deptsync.toml");
    let sources: String = (0..6)
        .map(|i| source(&fake, &format!("s{i}"), "* * * * * *"))
        .collect();
    std::fs::write(&file, config(&route.url(&db), "3s", &sources)).unwrap();
    let one = Replica::start(&dir, "one", &file);
    let two = Replica::start(&dir, "two", &file);

    tokio::time::sleep(Duration::from_secs(8)).await;
    let (one, two) = tokio::join!(one.stop(), two.stop());

    let runs = runs(&db).await;
    let holders: std::collections::BTreeSet<&str> =
        runs.iter().filter_map(|r| r.holder.as_deref()).collect();
    assert_eq!(holders.len(), 2, "both replicas ran passes: {one}\n{two}");
    for source in (0..6).map(|i| format!("s{i}")) {
        let of: Vec<&Run> = runs.iter().filter(|r| r.source == source).collect();
        assert!(of.len() >= 4, "{source}: {of:?}");
        for pair in of.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let finished = a.finished_at.expect("a run another followed has finished");
            assert!(
                b.started_at >= finished,
                "two passes of {source} overlapped: {a:?} {b:?}"
            );
            assert!(b.fence > a.fence, "a new lease for each pass: {a:?} {b:?}");
            // Each firing (every second) runs once in the fleet: each pass serves a
            // firing of its own, a whole second, later than the last one's.
            let (a_due, b_due) = (a.due_at.unwrap(), b.due_at.unwrap());
            assert!(b_due > a_due, "two passes of one firing: {a:?} {b:?}");
            assert_eq!(b_due.timestamp_subsec_millis(), 0, "{b:?}");
            assert!(b.started_at >= b_due, "started before its firing: {b:?}");
        }
        assert!(
            of.iter()
                .all(|r| r.status == "succeeded" || r.status == "cancelled"),
            "{of:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_commit_for_one_source_in_one_lease_direct() {
    two_replicas_never_commit_for_one_source_in_one_lease(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_commit_for_one_source_in_one_lease_through_pgbouncer() {
    two_replicas_never_commit_for_one_source_in_one_lease(Route::PgBouncer).await;
}

async fn a_holder_stopped_past_its_lease_is_refused_at_its_next_commit(route: Route) {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    fake.put("b", None, "Beta");
    // Each request takes 2.5 s: a replica stopped mid-pass is stopped mid-request.
    fake.shared.set_delay(Duration::from_millis(2_500));
    let dir = TempDir::new();
    let file = dir.join("deptsync.toml");
    std::fs::write(
        &file,
        config(&route.url(&db), "2s", &source(&fake, "hr", "* * * * * *")),
    )
    .unwrap();

    let stale = Replica::start(&dir, "stale", &file);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE status = 'running'",
        1,
        20,
    )
    .await;
    stale.signal(libc::SIGSTOP);
    let stale_run = runs(&db).await.remove(0);
    // What an operator sees: who holds the source, under which fence, until when.
    let output = run_binary(
        &["status", "--json", "--config", file.to_str().unwrap()],
        &[],
    )
    .await;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let line = &status[0];
    assert_eq!(
        line["lease_holder"].as_str(),
        stale_run.holder.as_deref(),
        "{line}"
    );
    assert_eq!(line["lease_fence"].as_i64(), stale_run.fence, "{line}");
    assert!(line["lease_expires_at"].is_string(), "{line}");
    let output = run_binary(&["status", "--config", file.to_str().unwrap()], &[]).await;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains(&format!("{} until", stale_run.holder.as_deref().unwrap())),
        "{table}"
    );

    // Its lease lapses; another replica takes the source over and syncs it.
    let fresh = Replica::start(&dir, "fresh", &file);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE status = 'succeeded'",
        1,
        30,
    )
    .await;
    fresh.stop().await;
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(stored, 2);
    fake.put("c", None, "Written by nobody");

    // The stopped holder wakes with its page in hand: its commit is refused.
    stale.signal(libc::SIGCONT);
    let sql = format!(
        "SELECT count(*) FROM sync_runs WHERE fence = {} AND status <> 'running'",
        stale_run.fence.unwrap()
    );
    wait_for(&db, &sql, 1, 30).await;
    let log = stale.stop().await;
    let runs = runs(&db).await;
    let stale_run = runs
        .iter()
        .find(|r| r.fence == stale_run.fence)
        .unwrap()
        .clone();
    assert_eq!(stale_run.status, "failed", "{runs:?}\n{log}");
    assert!(
        stale_run
            .error
            .as_deref()
            .is_some_and(|e| e.contains("lost its lease")),
        "{stale_run:?}"
    );
    assert_eq!(stale_run.pages, 0, "no commit after the takeover");
    let fresh_fences: Vec<i64> = runs
        .iter()
        .filter(|r| r.holder != stale_run.holder)
        .filter_map(|r| r.fence)
        .collect();
    assert!(fresh_fences.iter().all(|f| Some(*f) > stale_run.fence));
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(stored, 2, "nothing of the stale holder's page was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_past_its_lease_is_refused_at_its_next_commit_direct() {
    a_holder_stopped_past_its_lease_is_refused_at_its_next_commit(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_past_its_lease_is_refused_at_its_next_commit_through_pgbouncer() {
    a_holder_stopped_past_its_lease_is_refused_at_its_next_commit(Route::PgBouncer).await;
}

async fn a_crashed_replicas_sources_are_taken_over_when_its_leases_lapse(route: Route) {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    fake.shared.set_delay(Duration::from_millis(1_500));
    let dir = TempDir::new();
    let file = dir.join("deptsync.toml");
    let sources: String = (0..3)
        .map(|i| source(&fake, &format!("s{i}"), "0 0 * * * *"))
        .collect();
    std::fs::write(&file, config(&route.url(&db), "2s", &sources)).unwrap();

    let crashing = Replica::start(&dir, "crashing", &file);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE status = 'running'",
        3,
        20,
    )
    .await;
    crashing.kill().await;
    let killed_at = Utc::now();

    // Due hourly, and claimed already: only the lapsed leases let the survivor in, and a
    // killed pass's source is due again (its firing was not served).
    let survivor = Replica::start(&dir, "survivor", &file);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE status = 'succeeded'",
        3,
        30,
    )
    .await;
    let log = survivor.stop().await;
    let runs = runs(&db).await;
    let abandoned = runs.iter().filter(|r| r.status == "failed").count();
    assert_eq!(
        abandoned, 3,
        "the crashed passes are recorded: {runs:?}\n{log}"
    );
    for run in runs.iter().filter(|r| r.status == "succeeded") {
        assert!(run.started_at > killed_at, "{run:?}");
        let crashed = runs
            .iter()
            .find(|r| r.source == run.source && r.status == "failed")
            .unwrap();
        assert_eq!(
            run.due_at, crashed.due_at,
            "the survivor serves the firing the crashed replica did not: {runs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_sources_are_taken_over_when_its_leases_lapse_direct() {
    a_crashed_replicas_sources_are_taken_over_when_its_leases_lapse(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_sources_are_taken_over_when_its_leases_lapse_through_pgbouncer() {
    a_crashed_replicas_sources_are_taken_over_when_its_leases_lapse(Route::PgBouncer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_sources_without_a_restart() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    let dir = TempDir::new();
    std::fs::create_dir(dir.join("sources.d")).unwrap();
    let file = dir.join("deptsync.toml");
    let main = format!(
        "{}[include]\nsources = \"sources.d/*.toml\"\n",
        config(&db.url, "5s", "")
    );
    std::fs::write(&file, &main).unwrap();
    std::fs::write(
        dir.join("sources.d/old.toml"),
        source(&fake, "old", "* * * * * *"),
    )
    .unwrap();
    let replica = Replica::start(&dir, "replica", &file);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE source = 'old' AND status = 'succeeded'",
        2,
        20,
    )
    .await;

    // A configuration that does not validate is refused; the running one goes on.
    std::fs::write(
        dir.join("sources.d/new.toml"),
        "[[sources]]\nname = \"Bad Name\"\n",
    )
    .unwrap();
    replica.signal(libc::SIGHUP);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !replica.log().contains("does not validate") {
        assert!(tokio::time::Instant::now() < deadline, "{}", replica.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        replica.log().contains("sources.d/new.toml"),
        "{}",
        replica.log()
    );
    let before: i64 = db
        .scalar("SELECT count(*) FROM sync_runs WHERE source = 'old'")
        .await;
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE source = 'old'",
        before + 2,
        10,
    )
    .await;

    // A changed source runs with its new settings from its next pass: here a token the
    // vendor refuses.
    std::fs::remove_file(dir.join("sources.d/new.toml")).unwrap();
    std::fs::write(
        dir.join("sources.d/old.toml"),
        source(&fake, "old", "* * * * * *").replace(data_v1::TOKEN, "revoked"),
    )
    .unwrap();
    replica.signal(libc::SIGHUP);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE source = 'old' AND status = 'failed'
           AND error LIKE '%401%'",
        1,
        20,
    )
    .await;

    // One tenant's file replaced by another's: the new source starts, the old one stops.
    std::fs::remove_file(dir.join("sources.d/old.toml")).unwrap();
    std::fs::write(
        dir.join("sources.d/new.toml"),
        source(&fake, "new", "* * * * * *"),
    )
    .unwrap();
    replica.signal(libc::SIGHUP);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE source = 'new' AND status = 'succeeded'",
        2,
        20,
    )
    .await;
    let reloaded_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = replica.pid();
    let log = replica.stop().await;
    assert!(log.contains("configuration reloaded"), "{log}");
    assert_eq!(
        log.matches("deptsync is running").count(),
        1,
        "one process (pid {pid}) throughout: {log}"
    );
    let late: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM sync_runs WHERE source = 'old' AND started_at > '{}'",
            reloaded_at.to_rfc3339()
        ))
        .await;
    assert_eq!(late, 0, "the removed source is no longer passed");
}
