//! What committing a page does to a source's state, written once, over the small
//! primitives each backend offers inside the page's transaction ([`PageTransaction`]).
//!
//! A page commit ([`commit_page`]) is one transaction: the page's departments are
//! written (the database keeping their history: [`super::history`]), its rejected
//! records kept, the [`Checkpoint`] that follows it applied, and the page counted in its
//! run. A crash anywhere loses the whole page and its checkpoint together, so the next
//! pass reads the page again: nothing lost, at most one page repeated.
//!
//! What each checkpoint means is decided here: how a window moves and when a ledger is
//! finished, how a listing goes on, awaits confirmation, ends or is abandoned, and when
//! the departments a complete listing did not see may be deleted (the rule of two
//! listings and the mass-deletion guard, [`judge_unseen`], whose refusals stand pass after
//! pass: [`standing_after`]). The statements it runs are
//! in [`super::statements`] when both dialects share them (there, in the listing
//! upserts' `CASE` clauses, the guard's clock and what a listing rewrote are kept: on the
//! row, without a read first), and a backend's own otherwise: what listings saw, the
//! guard's counts, and its way of writing departments.

use std::collections::HashMap;
use std::future::Future;

use uuid::Uuid;

use super::StoreError;
use super::lease::{self, Lease, LeaseQueries};
use super::statements::{self, StoredRow, Value};
use crate::model::{
    Checkpoint, DeletionPolicy, Department, PageCounts, RejectedRecord, RunId, RunMode, Window,
    WithheldDeletions,
};

/// One page to commit: its departments and rejected records, read by `run` of `source`,
/// and the checkpoint that follows them.
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub run: RunId,
    pub source: &'a str,
    pub departments: &'a [Department],
    pub rejected: &'a [RejectedRecord],
    pub checkpoint: &'a Checkpoint,
}

impl Commit<'_> {
    /// The full listing the page belongs to, if it is a listing's page.
    pub fn listing(&self) -> Option<Uuid> {
        match self.checkpoint {
            Checkpoint::Listing(progress) => Some(progress.listing_id),
            Checkpoint::ListingDone { listing_id, .. } => Some(*listing_id),
            _ => None,
        }
    }
}

/// What writing a page's departments did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub inserted: u64,
    /// Updated with a change of content.
    pub updated: u64,
    /// Whether a stored row was written at all (giving a row a digest counts); a new row
    /// is not. Kept per listing for a backend that trusts unchanged listing pages.
    pub rewrote: bool,
}

/// One scope's share of what a complete listing did not see: its live departments no
/// listing saw, and the bases the guard may count. `scope` is the `scope_id`, `""` for
/// none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScopeCount {
    pub scope: String,
    /// Live departments neither listing saw.
    pub unseen: u64,
    /// Departments live when the first listing began: the guard's usual base.
    pub live: u64,
    /// While a verdict of the guard over the whole source stands: the scope's share of
    /// its base.
    pub source_verdict: Option<VerdictBase>,
    /// While a verdict of the guard over this scope stands: its base.
    pub scope_verdict: Option<VerdictBase>,
}

/// The base of a verdict of the guard that stands: the departments live when the first
/// listing it refused began, and how many of them are still missing (neither listing saw
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VerdictBase {
    pub live: u64,
    pub missing: u64,
}

impl VerdictBase {
    /// The base the guard counts: a verdict's, while departments it withholds are still
    /// missing, so that departments stored since (by the refused listing itself: another
    /// tenant's, ids written another way) never dilute it; else `usual`, the departments
    /// live when the first listing began (the missing ones came back: the verdict is
    /// over, and what is unseen now is judged afresh).
    fn or(verdict: impl IntoIterator<Item = VerdictBase> + Clone, usual: u64) -> u64 {
        if VerdictBase::stands(verdict.clone()) {
            verdict.into_iter().map(|v| v.live).sum()
        } else {
            usual
        }
    }

    /// Whether the verdict (its shares, scope by scope) still stands: departments it
    /// withholds are still missing.
    fn stands(verdict: impl IntoIterator<Item = VerdictBase>) -> bool {
        verdict.into_iter().map(|v| v.missing).sum::<u64>() > 0
    }

    /// The shares of the verdict over `scope` of `scopes` (`None`: over the whole
    /// source), where one stands.
    fn of<'a>(
        scopes: &'a [ScopeCount],
        scope: Option<&'a str>,
    ) -> impl Iterator<Item = VerdictBase> + Clone + 'a {
        scopes.iter().filter_map(move |s| match scope {
            None => s.source_verdict,
            Some(scope) if s.scope == scope => s.scope_verdict,
            Some(_) => None,
        })
    }
}

/// What a backend does inside a page's transaction, besides the statements both dialects
/// share ([`Statements`]): its way of writing departments, and its statements about what
/// listings saw, each one text in its dialect with the parameters its documentation
/// names. What they add up to is decided by [`commit_page`].
pub(crate) trait PageTransaction: LeaseQueries {
    /// Records that listing `$2` of source `$1` saw the ids `$3` (a list of texts).
    const RECORD_SEEN: &'static str;
    /// Forgets what the listings `$2` (a list of ids; NULL: every listing) of source `$1`
    /// saw.
    const FORGET_SEEN: &'static str;
    /// For source `$1` and complete listing `$2`, possibly confirming listing `$3`, per
    /// scope (`scope_id`, `''` for none) of the scopes `$4` (a list; NULL: every scope):
    /// the `scope`, its live rows neither listing saw (`unseen`), those live when the
    /// first listing began (`live`) and its clock (`started`); while a verdict of the
    /// guard stands over the whole source, since when (`source_since`), the rows live then
    /// (`source_live`) and those of them neither listing saw (`source_missing`), and the
    /// same of a verdict over the scope (`scope_since`, `scope_live`, `scope_missing`).
    /// `$5` is the transaction's instant.
    const COUNT_UNSEEN: &'static str;
    /// Marks deleted, at the transaction's instant `$5`, the rows [`Self::COUNT_UNSEEN`]
    /// counts unseen, but those of the scopes `$6` (a list) the guard spared.
    const MARK_UNSEEN_DELETED: &'static str;
    /// Keeps a rejected record of source `$1`: its id `$2`, reason `$3` and payload `$4`
    /// (whose md5 in hex is `$5`), counting it when seen before, at the instant `$6`.
    const KEEP_REJECTED: &'static str;

    /// Writes `departments` (one version per id, the newest), comparing each with what is
    /// stored: only rows whose content changed are written, and a row is never replaced by
    /// one with an older `source_updated_at`. `listing`: the full listing the page is of.
    fn write_departments(
        &mut self,
        source: &str,
        departments: &[&Department],
        listing: Option<Uuid>,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;

    /// The page wrote `counts` of `source`'s departments in `run`, and with them
    /// versions: one per new department, and one per changed department whose version the
    /// database's trigger closed. A backend that can tell listeners (PostgreSQL's
    /// `NOTIFY`) does so as it commits; one that counts the feed's positions itself
    /// (SQLite) moves its count on.
    fn versions_written(
        &mut self,
        source: &str,
        run: RunId,
        counts: &PageCounts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (source, run, counts);
        async { Ok(()) }
    }

    /// `listing_id` is complete, its last page having rewritten a stored row (`rewrote`)
    /// or not (the earlier pages' say is in `sync_state.listing_rewrote`): a backend that
    /// trusts unchanged pages of the last complete listing settles them here.
    fn listing_complete(
        &mut self,
        source: &str,
        listing_id: Uuid,
        rewrote: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (source, listing_id, rewrote);
        async { Ok(()) }
    }
}

/// Keeps records that could not be read, counting those seen before. The reason and id
/// may quote the record: NUL is escaped there too.
async fn keep_rejected<T: PageTransaction>(
    tx: &mut T,
    source: &str,
    rejected: &[RejectedRecord],
) -> Result<(), StoreError> {
    for record in rejected {
        let payload = super::rejected_payload(record)?;
        let digest = format!(
            "{:x}",
            <md5::Md5 as md5::Digest>::digest(payload.as_bytes())
        );
        let id = record.external_id.as_deref().map(super::escape_nul);
        let reason = super::escape_nul(&record.reason);
        let values = [
            Value::Text(Some(source)),
            Value::Text(id.as_deref()),
            Value::Text(Some(&reason)),
            Value::Text(Some(&payload)),
            Value::Text(Some(&digest)),
            Value::Now,
        ];
        tx.execute(T::KEEP_REJECTED, &values, "keeping a rejected record")
            .await?;
    }
    Ok(())
}

/// Records that `listing_id` saw `ids`.
async fn record_seen<T: PageTransaction>(
    tx: &mut T,
    source: &str,
    listing_id: Uuid,
    ids: &[&str],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let values = [
        Value::Text(Some(source)),
        Value::Id(Some(listing_id)),
        Value::Texts(Some(ids)),
    ];
    tx.execute(
        T::RECORD_SEEN,
        &values,
        "recording the departments the listing saw",
    )
    .await?;
    Ok(())
}

/// Forgets what `listings` saw (`None`: every listing of `source`).
async fn forget_seen<T: PageTransaction>(
    tx: &mut T,
    source: &str,
    listings: Option<&[Uuid]>,
) -> Result<(), StoreError> {
    let values = [Value::Text(Some(source)), Value::Ids(listings)];
    tx.execute(T::FORGET_SEEN, &values, "forgetting what listings saw")
        .await?;
    Ok(())
}

/// Commits `page` in `tx` under `lease`: its departments, its rejected records, its
/// checkpoint and its counts, or nothing. The lease is checked (and renewed) first, so a
/// holder whose source another took over writes nothing, and on PostgreSQL a takeover
/// waits for this commit.
pub(crate) async fn commit_page<T: PageTransaction>(
    mut tx: T,
    lease: &Lease,
    page: &Commit<'_>,
) -> Result<PageCounts, StoreError> {
    debug_assert_eq!(
        lease.source, page.source,
        "a page is written under its source's lease"
    );
    lease::check(&mut tx, lease).await?;
    let Commit {
        run,
        source,
        departments,
        rejected,
        checkpoint,
    } = *page;
    // One statement cannot write a row twice: keep the newest version of each id.
    let newest = newest_versions(departments);
    let written = if newest.is_empty() {
        Written::default()
    } else {
        tx.write_departments(source, &newest, page.listing())
            .await?
    };
    keep_rejected(&mut tx, source, rejected).await?;
    let seen = seen_ids(departments, rejected);
    let deletions = apply_checkpoint(&mut tx, source, checkpoint, &seen, written.rewrote).await?;
    let counts = deletions.page_counts(departments.len(), rejected.len(), written);
    let fetched = (departments.len() + rejected.len()) as u64;
    let pages = u64::from(checkpoint.follows_page());
    if !statements::count_page(&mut tx, run, &counts, fetched, pages).await? {
        // Dropping the transaction rolls the page back: no page without its run.
        return Err(StoreError::Corrupt(format!(
            "run {run} is not in sync_runs"
        )));
    }
    // Versions were opened for the new departments, and may have been for the changed
    // ones (the database's trigger decides).
    if counts.inserted + counts.updated + counts.deleted > 0 {
        tx.versions_written(source, run, &counts).await?;
    }
    tx.commit("committing the page").await?;
    Ok(counts)
}

/// Records that `source`'s saved position is a position of `scope` (a fingerprint of the
/// settings that decide what it reads). With `reset` (why), first drops the position:
/// what its listings saw, its window ledgers, its trusted page digests, its high-water
/// mark and its listing state; rows stay.
/// Written under `lease`.
pub(crate) async fn set_scope<T: PageTransaction>(
    mut tx: T,
    lease: &Lease,
    scope: Option<&str>,
    reset: Option<&str>,
) -> Result<(), StoreError> {
    lease::check(&mut tx, lease).await?;
    let source = lease.source.as_str();
    if reset.is_some() {
        forget_seen(&mut tx, source, None).await?;
    }
    statements::set_scope(&mut tx, source, scope, reset).await?;
    tx.commit("recording what the source's position is a position of")
        .await
}

/// Moves `source` to `checkpoint`, after a page that saw the ids `seen` and rewrote a
/// stored row or not.
async fn apply_checkpoint<T: PageTransaction>(
    tx: &mut T,
    source: &str,
    checkpoint: &Checkpoint,
    seen: &[&str],
    rewrote: bool,
) -> Result<Deletions, StoreError> {
    match checkpoint {
        Checkpoint::Ledger(ledger) => statements::replace_ledger(tx, source, ledger).await?,
        Checkpoint::Split {
            mode,
            window,
            halves,
        } => {
            if !statements::split_window(tx, source, *mode, window, halves).await? {
                return Err(not_in_ledger(source, *mode, window));
            }
        }
        Checkpoint::Window {
            mode,
            window,
            cursor,
        } => {
            if !statements::move_window(tx, source, *mode, window, cursor.as_deref()).await? {
                return Err(not_in_ledger(source, *mode, window));
            }
            // When no window is left, the pass is complete.
            if cursor.is_none() {
                statements::finish_ledger_if_done(tx, source, *mode).await?;
            }
        }
        Checkpoint::Listing(progress) => {
            record_seen(tx, source, progress.listing_id, seen).await?;
            statements::continue_listing(tx, source, progress, rewrote).await?;
        }
        Checkpoint::ListingDone {
            listing_id,
            confirms,
            deletions: policy,
        } => {
            record_seen(tx, source, *listing_id, seen).await?;
            tx.listing_complete(source, *listing_id, rewrote).await?;
            let deletions = delete_unseen(tx, source, *listing_id, *confirms, policy).await?;
            if deletions.awaiting_confirmation > 0 {
                // Keep what this listing saw, for the confirming listing to compare.
                statements::await_confirmation(tx, source, *listing_id).await?;
            } else {
                let ended: Vec<Uuid> = [Some(*listing_id), *confirms]
                    .into_iter()
                    .flatten()
                    .collect();
                forget_seen(tx, source, Some(&ended)).await?;
                statements::end_listings(tx, source).await?;
            }
            return Ok(deletions);
        }
        Checkpoint::ListingAbandoned { listing_id } => {
            // Forget what it saw; a confirming listing stays one when it starts again.
            forget_seen(tx, source, Some(&[*listing_id])).await?;
            statements::abandon_listing(tx, source).await?;
        }
    }
    Ok(Deletions::default())
}

/// Counts the live departments of `source` that the complete listing `listing_id` (and
/// `confirms`, the listing it confirms) did not see, scope by scope, and deletes them or
/// keeps them as [`judge_unseen`] says.
async fn delete_unseen<T: PageTransaction>(
    tx: &mut T,
    source: &str,
    listing_id: Uuid,
    confirms: Option<Uuid>,
    policy: &DeletionPolicy,
) -> Result<Deletions, StoreError> {
    let scope_list: Option<Vec<&str>> = policy
        .scopes
        .as_ref()
        .map(|scopes| scopes.iter().map(String::as_str).collect());
    let unseen = [
        Value::Text(Some(source)),
        Value::Id(Some(listing_id)),
        Value::Id(confirms),
        Value::Texts(scope_list.as_deref()),
        Value::Now,
    ];
    let rows = tx
        .fetch(
            T::COUNT_UNSEEN,
            &unseen,
            "counting the departments the listing did not see",
        )
        .await?;
    let count =
        |row: &T::Row, column: &str| Ok::<_, StoreError>(row.int(column)?.unwrap_or(0) as u64);
    let verdict = |row: &T::Row, guard: &str| -> Result<Option<VerdictBase>, StoreError> {
        if row.time(&format!("{guard}_since"))?.is_none() {
            return Ok(None);
        }
        Ok(Some(VerdictBase {
            live: count(row, &format!("{guard}_live"))?,
            missing: count(row, &format!("{guard}_missing"))?,
        }))
    };
    let scopes = rows
        .iter()
        .map(|row| {
            Ok(ScopeCount {
                scope: row.text("scope")?.unwrap_or_default(),
                unseen: count(row, "unseen")?,
                live: count(row, "live")?,
                source_verdict: verdict(row, "source")?,
                scope_verdict: verdict(row, "scope")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let started = rows
        .first()
        .map(|row| row.time("started"))
        .transpose()?
        .flatten();
    let verdict = judge_unseen(&scopes, confirms, policy.max_delete_fraction);
    keep_standing(tx, source, &scopes, &verdict, started).await?;
    let withheld = match verdict {
        UnseenVerdict::Keep(kept) => return Ok(kept),
        UnseenVerdict::Delete { withheld } => withheld,
    };
    let spared: Vec<&str> = withheld.iter().filter_map(|w| w.scope.as_deref()).collect();
    let [source, listing, confirms, scopes, now] = unseen;
    let values = [
        source,
        listing,
        confirms,
        scopes,
        now,
        Value::Texts(Some(&spared)),
    ];
    let deleted = tx
        .execute(
            T::MARK_UNSEEN_DELETED,
            &values,
            "marking unlisted departments deleted",
        )
        .await?;
    Ok(Deletions {
        deleted,
        withheld,
        ..Deletions::default()
    })
}

/// Records what `verdict` on `scopes` does to the guard's verdicts that stand for
/// `source` ([`standing_after`]): one that stood on, and still has departments missing,
/// keeps standing since when it first stood; any other stands from now on, since
/// `started` (the first listing's clock).
async fn keep_standing<T: PageTransaction>(
    tx: &mut T,
    source: &str,
    scopes: &[ScopeCount],
    verdict: &UnseenVerdict,
    started: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(), StoreError> {
    let standing = standing_after(verdict);
    if let (false, Some(since)) = (standing.withhold.is_empty(), started) {
        for withheld in standing.withhold {
            let stood_on = VerdictBase::stands(VerdictBase::of(scopes, withheld.scope.as_deref()));
            if !stood_on {
                // Over, and refused again afresh: it stands from now.
                statements::release_withheld(tx, source, withheld.scope.as_deref()).await?;
            }
            statements::withhold(tx, source, withheld, since).await?;
        }
    }
    if standing.release_source {
        statements::release_withheld(tx, source, None).await?;
    }
    if standing.release_scopes {
        // A scope the listing no longer reads is never deleted from: nothing of it is
        // withheld any more either.
        let still = |scope: &String| {
            standing
                .withhold
                .iter()
                .any(|w| w.scope.as_ref() == Some(scope))
        };
        for scope in statements::withheld_scopes(tx, source).await? {
            if !still(&scope) {
                statements::release_withheld(tx, source, Some(&scope)).await?;
            }
        }
    }
    Ok(())
}

/// What a verdict on a complete listing does to the verdicts of the guard that stand.
#[derive(Debug, PartialEq)]
struct Standing<'a> {
    /// Verdicts that stand from now on (or still do).
    withhold: &'a [WithheldDeletions],
    /// The verdict over the whole source is over.
    release_source: bool,
    /// The verdicts over scopes are over, but those in `withhold`.
    release_scopes: bool,
}

/// A refused deletion stays refused: a verdict of the guard stands until a listing
/// confirmed by another finds nothing to withhold (the missing departments came back, or
/// a person confirmed). A listing awaiting confirmation changes nothing; one whose
/// deletions the guard over the whole source refused leaves the scopes' verdicts as they
/// were, since it judged none.
fn standing_after(verdict: &UnseenVerdict) -> Standing<'_> {
    match verdict {
        UnseenVerdict::Keep(kept) if kept.awaiting_confirmation > 0 => Standing {
            withhold: &[],
            release_source: false,
            release_scopes: false,
        },
        UnseenVerdict::Keep(kept) if !kept.withheld.is_empty() => Standing {
            withhold: &kept.withheld,
            release_source: false,
            release_scopes: false,
        },
        UnseenVerdict::Keep(_) => Standing {
            withhold: &[],
            release_source: true,
            release_scopes: true,
        },
        UnseenVerdict::Delete { withheld } => Standing {
            withhold: withheld,
            release_source: true,
            release_scopes: true,
        },
    }
}

/// What the end of a full listing deleted, or would have.
#[derive(Debug, Default, PartialEq)]
struct Deletions {
    deleted: u64,
    withheld: Vec<WithheldDeletions>,
    awaiting_confirmation: u64,
}

impl Deletions {
    /// The counts of a page of `departments` (the rest of `written` unchanged) that set
    /// `rejected` records aside and ended with these deletions.
    fn page_counts(self, departments: usize, rejected: usize, written: Written) -> PageCounts {
        PageCounts {
            inserted: written.inserted,
            updated: written.updated,
            unchanged: departments as u64 - written.inserted - written.updated,
            rejected: rejected as u64,
            deleted: self.deleted,
            withheld_deletions: self.withheld,
            awaiting_confirmation: self.awaiting_confirmation,
        }
    }
}

/// The fewest live departments a scope (a Snapbooks client account, a Procurify branch)
/// must hold for the mass-deletion guard to watch it on its own. A scope this small
/// losing most of them is ordinary churn, and the guard over the whole source still
/// counts them.
pub const MIN_GUARDED_SCOPE_ROWS: u64 = 10;

/// What to do with the live departments that the complete listing (and the listing it
/// `confirms`, if any) did not see.
#[derive(Debug, PartialEq)]
enum UnseenVerdict {
    /// Keep them all: nothing is missing, or it awaits a confirming listing, or the guard
    /// withholds it all.
    Keep(Deletions),
    /// Mark them deleted, except those of the scopes the guard `withheld`.
    Delete { withheld: Vec<WithheldDeletions> },
}

/// One listing alone never deletes: departments it missed await a second listing that
/// confirms it. A confirming listing deletes what both missed, unless that is more than
/// `max_delete_fraction` of the rows live when the first began (or, while a verdict
/// stands, when the first listing it refused began: [`VerdictBase::or`]), counted over
/// the whole source (then nothing is deleted) and over each scope of at least
/// [`MIN_GUARDED_SCOPE_ROWS`] (then nothing of that scope is: one scope coming back
/// empty is what a permission change or a vendor fault looks like). `None`: a person
/// confirmed any number.
fn judge_unseen(
    scopes: &[ScopeCount],
    confirms: Option<Uuid>,
    max_delete_fraction: Option<f64>,
) -> UnseenVerdict {
    let live = VerdictBase::or(
        VerdictBase::of(scopes, None),
        scopes.iter().map(|s| s.live).sum(),
    );
    let unseen: u64 = scopes.iter().map(|s| s.unseen).sum();
    if unseen == 0 {
        return UnseenVerdict::Keep(Deletions::default());
    }
    if confirms.is_none() {
        return UnseenVerdict::Keep(Deletions {
            awaiting_confirmation: unseen,
            ..Deletions::default()
        });
    }
    let Some(fraction) = max_delete_fraction else {
        return UnseenVerdict::Delete {
            withheld: Vec::new(),
        };
    };
    let too_many = |unseen: u64, live: u64| unseen as f64 > fraction * live as f64;
    if too_many(unseen, live) {
        return UnseenVerdict::Keep(Deletions {
            withheld: vec![WithheldDeletions {
                scope: None,
                would_delete: unseen,
                live,
            }],
            ..Deletions::default()
        });
    }
    let withheld: Vec<WithheldDeletions> = scopes
        .iter()
        .map(|s| (s, VerdictBase::or(s.scope_verdict, s.live)))
        .filter(|&(s, live)| live >= MIN_GUARDED_SCOPE_ROWS && too_many(s.unseen, live))
        .map(|(s, live)| WithheldDeletions {
            scope: Some(s.scope.clone()),
            would_delete: s.unseen,
            live,
        })
        .collect();
    UnseenVerdict::Delete { withheld }
}

/// The newest version of each department of a page (a page may hold an id twice; one
/// statement cannot write a row twice). Of two versions with the same time, the later.
fn newest_versions(departments: &[Department]) -> Vec<&Department> {
    let mut newest: HashMap<&str, &Department> = HashMap::with_capacity(departments.len());
    for department in departments {
        newest
            .entry(department.external_id.as_str())
            .and_modify(|kept| {
                if department.source_updated_at >= kept.source_updated_at {
                    *kept = department;
                }
            })
            .or_insert(department);
    }
    newest.into_values().collect()
}

/// The ids a listing's page saw. A rejected record still exists upstream: seen, so never
/// deleted for being bad. (An id with a NUL cannot be stored at all, so it cannot be seen
/// either.)
fn seen_ids<'a>(departments: &'a [Department], rejected: &'a [RejectedRecord]) -> Vec<&'a str> {
    departments
        .iter()
        .map(|d| d.external_id.as_str())
        .chain(rejected.iter().filter_map(|r| r.external_id.as_deref()))
        .filter(|id| !id.contains('\0'))
        .collect()
}

/// The error of a window position or split for a window the ledger does not hold.
fn not_in_ledger(source: &str, mode: RunMode, window: &Window) -> StoreError {
    StoreError::Corrupt(format!(
        "window {window} is not in the {} ledger of {source}",
        mode.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(scope: &str, live: u64, unseen: u64) -> ScopeCount {
        ScopeCount {
            scope: scope.to_owned(),
            unseen,
            live,
            source_verdict: None,
            scope_verdict: None,
        }
    }

    const FIRST: Option<Uuid> = Some(Uuid::nil());

    fn department(
        id: &str,
        name: &str,
        updated: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Department {
        Department {
            external_id: id.to_owned(),
            scope_id: None,
            name: name.to_owned(),
            is_active: true,
            parent_external_id: None,
            source_created_at: None,
            source_updated_at: updated,
            raw: crate::model::RawRecord::from_value(&serde_json::json!({ "id": id })),
        }
    }

    #[test]
    fn nothing_unseen_keeps_everything() {
        let verdict = judge_unseen(&[scope("a", 100, 0)], FIRST, Some(0.1));
        assert_eq!(verdict, UnseenVerdict::Keep(Deletions::default()));
    }

    #[test]
    fn one_listing_alone_never_deletes() {
        let verdict = judge_unseen(&[scope("a", 100, 3), scope("b", 5, 1)], None, None);
        let awaiting = Deletions {
            awaiting_confirmation: 4,
            ..Deletions::default()
        };
        assert_eq!(verdict, UnseenVerdict::Keep(awaiting));
    }

    #[test]
    fn the_guard_over_the_source_withholds_everything() {
        let verdict = judge_unseen(&[scope("a", 10, 5), scope("b", 10, 5)], FIRST, Some(0.3));
        let withheld = UnseenVerdict::Keep(Deletions {
            withheld: vec![WithheldDeletions {
                scope: None,
                would_delete: 10,
                live: 20,
            }],
            ..Deletions::default()
        });
        assert_eq!(verdict, withheld);
    }

    #[test]
    fn the_guard_per_scope_spares_only_the_scope_over_it() {
        let scopes = [
            scope("big", 1000, 10),
            scope("emptied", 20, 20),
            // Too small to be watched on its own.
            scope("small", 9, 9),
        ];
        let verdict = judge_unseen(&scopes, FIRST, Some(0.1));
        let withheld = vec![WithheldDeletions {
            scope: Some("emptied".to_owned()),
            would_delete: 20,
            live: 20,
        }];
        assert_eq!(verdict, UnseenVerdict::Delete { withheld });
    }

    #[test]
    fn a_person_may_confirm_any_number() {
        let verdict = judge_unseen(&[scope("a", 10, 10)], FIRST, None);
        assert_eq!(
            verdict,
            UnseenVerdict::Delete {
                withheld: Vec::new()
            }
        );
    }

    #[test]
    fn a_standing_verdict_counts_its_base_while_what_it_withholds_is_missing() {
        // 10 departments before the verdict, all missing; the refused listing stored 10
        // more: 10 of 20 would pass, 10 of 10 does not.
        let swapped = ScopeCount {
            scope: "a".to_owned(),
            unseen: 10,
            live: 20,
            source_verdict: Some(VerdictBase {
                live: 10,
                missing: 10,
            }),
            scope_verdict: None,
        };
        let verdict = judge_unseen(std::slice::from_ref(&swapped), FIRST, Some(0.5));
        let withheld = vec![WithheldDeletions {
            scope: None,
            would_delete: 10,
            live: 10,
        }];
        assert_eq!(
            verdict,
            UnseenVerdict::Keep(Deletions {
                withheld,
                ..Deletions::default()
            })
        );

        // The old ones came back, the new ones are gone (the token was put right): the
        // verdict is over, and what is unseen now is judged against the usual base.
        let reverted = ScopeCount {
            source_verdict: Some(VerdictBase {
                live: 10,
                missing: 0,
            }),
            ..swapped.clone()
        };
        let verdict = judge_unseen(&[reverted], FIRST, Some(0.5));
        assert_eq!(verdict, UnseenVerdict::Delete { withheld: vec![] });

        // The same, over a scope.
        let one_scope = ScopeCount {
            source_verdict: None,
            scope_verdict: Some(VerdictBase {
                live: 10,
                missing: 10,
            }),
            ..swapped
        };
        let verdict = judge_unseen(&[one_scope, scope("b", 1000, 0)], FIRST, Some(0.5));
        let withheld = vec![WithheldDeletions {
            scope: Some("a".to_owned()),
            would_delete: 10,
            live: 10,
        }];
        assert_eq!(verdict, UnseenVerdict::Delete { withheld });
    }

    #[test]
    fn a_verdict_stands_until_a_confirmed_listing_withholds_nothing() {
        let nothing = Standing {
            withhold: &[],
            release_source: false,
            release_scopes: false,
        };
        let awaiting = UnseenVerdict::Keep(Deletions {
            awaiting_confirmation: 3,
            ..Deletions::default()
        });
        assert_eq!(
            standing_after(&awaiting),
            nothing,
            "a first listing judges nothing"
        );

        let whole = vec![WithheldDeletions {
            scope: None,
            would_delete: 9,
            live: 10,
        }];
        let refused = UnseenVerdict::Keep(Deletions {
            withheld: whole.clone(),
            ..Deletions::default()
        });
        assert_eq!(
            standing_after(&refused),
            Standing {
                withhold: &whole,
                ..nothing
            },
            "the scopes were not judged: their verdicts stay as they were"
        );

        let over = Standing {
            withhold: &[],
            release_source: true,
            release_scopes: true,
        };
        let came_back = UnseenVerdict::Keep(Deletions::default());
        assert_eq!(standing_after(&came_back), over);
        let confirmed = UnseenVerdict::Delete { withheld: vec![] };
        assert_eq!(standing_after(&confirmed), over);

        let one_scope = vec![WithheldDeletions {
            scope: Some("a".to_owned()),
            would_delete: 20,
            live: 20,
        }];
        let spared = UnseenVerdict::Delete {
            withheld: one_scope.clone(),
        };
        assert_eq!(
            standing_after(&spared),
            Standing {
                withhold: &one_scope,
                ..over
            }
        );
    }

    #[test]
    fn the_newest_version_of_an_id_wins_and_ties_go_to_the_later() {
        use chrono::TimeZone;
        let at = |seconds| Some(chrono::Utc.timestamp_opt(seconds, 0).unwrap());
        let page = [
            department("1", "old", at(10)),
            department("1", "new", at(20)),
            department("1", "older", at(5)),
            department("2", "first", at(10)),
            department("2", "second", at(10)),
        ];
        let mut kept: Vec<(&str, &str)> = newest_versions(&page)
            .into_iter()
            .map(|d| (d.external_id.as_str(), d.name.as_str()))
            .collect();
        kept.sort();
        assert_eq!(kept, [("1", "new"), ("2", "second")]);
    }

    #[test]
    fn rejected_records_count_as_seen_but_ids_with_nul_do_not() {
        let department = department("a", "A", None);
        let rejected = |id: Option<&str>| RejectedRecord {
            external_id: id.map(str::to_owned),
            reason: "bad".to_owned(),
            payload: serde_json::Value::Null,
        };
        let rejected = [rejected(Some("b")), rejected(None), rejected(Some("c\0"))];
        assert_eq!(seen_ids(&[department], &rejected), ["a", "b"]);
    }
}
