//! The PostgreSQL store: its connection, and its state and status queries. A page's
//! statements are in [`page`], its department writes in [`departments`].
//!
//! **Nothing lives in a session.** Every statement runs in a transaction that sets its own
//! bounds (`SET LOCAL`), leases are rows ([`super::lease`]), and migrations hold a
//! transaction-level lock: so deptsync works the same through a PgBouncer in transaction
//! pooling mode, which gives each transaction whichever server connection is free. Behind
//! one, add `pgbouncer=true` to the URL: statements are then not prepared under a name
//! (PgBouncer 1.18 does not carry one from a transaction to the next), at the cost of
//! one more round trip each.

mod departments;
mod page;

use departments::Load;
use page::PgTx;

use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};

pub use super::IfMissing;
use super::any::Backend;
use super::checkpoint;
use super::history::{self, FeedQueries};
use super::lease::{self, Lease, PassEnd};
use super::statements;
use super::{Commit, Limits, Store, StoreError, db};
use crate::model::{PageCounts, RunId, RunMode, RunOutcome, SourceStatus, SyncState};

/// deptsync's PostgreSQL migrations, embedded in the binary, applied under a lock of
/// their transaction's (see [`PgStore::migrate`]) rather than sqlx's session lock.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_locking(false);
    migrator
}

/// The URL parameter that says the server is a PgBouncer in transaction pooling mode.
const PGBOUNCER_PARAMETER: &str = "pgbouncer";

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
    /// How to connect: for the migrations.
    options: Arc<PgConnectOptions>,
    /// The bound on every call through [`crate::store::AnyStore`].
    pub(super) call_timeout: Duration,
    /// How a transaction begins: with its statements' bounds.
    begin_bounded: Arc<str>,
    /// How a pass's write begins: also committing without waiting for the disk (see
    /// [`Store::start_run`] below).
    begin_pass: Arc<str>,
    /// How a durable write begins: committing only once it is on disk, whatever the
    /// server's default.
    begin_durable: Arc<str>,
    /// Whether statements are prepared under a name and kept (not behind a PgBouncer).
    persistent: bool,
    /// The name this store holds leases under.
    holder: Arc<str>,
}

/// Which transaction to begin.
#[derive(Debug, Clone, Copy)]
enum Begin {
    /// Its statements bounded: reads, and the short writes of leases and records.
    Bounded,
    /// A pass's write: bounded too, and not waiting for the disk.
    Pass,
    /// Bounded, and its commit waits for the disk: which flushes every commit before it.
    Durable,
}

impl PgStore {
    /// A transaction on a connection of the pool.
    async fn begin(&self, begin: Begin) -> Result<PgTx<'static>, StoreError> {
        let statement = match begin {
            Begin::Bounded => &self.begin_bounded,
            Begin::Pass => &self.begin_pass,
            Begin::Durable => &self.begin_durable,
        };
        let tx = self
            .pool
            .begin_with(statement.to_string())
            .await
            .map_err(db("opening a transaction"))?;
        Ok(PgTx::new(tx, self.persistent))
    }

    /// Connects to the database at `url`, with the default limits.
    pub async fn connect(url: &SecretString, if_missing: IfMissing) -> Result<PgStore, StoreError> {
        Self::connect_with(url, if_missing, &Limits::default()).await
    }

    /// The pool, for SQL of a reader's own: the demo's sample query and the tests.
    #[cfg(feature = "demo")]
    #[doc(hidden)]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// `url` without the [`PGBOUNCER_PARAMETER`], and whether it said the server is a
/// PgBouncer; or what is wrong with its value (never quoting the URL). Only the query's
/// parameters are looked at; the rest is left as written.
fn pgbouncer_url(url: &str) -> Result<(String, bool), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), false));
    };
    let mut pgbouncer = false;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key != PGBOUNCER_PARAMETER {
            kept.push(pair);
            continue;
        }
        pgbouncer = match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "on" | "yes" => true,
            "false" | "0" | "off" | "no" => false,
            _ => {
                return Err(format!(
                    "has {PGBOUNCER_PARAMETER}={value:?}: use true or false"
                ));
            }
        };
    }
    Ok(if kept.is_empty() {
        (base.to_owned(), pgbouncer)
    } else {
        (format!("{base}?{}", kept.join("&")), pgbouncer)
    })
}

fn is_missing_database(error: &sqlx::Error) -> bool {
    // SQLSTATE 3D000: invalid_catalog_name ("database ... does not exist").
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("3D000"))
}

impl Backend for PgStore {
    const NAME: &'static str = "postgres";

    fn claims(url: &str) -> Option<Result<(), String>> {
        (url.starts_with("postgres://") || url.starts_with("postgresql://"))
            .then(|| pgbouncer_url(url).map(drop))
    }

    /// Connects to the database at `url`, with at most `limits.max_connections`. Every
    /// transaction ends a statement after `statement_timeout` (a statement blocked on a
    /// lock for minutes fails instead), and the server ends a transaction its client left
    /// open that long (a client gone without a word): set in each transaction, as its
    /// first statement, never in a session a PgBouncer would hand to another client.
    async fn connect_with(
        url: &SecretString,
        if_missing: IfMissing,
        limits: &Limits,
    ) -> Result<Self, StoreError> {
        let statement_timeout = limits.statement_timeout;
        let call_timeout = super::call_timeout(statement_timeout);
        let (url, pgbouncer) = pgbouncer_url(url.expose_secret()).map_err(StoreError::Url)?;
        let url = SecretString::from(url);
        let mut options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(db("parsing the database url"))?
            .application_name("deptsync");
        if pgbouncer {
            // No statement kept under a name, and no start-up parameter PgBouncer does
            // not pass on by default.
            options = options.statement_cache_capacity(0).extra_float_digits(None);
        }
        // The simple protocol, which takes several statements in one round trip.
        let begin_bounded = format!(
            "BEGIN; SET LOCAL statement_timeout = {ms}; \
             SET LOCAL idle_in_transaction_session_timeout = {ms}",
            ms = statement_timeout.as_millis()
        );
        // A pass's writes commit without waiting for their WAL to reach the disk. A
        // server crash can then lose the last few commits, but whole and in order: a
        // page never without its checkpoint, so the next pass re-reads what was lost
        // (and the change feed hands out no horizon that is not on disk: see
        // `history`). They also say they are deptsync's, so that the triggers tell
        // them from changes made by hand (migration `..._hand_repairs`).
        let begin_pass = format!(
            "{begin_bounded}; SET LOCAL synchronous_commit = off; \
             SET LOCAL deptsync.writer = 'pass'"
        );
        // Waiting for a free connection is bounded by the call it is for (which says the
        // database did not answer), never cut shorter by the pool.
        let pool_options = PgPoolOptions::new()
            .max_connections(limits.max_connections)
            .acquire_timeout(call_timeout * 2);
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
        let begin_durable = format!("{begin_bounded}; SET LOCAL synchronous_commit = on");
        let store = |pool, options: PgConnectOptions| PgStore {
            pool,
            options: options.into(),
            call_timeout,
            begin_bounded: begin_bounded.as_str().into(),
            begin_pass: begin_pass.as_str().into(),
            begin_durable: begin_durable.as_str().into(),
            persistent: !pgbouncer,
            holder: lease::new_holder(),
        };
        match pool_options.clone().connect_with(options.clone()).await {
            Ok(pool) => Ok(store(pool, options)),
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
                Ok(store(pool, options))
            }
            Err(e) => Err(StoreError::Database {
                context: "connecting to the database",
                source: e,
            }),
        }
    }

    /// Applies the migrations that have not run yet, all in one transaction on a
    /// connection of their own whose statements are not bounded (a migration may rightly
    /// take long on a big table), under a lock that ends with it: two processes starting
    /// at once apply them once, through a PgBouncer too.
    async fn migrate(&self) -> Result<(), StoreError> {
        let connecting = sqlx::Connection::connect_with(&*self.options);
        let mut connection: PgConnection =
            tokio::time::timeout(Duration::from_secs(15), connecting)
                .await
                .map_err(|_| StoreError::Unanswered {
                    after: Duration::from_secs(15),
                })?
                .map_err(db("connecting for the migrations"))?;
        let migrated = async {
            let mut tx = sqlx::Connection::begin(&mut connection)
                .await
                .map_err(db("opening the migrations' transaction"))?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('deptsync:migrate', 0))")
                .persistent(self.persistent)
                .execute(&mut *tx)
                .await
                .map_err(db("taking the migrations' lock"))?;
            let migrated = migrator().run_direct(&mut *tx).await;
            if !self.persistent {
                // sqlx's migrator prepares its statements under names, on a server
                // connection PgBouncer hands to others next: drop them with it, whether
                // the migrations went through or not (a migration that failed rolled
                // back to its savepoint, so the transaction still takes statements).
                sqlx::query("DEALLOCATE ALL")
                    .persistent(false)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("dropping the migrations' prepared statements"))?;
            }
            migrated?;
            readmit_restored_versions(&mut tx, self.persistent).await?;
            tx.commit().await.map_err(db("committing the migrations"))
        }
        .await;
        let _ = sqlx::Connection::close(connection).await;
        migrated
    }

    type Reader = PgTx<'static>;

    async fn read(&self) -> Result<PgTx<'static>, StoreError> {
        self.begin(Begin::Bounded).await
    }

    type Writer = PgTx<'static>;

    async fn write(&self) -> Result<PgTx<'static>, StoreError> {
        self.begin(Begin::Bounded).await
    }

    async fn durable_write(&self) -> Result<PgTx<'static>, StoreError> {
        self.begin(Begin::Durable).await
    }

    fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    fn holder(&self) -> &Arc<str> {
        &self.holder
    }
}

/// Gives versions whose transaction id lies ahead of every transaction this server has
/// begun (restored from another server, whose counter was further on) the id of this
/// transaction, so that the feed reads them (once, from the beginning) instead of
/// hiding them until this server's counter passes theirs. Only a restore leaves such
/// rows: every version this server wrote is below its next transaction id.
async fn readmit_restored_versions(
    tx: &mut PgConnection,
    persistent: bool,
) -> Result<(), StoreError> {
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
    .persistent(persistent)
    .fetch_one(&mut *tx)
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

impl FeedQueries for PgStore {
    const FEED_HORIZON: &'static str =
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon";
    // Where the row was made: the cluster (a restore into another server, however alike),
    // the database (a restore into another one), the table the row is in (a restore
    // creates it anew, over this database too) and the timeline of the WAL being written
    // (a physical copy promoted: a point-in-time recovery, a failover; read from the WAL
    // file's name, which a promotion changes at once, unlike the last checkpoint's
    // record).
    const FEED_IDENTITY: &'static str = "SELECT CAST(f.feed_id AS TEXT) AS feed_id, f.handed_out,
                (f.system_identifier, f.database_oid, f.table_oid, f.timeline)
                    IS NOT DISTINCT FROM (h.system_identifier, h.database_oid, f.tableoid,
                                          h.timeline) AS bound
         FROM feed_identity f, feed_home() h
         FOR UPDATE OF f";
    const REBIND_FEED: &'static str = "UPDATE feed_identity f
         SET feed_id = CAST($1 AS uuid), system_identifier = h.system_identifier,
             database_oid = h.database_oid, table_oid = f.tableoid, timeline = h.timeline,
             handed_out = 0
         FROM feed_home() h";
    const READ_FEED: &'static str = include_str!("queries/read_feed.sql");
}

impl Store for PgStore {
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
        statements::start_run(self.begin(Begin::Pass).await?, lease, mode).await
    }

    async fn commit_page(
        &self,
        lease: &mut Lease,
        page: &Commit<'_>,
    ) -> Result<PageCounts, StoreError> {
        let departments = page.departments;
        let source = page.source;
        let load = if lease.loading_new && page.listing().is_none() && !departments.is_empty() {
            Load::AllNew
        } else {
            Load::Compare
        };
        let first =
            checkpoint::commit_page(self.begin(Begin::Pass).await?.loading(load), lease, page)
                .await;
        let counts = match first {
            // A page expected to be all new held a stored department: the whole
            // transaction rolled back; store the page again, comparing every row.
            // (Or COPY refused a value the statement may take, or report better.)
            Err(e) if load == Load::AllNew && e.is_refused_by_database() => {
                tracing::debug!(source, error = %e, "loading a page as new failed; comparing its rows");
                checkpoint::commit_page(self.begin(Begin::Pass).await?, lease, page).await?
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
        lease: &mut Lease,
        scope: Option<&str>,
        reset: Option<&str>,
    ) -> Result<(), StoreError> {
        checkpoint::set_scope(self.begin(Begin::Pass).await?, lease, scope, reset).await
    }

    async fn register(&self, sources: &[String]) -> Result<(), StoreError> {
        statements::register(self.begin(Begin::Bounded).await?, REGISTER, sources).await
    }

    async fn finish_run(&self, run: RunId, outcome: &RunOutcome) -> Result<(), StoreError> {
        statements::finish_run(self.begin(Begin::Bounded).await?, run, outcome).await
    }

    async fn trim_history(&self, source: &str, retention: Duration) -> Result<u64, StoreError> {
        history::trim(self.begin(Begin::Bounded).await?, source, retention).await
    }

    async fn status(&self, sources: &[String]) -> Result<Vec<SourceStatus>, StoreError> {
        statements::status(self.read().await?, STATUS, sources).await
    }
}
