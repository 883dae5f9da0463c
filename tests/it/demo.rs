//! `deptsync demo` end to end: the real binary, its simulated APIs, and the database it
//! leaves behind (SQLite and PostgreSQL); `demo --serve` and a `sync` against it.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use deptsync::demo::SERVE_CONFIG_END;
use deptsync::store::{AnyStore, Backend, IfMissing};

use crate::helpers::{TempDir, TestDb, run_binary_in, sqlite_url};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The integer `sql` selects, on either kind of store.
async fn count(store: &AnyStore, sql: &str) -> i64 {
    match store {
        AnyStore::Postgres(store) => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
        AnyStore::Sqlite(store) => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Asserts what the demo leaves in the database at `url`: every simulated API synced
/// twice, the second pass reading (Mews) or writing (listings) only the changes.
async fn assert_demo_rows(url: &str) {
    let store = AnyStore::connect(&url.to_owned().into(), IfMissing::Fail)
        .await
        .unwrap();
    let total = count(&store, "SELECT count(*) FROM departments").await;
    assert!((2_000..5_000).contains(&total), "{total} departments");
    for source in ["demo-mews", "demo-procurify", "demo-snapbooks", "demo-hr"] {
        let rows = count(
            &store,
            &format!("SELECT count(*) FROM departments WHERE source = '{source}'"),
        )
        .await;
        assert!(rows > 200, "{source}: {rows} rows");
        let runs = count(
            &store,
            &format!(
                "SELECT count(*) FROM sync_runs WHERE source = '{source}' AND status = 'succeeded'"
            ),
        )
        .await;
        assert_eq!(runs, 2, "{source}: two passes, both succeeded");
        let last = |column: &str| {
            format!(
                "SELECT {column} FROM sync_runs WHERE source = '{source}' \
                 ORDER BY started_at DESC LIMIT 1"
            )
        };
        let written = count(&store, &last("inserted + updated + deleted")).await;
        assert!(
            (1..=30).contains(&written),
            "{source}: the second pass wrote {written} rows"
        );
        if source == "demo-mews" {
            let fetched = count(&store, &last("fetched")).await;
            assert!(fetched < 50, "the second Mews pass read {fetched} records");
        } else {
            let unchanged = count(&store, &last("unchanged")).await;
            assert!(
                unchanged > 200,
                "{source}: the second listing left {unchanged} rows alone"
            );
        }
    }
    // One department is gone from each of two listings, deleted by a confirming listing.
    let deleted = |source: &str| {
        format!(
            "SELECT count(*) FROM departments WHERE source = '{source}' AND deleted_at IS NOT NULL"
        )
    };
    assert_eq!(count(&store, &deleted("demo-procurify")).await, 1);
    assert_eq!(count(&store, &deleted("demo-hr")).await, 1);
    assert_eq!(count(&store, &deleted("demo-mews")).await, 0);
    assert_eq!(count(&store, &deleted("demo-snapbooks")).await, 0);
    let renamed = count(
        &store,
        "SELECT count(*) FROM departments WHERE source = 'demo-mews' AND name = 'Spa & Wellness'",
    )
    .await;
    assert_eq!(renamed, 3);
    let inactive = count(
        &store,
        "SELECT count(*) FROM departments WHERE source = 'demo-snapbooks' AND NOT is_active",
    )
    .await;
    assert!(inactive > 0);
    let roots = count(
        &store,
        "SELECT count(*) FROM departments WHERE source = 'demo-hr' AND parent_external_id IS NULL",
    )
    .await;
    assert_eq!(roots, 1, "the data API's tree has one root");
}

fn assert_report(stdout: &str) {
    for expected in [
        "Pass 1",
        "Pass 2",
        "Upstream changes",
        // The status table and the sample query's result.
        "LAST SUCCESS",
        "A query over `departments`",
        "last_changed (UTC)",
        // What the change feed gave after pass 2, and the token to read on from.
        "`deptsync changes --since ",
        "  next: ",
        "demo-mews",
        "demo-procurify",
        "demo-snapbooks",
        "demo-hr",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

#[tokio::test]
async fn the_demo_syncs_into_the_sqlite_file_it_is_given_and_leaves_others_alone() {
    let dir = TempDir::new();
    // The default demo file: a database the user named must leave it untouched.
    std::fs::write(dir.join("deptsync-demo.db"), "not the demo's").unwrap();
    let url = sqlite_url(&dir.join("mine.db"));

    let output = run_binary_in(&dir.path, &["demo", "--database", &url], &[]).await;

    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert_report(&stdout);
    assert!(stdout.contains("sqlite3 "), "{stdout}");
    // A renamed department's history: its first version, then the new name from the
    // vendor's update time, current.
    let history = stdout
        .split("Its history")
        .nth(1)
        .unwrap_or_else(|| panic!("no history in:\n{stdout}"));
    let lines: Vec<&str> = history.lines().skip(1).take(2).collect();
    assert!(lines[0].contains("  Spa  (active)"), "{history}");
    assert!(
        lines[1].contains(".. now") && lines[1].contains("Spa & Wellness"),
        "{history}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("deptsync-demo.db")).unwrap(),
        "not the demo's"
    );
    assert_demo_rows(&url).await;
}

#[tokio::test]
async fn without_a_database_the_demo_makes_its_file_afresh_in_the_working_directory() {
    let dir = TempDir::new();
    // What a previous demo might have left, unreadable as a database: removed first.
    for name in [
        "deptsync-demo.db",
        "deptsync-demo.db-wal",
        "deptsync-demo.db-shm",
    ] {
        std::fs::write(dir.join(name), "left over").unwrap();
    }

    let output = run_binary_in(&dir.path, &["demo"], &[]).await;

    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert_report(&stdout);
    assert!(stdout.contains("made afresh"), "{stdout}");
    assert!(
        stdout.contains("sqlite3 -readonly deptsync-demo.db \"SELECT"),
        "{stdout}"
    );
    assert_demo_rows(&sqlite_url(&dir.join("deptsync-demo.db"))).await;
}

#[tokio::test]
async fn the_demo_syncs_into_postgresql_too() {
    let db = TestDb::new().await;
    let dir = TempDir::new();

    let output = run_binary_in(&dir.path, &["demo", "--database", &db.url], &[]).await;

    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_report(&text(&output.stdout));
    assert!(text(&output.stdout).contains("psql "));
    assert_demo_rows(&db.url).await;
    assert!(
        !dir.join("deptsync-demo.db").exists(),
        "no SQLite file beside a PostgreSQL demo"
    );
}

#[tokio::test]
async fn a_database_url_the_demo_cannot_use_exits_2() {
    let dir = TempDir::new();
    let output = run_binary_in(&dir.path, &["demo", "--database", "mysql://x"], &[]).await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("--database"));
}

/// A child process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn demo_serve_continues_the_demos_world_and_a_sync_deletes_nothing() {
    let dir = TempDir::new();
    // The demo first; then --serve pointed at its database, as a person tries next.
    let demo = run_binary_in(&dir.path, &["demo"], &[]).await;
    assert_eq!(demo.status.code(), Some(0), "{}", text(&demo.stderr));
    let world_after_demo = demo_world(&dir).await.0;
    let url = sqlite_url(&dir.join("deptsync-demo.db"));
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_deptsync"))
            .args(["demo", "--serve", "--database", &url])
            .current_dir(&dir.path)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = server.0.stdout.take().unwrap();
    // Read up to the config's last line; the server keeps serving after it.
    let reading = tokio::task::spawn_blocking(move || {
        let mut config = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            config.push_str(&line);
            config.push('\n');
            if line == SERVE_CONFIG_END {
                return config;
            }
        }
        panic!("the config ended early:\n{config}");
    });
    let config = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("demo --serve printed no config within 30 s")
        .unwrap();
    assert!(config.contains(&url), "{config}");
    let config_path = dir.join("demo.toml");
    std::fs::write(&config_path, &config).unwrap();
    let config_arg = config_path.to_str().unwrap();

    let output = run_binary_in(&dir.path, &["--config", config_arg, "sync"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let output = run_binary_in(
        &dir.path,
        &["--config", config_arg, "status", "--json"],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let sources = status.as_array().unwrap();
    assert_eq!(sources.len(), 4, "{status}");
    for source in sources {
        assert_eq!(source["state"], "succeeded", "{source}");
        assert!(source["live_rows"].as_i64().unwrap() > 200, "{source}");
    }
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the server still serves"
    );
    drop(server);
    // Nothing deleted, nothing the demo changed reverted.
    let world_after_sync = demo_world(&dir).await.0;
    let moved: Vec<_> = world_after_sync
        .iter()
        .filter(|row| !world_after_demo.contains(row))
        .take(5)
        .collect();
    assert!(
        moved.is_empty() && world_after_sync.len() == world_after_demo.len(),
        "the sync after --serve changed the demo's world: {moved:?}"
    );
}

/// The SQL of every `sqlite3 … "SQL"` command in the README's shell blocks.
fn readme_sqlite3_commands() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let mut commands = Vec::new();
    let mut open: Option<String> = None;
    for line in readme.lines() {
        if let Some(sql) = &mut open {
            sql.push('\n');
            match line.find('"') {
                Some(end) => {
                    sql.push_str(&line[..end]);
                    commands.push(std::mem::take(sql));
                    open = None;
                }
                None => sql.push_str(line),
            }
            continue;
        }
        let Some(rest) = line.trim_start().strip_prefix("sqlite3 ") else {
            continue;
        };
        let Some(start) = rest.find('"') else {
            continue;
        };
        let after = &rest[start + 1..];
        match after.find('"') {
            Some(end) => commands.push(after[..end].to_owned()),
            None => open = Some(after.to_owned()),
        }
    }
    commands
}

#[tokio::test]
async fn every_query_the_readme_shows_runs_on_the_demos_databases() {
    // The SQLite translations the README gives, applied as it says.
    let readme = include_str!("../../README.md");
    let to_sqlite = [
        (
            "now() - interval '1 day'",
            "strftime('%Y-%m-%dT%H:%M:%S', 'now', '-1 day')",
        ),
        ("name::text", "name"),
        (
            "finished_at - started_at",
            "(julianday(finished_at) - julianday(started_at)) * 86400",
        ),
    ];
    for (postgres, sqlite) in to_sqlite {
        assert!(
            readme.contains(postgres) && readme.contains(sqlite),
            "{sqlite}"
        );
    }
    let blocks = crate::helpers::readme_sql_blocks();
    assert!(!blocks.is_empty());
    let sqlite3_commands = readme_sqlite3_commands();
    assert!(sqlite3_commands.len() >= 3, "{sqlite3_commands:?}");

    let db = TestDb::new().await;
    let dir = TempDir::new();
    for args in [&["demo", "--database", db.url.as_str()][..], &["demo"][..]] {
        let output = run_binary_in(&dir.path, args, &[]).await;
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    }
    let sqlite = demo_file(&dir).await;

    let mut failures = Vec::new();
    for block in &blocks {
        if let Err(e) = sqlx::raw_sql(block).execute(db.pool()).await {
            failures.push(format!("PostgreSQL: {e}\n{block}"));
        }
        let translated = to_sqlite
            .iter()
            .fold(block.clone(), |sql, (from, to)| sql.replace(from, to));
        if let Err(e) = sqlx::raw_sql(&translated).execute(sqlite.pool()).await {
            failures.push(format!("SQLite: {e}\n{translated}"));
        }
    }
    for command in &sqlite3_commands {
        if let Err(e) = sqlx::raw_sql(command).execute(sqlite.pool()).await {
            failures.push(format!("sqlite3: {e}\n{command}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
    // And they find the demo's rows, not an empty table.
    let tree: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM departments WHERE source = 'demo-hr' AND parent_external_id IS NULL",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(tree > 0);
}

/// The demo's SQLite file in `dir`, open as a store.
async fn demo_file(dir: &TempDir) -> deptsync::store::sqlite::SqliteStore {
    let store = AnyStore::connect(
        &sqlite_url(&dir.join("deptsync-demo.db")).into(),
        IfMissing::Fail,
    )
    .await
    .unwrap();
    let AnyStore::Sqlite(store) = store else {
        panic!("the demo's file is SQLite")
    };
    store
}

/// The demo's departments that its second pass did not change, and every department's
/// identity and state, from the demo file in `dir`.
async fn demo_world(dir: &TempDir) -> (Vec<(String, String, String, bool, bool)>, Vec<String>) {
    let store = demo_file(dir).await;
    let rows = sqlx::query_as(
        "SELECT source, external_id, name, is_active, deleted_at IS NULL FROM departments
         ORDER BY source, external_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let unchanged = sqlx::query_scalar(
        // Those the first pass stored and the second left alone (the demo's changes are
        // made at the time of the run).
        "SELECT raw FROM departments d WHERE last_changed_at = first_synced_at
           AND first_synced_at <= (SELECT min(finished_at) FROM sync_runs r
                                   WHERE r.source = d.source)
         ORDER BY source, external_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    (rows, unchanged)
}

#[tokio::test]
async fn the_demo_gives_the_same_world_on_every_run() {
    let (first, second) = (TempDir::new(), TempDir::new());
    for dir in [&first, &second] {
        let output = run_binary_in(&dir.path, &["demo"], &[]).await;
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        // Apart in time: the world must not move with the clock.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (first, second) = (demo_world(&first).await, demo_world(&second).await);
    assert_eq!(first.0, second.0);
    // Mews' 1,580 among them: the records with update times.
    assert!(first.1.len() > 2500, "{}", first.1.len());
    assert!(
        first.1 == second.1,
        "the records the vendors send differ between runs"
    );
}

#[tokio::test]
async fn the_demo_never_removes_a_database_a_running_deptsync_holds() {
    let dir = TempDir::new();
    let output = run_binary_in(&dir.path, &["demo"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    // A deptsync process has the file open (as `run` would).
    let held = demo_file(&dir).await;

    let again = run_binary_in(&dir.path, &["demo"], &[]).await;

    assert_ne!(again.status.code(), Some(0));
    assert!(
        text(&again.stderr).contains("in use"),
        "{}",
        text(&again.stderr)
    );
    assert!(
        held.ping().await.is_ok(),
        "the held database is still there"
    );
    drop(held);
    let after = run_binary_in(&dir.path, &["demo"], &[]).await;
    assert_eq!(after.status.code(), Some(0), "{}", text(&after.stderr));
}
