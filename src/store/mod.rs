//! Where departments and positions are kept, behind the [`Store`] trait.
//!
//! The interface speaks only the words of [`crate::model`]: no SQL types cross it, so that
//! two implementations stand side by side: PostgreSQL ([`postgres::PgStore`]) for
//! production, and SQLite ([`sqlite::SqliteStore`]), a file beside the binary, the
//! embedded default. [`AnyStore`] is "the configured store": the URL picks which. The one
//! promise that matters most is [`Store::commit_page`]: a page's departments and the
//! checkpoint that follows them are committed in one transaction, so a crash anywhere
//! loses nothing and repeats at most one page.
//!
//! The rules both implementations follow are written once: what a page commit does to a
//! source's state and when a listing may delete ([`checkpoint`]), who may write a
//! source's pass and when the fleet runs it ([`lease`]), how the change feed is read
//! ([`history`]; the rules of history itself are each store's trigger, in its
//! migrations), and the statements both dialects share ([`statements`]). A backend's
//! folder holds only its connection and what its dialect says its own way;
//! the integration tests run one behaviour suite against both.

mod any;
mod checkpoint;
mod history;
pub mod lease;
pub mod postgres;
pub mod sqlite;
mod statements;

pub use any::{AnyStore, Backend, DatabaseKind};
pub use checkpoint::{Commit, MIN_GUARDED_SCOPE_ROWS};
pub use history::{FeedQueries, FeedReader};
pub use lease::{Lease, PassEnd};
pub use statements::StoredRow;

use std::future::Future;
use std::path::PathBuf;

use chrono::{DateTime, Utc};

use crate::model::{
    PageCounts, RejectedRecord, RunId, RunMode, RunOutcome, SourceStatus, SyncState,
};

/// A store failure, with what we were doing when it happened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Corrupt(String),
    /// Nothing answered at the server's address: said at once, with what to check,
    /// rather than after a pool has waited out its timeout.
    #[error(
        "nothing listens at {address} (is PostgreSQL running there, and are the host and \
         port right?): {source}"
    )]
    Unreachable {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The database does not exist and the role may not create it.
    #[error(
        "the database does not exist and this role may not create it: create it (see \
         deploy/postgres-setup.sql), or use a role with CREATEDB"
    )]
    CannotCreate(#[source] sqlx::Error),
    /// An SQLite file's directory is missing (SQLite would only say it cannot open it).
    #[error(
        "the directory {} of the SQLite database does not exist: create it, or point the \
         url at another file",
        directory.display()
    )]
    NoDirectory { directory: PathBuf },
    /// A call got no answer in time: a connection dropped without a reset (a firewall, a
    /// partition), or a server that stopped answering. The call is given up; its
    /// connection is not used again.
    #[error(
        "the database did not answer within {after:?} (a connection dropped without a \
         word, or a server that stopped answering)"
    )]
    Unanswered { after: std::time::Duration },
    /// The URL names no store deptsync knows (the config validates it first).
    #[error("the database url {0}")]
    Url(String),
    /// A command that must not create the database (`status`) found none.
    #[error(
        "the SQLite database {} does not exist (`deptsync migrate` or a `sync` creates it)",
        path.display()
    )]
    Missing { path: PathBuf },
    /// The real path of an SQLite database file (its lock files go beside it) could not
    /// be found.
    #[error("resolving the SQLite database path {}", path.display())]
    DatabasePath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not switch the database to a write-ahead log, on which deptsync's
    /// readers beside a writer and its crash safety rely.
    #[error(
        "the SQLite database {} cannot use a write-ahead log: its journal mode stays \
         {mode:?} (SQLite refuses to switch a file opened immutable, or one whose file \
         system offers no shared memory)",
        path.display()
    )]
    NotWal { path: PathBuf, mode: String },
    /// A change-feed token this database's feed cannot read on from without skipping or
    /// repeating versions (see [`TokenRefusal`]).
    #[error(
        "the change-feed token {token} {refusal}: read again from the beginning, without \
         --since"
    )]
    TokenRefused {
        token: crate::model::FeedToken,
        refusal: TokenRefusal,
    },
    /// A write of a pass whose lease another process took over (this one was paused,
    /// partitioned or too slow to renew it): refused, so that two holders never write
    /// one source.
    #[error(
        "lost the lease of source {name}: another process took it over (the fence is no \
         longer {fence}); nothing more of this pass is written"
    )]
    LeaseLost { name: String, fence: i64 },
    /// The lock file of an SQLite database could not be opened or locked.
    #[error("locking {}", path.display())]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the change feed refuses a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Handed out by another feed: another database or server, or this database before
    /// it was restored (its versions are not the ones the reader has).
    #[error(
        "was handed out by another database's change feed (another database or server, or \
         this one before it was restored or failed over)"
    )]
    OtherFeed,
    /// A bare position, as a deptsync from before feeds had an identity wrote it.
    #[error("carries no feed identity (a deptsync older than this one wrote it)")]
    NoFeed,
    /// Ahead of every token the feed has handed out: it comes from a later state of this
    /// database than the one it is in now (a restore of an older copy).
    #[error(
        "is ahead of every token this database's change feed has handed out (the database \
         was restored from an older copy)"
    )]
    Ahead,
    /// Versions the reader has not read were trimmed by a retention.
    #[error(
        "is older than the retained history: versions of {} it has not read were trimmed \
         (history_retention)",
        sources.join(", ")
    )]
    Trimmed { sources: Vec<String> },
}

/// How long one statement may run by default (`[database] statement_timeout`).
pub const DEFAULT_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The most connections one process opens by default (`[database] max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

/// What bounds a store's use of its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long one statement may run (and so what bounds every call: [`call_timeout`]).
    pub statement_timeout: std::time::Duration,
    /// The most connections the store opens, whatever the number of sources: a pass
    /// holds one only while it reads or writes.
    pub max_connections: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The bound on one call to the store (a page's commit, a status query) when statements
/// are bounded by `statement_timeout`: half as long again, so that a server that answers
/// ends a slow statement itself and says why, and a connection that never answers (a
/// firewall dropped it without a reset, a server frozen) still ends the call.
pub fn call_timeout(statement_timeout: std::time::Duration) -> std::time::Duration {
    statement_timeout + statement_timeout / 2
}

/// Runs a store call, failing it with [`StoreError::Unanswered`] after `limit`.
async fn bounded<T>(
    limit: std::time::Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(StoreError::Unanswered { after: limit }))
}

/// Wraps a database error with what was being done.
fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Database { context, source }
}

impl StoreError {
    /// Whether waiting cannot mend this: the credentials are refused, the role or the
    /// database is missing and cannot be created, a permission is denied, the applied
    /// migrations are not this binary's, the SQLite file cannot be opened or written.
    /// Everything else (refused or reset connections, timeouts, too many connections, a
    /// server starting or stopping) is an outage, waited out.
    pub fn is_permanent(&self) -> bool {
        use sqlx::migrate::MigrateError;
        match self {
            StoreError::Database { source, .. } => match source {
                sqlx::Error::Database(error) => {
                    if let Some(sqlite) = error.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                        // SQLite reports extended codes; the primary one is the low byte:
                        // read-only, cannot open, not authorized, not a database.
                        let primary = sqlx::error::DatabaseError::code(sqlite)
                            .and_then(|code| code.parse::<i32>().ok())
                            .map(|code| code & 0xff);
                        return matches!(primary, Some(8 | 14 | 23 | 26));
                    }
                    // PostgreSQL: invalid authorization, invalid password, no such
                    // database, insufficient privilege, no such schema.
                    matches!(
                        error.code().as_deref(),
                        Some("28000" | "28P01" | "3D000" | "42501" | "3F000")
                    )
                }
                sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => true,
                _ => false,
            },
            StoreError::Migrate(error) => {
                matches!(
                    error,
                    MigrateError::VersionMismatch(_)
                        | MigrateError::VersionMissing(_)
                        | MigrateError::Dirty(_)
                ) || matches!(
                    error,
                    MigrateError::Execute(sqlx::Error::Database(e))
                        if e.code().as_deref() == Some("42501")
                )
            }
            StoreError::Url(_)
            | StoreError::CannotCreate(_)
            | StoreError::NoDirectory { .. }
            | StoreError::Missing { .. }
            | StoreError::DatabasePath { .. }
            | StoreError::NotWal { .. }
            | StoreError::TokenRefused { .. } => true,
            StoreError::Corrupt(_)
            | StoreError::LockFile { .. }
            | StoreError::LeaseLost { .. }
            | StoreError::Unreachable { .. }
            | StoreError::Unanswered { .. } => false,
        }
    }

    /// Whether the database did not answer in time: the call was given up, or no
    /// connection could be had from the pool for as long as the call may take.
    pub fn went_unanswered(&self) -> bool {
        matches!(
            self,
            StoreError::Unanswered { .. }
                | StoreError::Database {
                    source: sqlx::Error::PoolTimedOut,
                    ..
                }
        )
    }

    /// Whether the database refused the statement's data (a stored key, a value out of
    /// range: SQLSTATE classes 23 and 22), rather than failing to answer or giving up on
    /// it (a statement timeout is no reason to try the same page another way).
    pub(crate) fn is_refused_by_database(&self) -> bool {
        match self {
            StoreError::Database {
                source: sqlx::Error::Database(error),
                ..
            } => error
                .code()
                .is_some_and(|code| code.starts_with("23") || code.starts_with("22")),
            _ => false,
        }
    }
}

/// What the engine needs from a store.
pub trait Store: Send + Sync {
    /// Takes `source`'s lease for `ttl` if no process (this one included) holds it: only
    /// the holder may write a pass of the source (see [`lease`]). `None` when another
    /// holds it.
    fn try_lease(
        &self,
        source: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;

    /// Renews `lease` for its time to live; `false` when another holder took the source
    /// over.
    fn renew(&self, lease: &Lease) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives `lease` back, its pass having ended as `end` (which decides when the source
    /// is due again). Nothing when the lease was lost.
    fn release(
        &self,
        lease: &Lease,
        end: PassEnd,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The database's clock now: the one clock every process of the fleet takes a pass's
    /// `now` from (a high-water mark, a retention's cutoff), whatever its own host says.
    /// SQLite's is its one host's.
    fn clock(&self) -> impl Future<Output = Result<DateTime<Utc>, StoreError>> + Send;

    /// The position `source` last committed (empty for a new source).
    fn load_state(
        &self,
        source: &str,
    ) -> impl Future<Output = Result<SyncState, StoreError>> + Send;

    /// Records a new pass of `lease`'s source as `running`, by its holder under its
    /// fence. The caller holds the source's lease, so any other run of the source still
    /// marked `running` belongs to a process that died or lost its lease: it is recorded
    /// as failed. Written under the `lease` (fails with [`StoreError::LeaseLost`] when
    /// another holder took it over).
    fn start_run(
        &self,
        lease: &mut Lease,
        mode: RunMode,
    ) -> impl Future<Output = Result<RunId, StoreError>> + Send;

    /// In one transaction: upserts the page's departments (writing only rows whose content
    /// changed, never replacing a row with an older `source_updated_at`), keeps its
    /// rejected records, moves the source to its checkpoint, writes the versions of what
    /// changed and adds the page to the run's counts (see [`Commit`]). Written under the
    /// `lease`: if the lease was lost, so is the write.
    fn commit_page(
        &self,
        lease: &mut Lease,
        page: &Commit<'_>,
    ) -> impl Future<Output = Result<PageCounts, StoreError>> + Send;

    /// Records that `source`'s saved position is a position of `scope` (a fingerprint of
    /// the settings that decide what it reads; `None`: unknown, for the next pass to
    /// record). With `reset` (why), first drops the position: the high-water mark, the
    /// window ledgers, the listing in progress and the one awaiting confirmation, and the
    /// page digests a listing would trust (rows stay), and records when and why. Written
    /// under the `lease`.
    fn set_scope(
        &self,
        lease: &mut Lease,
        scope: Option<&str>,
        reset: Option<&str>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that the service has `sources` on its schedule, for those it did not have
    /// before: `status` counts a source that never succeeded from then.
    fn register(&self, sources: &[String]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records how a pass ended.
    fn finish_run(
        &self,
        run: RunId,
        outcome: &RunOutcome,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the versions of `source`'s departments that ended more than `retention`
    /// ago; never a current one. How many it deleted.
    fn trim_history(
        &self,
        source: &str,
        retention: std::time::Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// One line per source: the named ones, and any other the store has seen.
    fn status(
        &self,
        sources: &[String],
    ) -> impl Future<Output = Result<Vec<SourceStatus>, StoreError>> + Send;
}

/// Whether connecting may create the database when it does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// So that a first `sync` or `migrate` needs nothing set up by hand.
    Create,
    /// For commands that only read (`status`).
    Fail,
}

/// A rejected record's payload as stored: JSON text, in which serde_json escapes every
/// control character, so it holds no NUL.
fn rejected_payload(record: &RejectedRecord) -> Result<String, StoreError> {
    serde_json::to_string(&record.payload)
        .map_err(|e| StoreError::Corrupt(format!("rejected record not serializable: {e}")))
}

/// `text` with NUL characters written as `\u0000`: PostgreSQL refuses NUL in text, and
/// both stores keep the same text.
fn escape_nul(text: &str) -> String {
    text.replace('\0', "\\u0000")
}
