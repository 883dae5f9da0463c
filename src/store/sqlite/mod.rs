//! The SQLite store: one file beside the binary, the embedded default.
//!
//! The same tables (`migrations/sqlite/`) and the same guarantees as PostgreSQL; where
//! SQLite differs, this module makes up for it:
//!
//! - **Writers queue, never fail half way.** Every write transaction begins with
//!   `BEGIN IMMEDIATE`, which takes SQLite's one write lock at once, waiting up to
//!   [`BUSY_TIMEOUT`] while another connection or process holds it (a deferred transaction
//!   that read first could only give up when it came to write). The journal is a WAL, so
//!   readers (`status`, the next page's state) never wait for the writer, and a process
//!   killed at any moment leaves the file whole.
//! - **Timestamps are text.** RFC 3339 in UTC with six fractional digits, one fixed width,
//!   so comparing and ordering the text compares and orders the instants. A transaction
//!   takes its instant once, after it holds the write lock (PostgreSQL's `now()`), so one
//!   commit's instants never precede an earlier commit's.
//! - **Leases are rows of the file**, as on PostgreSQL (see [`super::lease`]): every
//!   process that opens it (the service, a manual `sync`) follows the same rules, with
//!   one writer at a time. Beside the file are only two lock files: one that migrations
//!   take, and one every process with the database open holds shared (so the demo can
//!   tell it is in use). They sit beside the database's real path (symlinks resolved);
//!   an existing one is opened read-only (`flock` needs no more), so one left by another
//!   user (root running a manual `sync`) serves every user who can read it.
//! - **No `md5()` in SQLite:** `rejected_records.payload_md5` is computed here, the same
//!   hex digest PostgreSQL's generated column holds.

mod locks;
mod page;

pub use locks::lock_unused;
use locks::{in_use_lock_path, migration_lock_path, open_lock_file};
use page::SqliteTx;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteSynchronous};

use super::any::Backend;
use super::checkpoint;
use super::history::{self, FeedQueries};
use super::lease::{self, Lease, PassEnd};
use super::statements;
use super::{Commit, IfMissing, Limits, Store, StoreError, db};
use crate::model::{PageCounts, RunId, RunMode, RunOutcome, SourceStatus, SyncState};

/// deptsync's SQLite migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// `status`: the configured names (`$1`, a JSON array), then the statement both backends
/// share.
const STATUS: &str = concat!(
    "WITH names AS (\n    SELECT value AS source FROM json_each($1)\n",
    include_str!("../queries/status.sql")
);
/// Registers the sources `$1` (a JSON array) at the instant `$2` (see
/// `statements::register`).
const REGISTER: &str = "INSERT INTO sync_state AS s (source, registered_at, updated_at)
     SELECT value, $2, $2 FROM json_each($1) WHERE true
     ON CONFLICT (source) DO UPDATE SET
         registered_at = COALESCE(s.registered_at, excluded.registered_at)";

/// How long a write waits for another writer (another source's page, another process)
/// before it fails.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How a write transaction begins: with the write lock (see the module's docs).
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// The file an `sqlite:` URL names (relative to the working directory unless absolute),
/// or why it names none. Does no I/O.
pub fn database_path(url: &str) -> Result<PathBuf, String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| "is not an SQLite URL (sqlite://path/to/file.db)".to_owned())?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|p| p == "mode=memory") {
        return Err(
            "names no file: deptsync keeps its data in an SQLite file, e.g. \
             sqlite://deptsync.db (relative to the working directory) or \
             sqlite:///var/lib/deptsync/deptsync.db"
                .to_owned(),
        );
    }
    let options = SqliteConnectOptions::from_str(url).map_err(|e| format!("is not usable: {e}"))?;
    Ok(options.get_filename().to_owned())
}

/// An instant as the SQLite tables keep it: RFC 3339, UTC, fixed width.
fn stamp(instant: DateTime<Utc>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A store in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection whose commits sync the write-ahead log to disk (`synchronous =
    /// FULL`; the pool's, `NORMAL`, leave that to checkpoints): for the writes that must
    /// be on disk when they return, and every commit before them with them. Opened when
    /// first used (by a change-feed reader), beside the pool's `max_connections`.
    durable: SqlitePool,
    /// The shared lock on [`in_use_lock_path`], held while the store is open.
    _in_use: Arc<File>,
    /// The bound on every call through [`crate::store::AnyStore`].
    pub(super) call_timeout: Duration,
    /// The database file, beside which the lock files are.
    path: Arc<Path>,
    /// The name this store holds leases under.
    holder: Arc<str>,
}

impl SqliteStore {
    /// A transaction on a connection of the pool, begun with `begin` ([`BEGIN_WRITE`] to
    /// write).
    async fn begin(&self, begin: &'static str) -> Result<SqliteTx<'static>, StoreError> {
        begin_on(&self.pool, begin).await
    }

    /// The pool, for SQL of a reader's own: the demo's sample query and the tests.
    #[cfg(feature = "demo")]
    #[doc(hidden)]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// A transaction on a connection of `pool`, begun with `begin`.
async fn begin_on(pool: &SqlitePool, begin: &'static str) -> Result<SqliteTx<'static>, StoreError> {
    let tx = pool
        .begin_with(begin)
        .await
        .map_err(db("opening a transaction"))?;
    Ok(SqliteTx::new(tx))
}

/// The transaction's instant, taken once it holds the write lock.
fn now() -> String {
    stamp(Utc::now())
}

impl Backend for SqliteStore {
    const NAME: &'static str = "sqlite";

    fn claims(url: &str) -> Option<Result<(), String>> {
        url.starts_with("sqlite:")
            .then(|| database_path(url).map(|_| ()))
    }

    /// Opens the database file `url` names; with [`IfMissing::Create`], creates it when
    /// missing (not its directory). Every call through [`crate::store::AnyStore`] is bounded
    /// after `statement_timeout` (with the margin of [`super::call_timeout`]).
    async fn connect_with(
        url: &SecretString,
        if_missing: IfMissing,
        limits: &Limits,
    ) -> Result<Self, StoreError> {
        let path = database_path(url.expose_secret()).map_err(StoreError::Url)?;
        if !path.exists() {
            if if_missing == IfMissing::Fail {
                return Err(StoreError::Missing { path });
            }
            if let Some(directory) = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
            {
                return Err(StoreError::NoDirectory {
                    directory: directory.to_owned(),
                });
            }
            tracing::info!(path = %path.display(), "database file does not exist; creating it");
        }
        let options = SqliteConnectOptions::from_str(url.expose_secret())
            .map_err(db("parsing the database url"))?
            .create_if_missing(if_missing == IfMissing::Create)
            .busy_timeout(BUSY_TIMEOUT)
            // Safe in WAL mode: a power cut may lose the last commits, never the file.
            .synchronous(SqliteSynchronous::Normal);
        // Waiting for a free connection is bounded by the call it is for, never cut
        // shorter by the pool.
        let acquire_timeout = super::call_timeout(limits.statement_timeout) * 2;
        let durable = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options.clone().synchronous(SqliteSynchronous::Full));
        let pool = SqlitePoolOptions::new()
            .max_connections(limits.max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(db("opening the database file"))?;
        // The file exists now. Its lock files go beside its real path: a second name for
        // it (a symlink to the file or to its directory) must not give a second lock.
        let path = std::fs::canonicalize(&path)
            .map_err(|source| StoreError::DatabasePath { path, source })?;
        // Held shared as long as this store is open: whoever would remove the file (the
        // demo making its own afresh) can tell that a deptsync process uses it.
        // (Shared locks wait only for the demo's brief exclusive check.)
        let in_use = in_use_lock_path(&path);
        let open = tokio::task::spawn_blocking({
            let in_use = in_use.clone();
            move || open_lock_file(&in_use).and_then(|file| file.lock_shared().map(|()| file))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|locked| locked)
        .map_err(|source| StoreError::LockFile {
            path: in_use,
            source,
        })?;
        Ok(SqliteStore {
            pool,
            durable,
            _in_use: Arc::new(open),
            call_timeout: super::call_timeout(limits.statement_timeout),
            path: path.into(),
            holder: lease::new_holder(),
        })
    }

    /// Switches the file to WAL and applies the migrations that have not run yet, one
    /// process at a time: SQLite's migrator takes no lock of its own, and two processes
    /// starting on a new file at once would both apply the first migration.
    async fn migrate(&self) -> Result<(), StoreError> {
        let path = migration_lock_path(&self.path);
        let lock = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_lock_file(&path).and_then(|file| file.lock().map(|()| file))
        })
        .await
        .map_err(|e| StoreError::LockFile {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| StoreError::LockFile { path, source })?;
        // Persistent: set once, every later connection finds the file in WAL mode. SQLite
        // answers with the mode the file is in after the switch, which is not WAL when it
        // refused to switch (a file opened immutable, a VFS without shared memory).
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
            .fetch_one(&self.pool)
            .await
            .map_err(db("switching the database to WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: self.path.to_path_buf(),
                mode,
            });
        }
        let migrated = MIGRATOR.run(&self.pool).await;
        drop(lock);
        Ok(migrated?)
    }

    type Reader = SqliteTx<'static>;

    async fn read(&self) -> Result<SqliteTx<'static>, StoreError> {
        self.begin("BEGIN").await
    }

    type Writer = SqliteTx<'static>;

    async fn write(&self) -> Result<SqliteTx<'static>, StoreError> {
        self.begin(BEGIN_WRITE).await
    }

    async fn durable_write(&self) -> Result<SqliteTx<'static>, StoreError> {
        begin_on(&self.durable, BEGIN_WRITE).await
    }

    fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    fn holder(&self) -> &Arc<str> {
        &self.holder
    }
}

impl FeedQueries for SqliteStore {
    // The clock a reader sees is the last committed page transaction's number (its
    // versions committed with it, one writer at a time): every position up to it is
    // final.
    const FEED_HORIZON: &'static str = "SELECT position + 1 AS horizon FROM feed_clock";
    // A copy of the file cannot be told from the file: the row is always its own.
    const FEED_IDENTITY: &'static str = "SELECT feed_id, handed_out, 1 AS bound FROM feed_identity";
    const REBIND_FEED: &'static str = "UPDATE feed_identity SET feed_id = $1, handed_out = 0";
    const READ_FEED: &'static str = include_str!("queries/read_feed.sql");
}

impl Store for SqliteStore {
    async fn try_lease(&self, source: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        lease::take(self.write().await?, &self.holder, source, ttl).await
    }

    async fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
        lease::renew(self.write().await?, lease).await
    }

    async fn release(&self, lease: &Lease, end: PassEnd) -> Result<(), StoreError> {
        lease::release(self.write().await?, lease, end).await
    }

    async fn clock(&self) -> Result<DateTime<Utc>, StoreError> {
        statements::clock(self.read().await?).await
    }

    async fn load_state(&self, source: &str) -> Result<SyncState, StoreError> {
        statements::load_state(self.read().await?, source).await
    }

    async fn start_run(&self, lease: &mut Lease, mode: RunMode) -> Result<RunId, StoreError> {
        statements::start_run(self.write().await?, lease, mode).await
    }

    async fn set_scope(
        &self,
        lease: &mut Lease,
        scope: Option<&str>,
        reset: Option<&str>,
    ) -> Result<(), StoreError> {
        checkpoint::set_scope(self.write().await?, lease, scope, reset).await
    }

    async fn commit_page(
        &self,
        lease: &mut Lease,
        page: &Commit<'_>,
    ) -> Result<PageCounts, StoreError> {
        checkpoint::commit_page(self.write().await?, lease, page).await
    }

    async fn register(&self, sources: &[String]) -> Result<(), StoreError> {
        statements::register(self.begin(BEGIN_WRITE).await?, REGISTER, sources).await
    }

    async fn finish_run(&self, run: RunId, outcome: &RunOutcome) -> Result<(), StoreError> {
        // Its instant is taken once it holds the write lock, like every write's.
        statements::finish_run(self.begin(BEGIN_WRITE).await?, run, outcome).await
    }

    async fn trim_history(&self, source: &str, retention: Duration) -> Result<u64, StoreError> {
        history::trim(self.begin(BEGIN_WRITE).await?, source, retention).await
    }

    async fn status(&self, sources: &[String]) -> Result<Vec<SourceStatus>, StoreError> {
        statements::status(self.read().await?, STATUS, sources).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::fs::TryLockError;

    #[test]
    fn stamps_sort_as_their_instants() {
        let instants = [
            Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::microseconds(1),
            Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 1).unwrap(),
            Utc.with_ymd_and_hms(2021, 12, 31, 23, 59, 59).unwrap(),
        ];
        let stamps: Vec<String> = instants.iter().copied().map(stamp).collect();
        assert_eq!(stamps[0], "2020-01-01T00:00:00.000000Z");
        assert!(
            stamps.windows(2).all(|pair| pair[0] < pair[1]),
            "{stamps:?}"
        );
        let back = DateTime::parse_from_rfc3339(&stamps[1]).unwrap();
        assert_eq!(back, instants[1]);
    }

    #[test]
    fn sqlite_urls_name_a_file() {
        assert_eq!(
            database_path("sqlite://deptsync.db").unwrap(),
            PathBuf::from("deptsync.db")
        );
        assert_eq!(
            database_path("sqlite:///var/lib/deptsync/deptsync.db").unwrap(),
            PathBuf::from("/var/lib/deptsync/deptsync.db")
        );
        for no_file in ["sqlite::memory:", "sqlite://", "sqlite://x.db?mode=memory"] {
            let error = database_path(no_file).unwrap_err();
            assert!(error.contains("names no file"), "{no_file}: {error}");
        }
        assert!(database_path("sqlite://x.db?colour=blue").is_err());
    }

    #[test]
    fn lock_files_sit_beside_the_database() {
        let database = Path::new("/var/lib/deptsync/deptsync.db");
        assert_eq!(
            migration_lock_path(database),
            PathBuf::from("/var/lib/deptsync/deptsync.db.lock")
        );
        assert_eq!(
            in_use_lock_path(database),
            PathBuf::from("/var/lib/deptsync/deptsync.db.in.use.lock")
        );
    }

    /// A directory of its own under the system's temporary one, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            let path = std::env::temp_dir().join(format!("deptsync-unit-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The access mode `file` was opened with.
    fn access_mode(file: &File) -> libc::c_int {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL only reads the flags of a descriptor `file` keeps open.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0, "{}", std::io::Error::last_os_error());
        flags & libc::O_ACCMODE
    }

    #[test]
    fn a_lock_file_is_created_when_missing_and_only_read_when_it_exists() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = Scratch::new();
        let path = scratch.0.join("deptsync.db.s.lock");

        let created = open_lock_file(&path).unwrap();
        assert!(path.exists());
        created.lock().unwrap();
        drop(created);

        // Left read-only by another user: opening it asks for no more than reading (the
        // access mode shows it, even where the tests run as root), and locks it all the
        // same.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let existing = open_lock_file(&path).unwrap();
        assert_eq!(access_mode(&existing), libc::O_RDONLY);
        existing.try_lock().unwrap();
        let second = open_lock_file(&path).unwrap();
        assert!(
            matches!(second.try_lock(), Err(TryLockError::WouldBlock)),
            "a read-only open still excludes"
        );
    }
}
