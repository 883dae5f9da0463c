//! History and the change feed, written once for both stores.
//!
//! **History.** A page's commit ends by reconciling `department_versions` with what it
//! changed ([`record_versions`]): every department of the source whose row the
//! transaction changed (its `last_changed_at` is the transaction's instant) gets a new
//! version when what deptsync normalizes (name, active, parent, scope, deleted or not)
//! differs from its current one, which is closed where the new one opens. Nothing else
//! is compared, so a change of the raw record only, or a page that changed nothing,
//! writes no version; and a backfill that reads old updates again changes no row (a row
//! is never replaced by an older version), so it rewrites no history. The statements are
//! idempotent: a department looked at twice gets at most one version.
//!
//! When a version starts (`valid_from`): the vendor's update time where the API gives one
//! and it lies after the current version's start and no later than the commit; else the
//! commit's instant (a listing has no update times; a deletion is seen, not dated); never
//! before the current version's start.
//!
//! **The change feed.** Each backend says where a version stands in the feed and how far
//! a reader may read ([`FeedQueries`]): on PostgreSQL, versions are read in the order of
//! the transactions that wrote them and only up to the oldest transaction still running,
//! so that one that began earlier and commits later is never skipped; on SQLite, with one
//! writer at a time, in the order they were written. A [`FeedReader`] reads in batches up
//! to the horizon it took when it began, and ends with the token to read on from.

use chrono::Utc;

use super::StoreError;
use super::statements::{Statements, StoredRow, Value};
use crate::model::{DepartmentVersion, FeedToken, RunId};

/// The start of a statement that writes a version for each department of source `$1`
/// changed in this transaction (at its instant `$2`), by run `$3`, starting at the
/// expression `$valid_from` (its parts); the statement goes on after its `WHERE`.
macro_rules! changed_departments {
    ($($valid_from:expr),+) => {
        concat!(
            "INSERT INTO department_versions AS v (
                 source, external_id, scope_id, name, is_active, parent_external_id, deleted,
                 valid_from, valid_to, run_id, observed_at
             )
             SELECT d.source, d.external_id, d.scope_id, d.name, d.is_active,
                    d.parent_external_id, d.deleted_at IS NOT NULL, ",
            $($valid_from,)+
            ", NULL, $3, COALESCE($2, CURRENT_TIMESTAMP)
             FROM departments AS d
             WHERE d.source = $1 AND d.last_changed_at = COALESCE($2, CURRENT_TIMESTAMP)"
        )
    };
}

/// When a version written now would start: the vendor's update time of a live department
/// when there is one and it is not in the future, else now.
macro_rules! new_start {
    () => {
        "CASE WHEN d.deleted_at IS NULL
                   AND d.source_updated_at <= COALESCE($2, CURRENT_TIMESTAMP)
              THEN d.source_updated_at
              ELSE COALESCE($2, CURRENT_TIMESTAMP) END"
    };
}

/// Opens the first version of each department new in this transaction, and closes the
/// current version of each one whose versioned fields changed: where the new version will
/// start, its update time if that lies after the current version's start, else now (and
/// never before the current version's start). Each department is one probe of the index
/// of current versions (the statement is the arbiter's), whatever the planner knows of
/// the table's size: a join here could scan a source's every current version per page.
const OPEN_NEW_CLOSE_CHANGED: &str = concat!(
    changed_departments!(new_start!()),
    "
     ON CONFLICT (source, external_id) WHERE valid_to IS NULL DO UPDATE
     SET valid_to = CASE WHEN excluded.valid_from > v.valid_from THEN excluded.valid_from
                         WHEN COALESCE($2, CURRENT_TIMESTAMP) > v.valid_from
                         THEN COALESCE($2, CURRENT_TIMESTAMP)
                         ELSE v.valid_from END
     WHERE (v.scope_id, v.name, v.is_active, v.parent_external_id, v.deleted)
           IS DISTINCT FROM
           (excluded.scope_id, excluded.name, excluded.is_active,
            excluded.parent_external_id, excluded.deleted)"
);

/// Opens the next version of each department [`OPEN_NEW_CLOSE_CHANGED`] closed, where the
/// closed one ended; one that still has a current version is left alone.
const REOPEN_CHANGED: &str = concat!(
    changed_departments!(
        "COALESCE((SELECT max(p.valid_to) FROM department_versions AS p
                   WHERE p.source = d.source AND p.external_id = d.external_id), ",
        new_start!(),
        ")"
    ),
    "
       AND d.first_synced_at <> COALESCE($2, CURRENT_TIMESTAMP)
     ON CONFLICT (source, external_id) WHERE valid_to IS NULL DO NOTHING"
);

/// Writes the versions of what run `run` changed of `source` in this transaction (see the
/// module's documentation), `existing` when it changed a department stored before (not
/// only new ones); how many versions it opened.
pub(crate) async fn record_versions(
    tx: &mut impl Statements,
    source: &str,
    run: RunId,
    existing: bool,
) -> Result<u64, StoreError> {
    let values = [
        Value::Text(Some(source)),
        Value::Now,
        Value::Id(Some(run.0)),
    ];
    // One version opened per department that needs one: each new one, and each one
    // closed here, which the next statement opens again.
    let opened = tx
        .execute(OPEN_NEW_CLOSE_CHANGED, &values, "writing new versions")
        .await?;
    if existing {
        tx.execute(REOPEN_CHANGED, &values, "opening changed versions")
            .await?;
    }
    Ok(opened)
}

/// Deletes the versions of `source` that ended more than `retention` ago and were written
/// more than `retention` ago (so that a reader of the feed has had that long to read
/// them, whatever their dates); never a current one. How many it deleted.
pub(crate) async fn trim(
    mut tx: impl Statements,
    source: &str,
    retention: std::time::Duration,
) -> Result<u64, StoreError> {
    let before = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|retention| Utc::now().checked_sub_signed(retention));
    // A retention longer than the calendar goes back keeps everything.
    let Some(before) = before else {
        return Ok(0);
    };
    let trimmed = tx
        .execute(
            "DELETE FROM department_versions
             WHERE source = $1 AND valid_to IS NOT NULL AND valid_to < $2
               AND observed_at < $2",
            &[Value::Text(Some(source)), Value::Time(Some(before))],
            "trimming history",
        )
        .await?;
    tx.commit("trimming history").await?;
    Ok(trimmed)
}

/// How a backend reads its change feed: each one statement in its dialect.
pub trait FeedQueries {
    /// How far a reader may read now (`horizon`, an integer): every version before it is
    /// committed and no version before it can be written later.
    const FEED_HORIZON: &'static str;
    /// At most `$5` versions after the place `($1, $2)` (a position and a version id, in
    /// feed order), before the horizon `$3`, of the sources `$4` (a list; NULL: all), in
    /// feed order. The columns of [`DepartmentVersion`] and `position`, `run_id` as text.
    const READ_FEED: &'static str;
}

/// How many versions one call reads.
const FEED_BATCH: i64 = 1000;

/// Where a reader stands: after the version at `(position, version_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FeedPlace {
    position: i64,
    version_id: i64,
}

/// A read of the change feed from a token up to the horizon taken when it began, batch
/// by batch (`AnyStore::changes` begins one).
pub struct FeedReader<'a, S> {
    pub(crate) store: &'a S,
    sources: Vec<String>,
    horizon: FeedToken,
    place: FeedPlace,
    done: bool,
}

impl<'a, S> FeedReader<'a, S> {
    /// A read of `store`'s versions of `sources` (none: all) from `since` up to `horizon`
    /// (no earlier than `since`).
    pub(crate) fn new(
        store: &'a S,
        since: FeedToken,
        horizon: FeedToken,
        sources: &[String],
    ) -> FeedReader<'a, S> {
        FeedReader {
            store,
            sources: sources.to_vec(),
            horizon,
            // Before every version at or after `since`.
            place: FeedPlace {
                position: since.0,
                version_id: 0,
            },
            done: false,
        }
    }

    /// The token to read on from: every version before it has been read, once every batch
    /// has.
    pub fn next_token(&self) -> FeedToken {
        self.horizon
    }
}

/// Reads how far a reader may read now, in `tx`.
pub(crate) async fn horizon<Q: FeedQueries>(
    mut tx: impl Statements,
) -> Result<FeedToken, StoreError> {
    let rows = tx
        .fetch(Q::FEED_HORIZON, &[], "reading the feed's horizon")
        .await?;
    tx.commit("reading the feed's horizon").await?;
    let horizon = rows
        .first()
        .map(|row| row.required("horizon", StoredRow::int))
        .transpose()?
        .unwrap_or(0);
    Ok(FeedToken(horizon))
}

/// Reads the next batch of `reader` in `tx`, and moves it past them. `None` once done.
pub(crate) async fn next_batch<Q: FeedQueries, S>(
    reader: &mut FeedReader<'_, S>,
    mut tx: impl Statements,
) -> Result<Option<Vec<DepartmentVersion>>, StoreError> {
    if reader.done {
        return Ok(None);
    }
    let sources: Vec<&str> = reader.sources.iter().map(String::as_str).collect();
    let values = [
        Value::Int(reader.place.position),
        Value::Int(reader.place.version_id),
        Value::Int(reader.horizon.0),
        Value::Texts((!sources.is_empty()).then_some(&sources[..])),
        Value::Int(FEED_BATCH),
    ];
    let rows = tx
        .fetch(Q::READ_FEED, &values, "reading the change feed")
        .await?;
    tx.commit("reading the change feed").await?;
    let versions = rows
        .iter()
        .map(version)
        .collect::<Result<Vec<_>, StoreError>>()?;
    match versions.last() {
        Some(last) => {
            reader.place = FeedPlace {
                position: last.position,
                version_id: last.version_id,
            }
        }
        None => reader.done = true,
    }
    if (versions.len() as i64) < FEED_BATCH {
        reader.done = true;
    }
    Ok((!versions.is_empty()).then_some(versions))
}

/// A version as [`FeedQueries::READ_FEED`] selects it.
fn version(row: &impl StoredRow) -> Result<DepartmentVersion, StoreError> {
    Ok(DepartmentVersion {
        source: row.required("source", StoredRow::text)?,
        external_id: row.required("external_id", StoredRow::text)?,
        scope_id: row.text("scope_id")?,
        name: row.required("name", StoredRow::text)?,
        is_active: row.required("is_active", StoredRow::flag)?,
        parent_external_id: row.text("parent_external_id")?,
        deleted: row.required("deleted", StoredRow::flag)?,
        valid_from: row.required("valid_from", StoredRow::time)?,
        valid_to: row.time("valid_to")?,
        run_id: row.id("run_id")?.map(RunId),
        observed_at: row.required("observed_at", StoredRow::time)?,
        version_id: row.required("version_id", StoredRow::int)?,
        position: row.required("position", StoredRow::int)?,
    })
}
