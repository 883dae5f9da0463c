//! The primitives of a page's transaction ([`PageTransaction`]), in PostgreSQL's dialect.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::departments::{self, Load};
use crate::model::{
    Department, Ledger, PageCounts, RejectedRecord, RunId, RunMode, Window, WindowState,
};
use crate::store::checkpoint::{
    ListingColumns, PageTransaction, ScopeCount, StoredListing, Unseen, Written,
};
use crate::store::{StoreError, db, escape_nul, rejected_payload, window_columns};

const COUNT_UNSEEN: &str = include_str!("queries/count_unseen.sql");
const MARK_UNSEEN_DELETED: &str = include_str!("queries/mark_unseen_deleted.sql");

/// A page's transaction, and how its windowed departments are written.
pub(super) struct PgPage<'c> {
    pub(super) tx: Transaction<'c, Postgres>,
    pub(super) load: Load,
}

impl PageTransaction for PgPage<'_> {
    async fn write_departments(
        &mut self,
        source: &str,
        departments: &[&Department],
        listing: Option<Uuid>,
    ) -> Result<Written, StoreError> {
        departments::write_departments(&mut self.tx, source, departments, listing, self.load).await
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
