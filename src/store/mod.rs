//! Where departments and positions are kept, behind the [`Store`] trait.
//!
//! The interface speaks only the words of [`crate::model`]: no SQL types cross it, so a
//! second implementation (SQLite) can stand beside PostgreSQL. The one promise that
//! matters most is [`Store::commit_page`]: a page's departments and the checkpoint that
//! follows them are committed in one transaction, so a crash anywhere loses nothing and
//! repeats at most one page.

pub mod postgres;

use std::future::Future;

use crate::model::{
    Checkpoint, Department, PageCounts, RejectedRecord, RunId, RunMode, RunOutcome, SourceStatus,
    SyncState,
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
}

/// What the engine needs from a store.
pub trait Store: Send + Sync {
    /// Proof that this process holds a source's lock, through which the pass writes; the
    /// lock is freed by [`Store::unlock`], or by the store when the holder dies.
    type Lease: Send;

    /// Takes `source`'s lock if no process (this one included) holds it: only the holder
    /// may run a pass of the source. `None` when another holds it.
    fn try_lock(
        &self,
        source: &str,
    ) -> impl Future<Output = Result<Option<Self::Lease>, StoreError>> + Send;

    /// Frees a lock taken by [`Store::try_lock`].
    fn unlock(&self, lease: Self::Lease) -> impl Future<Output = ()> + Send;

    /// The position `source` last committed (empty for a new source).
    fn load_state(
        &self,
        source: &str,
    ) -> impl Future<Output = Result<SyncState, StoreError>> + Send;

    /// Records a new pass as `running`. The caller holds the source's lock, so any other
    /// run of the source still marked `running` belongs to a process that died: it is
    /// recorded as failed. Written under the lock's `lease`.
    fn start_run(
        &self,
        lease: &mut Self::Lease,
        source: &str,
        mode: RunMode,
    ) -> impl Future<Output = Result<RunId, StoreError>> + Send;

    /// In one transaction: upserts `departments` (writing only rows whose content changed,
    /// never replacing a row with an older `source_updated_at`), keeps `rejected`, moves
    /// the source to `checkpoint` and adds the page to the run's counts. Written under
    /// the lock's `lease`: if the lock was lost, so is the write.
    fn commit_page(
        &self,
        lease: &mut Self::Lease,
        run: RunId,
        source: &str,
        departments: &[Department],
        rejected: &[RejectedRecord],
        checkpoint: &Checkpoint,
    ) -> impl Future<Output = Result<PageCounts, StoreError>> + Send;

    /// Records how a pass ended.
    fn finish_run(
        &self,
        run: RunId,
        outcome: &RunOutcome,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// One line per source: the named ones, and any other the store has seen.
    fn status(
        &self,
        sources: &[String],
    ) -> impl Future<Output = Result<Vec<SourceStatus>, StoreError>> + Send;
}
