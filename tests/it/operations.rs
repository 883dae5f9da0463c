//! Promises that must survive what operations do around a healthy vendor (BEHAVIOUR.md,
//! "Operations around deptsync"): a token swapped behind the same URL, a host whose clock
//! is off, a row deleted by hand, one bad byte in a response. Each drives the real binary.

use chrono::{Duration, Utc};
use deptsync::fakes::data_v1::FakeDataV1;
use deptsync::fakes::mews::{FakeDepartment, FakeMews};
use deptsync::fakes::procurify::FakeProcurify;

use crate::helpers::{TempDir, TestDb, at, config, mews_config, run_binary, sqlite_url, stderr};
use crate::listings::{data_v1_source, procurify_source};

/// A config file in `dir` holding `text`; its path.
fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.join("deptsync.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A database, and a fake Procurify with `count` departments (`{name} {id}`) synced into it
/// once by the binary; the config's path.
async fn procurify_synced(count: i64, name: &str) -> (TestDb, TempDir, FakeProcurify, String) {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=count {
        fake.put(id, &format!("{name} {id}"), 1, true);
    }
    let config = write_config(&dir, &config(&db.url, &procurify_source(&fake, "")));
    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    (db, dir, fake, config)
}

/// `deptsync sync` with `config` (and `args`); its output.
async fn sync(config: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["sync", "--config", config];
    all.extend_from_slice(args);
    run_binary(&all, &[]).await
}

/// A `sync` with `config` fails, its guard withholding `how_many` ("100 of 100").
async fn a_pass_is_refused(config: &str, how_many: &str) {
    let output = sync(config, &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(how_many), "{}", stderr(&output));
}

/// A token swapped for another tenant's behind the same `base_url`: the listing serves a
/// whole new set of ids. The first pass stores the new ones and withholds deleting the
/// old; every later pass withholds it too (the new rows must not dilute the guard's base),
/// until a person confirms.
#[tokio::test]
async fn a_withheld_deletion_stays_withheld_until_a_person_confirms_it() {
    let (db, _dir, fake, config) = procurify_synced(100, "Ours").await;

    // Another tenant's 100 departments.
    for id in 1..=100 {
        fake.remove(id);
        fake.put(1000 + id, &format!("Theirs {id}"), 7, true);
    }
    for pass in 1..=3 {
        a_pass_is_refused(&config, "100 of 100").await;
        let deleted: i64 = db
            .scalar("SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL")
            .await;
        assert_eq!(deleted, 0, "pass {pass} deleted what nobody confirmed");
    }

    let output = run_binary(&["status", "--config", &config], &[]).await;
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(shown.contains("deletions withheld since"), "{shown}");
    assert!(shown.contains("100 of 100"), "{shown}");
    assert!(shown.contains("--allow-mass-delete"), "{shown}");
    let output = run_binary(&["status", "--config", &config, "--json"], &[]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let withheld = &json[0]["withheld_deletions"];
    assert_eq!(withheld["would_delete"], 100, "{json}");
    assert_eq!(withheld["live"], 100, "{json}");
    assert!(withheld["since"].is_string(), "{json}");

    let output = sync(&config, &["--allow-mass-delete"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let deleted: i64 = db
        .scalar("SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL")
        .await;
    assert_eq!(deleted, 100);
    let output = run_binary(&["status", "--config", &config], &[]).await;
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!shown.contains("withheld"), "confirmed: {shown}");
}

/// A vendor that starts writing its ids in upper case, on SQLite: the same rule.
#[tokio::test]
async fn ids_written_another_way_delete_nothing_on_the_second_pass_either() {
    let dir = TempDir::new();
    let fake = FakeDataV1::start().await.unwrap();
    for i in 0..20 {
        fake.put(&format!("dept-{i}"), None, &format!("Department {i}"));
    }
    let url = sqlite_url(&dir.join("deptsync.db"));
    let config = write_config(&dir, &config(&url, &data_v1_source(&fake, "")));
    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for i in 0..20 {
        fake.remove(&format!("dept-{i}"));
        fake.put(&format!("DEPT-{i}"), None, &format!("Department {i}"));
    }

    for _ in 1..=2 {
        a_pass_is_refused(&config, "20 of 20").await;
    }
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let deleted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(deleted, 0);
    pool.close().await;
}

/// Runs the binary with `args` under libfaketime, its clock `offset` (e.g. `+120s`) off the
/// machine's (and the database's).
async fn run_binary_with_clock(offset: &str, args: &[&str]) -> std::process::Output {
    let faketime = std::process::Command::new("faketime")
        .arg("--version")
        .output();
    assert!(
        faketime.is_ok(),
        "this test needs libfaketime's `faketime` (Debian's package faketime; scripts/test \
         installs it)"
    );
    let mut command = tokio::process::Command::new("faketime");
    command
        // The multi-threaded library, and tokio's monotonic timers left alone: the plain one
        // can deadlock a process whose threads all ask the time at once.
        .args([
            "-m",
            "--exclude-monotonic",
            "-f",
            offset,
            env!("CARGO_BIN_EXE_deptsync"),
        ])
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("deptsync did not finish within a minute")
        .unwrap()
}

/// A database, and a fake Mews with 5 departments updated an hour ago, read with a
/// lookback of 5 s; the config's path.
async fn mews_with_a_short_lookback() -> (TestDb, TempDir, FakeMews, String) {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let fake = FakeMews::start().await.unwrap();
    fake.generate(5, 1, at(2024, 1, 1), Utc::now() - Duration::hours(1));
    let config = write_config(
        &dir,
        &mews_config(&db.url, "mews", &fake.base_url, "lookback = \"5s\""),
    );
    (db, dir, fake, config)
}

/// A department the vendor opens now, updated at `updated`; its id.
fn opened(fake: &FakeMews, updated: chrono::DateTime<Utc>) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let enterprise = fake.departments()[0].enterprise_id;
    fake.insert(FakeDepartment::new(id, enterprise, "Opened", updated));
    id
}

/// A replica whose clock is two minutes fast (an NTP step, a VM resumed with a stale
/// clock), with a lookback shorter than that: the high-water mark it leaves is the
/// database's instant, not its own, so the next pass on a replica with the right clock
/// reads the updates committed in between.
#[tokio::test]
async fn a_replica_whose_clock_is_fast_leaves_no_gap_behind() {
    let (db, _dir, fake, config) = mews_with_a_short_lookback().await;

    let output = run_binary_with_clock("+120s", &["sync", "--config", &config]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let ahead: bool = db
        .scalar("SELECT high_water_mark > now() + interval '10 seconds' FROM sync_state")
        .await;
    assert!(!ahead, "the mark is ahead of the database's clock");

    // Committed upstream after that pass, at the right time.
    let late = opened(&fake, Utc::now());
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let stored: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM departments WHERE external_id = '{late}'"
        ))
        .await;
    assert_eq!(
        stored, 1,
        "the department committed after the fast pass was skipped"
    );
}

/// A high-water mark already ahead of the database's clock (left by an older deptsync on
/// a fast host) is read from the database's instant less the lookback, with a warning, and
/// moved back to what was really read.
#[tokio::test]
async fn a_mark_ahead_of_the_database_clock_is_read_from_now() {
    let (db, _dir, fake, config) = mews_with_a_short_lookback().await;
    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    sqlx::query("UPDATE sync_state SET high_water_mark = now() + interval '1 hour'")
        .execute(db.pool())
        .await
        .unwrap();
    let late = opened(&fake, Utc::now() - Duration::seconds(1));

    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("ahead of the database's clock"),
        "{}",
        stderr(&output)
    );
    let stored: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM departments WHERE external_id = '{late}'"
        ))
        .await;
    assert_eq!(stored, 1);
    let ahead: bool = db
        .scalar("SELECT high_water_mark > now() FROM sync_state")
        .await;
    assert!(!ahead, "the mark stayed ahead of the clock");
}

/// A row an operator deleted by hand (as the README once suggested for rows out of scope)
/// comes back with the next listing, on PostgreSQL too, where an unchanged page is trusted
/// by its digest; and the feed says the version ended and began again.
#[tokio::test]
async fn a_row_deleted_by_hand_comes_back_with_the_next_listing() {
    let (db, _dir, _fake, config) = procurify_synced(30, "Department").await;
    // The second pass trusts the first's pages by their digests.
    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    sqlx::query("DELETE FROM departments WHERE external_id IN ('3', '4')")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE departments SET name = 'Edited by hand' WHERE external_id = '5'")
        .execute(db.pool())
        .await
        .unwrap();

    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT external_id, name FROM departments WHERE external_id IN ('3', '4', '5')
           AND deleted_at IS NULL ORDER BY external_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        names,
        [
            ("3".to_owned(), "Department 3".to_owned()),
            ("4".to_owned(), "Department 4".to_owned()),
            ("5".to_owned(), "Department 5".to_owned()),
        ]
    );
    // The hand deletion is history: the version it ended, the deletion, and the
    // department as the listing gave it back.
    let versions: Vec<(bool, bool)> = sqlx::query_as(
        "SELECT deleted, valid_to IS NULL FROM department_versions
         WHERE external_id = '3' ORDER BY valid_from, feed_position",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(versions, [(false, false), (true, false), (false, true)]);
}

/// One invalid UTF-8 byte in one record's name: that record goes to `rejected_records`
/// with the byte escaped, the page's other records are stored, and the listing completes
/// (so it can delete what it no longer has).
#[tokio::test]
async fn one_invalid_byte_rejects_its_record_only() {
    let (db, _dir, fake, config) = procurify_synced(20, "Department").await;

    let mut record = br#"{"id":7,"name":"Caf"#.to_vec();
    record.push(0xE9);
    record.extend_from_slice(
        br#" du Lac","branch":{"id":1,"name":"Branch 1","headquarter":true},"external_id":null,"active":true,"punchout_email":null}"#,
    );
    fake.load([(7, record.into_boxed_slice())]);
    fake.put(8, "Renamed", 1, true);
    fake.remove(9);

    let output = sync(&config, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let renamed: String = db
        .scalar("SELECT name FROM departments WHERE external_id = '8'")
        .await;
    assert_eq!(renamed, "Renamed", "the page's other records are stored");
    let deleted: Vec<String> =
        sqlx::query_scalar("SELECT external_id FROM departments WHERE deleted_at IS NOT NULL")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(deleted, ["9"], "the listing completed, and confirmed");
    let rejected: (Option<String>, String) =
        sqlx::query_as("SELECT external_id, payload::text FROM rejected_records")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(rejected.0.as_deref(), Some("7"));
    assert!(rejected.1.contains(r"Caf\\xe9 du Lac"), "{}", rejected.1);
    let kept: String = db
        .scalar("SELECT name FROM departments WHERE external_id = '7'")
        .await;
    assert_eq!(
        kept, "Department 7",
        "the bad record changes nothing stored"
    );
}

/// `deptsync changes --since` with a token of another database (staging beside production
/// on one server): exit 1, and what to do; without `--since`, the reader starts over.
#[tokio::test]
async fn the_changes_command_refuses_a_token_of_another_database() {
    let (_production, _dir, _fake, production_config) = procurify_synced(3, "Department").await;
    let changes = async |config: &str, since: Option<&str>| {
        let mut args = vec!["changes", "--config", config, "--json"];
        args.extend(since.iter().flat_map(|token| ["--since", *token]));
        run_binary(&args, &[]).await
    };
    let output = changes(&production_config, None).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let last = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .map(str::to_owned)
        .unwrap();
    let token: serde_json::Value = serde_json::from_str(&last).unwrap();
    let token = token["next"].as_str().unwrap().to_owned();

    let (_staging, _dir, _fake, staging_config) = procurify_synced(3, "Department").await;
    let output = changes(&staging_config, Some(&token)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("read again from the beginning"),
        "{}",
        stderr(&output)
    );
    assert!(
        output.stdout.is_empty(),
        "nothing read, no token handed out"
    );
    let output = changes(&staging_config, None).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}
