//! The PostgreSQL store.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

pub use super::IfMissing;
use super::checkpoint::{
    self, ListingColumns, Page, PageTransaction, ScopeCount, StoredListing, Unseen, Written,
};
use super::{
    StateColumns, Store, StoreError, db, describe_position, escape_nul, rejected_payload, run_mode,
    window_columns, window_state,
};
use crate::model::{
    Checkpoint, Department, Ledger, LedgerWindow, PageCounts, RejectedRecord, RunId, RunMode,
    RunOutcome, SourceStatus, SyncState, Window, WindowState,
};

/// deptsync's PostgreSQL migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const UPSERT_DEPARTMENTS: &str = include_str!("queries/postgres/upsert_departments.sql");
const STATUS: &str = include_str!("queries/postgres/status.sql");
const COUNT_UNSEEN: &str = include_str!("queries/postgres/count_unseen.sql");
const MARK_UNSEEN_DELETED: &str = include_str!("queries/postgres/mark_unseen_deleted.sql");

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
    async fn begin(&mut self, load: Load) -> Result<PgPage<'_>, StoreError> {
        let tx = sqlx::Connection::begin(&mut self.connection)
            .await
            .map_err(db("opening a transaction"))?;
        Ok(PgPage { tx, load })
    }
}

/// A page's transaction, and how its windowed departments are written.
struct PgPage<'c> {
    tx: Transaction<'c, Postgres>,
    load: Load,
}

impl PageTransaction for PgPage<'_> {
    async fn write_departments(
        &mut self,
        source: &str,
        departments: &[&Department],
        listing: Option<Uuid>,
    ) -> Result<Written, StoreError> {
        PgStore::write_departments(&mut self.tx, source, departments, listing, self.load).await
    }

    async fn keep_rejected(
        &mut self,
        source: &str,
        rejected: &[RejectedRecord],
    ) -> Result<(), StoreError> {
        for record in rejected {
            // The reason and id may quote the record: escape NUL there too.
            let payload = rejected_payload(record)?;
            sqlx::query(
                "INSERT INTO rejected_records (source, external_id, reason, payload)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (source, payload_md5) DO UPDATE SET
                     reason = EXCLUDED.reason,
                     seen_at = now(),
                     times_seen = rejected_records.times_seen + 1",
            )
            .bind(source)
            .bind(record.external_id.as_deref().map(escape_nul))
            .bind(escape_nul(&record.reason))
            .bind(payload)
            .execute(&mut *self.tx)
            .await
            .map_err(db("keeping a rejected record"))?;
        }
        Ok(())
    }

    async fn replace_ledger(&mut self, source: &str, ledger: &Ledger) -> Result<(), StoreError> {
        let mode = ledger.mode().as_str();
        sqlx::query("DELETE FROM sync_windows WHERE source = $1 AND mode = $2")
            .bind(source)
            .bind(mode)
            .execute(&mut *self.tx)
            .await
            .map_err(db("replacing the window ledger"))?;
        let starts: Vec<DateTime<Utc>> = ledger.windows.iter().map(|w| w.window.start).collect();
        let ends: Vec<DateTime<Utc>> = ledger.windows.iter().map(|w| w.window.end).collect();
        let (states, cursors): (Vec<&str>, Vec<Option<&str>>) = ledger
            .windows
            .iter()
            .map(|w| window_columns(&w.state))
            .unzip();
        sqlx::query(
            "INSERT INTO sync_windows (source, mode, window_start, window_end, state, cursor)
             SELECT $1, $2, * FROM UNNEST($3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[])",
        )
        .bind(source)
        .bind(mode)
        .bind(&starts)
        .bind(&ends)
        .bind(&states)
        .bind(&cursors)
        .execute(&mut *self.tx)
        .await
        .map_err(db("writing the window ledger"))?;
        let range = match ledger.backfill {
            None => sqlx::query(
                "INSERT INTO sync_state (source, incremental_until) VALUES ($1, $2)
                 ON CONFLICT (source) DO UPDATE SET
                     incremental_until = EXCLUDED.incremental_until,
                     updated_at = now()",
            )
            .bind(source)
            .bind(ledger.until),
            Some(range) => sqlx::query(
                "INSERT INTO sync_state (source, backfill_from, backfill_to, backfill_until)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (source) DO UPDATE SET
                     backfill_from = EXCLUDED.backfill_from,
                     backfill_to = EXCLUDED.backfill_to,
                     backfill_until = EXCLUDED.backfill_until,
                     updated_at = now()",
            )
            .bind(source)
            .bind(range.from)
            .bind(range.requested_to)
            .bind(ledger.until),
        };
        range
            .execute(&mut *self.tx)
            .await
            .map_err(db("saving the ledger's range"))?;
        Ok(())
    }

    async fn move_window(
        &mut self,
        source: &str,
        mode: RunMode,
        window: &Window,
        cursor: Option<&str>,
    ) -> Result<bool, StoreError> {
        let moved = sqlx::query(
            "UPDATE sync_windows
             SET state = CASE WHEN $5::text IS NULL THEN 'done' ELSE 'in_progress' END,
                 cursor = $5
             WHERE source = $1 AND mode = $2 AND window_start = $3 AND window_end = $4",
        )
        .bind(source)
        .bind(mode.as_str())
        .bind(window.start)
        .bind(window.end)
        .bind(cursor)
        .execute(&mut *self.tx)
        .await
        .map_err(db("saving the window's position"))?
        .rows_affected();
        Ok(moved == 1)
    }

    async fn split_window(
        &mut self,
        source: &str,
        mode: RunMode,
        window: &Window,
        [first, second]: &[Window; 2],
    ) -> Result<bool, StoreError> {
        let replaced = sqlx::query(
            "DELETE FROM sync_windows
             WHERE source = $1 AND mode = $2 AND window_start = $3 AND window_end = $4",
        )
        .bind(source)
        .bind(mode.as_str())
        .bind(window.start)
        .bind(window.end)
        .execute(&mut *self.tx)
        .await
        .map_err(db("splitting the window"))?
        .rows_affected();
        if replaced != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO sync_windows (source, mode, window_start, window_end, state)
             VALUES ($1, $2, $3, $4, $7), ($1, $2, $5, $6, $7)",
        )
        .bind(source)
        .bind(mode.as_str())
        .bind(first.start)
        .bind(first.end)
        .bind(second.start)
        .bind(second.end)
        .bind(window_columns(&WindowState::Pending).0)
        .execute(&mut *self.tx)
        .await
        .map_err(db("splitting the window"))?;
        Ok(true)
    }

    async fn windows_left(&mut self, source: &str, mode: RunMode) -> Result<u64, StoreError> {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync_windows WHERE source = $1 AND mode = $2 AND state <> 'done'",
        )
        .bind(source)
        .bind(mode.as_str())
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db("counting the windows left"))?;
        Ok(left as u64)
    }

    async fn finish_ledger(&mut self, source: &str, mode: RunMode) -> Result<(), StoreError> {
        let finish = match mode {
            // GREATEST ignores NULLs; the mark never moves backwards.
            RunMode::Incremental => {
                "WITH finished AS (DELETE FROM sync_windows WHERE source = $1 AND mode = $2)
                 UPDATE sync_state
                 SET high_water_mark = GREATEST(high_water_mark, incremental_until),
                     incremental_until = NULL, updated_at = now()
                 WHERE source = $1"
            }
            RunMode::Backfill => {
                "WITH finished AS (DELETE FROM sync_windows WHERE source = $1 AND mode = $2)
                 UPDATE sync_state
                 SET backfill_from = NULL, backfill_to = NULL, backfill_until = NULL,
                     updated_at = now()
                 WHERE source = $1"
            }
        };
        sqlx::query(finish)
            .bind(source)
            .bind(mode.as_str())
            .execute(&mut *self.tx)
            .await
            .map_err(db("finishing the ledger"))?;
        Ok(())
    }

    async fn stored_listing(&mut self, source: &str) -> Result<StoredListing, StoreError> {
        let row: Option<(Option<Uuid>, bool)> =
            sqlx::query_as("SELECT listing_id, listing_rewrote FROM sync_state WHERE source = $1")
                .bind(source)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(db("reading the listing in progress"))?;
        let (listing_id, rewrote) = row.unwrap_or_default();
        Ok(StoredListing {
            listing_id,
            rewrote,
        })
    }

    async fn set_listing(
        &mut self,
        source: &str,
        listing: &ListingColumns<'_>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_state AS s (source, listing_id, listing_cursor, listing_confirms,
                                          listing_started_at, listing_rewrote)
             VALUES ($1, $2, $3, $4, CASE WHEN $6 <> 'clear' THEN now() END, $5)
             ON CONFLICT (source) DO UPDATE SET
                 listing_id = EXCLUDED.listing_id,
                 listing_cursor = EXCLUDED.listing_cursor,
                 listing_confirms = EXCLUDED.listing_confirms,
                 listing_started_at = CASE $6 WHEN 'keep' THEN COALESCE(s.listing_started_at, now())
                                             WHEN 'start' THEN now() END,
                 listing_rewrote = EXCLUDED.listing_rewrote,
                 updated_at = now()",
        )
        .bind(source)
        .bind(listing.listing_id)
        .bind(listing.cursor)
        .bind(listing.confirms)
        .bind(listing.rewrote)
        .bind(listing.clock.as_str())
        .execute(&mut *self.tx)
        .await
        .map_err(db("saving the listing's position"))?;
        Ok(())
    }

    async fn drop_listing_in_progress(&mut self, source: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sync_state SET listing_id = NULL, listing_cursor = NULL, updated_at = now()
             WHERE source = $1",
        )
        .bind(source)
        .execute(&mut *self.tx)
        .await
        .map_err(db("dropping the listing in progress"))?;
        Ok(())
    }

    async fn record_seen(
        &mut self,
        source: &str,
        listing_id: Uuid,
        ids: &[&str],
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO listing_seen_pages (source, listing_id, external_ids) VALUES ($1, $2, $3)",
        )
        .bind(source)
        .bind(listing_id)
        .bind(ids)
        .execute(&mut *self.tx)
        .await
        .map_err(db("recording the departments the listing saw"))?;
        Ok(())
    }

    async fn forget_seen(&mut self, source: &str, listings: &[Uuid]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM listing_seen_pages WHERE source = $1 AND listing_id = ANY($2)")
            .bind(source)
            .bind(listings)
            .execute(&mut *self.tx)
            .await
            .map_err(db("forgetting what listings saw"))?;
        Ok(())
    }

    async fn count_unseen(&mut self, unseen: &Unseen<'_>) -> Result<Vec<ScopeCount>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(COUNT_UNSEEN)
            .bind(unseen.source)
            .bind(unseen.listing_id)
            .bind(unseen.confirms)
            .bind(unseen.scopes)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db("counting the departments the listing did not see"))?;
        Ok(ScopeCount::from_rows(rows))
    }

    async fn mark_unseen_deleted(
        &mut self,
        unseen: &Unseen<'_>,
        spared: &[&str],
    ) -> Result<u64, StoreError> {
        let deleted = sqlx::query(MARK_UNSEEN_DELETED)
            .bind(unseen.source)
            .bind(unseen.listing_id)
            .bind(unseen.confirms)
            .bind(unseen.scopes)
            .bind(spared)
            .execute(&mut *self.tx)
            .await
            .map_err(db("marking unlisted departments deleted"))?
            .rows_affected();
        Ok(deleted)
    }

    /// Once `listing_id` is complete, makes its page digests the ones the next listing
    /// trusts, and forgets every other listing's. Each digest was true when its page was
    /// stored; it stays true unless a later page of the same listing rewrote one of its
    /// rows, which needs the same id twice in the listing with different contents. A
    /// listing that rewrote no stored row cannot have done that; one that did is trusted
    /// only when no id appears in it twice.
    async fn listing_complete(
        &mut self,
        source: &str,
        listing_id: Uuid,
        rewrote: bool,
    ) -> Result<(), StoreError> {
        let trusted = if rewrote {
            let repeats: bool = sqlx::query_scalar(
                "SELECT EXISTS (
                     SELECT 1 FROM listing_seen_pages p, unnest(p.external_ids) AS id
                     WHERE p.source = $1 AND p.listing_id = $2
                     GROUP BY id HAVING count(*) > 1)",
            )
            .bind(source)
            .bind(listing_id)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(db("looking for ids the listing saw twice"))?;
            !repeats
        } else {
            true
        };
        sqlx::query(
            "WITH forgotten AS (
                 DELETE FROM listing_page_digests
                 WHERE source = $1 AND (listing_id <> $2 OR NOT $3)
             )
             UPDATE sync_state SET trusted_listing = CASE WHEN $3 THEN $2 END
             WHERE source = $1",
        )
        .bind(source)
        .bind(listing_id)
        .bind(trusted)
        .execute(&mut *self.tx)
        .await
        .map_err(db("settling the listing's page digests"))?;
        Ok(())
    }

    async fn distrust_pages(&mut self, source: &str) -> Result<(), StoreError> {
        sqlx::query(
            "WITH untrusted AS (DELETE FROM listing_page_digests WHERE source = $1)
             UPDATE sync_state SET trusted_listing = NULL WHERE source = $1",
        )
        .bind(source)
        .execute(&mut *self.tx)
        .await
        .map_err(db("distrusting the listing's pages"))?;
        Ok(())
    }

    async fn count_page(
        &mut self,
        run: RunId,
        counts: &PageCounts,
        fetched: u64,
        pages: u64,
    ) -> Result<bool, StoreError> {
        let counted = sqlx::query(
            "UPDATE sync_runs SET pages = pages + $8, fetched = fetched + $2, inserted = inserted + $3,
                    updated = updated + $4, unchanged = unchanged + $5, rejected = rejected + $6,
                    deleted = deleted + $7
             WHERE run_id = $1",
        )
        .bind(run.0)
        .bind(fetched as i64)
        .bind(counts.inserted as i64)
        .bind(counts.updated as i64)
        .bind(counts.unchanged as i64)
        .bind(counts.rejected as i64)
        .bind(counts.deleted as i64)
        .bind(pages as i64)
        .execute(&mut *self.tx)
        .await
        .map_err(db("counting the page in its run"))?;
        Ok(counted.rows_affected() == 1)
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(db("committing the page"))
    }
}

impl PgStore {
    /// Connects to the database at `url`, statements bounded by the default timeout.
    pub async fn connect(url: &SecretString, if_missing: IfMissing) -> Result<PgStore, StoreError> {
        Self::connect_with(url, if_missing, super::DEFAULT_STATEMENT_TIMEOUT).await
    }

    /// Connects to the database at `url`. Every session ends a statement after
    /// `statement_timeout` (a statement blocked on a lock for minutes fails instead), and
    /// has the server probe its TCP connection (`tcp_keepalives_*`), so that a client
    /// gone without a word (a firewall dropping the connection silently) frees its session
    /// and its advisory locks within about a minute.
    pub async fn connect_with(
        url: &SecretString,
        if_missing: IfMissing,
        statement_timeout: Duration,
    ) -> Result<PgStore, StoreError> {
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

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db("asking the database"))?;
        Ok(())
    }

    /// Applies the migrations that have not run yet, on a connection of their own whose
    /// statements are not bounded: a migration may rightly take long on a big table.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(PgConnectOptions::clone(&self.options))
            .await
            .map_err(db("connecting for the migrations"))?;
        let migrated = MIGRATOR.run(&pool).await;
        pool.close().await;
        Ok(migrated?)
    }

    /// Every window of `source`'s ledgers, with its mode, oldest first.
    async fn read_ledgers(&self, source: &str) -> Result<Vec<(RunMode, LedgerWindow)>, StoreError> {
        let rows = sqlx::query(
            "SELECT mode, window_start, window_end, state, cursor FROM sync_windows
             WHERE source = $1 ORDER BY mode, window_start",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await
        .map_err(db("loading the window ledger"))?;
        rows.into_iter()
            .map(|row| {
                let window = Window {
                    start: row.get("window_start"),
                    end: row.get("window_end"),
                };
                let state = window_state(source, window, row.get("state"), row.get("cursor"))?;
                Ok((run_mode(row.get("mode"))?, state))
            })
            .collect()
    }

    /// Writes the departments of a page (one version per id) that are new or changed: a
    /// full listing's page with its digests, any other as `load` says.
    async fn write_departments(
        tx: &mut Transaction<'_, Postgres>,
        source: &str,
        rows: &[&Department],
        listing: Option<Uuid>,
        load: Load,
    ) -> Result<Written, StoreError> {
        if let Some(listing_id) = listing {
            return Self::write_listing_page(tx, source, listing_id, rows.to_vec()).await;
        }
        // A windowed page has no digests: its rows are new or compared in full.
        let rows: Vec<_> = rows.iter().map(|d| (*d, None)).collect();
        if load == Load::AllNew {
            let inserted = Self::copy_new(tx, source, &rows).await?;
            return Ok(Written {
                inserted,
                updated: 0,
                rewrote: false,
            });
        }
        let upserted = Self::upsert(tx, source, &rows).await?;
        Ok(Written {
            inserted: upserted.inserted,
            updated: upserted.updated,
            rewrote: upserted.touched > 0,
        })
    }

    /// Writes a full listing's page (`rows`, one per id). A page exactly as the trusted
    /// listing saw it costs one lookup of its digest. Otherwise each id is looked up with
    /// its content digest (16 bytes back): rows not stored are loaded with `COPY`, changed
    /// ones upserted, and unchanged ones not sent at all.
    async fn write_listing_page(
        tx: &mut Transaction<'_, Postgres>,
        source: &str,
        listing_id: Uuid,
        mut rows: Vec<&Department>,
    ) -> Result<Written, StoreError> {
        rows.sort_unstable_by(|a, b| a.external_id.cmp(&b.external_id));
        let digests: Vec<[u8; 16]> = rows.iter().map(|d| content_digest(d)).collect();
        let page = page_digest(&digests);
        // Known: the trusted listing stored this very page, and this listing has rewritten
        // no stored row since (one it rewrote may be on this page, as it was before). The
        // digest is then recorded for this listing too.
        let known: bool = sqlx::query_scalar(
            "WITH known AS (
                 SELECT EXISTS (
                     SELECT 1 FROM listing_page_digests d JOIN sync_state s
                       ON s.source = d.source AND s.trusted_listing = d.listing_id
                     WHERE d.source = $1 AND d.page_md5 = $3 AND d.listing_id <> $2)
                 AND NOT EXISTS (
                     SELECT 1 FROM sync_state
                     WHERE source = $1 AND listing_id = $2 AND listing_rewrote) AS known
             ),
             recorded AS (
                 INSERT INTO listing_page_digests (source, listing_id, page_md5)
                 SELECT $1, $2, $3 FROM known WHERE known
                 ON CONFLICT DO NOTHING
             )
             SELECT known FROM known",
        )
        .bind(source)
        .bind(listing_id)
        .bind(&page[..])
        .fetch_one(&mut **tx)
        .await
        .map_err(db("looking up the page's digest"))?;
        if known {
            return Ok(Written::default());
        }
        let ids: Vec<&str> = rows.iter().map(|d| d.external_id.as_str()).collect();
        let stored: HashMap<String, Option<Vec<u8>>> = sqlx::query_as(
            "SELECT external_id, CASE WHEN deleted_at IS NULL THEN content_md5 END
             FROM departments WHERE source = $1 AND external_id = ANY($2)",
        )
        .bind(source)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(db("looking up the stored departments"))?
        .into_iter()
        .collect();
        let mut new = Vec::new();
        let mut changed = Vec::new();
        for (department, digest) in rows.into_iter().zip(digests) {
            match stored.get(department.external_id.as_str()) {
                None => new.push((department, Some(digest))),
                Some(Some(known)) if known.as_slice() == digest.as_slice() => {}
                Some(_) => changed.push((department, Some(digest))),
            }
        }
        let copied = Self::copy_new(tx, source, &new).await?;
        let upserted = Self::upsert(tx, source, &changed).await?;
        // Every row as the page has it, unless a stored one was newer: then the page's
        // digest would not tell what is stored, and is not recorded.
        if upserted.inserted + upserted.touched == changed.len() as u64 {
            sqlx::query(
                "INSERT INTO listing_page_digests (source, listing_id, page_md5)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(source)
            .bind(listing_id)
            .bind(&page[..])
            .execute(&mut **tx)
            .await
            .map_err(db("recording the page's digest"))?;
        }
        Ok(Written {
            inserted: copied + upserted.inserted,
            updated: upserted.updated,
            rewrote: upserted.touched > 0,
        })
    }

    /// Loads `rows`, none of them stored yet, with `COPY`: no lookup per row, rows
    /// written in batches. A row that was stored after all fails the statement (a unique
    /// violation), and with it the transaction; nothing is half written.
    async fn copy_new(
        tx: &mut Transaction<'_, Postgres>,
        source: &str,
        rows: &[(&Department, Option<[u8; 16]>)],
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut data = Vec::with_capacity(rows.len() * 400);
        for (department, digest) in rows {
            copy_row(&mut data, source, department, digest.as_ref());
        }
        let mut copy = tx
            .copy_in_raw(
                "COPY departments (source, external_id, scope_id, name, is_active,
                     parent_external_id, source_created_at, source_updated_at, raw, content_md5)
                 FROM STDIN",
            )
            .await
            .map_err(db("loading new departments"))?;
        copy.send(data)
            .await
            .map_err(db("loading new departments"))?;
        copy.finish().await.map_err(db("loading new departments"))
    }

    /// Writes `rows` (each with its content digest, for a listing) with the upsert
    /// statement, which compares each with what is stored.
    async fn upsert(
        tx: &mut Transaction<'_, Postgres>,
        source: &str,
        rows: &[(&Department, Option<[u8; 16]>)],
    ) -> Result<Upserted, StoreError> {
        if rows.is_empty() {
            return Ok(Upserted::default());
        }
        let texts =
            |f: fn(&Department) -> Option<&str>| rows.iter().map(|(d, _)| f(d)).collect::<Vec<_>>();
        let external_ids = texts(|d| Some(d.external_id.as_str()));
        let scope_ids = texts(|d| d.scope_id.as_deref());
        let names = texts(|d| Some(d.name.as_str()));
        let parents = texts(|d| d.parent_external_id.as_deref());
        let raw = texts(|d| Some(d.raw.as_str()));
        let active: Vec<bool> = rows.iter().map(|(d, _)| d.is_active).collect();
        let created: Vec<Option<DateTime<Utc>>> =
            rows.iter().map(|(d, _)| d.source_created_at).collect();
        let updated: Vec<Option<DateTime<Utc>>> =
            rows.iter().map(|(d, _)| d.source_updated_at).collect();
        let digests: Vec<Option<&[u8]>> = rows
            .iter()
            .map(|(_, digest)| digest.as_ref().map(|d| &d[..]))
            .collect();

        let row = sqlx::query(UPSERT_DEPARTMENTS)
            .bind(source)
            .bind(&external_ids)
            .bind(&scope_ids)
            .bind(&names)
            .bind(&active)
            .bind(&parents)
            .bind(&created)
            .bind(&updated)
            .bind(&raw)
            .bind(&digests)
            .fetch_one(&mut **tx)
            .await
            .map_err(db("upserting departments"))?;
        let count = |column: &str| row.get::<i64, _>(column) as u64;
        Ok(Upserted {
            inserted: count("inserted"),
            updated: count("updated"),
            touched: count("touched"),
        })
    }
}

/// How a windowed page's departments are written (a full listing's page is written with
/// its digests: see [`PgStore::write_listing_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// Expected to be new, every one: loaded with `COPY`, no lookups.
    AllNew,
    /// Each compared with what is stored, by the upsert statement.
    Compare,
}

/// What the upsert statement did.
#[derive(Debug, Default)]
struct Upserted {
    inserted: u64,
    /// Updated with a change of content.
    updated: u64,
    /// Updated at all.
    touched: u64,
}

/// The digest of a listing page, from the content digests of its rows in id order.
fn page_digest(rows: &[[u8; 16]]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    for row in rows {
        hasher.update(row);
    }
    hasher.finalize().into()
}

/// Appends `department` as one line of `COPY`'s text format, in the column order of
/// [`PgStore::copy_new`].
fn copy_row(data: &mut Vec<u8>, source: &str, department: &Department, digest: Option<&[u8; 16]>) {
    let instant =
        |t: Option<DateTime<Utc>>| t.map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string());
    copy_field(data, Some(source));
    copy_field(data, Some(&department.external_id));
    copy_field(data, department.scope_id.as_deref());
    copy_field(data, Some(&department.name));
    copy_field(data, Some(if department.is_active { "t" } else { "f" }));
    copy_field(data, department.parent_external_id.as_deref());
    copy_field(data, instant(department.source_created_at).as_deref());
    copy_field(data, instant(department.source_updated_at).as_deref());
    copy_field(data, Some(department.raw.as_str()));
    let digest = digest.map(|d| {
        let mut hex = String::with_capacity(34);
        hex.push_str("\\x");
        for byte in d {
            hex.push_str(&format!("{byte:02x}"));
        }
        hex
    });
    copy_field(data, digest.as_deref());
    // The last field's tab becomes the end of the line.
    data.pop();
    data.push(b'\n');
}

/// Appends one field of `COPY`'s text format and the tab after it: `\N` for NULL; a
/// backslash, tab, newline or carriage return escaped with a backslash. (A NUL never
/// reaches here: such a department is rejected before it is stored.)
fn copy_field(data: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => data.extend_from_slice(b"\\N"),
        Some(text) => {
            for byte in text.bytes() {
                match byte {
                    b'\\' => data.extend_from_slice(b"\\\\"),
                    b'\t' => data.extend_from_slice(b"\\t"),
                    b'\n' => data.extend_from_slice(b"\\n"),
                    b'\r' => data.extend_from_slice(b"\\r"),
                    _ => data.push(byte),
                }
            }
        }
    }
    data.push(b'\t');
}

/// A digest of what a department row holds (every column the upsert compares), to tell an
/// unchanged row without sending it. Each field is framed (a tag, and a length for text),
/// so that no two different rows can run together into the same bytes.
fn content_digest(department: &Department) -> [u8; 16] {
    use md5::{Digest, Md5};
    fn text(hasher: &mut Md5, value: Option<&str>) {
        match value {
            None => hasher.update([0]),
            Some(text) => {
                hasher.update([1]);
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    fn instant(hasher: &mut Md5, value: Option<DateTime<Utc>>) {
        match value {
            None => hasher.update([0]),
            // Microseconds: what PostgreSQL keeps of an instant.
            Some(t) => {
                hasher.update([1]);
                hasher.update(t.timestamp_micros().to_le_bytes());
            }
        }
    }
    let mut hasher = Md5::new();
    text(&mut hasher, Some(&department.external_id));
    text(&mut hasher, department.scope_id.as_deref());
    text(&mut hasher, Some(&department.name));
    hasher.update([u8::from(department.is_active)]);
    text(&mut hasher, department.parent_external_id.as_deref());
    instant(&mut hasher, department.source_created_at);
    instant(&mut hasher, department.source_updated_at);
    // The record as received: a vendor that writes the same record differently (its keys
    // in another order) only costs a full comparison, which finds it unchanged.
    text(&mut hasher, Some(department.raw.as_str()));
    hasher.finalize().into()
}

/// The advisory-lock key of a source (hashed to a bigint by the server).
fn lock_key(source: &str) -> String {
    format!("deptsync:{source}")
}

fn is_missing_database(error: &sqlx::Error) -> bool {
    // SQLSTATE 3D000: invalid_catalog_name ("database ... does not exist").
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("3D000"))
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
        let row = sqlx::query("SELECT * FROM sync_state WHERE source = $1")
            .bind(source)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("loading the sync state"))?;
        let Some(row) = row else {
            return Ok(SyncState::default());
        };
        let columns = StateColumns {
            high_water_mark: row.get("high_water_mark"),
            incremental_until: row.get("incremental_until"),
            backfill_from: row.get("backfill_from"),
            backfill_to: row.get("backfill_to"),
            backfill_until: row.get("backfill_until"),
            listing_id: row.get("listing_id"),
            listing_cursor: row.get("listing_cursor"),
            listing_confirms: row.get("listing_confirms"),
            scope_fingerprint: row.get("scope_fingerprint"),
        };
        Ok(columns.into_state(self.read_ledgers(source).await?))
    }

    async fn start_run(
        &self,
        lease: &mut Self::Lease,
        source: &str,
        mode: RunMode,
    ) -> Result<RunId, StoreError> {
        let run_id = Uuid::new_v4();
        let mut tx = sqlx::Connection::begin(&mut lease.connection)
            .await
            .map_err(db("opening a transaction"))?;
        let abandoned = sqlx::query(
            "UPDATE sync_runs SET status = 'failed', finished_at = now(),
                    error = 'abandoned: the process running it stopped before it finished'
             WHERE source = $1 AND status = 'running'",
        )
        .bind(source)
        .execute(&mut *tx)
        .await
        .map_err(db("closing runs abandoned by a stopped process"))?
        .rows_affected();
        if abandoned > 0 {
            tracing::warn!(
                source,
                abandoned,
                "runs left running by a stopped process recorded as failed"
            );
        }
        sqlx::query("INSERT INTO sync_runs (run_id, source, mode) VALUES ($1, $2, $3)")
            .bind(run_id)
            .bind(source)
            .bind(mode.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db("recording the start of the run"))?;
        tx.commit()
            .await
            .map_err(db("recording the start of the run"))?;
        Ok(RunId(run_id))
    }

    async fn commit_page(
        &self,
        lease: &mut Self::Lease,
        run: RunId,
        source: &str,
        departments: &[Department],
        rejected: &[RejectedRecord],
        checkpoint: &Checkpoint,
    ) -> Result<PageCounts, StoreError> {
        let page = Page {
            run,
            source,
            departments,
            rejected,
            checkpoint,
        };
        let load = if lease.loading_new && page.listing().is_none() && !departments.is_empty() {
            Load::AllNew
        } else {
            Load::Compare
        };
        let first = checkpoint::commit_page(lease.begin(load).await?, &page).await;
        let counts = match first {
            // A page expected to be all new held a stored department: the whole
            // transaction rolled back; store the page again, comparing every row.
            // (Or COPY refused a value the statement may take, or report better.)
            Err(e) if load == Load::AllNew && e.is_refused_by_database() => {
                tracing::debug!(source, error = %e, "loading a page as new failed; comparing its rows");
                checkpoint::commit_page(lease.begin(Load::Compare).await?, &page).await?
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
        let mut tx = sqlx::Connection::begin(&mut lease.connection)
            .await
            .map_err(db("opening a transaction"))?;
        if reset.is_some() {
            for table in ["sync_windows", "listing_seen_pages", "listing_page_digests"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE source = $1"))
                    .bind(source)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("dropping the source's position"))?;
            }
        }
        sqlx::query(
            "INSERT INTO sync_state AS s (source, scope_fingerprint, reset_at, reset_reason)
             VALUES ($1, $2, CASE WHEN $3::text IS NOT NULL THEN now() END, $3)
             ON CONFLICT (source) DO UPDATE SET
                 scope_fingerprint = EXCLUDED.scope_fingerprint,
                 high_water_mark = CASE WHEN $3 IS NULL THEN s.high_water_mark END,
                 incremental_until = CASE WHEN $3 IS NULL THEN s.incremental_until END,
                 backfill_from = CASE WHEN $3 IS NULL THEN s.backfill_from END,
                 backfill_to = CASE WHEN $3 IS NULL THEN s.backfill_to END,
                 backfill_until = CASE WHEN $3 IS NULL THEN s.backfill_until END,
                 listing_id = CASE WHEN $3 IS NULL THEN s.listing_id END,
                 listing_cursor = CASE WHEN $3 IS NULL THEN s.listing_cursor END,
                 listing_confirms = CASE WHEN $3 IS NULL THEN s.listing_confirms END,
                 listing_started_at = CASE WHEN $3 IS NULL THEN s.listing_started_at END,
                 listing_rewrote = $3 IS NULL AND s.listing_rewrote,
                 trusted_listing = CASE WHEN $3 IS NULL THEN s.trusted_listing END,
                 reset_at = CASE WHEN $3 IS NULL THEN s.reset_at ELSE now() END,
                 reset_reason = COALESCE($3, s.reset_reason),
                 updated_at = now()",
        )
        .bind(source)
        .bind(scope)
        .bind(reset)
        .execute(&mut *tx)
        .await
        .map_err(db("recording what the source's position is a position of"))?;
        tx.commit()
            .await
            .map_err(db("recording what the source's position is a position of"))?;
        Ok(())
    }

    async fn register(&self, sources: &[String]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_state AS s (source, registered_at)
             SELECT unnest($1::text[]), now()
             ON CONFLICT (source) DO UPDATE SET registered_at = COALESCE(s.registered_at, now())",
        )
        .bind(sources)
        .execute(&self.pool)
        .await
        .map_err(db("registering the scheduled sources"))?;
        Ok(())
    }

    async fn finish_run(&self, run: RunId, outcome: &RunOutcome) -> Result<(), StoreError> {
        let error = outcome.error().map(escape_nul);
        sqlx::query(
            "UPDATE sync_runs SET finished_at = now(), status = $2, error = $3 WHERE run_id = $1",
        )
        .bind(run.0)
        .bind(outcome.status())
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(db("recording the end of the run"))?;
        Ok(())
    }

    async fn status(&self, sources: &[String]) -> Result<Vec<SourceStatus>, StoreError> {
        let rows = sqlx::query(STATUS)
            .bind(sources)
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading the status"))?;
        Ok(rows
            .into_iter()
            .map(|row| SourceStatus {
                source: row.get("source"),
                state: row
                    .get::<Option<String>, _>("last_status")
                    .unwrap_or_else(|| "never run".to_owned()),
                last_run_started_at: row.get("last_started_at"),
                last_run_finished_at: row.get("last_finished_at"),
                last_success_at: row.get("last_success_at"),
                last_error: row.get("last_error"),
                last_error_at: row.get("last_error_at"),
                high_water_mark: row.get("high_water_mark"),
                position: describe_position(
                    row.get("high_water_mark"),
                    (row.get("windows_left"), row.get("windows_planned")),
                    row.get("listing_cursor"),
                ),
                first_run_at: row.get("first_run_at"),
                live_rows: row.get("live_rows"),
                deleted_rows: row.get("deleted_rows"),
                rejected_records: row.get("rejected"),
                backfill_in_progress: row
                    .get::<Option<bool>, _>("backfill_in_progress")
                    .unwrap_or(false),
                reset: row.get("reset_reason"),
                reset_at: row.get("reset_at"),
                registered_at: row.get("registered_at"),
            })
            .collect())
    }
}
