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

use uuid::Uuid;

use super::statements::{Statements, StoredRow, Value};
use super::{StoreError, TokenRefusal};
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
    let trimmable = [Value::Text(Some(source)), Value::Time(Some(before))];
    // Recorded first, in the same transaction: a reader whose token is not past the
    // newest version trimmed is refused ([`begin_read`]).
    let newest = tx
        .fetch_one(
            "SELECT max(feed_position) AS position FROM department_history
             WHERE source = $1 AND valid_to < $2 AND observed_at < $2",
            &trimmable,
            "finding what history would trim",
        )
        .await?
        .int("position")?;
    let Some(newest) = newest else {
        return Ok(0);
    };
    tx.execute(
        "INSERT INTO history_trimmed (source, position) VALUES ($1, $2)
         ON CONFLICT (source) DO UPDATE SET position = CASE
             WHEN history_trimmed.position < excluded.position THEN excluded.position
             ELSE history_trimmed.position END",
        &[Value::Text(Some(source)), Value::Int(newest)],
        "recording what history trims",
    )
    .await?;
    let trimmed = tx
        .execute(
            "DELETE FROM department_history
             WHERE source = $1 AND valid_to < $2 AND observed_at < $2",
            &trimmable,
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
    /// The feed's identity, its row locked until the transaction ends: `feed_id` (text),
    /// `handed_out` (the highest horizon handed out) and `bound` (whether the row was made
    /// in this very database; false in a copy of it).
    const FEED_IDENTITY: &'static str;
    /// Gives the feed the new id `$1` (text), made in this database, none handed out.
    const REBIND_FEED: &'static str;
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
    /// The token the read began from.
    since: FeedToken,
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
            since,
            horizon,
            // Before every version at or after `since`.
            place: FeedPlace {
                position: since.position,
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

/// Begins a read of the feed from `since` for `sources` (none: all), in `tx`, a
/// transaction whose commit is durable and makes every commit before it durable: the
/// token to read up to, which is the next one a reader gets.
///
/// `since` must be this feed's ([`TokenRefusal::OtherFeed`]; a copy of the database takes
/// a new identity here, the first time a reader finds it), no further than it has handed
/// out ([`TokenRefusal::Ahead`]), and past every version trimmed of `sources`
/// ([`TokenRefusal::Trimmed`]); [`FeedToken::START`] always reads from whatever history
/// holds. The horizon is recorded as handed out, and the transaction committed, before
/// it is returned: no token ever stands ahead of what a crash leaves on disk, so a
/// recovered server can never write versions behind it.
pub(crate) async fn begin_read<Q: FeedQueries>(
    mut tx: impl Statements,
    since: FeedToken,
    sources: &[String],
) -> Result<FeedToken, StoreError> {
    let horizon = tx
        .fetch_one(Q::FEED_HORIZON, &[], "reading the feed's horizon")
        .await?
        .required("horizon", StoredRow::int)?;
    let identity = tx
        .fetch_one(Q::FEED_IDENTITY, &[], "reading the feed's identity")
        .await?;
    let mut feed = identity.required("feed_id", StoredRow::id)?;
    let mut handed_out = identity.required("handed_out", StoredRow::int)?;
    let copy = !identity.required("bound", StoredRow::flag)?;
    if copy {
        feed = Uuid::new_v4();
        handed_out = 0;
        let new_id = feed.to_string();
        tx.execute(
            Q::REBIND_FEED,
            &[Value::Text(Some(&new_id))],
            "giving the copy's feed an identity of its own",
        )
        .await?;
        // What the original's retention trimmed was at its positions, not the copy's
        // (which may be another server's transaction ids): no token of the new identity
        // can have missed it.
        tx.execute(
            "DELETE FROM history_trimmed",
            &[],
            "forgetting what the original's history trimmed",
        )
        .await?;
        tracing::warn!(
            "this database is a copy of another (restored from a dump or a backup, or failed \
             over): its change feed takes a new identity, and readers read it again from \
             the beginning"
        );
    }
    if let Some(refusal) = refusal(&mut tx, since, feed, handed_out, sources).await? {
        if copy {
            // The copy's new identity stands, whatever this reader is told.
            tx.commit("giving the copy's feed an identity of its own")
                .await?;
        }
        return Err(StoreError::TokenRefused {
            token: since,
            refusal,
        });
    }
    // The horizon only moves on; a reader that asks again at once keeps its place.
    let horizon = horizon.max(since.position);
    tx.execute(
        "UPDATE feed_identity SET handed_out = CASE
             WHEN handed_out < $1 THEN $1 ELSE handed_out END",
        &[Value::Int(horizon)],
        "recording the horizon handed out",
    )
    .await?;
    tx.commit("handing out the feed's horizon").await?;
    Ok(FeedToken {
        feed: Some(feed),
        position: horizon,
    })
}

/// Why the feed `feed`, which has handed out tokens up to `handed_out`, refuses to read
/// on from `since` for `sources`, if it does.
async fn refusal(
    tx: &mut impl Statements,
    since: FeedToken,
    feed: Uuid,
    handed_out: i64,
    sources: &[String],
) -> Result<Option<TokenRefusal>, StoreError> {
    if since.is_start() {
        return Ok(None);
    }
    match since.feed {
        None => return Ok(Some(TokenRefusal::NoFeed)),
        Some(token_feed) if token_feed != feed => return Ok(Some(TokenRefusal::OtherFeed)),
        Some(_) if since.position > handed_out => return Ok(Some(TokenRefusal::Ahead)),
        Some(_) => {}
    }
    let trimmed = trimmed_since(tx, since, sources).await?;
    Ok((!trimmed.is_empty()).then_some(TokenRefusal::Trimmed { sources: trimmed }))
}

/// The sources of `sources` (none: every source) that had versions at or after `since`
/// trimmed: versions a reader at `since` has not read.
async fn trimmed_since(
    tx: &mut impl Statements,
    since: FeedToken,
    sources: &[String],
) -> Result<Vec<String>, StoreError> {
    let rows = tx
        .fetch(
            "SELECT source FROM history_trimmed WHERE position >= $1 ORDER BY source",
            &[Value::Int(since.position)],
            "reading what history trimmed",
        )
        .await?;
    let mut trimmed = Vec::new();
    for row in &rows {
        let source = row.required("source", StoredRow::text)?;
        if sources.is_empty() || sources.contains(&source) {
            trimmed.push(source);
        }
    }
    Ok(trimmed)
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
        Value::Int(reader.horizon.position),
        Value::Texts((!sources.is_empty()).then_some(&sources[..])),
        Value::Int(FEED_BATCH),
    ];
    let rows = tx
        .fetch(Q::READ_FEED, &values, "reading the change feed")
        .await?;
    // A retention that trimmed since the read began may have taken versions this batch
    // would have held (at or after where the read stands): looked for after the batch's
    // read, so that a trim it did not see is seen here.
    if !reader.since.is_start() {
        let standing = FeedToken {
            position: reader.place.position,
            ..reader.since
        };
        let trimmed = trimmed_since(&mut tx, standing, &reader.sources).await?;
        if !trimmed.is_empty() {
            return Err(StoreError::TokenRefused {
                token: reader.since,
                refusal: TokenRefusal::Trimmed { sources: trimmed },
            });
        }
    }
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
