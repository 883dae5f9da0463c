//! The real binary: exit codes, messages, and `sync` / `status` end to end.

use chrono::{TimeZone, Utc};
use deptsync::fakes::mews::FakeMews;

use crate::helpers::{TestDb, a_sync_skips_the_leased_source, mews_config, run_binary, stderr};

fn write_config(text: &str) -> tempfile_path::TempConfig {
    tempfile_path::TempConfig::new(text)
}

/// A config file that lives as long as the test.
mod tempfile_path {
    pub struct TempConfig {
        pub path: std::path::PathBuf,
    }

    impl TempConfig {
        pub fn new(text: &str) -> Self {
            let path = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            TempConfig { path }
        }

        pub fn arg(&self) -> &str {
            self.path.to_str().unwrap()
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[tokio::test]
async fn a_bad_config_exits_2_naming_the_source_and_field_and_touches_nothing() {
    let db = TestDb::new().await;
    let config = write_config(&mews_config(
        &db.url,
        "mews-main",
        "http://127.0.0.1:9",
        "page_size = 0",
    ));
    // A fresh, empty database: nothing may be created in it.
    let empty = format!("{}_empty", db.name);
    sqlx::query(&format!("CREATE DATABASE \"{empty}\""))
        .execute(db.pool())
        .await
        .unwrap();
    let empty_url = db.url.replace(&db.name, &empty);

    let output = run_binary(
        &["sync", "--config", config.arg()],
        &[("DATABASE_URL", &empty_url)],
    )
    .await;

    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("source \"mews-main\": field `page_size`"),
        "{message}"
    );
    let mut check = sqlx::PgPool::connect(&empty_url).await.unwrap();
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&check)
            .await
            .unwrap();
    assert_eq!(tables, 0, "a bad config must not touch the database");
    check.close().await;
    check = sqlx::PgPool::connect(&crate::helpers::server_url())
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE \"{empty}\" WITH (FORCE)"))
        .execute(&check)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_missing_config_file_exits_2() {
    let output = run_binary(&["--config", "/nonexistent/deptsync.toml", "status"], &[]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("/nonexistent/deptsync.toml"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn sync_then_status_end_to_end() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let from = Utc.with_ymd_and_hms(2019, 6, 1, 0, 0, 0).unwrap();
    fake.generate(250, 2, from, Utc::now() - chrono::Duration::hours(1));
    let config = write_config(&mews_config(
        &db.url,
        "mews-main",
        &fake.base_url,
        "page_size = 100",
    ));

    // Migrations, said as they are: applied the first time, up to date the second, and
    // without PostgreSQL's notices.
    let dir = crate::helpers::TempDir::new();
    let fresh = write_config(&format!(
        "[database]\nurl = \"{}\"\n",
        crate::helpers::sqlite_url(&dir.join("fresh.db"))
    ));
    let first = run_binary(&["migrate", "--config", fresh.arg()], &[]).await;
    assert!(
        stderr(&first).contains("migrations applied"),
        "{}",
        stderr(&first)
    );
    let again = run_binary(&["migrate", "--config", config.arg()], &[]).await;
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));
    assert!(
        !stderr(&again).contains("_sqlx_migrations"),
        "{}",
        stderr(&again)
    );

    // --config after the subcommand works as well as before it.
    let output = run_binary(&["sync", "--config", config.arg()], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    fake.assert_no_violations();
    // What the pass read and wrote, as a table on stdout.
    let summary = String::from_utf8_lossy(&output.stdout);
    let row = summary
        .lines()
        .find(|line| line.trim_start().starts_with("mews-main"))
        .unwrap_or_else(|| panic!("no summary row: {summary}"));
    assert!(summary.contains("INSERTED"), "{summary}");
    assert!(
        row.split_whitespace().any(|cell| cell == "250"),
        "{summary}"
    );

    let output = run_binary(&["--config", config.arg(), "status", "--json"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status[0]["source"], "mews-main");
    assert_eq!(status[0]["state"], "succeeded");
    assert_eq!(status[0]["live_rows"], 250);
    assert_eq!(status[0]["deleted_rows"], 0);
    assert!(status[0]["last_success_at"].is_string());

    let output = run_binary(&["--config", config.arg(), "status"], &[]).await;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.trim_start().starts_with("SOURCE"), "{table}");
    assert!(
        table.contains("mews-main") && table.contains("250"),
        "{table}"
    );
}

#[tokio::test]
async fn one_failing_source_does_not_stop_the_others_and_exits_1() {
    let db = TestDb::new().await;
    let good = FakeMews::start().await.unwrap();
    good.generate(
        30,
        1,
        Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
        Utc::now(),
    );
    let bad = FakeMews::start().await.unwrap();
    bad.set_access_token("something-else");
    let mut text = mews_config(&db.url, "bad", &bad.base_url, "");
    let good_source = mews_config(&db.url, "good", &good.base_url, "");
    text.push_str(&good_source[good_source.find("[[sources]]").unwrap()..]);
    let config = write_config(&text);

    let output = run_binary(&["--config", config.arg(), "sync"], &[]).await;

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("bad") && message.contains("Invalid AccessToken."),
        "{message}"
    );
    assert!(
        !message.contains("something-else")
            && !message.contains(deptsync::fakes::mews::ACCESS_TOKEN)
    );
    let rows: i64 = db
        .scalar("SELECT count(*) FROM departments WHERE source = 'good'")
        .await;
    assert_eq!(rows, 30);

    let output = run_binary(&["--config", config.arg(), "check"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("bad: upstream answered 401"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let db = TestDb::new().await;
    let config = write_config(&mews_config(&db.url, "mews", "http://127.0.0.1:9", ""));
    for args in [
        vec!["sync", "--source", "nope"],
        vec!["sync", "--backfill", "--from", "2020-01-01T00:00:00Z"],
        vec![
            "sync",
            "--source",
            "mews",
            "--backfill",
            "--from",
            "2021-01-01T00:00:00Z",
            "--to",
            "2020-01-01T00:00:00Z",
        ],
        vec!["sync", "--from", "2020-01-01T00:00:00Z"],
    ] {
        let mut full = args.clone();
        full.extend(["--config", config.arg()]);
        let output = run_binary(&full, &[]).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[tokio::test]
async fn a_manual_backfill_through_the_binary() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(
        90,
        1,
        Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2021, 1, 1, 0, 0, 0).unwrap(),
    );
    let config = write_config(&mews_config(&db.url, "mews", &fake.base_url, ""));
    let args = [
        "--config",
        config.arg(),
        "sync",
        "--source",
        "mews",
        "--backfill",
        "--from",
        "2020-03-01T00:00:00Z",
        "--to",
        "2020-06-01T00:00:00Z",
    ];

    let output = run_binary(&args, &[]).await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    fake.assert_no_violations();
    let rows: i64 = db.scalar("SELECT count(*) FROM departments").await;
    let expected = fake
        .departments()
        .iter()
        .filter(|d| {
            d.updated >= Utc.with_ymd_and_hms(2020, 3, 1, 0, 0, 0).unwrap()
                && d.updated < Utc.with_ymd_and_hms(2020, 6, 1, 0, 0, 0).unwrap()
        })
        .count() as i64;
    assert_eq!(rows, expected);
}

#[tokio::test]
async fn status_exits_3_only_for_a_source_without_a_success_for_three_intervals() {
    let db = TestDb::new().await;
    let config = write_config(&mews_config(&db.url, "never-run", "http://127.0.0.1:9", ""));
    let status = || async {
        let output = run_binary(&["--config", config.arg(), "status", "--json"], &[]).await;
        let lines: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        (output.status.code(), lines[0].clone())
    };

    // Right after a deployment: nothing has run, nothing is late.
    let (code, line) = status().await;
    assert_eq!(code, Some(0), "{line}");
    assert_eq!(
        (&line["state"], &line["stale"]),
        (&"not run yet".into(), &false.into())
    );
    assert_eq!(line["schedule"], "0 */15 * * * *");
    assert!(line["next_run_at"].is_string());

    // The service has had it due since an hour ago (four intervals), and it never ran.
    use deptsync::store::Store;
    db.store.register(&["never-run".to_owned()]).await.unwrap();
    let (code, line) = status().await;
    assert_eq!(
        (code, &line["stale"]),
        (Some(0), &false.into()),
        "just registered: {line}"
    );
    sqlx::query("UPDATE sync_state SET registered_at = now() - interval '1 hour'")
        .execute(db.pool())
        .await
        .unwrap();
    let (code, line) = status().await;
    assert_eq!(code, Some(3), "{line}");
    assert_eq!(
        (&line["state"], &line["stale"]),
        (&"never run".into(), &true.into())
    );
}

#[tokio::test]
async fn a_manual_sync_takes_the_same_lease_as_the_service() {
    use deptsync::store::Store;

    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let config = write_config(&mews_config(&db.url, "mews", &fake.base_url, ""));
    let lease = db
        .store
        .try_lease("mews", deptsync::store::lease::DEFAULT_TTL)
        .await
        .unwrap()
        .expect("the lease is free");
    a_sync_skips_the_leased_source(config.arg(), &db.store, lease, &fake).await;
}

#[tokio::test]
async fn a_metrics_address_that_cannot_be_bound_exits_2() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = mews_config(&db.url, "mews", "http://127.0.0.1:9", "").replacen(
        "[[sources]]",
        &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n\n[[sources]]"),
        1,
    );
    let config = write_config(&text);

    let output = run_binary(&["run", "--config", config.arg()], &[]).await;

    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("daemon.metrics_listen"),
        "{}",
        stderr(&output)
    );
    drop(taken);
}

#[tokio::test]
async fn config_and_usage_messages_say_what_the_user_most_needs() {
    let hr = "[[sources]]\nname = \"hr\"\nkind = \"data_v1\"\nbase_url = \"https://hr.example.com\"\ntoken = \"t\"\n";
    /// The first error line of a run that must exit 2.
    async fn error_of_exit_2(args: &[&str]) -> String {
        let output = run_binary(args, &[]).await;
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        let text = stderr(&output);
        text.lines()
            .find(|line| line.starts_with("error"))
            .unwrap_or_default()
            .to_owned()
    }

    // A typo of a field every kind takes: the list names those too.
    let config = write_config(&format!("{hr}schedulee = \"0 * * * * *\"\n"));
    let line = error_of_exit_2(&["--config", config.arg(), "check"]).await;
    assert!(
        line.contains("schedulee") && line.contains("`schedule`"),
        "{line}"
    );
    assert!(
        line.contains("rate_limit") && line.contains("_file"),
        "{line}"
    );

    // A key given twice is named.
    let config = write_config(&hr.replace("token = \"t\"", "token = \"t\"\nname = \"again\""));
    let line = error_of_exit_2(&["--config", config.arg(), "check"]).await;
    assert!(
        line.contains("duplicate key") && line.contains("`name`"),
        "{line}"
    );
    assert!(!line.contains("again"), "values are never quoted: {line}");

    // A file name where a URL belongs: what was written, and the form expected.
    let config = write_config("[database]\nurl = \"deptsync.db\"\n");
    let line = error_of_exit_2(&["--config", config.arg(), "check"]).await;
    assert!(
        line.contains("\"deptsync.db\"") && line.contains("sqlite://deptsync.db"),
        "{line}"
    );

    // A config with no sources does not pass `check`.
    let dir = crate::helpers::TempDir::new();
    let empty = write_config(&format!(
        "[database]\nurl = \"{}\"\n",
        crate::helpers::sqlite_url(&dir.join("x.db"))
    ));
    let line = error_of_exit_2(&["--config", empty.arg(), "check"]).await;
    assert!(line.contains("no sources"), "{line}");

    // A bad --from shows the form expected.
    let config = write_config(&mews_config(
        &crate::helpers::sqlite_url(&dir.join("unused.db")),
        "mews",
        "http://127.0.0.1:9",
        "",
    ));
    let args = [
        "--config",
        config.arg(),
        "sync",
        "--source",
        "mews",
        "--backfill",
        "--from",
        "yesterday",
    ];
    let line = error_of_exit_2(&args).await;
    assert!(line.contains("2024-01-01T00:00:00Z"), "{line}");

    // --allow-mass-delete for a source that never deletes.
    let args = [
        "--config",
        config.arg(),
        "sync",
        "--source",
        "mews",
        "--allow-mass-delete",
    ];
    let line = error_of_exit_2(&args).await;
    assert!(line.contains("never deletes"), "{line}");
}
