//! The primitives of a page's transaction ([`PageTransaction`]), in PostgreSQL's dialect.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::departments::{self, Load};
use crate::model::{Department, PageCounts, RunId};
use crate::store::checkpoint::{PageTransaction, Written};
use crate::store::lease::{LeaseQueries, lease_statements};
use crate::store::statements::{Value, impl_statements};
use crate::store::{StoreError, db};

/// A transaction of the PostgreSQL store, and how it writes a windowed page's departments
/// (only a page's commit writes them).
pub struct PgTx<'c> {
    tx: Transaction<'c, Postgres>,
    load: Load,
    /// Whether its statements are prepared under a name and kept (see `PgStore`).
    persistent: bool,
}

impl<'c> PgTx<'c> {
    /// A transaction whose windowed departments, if it writes any, are compared with what
    /// is stored.
    pub(super) fn new(tx: Transaction<'c, Postgres>, persistent: bool) -> PgTx<'c> {
        PgTx {
            tx,
            load: Load::Compare,
            persistent,
        }
    }

    /// `sql`, prepared as the store prepares its statements.
    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(self.persistent)
    }

    /// The transaction, writing a windowed page's departments as `load` says.
    pub(super) fn loading(self, load: Load) -> PgTx<'c> {
        PgTx { load, ..self }
    }
}

impl_statements!(PgTx, PgRow, bind);

/// `query` with `values` bound, as PostgreSQL keeps them: instants and ids natively, the
/// transaction's instant as NULL (the statement falls back to `CURRENT_TIMESTAMP`).
fn bind<'q>(
    query: Query<'q, Postgres, PgArguments>,
    values: &[Value<'q>],
    page: &PgTx<'_>,
) -> Query<'q, Postgres, PgArguments> {
    let query = query.persistent(page.persistent);
    values.iter().fold(query, |query, value| match *value {
        Value::Text(text) => query.bind(text),
        Value::Time(time) => query.bind(time),
        Value::Id(id) => query.bind(id),
        Value::Int(int) => query.bind(int),
        Value::Bool(flag) => query.bind(flag),
        Value::Texts(texts) => query.bind(texts),
        Value::Ids(ids) => query.bind(ids),
        Value::Now => query.bind(None::<DateTime<Utc>>),
    })
}

impl PageTransaction for PgTx<'_> {
    const RECORD_SEEN: &'static str =
        "INSERT INTO listing_seen_pages (source, listing_id, external_ids) VALUES ($1, $2, $3)";
    const FORGET_SEEN: &'static str = "DELETE FROM listing_seen_pages
         WHERE source = $1 AND ($2::uuid[] IS NULL OR listing_id = ANY($2))";
    // The transaction's instant (`$5` of the next two, `$6` of KEEP_REJECTED) is the
    // server's `now()` here: PostgreSQL takes a value bound to no parameter.
    const COUNT_UNSEEN: &'static str = include_str!("queries/count_unseen.sql");
    const MARK_UNSEEN_DELETED: &'static str = include_str!("queries/mark_unseen_deleted.sql");
    // `payload_md5` is a generated column; the row's instants are the transaction's.
    const KEEP_REJECTED: &'static str =
        "INSERT INTO rejected_records (source, external_id, reason, payload)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (source, payload_md5) DO UPDATE SET
             reason = EXCLUDED.reason,
             seen_at = now(),
             times_seen = rejected_records.times_seen + 1";

    async fn write_departments(
        &mut self,
        source: &str,
        departments: &[&Department],
        listing: Option<Uuid>,
    ) -> Result<Written, StoreError> {
        departments::write_departments(
            &mut self.tx,
            source,
            departments,
            listing,
            self.load,
            self.persistent,
        )
        .await
    }

    /// Tells listeners on `deptsync_changes`, as the transaction commits, which source and
    /// run wrote how many versions, the page's counts, and the transaction's id (`xid`):
    /// the versions are readable once the feed's token is past it (a JSON object). The
    /// trigger counts the versions it opened in the transaction's `deptsync.versions`.
    async fn versions_written(
        &mut self,
        source: &str,
        run: RunId,
        counts: &PageCounts,
    ) -> Result<(), StoreError> {
        self.query(
            "SELECT pg_notify('deptsync_changes', json_build_object(
                 'source', $1::text, 'run', $2::uuid, 'versions', versions,
                 'inserted', $3::bigint, 'updated', $4::bigint, 'deleted', $5::bigint,
                 'xid', pg_current_xact_id()::text::bigint)::text)
             FROM (SELECT $3::bigint + COALESCE(NULLIF(
                       current_setting('deptsync.versions', true), ''), '0')::bigint
                       AS versions) opened
             WHERE versions > 0",
        )
        .bind(source)
        .bind(run.0)
        .bind(counts.inserted as i64)
        .bind(counts.updated as i64)
        .bind(counts.deleted as i64)
        .execute(&mut *self.tx)
        .await
        .map_err(db("telling listeners of the new versions"))?;
        Ok(())
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
        let earlier_pages_rewrote: Option<bool> = sqlx::query_scalar(
            "SELECT listing_rewrote FROM sync_state WHERE source = $1 AND listing_id = $2",
        )
        .persistent(self.persistent)
        .bind(source)
        .bind(listing_id)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db("reading what the listing rewrote"))?;
        let trusted = if rewrote || earlier_pages_rewrote == Some(true) {
            let repeats: bool = sqlx::query_scalar(
                "SELECT EXISTS (
                     SELECT 1 FROM listing_seen_pages p, unnest(p.external_ids) AS id
                     WHERE p.source = $1 AND p.listing_id = $2
                     GROUP BY id HAVING count(*) > 1)",
            )
            .persistent(self.persistent)
            .bind(source)
            .bind(listing_id)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(db("looking for ids the listing saw twice"))?;
            !repeats
        } else {
            true
        };
        self.query(
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
}

impl LeaseQueries for PgTx<'_> {
    // The clock when the statement reads it, not when it began: a renewal that waited for
    // a page's commit (which holds the lease's row) counts its time to live from then.
    lease_statements!(
        clock = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        in_list = "= ANY($1)",
        skip_locked = "FOR UPDATE SKIP LOCKED",
    );
}
