//! The primitives of a page's transaction ([`PageTransaction`]), in SQLite's dialect.

use md5::{Digest, Md5};
use serde::Serialize;
use sqlx::{Connection, Sqlite, Transaction};
use uuid::Uuid;

use super::{BEGIN_WRITE, SqliteLease, get, json_text, now, stamp, uuid_in};
use crate::model::{
    Department, Ledger, PageCounts, RawRecord, RejectedRecord, RunId, RunMode, Window, WindowState,
};
use crate::store::checkpoint::{
    ListingColumns, PageTransaction, ScopeCount, StoredListing, Unseen, Written,
};
use crate::store::{StoreError, db, escape_nul, rejected_payload, window_columns};

const UPSERT_DEPARTMENTS: &str = include_str!("queries/upsert_departments.sql");
const COUNT_UNSEEN: &str = include_str!("queries/count_unseen.sql");
const MARK_UNSEEN_DELETED: &str = include_str!("queries/mark_unseen_deleted.sql");

/// A department of a page as the upsert reads it (a JSON array of these).
#[derive(Serialize)]
struct IncomingDepartment<'a> {
    external_id: &'a str,
    scope_id: Option<&'a str>,
    name: &'a str,
    is_active: bool,
    parent_external_id: Option<&'a str>,
    source_created_at: Option<String>,
    source_updated_at: Option<String>,
    /// The record's JSON as `serde_json` writes it (see [`canonical_json`]), stored as this
    /// very text: SQLite's JSON printer never rewrites it, so the stored text (and whether
    /// a row changed) cannot depend on the SQLite version.
    raw: String,
}

/// `raw` as `serde_json` writes it: keys in order, no spaces. SQLite compares the text, so
/// a record the vendor writes differently from one response to the next (its keys in
/// another order) is not taken for a change. A record too deeply nested to rewrite is
/// kept as it came.
fn canonical_json(raw: &RawRecord) -> String {
    serde_json::from_str::<serde_json::Value>(raw.as_str())
        .and_then(|value| serde_json::to_string(&value))
        .unwrap_or_else(|_| raw.as_str().to_owned())
}

/// A page's transaction, holding the database's write lock throughout, and its instant.
pub(super) struct SqlitePage<'c> {
    tx: Transaction<'c, Sqlite>,
    /// The transaction's instant, taken once it holds the write lock (PostgreSQL's
    /// `now()`).
    now: String,
}

impl SqliteLease {
    /// Opens a page's transaction on the lock's own connection.
    pub(super) async fn begin(&mut self) -> Result<SqlitePage<'_>, StoreError> {
        let tx = self
            .connection
            .begin_with(BEGIN_WRITE)
            .await
            .map_err(db("opening a transaction"))?;
        Ok(SqlitePage { tx, now: now() })
    }
}

impl PageTransaction for SqlitePage<'_> {
    async fn write_departments(
        &mut self,
        source: &str,
        departments: &[&Department],
        _listing: Option<Uuid>,
    ) -> Result<Written, StoreError> {
        // Every row is compared in full: SQLite's store keeps no digests.
        let rows = departments
            .iter()
            .map(|d| IncomingDepartment {
                external_id: &d.external_id,
                scope_id: d.scope_id.as_deref(),
                name: &d.name,
                is_active: d.is_active,
                parent_external_id: d.parent_external_id.as_deref(),
                source_created_at: d.source_created_at.map(stamp),
                source_updated_at: d.source_updated_at.map(stamp),
                raw: canonical_json(&d.raw),
            })
            .collect::<Vec<IncomingDepartment<'_>>>();
        let page = serde_json::to_string(&rows)
            .map_err(|e| StoreError::Corrupt(format!("page not serializable: {e}")))?;
        // The ids already stored: the upsert inserts every other one.
        let existing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM departments
             WHERE source = ?1
               AND external_id IN (SELECT value ->> 'external_id' FROM json_each(?2))",
        )
        .bind(source)
        .bind(&page)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db("counting the stored departments"))?;
        let written = sqlx::query(UPSERT_DEPARTMENTS)
            .bind(source)
            .bind(&self.now)
            .bind(&page)
            .execute(&mut *self.tx)
            .await
            .map_err(db("upserting departments"))?
            .rows_affected();
        let inserted = rows.len() as u64 - existing as u64;
        let updated = written.checked_sub(inserted).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the upsert wrote {written} rows, fewer than the {inserted} new ones"
            ))
        })?;
        Ok(Written {
            inserted,
            updated,
            rewrote: false,
        })
    }

    async fn keep_rejected(
        &mut self,
        source: &str,
        rejected: &[RejectedRecord],
    ) -> Result<(), StoreError> {
        for record in rejected {
            let payload = rejected_payload(record)?;
            let payload_md5 = format!("{:x}", Md5::digest(payload.as_bytes()));
            sqlx::query(
                "INSERT INTO rejected_records
                     (source, external_id, reason, payload, payload_md5, first_seen_at, seen_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                 ON CONFLICT (source, payload_md5) DO UPDATE SET
                     reason = excluded.reason,
                     seen_at = excluded.seen_at,
                     times_seen = rejected_records.times_seen + 1",
            )
            .bind(source)
            .bind(record.external_id.as_deref().map(escape_nul))
            .bind(escape_nul(&record.reason))
            .bind(payload)
            .bind(payload_md5)
            .bind(&self.now)
            .execute(&mut *self.tx)
            .await
            .map_err(db("keeping a rejected record"))?;
        }
        Ok(())
    }

    async fn replace_ledger(&mut self, source: &str, ledger: &Ledger) -> Result<(), StoreError> {
        let mode = ledger.mode().as_str();
        sqlx::query("DELETE FROM sync_windows WHERE source = ?1 AND mode = ?2")
            .bind(source)
            .bind(mode)
            .execute(&mut *self.tx)
            .await
            .map_err(db("replacing the window ledger"))?;
        for entry in &ledger.windows {
            let (state, cursor) = window_columns(&entry.state);
            sqlx::query(
                "INSERT INTO sync_windows (source, mode, window_start, window_end, state, cursor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(source)
            .bind(mode)
            .bind(stamp(entry.window.start))
            .bind(stamp(entry.window.end))
            .bind(state)
            .bind(cursor)
            .execute(&mut *self.tx)
            .await
            .map_err(db("writing the window ledger"))?;
        }
        let range = match ledger.backfill {
            None => sqlx::query(
                "INSERT INTO sync_state (source, incremental_until, updated_at)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (source) DO UPDATE SET
                     incremental_until = excluded.incremental_until,
                     updated_at = excluded.updated_at",
            )
            .bind(source)
            .bind(stamp(ledger.until))
            .bind(&self.now),
            Some(range) => sqlx::query(
                "INSERT INTO sync_state
                     (source, backfill_from, backfill_to, backfill_until, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (source) DO UPDATE SET
                     backfill_from = excluded.backfill_from,
                     backfill_to = excluded.backfill_to,
                     backfill_until = excluded.backfill_until,
                     updated_at = excluded.updated_at",
            )
            .bind(source)
            .bind(stamp(range.from))
            .bind(range.requested_to.map(stamp))
            .bind(stamp(ledger.until))
            .bind(&self.now),
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
             SET state = CASE WHEN ?5 IS NULL THEN 'done' ELSE 'in_progress' END, cursor = ?5
             WHERE source = ?1 AND mode = ?2 AND window_start = ?3 AND window_end = ?4",
        )
        .bind(source)
        .bind(mode.as_str())
        .bind(stamp(window.start))
        .bind(stamp(window.end))
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
        halves: &[Window; 2],
    ) -> Result<bool, StoreError> {
        let replaced = sqlx::query(
            "DELETE FROM sync_windows
             WHERE source = ?1 AND mode = ?2 AND window_start = ?3 AND window_end = ?4",
        )
        .bind(source)
        .bind(mode.as_str())
        .bind(stamp(window.start))
        .bind(stamp(window.end))
        .execute(&mut *self.tx)
        .await
        .map_err(db("splitting the window"))?
        .rows_affected();
        if replaced != 1 {
            return Ok(false);
        }
        for half in halves {
            sqlx::query(
                "INSERT INTO sync_windows (source, mode, window_start, window_end, state)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(source)
            .bind(mode.as_str())
            .bind(stamp(half.start))
            .bind(stamp(half.end))
            .bind(window_columns(&WindowState::Pending).0)
            .execute(&mut *self.tx)
            .await
            .map_err(db("splitting the window"))?;
        }
        Ok(true)
    }

    async fn windows_left(&mut self, source: &str, mode: RunMode) -> Result<u64, StoreError> {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync_windows WHERE source = ?1 AND mode = ?2 AND state <> 'done'",
        )
        .bind(source)
        .bind(mode.as_str())
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db("counting the windows left"))?;
        Ok(left as u64)
    }

    async fn finish_ledger(&mut self, source: &str, mode: RunMode) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sync_windows WHERE source = ?1 AND mode = ?2")
            .bind(source)
            .bind(mode.as_str())
            .execute(&mut *self.tx)
            .await
            .map_err(db("clearing the finished ledger"))?;
        let finish = match mode {
            // SQLite's max() of a NULL is NULL, where GREATEST ignores it; the mark never
            // moves backwards.
            RunMode::Incremental => {
                "UPDATE sync_state
                 SET high_water_mark = COALESCE(max(high_water_mark, incremental_until),
                                                high_water_mark, incremental_until),
                     incremental_until = NULL, updated_at = ?2
                 WHERE source = ?1"
            }
            RunMode::Backfill => {
                "UPDATE sync_state
                 SET backfill_from = NULL, backfill_to = NULL, backfill_until = NULL,
                     updated_at = ?2
                 WHERE source = ?1"
            }
        };
        sqlx::query(finish)
            .bind(source)
            .bind(&self.now)
            .execute(&mut *self.tx)
            .await
            .map_err(db("finishing the ledger"))?;
        Ok(())
    }

    async fn stored_listing(&mut self, source: &str) -> Result<StoredListing, StoreError> {
        let row =
            sqlx::query("SELECT listing_id, listing_rewrote FROM sync_state WHERE source = ?1")
                .bind(source)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(db("reading the listing in progress"))?;
        let Some(row) = row else {
            return Ok(StoredListing::default());
        };
        Ok(StoredListing {
            listing_id: uuid_in(&row, "listing_id")?,
            rewrote: get(&row, "listing_rewrote")?,
        })
    }

    async fn set_listing(
        &mut self,
        source: &str,
        listing: &ListingColumns<'_>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_state AS s (source, listing_id, listing_cursor, listing_confirms,
                                          listing_started_at, listing_rewrote, updated_at)
             VALUES (?1, ?2, ?3, ?4, CASE WHEN ?6 <> 'clear' THEN ?7 END, ?5, ?7)
             ON CONFLICT (source) DO UPDATE SET
                 listing_id = excluded.listing_id,
                 listing_cursor = excluded.listing_cursor,
                 listing_confirms = excluded.listing_confirms,
                 listing_started_at = CASE ?6 WHEN 'keep' THEN COALESCE(s.listing_started_at, ?7)
                                             WHEN 'start' THEN ?7 END,
                 listing_rewrote = excluded.listing_rewrote,
                 updated_at = ?7",
        )
        .bind(source)
        .bind(listing.listing_id.map(|id| id.to_string()))
        .bind(listing.cursor)
        .bind(listing.confirms.map(|id| id.to_string()))
        .bind(listing.rewrote)
        .bind(listing.clock.as_str())
        .bind(&self.now)
        .execute(&mut *self.tx)
        .await
        .map_err(db("saving the listing's position"))?;
        Ok(())
    }

    async fn drop_listing_in_progress(&mut self, source: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sync_state SET listing_id = NULL, listing_cursor = NULL, updated_at = ?2
             WHERE source = ?1",
        )
        .bind(source)
        .bind(&self.now)
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
            "INSERT INTO listing_seen (source, listing_id, external_id)
             SELECT ?1, ?2, value FROM json_each(?3) WHERE true
             ON CONFLICT DO NOTHING",
        )
        .bind(source)
        .bind(listing_id.to_string())
        .bind(json_text(&ids)?)
        .execute(&mut *self.tx)
        .await
        .map_err(db("recording the departments the listing saw"))?;
        Ok(())
    }

    async fn forget_seen(&mut self, source: &str, listings: &[Uuid]) -> Result<(), StoreError> {
        let listings: Vec<String> = listings.iter().map(Uuid::to_string).collect();
        sqlx::query(
            "DELETE FROM listing_seen
             WHERE source = ?1 AND listing_id IN (SELECT value FROM json_each(?2))",
        )
        .bind(source)
        .bind(json_text(&listings)?)
        .execute(&mut *self.tx)
        .await
        .map_err(db("forgetting what listings saw"))?;
        Ok(())
    }

    async fn count_unseen(&mut self, unseen: &Unseen<'_>) -> Result<Vec<ScopeCount>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(COUNT_UNSEEN)
            .bind(unseen.source)
            .bind(unseen.listing_id.to_string())
            .bind(unseen.confirms.map(|id| id.to_string()))
            .bind(&self.now)
            .bind(unseen.scopes.map(|scopes| json_text(&scopes)).transpose()?)
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
            .bind(unseen.listing_id.to_string())
            .bind(unseen.confirms.map(|id| id.to_string()))
            .bind(&self.now)
            .bind(unseen.scopes.map(|scopes| json_text(&scopes)).transpose()?)
            .bind(json_text(&spared)?)
            .execute(&mut *self.tx)
            .await
            .map_err(db("marking unlisted departments deleted"))?
            .rows_affected();
        Ok(deleted)
    }

    async fn count_page(
        &mut self,
        run: RunId,
        counts: &PageCounts,
        fetched: u64,
        pages: u64,
    ) -> Result<bool, StoreError> {
        let counted = sqlx::query(
            "UPDATE sync_runs SET pages = pages + ?8, fetched = fetched + ?2,
                    inserted = inserted + ?3, updated = updated + ?4,
                    unchanged = unchanged + ?5, rejected = rejected + ?6, deleted = deleted + ?7
             WHERE run_id = ?1",
        )
        .bind(run.0.to_string())
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
