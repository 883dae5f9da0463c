//! The real daemon, in process and as the binary, against fake upstreams and a real
//! PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use deptsync::Settings;
use deptsync::daemon::Daemon;
use deptsync::fakes::data_v1::{self, FakeDataV1};
use deptsync::fakes::mews::FakeMews;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::helpers::{TestDb, config, mews_config, wait_for};
use crate::proxy::PgProxy;

fn data_v1_source(fake: &FakeDataV1, name: &str, schedule: &str) -> String {
    format!(
        "[[sources]]\nname = \"{name}\"\nkind = \"data_v1\"\nbase_url = \"{}\"\ntoken = \"{}\"\nschedule = \"{schedule}\"\n",
        fake.base_url,
        data_v1::TOKEN
    )
}

/// A daemon running in this process until the returned sender is used (or dropped).
fn start_daemon(toml: &str) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let settings = Settings::parse(toml, &|_| None).unwrap();
    let daemon = Daemon::build(settings).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        daemon
            .run_until(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, handle)
}

async fn stop_daemon(stop: oneshot::Sender<()>, handle: JoinHandle<()>) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("the daemon did not stop within 15 s")
        .unwrap();
}

/// A loopback port nobody listens on (there is a small window for another to take it).
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// A run as (source, started, finished).
type Run = (String, DateTime<Utc>, Option<DateTime<Utc>>);

/// The runs of each source, in order.
async fn runs(db: &TestDb) -> Vec<Run> {
    sqlx::query_as(
        "SELECT source, started_at, finished_at FROM sync_runs ORDER BY source, started_at",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
}

fn assert_no_overlap(runs: &[Run]) {
    for pair in runs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.0 == b.0 {
            let finished = a.2.expect("a run that another followed has finished");
            assert!(
                b.1 >= finished,
                "two passes of {} overlapped: {a:?} and {b:?}",
                a.0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_upstream_appear_within_a_few_ticks() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    let port = free_port();
    let toml = config(
        &db.url,
        &format!(
            "[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
            data_v1_source(&fake, "hr", "* * * * * *")
        ),
    );
    let (stop, handle) = start_daemon(&toml);

    wait_for(&db, "SELECT count(*) FROM departments", 1, 10).await;
    fake.put("b", Some("a"), "Beta");
    wait_for(&db, "SELECT count(*) FROM departments", 2, 10).await;

    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "deptsync_passes_total{source=\"hr\",outcome=\"succeeded\"}",
        "deptsync_departments_written_total{source=\"hr\",operation=\"inserted\"}",
        "deptsync_http_requests_total{source=\"hr\",status=\"200\"}",
        "deptsync_pass_duration_seconds_bucket{source=\"hr\"",
        "deptsync_last_success_timestamp_seconds{source=\"hr\"}",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from\n{metrics}"
        );
    }
    stop_daemon(stop, handle).await;
    fake.shared.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pass_makes_the_next_ticks_skip() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    fake.shared.set_delay(Duration::from_millis(2_500));
    let (stop, handle) = start_daemon(&config(
        &db.url,
        &data_v1_source(&fake, "hr", "* * * * * *"),
    ));

    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_daemon(stop, handle).await;

    let runs = runs(&db).await;
    assert_no_overlap(&runs);
    // Six ticks in six seconds, but passes of 2.5 s: at most three ran.
    assert!(
        (1..=3).contains(&runs.len()),
        "{} passes: {runs:?}",
        runs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_database_never_run_a_source_at_once() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    fake.shared.set_delay(Duration::from_millis(700));
    let toml = config(&db.url, &data_v1_source(&fake, "hr", "* * * * * *"));
    let (stop_one, one) = start_daemon(&toml);
    let (stop_two, two) = start_daemon(&toml);

    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_daemon(stop_one, one).await;
    stop_daemon(stop_two, two).await;

    let runs = runs(&db).await;
    assert!(runs.len() >= 3, "{runs:?}");
    assert_no_overlap(&runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_away_at_start_and_later_never_ends_the_daemon() {
    let db = TestDb::new().await;
    let proxy = PgProxy::start("127.0.0.1:5432".to_owned()).await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    proxy.down();
    let toml = config(
        &proxy.url_for(&db.url),
        &data_v1_source(&fake, "hr", "* * * * * *"),
    );
    let (stop, handle) = start_daemon(&toml);

    // Down at start: the daemon waits, then syncs once the database is back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!handle.is_finished());
    proxy.up();
    wait_for(&db, "SELECT count(*) FROM departments", 1, 20).await;

    // Away while running: passes fail, the daemon stays, and catches up afterwards.
    proxy.down();
    fake.put("b", None, "Beta");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!handle.is_finished());
    proxy.up();
    wait_for(&db, "SELECT count(*) FROM departments", 2, 40).await;

    stop_daemon(stop, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_pass_exits_0_and_the_next_start_resumes() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let from = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    fake.generate(400, 1, from, from + chrono::Duration::days(20));
    fake.shared.set_delay(Duration::from_millis(200));
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        mews_config(&db.url, "mews", &fake.base_url, "page_size = 10"),
    )
    .unwrap();

    let daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_deptsync"))
        .args(["run", "--config", file.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(
        &db,
        "SELECT COALESCE(max(fetched), 0) FROM sync_runs",
        30,
        30,
    )
    .await;
    let pid = daemon.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let output = tokio::time::timeout(Duration::from_secs(12), daemon.wait_with_output())
        .await
        .expect("deptsync did not exit within 12 s of SIGTERM")
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    // The service's log says what an operator needs, not the libraries' chatter
    // or PostgreSQL's notices.
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("deptsync is running"), "{log}");
    for chatter in ["Uninited", "Job creator created", "_sqlx_migrations"] {
        assert!(!log.contains(chatter), "{chatter} in the log: {log}");
    }

    let (status, fetched): (String, i64) = sqlx::query_as("SELECT status, fetched FROM sync_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(status, "cancelled");
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert!(
        (30..400).contains(&stored),
        "the pass stopped half way, got {stored}"
    );
    assert_eq!(stored, fetched, "every committed page is kept");
    let state = deptsync::store::Store::load_state(&db.store, "mews")
        .await
        .unwrap();
    let position = state
        .incremental
        .expect("the cancelled pass left its position");

    let requests_before = fake.requests().len();
    let output =
        crate::helpers::run_binary(&["sync", "--config", file.to_str().unwrap()], &[]).await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    crate::helpers::assert_resumed(&position, &fake.requests()[requests_before..]);
    let total: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(total, 400);
    fake.assert_no_violations();
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/deptsync.service");
    assert!(std::path::Path::new(unit).is_file());
    let Ok(output) = std::process::Command::new("systemd-analyze")
        .args(["verify", unit])
        .output()
    else {
        eprintln!("skipped: systemd-analyze is not installed here");
        return;
    };
    let messages = String::from_utf8_lossy(&output.stderr);
    // The binary path of the unit is not installed on a build machine; anything else counts.
    let problems: Vec<&str> = messages
        .lines()
        .filter(|line| !line.contains("/usr/local/bin/deptsync") && !line.trim().is_empty())
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:#?}");
}

/// The next datagram deptsync sends to its notify socket.
async fn next_message(socket: &tokio::net::UnixDatagram) -> String {
    let mut buffer = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(20), socket.recv(&mut buffer))
        .await
        .expect("no message from deptsync within 20 s")
        .unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        config(&db.url, &data_v1_source(&fake, "hr", "0 0 * * * *")),
    )
    .unwrap();
    let socket_path =
        std::env::temp_dir().join(format!("deptsync-notify-{}", uuid::Uuid::new_v4()));
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();

    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_deptsync"))
        .args(["run", "--config", file.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = next_message(&socket).await;
    assert!(ready.contains("READY=1"), "{ready}");
    let stored: i64 = db.scalar("SELECT count(*) FROM sync_runs").await;
    assert!(stored <= 1, "READY=1 comes once the migrations ran");

    let pid = daemon.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopping = next_message(&socket).await;
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    let status = tokio::time::timeout(Duration::from_secs(12), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(&socket_path).unwrap();
}

/// The service trims what a source's `history_retention` no longer keeps, after a pass,
/// as `sync` does.
#[tokio::test]
async fn the_service_trims_history_past_a_sources_retention() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let from = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    fake.generate(5, 1, from, Utc::now() - chrono::Duration::hours(1));
    // A version that ended, and was written, long ago.
    sqlx::query(
        "INSERT INTO department_history (source, external_id, name, is_active, deleted,
             valid_from, valid_to, observed_at, feed_position)
         VALUES ('mews', 'old', 'x', true, false, '2020-01-01Z', '2020-06-01Z', '2020-06-01Z', 1)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let toml = mews_config(
        &db.url,
        "mews",
        &fake.base_url,
        "history_retention = \"30d\"",
    );
    let (stop, handle) = start_daemon(&toml);
    wait_for(
        &db,
        "SELECT count(*) FROM sync_runs WHERE status = 'succeeded'",
        1,
        30,
    )
    .await;
    let mut left = 1;
    for _ in 0..100 {
        left = db
            .scalar::<i64>("SELECT count(*) FROM department_history")
            .await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_daemon(stop, handle).await;
    assert_eq!(left, 0, "the service trimmed the old version");
}
