//! The stores on their own: the guarantees the engine relies on.
//!
//! Every case of the behaviour suite runs on both stores, PostgreSQL and SQLite
//! (`store::<case>::postgres` and `store::<case>::sqlite`), so that they cannot drift.
//! Then what only one of them has (a PostgreSQL lock lost with its connection), and the
//! real binary on an SQLite file.

use chrono::{DateTime, TimeZone, Utc};
use deptsync::fakes::mews::FakeMews;
use deptsync::model::{
    Checkpoint, DeletionPolicy, Department, Ledger, LedgerWindow, ListingProgress, PageCounts,
    RawRecord, RejectedRecord, RunId, RunMode, RunOutcome, SyncState, Window, WindowState,
    WithheldDeletions,
};
use deptsync::store::{AnyStore, Commit, IfMissing, Lease, Store, StoreError};
use uuid::Uuid;

use crate::helpers::{
    TempDir, TestDb, TestStore, a_sync_skips_the_leased_source, at, mews_config, on_both_stores,
    run_binary, run_binary_in, sqlite_url, stderr,
};

on_both_stores!(
    text_with_tabs_newlines_and_backslashes_is_stored_as_sent,
    a_page_expected_new_that_is_not_is_compared_row_by_row,
    a_page_with_the_same_id_twice_keeps_the_newest,
    only_rows_whose_content_changed_are_written,
    a_change_of_any_one_column_is_a_change,
    an_older_version_never_replaces_a_newer_one,
    the_high_water_mark_is_the_end_of_the_last_pass,
    the_mark_moves_only_when_every_window_of_the_ledger_is_done,
    a_split_window_becomes_two_pending_halves,
    a_backfill_ledger_never_moves_the_mark,
    a_failed_commit_keeps_neither_rows_nor_position,
    a_page_whose_run_cannot_be_counted_is_not_kept,
    a_listing_resumes_and_an_abandoned_one_is_forgotten,
    deleting_takes_two_complete_listings,
    a_listing_that_rewrote_a_row_trusts_no_page_after_it,
    an_abandoned_listing_leaves_no_page_trusted,
    the_mass_deletion_guard_withholds_until_a_person_confirms,
    paged_listings_keep_the_clock_of_the_first_listings_first_page,
    rejected_records_are_kept_once_and_counted,
    status_has_a_line_per_source,
    one_scope_losing_too_many_keeps_them_all_and_the_others_go_on,
    a_listing_deletes_only_in_the_scopes_it_reads,
    a_reset_drops_the_position_and_keeps_the_rows,
    a_withheld_deletion_is_withheld_by_every_later_listing,
    a_withheld_scope_stays_withheld_though_new_rows_fill_it,
    a_withheld_deletion_is_over_when_the_old_departments_come_back_alone,
    a_verdict_that_ended_and_is_refused_again_stands_from_then,
    departments_a_listing_revives_do_not_dilute_the_guard,
    a_page_trusted_by_its_digest_brings_back_rows_deleted_by_hand,
);

/// A department `id` of a full listing, filed under `scope`.
fn in_scope(id: &str, scope: &str) -> Department {
    Department {
        scope_id: Some(scope.to_owned()),
        ..listed(id)
    }
}

/// Commits `page` as a complete listing confirmed by a second one that sees the same,
/// under `deletions`; returns the confirming listing's counts.
async fn confirmed_listing(
    db: &TestStore,
    lease: &mut Lease,
    run: RunId,
    page: &[Department],
    deletions: &DeletionPolicy,
) -> PageCounts {
    let first = Uuid::new_v4();
    let done = |listing_id, confirms| Checkpoint::ListingDone {
        listing_id,
        confirms,
        deletions: deletions.clone(),
    };
    commit(db, lease, run, page, &done(first, None)).await;
    commit(db, lease, run, page, &done(Uuid::new_v4(), Some(first))).await
}

async fn live_in_scope(db: &TestStore, scope: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM departments WHERE deleted_at IS NULL AND scope_id = '{scope}'"
    ))
    .await
}

async fn one_scope_losing_too_many_keeps_them_all_and_the_others_go_on(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    // Scope "a" holds 12, "b" 12, "c" 20, "small" 3.
    let ids = |scope: &str, n: usize| -> Vec<Department> {
        (0..n)
            .map(|i| in_scope(&format!("{scope}{i}"), scope))
            .collect()
    };
    let everything: Vec<Department> = [("a", 12), ("b", 12), ("c", 20), ("small", 3)]
        .into_iter()
        .flat_map(|(scope, n)| ids(scope, n))
        .collect();
    let guarded = DeletionPolicy {
        max_delete_fraction: Some(0.5),
        scopes: None,
    };
    complete_listing(&db, &mut lease, run, &[], None, None).await;
    confirmed_listing(&db, &mut lease, run, &everything, &guarded).await;

    // "a" comes back empty, "b" loses one, "small" loses all three: 16 of 47 is under
    // half of the source, but all of "a" is more than half of "a".
    let listed: Vec<Department> = everything
        .iter()
        .filter(|d| {
            let scope = d.scope_id.as_deref().unwrap_or_default();
            scope != "a" && scope != "small" && d.external_id != "b0"
        })
        .cloned()
        .collect();
    let counts = confirmed_listing(&db, &mut lease, run, &listed, &guarded).await;

    assert_eq!(
        counts.withheld_deletions,
        vec![WithheldDeletions {
            scope: Some("a".to_owned()),
            would_delete: 12,
            live: 12
        }]
    );
    assert_eq!(counts.deleted, 4, "b0 and the small scope's three");
    assert_eq!(live_in_scope(&db, "a").await, 12);
    assert_eq!(live_in_scope(&db, "b").await, 11);
    assert_eq!(live_in_scope(&db, "small").await, 0);

    // A person confirms.
    let confirmed = DeletionPolicy {
        max_delete_fraction: None,
        scopes: None,
    };
    let counts = confirmed_listing(&db, &mut lease, run, &listed, &confirmed).await;
    assert_eq!((counts.deleted, counts.withheld_deletions), (12, vec![]));
    assert_eq!(live_in_scope(&db, "a").await, 0);
}

async fn a_listing_deletes_only_in_the_scopes_it_reads(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let both = [in_scope("1", "a"), in_scope("2", "a"), in_scope("3", "b")];
    let every_scope = DeletionPolicy {
        max_delete_fraction: None,
        scopes: None,
    };
    confirmed_listing(&db, &mut lease, run, &both, &every_scope).await;

    // Scope "b" is no longer read; "2" is really gone from "a".
    let only_a = DeletionPolicy {
        max_delete_fraction: None,
        scopes: Some(vec!["a".to_owned()]),
    };
    let counts = confirmed_listing(&db, &mut lease, run, &both[..1], &only_a).await;

    assert_eq!(counts.deleted, 1);
    assert_eq!(
        live_ids(&db).await,
        ["1", "3"],
        "out of scope is not deleted"
    );
}

async fn a_reset_drops_the_position_and_keeps_the_rows(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    commit_windowed(&db, &mut lease, run, &[listed("1")]).await;
    let w = window(at(2022, 1, 1), at(2022, 4, 1));
    commit(&db, &mut lease, run, &[], &plan(at(2022, 4, 1), &[w])).await;
    // A complete listing that misses "1" awaits a confirming one, which is under way.
    let (first, counts) = complete_listing(&db, &mut lease, run, &["2"], None, None).await;
    assert_eq!(counts.awaiting_confirmation, 1);
    let listing = ListingProgress {
        listing_id: Uuid::new_v4(),
        cursor: Some("page-2".to_owned()),
        confirms: Some(first),
    };
    commit(
        &db,
        &mut lease,
        run,
        &[listed("2")],
        &Checkpoint::Listing(listing),
    )
    .await;

    // Recording the scope alone keeps the position.
    db.store
        .set_scope(&mut lease, Some("fingerprint"), None)
        .await
        .unwrap();
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.scope.as_deref(), Some("fingerprint"));
    assert!(state.high_water_mark.is_some() && state.incremental.is_some());
    assert!(state.listing.is_some());

    db.store
        .set_scope(&mut lease, Some("other"), Some("its settings changed"))
        .await
        .unwrap();

    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(
        state,
        SyncState {
            scope: Some("other".to_owned()),
            ..SyncState::default()
        }
    );
    assert_eq!(db.count("SELECT count(*) FROM sync_windows").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM listing_seen").await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM listing_page_digests").await,
        0
    );
    let listing_state = db
        .count(
            "SELECT count(*) FROM sync_state
             WHERE listing_confirms IS NOT NULL OR trusted_listing IS NOT NULL",
        )
        .await;
    assert_eq!(
        listing_state, 0,
        "no listing awaits confirmation, none is trusted"
    );
    assert_eq!(db.count("SELECT count(*) FROM departments").await, 2);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].reset.as_deref(), Some("its settings changed"));
    assert!(status[0].reset_at.is_some());
}

fn department(id: &str, name: &str, updated: DateTime<Utc>) -> Department {
    crate::helpers::department(id, name, Some(updated))
}

/// A department of a full listing (no update time, as the listing kinds have none).
fn listed(id: &str) -> Department {
    Department {
        source_updated_at: None,
        ..department(id, &format!("Department {id}"), at(2020, 1, 1))
    }
}

/// An incremental pass up to `until` of the given windows, all pending.
fn plan(until: DateTime<Utc>, windows: &[Window]) -> Checkpoint {
    Checkpoint::Ledger(Ledger {
        until,
        backfill: None,
        windows: windows
            .iter()
            .map(|&window| LedgerWindow {
                window,
                state: WindowState::Pending,
            })
            .collect(),
    })
}

fn window(start: DateTime<Utc>, end: DateTime<Utc>) -> Window {
    Window { start, end }
}

/// The last page of `window`.
fn done(window: Window) -> Checkpoint {
    Checkpoint::Window {
        mode: RunMode::Incremental,
        window,
        cursor: None,
    }
}

/// The lock of source `s` and a run under it.
async fn locked_run(db: &TestStore) -> (Lease, RunId) {
    crate::helpers::locked_run(&db.store, "s").await
}

/// Commits `departments` with `checkpoint` in `run`.
async fn commit(
    db: &TestStore,
    lease: &mut Lease,
    run: RunId,
    departments: &[Department],
    checkpoint: &Checkpoint,
) -> PageCounts {
    db.store
        .commit_page(
            lease,
            &Commit {
                run,
                source: "s",
                departments,
                rejected: &[],
                checkpoint,
            },
        )
        .await
        .unwrap()
}

/// Commits `departments` as the last page of a one-window pass.
async fn commit_windowed(
    db: &TestStore,
    lease: &mut Lease,
    run: RunId,
    departments: &[Department],
) -> PageCounts {
    let w = window(at(2019, 1, 1), at(2022, 1, 1));
    commit(db, lease, run, &[], &plan(at(2022, 1, 1), &[w])).await;
    commit(db, lease, run, departments, &done(w)).await
}

fn written(counts: PageCounts) -> (u64, u64, u64) {
    (counts.inserted, counts.updated, counts.unchanged)
}

/// Neither rows nor a position were kept.
async fn assert_nothing_kept(db: &TestStore) {
    assert_eq!(db.count("SELECT count(*) FROM departments").await, 0);
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, None);
    assert_eq!(state.incremental, None);
}

async fn text_with_tabs_newlines_and_backslashes_is_stored_as_sent(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    // A page of new departments first: the next page is then expected to be new as well,
    // and PostgreSQL loads it in bulk (COPY's text format).
    let plain = [department("plain", "Plain", at(2020, 1, 1))];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &plain).await),
        (1, 0, 0)
    );
    // What the bulk path must escape, and what it must not touch.
    let awkward = "tab\there, line\nbreak, cr\r, back\\slash \\N, quote \" and ' é";
    let mut page = [department("x\\1\t", awkward, at(2020, 1, 1))];
    page[0].scope_id = Some("s\\N".to_owned());
    page[0].parent_external_id = None;
    let created = at(2019, 12, 31) + chrono::Duration::microseconds(123_456);
    page[0].source_created_at = Some(created);
    page[0].raw =
        RawRecord::from_value(&serde_json::json!({ "name": awkward, "path": "C:\\dir\\n" }));
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &page).await),
        (1, 0, 0)
    );
    let awkward_row = "FROM departments WHERE external_id <> 'plain'";
    let name = db.text(&format!("SELECT name {awkward_row}")).await;
    assert_eq!(name.as_deref(), Some(awkward));
    let id = db.text(&format!("SELECT external_id {awkward_row}")).await;
    assert_eq!(id.as_deref(), Some("x\\1\t"));
    let scope = db.text(&format!("SELECT scope_id {awkward_row}")).await;
    assert_eq!(scope.as_deref(), Some("s\\N"));
    let nulls = "SELECT count(*) FROM departments WHERE parent_external_id IS NULL";
    assert_eq!(db.count(nulls).await, 2, "NULL stays NULL");

    // The same page again is unchanged: what was stored is exactly what was sent.
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &page).await),
        (0, 0, 1)
    );
}

async fn a_page_expected_new_that_is_not_is_compared_row_by_row(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let first = [
        department("1", "one", at(2020, 1, 1)),
        department("2", "two", at(2020, 1, 1)),
    ];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &first).await),
        (2, 0, 0)
    );
    // All new so far, so this page is expected new too; it holds a stored department
    // (renamed) and an unchanged one, and every row must still be judged exactly.
    let second = [
        department("3", "three", at(2020, 1, 2)),
        department("1", "one renamed", at(2020, 1, 2)),
        department("2", "two", at(2020, 1, 1)),
    ];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &second).await),
        (1, 1, 1)
    );
    let third = [department("4", "four", at(2020, 1, 3))];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &third).await),
        (1, 0, 0)
    );
    for (id, name) in [
        ("1", "one renamed"),
        ("2", "two"),
        ("3", "three"),
        ("4", "four"),
    ] {
        let sql = format!("SELECT name FROM departments WHERE external_id = '{id}'");
        assert_eq!(db.text(&sql).await.as_deref(), Some(name));
    }
    let runs = "SELECT inserted * 100 + updated * 10 + unchanged FROM sync_runs";
    assert_eq!(db.count(runs).await, 411);
}

async fn a_page_with_the_same_id_twice_keeps_the_newest(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let page = [
        department("1", "old", at(2020, 1, 1)),
        department("1", "new", at(2020, 2, 1)),
        department("2", "two", at(2020, 1, 1)),
    ];
    let counts = commit_windowed(&db, &mut lease, run, &page).await;
    assert_eq!(written(counts), (2, 0, 1));
    let name = db
        .text("SELECT name FROM departments WHERE external_id = '1'")
        .await;
    assert_eq!(name.as_deref(), Some("new"));
}

async fn only_rows_whose_content_changed_are_written(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let page = [
        department("1", "one", at(2020, 1, 1)),
        department("2", "two", at(2020, 1, 1)),
    ];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &page).await),
        (2, 0, 0)
    );
    let changed_at = "SELECT last_changed_at FROM departments ORDER BY external_id";
    let before = db.instants(changed_at).await;

    // The same page again writes nothing.
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &page).await),
        (0, 0, 2)
    );
    assert_eq!(db.instants(changed_at).await, before);

    // One changed row is one write; its change time moves, the other's does not.
    let renamed = [
        department("1", "one", at(2020, 1, 1)),
        department("2", "renamed", at(2020, 1, 2)),
    ];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &renamed).await),
        (0, 1, 1)
    );
    let after = db.instants(changed_at).await;
    assert_eq!(after[0], before[0]);
    assert!(after[1] > before[1], "{after:?} after {before:?}");

    // A change of the raw record alone is a change too.
    let mut raw_changed = renamed.clone();
    raw_changed[0].raw =
        RawRecord::from_value(&serde_json::json!({ "id": "1", "name": "one", "extra": [1, 2] }));
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &raw_changed).await),
        (0, 1, 1)
    );
    let runs = db
        .count("SELECT inserted * 100 + updated * 10 + unchanged FROM sync_runs")
        .await;
    assert_eq!(runs, 2 * 100 + 2 * 10 + 4, "the run counts every page");
}

async fn a_change_of_any_one_column_is_a_change(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let mut current = Department {
        external_id: "1".to_owned(),
        scope_id: Some("scope-a".to_owned()),
        name: "one".to_owned(),
        is_active: true,
        parent_external_id: Some("p1".to_owned()),
        source_created_at: Some(at(2019, 1, 1)),
        source_updated_at: Some(at(2020, 1, 1)),
        raw: RawRecord::from_value(&serde_json::json!({ "id": "1" })),
    };
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &[current.clone()]).await),
        (1, 0, 0)
    );
    // Each changes one column and nothing else (not even source_updated_at): to another
    // value, to NULL, and from NULL.
    type Change = fn(&mut Department);
    let changes: [(&str, Change); 11] = [
        ("is_active", |d| d.is_active = false),
        ("is_active back", |d| d.is_active = true),
        ("parent_external_id", |d| {
            d.parent_external_id = Some("p2".to_owned())
        }),
        ("parent_external_id to NULL", |d| {
            d.parent_external_id = None
        }),
        ("parent_external_id from NULL", |d| {
            d.parent_external_id = Some("p3".to_owned())
        }),
        ("scope_id", |d| d.scope_id = Some("scope-b".to_owned())),
        ("scope_id to NULL", |d| d.scope_id = None),
        ("scope_id from NULL", |d| {
            d.scope_id = Some("scope-c".to_owned())
        }),
        ("source_created_at", |d| {
            d.source_created_at = Some(at(2019, 6, 1))
        }),
        ("source_created_at to NULL", |d| d.source_created_at = None),
        ("source_created_at from NULL", |d| {
            d.source_created_at = Some(at(2019, 7, 1))
        }),
    ];
    let changed_at = "SELECT last_changed_at FROM departments";
    for (what, change) in changes {
        change(&mut current);
        let page = [current.clone()];
        let before = db.instants(changed_at).await;
        assert_eq!(
            written(commit_windowed(&db, &mut lease, run, &page).await),
            (0, 1, 0),
            "a page changing only {what} is an update"
        );
        let after = db.instants(changed_at).await;
        assert!(after > before, "{what}: {after:?} after {before:?}");
        assert_eq!(
            written(commit_windowed(&db, &mut lease, run, &page).await),
            (0, 0, 1),
            "the same page again after {what} is unchanged"
        );
        assert_eq!(db.instants(changed_at).await, after, "{what}");
    }
    let stored = db
        .text("SELECT scope_id || ' ' || parent_external_id FROM departments WHERE is_active")
        .await;
    assert_eq!(stored.as_deref(), Some("scope-c p3"));
    let created = db
        .instants("SELECT source_created_at FROM departments")
        .await;
    assert_eq!(created, [Some(at(2019, 7, 1))]);
}

async fn an_older_version_never_replaces_a_newer_one(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let newer = [department("1", "newer", at(2020, 2, 1))];
    commit_windowed(&db, &mut lease, run, &newer).await;
    let older = [department("1", "older", at(2020, 1, 1))];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &older).await),
        (0, 0, 1)
    );
    let name = db.text("SELECT name FROM departments").await;
    assert_eq!(name.as_deref(), Some("newer"));
    // The same time with other content is a correction: written.
    let corrected = [department("1", "corrected", at(2020, 2, 1))];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &corrected).await),
        (0, 1, 0)
    );
}

/// A pass plans to the database's clock, so a mark past the end of the pass that follows
/// it is one no pass read up to (a host whose clock was fast left it): that pass's end
/// replaces it, so that the pass after it reads from there.
async fn the_high_water_mark_is_the_end_of_the_last_pass(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    for mark in [at(2021, 1, 1), at(2020, 1, 1)] {
        let w = window(at(2019, 1, 1), mark);
        for checkpoint in [plan(mark, &[w]), done(w)] {
            commit(&db, &mut lease, run, &[], &checkpoint).await;
        }
    }
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, Some(at(2020, 1, 1)));
}

async fn a_split_window_becomes_two_pending_halves(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let first = window(at(2020, 1, 1), at(2020, 4, 1));
    let second = window(at(2020, 4, 1), at(2020, 6, 1));
    let until = at(2020, 6, 1);
    commit(&db, &mut lease, run, &[], &plan(until, &[first, second])).await;
    // The first window was half read when the upstream found it too heavy.
    let in_progress = Checkpoint::Window {
        mode: RunMode::Incremental,
        window: first,
        cursor: Some("c1".to_owned()),
    };
    let page = [department("1", "one", at(2020, 2, 1))];
    commit(&db, &mut lease, run, &page, &in_progress).await;
    let halves = [
        window(at(2020, 1, 1), at(2020, 2, 15)),
        window(at(2020, 2, 15), at(2020, 4, 1)),
    ];
    let split = Checkpoint::Split {
        mode: RunMode::Incremental,
        window: first,
        halves,
    };
    commit(&db, &mut lease, run, &[], &split).await;
    let ledger = db
        .store
        .load_state("s")
        .await
        .unwrap()
        .incremental
        .expect("the pass is not complete");
    assert_eq!(ledger.until, until);
    let windows: Vec<_> = ledger
        .windows
        .iter()
        .map(|w| (w.window, w.state.clone()))
        .collect();
    assert_eq!(
        windows,
        [
            (halves[0], WindowState::Pending),
            (halves[1], WindowState::Pending),
            (second, WindowState::Pending),
        ]
    );
    // A window the ledger no longer holds cannot be split again.
    let again = db
        .store
        .commit_page(
            &mut lease,
            &Commit {
                run,
                source: "s",
                departments: &[],
                rejected: &[],
                checkpoint: &split,
            },
        )
        .await;
    assert!(matches!(again, Err(StoreError::Corrupt(_))), "{again:?}");
}

async fn the_mark_moves_only_when_every_window_of_the_ledger_is_done(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let first = window(at(2020, 1, 1), at(2020, 4, 1));
    let second = window(at(2020, 4, 1), at(2020, 6, 1));
    commit(
        &db,
        &mut lease,
        run,
        &[],
        &plan(at(2020, 6, 1), &[first, second]),
    )
    .await;
    // The windows finish out of order, as concurrent windows do.
    let page = [department("1", "one", at(2020, 2, 1))];
    let in_progress = Checkpoint::Window {
        mode: RunMode::Incremental,
        window: first,
        cursor: Some("c1".to_owned()),
    };
    commit(&db, &mut lease, run, &page, &in_progress).await;
    commit(&db, &mut lease, run, &[], &done(second)).await;
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, None);
    let ledger = state.incremental.expect("the pass is not complete");
    assert_eq!(ledger.until, at(2020, 6, 1));
    assert_eq!(
        ledger
            .windows
            .iter()
            .map(|w| (w.window, w.state.clone()))
            .collect::<Vec<_>>(),
        vec![
            (
                first,
                WindowState::InProgress {
                    cursor: "c1".to_owned()
                }
            ),
            (second, WindowState::Done)
        ]
    );
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].position, "resumes: 1 of 2 windows left");

    // A window the ledger does not hold is refused, and the page with it.
    let stranger = window(at(2019, 1, 1), at(2019, 2, 1));
    let late = [department("2", "late", at(2019, 1, 15))];
    assert!(
        db.store
            .commit_page(
                &mut lease,
                &Commit {
                    run,
                    source: "s",
                    departments: &late,
                    rejected: &[],
                    checkpoint: &done(stranger)
                }
            )
            .await
            .is_err()
    );
    assert_eq!(db.count("SELECT count(*) FROM departments").await, 1);

    commit(&db, &mut lease, run, &[], &done(first)).await;
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, Some(at(2020, 6, 1)));
    assert_eq!(state.incremental, None, "a complete ledger is cleared");
    assert_eq!(db.count("SELECT count(*) FROM sync_windows").await, 0);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].position, "read up to 2020-06-01 00:00:00Z");
}

async fn a_backfill_ledger_never_moves_the_mark(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let w = window(at(2020, 1, 1), at(2020, 2, 1));
    let backfill = Checkpoint::Ledger(Ledger {
        until: at(2020, 2, 1),
        backfill: Some(deptsync::model::BackfillRange {
            from: at(2020, 1, 1),
            requested_to: None,
        }),
        windows: vec![LedgerWindow {
            window: w,
            state: WindowState::Pending,
        }],
    });
    commit(&db, &mut lease, run, &[], &backfill).await;
    let state = db.store.load_state("s").await.unwrap();
    let Checkpoint::Ledger(planned) = &backfill else {
        unreachable!()
    };
    assert_eq!(state.backfill.as_ref(), Some(planned));
    assert_eq!(state.incremental, None);
    assert!(
        db.store.status(&[]).await.unwrap()[0].backfill_in_progress,
        "status shows the backfill"
    );

    let last_page = Checkpoint::Window {
        mode: RunMode::Backfill,
        window: w,
        cursor: None,
    };
    commit(&db, &mut lease, run, &[], &last_page).await;
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.backfill, None, "a complete backfill is cleared");
    assert_eq!(state.high_water_mark, None);
}

async fn a_failed_commit_keeps_neither_rows_nor_position(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    // A window that ends where it starts breaks a check of sync_windows: the database
    // refuses the checkpoint after the departments were written, and the page goes with it.
    let page = [
        department("1", "fine", at(2020, 1, 1)),
        department("2", "fine too", at(2020, 1, 1)),
    ];
    let empty = window(at(2020, 1, 1), at(2020, 1, 1));
    assert!(
        db.store
            .commit_page(
                &mut lease,
                &Commit {
                    run,
                    source: "s",
                    departments: &page,
                    rejected: &[],
                    checkpoint: &plan(at(2021, 1, 1), &[empty])
                }
            )
            .await
            .is_err()
    );
    assert_nothing_kept(&db).await;
    // The lease writes on after a failed page.
    let w = window(at(2020, 1, 1), at(2021, 1, 1));
    commit(&db, &mut lease, run, &page, &plan(at(2021, 1, 1), &[w])).await;
    assert_eq!(db.count("SELECT count(*) FROM departments").await, 2);
}

async fn a_page_whose_run_cannot_be_counted_is_not_kept(db: TestStore) {
    // The upsert and the checkpoint succeed; counting the page in a run that does not
    // exist fails last, and the whole page must go with it.
    let unknown_run = RunId(Uuid::new_v4());
    let mut lease = db
        .store
        .try_lease("s", deptsync::store::lease::DEFAULT_TTL)
        .await
        .unwrap()
        .unwrap();
    let page = [department("1", "fine", at(2020, 1, 1))];
    let w = window(at(2020, 1, 1), at(2021, 1, 1));
    assert!(
        db.store
            .commit_page(
                &mut lease,
                &Commit {
                    run: unknown_run,
                    source: "s",
                    departments: &page,
                    rejected: &[],
                    checkpoint: &plan(at(2021, 1, 1), &[w])
                }
            )
            .await
            .is_err()
    );
    assert_nothing_kept(&db).await;
}

async fn a_listing_resumes_and_an_abandoned_one_is_forgotten(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let listing = ListingProgress {
        listing_id: Uuid::new_v4(),
        cursor: Some("page-2".to_owned()),
        confirms: None,
    };
    let page = [listed("1"), listed("2")];
    let counts = commit(
        &db,
        &mut lease,
        run,
        &page,
        &Checkpoint::Listing(listing.clone()),
    )
    .await;
    assert_eq!(written(counts), (2, 0, 0));
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.listing, Some(listing.clone()));
    assert_eq!(db.count("SELECT count(*) FROM listing_seen").await, 2);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].position, "resumes listing at page-2");

    let abandoned = Checkpoint::ListingAbandoned {
        listing_id: listing.listing_id,
    };
    commit(&db, &mut lease, run, &[], &abandoned).await;
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.listing, None);
    assert_eq!(db.count("SELECT count(*) FROM listing_seen").await, 0);
    let pages = db.count("SELECT pages FROM sync_runs").await;
    assert_eq!(pages, 1, "an abandoned listing is bookkeeping, not a page");
}

/// Commits `ids` as one complete listing, confirming `confirms`, under the guard `guard`.
async fn complete_listing(
    db: &TestStore,
    lease: &mut Lease,
    run: RunId,
    ids: &[&str],
    confirms: Option<Uuid>,
    guard: Option<f64>,
) -> (Uuid, PageCounts) {
    let listing_id = Uuid::new_v4();
    let page: Vec<Department> = ids.iter().map(|id| listed(id)).collect();
    let last = Checkpoint::ListingDone {
        listing_id,
        confirms,
        deletions: DeletionPolicy {
            max_delete_fraction: guard,
            scopes: None,
        },
    };
    (listing_id, commit(db, lease, run, &page, &last).await)
}

async fn live_ids(db: &TestStore) -> Vec<String> {
    let mut ids = Vec::new();
    for id in ["1", "2", "3", "4", "5"] {
        let live = db
            .count(&format!(
                "SELECT count(*) FROM departments WHERE external_id = '{id}' AND deleted_at IS NULL"
            ))
            .await;
        if live == 1 {
            ids.push(id.to_owned());
        }
    }
    ids
}

async fn deleting_takes_two_complete_listings(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guard = Some(0.5);
    let (_, counts) =
        complete_listing(&db, &mut lease, run, &["1", "2", "3", "4"], None, guard).await;
    assert_eq!((counts.inserted, counts.awaiting_confirmation), (4, 0));

    // One listing misses "4": nothing is deleted yet; it awaits a confirming listing.
    let (first, counts) =
        complete_listing(&db, &mut lease, run, &["1", "2", "3"], None, guard).await;
    assert_eq!((counts.deleted, counts.awaiting_confirmation), (0, 1));
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.pending_confirmation, Some(first));
    assert_eq!(state.listing, None);
    assert_eq!(live_ids(&db).await, ["1", "2", "3", "4"]);

    // The confirming listing sees "3" gone too, but "3" was seen by the first: only what
    // both missed is deleted.
    let (_, counts) = complete_listing(&db, &mut lease, run, &["1", "2"], Some(first), guard).await;
    assert_eq!((counts.deleted, counts.withheld_deletions), (1, vec![]));
    assert_eq!(live_ids(&db).await, ["1", "2", "3"]);
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.pending_confirmation, None);
    assert_eq!(db.count("SELECT count(*) FROM listing_seen").await, 0);
    let deleted = db.count("SELECT deleted FROM sync_runs").await;
    assert_eq!(deleted, 1);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!((status[0].live_rows, status[0].deleted_rows), (3, 1));

    // A department that comes back is live again.
    let (_, counts) =
        complete_listing(&db, &mut lease, run, &["1", "2", "3", "4"], None, guard).await;
    assert_eq!((counts.updated, counts.awaiting_confirmation), (1, 0));
    assert_eq!(live_ids(&db).await, ["1", "2", "3", "4"]);
}

async fn the_mass_deletion_guard_withholds_until_a_person_confirms(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guard = Some(0.5);
    complete_listing(&db, &mut lease, run, &["1", "2", "3", "4"], None, guard).await;

    // An empty listing, confirmed by another: 4 of 4 is more than half.
    let (first, counts) = complete_listing(&db, &mut lease, run, &[], None, guard).await;
    assert_eq!(counts.awaiting_confirmation, 4);
    let (_, counts) = complete_listing(&db, &mut lease, run, &[], Some(first), guard).await;
    assert_eq!(counts.deleted, 0);
    let withheld = &counts.withheld_deletions[0];
    assert_eq!(
        withheld.scope, None,
        "the guard withholds for the whole source"
    );
    assert_eq!((withheld.would_delete, withheld.live), (4, 4));
    assert_eq!(live_ids(&db).await, ["1", "2", "3", "4"]);
    assert_eq!(
        db.store.load_state("s").await.unwrap().pending_confirmation,
        None
    );

    // Rows the listings themselves add do not dilute the guard's base: 3 of the 4 rows
    // live before is too many, though it would be only 3 of 9 counting the 5 new ones.
    let listing = ["1", "5", "6", "7", "8", "9"];
    let (first, counts) = complete_listing(&db, &mut lease, run, &listing, None, guard).await;
    assert_eq!((counts.inserted, counts.awaiting_confirmation), (5, 3));
    let (_, counts) = complete_listing(&db, &mut lease, run, &listing, Some(first), guard).await;
    // 3 of the 4 live before is too many.
    let withheld = &counts.withheld_deletions[0];
    assert_eq!((withheld.would_delete, withheld.live), (3, 4));
    assert_eq!(live_ids(&db).await, ["1", "2", "3", "4", "5"]);

    // A person confirms (no guard): the chain deletes what both listings missed.
    let (first, _) = complete_listing(&db, &mut lease, run, &listing, None, None).await;
    let (_, counts) = complete_listing(&db, &mut lease, run, &listing, Some(first), None).await;
    assert_eq!((counts.deleted, counts.withheld_deletions), (3, vec![]));
    assert_eq!(live_ids(&db).await, ["1", "5"]);
}

/// `count` departments `{prefix}{i}`, each filed under `scope` (none: no scope).
fn many(prefix: &str, count: usize, scope: Option<&str>) -> Vec<Department> {
    (0..count)
        .map(|i| Department {
            scope_id: scope.map(str::to_owned),
            ..listed(&format!("{prefix}{i}"))
        })
        .collect()
}

/// How many of the source's rows are marked deleted.
async fn deleted_rows(db: &TestStore) -> i64 {
    db.count("SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL")
        .await
}

async fn a_withheld_deletion_is_withheld_by_every_later_listing(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guarded = DeletionPolicy {
        max_delete_fraction: Some(0.5),
        scopes: None,
    };
    confirmed_listing(&db, &mut lease, run, &many("old", 10, None), &guarded).await;

    // The listing now serves another set of ids (a token of another tenant, ids written
    // another way): the first pass stores them and withholds the deletion of the old.
    let theirs = many("NEW", 10, None);
    let counts = confirmed_listing(&db, &mut lease, run, &theirs, &guarded).await;
    let withheld = vec![WithheldDeletions {
        scope: None,
        would_delete: 10,
        live: 10,
    }];
    assert_eq!((counts.deleted, &counts.withheld_deletions), (0, &withheld));

    // Every later pass: the new rows are live now, but the guard's base is what was live
    // before the first refused listing, so 10 of 10 stays too many.
    for pass in 0..2 {
        let counts = confirmed_listing(&db, &mut lease, run, &theirs, &guarded).await;
        assert_eq!(
            (counts.deleted, &counts.withheld_deletions),
            (0, &withheld),
            "pass {pass}"
        );
    }
    assert_eq!(deleted_rows(&db).await, 0);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    let shown = status[0]
        .withheld_deletions
        .as_ref()
        .expect("status shows it");
    assert_eq!((shown.would_delete, shown.live), (10, 10));

    // The missing rows come back: the verdict is over, and an ordinary deletion later
    // is judged afresh.
    let both: Vec<Department> = many("old", 10, None).into_iter().chain(theirs).collect();
    let counts = confirmed_listing(&db, &mut lease, run, &both, &guarded).await;
    assert_eq!(counts.withheld_deletions, vec![]);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].withheld_deletions, None);
    let counts = confirmed_listing(&db, &mut lease, run, &both[1..], &guarded).await;
    assert_eq!((counts.deleted, counts.withheld_deletions), (1, vec![]));

    // Most gone again (14 of 19): withheld until a person confirms.
    let theirs = &both[15..];
    let counts = confirmed_listing(&db, &mut lease, run, theirs, &guarded).await;
    assert_eq!(counts.withheld_deletions.len(), 1);
    let confirmed = DeletionPolicy {
        max_delete_fraction: None,
        scopes: None,
    };
    let counts = confirmed_listing(&db, &mut lease, run, theirs, &confirmed).await;
    assert_eq!((counts.deleted, counts.withheld_deletions), (14, vec![]));
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].withheld_deletions, None);
}

/// The token is put right: the old departments come back and the ones the swapped token
/// brought are gone. The verdict is over (nothing it withheld is missing), and the listing
/// is judged afresh, against everything live when it began: the other tenant's
/// departments are deleted, and nothing stands any more.
async fn a_withheld_deletion_is_over_when_the_old_departments_come_back_alone(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guarded = DeletionPolicy {
        max_delete_fraction: Some(0.5),
        scopes: None,
    };
    let ours = many("old", 10, None);
    confirmed_listing(&db, &mut lease, run, &ours, &guarded).await;
    let counts = confirmed_listing(&db, &mut lease, run, &many("NEW", 10, None), &guarded).await;
    assert_eq!(counts.withheld_deletions.len(), 1);

    let counts = confirmed_listing(&db, &mut lease, run, &ours, &guarded).await;
    assert_eq!((counts.deleted, counts.withheld_deletions), (10, vec![]));
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].withheld_deletions, None);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM departments WHERE deleted_at IS NULL AND external_id LIKE 'old%'"
        )
        .await,
        10
    );
}

/// A verdict whose departments came back is over; a refusal of what is missing then is a
/// new verdict, standing from the listing that refused it.
async fn a_verdict_that_ended_and_is_refused_again_stands_from_then(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guard = |fraction| DeletionPolicy {
        max_delete_fraction: Some(fraction),
        scopes: None,
    };
    let ours = many("old", 10, None);
    confirmed_listing(&db, &mut lease, run, &ours, &guard(0.5)).await;
    confirmed_listing(&db, &mut lease, run, &many("NEW", 10, None), &guard(0.5)).await;
    let since = |status: Vec<deptsync::model::SourceStatus>| {
        status[0]
            .withheld_deletions
            .as_ref()
            .map(|w| (w.since, w.would_delete, w.live))
    };
    let first = since(db.store.status(&["s".to_owned()]).await.unwrap()).unwrap();
    assert_eq!((first.1, first.2), (10, 10));

    // The old ones back, the new ones missing: 10 of the 20 live when the listing began
    // is too many under a guard of 0.4.
    let counts = confirmed_listing(&db, &mut lease, run, &ours, &guard(0.4)).await;
    assert_eq!(counts.deleted, 0);
    let second = since(db.store.status(&["s".to_owned()]).await.unwrap()).unwrap();
    assert_eq!((second.1, second.2), (10, 20));
    assert!(
        second.0 > first.0,
        "{second:?} stands from the new refusal, not {first:?}"
    );
}

/// A vendor that flaps between two tenants behind one URL: a listing of one revives its
/// departments, which the listing of the other had deleted. Revived, they are live from
/// now, not from their first sync: they do not dilute the guard's base, and the other
/// tenant's departments are not deleted in turn.
async fn departments_a_listing_revives_do_not_dilute_the_guard(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guarded = DeletionPolicy {
        max_delete_fraction: Some(0.5),
        scopes: None,
    };
    let (ours, theirs) = (many("a", 10, None), many("b", 10, None));
    let both: Vec<Department> = ours.iter().chain(&theirs).cloned().collect();
    confirmed_listing(&db, &mut lease, run, &both, &guarded).await;
    // Ours alone: theirs, 10 of 20, is not more than half.
    let counts = confirmed_listing(&db, &mut lease, run, &ours, &guarded).await;
    assert_eq!(counts.deleted, 10);

    // Theirs alone again: revived, and ours missing, 10 of the 10 live before.
    let counts = confirmed_listing(&db, &mut lease, run, &theirs, &guarded).await;
    assert_eq!(counts.deleted, 0);
    assert_eq!(
        counts.withheld_deletions,
        vec![WithheldDeletions {
            scope: None,
            would_delete: 10,
            live: 10
        }]
    );
}

async fn a_withheld_scope_stays_withheld_though_new_rows_fill_it(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guarded = DeletionPolicy {
        max_delete_fraction: Some(0.5),
        scopes: None,
    };
    let big = many("big", 40, Some("big"));
    let everything: Vec<Department> = big
        .iter()
        .cloned()
        .chain(many("x", 12, Some("x")))
        .collect();
    confirmed_listing(&db, &mut lease, run, &everything, &guarded).await;

    // Scope "x" now lists 12 other ids: 12 of 52 is under half of the source, all of "x"
    // is more than half of "x".
    let listed: Vec<Department> = big.into_iter().chain(many("X", 12, Some("x"))).collect();
    let withheld = vec![WithheldDeletions {
        scope: Some("x".to_owned()),
        would_delete: 12,
        live: 12,
    }];
    for pass in 0..3 {
        let counts = confirmed_listing(&db, &mut lease, run, &listed, &guarded).await;
        assert_eq!(
            (counts.deleted, &counts.withheld_deletions),
            (0, &withheld),
            "pass {pass}"
        );
    }
    assert_eq!(deleted_rows(&db).await, 0);
}

/// On PostgreSQL a listing's page exactly as the trusted listing saw it is not looked up
/// row by row; a row deleted by hand since must still come back, as it does on SQLite.
async fn a_page_trusted_by_its_digest_brings_back_rows_deleted_by_hand(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guarded = DeletionPolicy {
        max_delete_fraction: Some(0.5),
        scopes: None,
    };
    let page = many("d", 10, None);
    for _ in 0..2 {
        confirmed_listing(&db, &mut lease, run, &page, &guarded).await;
    }
    db.execute("DELETE FROM departments WHERE external_id IN ('d3', 'd4')")
        .await;
    db.execute("UPDATE departments SET name = 'By hand' WHERE external_id = 'd5'")
        .await;

    let done = Checkpoint::ListingDone {
        listing_id: Uuid::new_v4(),
        confirms: None,
        deletions: guarded,
    };
    let counts = commit(&db, &mut lease, run, &page, &done).await;
    assert_eq!((counts.inserted, counts.updated), (2, 1));
    assert_eq!(
        db.count("SELECT count(*) FROM departments WHERE name LIKE 'Department d%'")
            .await,
        10
    );
}

/// The position after a listing page that more pages follow.
fn listing_goes_on(listing_id: Uuid) -> Checkpoint {
    Checkpoint::Listing(ListingProgress {
        listing_id,
        cursor: Some("next".to_owned()),
        confirms: None,
    })
}

/// The position after a listing's last page.
fn listing_ends(listing_id: Uuid) -> Checkpoint {
    Checkpoint::ListingDone {
        listing_id,
        confirms: None,
        deletions: DeletionPolicy {
            max_delete_fraction: None,
            scopes: None,
        },
    }
}

/// Departments "1" and "2", named `names`.
fn one_and_two(names: [&str; 2]) -> [Department; 2] {
    let t = at(2020, 1, 1);
    [department("1", names[0], t), department("2", names[1], t)]
}

/// Commits a complete listing of two pages, whose pages the next listing trusts, and
/// returns its first page.
async fn one_complete_listing(db: &TestStore, lease: &mut Lease, run: RunId) -> [Department; 2] {
    let listing = Uuid::new_v4();
    let page = one_and_two(["one", "two"]);
    commit(db, lease, run, &page, &listing_goes_on(listing)).await;
    let last = [department("3", "three", at(2020, 1, 1))];
    commit(db, lease, run, &last, &listing_ends(listing)).await;
    page
}

async fn a_listing_that_rewrote_a_row_trusts_no_page_after_it(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let page = one_complete_listing(&db, &mut lease, run).await;

    // The next listing renames "1" on its first page; the listing shifts under it and its
    // second page is the first listing's first page again, "1" as it was: stored as it
    // is, not taken for what is stored.
    let second = Uuid::new_v4();
    let renamed = one_and_two(["renamed", "two"]);
    let counts = commit(&db, &mut lease, run, &renamed, &listing_goes_on(second)).await;
    assert_eq!(written(counts), (0, 1, 1));
    let counts = commit(&db, &mut lease, run, &page, &listing_goes_on(second)).await;
    assert_eq!(written(counts), (0, 1, 1));
    let name = db
        .text("SELECT name FROM departments WHERE external_id = '1'")
        .await;
    assert_eq!(name.as_deref(), Some("one"));
}

async fn an_abandoned_listing_leaves_no_page_trusted(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let page = one_complete_listing(&db, &mut lease, run).await;

    // A listing renames "1", then is abandoned (the listing changed under it).
    let second = Uuid::new_v4();
    let renamed = one_and_two(["renamed", "two"]);
    commit(&db, &mut lease, run, &renamed, &listing_goes_on(second)).await;
    let abandoned = Checkpoint::ListingAbandoned { listing_id: second };
    commit(&db, &mut lease, run, &[], &abandoned).await;

    // The next listing has the first listing's first page again, "1" as it was.
    let third = Uuid::new_v4();
    let counts = commit(&db, &mut lease, run, &page, &listing_goes_on(third)).await;
    assert_eq!(written(counts), (0, 1, 1));
    let name = db
        .text("SELECT name FROM departments WHERE external_id = '1'")
        .await;
    assert_eq!(name.as_deref(), Some("one"));
}

/// Commits `ids` as a page of the listing `listing_id` (confirming `confirms`) after
/// which more pages follow.
async fn listing_page(
    db: &TestStore,
    lease: &mut Lease,
    run: RunId,
    ids: &[&str],
    listing_id: Uuid,
    confirms: Option<Uuid>,
) -> PageCounts {
    let page: Vec<Department> = ids.iter().map(|id| listed(id)).collect();
    let more = Checkpoint::Listing(ListingProgress {
        listing_id,
        cursor: Some("page-2".to_owned()),
        confirms,
    });
    commit(db, lease, run, &page, &more).await
}

/// Commits `ids` as the last page of the listing `listing_id` (confirming `confirms`).
async fn last_listing_page(
    db: &TestStore,
    lease: &mut Lease,
    run: RunId,
    ids: &[&str],
    listing_id: Uuid,
    confirms: Option<Uuid>,
    guard: Option<f64>,
) -> PageCounts {
    let page: Vec<Department> = ids.iter().map(|id| listed(id)).collect();
    let last = Checkpoint::ListingDone {
        listing_id,
        confirms,
        deletions: DeletionPolicy {
            max_delete_fraction: guard,
            scopes: None,
        },
    };
    commit(db, lease, run, &page, &last).await
}

async fn paged_listings_keep_the_clock_of_the_first_listings_first_page(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let guard = Some(0.5);
    complete_listing(&db, &mut lease, run, &["1", "2", "3", "4"], None, guard).await;

    // The first listing, in two pages, misses "2", "3" and "4" and adds five new rows:
    // two on its first page, three on its last.
    let first = Uuid::new_v4();
    let counts = listing_page(&db, &mut lease, run, &["1", "5", "6"], first, None).await;
    assert_eq!(written(counts), (2, 0, 1));
    let last = ["7", "8", "9"];
    let counts = last_listing_page(&db, &mut lease, run, &last, first, None, guard).await;
    assert_eq!((counts.inserted, counts.awaiting_confirmation), (3, 3));
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.pending_confirmation, Some(first));

    // The confirming listing, in two pages too, misses the same three.
    let second = Uuid::new_v4();
    let counts = listing_page(&db, &mut lease, run, &["1", "5", "6"], second, Some(first)).await;
    assert_eq!(written(counts), (0, 0, 3));
    let counts = last_listing_page(&db, &mut lease, run, &last, second, Some(first), guard).await;

    // The guard's base is the 4 rows live when the first listing's first page was
    // committed: 3 of 4 is more than half. Had the clock restarted at any later page, the
    // base would hold the new rows too (6 at the first listing's last page, 9 after it)
    // and the 3 would have been deleted.
    assert_eq!(counts.deleted, 0);
    // 3 of the 4 live before the first listing is too many.
    let withheld = &counts.withheld_deletions[0];
    assert_eq!((withheld.would_delete, withheld.live), (3, 4));
    let live = db
        .count("SELECT count(*) FROM departments WHERE deleted_at IS NULL")
        .await;
    assert_eq!(live, 9);
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!((state.listing, state.pending_confirmation), (None, None));
    assert_eq!(db.count("SELECT count(*) FROM listing_seen").await, 0);
}

async fn rejected_records_are_kept_once_and_counted(db: TestStore) {
    let (mut lease, run) = locked_run(&db).await;
    let bad = |name: &str| RejectedRecord {
        external_id: Some("7".to_owned()),
        reason: "the name is empty".to_owned(),
        payload: serde_json::json!({ "id": "7", "name": name, "nul": "a\u{0}b" }),
    };
    let w = window(at(2020, 1, 1), at(2021, 1, 1));
    commit(&db, &mut lease, run, &[], &plan(at(2021, 1, 1), &[w])).await;
    let in_progress = |cursor: &str| Checkpoint::Window {
        mode: RunMode::Incremental,
        window: w,
        cursor: Some(cursor.to_owned()),
    };
    for (cursor, records) in [("a", vec![bad("")]), ("b", vec![bad(""), bad(" ")])] {
        let counts = db
            .store
            .commit_page(
                &mut lease,
                &Commit {
                    run,
                    source: "s",
                    departments: &[],
                    rejected: &records,
                    checkpoint: &in_progress(cursor),
                },
            )
            .await
            .unwrap();
        assert_eq!(counts.rejected, records.len() as u64);
    }
    assert_eq!(db.count("SELECT count(*) FROM rejected_records").await, 2);
    let seen = db
        .count("SELECT max(times_seen) FROM rejected_records")
        .await;
    assert_eq!(seen, 2, "the same payload seen twice is one row seen twice");
    assert_eq!(db.count("SELECT rejected FROM sync_runs").await, 3);
    let status = db.store.status(&["s".to_owned()]).await.unwrap();
    assert_eq!(status[0].rejected_records, 2);
}

async fn status_has_a_line_per_source(db: TestStore) {
    let names = ["s".to_owned(), "never".to_owned()];
    let status = db.store.status(&names).await.unwrap();
    assert_eq!(
        status
            .iter()
            .map(|s| (s.source.as_str(), s.state.as_str(), s.position.as_str()))
            .collect::<Vec<_>>(),
        [("never", "never run", "-"), ("s", "never run", "-")]
    );

    // A run left running by a process that died is closed by the next start.
    let (mut lease, abandoned) = locked_run(&db).await;
    let run = db
        .store
        .start_run(&mut lease, RunMode::Incremental)
        .await
        .unwrap();
    commit_windowed(
        &db,
        &mut lease,
        run,
        &[department("1", "one", at(2020, 1, 1))],
    )
    .await;
    db.store
        .finish_run(run, &RunOutcome::Succeeded)
        .await
        .unwrap();
    let failing = db
        .store
        .start_run(&mut lease, RunMode::Incremental)
        .await
        .unwrap();
    let error = "fetching page 1: upstream answered 500".to_owned();
    db.store
        .finish_run(
            failing,
            &RunOutcome::Failed {
                error: error.clone(),
            },
        )
        .await
        .unwrap();

    let status = db.store.status(&names).await.unwrap();
    let s = status.iter().find(|s| s.source == "s").unwrap();
    assert_eq!(s.state, "failed");
    assert_eq!(s.last_error.as_deref(), Some(error.as_str()));
    assert!(s.last_success_at.is_some());
    assert!(s.last_success_at <= s.last_error_at, "{s:?}");
    assert!(s.first_run_at <= s.last_run_started_at, "{s:?}");
    assert!(s.last_run_finished_at.is_some());
    assert_eq!((s.live_rows, s.deleted_rows, s.rejected_records), (1, 0, 0));
    assert_eq!(s.high_water_mark, Some(at(2022, 1, 1)));
    assert!(!s.backfill_in_progress);
    let first_error = db
        .text(&format!(
            "SELECT error FROM sync_runs WHERE run_id = '{}'",
            abandoned.0
        ))
        .await
        .unwrap_or_default();
    assert!(first_error.starts_with("abandoned"), "{first_error}");

    // Sources the store knows but the config no longer names are listed too.
    let status = db.store.status(&[]).await.unwrap();
    assert_eq!(status.len(), 1);
}

#[tokio::test]
async fn sqlite_keeps_the_raw_record_as_serde_json_writes_it() {
    let db = TestStore::sqlite().await;
    let (mut lease, run) = locked_run(&db).await;
    // Spacing, key order, numbers and escapes a JSON printer might write otherwise.
    let sent = r#"{ "z": [1.50, 1e-7, 0.1, 12345678901234567890, -0.0, 1E300],
        "a": "\u00e9 \" \\ \/ \u2028 \u0001", "n" : null, "nested": {"b": true, "a": []} }"#;
    let page = [Department {
        raw: serde_json::from_str::<RawRecord>(sent).unwrap(),
        ..department("1", "one", at(2020, 1, 1))
    }];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &page).await),
        (1, 0, 0)
    );
    let value: serde_json::Value = serde_json::from_str(sent).unwrap();
    let stored = db.text("SELECT raw FROM departments").await;
    assert_eq!(stored, Some(serde_json::to_string(&value).unwrap()));
    // The same record written another way is the same record.
    let reordered = r#"{"nested":{"a":[],"b":true},"n":null,"a":"\u00e9 \" \\ / \u2028 \u0001","z":[1.50,1e-7,0.1,12345678901234567890,-0.0,1E300]}"#;
    let page = [Department {
        raw: serde_json::from_str::<RawRecord>(reordered).unwrap(),
        ..department("1", "one", at(2020, 1, 1))
    }];
    assert_eq!(
        written(commit_windowed(&db, &mut lease, run, &page).await),
        (0, 0, 1)
    );
}

#[tokio::test]
async fn two_names_for_one_sqlite_file_share_its_leases() {
    let dir = TempDir::new();
    let real = dir.join("deptsync.db");
    let by_real = AnyStore::open(&sqlite_url(&real).into()).await.unwrap();
    // A symlink to the file, and a file under a symlink to its directory.
    let linked_file = dir.join("linked.db");
    std::os::unix::fs::symlink(&real, &linked_file).unwrap();
    let linked_dir = dir.join("linked-dir");
    std::os::unix::fs::symlink(&dir.path, &linked_dir).unwrap();

    let lease = by_real
        .try_lease("s", deptsync::store::lease::DEFAULT_TTL)
        .await
        .unwrap()
        .expect("the lease is free");
    for other_name in [linked_file, linked_dir.join("deptsync.db")] {
        let by_other_name = AnyStore::connect(&sqlite_url(&other_name).into(), IfMissing::Fail)
            .await
            .unwrap();
        assert!(
            by_other_name
                .try_lease("s", deptsync::store::lease::DEFAULT_TTL)
                .await
                .unwrap()
                .is_none(),
            "{} has a lease of its own",
            other_name.display()
        );
    }
    by_real
        .release(&lease, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_sqlite_file_that_cannot_use_a_write_ahead_log_is_refused() {
    let dir = TempDir::new();
    let path = dir.join("deptsync.db");
    // A database in the default (rollback) journal mode, then opened as immutable: SQLite
    // cannot switch it to WAL, and answers with the mode it stays in.
    let url = sqlite_url(&path);
    let plain = sqlx::SqlitePool::connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (x)")
        .execute(&plain)
        .await
        .unwrap();
    plain.close().await;

    let error = AnyStore::open(&format!("{url}?immutable=true").into())
        .await
        .err()
        .expect("an immutable file cannot switch to WAL");
    let message = error.to_string();
    assert!(
        message.contains("write-ahead log") && message.contains("\"delete\""),
        "{message}"
    );
}

#[tokio::test]
async fn the_binary_syncs_into_an_sqlite_file_and_reports_its_status() {
    let dir = TempDir::new();
    let fake = FakeMews::start().await.unwrap();
    let from = Utc.with_ymd_and_hms(2019, 6, 1, 0, 0, 0).unwrap();
    fake.generate(250, 2, from, Utc::now() - chrono::Duration::hours(1));
    let url = sqlite_url(&dir.join("deptsync.db"));
    let config = dir.join("deptsync.toml");
    std::fs::write(
        &config,
        mews_config(&url, "mews-main", &fake.base_url, "page_size = 100"),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let output = run_binary(&["sync", "--config", config], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    fake.assert_no_violations();

    // Once more: nothing changed upstream, so nothing is written.
    let output = run_binary(&["sync", "--config", config], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let (rows, enterprises): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT scope_id) FROM departments
         WHERE source = 'mews-main' AND is_active AND deleted_at IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, enterprises), (250, 2));
    let expected = &fake.departments()[0];
    let (name, raw_name, updated): (String, String, String) = sqlx::query_as(
        "SELECT name, raw ->> 'Name', source_updated_at FROM departments WHERE external_id = ?1",
    )
    .bind(expected.id.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (name.as_str(), raw_name.as_str()),
        (expected.name(), expected.name())
    );
    assert_eq!(
        updated,
        expected
            .updated
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
        "timestamps are RFC 3339 text in UTC"
    );
    let runs: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT status, inserted, updated, unchanged FROM sync_runs ORDER BY started_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0], ("succeeded".to_owned(), 250, 0, 0));
    assert_eq!((runs[1].1, runs[1].2), (0, 0), "{runs:?}");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    pool.close().await;

    let output = run_binary(&["--config", config, "status", "--json"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status[0]["source"], "mews-main");
    assert_eq!(status[0]["state"], "succeeded");
    assert_eq!(status[0]["live_rows"], 250);
    assert!(status[0]["last_success_at"].is_string());
    let output = run_binary(&["--config", config, "status"], &[]).await;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("mews-main") && table.contains("250"),
        "{table}"
    );
}

#[tokio::test]
async fn a_manual_sync_beside_a_holder_of_the_sqlite_lock_skips_the_source() {
    let dir = TempDir::new();
    let fake = FakeMews::start().await.unwrap();
    let url = sqlite_url(&dir.join("deptsync.db"));
    let config = dir.join("deptsync.toml");
    std::fs::write(&config, mews_config(&url, "mews", &fake.base_url, "")).unwrap();
    let config = config.to_str().unwrap();
    let store = deptsync::store::AnyStore::open(&url.clone().into())
        .await
        .unwrap();
    let lease = store
        .try_lease("mews", deptsync::store::lease::DEFAULT_TTL)
        .await
        .unwrap()
        .expect("the lease is free");
    a_sync_skips_the_leased_source(config, &store, lease, &fake).await;
}

#[tokio::test]
async fn without_a_database_the_commands_use_deptsync_db_in_the_working_directory() {
    let dir = TempDir::new();
    let config = dir.join("deptsync.toml");
    let text = mews_config("unused", "mews", "http://127.0.0.1:9", "");
    let without_database = &text[text.find("[[sources]]").unwrap()..];
    std::fs::write(&config, without_database).unwrap();
    let config = config.to_str().unwrap();

    // status only reads: it says the file is missing, and does not create it.
    let output = run_binary_in(&dir.path, &["--config", config, "status"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("deptsync.db does not exist"),
        "{}",
        stderr(&output)
    );
    assert!(!dir.join("deptsync.db").exists());

    let output = run_binary_in(&dir.path, &["--config", config, "migrate"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(dir.join("deptsync.db").exists());
    let output = run_binary_in(&dir.path, &["--config", config, "status", "--json"], &[]).await;
    // Never run, nor due yet (no service has had it): not stale, answered from the new
    // file.
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status[0]["state"], "not run yet");
}

#[tokio::test]
async fn check_and_a_backfill_work_on_sqlite_through_the_binary() {
    let dir = TempDir::new();
    let fake = FakeMews::start().await.unwrap();
    fake.generate(90, 1, at(2020, 1, 1), at(2021, 1, 1));
    let path = dir.join("deptsync.db");
    let config = dir.join("deptsync.toml");
    std::fs::write(
        &config,
        mews_config(&sqlite_url(&path), "mews", &fake.base_url, ""),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let output = run_binary(&["--config", config, "check"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let args = [
        "--config",
        config,
        "sync",
        "--source",
        "mews",
        "--backfill",
        "--from",
        "2020-03-01T00:00:00Z",
        "--to",
        "2020-06-01T00:00:00Z",
    ];
    let output = run_binary(&args, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    fake.assert_no_violations();

    let store = AnyStore::connect(&sqlite_url(&path).into(), IfMissing::Fail)
        .await
        .unwrap();
    let AnyStore::Sqlite(sqlite) = &store else {
        unreachable!("an SQLite url")
    };
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM departments")
        .fetch_one(sqlite.pool())
        .await
        .unwrap();
    let in_range = fake
        .departments()
        .iter()
        .filter(|d| d.updated >= at(2020, 3, 1) && d.updated < at(2020, 6, 1))
        .count() as i64;
    assert_eq!(rows, in_range);
    // A backfill never moves the incremental mark.
    let state = store.load_state("mews").await.unwrap();
    assert_eq!(state.high_water_mark, None);
}

#[tokio::test]
async fn a_database_url_of_another_kind_exits_2() {
    let dir = TempDir::new();
    let config = dir.join("deptsync.toml");
    std::fs::write(
        &config,
        mews_config("mysql://u:hunter2@h/db", "mews", "http://127.0.0.1:9", ""),
    )
    .unwrap();
    let output = run_binary(&["--config", config.to_str().unwrap(), "sync"], &[]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("database.url"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

/// Two Mews sources, each on a fake of its own with `count` departments, in one config
/// whose database is `url`.
async fn two_mews_sources(url: &str, count: usize) -> (FakeMews, FakeMews, String) {
    let from = Utc.with_ymd_and_hms(2019, 6, 1, 0, 0, 0).unwrap();
    let to = Utc::now() - chrono::Duration::hours(1);
    let (a, b) = (
        FakeMews::start().await.unwrap(),
        FakeMews::start().await.unwrap(),
    );
    a.generate(count, 1, from, to);
    b.generate(count, 1, from, to);
    let mut text = mews_config(url, "a", &a.base_url, "page_size = 100");
    let second = mews_config(url, "b", &b.base_url, "page_size = 100");
    text.push_str(&second[second.find("[[sources]]").unwrap()..]);
    (a, b, text)
}

#[tokio::test]
async fn two_processes_write_one_sqlite_file_at_once() {
    let dir = TempDir::new();
    let url = sqlite_url(&dir.join("deptsync.db"));
    let (a, b, text) = two_mews_sources(&url, 1500).await;
    let config = dir.join("deptsync.toml");
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();

    // Each process syncs its own source; their pages take turns at the file's write lock.
    let sync_a = ["--config", config, "sync", "--source", "a"];
    let sync_b = ["--config", config, "sync", "--source", "b"];
    let (first, second) = tokio::join!(run_binary(&sync_a, &[]), run_binary(&sync_b, &[]));

    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    a.assert_no_violations();
    b.assert_no_violations();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT source, count(*) FROM departments GROUP BY source ORDER BY source")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, [("a".to_owned(), 1500), ("b".to_owned(), 1500)]);
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn the_service_runs_on_an_sqlite_file() {
    let dir = TempDir::new();
    let url = sqlite_url(&dir.join("deptsync.db"));
    let (a, b, text) = two_mews_sources(&url, 300).await;
    let settings = deptsync::Settings::parse(&text, &|_| None).unwrap();
    let daemon = deptsync::daemon::Daemon::build(settings).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run_until(async {
        let _ = stopped.await;
    }));

    // Both sources run once at start, at the same time, into the one file.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let succeeded = loop {
        let runs = match sqlx::SqlitePool::connect(&url).await {
            Ok(pool) => {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM sync_runs WHERE status = 'succeeded'")
                        .fetch_one(&pool)
                        .await
                        .unwrap_or(0);
                pool.close().await;
                n
            }
            Err(_) => 0,
        };
        if runs == 2 || tokio::time::Instant::now() > deadline {
            break runs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(15), running)
        .await
        .expect("the service did not stop within 15 s")
        .unwrap()
        .unwrap();

    assert_eq!(succeeded, 2, "both sources' first passes succeed");
    a.assert_no_violations();
    b.assert_no_violations();
    let store =
        deptsync::store::AnyStore::connect(&url.clone().into(), deptsync::store::IfMissing::Fail)
            .await
            .unwrap();
    let status = store.status(&[]).await.unwrap();
    assert_eq!(
        status
            .iter()
            .map(|s| (s.source.as_str(), s.state.as_str(), s.live_rows))
            .collect::<Vec<_>>(),
        [("a", "succeeded", 300), ("b", "succeeded", 300)]
    );
}

#[tokio::test]
async fn both_stores_have_the_same_tables_and_columns() {
    let postgres = TestDb::new().await;
    let sqlite = TestStore::sqlite().await;
    let AnyStore::Sqlite(sqlite_store) = &sqlite.store else {
        unreachable!("an SQLite test store")
    };
    let mut in_postgres: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'
           -- How PostgreSQL keeps `listing_seen` (a view of it, on both stores).
           AND table_name <> 'listing_seen_pages'
           -- Where PostgreSQL's change feed was made, which a copy of the database
           -- changes (a copy of an SQLite file cannot be told from the file).
           AND NOT (table_name = 'feed_identity'
                    AND column_name IN ('system_identifier', 'database_oid', 'table_oid',
                                        'timeline'))",
    )
    .fetch_all(postgres.pool())
    .await
    .unwrap();
    let mut in_sqlite: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.name, c.name FROM sqlite_master m, pragma_table_info(m.name) c
         WHERE m.type IN ('table', 'view') AND m.name NOT LIKE '\\_%' ESCAPE '\\'
           AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
           -- SQLite's count of page transactions, the change feed's positions there
           -- (PostgreSQL's are its transaction ids).
           AND m.name <> 'feed_clock'",
    )
    .fetch_all(sqlite_store.pool())
    .await
    .unwrap();
    in_postgres.sort();
    in_sqlite.sort();
    assert_eq!(in_sqlite, in_postgres);
}
