//! The configured store: the backend a database URL names, chosen once when the store is
//! opened. Commands, the demo and the service open their store here and never name a
//! backend; the engine is generic over [`Store`] and knows none.
//!
//! A backend implements [`Store`] and [`Backend`] in its own folder and registers with
//! one line at the bottom of this file, from which [`DatabaseKind`], [`AnyStore`] and
//! their dispatch are made. Every call through an [`AnyStore`] is
//! bounded by [`call_timeout`], so that no database call of a pass, the service or a
//! command can hang, whatever the network does.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::history::{self, FeedQueries, FeedReader};
use super::lease::{self, Claimed, Lease, LeaseQueries, NextDue, PassEnd};
use super::statements::{Statements, StoredRow};
use super::{Commit, IfMissing, Limits, Store, StoreError, bounded};
use crate::model::{
    DepartmentVersion, FeedToken, PageCounts, RunId, RunMode, RunOutcome, SourceStatus, SyncState,
};

#[cfg(doc)]
use super::call_timeout;

/// What a backend offers besides [`Store`]: how a URL names it, how it connects and
/// migrates.
pub trait Backend: Store + FeedQueries + Clone + Sized {
    /// The backend's name, for logs.
    const NAME: &'static str;

    /// Whether `url` names a database of this backend: `None` when it is another's;
    /// `Some(Err(why))` when it is one of this backend's, unusable. Does no I/O and never
    /// quotes the URL (it may hold a password).
    fn claims(url: &str) -> Option<Result<(), String>>;

    /// Connects to the database at `url` (creating it when missing, with
    /// [`IfMissing::Create`]), within `limits`.
    fn connect_with(
        url: &SecretString,
        if_missing: IfMissing,
        limits: &Limits,
    ) -> impl Future<Output = Result<Self, StoreError>> + Send;

    /// Applies the migrations that have not run yet.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A transaction for reading, on a connection of the store's pool.
    type Reader: Statements;

    /// Opens a [`Backend::Reader`].
    fn read(&self) -> impl Future<Output = Result<Self::Reader, StoreError>> + Send;

    /// A transaction for a short write (a lease, a claim), on a connection of the
    /// store's pool.
    type Writer: LeaseQueries;

    /// Opens a [`Backend::Writer`].
    fn write(&self) -> impl Future<Output = Result<Self::Writer, StoreError>> + Send;

    /// Opens a [`Backend::Writer`] whose commit returns only once it is on disk, and with
    /// it every commit before it (the pages a pass commits without waiting for the disk).
    fn durable_write(&self) -> impl Future<Output = Result<Self::Writer, StoreError>> + Send;

    /// Whether the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async {
            let mut tx = self.read().await?;
            tx.fetch("SELECT 1", &[], "asking the database").await?;
            tx.commit("asking the database").await
        }
    }

    /// How many migrations the database has applied (none before the first).
    fn applied_migrations(&self) -> impl Future<Output = Result<i64, StoreError>> + Send {
        async {
            let mut tx = self.read().await?;
            let counted = tx
                .fetch(
                    "SELECT count(*) AS n FROM _sqlx_migrations WHERE success",
                    &[],
                    "counting the applied migrations",
                )
                .await;
            match counted {
                Ok(rows) => Ok(rows
                    .first()
                    .map(|row| row.int("n"))
                    .transpose()?
                    .flatten()
                    .unwrap_or(0)),
                // No table yet: nothing applied.
                Err(StoreError::Database {
                    source: sqlx::Error::Database(e),
                    ..
                }) if e.message().contains("_sqlx_migrations") => Ok(0),
                Err(e) => Err(e),
            }
        }
    }

    /// The bound on every call through an [`AnyStore`] of this backend.
    fn call_timeout(&self) -> Duration;

    /// The name this store holds leases under (each opened store has its own).
    fn holder(&self) -> &Arc<str>;
}

/// What a URL that no backend claims is told.
const NO_BACKEND: &str = "is neither a PostgreSQL URL (postgres://user@host:port/database) nor \
     an SQLite one (sqlite://path/to/file.db)";

/// Makes [`DatabaseKind`], [`AnyStore`] and their dispatch from the list of backends.
macro_rules! backends {
    ($($variant:ident($backend:ty)),* $(,)?) => {
        /// Which store a database URL names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum DatabaseKind {
            $($variant,)*
        }

        impl DatabaseKind {
            /// The kind's name, for logs.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DatabaseKind::$variant => <$backend as Backend>::NAME,)*
                }
            }

            /// The store `url` names, or what is wrong with it (never quoting it: it may
            /// hold a password). Does no I/O.
            pub fn of_url(url: &str) -> Result<DatabaseKind, String> {
                $(if let Some(claimed) = <$backend as Backend>::claims(url) {
                    return claimed.map(|()| DatabaseKind::$variant);
                })*
                Err(NO_BACKEND.to_owned())
            }
        }

        /// The configured store, as the URL says.
        #[derive(Clone)]
        pub enum AnyStore {
            $($variant($backend),)*
        }

        impl AnyStore {
            /// Connects to the store at `url`, within `limits`: every call through this
            /// store runs at most [`call_timeout`] of its statement timeout.
            pub async fn connect_with(
                url: &SecretString,
                if_missing: IfMissing,
                limits: &Limits,
            ) -> Result<AnyStore, StoreError> {
                match DatabaseKind::of_url(url.expose_secret()).map_err(StoreError::Url)? {
                    $(DatabaseKind::$variant => Ok(AnyStore::$variant(
                        <$backend>::connect_with(url, if_missing, limits).await?,
                    )),)*
                }
            }

            /// Applies the migrations that have not run yet (not bounded: a migration may
            /// rightly take long on a big table).
            pub async fn migrate(&self) -> Result<(), StoreError> {
                match self {
                    $(AnyStore::$variant(store) => store.migrate().await,)*
                }
            }

            /// Whether the database answers.
            pub async fn ping(&self) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.ping().await,)*
                    }
                })
                .await
            }

            /// How many migrations the database has applied (none before the first).
            pub async fn applied_migrations(&self) -> Result<i64, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.applied_migrations().await,)*
                    }
                })
                .await
            }

            /// Runs `sql`, a query of a reader's own (the demo's sample query), and turns
            /// each row into a `T` with `read`.
            pub async fn read_rows<T>(
                &self,
                sql: &'static str,
                read: impl Fn(&dyn StoredRow) -> Result<T, StoreError>,
            ) -> Result<Vec<T>, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => {
                            let mut tx = store.read().await?;
                            let rows = tx.fetch(sql, &[], "running a query").await?;
                            rows.iter().map(|row| read(row)).collect()
                        })*
                    }
                })
                .await
            }

            /// Begins a read of the change feed: the versions of `sources` (none: every
            /// source) after `since`, up to what is committed now (see [`FeedReader`]).
            pub async fn changes(
                &self,
                since: FeedToken,
                sources: &[String],
            ) -> Result<FeedReader<'_, AnyStore>, StoreError> {
                let horizon = bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => {
                            let tx = store.durable_write().await?;
                            history::begin_read::<$backend>(tx, since, sources).await
                        })*
                    }
                })
                .await?;
                Ok(FeedReader::new(self, since, horizon, sources))
            }

            /// Puts `sources` (names and schedules) on the fleet's schedule (see
            /// [`lease::schedule`]).
            pub async fn schedule(
                &self,
                sources: &[(&str, &str)],
                next_due: NextDue<'_>,
            ) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => {
                            lease::schedule(store.write().await?, sources, next_due).await
                        })*
                    }
                })
                .await
            }

            /// Claims this replica's share of the due sources among `sources`, at most
            /// `room` (see [`lease::claim`]): the leases of the sources to run now, and how
            /// long until the next is due.
            pub async fn claim(
                &self,
                sources: &[&str],
                room: usize,
                ttl: Duration,
                next_due: NextDue<'_>,
            ) -> Result<Claimed, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => {
                            let writer = store.write().await?;
                            lease::claim(writer, store.holder(), sources, room, ttl, next_due).await
                        })*
                    }
                })
                .await
            }

            /// This replica stops: the others share the fleet's work without it.
            pub async fn replica_stops(&self) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => {
                            lease::replica_stops(store.write().await?, store.holder()).await
                        })*
                    }
                })
                .await
            }

            /// The name this store holds leases under.
            pub fn holder(&self) -> &Arc<str> {
                match self {
                    $(AnyStore::$variant(store) => store.holder(),)*
                }
            }

            /// The bound on every call through this store.
            fn call_timeout(&self) -> Duration {
                match self {
                    $(AnyStore::$variant(store) => store.call_timeout(),)*
                }
            }
        }

        impl FeedReader<'_, AnyStore> {
            /// The next batch of versions, in feed order; `None` once every version up to
            /// the horizon has been read. Each batch is one bounded call.
            pub async fn next_batch(
                &mut self,
            ) -> Result<Option<Vec<DepartmentVersion>>, StoreError> {
                let store = self.store;
                bounded(store.call_timeout(), async {
                    match store {
                        $(AnyStore::$variant(backend) => {
                            history::next_batch::<$backend, _>(self, backend.read().await?).await
                        })*
                    }
                })
                .await
            }
        }

        impl Store for AnyStore {
            async fn try_lease(
                &self,
                source: &str,
                ttl: Duration,
            ) -> Result<Option<Lease>, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.try_lease(source, ttl).await,)*
                    }
                })
                .await
            }

            async fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.renew(lease).await,)*
                    }
                })
                .await
            }

            async fn release(&self, lease: &Lease, end: PassEnd) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.release(lease, end).await,)*
                    }
                })
                .await
            }

            async fn clock(&self) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.clock().await,)*
                    }
                })
                .await
            }

            async fn load_state(&self, source: &str) -> Result<SyncState, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.load_state(source).await,)*
                    }
                })
                .await
            }

            async fn start_run(&self, lease: &mut Lease, mode: RunMode) -> Result<RunId, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.start_run(lease, mode).await,)*
                    }
                })
                .await
            }

            async fn commit_page(
                &self,
                lease: &mut Lease,
                page: &Commit<'_>,
            ) -> Result<PageCounts, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.commit_page(lease, page).await,)*
                    }
                })
                .await
            }

            async fn set_scope(
                &self,
                lease: &mut Lease,
                scope: Option<&str>,
                reset: Option<&str>,
            ) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.set_scope(lease, scope, reset).await,)*
                    }
                })
                .await
            }

            async fn register(&self, sources: &[String]) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.register(sources).await,)*
                    }
                })
                .await
            }

            async fn finish_run(&self, run: RunId, outcome: &RunOutcome) -> Result<(), StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.finish_run(run, outcome).await,)*
                    }
                })
                .await
            }

            async fn trim_history(
                &self,
                source: &str,
                retention: Duration,
            ) -> Result<u64, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.trim_history(source, retention).await,)*
                    }
                })
                .await
            }

            async fn status(&self, sources: &[String]) -> Result<Vec<SourceStatus>, StoreError> {
                bounded(self.call_timeout(), async {
                    match self {
                        $(AnyStore::$variant(store) => store.status(sources).await,)*
                    }
                })
                .await
            }
        }
    };
}

impl AnyStore {
    /// Connects to the store at `url`, with the default limits.
    pub async fn connect(
        url: &SecretString,
        if_missing: IfMissing,
    ) -> Result<AnyStore, StoreError> {
        AnyStore::connect_with(url, if_missing, &Limits::default()).await
    }

    /// Connects, creating the database when missing, and applies the pending migrations:
    /// how every command that writes opens its store.
    pub async fn open(url: &SecretString) -> Result<AnyStore, StoreError> {
        AnyStore::open_with(url, &Limits::default()).await
    }

    /// [`AnyStore::open`] within `limits`.
    pub async fn open_with(url: &SecretString, limits: &Limits) -> Result<AnyStore, StoreError> {
        let store = AnyStore::connect_with(url, IfMissing::Create, limits).await?;
        store.migrate().await?;
        Ok(store)
    }
}

// The registry: a new backend is one line here.
backends! {
    Postgres(super::postgres::PgStore),
    Sqlite(super::sqlite::SqliteStore),
}
