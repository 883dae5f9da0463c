//! History (`department_versions`) and the change feed (`deptsync changes`), on both
//! stores: every transition of a department writes one version in the page's own
//! transaction, nothing else writes any, and a reader of the feed sees each version once,
//! whatever order concurrent transactions commit in.

use chrono::{DateTime, Duration, Utc};
use deptsync::model::{
    Checkpoint, DeletionPolicy, Department, DepartmentVersion, FeedToken, RawRecord, RunId, RunMode,
};
use deptsync::store::{AnyStore, Commit, Store};
use uuid::Uuid;

use crate::helpers::{
    TempDir, TestStore, at, department, locked_run, mews_config, on_both_stores, one_window,
    run_binary, sqlite_url, stderr, token_position,
};

on_both_stores!(
    an_insert_opens_a_version_and_an_unchanged_page_writes_none,
    a_later_change_of_the_raw_record_keeps_when_the_version_started,
    a_change_closes_the_current_version_and_opens_the_next,
    a_change_the_vendor_dates_no_later_starts_at_the_commit,
    a_deletion_and_a_revival_each_open_a_version,
    a_backfill_of_old_updates_rewrites_no_history,
    a_failed_page_writes_no_version,
    pages_loaded_without_a_lookup_get_versions_too,
    the_feed_gives_each_version_once_and_a_token_to_resume_from,
    the_feed_reads_the_named_sources_only,
    a_token_this_database_never_gave_is_refused,
    retention_trims_closed_versions_and_never_the_current_one,
);

/// Commits `departments` of `source` as the last page of a one-window pass.
pub(crate) async fn commit_windowed(store: &AnyStore, source: &str, departments: &[Department]) {
    let (mut lease, run) = locked_run(store, source).await;
    let (ledger, done) = one_window();
    for (page, checkpoint) in [(&[][..], &ledger), (departments, &done)] {
        let commit = Commit {
            run,
            source,
            departments: page,
            rejected: &[],
            checkpoint,
        };
        store.commit_page(&mut lease, &commit).await.unwrap();
    }
    store
        .release(&lease, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();
}

/// Commits one department of `source`, `id` named `name` and updated at `updated`, as a
/// one-window pass.
pub(crate) async fn put(
    db: &TestStore,
    source: &str,
    id: &str,
    name: &str,
    updated: DateTime<Utc>,
) {
    commit_windowed(&db.store, source, &[department(id, name, Some(updated))]).await;
}

/// Commits `ids` of source `s` as one complete listing confirming `confirms`, no guard.
async fn complete_listing(store: &AnyStore, ids: &[&str], confirms: Option<Uuid>) -> Uuid {
    let (mut lease, run) = locked_run(store, "s").await;
    let listing_id = Uuid::new_v4();
    let page: Vec<Department> = ids
        .iter()
        .map(|id| department(id, &format!("Department {id}"), None))
        .collect();
    let last = Checkpoint::ListingDone {
        listing_id,
        confirms,
        deletions: DeletionPolicy {
            max_delete_fraction: None,
            scopes: None,
        },
    };
    let commit = Commit {
        run,
        source: "s",
        departments: &page,
        rejected: &[],
        checkpoint: &last,
    };
    store.commit_page(&mut lease, &commit).await.unwrap();
    store
        .release(&lease, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();
    listing_id
}

/// Every version the feed has after `since`, and the token to read on from, once every
/// version committed so far is readable.
pub(crate) async fn read_feed(
    store: &AnyStore,
    since: FeedToken,
    sources: &[String],
) -> (Vec<DepartmentVersion>, FeedToken) {
    settled(store).await;
    read_feed_now(store, since, sources).await
}

/// Waits until every version committed so far can be read from the feed. On PostgreSQL a
/// version is readable once every transaction older than its own has ended, in the whole
/// cluster: other tests' transactions, in their own databases, hold it back a moment.
pub(crate) async fn settled(store: &AnyStore) {
    let AnyStore::Postgres(pg) = store else {
        return;
    };
    for _ in 0..1500 {
        let readable: bool = sqlx::query_scalar(
            "SELECT COALESCE(max(feed_position), 0)
                    < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
             FROM department_versions",
        )
        .fetch_one(pg.pool())
        .await
        .unwrap();
        if readable {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("a transaction of the cluster ran for thirty seconds");
}

/// What the feed has after `since` now.
pub(crate) async fn read_feed_now(
    store: &AnyStore,
    since: FeedToken,
    sources: &[String],
) -> (Vec<DepartmentVersion>, FeedToken) {
    let mut feed = store.changes(since, sources).await.unwrap();
    let mut versions = Vec::new();
    while let Some(batch) = feed.next_batch().await.unwrap() {
        versions.extend(batch);
    }
    (versions, feed.next_token())
}

/// The versions of `id` of source `s`, oldest first, through the feed.
async fn timeline(store: &AnyStore, id: &str) -> Vec<DepartmentVersion> {
    let mut versions = read_feed(store, FeedToken::START, &[]).await.0;
    versions.retain(|v| v.source == "s" && v.external_id == id);
    versions
}

/// `(name, deleted, valid_from, valid_to)` of each version of `id`, read from the table.
async fn versions_of(
    db: &TestStore,
    id: &str,
) -> Vec<(String, bool, DateTime<Utc>, Option<DateTime<Utc>>)> {
    let names = db
        .scalars::<String>(&format!(
            "SELECT name FROM department_versions WHERE source = 's' AND external_id = '{id}'
             ORDER BY valid_from, feed_position"
        ))
        .await;
    let deleted = db
        .scalars::<i64>(&format!(
            "SELECT CAST(CASE WHEN deleted THEN 1 ELSE 0 END AS BIGINT) FROM department_versions
             WHERE source = 's' AND external_id = '{id}' ORDER BY valid_from, feed_position"
        ))
        .await;
    let from = db
        .instants(&format!(
            "SELECT valid_from FROM department_versions WHERE source = 's' AND external_id = '{id}'
             ORDER BY valid_from, feed_position"
        ))
        .await;
    let to = db
        .instants(&format!(
            "SELECT valid_to FROM department_versions WHERE source = 's' AND external_id = '{id}'
             ORDER BY valid_from, feed_position"
        ))
        .await;
    names
        .into_iter()
        .zip(deleted)
        .zip(from.into_iter().zip(to))
        .map(|((name, deleted), (from, to))| (name, deleted == 1, from.unwrap(), to))
        .collect()
}

async fn an_insert_opens_a_version_and_an_unchanged_page_writes_none(db: TestStore) {
    let a = department("a", "Front desk", Some(at(2021, 3, 1)));
    commit_windowed(&db.store, "s", std::slice::from_ref(&a)).await;
    assert_eq!(
        versions_of(&db, "a").await,
        [("Front desk".to_owned(), false, at(2021, 3, 1), None)],
        "an insert opens a version from the vendor's update time"
    );
    let run = db
        .text("SELECT CAST(run_id AS TEXT) FROM department_versions")
        .await;
    let started = db
        .text("SELECT CAST(run_id AS TEXT) FROM sync_runs ORDER BY started_at LIMIT 1")
        .await;
    assert_eq!(run, started, "a version names the run that wrote it");

    // The same page again, and a change the history does not keep (the raw record only):
    // no version.
    commit_windowed(&db.store, "s", std::slice::from_ref(&a)).await;
    let mut raw_only = a.clone();
    raw_only.raw =
        RawRecord::from_value(&serde_json::json!({ "id": "a", "name": "Front desk", "x": 1 }));
    raw_only.source_updated_at = Some(at(2021, 4, 1));
    commit_windowed(&db.store, "s", &[raw_only]).await;
    assert_eq!(
        db.count("SELECT count(*) FROM department_versions").await,
        1
    );
    assert_eq!(
        db.count("SELECT updated FROM sync_runs ORDER BY started_at DESC LIMIT 1")
            .await,
        1,
        "the row itself was updated"
    );
}

async fn a_later_change_of_the_raw_record_keeps_when_the_version_started(db: TestStore) {
    put(&db, "s", "a", "Front desk", at(2021, 3, 1)).await;
    // The vendor touches the record after deptsync first stored it, changing nothing a
    // version holds.
    let mut touched = department("a", "Front desk", Some(Utc::now() + Duration::minutes(1)));
    touched.raw = RawRecord::from_value(&serde_json::json!({ "id": "a", "note": "x" }));
    commit_windowed(&db.store, "s", &[touched]).await;
    assert_eq!(
        versions_of(&db, "a").await,
        [("Front desk".to_owned(), false, at(2021, 3, 1), None)]
    );
    put(
        &db,
        "s",
        "a",
        "Reception",
        Utc::now() + Duration::minutes(2),
    )
    .await;
    let versions = versions_of(&db, "a").await;
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[0].2, at(2021, 3, 1), "{versions:?}");
}

async fn a_change_closes_the_current_version_and_opens_the_next(db: TestStore) {
    put(&db, "s", "a", "Front desk", at(2021, 3, 1)).await;
    let mut moved = department("a", "Reception", Some(at(2022, 5, 1)));
    moved.parent_external_id = Some("lobby".to_owned());
    commit_windowed(&db.store, "s", &[moved]).await;
    let mut inactive = department("a", "Reception", Some(at(2023, 1, 1)));
    inactive.parent_external_id = Some("lobby".to_owned());
    inactive.is_active = false;
    commit_windowed(&db.store, "s", &[inactive]).await;
    assert_eq!(
        versions_of(&db, "a").await,
        [
            (
                "Front desk".to_owned(),
                false,
                at(2021, 3, 1),
                Some(at(2022, 5, 1))
            ),
            (
                "Reception".to_owned(),
                false,
                at(2022, 5, 1),
                Some(at(2023, 1, 1))
            ),
            ("Reception".to_owned(), false, at(2023, 1, 1), None),
        ]
    );
    let versions = timeline(&db.store, "a").await;
    let fields: Vec<(bool, Option<&str>)> = versions
        .iter()
        .map(|v| (v.is_active, v.parent_external_id.as_deref()))
        .collect();
    assert_eq!(
        fields,
        [(true, None), (true, Some("lobby")), (false, Some("lobby"))]
    );
}

async fn a_change_the_vendor_dates_no_later_starts_at_the_commit(db: TestStore) {
    put(&db, "s", "a", "Front desk", at(2021, 3, 1)).await;
    // Renamed, but the vendor's update time did not move: the change cannot have held
    // since then (the old name did), so it starts when deptsync saw it.
    let before = Utc::now() - Duration::seconds(5);
    put(&db, "s", "a", "Reception", at(2021, 3, 1)).await;
    let versions = versions_of(&db, "a").await;
    assert_eq!(versions.len(), 2, "{versions:?}");
    let (_, _, from, to) = &versions[1];
    assert!(*from > before && *from <= Utc::now(), "{versions:?}");
    assert_eq!(
        versions[0].3,
        Some(*from),
        "the first closes where the second opens"
    );
    assert_eq!(*to, None);
}

async fn a_deletion_and_a_revival_each_open_a_version(db: TestStore) {
    let started = Utc::now() - Duration::seconds(5);
    complete_listing(&db.store, &["1", "2"], None).await;
    let first = complete_listing(&db.store, &["1"], None).await;
    complete_listing(&db.store, &["1"], Some(first)).await;
    let versions = versions_of(&db, "2").await;
    assert_eq!(versions.len(), 2, "{versions:?}");
    let (live, deleted) = (&versions[0], &versions[1]);
    assert!(!live.1 && deleted.1, "{versions:?}");
    assert!(
        live.2 > started,
        "a listing has no update times: the commit's is used"
    );
    assert_eq!(
        live.3,
        Some(deleted.2),
        "the deletion closes the live version"
    );
    assert_eq!(deleted.3, None);

    complete_listing(&db.store, &["1", "2"], None).await;
    let versions = versions_of(&db, "2").await;
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(!versions[2].1 && versions[2].3.is_none(), "{versions:?}");
    assert_eq!(versions[1].3, Some(versions[2].2));
    assert_eq!(
        versions_of(&db, "1").await.len(),
        1,
        "department 1 never changed"
    );
}

async fn a_backfill_of_old_updates_rewrites_no_history(db: TestStore) {
    put(&db, "s", "a", "Old", at(2021, 1, 1)).await;
    put(&db, "s", "a", "New", at(2022, 1, 1)).await;
    let before = versions_of(&db, "a").await;
    // A backfill reads the old update again.
    put(&db, "s", "a", "Old", at(2021, 1, 1)).await;
    assert_eq!(versions_of(&db, "a").await, before);
    assert_eq!(before.len(), 2);
}

async fn pages_loaded_without_a_lookup_get_versions_too(db: TestStore) {
    // A first pass: after a page whose rows were all new, PostgreSQL loads the next one
    // with COPY, looking nothing up.
    let (mut lease, run) = locked_run(&db.store, "s").await;
    let (ledger, done) = one_window();
    let Checkpoint::Window { window, .. } = done else {
        unreachable!()
    };
    let going_on = Checkpoint::Window {
        mode: RunMode::Incremental,
        window,
        cursor: Some("next".to_owned()),
    };
    let page = |from: usize| -> Vec<Department> {
        (from..from + 50)
            .map(|i| department(&format!("{i:03}"), "A", Some(at(2021, 1, 1))))
            .collect()
    };
    for (departments, checkpoint) in [
        (vec![], &ledger),
        (page(0), &going_on),
        (page(50), &going_on),
        (page(100), &done),
    ] {
        let commit = Commit {
            run,
            source: "s",
            departments: &departments,
            rejected: &[],
            checkpoint,
        };
        db.store.commit_page(&mut lease, &commit).await.unwrap();
    }
    db.store
        .release(&lease, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();
    let (versions, _) = read_feed(&db.store, FeedToken::START, &[]).await;
    assert_eq!(
        versions.len(),
        150,
        "every loaded department is in the feed"
    );
}

async fn a_failed_page_writes_no_version(db: TestStore) {
    let (mut lease, _) = locked_run(&db.store, "s").await;
    let (ledger, _) = one_window();
    // A run the store does not know: the page is refused after its departments were
    // written in its transaction.
    let commit = Commit {
        run: RunId(Uuid::new_v4()),
        source: "s",
        departments: &[department("a", "A", Some(at(2021, 1, 1)))],
        rejected: &[],
        checkpoint: &ledger,
    };
    assert!(db.store.commit_page(&mut lease, &commit).await.is_err());
    assert_eq!(
        db.count("SELECT count(*) FROM department_versions").await,
        0
    );
}

async fn the_feed_gives_each_version_once_and_a_token_to_resume_from(db: TestStore) {
    let (versions, start) = read_feed(&db.store, FeedToken::START, &[]).await;
    assert!(versions.is_empty());
    let pages: Vec<Department> = (0..2500)
        .map(|i| department(&format!("{i:05}"), "A", Some(at(2021, 1, 1))))
        .collect();
    commit_windowed(&db.store, "s", &pages).await;

    let (versions, next) = read_feed(&db.store, start, &[]).await;
    assert_eq!(
        versions.len(),
        2500,
        "more than one batch, every version once"
    );
    let ids: std::collections::HashSet<&str> =
        versions.iter().map(|v| v.external_id.as_str()).collect();
    assert_eq!(ids.len(), 2500);
    assert!(
        versions
            .iter()
            .all(|v| v.name == "A" && !v.deleted && v.valid_from == at(2021, 1, 1))
    );

    let (again, same) = read_feed(&db.store, next, &[]).await;
    assert!(again.is_empty(), "nothing after the token");
    // On PostgreSQL it moves on with the cluster's transactions, even with no version.
    assert!(
        token_position(same) >= token_position(next),
        "and the token never goes back"
    );

    put(&db, "s", "00007", "B", at(2022, 1, 1)).await;
    let (changed, later) = read_feed(&db.store, next, &[]).await;
    let names: Vec<(&str, &str)> = changed
        .iter()
        .map(|v| (v.external_id.as_str(), v.name.as_str()))
        .collect();
    assert_eq!(names, [("00007", "B")]);
    assert!(token_position(later) > token_position(next));
    let (none, _) = read_feed(&db.store, later, &[]).await;
    assert!(none.is_empty());
    let token: FeedToken = later.to_string().parse().unwrap();
    assert_eq!(token, later, "a token survives being written down");
}

async fn the_feed_reads_the_named_sources_only(db: TestStore) {
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    put(&db, "t", "b", "B", at(2021, 1, 1)).await;
    let (versions, _) = read_feed(&db.store, FeedToken::START, &["t".to_owned()]).await;
    let sources: Vec<&str> = versions.iter().map(|v| v.source.as_str()).collect();
    assert_eq!(sources, ["t"]);
    let (versions, _) = read_feed(&db.store, FeedToken::START, &[]).await;
    assert_eq!(versions.len(), 2);
}

async fn a_token_this_database_never_gave_is_refused(db: TestStore) {
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    let (_, next) = read_feed(&db.store, FeedToken::START, &[]).await;
    // Beyond anything this database's feed has handed out: kept from before a restore of
    // an older copy. Reading on from it would skip what lies between.
    let (feed, position) = next
        .to_string()
        .split_once(':')
        .map(|(f, p)| (f.to_owned(), p.parse::<i64>().unwrap()))
        .unwrap();
    let ahead: FeedToken = format!("{feed}:{}", position + 1_000_000_000)
        .parse()
        .unwrap();
    let error = match db.store.changes(ahead, &[]).await {
        Ok(_) => panic!("a token ahead of the feed was taken"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("ahead") && error.contains("beginning"),
        "{error}"
    );
    // A bare number, as a deptsync before feeds had an identity wrote it.
    let legacy: FeedToken = position.to_string().parse().unwrap();
    let error = match db.store.changes(legacy, &[]).await {
        Ok(_) => panic!("a token without a feed was taken"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("no feed identity"), "{error}");
}

async fn retention_trims_closed_versions_and_never_the_current_one(db: TestStore) {
    let now = Utc::now();
    let long_ago = now - Duration::days(400);
    put(&db, "s", "a", "1", long_ago).await;
    put(&db, "s", "a", "2", long_ago + Duration::days(10)).await;
    put(&db, "s", "a", "3", now - Duration::days(5)).await;
    // Unchanged for 400 days: its only version is current, and stays.
    put(&db, "s", "b", "1", long_ago).await;
    put(&db, "t", "a", "1", long_ago).await;
    put(&db, "t", "a", "2", long_ago + Duration::days(1)).await;

    let retention = std::time::Duration::from_secs(30 * 86_400);
    let trimmed = db.store.trim_history("s", retention).await.unwrap();
    assert_eq!(
        trimmed, 0,
        "versions written just now are kept, however old their dates: no reader of the \
         feed has had them yet"
    );
    // As if written a year ago.
    db.execute(
        "UPDATE department_history SET observed_at = valid_from WHERE valid_from < observed_at",
    )
    .await;
    let trimmed = db.store.trim_history("s", retention).await.unwrap();
    // "a"'s first version closed 390 days ago; its second closed 5 days ago.
    assert_eq!(trimmed, 1);
    let names: Vec<String> = versions_of(&db, "a")
        .await
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert_eq!(names, ["2", "3"]);
    assert_eq!(versions_of(&db, "b").await.len(), 1);
    assert_eq!(
        db.count("SELECT count(*) FROM department_versions WHERE source = 't'")
            .await,
        2,
        "another source's history is its own"
    );
}

/// The migration before history.
const BEFORE_HISTORY: i64 = 20261201000001;

async fn an_upgraded_database_starts_its_history_at_once(postgres: bool) {
    // Rows an older deptsync stored: one with a vendor's update time, one without, one
    // deleted.
    let setup = if postgres {
        "INSERT INTO departments (source, external_id, scope_id, name, is_active,
             source_updated_at, raw, first_synced_at, last_changed_at, deleted_at)
         VALUES ('s', 'a', 'scope', 'A', true, '2021-01-01T00:00:00Z', '{}',
                 '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z', NULL),
                ('s', '1', 'scope', 'One', true, NULL, '{}',
                 '2024-02-01T00:00:00Z', '2024-02-01T00:00:00Z', NULL),
                ('s', '2', 'scope', 'Two', true, NULL, '{}',
                 '2024-02-01T00:00:00Z', '2024-03-01T00:00:00Z', '2024-03-01T00:00:00Z')"
    } else {
        "INSERT INTO departments (source, external_id, scope_id, name, is_active,
             source_updated_at, raw, first_synced_at, last_changed_at, deleted_at)
         VALUES ('s', 'a', 'scope', 'A', 1, '2021-01-01T00:00:00.000000Z', '{}',
                 '2024-01-01T00:00:00.000000Z', '2024-01-01T00:00:00.000000Z', NULL),
                ('s', '1', 'scope', 'One', 1, NULL, '{}',
                 '2024-02-01T00:00:00.000000Z', '2024-02-01T00:00:00.000000Z', NULL),
                ('s', '2', 'scope', 'Two', 1, NULL, '{}',
                 '2024-02-01T00:00:00.000000Z', '2024-03-01T00:00:00.000000Z',
                 '2024-03-01T00:00:00.000000Z')"
    };
    let db = TestStore::upgraded(postgres, BEFORE_HISTORY, setup).await;

    assert_eq!(
        versions_of(&db, "a").await,
        [("A".to_owned(), false, at(2021, 1, 1), None)],
        "with a vendor's update time, the version starts there"
    );
    assert_eq!(
        versions_of(&db, "1").await,
        [("One".to_owned(), false, at(2024, 2, 1), None)],
        "without one, at its first sync"
    );
    assert_eq!(
        versions_of(&db, "2").await,
        [
            (
                "Two".to_owned(),
                false,
                at(2024, 2, 1),
                Some(at(2024, 3, 1))
            ),
            ("Two".to_owned(), true, at(2024, 3, 1), None),
        ],
        "a deleted department: live, then deleted"
    );
    let (versions, _) = read_feed(&db.store, FeedToken::START, &[]).await;
    assert_eq!(
        versions.len(),
        4,
        "and the feed has them from the beginning"
    );
    // Just upgraded, no reader has had them yet: a retention keeps them, however old.
    let trimmed = db
        .store
        .trim_history("s", std::time::Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!(trimmed, 0, "versions the upgrade wrote are new to the feed");
    // All of them written by the upgrade's one transaction: more than a batch of them
    // reads whole, across batches, even where a batch ends between two versions of one
    // department (the live one, "a", sorts first: the pairs straddle the batches' ends).
    let many: i64 = 700;
    let setup = if postgres {
        format!(
            "INSERT INTO departments (source, external_id, name, is_active, raw,
                 first_synced_at, last_changed_at, deleted_at)
             SELECT 'm', 'd' || i, 'D', true, '{{}}', '2024-01-01T00:00:00Z',
                    '2024-02-01T00:00:00Z', '2024-02-01T00:00:00Z'
             FROM generate_series(1, {many}) i;
             INSERT INTO departments (source, external_id, name, is_active, raw,
                 first_synced_at, last_changed_at)
             VALUES ('m', 'a', 'A', true, '{{}}', '2024-01-01T00:00:00Z',
                     '2024-01-01T00:00:00Z')"
        )
    } else {
        format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {many})
             INSERT INTO departments (source, external_id, name, is_active, raw,
                 first_synced_at, last_changed_at, deleted_at)
             SELECT 'm', 'd' || i, 'D', 1, '{{}}', '2024-01-01T00:00:00.000000Z',
                    '2024-02-01T00:00:00.000000Z', '2024-02-01T00:00:00.000000Z'
             FROM n;
             INSERT INTO departments (source, external_id, name, is_active, raw,
                 first_synced_at, last_changed_at)
             VALUES ('m', 'a', 'A', 1, '{{}}', '2024-01-01T00:00:00.000000Z',
                     '2024-01-01T00:00:00.000000Z')"
        )
    };
    let many_deleted = TestStore::upgraded(postgres, BEFORE_HISTORY, &setup).await;
    let (versions, _) = read_feed(&many_deleted.store, FeedToken::START, &[]).await;
    let distinct: std::collections::HashSet<(&str, bool)> = versions
        .iter()
        .map(|v| (v.external_id.as_str(), v.deleted))
        .collect();
    let expected = 2 * many as usize + 1;
    assert_eq!(
        (versions.len(), distinct.len()),
        (expected, expected),
        "a live and a deleted version of each, each once"
    );

    // History goes on from there.
    put(&db, "s", "a", "B", at(2022, 1, 1)).await;
    assert_eq!(
        versions_of(&db, "a").await,
        [
            ("A".to_owned(), false, at(2021, 1, 1), Some(at(2022, 1, 1))),
            ("B".to_owned(), false, at(2022, 1, 1), None),
        ]
    );
}

#[tokio::test]
async fn an_upgraded_postgresql_database_starts_its_history_at_once() {
    an_upgraded_database_starts_its_history_at_once(true).await;
}

#[tokio::test]
async fn an_upgraded_sqlite_database_starts_its_history_at_once() {
    an_upgraded_database_starts_its_history_at_once(false).await;
}

/// Two sources commit at once, the one that began first committing last, while a reader
/// polls the feed: it sees every version once. Naive readers, which move a watermark to
/// the newest `last_changed_at` or `observed_at` they saw, miss the page that committed
/// late: the test shows both.
#[tokio::test]
async fn a_reader_never_misses_a_page_that_commits_after_a_later_one() {
    let db = TestStore::postgres().await;
    let AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    let store = db.store.clone();
    let (mut lease_a, run_a) = locked_run(&store, "a").await;
    let (mut lease_b, run_b) = locked_run(&store, "b").await;
    let (ledger, _) = one_window();
    for (lease, run, source) in [(&mut lease_a, run_a, "a"), (&mut lease_b, run_b, "b")] {
        let commit = Commit {
            run,
            source,
            departments: &[],
            rejected: &[],
            checkpoint: &ledger,
        };
        store.commit_page(lease, &commit).await.unwrap();
    }

    let mut naive = NaiveReaders::default();
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut token = FeedToken::START;
    // Polls as a reader would: at once, whatever is still running.
    let poll = async |naive: &mut NaiveReaders, token: &mut FeedToken| {
        naive.poll(pg.pool()).await;
        let (versions, next) = read_feed_now(&store, *token, &[]).await;
        *token = next;
        versions
    };

    // Source a's page will stop before its commit: a lock on its run's row holds it.
    let mut blocker = pg.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sync_runs WHERE run_id = $1 FOR UPDATE")
        .bind(run_a.0)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let store_a = store.clone();
    let page_a: Vec<Department> = (0..3)
        .map(|i| department(&format!("a{i}"), "A", Some(at(2021, 1, 1))))
        .collect();
    let (_, done) = one_window();
    let late = tokio::spawn(async move {
        let commit = Commit {
            run: run_a,
            source: "a",
            departments: &page_a,
            rejected: &[],
            checkpoint: &done,
        };
        store_a.commit_page(&mut lease_a, &commit).await.unwrap();
        lease_a
    });
    // Wait until a's transaction has written and waits on the lock (in this database:
    // other tests wait on locks of their own).
    let mut waiting = false;
    for _ in 0..1500 {
        waiting = sqlx::query_scalar(
            "SELECT EXISTS (
                 SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE NOT l.granted AND a.datname = current_database())",
        )
        .fetch_one(pg.pool())
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        waiting && !late.is_finished(),
        "a's page waits for the lock"
    );

    for version in poll(&mut naive, &mut token).await {
        seen.push((version.source, version.external_id));
    }
    // b begins after a and commits before it.
    let page_b = [department("b0", "B", Some(at(2021, 1, 1)))];
    let (_, done) = one_window();
    let commit = Commit {
        run: run_b,
        source: "b",
        departments: &page_b,
        rejected: &[],
        checkpoint: &done,
    };
    store.commit_page(&mut lease_b, &commit).await.unwrap();
    let while_a_runs = poll(&mut naive, &mut token).await;
    assert!(
        while_a_runs.is_empty(),
        "b's version waits behind a's transaction, which began first: {while_a_runs:?}"
    );
    blocker.commit().await.unwrap();
    let lease_a = late.await.unwrap();
    for version in poll(&mut naive, &mut token).await {
        seen.push((version.source, version.external_id));
    }
    // Once every transaction of the cluster older than a's has ended (other tests run
    // beside this one), a's versions are readable.
    settled(&store).await;
    for version in poll(&mut naive, &mut token).await {
        seen.push((version.source, version.external_id));
    }
    store
        .release(&lease_a, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();
    store
        .release(&lease_b, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();

    seen.sort();
    let expected: Vec<(String, String)> = ["a0", "a1", "a2", "b0"]
        .iter()
        .map(|id| (id[..1].to_owned(), (*id).to_owned()))
        .collect();
    assert_eq!(seen, expected, "every version exactly once");
    naive.seen_by_time.sort();
    naive.seen_by_observed.sort();
    assert_eq!(
        naive.seen_by_time,
        ["b0"],
        "a watermark on last_changed_at skips a's page"
    );
    assert_eq!(
        naive.seen_by_observed,
        ["b0"],
        "a watermark on the versions' observed_at skips a's page"
    );
}

/// Readers that move a watermark to the newest thing they saw.
#[derive(Default)]
struct NaiveReaders {
    changed_after: Option<DateTime<Utc>>,
    observed_after: Option<DateTime<Utc>>,
    seen_by_time: Vec<String>,
    seen_by_observed: Vec<String>,
}

impl NaiveReaders {
    async fn poll(&mut self, pool: &sqlx::PgPool) {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT external_id, last_changed_at FROM departments
             WHERE $1::timestamptz IS NULL OR last_changed_at > $1 ORDER BY last_changed_at",
        )
        .bind(self.changed_after)
        .fetch_all(pool)
        .await
        .unwrap();
        for (id, changed) in rows {
            self.seen_by_time.push(id);
            self.changed_after = Some(changed);
        }
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT external_id, observed_at FROM department_versions
             WHERE $1::timestamptz IS NULL OR observed_at > $1 ORDER BY observed_at",
        )
        .bind(self.observed_after)
        .fetch_all(pool)
        .await
        .unwrap();
        for (id, observed) in rows {
            self.seen_by_observed.push(id);
            self.observed_after = Some(observed);
        }
    }
}

/// A transaction that writes versions tells listeners on `deptsync_changes` as it
/// commits; one that writes none says nothing.
#[tokio::test]
async fn a_page_that_writes_versions_notifies_listeners() {
    let db = TestStore::postgres().await;
    let AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(pg.pool())
        .await
        .unwrap();
    listener.listen("deptsync_changes").await.unwrap();
    commit_windowed(
        &db.store,
        "s",
        &[
            department("a", "A", Some(at(2021, 1, 1))),
            department("b", "B", Some(at(2021, 1, 1))),
        ],
    )
    .await;
    let notification = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(notification.payload()).unwrap();
    assert_eq!(payload["source"], "s");
    assert_eq!(payload["versions"], 2);
    assert_eq!(
        (
            &payload["inserted"],
            &payload["updated"],
            &payload["deleted"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(0),
            &serde_json::json!(0)
        ),
        "the page's counts"
    );
    assert!(payload["run"].is_string(), "{payload}");
    // The writing transaction's place in the feed: a listener reads until its token is
    // past it.
    let xid = payload["xid"].as_i64().expect("the transaction's id");
    settled(&db.store).await;
    let (versions, next) = read_feed_now(&db.store, FeedToken::START, &[]).await;
    assert_eq!(versions.len(), 2);
    // The token's position, after its feed's id.
    let position = next
        .to_string()
        .split_once(':')
        .unwrap()
        .1
        .parse::<i64>()
        .unwrap();
    assert!(position > xid);

    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv()).await;
    assert!(quiet.is_err(), "nothing changed, nothing said: {quiet:?}");
}

/// `deptsync changes` as a downstream job runs it: JSON lines, then the token.
#[tokio::test]
async fn the_changes_command_prints_versions_and_the_token_to_pass_next() {
    let dir = TempDir::new();
    let fake = deptsync::fakes::mews::FakeMews::start().await.unwrap();
    fake.generate(30, 1, at(2020, 1, 1), Utc::now() - Duration::hours(1));
    let url = sqlite_url(&dir.join("deptsync.db"));
    let config = dir.join("deptsync.toml");
    std::fs::write(&config, mews_config(&url, "mews", &fake.base_url, "")).unwrap();
    let config = config.to_str().unwrap();
    let output = run_binary(&["sync", "--config", config], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let json_lines = |output: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let output = run_binary(&["changes", "--config", config, "--json"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 31, "30 versions and the token");
    for version in &lines[..30] {
        assert_eq!(version["source"], "mews");
        for field in ["external_id", "name", "is_active", "deleted", "valid_from"] {
            assert!(!version[field].is_null(), "{field} in {version}");
        }
    }
    let next = lines[30]["next"].as_str().unwrap().to_owned();

    let output = run_binary(
        &["changes", "--config", config, "--json", "--since", &next],
        &[],
    )
    .await;
    assert_eq!(json_lines(&output), [serde_json::json!({ "next": next })]);

    // A rename upstream: the next pass writes one version, and only it follows the token.
    let renamed = fake.departments()[3].clone();
    fake.insert(deptsync::fakes::mews::FakeDepartment::new(
        renamed.id,
        renamed.enterprise_id,
        "Renamed",
        // Within the lookback the next pass reads again.
        Utc::now() - Duration::seconds(10),
    ));
    let output = run_binary(&["sync", "--config", config], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = run_binary(
        &["changes", "--config", config, "--json", "--since", &next],
        &[],
    )
    .await;
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["name"], "Renamed");
    assert_eq!(lines[0]["external_id"], renamed.id.to_string());

    // Without --json: a line per version, then the token.
    let output = run_binary(&["changes", "--config", config, "--since", &next], &[]).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("Renamed"), "{text}");
    assert!(
        text.trim_end()
            .ends_with(&lines[1]["next"].as_str().unwrap().to_string()),
        "{text}"
    );

    let output = run_binary(
        &["changes", "--config", config, "--since", "not-a-token"],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--since"), "{}", stderr(&output));
}

/// A source's `history_retention` trims its old closed versions after each pass.
#[tokio::test]
async fn a_pass_trims_the_history_its_source_keeps_no_longer() {
    let dir = TempDir::new();
    let fake = deptsync::fakes::mews::FakeMews::start().await.unwrap();
    fake.generate(5, 1, at(2020, 1, 1), Utc::now() - Duration::hours(1));
    let url = sqlite_url(&dir.join("deptsync.db"));
    let config = dir.join("deptsync.toml");
    let write_config = |extra: &str| {
        std::fs::write(&config, mews_config(&url, "mews", &fake.base_url, extra)).unwrap();
    };
    write_config("");
    let config_path = config.to_str().unwrap();
    let output = run_binary(&["sync", "--config", config_path], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    // Versions that ended long ago, and one that ended yesterday.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    for (id, to) in [
        ("old", "2020-06-01T00:00:00.000000Z"),
        ("recent", &deptsync_stamp(Utc::now() - Duration::days(1))),
    ] {
        sqlx::query(
            "INSERT INTO department_history (source, external_id, name, is_active, deleted,
                 valid_from, valid_to, observed_at, feed_position)
             VALUES ('mews', ?1, 'x', 1, 0, '2020-01-01T00:00:00.000000Z', ?2, ?2, 1)",
        )
        .bind(id)
        .bind(to)
        .execute(&pool)
        .await
        .unwrap();
    }
    let count = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM department_versions")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 7);

    // Without a retention, history is kept.
    let output = run_binary(&["sync", "--config", config_path], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(count().await, 7);

    write_config("history_retention = \"30d\"");
    let output = run_binary(&["sync", "--config", config_path], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT external_id FROM department_versions WHERE valid_to IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        ["recent"],
        "the current versions and the recent one stay"
    );
    assert_eq!(count().await, 6);
    pool.close().await;
}

/// An instant as the SQLite store writes it.
fn deptsync_stamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Versions restored from another server carry that server's transaction ids, which may
/// lie ahead of this one's: migrating (as the service does at start) brings them back
/// into the feed, where a reader from the beginning finds them.
#[tokio::test]
async fn versions_restored_from_another_server_are_read_from_the_beginning() {
    let db = TestStore::postgres().await;
    let AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    put(&db, "s", "a", "B", at(2022, 1, 1)).await;
    db.execute("UPDATE departments SET version_position = version_position + 1000000000")
        .await;
    db.execute("UPDATE department_history SET feed_position = feed_position + 1000000000")
        .await;
    let (versions, _) = read_feed_now(&db.store, FeedToken::START, &[]).await;
    assert!(
        versions.is_empty(),
        "ahead of the server's transactions: not readable"
    );
    use deptsync::store::Backend;
    pg.migrate().await.unwrap();
    let (versions, _) = read_feed(&db.store, FeedToken::START, &[]).await;
    let read: Vec<_> = versions
        .iter()
        .map(|v| (v.name.as_str(), v.valid_from, v.valid_to))
        .collect();
    assert_eq!(
        read,
        [
            ("A", at(2021, 1, 1), Some(at(2022, 1, 1))),
            ("B", at(2022, 1, 1), None)
        ],
        "both, as they were"
    );
}

/// PostgreSQL's `departments_as_of(timestamptz)`: every source's live departments at an
/// instant.
#[tokio::test]
async fn departments_as_of_gives_what_was_live_then() {
    let db = TestStore::postgres().await;
    let AnyStore::Postgres(pg) = &db.store else {
        unreachable!()
    };
    put(&db, "s", "a", "Front desk", at(2021, 1, 1)).await;
    put(&db, "s", "a", "Reception", at(2022, 1, 1)).await;
    put(&db, "t", "b", "Kitchen", at(2021, 6, 1)).await;
    let as_of = async |instant: DateTime<Utc>| -> Vec<(String, String)> {
        sqlx::query_as("SELECT source, name FROM departments_as_of($1) ORDER BY source, name")
            .bind(instant)
            .fetch_all(pg.pool())
            .await
            .unwrap()
    };
    let pair = |source: &str, name: &str| (source.to_owned(), name.to_owned());
    assert_eq!(as_of(at(2020, 1, 1)).await, []);
    assert_eq!(as_of(at(2021, 3, 1)).await, [pair("s", "Front desk")]);
    assert_eq!(
        as_of(at(2021, 12, 31)).await,
        [pair("s", "Front desk"), pair("t", "Kitchen")]
    );
    assert_eq!(
        as_of(at(2022, 1, 1)).await,
        [pair("s", "Reception"), pair("t", "Kitchen")],
        "a version holds from its valid_from"
    );
}
