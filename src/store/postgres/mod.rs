//! The PostgreSQL store: its connection, its locks, and its state and status queries.
//! A page's statements are in [`page`], its department writes in [`departments`].

mod departments;
mod page;

use departments::Load;
use page::PgTx;

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};

pub use super::IfMissing;
use super::any::Backend;
use super::checkpoint;
use super::history::{self, FeedQueries};
use super::statements;
use super::{Commit, Store, StoreError, db};
use crate::model::{PageCounts, RunId, RunMode, RunOutcome, SourceStatus, SyncState};

/// deptsync's PostgreSQL migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// `status`: the configured names (`$1`, an array), then the statement both backends share.
const STATUS: &str = concat!(
    "WITH names AS (\n    SELECT unnest($1::text[]) AS source\n",
    include_str!("../queries/status.sql")
);
/// Registers the sources `$1` (an array) at the instant `$2` (see `statements::register`).
const REGISTER: &str = "INSERT INTO sync_state AS s (source, registered_at)
     SELECT unnest($1::text[]), COALESCE($2, CURRENT_TIMESTAMP)
     ON CONFLICT (source) DO UPDATE SET
         registered_at = COALESCE(s.registered_at, excluded.registered_at)";

/// A store in one PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// How to connect, without the session's bounds: for the migrations.
    options: std::sync::Arc<PgConnectOptions>,
    /// The bound on every call through [`crate::store::AnyStore`].
    pub(super) call_timeout: Duration,
}

/// A source's lock: the connection that holds it (see [`Store::Lease`] for [`PgStore`]),
/// through which the pass writes.
pub struct PgLease {
    connection: PgConnection,
    /// Whether the pass's last windowed page held only departments not stored before. New
    /// departments come in runs (a first sync, a backfill into an empty table): while they
    /// do, the next page is loaded with `COPY`, without looking each id up first.
    loading_new: bool,
}

impl PgLease {
    /// The connection that holds the lock.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.connection
    }

    /// Opens a page's transaction on the lock's own connection: a lost lock (the
    /// connection gone) fails the write instead of letting two holders write at once.
    async fn begin(&mut self) -> Result<PgTx<'_>, StoreError> {
        let tx = sqlx::Connection::begin(&mut self.connection)
            .await
            .map_err(db("opening a transaction"))?;
        Ok(PgTx::new(tx))
    }
}

impl PgStore {
    /// A transaction on a connection of the pool.
    async fn begin(&self) -> Result<PgTx<'static>, StoreError> {
        let tx = self
            .pool
            .begin()
            .await
            .map_err(db("opening a transaction"))?;
        Ok(PgTx::new(tx))
    }

    /// Connects to the database at `url`, statements bounded by the default timeout.
    pub async fn connect(url: &SecretString, if_missing: IfMissing) -> Result<PgStore, StoreError> {
        Self::connect_with(url, if_missing, super::DEFAULT_STATEMENT_TIMEOUT).await
    }

    /// The pool, for SQL of a reader's own: the demo's sample query and the tests.
    #[cfg(feature = "demo")]
    #[doc(hidden)]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The advisory-lock key of a source (hashed to a bigint by the server).
fn lock_key(source: &str) -> String {
    format!("deptsync:{source}")
}

fn is_missing_database(error: &sqlx::Error) -> bool {
    // SQLSTATE 3D000: invalid_catalog_name ("database ... does not exist").
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("3D000"))
}

impl Backend for PgStore {
    const NAME: &'static str = "postgres";

    fn claims(url: &str) -> Option<Result<(), String>> {
        (url.starts_with("postgres://") || url.starts_with("postgresql://")).then_some(Ok(()))
    }

    /// Connects to the database at `url`. Every session ends a statement after
    /// `statement_timeout` (a statement blocked on a lock for minutes fails instead), and
    /// has the server probe its TCP connection (`tcp_keepalives_*`), so that a client
    /// gone without a word (a firewall dropping the connection silently) frees its session
    /// and its advisory locks within about a minute.
    async fn connect_with(
        url: &SecretString,
        if_missing: IfMissing,
        statement_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let call_timeout = super::call_timeout(statement_timeout);
        let options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(db("parsing the database url"))?;
        // Set once each connection is made, not as startup `options` (which PgBouncer
        // refuses): a transaction left open by a client that went away ends too.
        let session = format!(
            "SET statement_timeout = {ms}; SET idle_in_transaction_session_timeout = {ms}; \
             SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
             SET tcp_keepalives_count = 3",
            ms = statement_timeout.as_millis()
        );
        let pool_options = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(15))
            .after_connect(move |connection, _| {
                let session = session.clone();
                Box::pin(async move {
                    // No arguments: the simple protocol, which takes several statements.
                    sqlx::Executor::execute(connection, session.as_str()).await?;
                    Ok(())
                })
            });
        // One connection first: a refused one is said at once (a pool would retry it
        // until its timeout and then say only that it timed out).
        let probe = tokio::time::timeout(
            Duration::from_secs(15),
            sqlx::Connection::connect_with(&options),
        )
        .await;
        if let Ok(Err(sqlx::Error::Io(source))) = probe.map(|c| c.map(|c: PgConnection| drop(c)))
            && matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            )
        {
            return Err(StoreError::Unreachable {
                address: format!("{}:{}", options.get_host(), options.get_port()),
                source,
            });
        }
        match pool_options.clone().connect_with(options.clone()).await {
            Ok(pool) => Ok(PgStore {
                pool,
                options: options.into(),
                call_timeout,
            }),
            Err(e) if is_missing_database(&e) && if_missing == IfMissing::Create => {
                tracing::info!(
                    database = options.get_database().unwrap_or_default(),
                    "database does not exist; creating it"
                );
                Postgres::create_database(url.expose_secret())
                    .await
                    .map_err(|e| match &e {
                        sqlx::Error::Database(refused)
                            if refused.code().as_deref() == Some("42501") =>
                        {
                            StoreError::CannotCreate(e)
                        }
                        _ => StoreError::Database {
                            context: "creating the database (it does not exist)",
                            source: e,
                        },
                    })?;
                let pool = pool_options
                    .connect_with(options.clone())
                    .await
                    .map_err(db("connecting to the database"))?;
                Ok(PgStore {
                    pool,
                    options: options.into(),
                    call_timeout,
                })
            }
            Err(e) => Err(StoreError::Database {
                context: "connecting to the database",
                source: e,
            }),
        }
    }

    /// Applies the migrations that have not run yet, on a connection of their own whose
    /// statements are not bounded: a migration may rightly take long on a big table.
    async fn migrate(&self) -> Result<(), StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(PgConnectOptions::clone(&self.options))
            .await
            .map_err(db("connecting for the migrations"))?;
        let migrated = MIGRATOR.run(&pool).await;
        pool.close().await;
        migrated?;
        self.readmit_restored_versions().await
    }

    type Reader = PgTx<'static>;

    async fn read(&self) -> Result<PgTx<'static>, StoreError> {
        self.begin().await
    }

    fn call_timeout(&self) -> Duration {
        self.call_timeout
    }
}

impl PgStore {
    /// Gives versions whose transaction id lies ahead of every transaction this server has
    /// begun (restored from another server, whose counter was further on) the id of this
    /// transaction, so that the feed reads them (once, from the beginning) instead of
    /// hiding them until this server's counter passes theirs. Only a restore leaves such
    /// rows: every version this server wrote is below its next transaction id.
    async fn readmit_restored_versions(&self) -> Result<(), StoreError> {
        let readmitted = sqlx::query(
            "WITH history AS (
                 UPDATE department_history
                 SET feed_position = pg_current_xact_id()::text::bigint,
                     -- New to the feed: a retention counts from now.
                     observed_at = GREATEST(observed_at, now())
                 WHERE feed_position >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint
                 RETURNING 1
             ),
             current AS (
                 UPDATE departments
                 SET version_position = pg_current_xact_id()::text::bigint
                 WHERE version_position >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM history) + (SELECT count(*) FROM current)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db("readmitting restored versions to the change feed"))?;
        let readmitted: i64 = sqlx::Row::get(&readmitted, 0);
        if readmitted > 0 {
            tracing::warn!(
                readmitted,
                "versions restored from another server were given this server's transaction \
                 ids: readers of the change feed should read again from the beginning"
            );
        }
        Ok(())
    }
}

impl FeedQueries for PgStore {
    const FEED_HORIZON: &'static str =
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon";
    const READ_FEED: &'static str = include_str!("queries/read_feed.sql");
}

impl Store for PgStore {
    /// A session-level advisory lock lives as long as the connection that took it: the
    /// lease is that connection, taken out of the pool, so that a holder that dies (or
    /// loses its database connection) frees the lock with it, and the pass writes through
    /// it, so that no write happens without the lock.
    type Lease = PgLease;

    async fn try_lock(&self, source: &str) -> Result<Option<Self::Lease>, StoreError> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(db("connecting for the source's lock"))?
            .detach();
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(lock_key(source))
                .fetch_one(&mut connection)
                .await
                .map_err(db("taking the source's lock"))?;
        if locked {
            // Pages commit without waiting for their WAL to reach the disk. A server crash
            // can then lose the last few commits, but whole and in order: a page never
            // without its checkpoint, so the next pass re-reads what was lost. Only this
            // session, which lives as long as the lock, commits this way.
            sqlx::query("SET synchronous_commit = off")
                .execute(&mut connection)
                .await
                .map_err(db("setting up the source's session"))?;
            Ok(Some(PgLease {
                connection,
                loading_new: false,
            }))
        } else {
            let _ = sqlx::Connection::close(connection).await;
            Ok(None)
        }
    }

    async fn unlock(&self, lease: Self::Lease) {
        // Closing the session frees its advisory locks.
        if let Err(e) = sqlx::Connection::close(lease.connection).await {
            tracing::debug!(error = %e, "closing the lock's connection");
        }
    }

    async fn load_state(&self, source: &str) -> Result<SyncState, StoreError> {
        statements::load_state(self.read().await?, source).await
    }

    async fn start_run(
        &self,
        lease: &mut Self::Lease,
        source: &str,
        mode: RunMode,
    ) -> Result<RunId, StoreError> {
        statements::start_run(lease.begin().await?, source, mode).await
    }

    async fn commit_page(
        &self,
        lease: &mut Self::Lease,
        page: &Commit<'_>,
    ) -> Result<PageCounts, StoreError> {
        let departments = page.departments;
        let source = page.source;
        let load = if lease.loading_new && page.listing().is_none() && !departments.is_empty() {
            Load::AllNew
        } else {
            Load::Compare
        };
        let first = checkpoint::commit_page(lease.begin().await?.loading(load), page).await;
        let counts = match first {
            // A page expected to be all new held a stored department: the whole
            // transaction rolled back; store the page again, comparing every row.
            // (Or COPY refused a value the statement may take, or report better.)
            Err(e) if load == Load::AllNew && e.is_refused_by_database() => {
                tracing::debug!(source, error = %e, "loading a page as new failed; comparing its rows");
                checkpoint::commit_page(lease.begin().await?, page).await?
            }
            result => result?,
        };
        if page.listing().is_none() && !departments.is_empty() {
            // New departments come in runs (a first sync, a backfill into an empty
            // table); while they do, the next page is loaded without lookups.
            lease.loading_new = counts.inserted == departments.len() as u64;
        }
        Ok(counts)
    }

    async fn set_scope(
        &self,
        lease: &mut Self::Lease,
        source: &str,
        scope: Option<&str>,
        reset: Option<&str>,
    ) -> Result<(), StoreError> {
        let tx = lease.begin().await?;
        checkpoint::set_scope(tx, source, scope, reset).await
    }

    async fn register(&self, sources: &[String]) -> Result<(), StoreError> {
        statements::register(self.begin().await?, REGISTER, sources).await
    }

    async fn finish_run(&self, run: RunId, outcome: &RunOutcome) -> Result<(), StoreError> {
        statements::finish_run(self.begin().await?, run, outcome).await
    }

    async fn trim_history(&self, source: &str, retention: Duration) -> Result<u64, StoreError> {
        history::trim(self.begin().await?, source, retention).await
    }

    async fn status(&self, sources: &[String]) -> Result<Vec<SourceStatus>, StoreError> {
        statements::status(self.read().await?, STATUS, sources).await
    }
}
