//! The primitives of a page's transaction ([`PageTransaction`]), in SQLite's dialect.

use serde::Serialize;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::{now, stamp};
use crate::model::{Department, RawRecord};
use crate::store::checkpoint::{PageTransaction, Written};
use crate::store::lease::{LeaseQueries, lease_statements};
use crate::store::statements::{Statements, Value, impl_statements};
use crate::store::{StoreError, db};

const UPSERT_DEPARTMENTS: &str = include_str!("queries/upsert_departments.sql");

/// `items` as a JSON array, as SQLite's statements read a list (with `json_each`). A list
/// of strings always serializes.
fn json_list<T: AsRef<str>>(items: &[T]) -> String {
    serde_json::Value::from(items.iter().map(|item| item.as_ref()).collect::<Vec<_>>()).to_string()
}

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

/// A transaction of the SQLite store, and its instant. One that writes begins with
/// `BEGIN IMMEDIATE` ([`BEGIN_WRITE`]), so that it holds the database's write lock
/// throughout and its instant is taken once it holds it; one that only reads begins
/// deferred.
pub struct SqliteTx<'c> {
    tx: Transaction<'c, Sqlite>,
    /// The transaction's instant (PostgreSQL's `now()`): what `Value::Now` binds.
    now: String,
}

impl<'c> SqliteTx<'c> {
    /// `tx`, begun already (a writer's with the write lock held): its instant is taken
    /// now.
    pub(super) fn new(tx: Transaction<'c, Sqlite>) -> SqliteTx<'c> {
        SqliteTx { tx, now: now() }
    }
}

impl_statements!(SqliteTx, SqliteRow, bind);

/// `query` with `values` bound, as SQLite keeps them: instants as [`stamp`] text, ids as
/// text, the transaction's instant as the page's.
fn bind<'q>(
    query: Query<'q, Sqlite, SqliteArguments<'q>>,
    values: &[Value<'q>],
    page: &SqliteTx<'_>,
) -> Query<'q, Sqlite, SqliteArguments<'q>> {
    values.iter().fold(query, |query, value| match *value {
        Value::Text(text) => query.bind(text),
        Value::Time(time) => query.bind(time.map(stamp)),
        Value::Id(id) => query.bind(id.map(|id| id.to_string())),
        Value::Int(int) => query.bind(int),
        Value::Bool(flag) => query.bind(flag),
        Value::Texts(texts) => query.bind(texts.map(json_list)),
        Value::Ids(ids) => {
            let ids = ids.map(|ids| ids.iter().map(Uuid::to_string).collect::<Vec<_>>());
            query.bind(ids.map(|ids| json_list(&ids)))
        }
        Value::Now => query.bind(page.now.clone()),
    })
}

impl PageTransaction for SqliteTx<'_> {
    /// Moves the feed's clock to the number this transaction wrote its versions at (the
    /// clock's next): with one writer at a time, every number up to the clock's is
    /// committed.
    async fn versions_written(
        &mut self,
        _source: &str,
        _run: crate::model::RunId,
        _counts: &crate::model::PageCounts,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE feed_clock SET position = position + 1",
            &[],
            "moving the change feed's clock",
        )
        .await?;
        Ok(())
    }

    const RECORD_SEEN: &'static str = "INSERT INTO listing_seen (source, listing_id, external_id)
         SELECT $1, $2, value FROM json_each($3) WHERE true
         ON CONFLICT DO NOTHING";
    const FORGET_SEEN: &'static str = "DELETE FROM listing_seen
         WHERE source = $1 AND ($2 IS NULL OR listing_id IN (SELECT value FROM json_each($2)))";
    const COUNT_UNSEEN: &'static str = include_str!("queries/count_unseen.sql");
    const MARK_UNSEEN_DELETED: &'static str = include_str!("queries/mark_unseen_deleted.sql");
    // SQLite has no md5(): the digest comes computed.
    const KEEP_REJECTED: &'static str = "INSERT INTO rejected_records
             (source, external_id, reason, payload, payload_md5, first_seen_at, seen_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (source, payload_md5) DO UPDATE SET
             reason = excluded.reason,
             seen_at = excluded.seen_at,
             times_seen = rejected_records.times_seen + 1";

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
             WHERE source = $1
               AND external_id IN (SELECT value ->> 'external_id' FROM json_each($2))",
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
}

impl LeaseQueries for SqliteTx<'_> {
    // The clock's milliseconds: SQLite's `now` is one instant within a statement.
    lease_statements!(
        clock = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
        in_list = "IN (SELECT value FROM json_each($1))",
        skip_locked = "",
    );
}
