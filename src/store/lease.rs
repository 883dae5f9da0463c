//! Leases with fencing, and the fleet's schedule: who may run a source's pass, and when
//! it is due, written once for both stores.
//!
//! **A lease per source** (`source_leases`: holder, fence, expiry). A pass takes its
//! source's lease before it writes anything ([`take`], or [`claim`] for a service), keeps
//! it alive while it runs ([`renew`]) and gives it back at its end ([`release`]). A new
//! holder increments the fence, and every write of a pass (its run's start, its scope,
//! each page) checks in its own transaction that the fence is still its holder's, and
//! renews the lease as it does ([`check`]): a holder that was paused, partitioned or
//! half dead past its lease's expiry, and whose source another process took over, can
//! never commit again (its write fails with [`StoreError::LeaseLost`]). A holder that
//! dies frees its source when its lease expires. Nothing lives in a database session: a
//! lease is rows, so it works through a transaction-pooling PgBouncer, and on SQLite in
//! the file, for every process that opens it. On PostgreSQL the check takes the lease's
//! row lock, so a takeover waits for a page being committed, and then sees it.
//!
//! **The fleet's schedule.** Each source a service schedules has its next due time in
//! its lease's row ([`schedule`]). A replica claims due sources whose lease is free
//! ([`claim`]: `FOR UPDATE SKIP LOCKED` on PostgreSQL, where replicas claim at once;
//! SQLite has one writer at a time), takes their leases and moves their next due time to
//! the schedule's next firing, in one transaction: each firing runs once in the fleet. A
//! source whose lease lapsed before its holder gave it back (the holder died) is due at
//! once: the firing it claimed was not served (or not given back as served), and the
//! failure counts, so that a source that kills its process backs off. A replica takes at
//! most its fair share of what is due (the due sources divided among the replicas alive,
//! which each say they are with every claim), so the work spreads evenly instead of going
//! to whoever looks first. A failed pass makes its source's next passes back off; a
//! cancelled one (a replica shutting down) makes it due again at once, for another
//! replica.
//!
//! Instants here are the database's clock in milliseconds since the epoch: every replica
//! reads one clock, whatever its own says, and both dialects say each statement with one
//! text ([`lease_statements!`], which each backend gives its clock and list syntax).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use super::StoreError;
use super::statements::{Statements, StoredRow, Value};

/// How long a lease lasts without renewal by default (`[daemon] lease_ttl`): a process
/// that dies frees its sources after at most this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The longest a failing source's passes back off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A source's lease, as its holder keeps it: proof that this process may write the
/// source's pass, for as long as the fence is still its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub source: String,
    /// The store that holds it (see [`new_holder`]).
    pub holder: Arc<str>,
    /// The fence number the lease was taken with.
    pub fence: i64,
    /// How long the lease lasts without renewal.
    pub ttl: Duration,
    /// The source's passes failed in a row when the lease was taken (for the backoff).
    pub failures: u32,
    /// The firing of the source's schedule the pass serves (none for a manual sync).
    pub due: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether the pass's last windowed page held only departments not stored before (a
    /// store may load the next one without looking each up).
    pub(crate) loading_new: bool,
}

/// How a leased pass ended, for the source's next due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassEnd {
    Succeeded,
    /// The source's next passes back off.
    Failed,
    /// Stopped half way (a shutdown): due again at once, for whichever process is up.
    Cancelled,
}

/// A new name to hold leases under (each opened store has its own): the host, the
/// process id and a random part (a process id is reused, a host name shared by
/// containers).
pub fn new_holder() -> Arc<str> {
    static HOST: LazyLock<String> = LazyLock::new(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    });
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{}:{}:{}", *HOST, std::process::id(), &id[..8]).into()
}

/// How long a failing source waits before its next pass, after `failures` failed passes
/// in a row (counting the last): 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

/// A duration in whole milliseconds, as the lease statements take them.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The lease statements of a backend, in its dialect: `$clock` is the database's clock in
/// milliseconds, `$in_list` how a column is tested against a list bound to `$1`, `$skip`
/// what a claim adds to skip the rows other replicas are claiming.
#[rustfmt::skip]
macro_rules! lease_statements {
    (clock = $clock:literal, in_list = $in_list:literal, skip_locked = $skip:literal $(,)?) => {
        /// Takes the lease of source `$1` for holder `$2` for `$3` ms, if it is free or
        /// lapsed; the new fence and the failures in a row.
        const TAKE: &'static str = concat!("
            INSERT INTO source_leases AS l (source, holder, fence, expires_ms)
            VALUES ($1, $2, 1, ", $clock, " + $3)
            ON CONFLICT (source) DO UPDATE SET
                holder = excluded.holder, fence = l.fence + 1,
                expires_ms = excluded.expires_ms, serving_ms = NULL
            WHERE l.holder IS NULL OR l.expires_ms <= ", $clock, "
            RETURNING fence, failures, serving_ms");
        /// Renews the lease of source `$1` held by `$2` under fence `$3` for `$4` ms:
        /// changes no row when the fence is another's.
        const RENEW: &'static str = concat!("
            UPDATE source_leases SET expires_ms = ", $clock, " + $4
            WHERE source = $1 AND holder = $2 AND fence = $3");
        /// Frees the lease of source `$1` held by `$2` under fence `$3`, with `$4`
        /// failures in a row; its source is not due again before `$5` ms from now (0: no
        /// backoff; its next firing stays as the claim set it), or with `$6`, due now.
        const RELEASE: &'static str = concat!("
            UPDATE source_leases SET holder = NULL, expires_ms = NULL, failures = $4,
                next_due_ms = CASE
                    WHEN next_due_ms IS NULL THEN NULL
                    WHEN $6 THEN ", $clock, "
                    WHEN $5 > 0 AND next_due_ms < ", $clock, " + $5 THEN ", $clock, " + $5
                    ELSE next_due_ms END
            WHERE source = $1 AND holder = $2 AND fence = $3");
        /// Puts source `$1`, new to the fleet, on its schedule `$2`: due now. Changes (and
        /// locks) no row that exists.
        const SCHEDULE_NEW: &'static str = concat!("
            INSERT INTO source_leases (source, schedule, next_due_ms)
            VALUES ($1, $2, ", $clock, ")
            ON CONFLICT (source) DO NOTHING");
        /// Puts source `$1` on its schedule `$2` if that is not its schedule yet: due at
        /// `$3` (ms, the schedule's next firing), or now if no service scheduled it yet.
        /// Changes (and locks) only such a row.
        const SCHEDULE_CHANGED: &'static str = concat!("
            UPDATE source_leases SET schedule = $2,
                next_due_ms = CASE WHEN next_due_ms IS NULL THEN ", $clock, " ELSE $3 END
            WHERE source = $1
              AND (schedule IS NULL OR schedule <> $2 OR next_due_ms IS NULL)");
        /// The database's clock.
        const NOW: &'static str = concat!("SELECT ", $clock, " AS now_ms");
        /// Says that replica `$1` is alive.
        const REPLICA_SEEN: &'static str = concat!("
            INSERT INTO replicas AS r (holder, started_ms, seen_ms)
            VALUES ($1, ", $clock, ", ", $clock, ")
            ON CONFLICT (holder) DO UPDATE SET seen_ms = excluded.seen_ms");
        /// Forgets the replicas but `$1` silent for `$2` ms.
        const REPLICAS_GONE: &'static str = concat!("
            DELETE FROM replicas WHERE seen_ms < ", $clock, " - $2 AND holder <> $1");
        /// Replica `$1` stops.
        const REPLICA_STOPS: &'static str = "DELETE FROM replicas WHERE holder = $1";
        /// Of the sources `$1` (a list): how many are due (see [`Self::CLAIM_DUE`]), when
        /// the next of the others will be (`next_ms`), how many replicas were seen in the
        /// last `$2` ms, and the clock.
        const COUNT_DUE: &'static str = concat!("
            SELECT (SELECT count(*) FROM source_leases
                    WHERE source ", $in_list, "
                      AND (holder IS NULL AND next_due_ms <= ", $clock, "
                           OR holder IS NOT NULL AND expires_ms <= ", $clock, ")) AS due,
                   (SELECT min(CASE WHEN holder IS NULL THEN next_due_ms ELSE expires_ms END)
                    FROM source_leases
                    WHERE source ", $in_list, "
                      AND CASE WHEN holder IS NULL THEN next_due_ms ELSE expires_ms END
                          > ", $clock, ") AS next_ms,
                   (SELECT count(*) FROM replicas
                    WHERE seen_ms >= ", $clock, " - $2) AS replicas,
                   ", $clock, " AS now_ms");
        /// At most `$2` of the sources `$1` (a list) that are due, the longest due first,
        /// locked for this transaction: free and past their next due time, or held by a
        /// lease that lapsed (its holder died before it gave it back: the firing it
        /// claimed was not served).
        const CLAIM_DUE: &'static str = concat!("
            SELECT source FROM source_leases
            WHERE source ", $in_list, "
              AND (holder IS NULL AND next_due_ms <= ", $clock, "
                   OR holder IS NOT NULL AND expires_ms <= ", $clock, ")
            ORDER BY CASE WHEN holder IS NULL THEN next_due_ms ELSE expires_ms END, source
            LIMIT $2 ", $skip);
        /// Gives the claimed source `$1` to holder `$2` for `$3` ms, due next at `$4`
        /// ms; the new fence, the failures in a row (one more when the last holder died
        /// with the lease: a source that kills its process backs off too) and the firing
        /// the pass serves (the one that was due, or the dead holder's).
        const CLAIMED: &'static str = concat!("
            UPDATE source_leases SET holder = $2, fence = fence + 1,
                expires_ms = ", $clock, " + $3, next_due_ms = $4,
                failures = CASE WHEN holder IS NULL THEN failures ELSE failures + 1 END,
                serving_ms = CASE WHEN holder IS NULL THEN next_due_ms ELSE serving_ms END
            WHERE source = $1
            RETURNING fence, failures, serving_ms");
    };
}
pub(crate) use lease_statements;

/// The lease statements of a backend (see [`lease_statements!`] for each one's
/// parameters).
pub trait LeaseQueries: Statements {
    const TAKE: &'static str;
    const RENEW: &'static str;
    const RELEASE: &'static str;
    const SCHEDULE_NEW: &'static str;
    const SCHEDULE_CHANGED: &'static str;
    const NOW: &'static str;
    const REPLICA_SEEN: &'static str;
    const REPLICAS_GONE: &'static str;
    const REPLICA_STOPS: &'static str;
    const COUNT_DUE: &'static str;
    const CLAIM_DUE: &'static str;
    const CLAIMED: &'static str;
}

impl Lease {
    /// The lease of `source` that `holder` took for `ttl`, with the fence, the failures in
    /// a row and the firing served that taking it returned (`row`).
    fn taken(
        source: String,
        holder: &Arc<str>,
        ttl: Duration,
        row: &impl StoredRow,
    ) -> Result<Lease, StoreError> {
        let failures = row.int("failures")?.unwrap_or(0);
        Ok(Lease {
            source,
            holder: holder.clone(),
            fence: row.required("fence", StoredRow::int)?,
            ttl,
            failures: u32::try_from(failures).unwrap_or(u32::MAX),
            due: row
                .int("serving_ms")?
                .and_then(chrono::DateTime::from_timestamp_millis),
            loading_new: false,
        })
    }
}

/// Takes `source`'s lease for `ttl` if no process (this one included) holds it; `None`
/// when another does.
pub(crate) async fn take<T: LeaseQueries>(
    mut tx: T,
    holder: &Arc<str>,
    source: &str,
    ttl: Duration,
) -> Result<Option<Lease>, StoreError> {
    let values = [
        Value::Text(Some(source)),
        Value::Text(Some(holder)),
        Value::Int(millis(ttl)),
    ];
    let rows = tx
        .fetch(T::TAKE, &values, "taking the source's lease")
        .await?;
    tx.commit("taking the source's lease").await?;
    rows.first()
        .map(|row| Lease::taken(source.to_owned(), holder, ttl, row))
        .transpose()
}

/// In a write of `lease`'s pass: fails the transaction with [`StoreError::LeaseLost`]
/// unless the fence is still the lease's, and renews the lease.
pub(crate) async fn check<T: LeaseQueries>(tx: &mut T, lease: &Lease) -> Result<(), StoreError> {
    if renew_in(tx, lease).await? {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            name: lease.source.clone(),
            fence: lease.fence,
        })
    }
}

async fn renew_in<T: LeaseQueries>(tx: &mut T, lease: &Lease) -> Result<bool, StoreError> {
    let values = [
        Value::Text(Some(&lease.source)),
        Value::Text(Some(&lease.holder)),
        Value::Int(lease.fence),
        Value::Int(millis(lease.ttl)),
    ];
    let renewed = tx
        .execute(T::RENEW, &values, "renewing the source's lease")
        .await?;
    Ok(renewed > 0)
}

/// Renews `lease`; `false` when another holder took the source over.
pub(crate) async fn renew<T: LeaseQueries>(mut tx: T, lease: &Lease) -> Result<bool, StoreError> {
    let renewed = renew_in(&mut tx, lease).await?;
    tx.commit("renewing the source's lease").await?;
    Ok(renewed)
}

/// Gives `lease` back, its pass having ended as `end`. Changes nothing when the lease
/// was lost.
pub(crate) async fn release<T: LeaseQueries>(
    mut tx: T,
    lease: &Lease,
    end: PassEnd,
) -> Result<(), StoreError> {
    // A cancelled pass neither clears nor adds to the failures in a row.
    let failures = match end {
        PassEnd::Succeeded => 0,
        PassEnd::Failed => lease.failures.saturating_add(1),
        PassEnd::Cancelled => lease.failures,
    };
    let wait = match end {
        PassEnd::Failed => backoff(failures),
        PassEnd::Succeeded | PassEnd::Cancelled => Duration::ZERO,
    };
    let values = [
        Value::Text(Some(&lease.source)),
        Value::Text(Some(&lease.holder)),
        Value::Int(lease.fence),
        Value::Int(i64::from(failures)),
        Value::Int(millis(wait)),
        Value::Bool(end == PassEnd::Cancelled),
    ];
    tx.execute(T::RELEASE, &values, "freeing the source's lease")
        .await?;
    tx.commit("freeing the source's lease").await
}

/// When the source named is due next, by its schedule, after the database's clock
/// `now_ms` (ms since the epoch); `None`: never again.
pub type NextDue<'a> = &'a (dyn Fn(&str, i64) -> Option<i64> + Sync);

/// Puts `sources` (each a name and its schedule's text) on the fleet's schedule: a source
/// new to it is due at once, one whose schedule changed at its `next_due`; the others
/// keep their next due time. Only the rows that change are locked:
/// the passes under way are not held up.
pub(crate) async fn schedule<T: LeaseQueries>(
    mut tx: T,
    sources: &[(&str, &str)],
    next_due: NextDue<'_>,
) -> Result<(), StoreError> {
    let now_ms = clock(&mut tx).await?;
    for &(source, schedule) in sources {
        let values = [Value::Text(Some(source)), Value::Text(Some(schedule))];
        tx.execute(T::SCHEDULE_NEW, &values, "scheduling the sources")
            .await?;
        let values = [
            Value::Text(Some(source)),
            Value::Text(Some(schedule)),
            Value::Int(next_due(source, now_ms).unwrap_or(NEVER)),
        ];
        tx.execute(T::SCHEDULE_CHANGED, &values, "scheduling the sources")
            .await?;
    }
    tx.commit("scheduling the sources").await
}

/// A due time that never comes: a schedule that no longer fires.
const NEVER: i64 = i64::MAX;

/// The database's clock, in ms since the epoch.
async fn clock<T: LeaseQueries>(tx: &mut T) -> Result<i64, StoreError> {
    tx.fetch_one(T::NOW, &[], "reading the clock")
        .await?
        .required("now_ms", StoredRow::int)
}

/// Says that replica `holder` is alive: it counts in the fleet for `ttl` (and is
/// forgotten after ten times that).
async fn replica_seen<T: LeaseQueries>(
    tx: &mut T,
    holder: &str,
    ttl: Duration,
) -> Result<(), StoreError> {
    tx.execute(
        T::REPLICA_SEEN,
        &[Value::Text(Some(holder))],
        "saying this replica is alive",
    )
    .await?;
    tx.execute(
        T::REPLICAS_GONE,
        &[Value::Text(Some(holder)), Value::Int(millis(ttl * 10))],
        "forgetting replicas gone",
    )
    .await?;
    Ok(())
}

/// Replica `holder` stops: the others share the fleet's work without it at once.
pub(crate) async fn replica_stops<T: LeaseQueries>(
    mut tx: T,
    holder: &str,
) -> Result<(), StoreError> {
    tx.execute(
        T::REPLICA_STOPS,
        &[Value::Text(Some(holder))],
        "saying this replica stops",
    )
    .await?;
    tx.commit("saying this replica stops").await
}

/// How many of the due sources a replica takes: its fair share of them (rounded up),
/// and no more than it has room for.
fn share(due: i64, replicas: i64, room: usize) -> i64 {
    let fair = (due.max(0) + replicas.max(1) - 1) / replicas.max(1);
    fair.min(i64::try_from(room).unwrap_or(i64::MAX))
}

/// What a claim took, whether more were due than it took, and how long until the next
/// of the sources not due yet becomes due (`None`: none will).
#[derive(Debug)]
pub struct Claimed {
    pub leases: Vec<Lease>,
    pub more_due: bool,
    pub next_due_in: Option<Duration>,
}

/// Claims, for replica `holder`, which is alive and has `room` passes free, its share of
/// the due sources among `sources`: takes their leases for `ttl` and moves each one's
/// next due time to `next_due(source, now_ms)`. The leases of the sources to run now.
pub(crate) async fn claim<T: LeaseQueries>(
    mut tx: T,
    holder: &Arc<str>,
    sources: &[&str],
    room: usize,
    ttl: Duration,
    next_due: NextDue<'_>,
) -> Result<Claimed, StoreError> {
    replica_seen(&mut tx, holder, ttl).await?;
    let counted = tx
        .fetch_one(
            T::COUNT_DUE,
            &[Value::Texts(Some(sources)), Value::Int(millis(ttl))],
            "counting the due sources",
        )
        .await?;
    let due = counted.int("due")?.unwrap_or(0);
    let now_ms = counted.required("now_ms", StoredRow::int)?;
    let next_due_in = counted
        .int("next_ms")?
        .map(|next| Duration::from_millis(u64::try_from(next - now_ms).unwrap_or(0)));
    let limit = share(due, counted.int("replicas")?.unwrap_or(1), room);
    if limit == 0 {
        tx.commit("saying this replica is alive").await?;
        return Ok(Claimed {
            leases: Vec::new(),
            more_due: due > 0,
            next_due_in,
        });
    }
    let rows = tx
        .fetch(
            T::CLAIM_DUE,
            &[Value::Texts(Some(sources)), Value::Int(limit)],
            "claiming the due sources",
        )
        .await?;
    let mut leases = Vec::with_capacity(rows.len());
    for row in &rows {
        let source = row.required("source", StoredRow::text)?;
        let next = next_due(&source, now_ms).unwrap_or(NEVER);
        let values = [
            Value::Text(Some(&source)),
            Value::Text(Some(holder)),
            Value::Int(millis(ttl)),
            Value::Int(next),
        ];
        let claimed = tx
            .fetch(T::CLAIMED, &values, "claiming a due source")
            .await?;
        if let Some(claimed) = claimed.first() {
            leases.push(Lease::taken(source, holder, ttl, claimed)?);
        }
    }
    tx.commit("claiming the due sources").await?;
    Ok(Claimed {
        more_due: usize::try_from(due).unwrap_or(0) > leases.len(),
        leases,
        next_due_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_takes_its_fair_share_and_no_more_than_it_has_room_for() {
        assert_eq!(share(1000, 3, 8), 8);
        assert_eq!(share(3, 3, 8), 1);
        assert_eq!(share(4, 3, 8), 2, "rounded up: nothing is left over");
        assert_eq!(share(5, 1, 8), 5);
        assert_eq!(share(5, 0, 8), 5, "no replica seen yet: this one");
        assert_eq!(share(0, 3, 8), 0);
        assert_eq!(share(10, 2, 0), 0, "no room");
    }

    #[test]
    fn failing_sources_back_off_exponentially_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_holder_names_its_host_and_process() {
        let name = new_holder();
        assert!(
            name.contains(&format!(":{}:", std::process::id())),
            "{name}"
        );
        assert_ne!(
            name,
            new_holder(),
            "each store holds under a name of its own"
        );
    }
}
