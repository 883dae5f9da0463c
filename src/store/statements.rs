//! The statements both dialects share, written once.
//!
//! Both dialects say `INSERT … ON CONFLICT`, `CASE`, `COALESCE` and multi-row `VALUES`
//! alike, and both read `$n` as the n-th value bound (SQLite takes `$1` as a named
//! parameter, which sqlx binds by its number; one bound no value reads NULL there, which
//! [`debug_assert_bound`] catches in tests), so most of what a store does to a source's
//! state is one text for both. What differs is how a value travels: PostgreSQL has
//! `timestamptz` and `uuid`, SQLite keeps both as text (see `sqlite/mod.rs`). A statement
//! here takes [`Value`]s, and each backend binds them as it stores them
//! ([`Statements`]).
//!
//! The transaction's instant is [`Value::Now`], written `COALESCE($n, CURRENT_TIMESTAMP)`:
//! PostgreSQL binds NULL and its transaction's `now()` is used; SQLite binds the instant
//! its transaction took once it held the write lock.
//!
//! Statements only one dialect can say (arrays, `unnest`, `json_each`, `COPY`) stay in
//! that backend's folder.

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;
use super::lease::{self, Lease, LeaseQueries};
use crate::model::{
    BackfillRange, Ledger, LedgerWindow, ListingProgress, RunId, RunMode, RunOutcome, SourceStatus,
    StandingWithheld, SyncState, Window, WindowState, WithheldDeletions,
};

/// A value bound to a statement's parameter.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Text(Option<&'a str>),
    Time(Option<DateTime<Utc>>),
    Id(Option<Uuid>),
    Int(i64),
    Bool(bool),
    /// A list of texts: an array in PostgreSQL, a JSON array (read with `json_each`) in
    /// SQLite.
    Texts(Option<&'a [&'a str]>),
    /// A list of ids, as [`Value::Texts`].
    Ids(Option<&'a [Uuid]>),
    /// The transaction's instant (see the module's documentation).
    Now,
}

use Value::{Bool, Id, Int, Now, Text, Time};

/// A transaction that runs the shared statements, binding each [`Value`] as its backend
/// stores it. Both backends implement it with [`impl_statements`].
pub trait Statements: Send {
    /// A row the transaction's statements return.
    type Row: StoredRow + Send;

    /// Runs `sql` with `values` for `$1`, `$2`, …; how many rows it changed. `context`
    /// says what was being done, for its error.
    fn execute(
        &mut self,
        sql: &'static str,
        values: &[Value<'_>],
        context: &'static str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Runs `sql` with `values`; the rows it returns.
    fn fetch(
        &mut self,
        sql: &'static str,
        values: &[Value<'_>],
        context: &'static str,
    ) -> impl Future<Output = Result<Vec<Self::Row>, StoreError>> + Send;

    /// Runs `sql`, which returns one row, with `values`; that row.
    fn fetch_one(
        &mut self,
        sql: &'static str,
        values: &[Value<'_>],
        context: &'static str,
    ) -> impl Future<Output = Result<Self::Row, StoreError>> + Send {
        async move {
            self.fetch(sql, values, context)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Corrupt(format!("{context}: no row came back")))
        }
    }

    /// Commits the transaction (`context` says what it held, for its error). Dropping it
    /// instead rolls everything back.
    fn commit(self, context: &'static str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Implements [`Statements`] for a backend's transaction `$page` (a struct with a `tx`
/// field, a `sqlx::Transaction` of the backend), whose values `$bind(query, values, page)`
/// binds.
macro_rules! impl_statements {
    ($page:ident, $row:ty, $bind:path) => {
        impl crate::store::statements::Statements for $page<'_> {
            type Row = $row;

            async fn execute(
                &mut self,
                sql: &'static str,
                values: &[crate::store::statements::Value<'_>],
                context: &'static str,
            ) -> Result<u64, crate::store::StoreError> {
                crate::store::statements::debug_assert_bound(sql, values);
                let query = $bind(sqlx::query(sql), values, &*self);
                let done = query
                    .execute(&mut *self.tx)
                    .await
                    .map_err(crate::store::db(context))?;
                Ok(done.rows_affected())
            }

            async fn fetch(
                &mut self,
                sql: &'static str,
                values: &[crate::store::statements::Value<'_>],
                context: &'static str,
            ) -> Result<Vec<$row>, crate::store::StoreError> {
                crate::store::statements::debug_assert_bound(sql, values);
                let query = $bind(sqlx::query(sql), values, &*self);
                query
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(crate::store::db(context))
            }

            async fn commit(self, context: &'static str) -> Result<(), crate::store::StoreError> {
                self.tx.commit().await.map_err(crate::store::db(context))
            }
        }
    };
}
pub(crate) use impl_statements;

/// The highest `$n` that `sql` names (in its comments too).
pub(crate) fn highest_parameter(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// In tests and debug builds, fails a statement given fewer values than it names: SQLite
/// would read NULL for the rest without a word (and `COALESCE($n, CURRENT_TIMESTAMP)` an
/// instant in another format).
pub(crate) fn debug_assert_bound(sql: &str, values: &[Value<'_>]) {
    debug_assert!(
        highest_parameter(sql) <= values.len(),
        "a statement names ${} but {} values are bound: {sql}",
        highest_parameter(sql),
        values.len()
    );
}

/// A row read back, its columns by name. Instants are read as the backend keeps them;
/// ids are selected as text (`CAST(… AS TEXT)`), which both dialects can say.
pub trait StoredRow {
    fn text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn time(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    fn int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn flag(&self, column: &str) -> Result<Option<bool>, StoreError>;

    /// An id column, selected as text.
    fn id(&self, column: &str) -> Result<Option<Uuid>, StoreError> {
        self.text(column)?
            .map(|text| {
                Uuid::parse_str(&text).map_err(|e| {
                    StoreError::Corrupt(format!("{column} {text:?} is not a uuid: {e}"))
                })
            })
            .transpose()
    }

    /// A column that must hold a value.
    fn required<T>(
        &self,
        column: &str,
        read: impl Fn(&Self, &str) -> Result<Option<T>, StoreError>,
    ) -> Result<T, StoreError>
    where
        Self: Sized,
    {
        read(self, column)?
            .ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL in a stored row")))
    }
}

impl<R> StoredRow for R
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<DateTime<Utc>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<bool>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.try_get(column)
            .map_err(super::db("reading a stored row"))
    }

    fn time(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.try_get(column)
            .map_err(super::db("reading a stored row"))
    }

    fn int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(column)
            .map_err(super::db("reading a stored row"))
    }

    fn flag(&self, column: &str) -> Result<Option<bool>, StoreError> {
        self.try_get(column)
            .map_err(super::db("reading a stored row"))
    }
}

/// How `sync_windows` keeps a window's state: its `state` and `cursor` columns.
pub(crate) fn window_columns(state: &WindowState) -> (&'static str, Option<&str>) {
    match state {
        WindowState::Pending => ("pending", None),
        WindowState::InProgress { cursor } => ("in_progress", Some(cursor.as_str())),
        WindowState::Done => ("done", None),
    }
}

/// Replaces the `ledger.mode()` ledger of `source` with `ledger`: its windows and its range.
pub(crate) async fn replace_ledger(
    tx: &mut impl Statements,
    source: &str,
    ledger: &Ledger,
) -> Result<(), StoreError> {
    let mode = Text(Some(ledger.mode().as_str()));
    tx.execute(
        "DELETE FROM sync_windows WHERE source = $1 AND mode = $2",
        &[Text(Some(source)), mode],
        "replacing the window ledger",
    )
    .await?;
    for entry in &ledger.windows {
        let (state, cursor) = window_columns(&entry.state);
        tx.execute(
            "INSERT INTO sync_windows (source, mode, window_start, window_end, state, cursor)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                Text(Some(source)),
                mode,
                Time(Some(entry.window.start)),
                Time(Some(entry.window.end)),
                Text(Some(state)),
                Text(cursor),
            ],
            "writing the window ledger",
        )
        .await?;
    }
    match ledger.backfill {
        None => {
            tx.execute(
                "INSERT INTO sync_state (source, incremental_until, updated_at)
                 VALUES ($1, $2, COALESCE($3, CURRENT_TIMESTAMP))
                 ON CONFLICT (source) DO UPDATE SET
                     incremental_until = excluded.incremental_until,
                     updated_at = excluded.updated_at",
                &[Text(Some(source)), Time(Some(ledger.until)), Now],
                "saving the checkpoint",
            )
            .await?
        }
        Some(range) => {
            tx.execute(
                "INSERT INTO sync_state
                     (source, backfill_from, backfill_to, backfill_until, updated_at)
                 VALUES ($1, $2, $3, $4, COALESCE($5, CURRENT_TIMESTAMP))
                 ON CONFLICT (source) DO UPDATE SET
                     backfill_from = excluded.backfill_from,
                     backfill_to = excluded.backfill_to,
                     backfill_until = excluded.backfill_until,
                     updated_at = excluded.updated_at",
                &[
                    Text(Some(source)),
                    Time(Some(range.from)),
                    Time(range.requested_to),
                    Time(Some(ledger.until)),
                    Now,
                ],
                "saving the checkpoint",
            )
            .await?
        }
    };
    Ok(())
}

/// Moves `window` of the `mode` ledger to `cursor` (in progress), or with `None` to done.
/// `false` when the ledger holds no such window.
pub(crate) async fn move_window(
    tx: &mut impl Statements,
    source: &str,
    mode: RunMode,
    window: &Window,
    cursor: Option<&str>,
) -> Result<bool, StoreError> {
    let moved = tx
        .execute(
            "UPDATE sync_windows
             SET state = CASE WHEN $5 IS NULL THEN 'done' ELSE 'in_progress' END, cursor = $5
             WHERE source = $1 AND mode = $2 AND window_start = $3 AND window_end = $4",
            &[
                Text(Some(source)),
                Text(Some(mode.as_str())),
                Time(Some(window.start)),
                Time(Some(window.end)),
                Text(cursor),
            ],
            "saving the window's position",
        )
        .await?;
    Ok(moved == 1)
}

/// Replaces `window` of the `mode` ledger by `halves`, both pending. `false` when the
/// ledger holds no such window.
pub(crate) async fn split_window(
    tx: &mut impl Statements,
    source: &str,
    mode: RunMode,
    window: &Window,
    [first, second]: &[Window; 2],
) -> Result<bool, StoreError> {
    let (source, mode) = (Text(Some(source)), Text(Some(mode.as_str())));
    let replaced = tx
        .execute(
            "DELETE FROM sync_windows
             WHERE source = $1 AND mode = $2 AND window_start = $3 AND window_end = $4",
            &[
                source,
                mode,
                Time(Some(window.start)),
                Time(Some(window.end)),
            ],
            "splitting the window",
        )
        .await?;
    if replaced != 1 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO sync_windows (source, mode, window_start, window_end, state)
         VALUES ($1, $2, $3, $4, $7), ($1, $2, $5, $6, $7)",
        &[
            source,
            mode,
            Time(Some(first.start)),
            Time(Some(first.end)),
            Time(Some(second.start)),
            Time(Some(second.end)),
            Text(Some(window_columns(&WindowState::Pending).0)),
        ],
        "splitting the window",
    )
    .await?;
    Ok(true)
}

/// When every window of the `mode` ledger is done, drops the ledger, its windows and its
/// range; an incremental ledger first makes its end the high-water mark. That end is the
/// database's clock when the pass was planned, and one source's passes never overlap, so
/// a mark past it can only be one no pass read up to (a fast host's clock set it, or the
/// database's clock stepped back): it is replaced. A ledger with a window not done is
/// left as it is.
pub(crate) async fn finish_ledger_if_done(
    tx: &mut impl Statements,
    source: &str,
    mode: RunMode,
) -> Result<(), StoreError> {
    let cleared = tx
        .execute(
            "DELETE FROM sync_windows
             WHERE source = $1 AND mode = $2
               AND NOT EXISTS (SELECT 1 FROM sync_windows o
                               WHERE o.source = $1 AND o.mode = $2 AND o.state <> 'done')",
            &[Text(Some(source)), Text(Some(mode.as_str()))],
            "clearing the finished ledger",
        )
        .await?;
    if cleared == 0 {
        return Ok(());
    }
    let finish = match mode {
        RunMode::Incremental => {
            "UPDATE sync_state
             SET high_water_mark = COALESCE(incremental_until, high_water_mark),
                 incremental_until = NULL, updated_at = COALESCE($2, CURRENT_TIMESTAMP)
             WHERE source = $1"
        }
        RunMode::Backfill => {
            "UPDATE sync_state
             SET backfill_from = NULL, backfill_to = NULL, backfill_until = NULL,
                 updated_at = COALESCE($2, CURRENT_TIMESTAMP)
             WHERE source = $1"
        }
    };
    tx.execute(finish, &[Text(Some(source)), Now], "saving the checkpoint")
        .await?;
    Ok(())
}

/// Records that `source`'s listing goes on at `progress`, this page having rewritten a
/// stored row or not. A first listing starts the clock of the mass-deletion guard (at the
/// transaction's instant); the same listing going on, or a confirming one, keeps it.
pub(crate) async fn continue_listing(
    tx: &mut impl Statements,
    source: &str,
    progress: &ListingProgress,
    rewrote: bool,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO sync_state AS s (source, listing_id, listing_cursor, listing_confirms,
                                      listing_started_at, listing_rewrote, updated_at)
         VALUES ($1, $2, $3, $4, COALESCE($6, CURRENT_TIMESTAMP), $5,
                 COALESCE($6, CURRENT_TIMESTAMP))
         ON CONFLICT (source) DO UPDATE SET
             listing_started_at = CASE
                 WHEN s.listing_id = excluded.listing_id OR excluded.listing_confirms IS NOT NULL
                 THEN COALESCE(s.listing_started_at, excluded.updated_at)
                 ELSE excluded.updated_at END,
             listing_rewrote = CASE WHEN s.listing_id = excluded.listing_id
                                    THEN s.listing_rewrote OR excluded.listing_rewrote
                                    ELSE excluded.listing_rewrote END,
             listing_id = excluded.listing_id,
             listing_cursor = excluded.listing_cursor,
             listing_confirms = excluded.listing_confirms,
             updated_at = excluded.updated_at",
        &[
            Text(Some(source)),
            Id(Some(progress.listing_id)),
            Text(progress.cursor.as_deref()),
            Id(progress.confirms),
            Bool(rewrote),
            Now,
        ],
        "saving the checkpoint",
    )
    .await?;
    Ok(())
}

/// Records that the complete listing `listing_id` of `source` awaits a confirming one:
/// no listing in progress; the clock kept when it is the listing in progress (its first
/// page was stored before), started now when it was a listing of one page.
pub(crate) async fn await_confirmation(
    tx: &mut impl Statements,
    source: &str,
    listing_id: Uuid,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO sync_state AS s (source, listing_confirms, listing_started_at, updated_at)
         VALUES ($1, $2, COALESCE($3, CURRENT_TIMESTAMP), COALESCE($3, CURRENT_TIMESTAMP))
         ON CONFLICT (source) DO UPDATE SET
             listing_id = NULL,
             listing_cursor = NULL,
             listing_confirms = excluded.listing_confirms,
             listing_started_at = CASE WHEN s.listing_id = $2 THEN s.listing_started_at
                                       ELSE excluded.updated_at END,
             updated_at = excluded.updated_at",
        &[Text(Some(source)), Id(Some(listing_id)), Now],
        "saving the checkpoint",
    )
    .await?;
    Ok(())
}

/// Clears the listing state of `source`: no listing in progress, none awaiting
/// confirmation, no clock.
pub(crate) async fn end_listings(tx: &mut impl Statements, source: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE sync_state SET listing_id = NULL, listing_cursor = NULL, listing_confirms = NULL,
                               listing_started_at = NULL,
                               updated_at = COALESCE($2, CURRENT_TIMESTAMP)
         WHERE source = $1",
        &[Text(Some(source)), Now],
        "saving the checkpoint",
    )
    .await?;
    Ok(())
}

/// Drops the listing in progress of `source` and where it goes on, keeping what it
/// confirms (a confirming listing stays one when it starts again). Its pages may have
/// rewritten rows that the trusted listing's pages hold otherwise: no page digest is
/// trusted until a listing completes again.
pub(crate) async fn abandon_listing(
    tx: &mut impl Statements,
    source: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM listing_page_digests WHERE source = $1",
        &[Text(Some(source))],
        "distrusting the listing's pages",
    )
    .await?;
    tx.execute(
        "UPDATE sync_state SET listing_id = NULL, listing_cursor = NULL, trusted_listing = NULL,
                               updated_at = COALESCE($2, CURRENT_TIMESTAMP)
         WHERE source = $1",
        &[Text(Some(source)), Now],
        "saving the checkpoint",
    )
    .await?;
    Ok(())
}

/// Records that the guard withholds `withheld` for `source` (over the whole source, or
/// over its scope), standing since `since` unless it stood already: then since when it
/// first did.
pub(crate) async fn withhold(
    tx: &mut impl Statements,
    source: &str,
    withheld: &WithheldDeletions,
    since: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (guard, scope) = match &withheld.scope {
        None => ("source", ""),
        Some(scope) => ("scope", scope.as_str()),
    };
    tx.execute(
        "INSERT INTO withheld_deletions
             (source, guard, scope, since, would_delete, live, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, CURRENT_TIMESTAMP))
         ON CONFLICT (source, guard, scope) DO UPDATE SET
             would_delete = excluded.would_delete,
             live = excluded.live,
             updated_at = excluded.updated_at",
        &[
            Text(Some(source)),
            Text(Some(guard)),
            Text(Some(scope)),
            Time(Some(since)),
            Int(withheld.would_delete as i64),
            Int(withheld.live as i64),
            Now,
        ],
        "recording the deletions the guard withholds",
    )
    .await?;
    Ok(())
}

/// Ends the guard's verdict over `scope` of `source` (`None`: over the whole source).
pub(crate) async fn release_withheld(
    tx: &mut impl Statements,
    source: &str,
    scope: Option<&str>,
) -> Result<(), StoreError> {
    let (guard, scope) = match scope {
        None => ("source", ""),
        Some(scope) => ("scope", scope),
    };
    tx.execute(
        "DELETE FROM withheld_deletions WHERE source = $1 AND guard = $2 AND scope = $3",
        &[Text(Some(source)), Text(Some(guard)), Text(Some(scope))],
        "ending a verdict of the guard",
    )
    .await?;
    Ok(())
}

/// The scopes of `source` over which a verdict of the guard stands.
pub(crate) async fn withheld_scopes(
    tx: &mut impl Statements,
    source: &str,
) -> Result<Vec<String>, StoreError> {
    tx.fetch(
        "SELECT scope FROM withheld_deletions WHERE source = $1 AND guard = 'scope'",
        &[Text(Some(source))],
        "reading the guard's verdicts",
    )
    .await?
    .iter()
    .map(|row| row.required("scope", StoredRow::text))
    .collect()
}

/// Adds a page to the counts of `run`: `fetched` records, `pages` (0 or 1) pages, and
/// what it wrote. `false` when the run is not recorded.
pub(crate) async fn count_page(
    tx: &mut impl Statements,
    run: RunId,
    counts: &crate::model::PageCounts,
    fetched: u64,
    pages: u64,
) -> Result<bool, StoreError> {
    let counted = tx
        .execute(
            "UPDATE sync_runs SET pages = pages + $8, fetched = fetched + $2,
                    inserted = inserted + $3, updated = updated + $4,
                    unchanged = unchanged + $5, rejected = rejected + $6, deleted = deleted + $7
             WHERE run_id = $1",
            &[
                Id(Some(run.0)),
                Int(fetched as i64),
                Int(counts.inserted as i64),
                Int(counts.updated as i64),
                Int(counts.unchanged as i64),
                Int(counts.rejected as i64),
                Int(counts.deleted as i64),
                Int(pages as i64),
            ],
            "counting the page in its run",
        )
        .await?;
    Ok(counted == 1)
}

/// Records a new run of `lease`'s source as `running`, by its holder under its fence.
/// The lease is checked first (see [`lease::check`]): any other run of the source still
/// marked `running` then belongs to a process that died or lost its lease, and is
/// recorded as failed.
pub(crate) async fn start_run<T: LeaseQueries>(
    mut tx: T,
    lease: &Lease,
    mode: RunMode,
) -> Result<RunId, StoreError> {
    lease::check(&mut tx, lease).await?;
    let source = lease.source.as_str();
    let run_id = Uuid::new_v4();
    let abandoned = tx
        .execute(
            "UPDATE sync_runs SET status = 'failed', finished_at = COALESCE($2, CURRENT_TIMESTAMP),
                    error = 'abandoned: the process running it stopped, or lost its lease, \
                             before it finished'
             WHERE source = $1 AND status = 'running'",
            &[Text(Some(source)), Now],
            "closing runs abandoned by a stopped process",
        )
        .await?;
    if abandoned > 0 {
        tracing::warn!(
            source,
            abandoned,
            "runs left running by a stopped process recorded as failed"
        );
    }
    tx.execute(
        "INSERT INTO sync_runs (run_id, source, mode, started_at, holder, fence, due_at)
         VALUES ($1, $2, $3, COALESCE($4, CURRENT_TIMESTAMP), $5, $6, $7)",
        &[
            Id(Some(run_id)),
            Text(Some(source)),
            Text(Some(mode.as_str())),
            Now,
            Text(Some(&lease.holder)),
            Int(lease.fence),
            Time(lease.due),
        ],
        "recording the start of the run",
    )
    .await?;
    tx.commit("recording the start of the run").await?;
    Ok(RunId(run_id))
}

/// Records how `run` ended.
pub(crate) async fn finish_run(
    mut tx: impl Statements,
    run: RunId,
    outcome: &RunOutcome,
) -> Result<(), StoreError> {
    let error = outcome.error().map(super::escape_nul);
    tx.execute(
        "UPDATE sync_runs SET finished_at = COALESCE($2, CURRENT_TIMESTAMP), status = $3,
                              error = $4
         WHERE run_id = $1",
        &[
            Id(Some(run.0)),
            Now,
            Text(Some(outcome.status())),
            Text(error.as_deref()),
        ],
        "recording the end of the run",
    )
    .await?;
    tx.commit("recording the end of the run").await
}

/// Records that `source`'s saved position is a position of `scope`. With `reset` (why),
/// first drops the position: the window ledgers, the trusted page digests, the
/// high-water mark and the listing state (what listings saw is the backend's to drop);
/// rows stay. Records when and why.
pub(crate) async fn set_scope(
    tx: &mut impl Statements,
    source: &str,
    scope: Option<&str>,
    reset: Option<&str>,
) -> Result<(), StoreError> {
    if reset.is_some() {
        tx.execute(
            "DELETE FROM sync_windows WHERE source = $1",
            &[Text(Some(source))],
            "dropping the source's position",
        )
        .await?;
        tx.execute(
            "DELETE FROM listing_page_digests WHERE source = $1",
            &[Text(Some(source))],
            "dropping the source's position",
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO sync_state AS s (source, scope_fingerprint, reset_at, reset_reason, updated_at)
         VALUES ($1, $2, CASE WHEN $3 IS NOT NULL THEN COALESCE($4, CURRENT_TIMESTAMP) END, $3,
                 COALESCE($4, CURRENT_TIMESTAMP))
         ON CONFLICT (source) DO UPDATE SET
             scope_fingerprint = excluded.scope_fingerprint,
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
             reset_at = CASE WHEN $3 IS NULL THEN s.reset_at ELSE excluded.updated_at END,
             reset_reason = COALESCE($3, s.reset_reason),
             updated_at = excluded.updated_at",
        &[Text(Some(source)), Text(scope), Text(reset), Now],
        "recording what the source's position is a position of",
    )
    .await?;
    Ok(())
}

/// The database's instant now (its transaction's, on PostgreSQL), read in `tx`; SQLite's
/// is its host's.
pub(crate) async fn now(tx: &mut impl Statements) -> Result<DateTime<Utc>, StoreError> {
    tx.fetch_one(
        "SELECT COALESCE($1, CURRENT_TIMESTAMP) AS now",
        &[Now],
        "reading the database's clock",
    )
    .await?
    .required("now", StoredRow::time)
}

/// The database's instant now, in a transaction of its own.
pub(crate) async fn clock(mut tx: impl Statements) -> Result<DateTime<Utc>, StoreError> {
    let now = now(&mut tx).await?;
    tx.commit("reading the database's clock").await?;
    Ok(now)
}

/// Where `source` stands: its `sync_state` row and its window ledgers, read in `tx` (one
/// transaction: no commit of the source falls between the two reads).
pub(crate) async fn load_state(
    mut tx: impl Statements,
    source: &str,
) -> Result<SyncState, StoreError> {
    let states = tx
        .fetch(
            "SELECT high_water_mark, incremental_until, backfill_from, backfill_to,
                    backfill_until, CAST(listing_id AS TEXT) AS listing_id, listing_cursor,
                    CAST(listing_confirms AS TEXT) AS listing_confirms, scope_fingerprint
             FROM sync_state WHERE source = $1",
            &[Text(Some(source))],
            "loading the sync state",
        )
        .await?;
    let Some(row) = states.first() else {
        return Ok(SyncState::default());
    };
    let columns = StateColumns {
        high_water_mark: row.time("high_water_mark")?,
        incremental_until: row.time("incremental_until")?,
        backfill_from: row.time("backfill_from")?,
        backfill_to: row.time("backfill_to")?,
        backfill_until: row.time("backfill_until")?,
        listing_id: row.id("listing_id")?,
        listing_cursor: row.text("listing_cursor")?,
        listing_confirms: row.id("listing_confirms")?,
        scope_fingerprint: row.text("scope_fingerprint")?,
    };
    let windows = tx
        .fetch(
            "SELECT mode, window_start, window_end, state, cursor FROM sync_windows
             WHERE source = $1 ORDER BY mode, window_start",
            &[Text(Some(source))],
            "loading the window ledger",
        )
        .await?
        .iter()
        .map(|row| {
            let window = Window {
                start: row.required("window_start", StoredRow::time)?,
                end: row.required("window_end", StoredRow::time)?,
            };
            let state = row.required("state", StoredRow::text)?;
            let state = window_state(source, window, &state, row.text("cursor")?)?;
            Ok((run_mode(&row.required("mode", StoredRow::text)?)?, state))
        })
        .collect::<Result<Vec<(RunMode, LedgerWindow)>, StoreError>>()?;
    tx.commit("loading the sync state").await?;
    Ok(columns.into_state(windows))
}

/// One line of `status` from a row of a backend's status statement.
pub(crate) fn source_status(row: &impl StoredRow) -> Result<SourceStatus, StoreError> {
    let high_water_mark = row.time("high_water_mark")?;
    let windows = (
        row.int("windows_left")?.unwrap_or(0),
        row.int("windows_planned")?.unwrap_or(0),
    );
    Ok(SourceStatus {
        source: row.required("source", StoredRow::text)?,
        state: row
            .text("last_status")?
            .unwrap_or_else(|| "never run".to_owned()),
        last_run_started_at: row.time("last_started_at")?,
        last_run_finished_at: row.time("last_finished_at")?,
        last_success_at: row.time("last_success_at")?,
        last_error: row.text("last_error")?,
        last_error_at: row.time("last_error_at")?,
        high_water_mark,
        position: describe_position(high_water_mark, windows, row.text("listing_cursor")?),
        first_run_at: row.time("first_run_at")?,
        live_rows: row.int("live_rows")?.unwrap_or(0),
        deleted_rows: row.int("deleted_rows")?.unwrap_or(0),
        rejected_records: row.int("rejected")?.unwrap_or(0),
        backfill_in_progress: row.flag("backfill_in_progress")?.unwrap_or(false),
        reset: row.text("reset_reason")?,
        reset_at: row.time("reset_at")?,
        registered_at: row.time("registered_at")?,
        lease_holder: row.text("lease_holder")?,
        lease_fence: row.int("lease_fence")?,
        lease_expires_at: row
            .int("lease_expires_ms")?
            .and_then(DateTime::from_timestamp_millis),
        next_due_at: row
            .int("next_due_ms")?
            .and_then(DateTime::from_timestamp_millis),
        withheld_deletions: row
            .time("withheld_since")?
            .map(|since| {
                Ok::<_, StoreError>(StandingWithheld {
                    since,
                    would_delete: row.int("withheld_would_delete")?.unwrap_or(0) as u64,
                    live: row.int("withheld_live")?.unwrap_or(0) as u64,
                    scopes: row.int("withheld_scopes")?.unwrap_or(0) as u64,
                })
            })
            .transpose()?,
    })
}

/// One line per source of `sources` and of any other the store has seen, from the
/// backend's status statement `sql` (which takes the names as a list, `$1`).
pub(crate) async fn status(
    mut tx: impl Statements,
    sql: &'static str,
    sources: &[String],
) -> Result<Vec<SourceStatus>, StoreError> {
    let names: Vec<&str> = sources.iter().map(String::as_str).collect();
    let rows = tx
        .fetch(sql, &[Value::Texts(Some(&names))], "reading the status")
        .await?;
    tx.commit("reading the status").await?;
    rows.iter().map(source_status).collect()
}

/// Records that the service has `sources` on its schedule, for those it did not have
/// before, with the backend's statement `sql` (the names as a list `$1`, the instant `$2`).
pub(crate) async fn register(
    mut tx: impl Statements,
    sql: &'static str,
    sources: &[String],
) -> Result<(), StoreError> {
    let names: Vec<&str> = sources.iter().map(String::as_str).collect();
    tx.execute(
        sql,
        &[Value::Texts(Some(&names)), Now],
        "registering the scheduled sources",
    )
    .await?;
    tx.commit("registering the scheduled sources").await
}

/// A source's `sync_state` columns, as both stores read them.
pub(crate) struct StateColumns {
    high_water_mark: Option<DateTime<Utc>>,
    incremental_until: Option<DateTime<Utc>>,
    backfill_from: Option<DateTime<Utc>>,
    backfill_to: Option<DateTime<Utc>>,
    backfill_until: Option<DateTime<Utc>>,
    listing_id: Option<Uuid>,
    listing_cursor: Option<String>,
    listing_confirms: Option<Uuid>,
    scope_fingerprint: Option<String>,
}

impl StateColumns {
    /// The state these columns and the source's window ledgers (its `sync_windows` rows,
    /// each with its mode, oldest first) say.
    fn into_state(self, windows: Vec<(RunMode, LedgerWindow)>) -> SyncState {
        let (incremental_windows, backfill_windows): (Vec<_>, Vec<_>) = windows
            .into_iter()
            .partition(|(mode, _)| *mode == RunMode::Incremental);
        let only_windows = |windows: Vec<(RunMode, LedgerWindow)>| {
            windows.into_iter().map(|(_, window)| window).collect()
        };
        let incremental = self.incremental_until.map(|until| Ledger {
            until,
            backfill: None,
            windows: only_windows(incremental_windows),
        });
        let backfill = match (self.backfill_from, self.backfill_until) {
            (Some(from), Some(until)) => Some(Ledger {
                until,
                backfill: Some(BackfillRange {
                    from,
                    requested_to: self.backfill_to,
                }),
                windows: only_windows(backfill_windows),
            }),
            _ => None,
        };
        let confirms = self.listing_confirms;
        let listing = self.listing_id.map(|listing_id| ListingProgress {
            listing_id,
            cursor: self.listing_cursor,
            confirms,
        });
        let pending_confirmation = if listing.is_none() { confirms } else { None };
        SyncState {
            high_water_mark: self.high_water_mark,
            incremental,
            backfill,
            listing,
            pending_confirmation,
            scope: self.scope_fingerprint,
        }
    }
}

/// The mode a `sync_windows.mode` value names.
fn run_mode(mode: &str) -> Result<RunMode, StoreError> {
    match mode {
        "incremental" => Ok(RunMode::Incremental),
        "backfill" => Ok(RunMode::Backfill),
        other => Err(StoreError::Corrupt(format!(
            "unknown ledger mode {other:?}"
        ))),
    }
}

/// The state of `window` (of `source`) from its `state` and `cursor` columns.
fn window_state(
    source: &str,
    window: Window,
    state: &str,
    cursor: Option<String>,
) -> Result<LedgerWindow, StoreError> {
    let state = match (state, cursor) {
        ("pending", _) => WindowState::Pending,
        ("done", _) => WindowState::Done,
        ("in_progress", Some(cursor)) => WindowState::InProgress { cursor },
        (state, _) => {
            return Err(StoreError::Corrupt(format!(
                "window {window} of {source} is in an unknown state {state:?}"
            )));
        }
    };
    Ok(LedgerWindow { window, state })
}

/// Where a source stands, for `status`.
fn describe_position(
    high_water_mark: Option<DateTime<Utc>>,
    windows: (i64, i64),
    listing_cursor: Option<String>,
) -> String {
    let (left, planned) = windows;
    match (planned > 0, listing_cursor, high_water_mark) {
        (true, _, _) => format!("resumes: {left} of {planned} windows left"),
        (false, Some(cursor), _) => format!("resumes listing at {cursor}"),
        (false, None, Some(mark)) => format!("read up to {}", mark.format("%Y-%m-%d %H:%M:%SZ")),
        (false, None, None) => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_parameter_is_found_wherever_it_is() {
        assert_eq!(highest_parameter("SELECT 1"), 0);
        assert_eq!(highest_parameter("SELECT $2, $10::text[] -- and $3"), 10);
        assert_eq!(highest_parameter("SELECT '$' || $1"), 1);
    }
}
