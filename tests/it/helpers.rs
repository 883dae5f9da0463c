//! What every integration test needs: a database of its own, a source wired to a fake.

use std::time::Duration;

use deptsync::Settings;
use deptsync::model::{Ledger, WindowState};
use deptsync::sources::Connector;
use deptsync::sources::SourceSettings;
use deptsync::store::Backend;
use deptsync::store::postgres::{IfMissing, PgStore};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The PostgreSQL server tests use: `DATABASE_URL`, or the local one this project's
/// machines run (trust auth).
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The URL of `direct` (a test database's URL) through the PgBouncer in transaction
/// pooling mode that `scripts/ensure-pgbouncer` runs (`PGBOUNCER_ADDRESS`, default
/// 127.0.0.1:6432), with `pgbouncer=true`.
pub fn through_pgbouncer(direct: &str) -> String {
    let address = std::env::var("PGBOUNCER_ADDRESS")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "127.0.0.1:6432".to_owned());
    let mut url = reqwest::Url::parse(direct).unwrap();
    let (host, port) = address.rsplit_once(':').unwrap();
    url.set_host(Some(host)).unwrap();
    url.set_port(Some(port.parse().unwrap())).unwrap();
    url.query_pairs_mut().append_pair("pgbouncer", "true");
    url.to_string()
}

/// A database created for one test, migrated, and dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub store: PgStore,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let db = TestDb::unmigrated().await;
        db.store.migrate().await.unwrap();
        db
    }

    /// A database with no table yet.
    pub async fn unmigrated() -> TestDb {
        let server = server_url();
        let name = format!("deptsync_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server).await.unwrap_or_else(|e| {
            panic!("tests need PostgreSQL at {server} (set DATABASE_URL): {e}")
        });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        let mut url = reqwest::Url::parse(&server).unwrap();
        url.set_path(&name);
        let url = url.to_string();
        let store = PgStore::connect(&url.clone().into(), IfMissing::Fail)
            .await
            .unwrap();
        TestDb { name, url, store }
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.store.pool()
    }

    /// The one value `sql` selects.
    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async: drop the database from a thread with its own runtime.
        let name = self.name.clone();
        let server = server_url();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&server).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map(|_| ())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Waits up to `seconds` for `sql` (a number) to reach `at_least`.
pub async fn wait_for(db: &TestDb, sql: &str, at_least: i64, seconds: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(db.pool())
            .await
            .unwrap_or(0);
        if n >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql} stayed at {n}, wanted {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Midnight UTC of `y`-`m`-`d`.
pub fn at(y: i32, m: u32, d: u32) -> chrono::DateTime<chrono::Utc> {
    chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, y, m, d, 0, 0, 0).unwrap()
}

/// A one-window ledger and the checkpoint of its last page.
pub fn one_window() -> (deptsync::model::Checkpoint, deptsync::model::Checkpoint) {
    use deptsync::model::{Checkpoint, Ledger, LedgerWindow, RunMode, Window, WindowState};
    let window = Window {
        start: at(2019, 1, 1),
        end: at(2030, 1, 1),
    };
    let ledger = Checkpoint::Ledger(Ledger {
        until: window.end,
        backfill: None,
        windows: vec![LedgerWindow {
            window,
            state: WindowState::Pending,
        }],
    });
    let done = Checkpoint::Window {
        mode: RunMode::Incremental,
        window,
        cursor: None,
    };
    (ledger, done)
}

/// A config with `sources` (TOML `[[sources]]` tables) and the test's database.
pub fn config(database_url: &str, sources: &str) -> String {
    format!("[database]\nurl = \"{database_url}\"\n\n{sources}")
}

/// A config for one Mews source pointing at `base_url`.
pub fn mews_config(database_url: &str, name: &str, base_url: &str, extra: &str) -> String {
    // The tests share one fake token: without a budget of their own they would all queue
    // behind Mews' 180 requests per 30 s (the rate limit has a test of its own).
    let rate = if extra.contains("rate_limit") {
        ""
    } else {
        "rate_limit = \"1000/1s\""
    };
    let start = if extra.contains("start =") {
        ""
    } else {
        "start = \"2019-01-01T00:00:00Z\""
    };
    let source = format!(
        r#"
[[sources]]
name = "{name}"
kind = "mews"
base_url = "{base_url}"
client_token = "{client}"
access_token = "{access}"
{start}
{rate}
{extra}
"#,
        client = deptsync::fakes::mews::CLIENT_TOKEN,
        access = deptsync::fakes::mews::ACCESS_TOKEN,
    );
    config(database_url, &source)
}

/// Asserts that `rerun` (the requests of the pass after an interrupted one) resumed
/// `ledger`, the interrupted pass's windows: each window in progress first asked for at its
/// saved cursor, each pending one from its start, none that was done asked for again.
pub fn assert_resumed(ledger: &Ledger, rerun: &[deptsync::fakes::mews::RecordedRequest]) {
    assert!(
        ledger.outstanding().next().is_some(),
        "the interrupted pass left nothing to resume"
    );
    for entry in &ledger.windows {
        let first = rerun.iter().find(|r| r.window == Some(entry.window));
        let expected = match &entry.state {
            WindowState::Done => {
                assert!(first.is_none(), "window {} was read again", entry.window);
                continue;
            }
            WindowState::InProgress { cursor } => Some(cursor),
            WindowState::Pending => None,
        };
        let first = first.unwrap_or_else(|| panic!("window {} was not resumed", entry.window));
        assert_eq!(
            first.cursor.as_ref(),
            expected,
            "window {} resumed at the wrong cursor",
            entry.window
        );
    }
}

/// Validated settings and the connector of their first source.
pub fn connector(toml: &str) -> (SourceSettings, Connector) {
    let env = |_: &str| None;
    let mut settings = Settings::parse(toml, &env).unwrap();
    let source = settings.sources.remove(0);
    let connector = Connector::new(&source).unwrap();
    (source, connector)
}

/// Returns once `departments` holds at least `rows` rows (a pass under way got that far).
pub async fn stored_at_least(pool: &sqlx::PgPool, rows: i64) {
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM departments")
            .fetch_one(pool)
            .await
            .unwrap();
        if stored >= rows {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One pass of the first source of `toml` into `db`, its error as the chain of causes.
pub async fn pass(
    db: &TestDb,
    toml: &str,
    request: deptsync::engine::PassRequest,
) -> Result<deptsync::engine::PassReport, String> {
    let (settings, source) = connector(toml);
    deptsync::engine::run_pass(
        settings.name.as_str(),
        &source,
        &db.store,
        request,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .map_err(|e| deptsync::engine::error_chain(&e))
}

/// Runs the real binary with `args` and the environment given, waiting at most a minute.
pub async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    run_binary_in(&std::env::current_dir().unwrap(), args, env).await
}

/// What a run of the binary wrote to stderr.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// While `lease` (the lease of source "mews", taken as the service would) is held, `sync`
/// with `config` skips the source without asking `fake` anything and exits 1; once
/// `store` frees it, the same `sync` succeeds.
pub async fn a_sync_skips_the_leased_source<St: deptsync::store::Store>(
    config: &str,
    store: &St,
    lease: deptsync::store::Lease,
    fake: &deptsync::fakes::mews::FakeMews,
) {
    let output = run_binary(&["--config", config, "sync"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("another process is syncing"),
        "{}",
        stderr(&output)
    );
    assert!(fake.requests().is_empty());
    store
        .release(&lease, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();
    let output = run_binary(&["--config", config, "sync"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

/// A directory of one test's own under the system's temporary directory, removed with
/// everything in it when the test ends.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("deptsync-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&path).unwrap();
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The `sqlite://` URL of the file at `path`.
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

/// What keeps a [`TestStore`]'s database alive, and removes it at the end.
enum Backing {
    Postgres(#[allow(dead_code)] TestDb),
    Sqlite(#[allow(dead_code)] TempDir),
}

/// A department of scope "scope", its record as the vendor sent it.
pub fn department(
    id: &str,
    name: &str,
    updated: Option<chrono::DateTime<chrono::Utc>>,
) -> deptsync::model::Department {
    deptsync::model::Department {
        external_id: id.to_owned(),
        scope_id: Some("scope".to_owned()),
        name: name.to_owned(),
        is_active: true,
        parent_external_id: None,
        source_created_at: None,
        source_updated_at: updated,
        raw: deptsync::model::RawRecord::from_value(&serde_json::json!({ "id": id, "name": name })),
    }
}

/// The lease of `source` and an incremental run under it.
pub async fn locked_run(
    store: &deptsync::store::AnyStore,
    source: &str,
) -> (deptsync::store::Lease, deptsync::model::RunId) {
    use deptsync::store::Store;
    let mut lease = store
        .try_lease(source, deptsync::store::lease::DEFAULT_TTL)
        .await
        .unwrap()
        .expect("the lease is free");
    let run = store
        .start_run(&mut lease, deptsync::model::RunMode::Incremental)
        .await
        .unwrap();
    (lease, run)
}

/// Runs each named case (an `async fn(TestStore)`) once on each store, as
/// `<module>::<case>::postgres` and `<module>::<case>::sqlite`, so that they cannot drift.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test]
                async fn postgres() {
                    super::$case(crate::helpers::TestStore::postgres().await).await;
                }

                #[tokio::test]
                async fn sqlite() {
                    super::$case(crate::helpers::TestStore::sqlite().await).await;
                }
            }
        )*
    };
}
pub(crate) use on_both_stores;

/// A store of either kind, migrated and empty, for the behaviour both kinds must share;
/// gone when the test ends.
pub struct TestStore {
    pub store: deptsync::store::AnyStore,
    /// Where the database is.
    pub url: String,
    // After `store`: fields drop in order, the pool before its database.
    _backing: Backing,
}

impl TestStore {
    /// On a PostgreSQL database of its own (a [`TestDb`]).
    pub async fn postgres() -> TestStore {
        let db = TestDb::new().await;
        TestStore {
            store: deptsync::store::AnyStore::Postgres(db.store.clone()),
            url: db.url.clone(),
            _backing: Backing::Postgres(db),
        }
    }

    /// On an SQLite file in a directory of its own, opened as the commands open it.
    pub async fn sqlite() -> TestStore {
        TestStore::open_sqlite(TempDir::new()).await
    }

    /// The SQLite file `deptsync.db` in `dir`, opened (created, migrated) as the commands
    /// open it.
    async fn open_sqlite(dir: TempDir) -> TestStore {
        let url = sqlite_url(&dir.join("deptsync.db"));
        let store = deptsync::store::AnyStore::open(&url.clone().into())
            .await
            .unwrap();
        TestStore {
            store,
            url,
            _backing: Backing::Sqlite(dir),
        }
    }

    /// The same database opened again, as another process (another replica) opens it:
    /// it holds leases under a name of its own.
    pub async fn another(&self) -> deptsync::store::AnyStore {
        deptsync::store::AnyStore::open(&self.url.clone().into())
            .await
            .unwrap()
    }

    /// The integer `sql` selects (SQL both kinds speak), of its first row.
    pub async fn count(&self, sql: &str) -> i64 {
        let rows = self.scalars::<i64>(sql).await;
        *rows.first().unwrap_or_else(|| panic!("{sql}: no row"))
    }

    /// The text `sql` selects, if any row.
    pub async fn text(&self, sql: &str) -> Option<String> {
        use deptsync::store::AnyStore;
        match &self.store {
            AnyStore::Postgres(store) => sqlx::query_scalar(sql).fetch_optional(store.pool()).await,
            AnyStore::Sqlite(store) => sqlx::query_scalar(sql).fetch_optional(store.pool()).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs `sql`, one or more statements.
    pub async fn execute(&self, sql: &str) {
        use deptsync::store::AnyStore;
        match &self.store {
            AnyStore::Postgres(store) => sqlx::raw_sql(sql).execute(store.pool()).await.map(drop),
            AnyStore::Sqlite(store) => sqlx::raw_sql(sql).execute(store.pool()).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A store whose database an older deptsync made: migrated with the migrations before
    /// `version` only, `setup` (SQL) run in it, and then opened as the service opens it,
    /// which applies the rest.
    pub async fn upgraded(postgres: bool, version: i64, setup: &str) -> TestStore {
        let before = |mut migrator: sqlx::migrate::Migrator| {
            let older: Vec<_> = migrator
                .migrations
                .iter()
                .filter(|m| m.version < version)
                .cloned()
                .collect();
            migrator.migrations = older.into();
            migrator
        };
        if postgres {
            let db = TestDb::unmigrated().await;
            before(sqlx::migrate!("migrations/postgres"))
                .run(db.pool())
                .await
                .unwrap();
            sqlx::raw_sql(setup).execute(db.pool()).await.unwrap();
            db.store.migrate().await.unwrap();
            return TestStore {
                store: deptsync::store::AnyStore::Postgres(db.store.clone()),
                url: db.url.clone(),
                _backing: Backing::Postgres(db),
            };
        }
        let dir = TempDir::new();
        let url = sqlite_url(&dir.join("deptsync.db"));
        let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        before(sqlx::migrate!("migrations/sqlite"))
            .run(&pool)
            .await
            .unwrap();
        sqlx::raw_sql(setup).execute(&pool).await.unwrap();
        pool.close().await;
        TestStore::open_sqlite(dir).await
    }

    /// The instants `sql` selects, one per row.
    pub async fn instants(&self, sql: &str) -> Vec<Option<chrono::DateTime<chrono::Utc>>> {
        self.scalars(sql).await
    }

    /// The one column `sql` selects, one value per row (of a type both kinds decode).
    pub async fn scalars<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>
            + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>
            + Send
            + Unpin,
    {
        use deptsync::store::AnyStore;
        match &self.store {
            AnyStore::Postgres(store) => sqlx::query_scalar(sql).fetch_all(store.pool()).await,
            AnyStore::Sqlite(store) => sqlx::query_scalar(sql).fetch_all(store.pool()).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// Runs the real binary in `dir` (its working directory) with `args` and the environment
/// given, waiting at most a minute.
pub async fn run_binary_in(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_deptsync"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("deptsync did not finish within a minute")
        .unwrap()
}

/// The README's PostgreSQL queries: every ```sql block.
pub fn readme_sql_blocks() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match (&mut block, line.trim_start()) {
            (None, "```sql") => block = Some(String::new()),
            (Some(text), "```") => {
                blocks.push(std::mem::take(text));
                block = None;
            }
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Where a change-feed token stands in its feed: the number after its feed's id (what a
/// `NOTIFY` listener compares with a writing transaction's id).
pub fn token_position(token: deptsync::model::FeedToken) -> i64 {
    let text = token.to_string();
    let (_, position) = text.split_once(':').unwrap_or(("", &text));
    position.parse().unwrap()
}
