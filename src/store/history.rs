//! History and the change feed: how both stores read the feed, written once, and where
//! each store keeps the rules of history (its triggers).
//!
//! **History.** A department's current version is its row of `departments` (its
//! `version_*` columns); its earlier versions are rows of `department_history`;
//! `department_versions` shows both. Each database closes a version itself, with a trigger
//! on `departments` (see the migrations `*_history.sql`): an update that changes what
//! deptsync normalizes (name, active, parent, scope, deleted or not) moves the current
//! version to `department_history`, ending where the new one starts, in the page's own
//! transaction, whichever statement wrote it. So a new department costs nothing but its
//! row (a first sync writes what it wrote before), a change of the raw record only writes
//! no version, and a backfill that reads old updates again changes no row (a row is never
//! replaced by an older version), so it rewrites no history. A version's run is the
//! source's run under way when it was committed (a source's runs never overlap), which
//! the view finds: writing a department costs nothing more.
//!
//! When a version starts (`valid_from`): the vendor's update time where the API gives one
//! and it lies after the previous version's start and no later than the commit; else the
//! commit's instant (a listing has no update times; a deletion is seen, not dated); never
//! before the previous version's start.
//!
//! **The change feed.** Each backend says where a version stands in the feed and how far
//! a reader may read ([`FeedQueries`]): on PostgreSQL, versions are read in the order of
//! the transactions that wrote them and only up to the oldest transaction still running,
//! so that one that began earlier and commits later is never skipped; on SQLite, with one
//! writer at a time, in the order of the page transactions that wrote them. A
//! [`FeedReader`] reads in batches, in `(position, source, external_id, seq)` order, up
//! to the horizon it took when it began, and ends with the token to read on from.

use super::StoreError;
use super::statements::{Statements, StoredRow, Value};
use crate::model::{DepartmentVersion, FeedToken, RunId};

/// Deletes the versions of `source` that ended more than `retention` ago and were written
/// more than `retention` ago (so that a reader of the feed has had that long to read
/// them, whatever their dates); never a current one. How many it deleted.
pub(crate) async fn trim(
    mut tx: impl Statements,
    source: &str,
    retention: std::time::Duration,
) -> Result<u64, StoreError> {
    // The database's clock, as for every instant a pass decides by.
    let now = super::statements::now(&mut tx).await?;
    let before = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|retention| now.checked_sub_signed(retention));
    // A retention longer than the calendar goes back keeps everything.
    let Some(before) = before else {
        return Ok(0);
    };
    let trimmed = tx
        .execute(
            "DELETE FROM department_history
             WHERE source = $1 AND valid_to < $2 AND observed_at < $2",
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
    /// At most `$7` versions after the place `($1, $2, $3, $4)` (a position, a source, an
    /// external id and a sequence, in feed order), before the horizon `$5`, of the sources
    /// `$6` (a list; NULL: all), in feed order. The columns of [`DepartmentVersion`],
    /// `run_id` as text.
    const READ_FEED: &'static str;
}

/// How many versions one call reads (a few MiB at most). Versions that share a position
/// (an upgrade's, one listing's deletions) are sorted anew by each call that reads
/// them: fewer, larger calls sort them fewer times.
const FEED_BATCH: i64 = 5000;

/// Where a reader stands: after the version at `(position, source, external_id, seq)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FeedPlace {
    position: i64,
    source: String,
    external_id: String,
    seq: i64,
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
                source: String::new(),
                external_id: String::new(),
                seq: 0,
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
        Value::Text(Some(&reader.place.source)),
        Value::Text(Some(&reader.place.external_id)),
        Value::Int(reader.place.seq),
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
                source: last.source.clone(),
                external_id: last.external_id.clone(),
                seq: last.seq,
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
        position: row.required("position", StoredRow::int)?,
        seq: row.required("seq", StoredRow::int)?,
    })
}
