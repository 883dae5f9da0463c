//! The change feed's promise, every version exactly once, under what operations do: a
//! server that crashes after an asynchronous commit, a token kept across a restore or
//! shown to another database, a reader that falls behind the history's retention, a row
//! deleted by hand. The crashes and restores happen on a throwaway cluster of the test's
//! own ([`Cluster`]), never on the shared server.

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use deptsync::model::{Department, DepartmentVersion, FeedToken};
use deptsync::store::{AnyStore, Store};

use crate::cluster::Cluster;
use crate::helpers::{TestStore, at, department, on_both_stores, token_position};
use crate::history::{commit_windowed, put, read_feed, read_feed_now};

on_both_stores!(
    a_read_records_the_horizon_it_hands_out,
    a_trim_while_a_read_is_under_way_fails_the_read,
    a_token_of_another_database_is_refused,
    a_token_older_than_the_retained_history_is_refused,
    a_row_deleted_by_hand_ends_its_version_in_the_feed,
);

/// What the feed says of each department: its versions' names, in feed order.
fn names(versions: &[DepartmentVersion]) -> BTreeMap<(String, String), Vec<String>> {
    let mut names: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for v in versions {
        names
            .entry((v.source.clone(), v.external_id.clone()))
            .or_default()
            .push(format!(
                "{}{}",
                v.name,
                if v.valid_to.is_some() { " (ended)" } else { "" }
            ));
    }
    names
}

/// The error `changes` gives for `since`, or a panic when it reads on.
async fn refusal(store: &AnyStore, since: FeedToken) -> String {
    match store.changes(since, &[]).await {
        Ok(_) => panic!("the token {since} was taken"),
        Err(e) => e.to_string(),
    }
}

/// What makes a crash harmless to readers (see `a_crash_after_a_read_never_makes_the_feed_skip`
/// for PostgreSQL; SQLite's power cut cannot be made here): each read writes the horizon it
/// hands out, in a transaction of its own that commits durably before the token is given.
async fn a_read_records_the_horizon_it_hands_out(db: TestStore) {
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    let (_, token) = read_feed(&db.store, FeedToken::START, &[]).await;
    let position = token_position(token);
    assert_eq!(
        db.count("SELECT handed_out FROM feed_identity").await,
        position
    );
    // Asked again at once, the horizon stays or moves on; the record never goes back.
    let (_, again) = read_feed_now(&db.store, token, &[]).await;
    assert!(token_position(again) >= position);
    assert!(db.count("SELECT handed_out FROM feed_identity").await >= position);
}

async fn a_token_of_another_database_is_refused(db: TestStore) {
    let other = match &db.store {
        AnyStore::Postgres(_) => TestStore::postgres().await,
        AnyStore::Sqlite(_) => TestStore::sqlite().await,
    };
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    let (_, token) = read_feed(&db.store, FeedToken::START, &[]).await;
    // The other database has moved on at least as far (on PostgreSQL both share the
    // cluster's transaction ids).
    for i in 0..3 {
        put(&other, "s", &format!("b{i}"), "B", at(2021, 1, 1)).await;
    }
    read_feed(&other.store, FeedToken::START, &[]).await;

    let error = refusal(&other.store, token).await;
    assert!(error.contains("read again from the beginning"), "{error}");
    // Its own token reads on.
    let (_, own) = read_feed(&other.store, FeedToken::START, &[]).await;
    assert!(other.store.changes(own, &[]).await.is_ok());
}

/// An SQLite file's token shown to PostgreSQL.
#[tokio::test]
async fn an_sqlite_token_is_refused_by_postgresql() {
    let sqlite = TestStore::sqlite().await;
    let postgres = TestStore::postgres().await;
    put(&sqlite, "s", "a", "A", at(2021, 1, 1)).await;
    put(&postgres, "s", "a", "A", at(2021, 1, 1)).await;
    let (_, token) = read_feed(&sqlite.store, FeedToken::START, &[]).await;
    read_feed(&postgres.store, FeedToken::START, &[]).await;
    let error = refusal(&postgres.store, token).await;
    assert!(error.contains("read again from the beginning"), "{error}");
}

async fn a_token_older_than_the_retained_history_is_refused(db: TestStore) {
    let (_, before) = read_feed(&db.store, FeedToken::START, &[]).await;
    let long_ago = Utc::now() - Duration::days(400);
    put(&db, "s", "a", "1", long_ago).await;
    put(&db, "s", "a", "2", long_ago + Duration::days(10)).await;
    let (_, after_both) = read_feed(&db.store, before, &[]).await;
    put(&db, "s", "a", "3", Utc::now() - Duration::days(5)).await;
    put(&db, "t", "b", "1", long_ago).await;
    // As if written a year ago, and trimmed by a 30 day retention: version "1".
    db.execute(
        "UPDATE department_history SET observed_at = valid_from WHERE valid_from < observed_at",
    )
    .await;
    let retention = std::time::Duration::from_secs(30 * 86_400);
    assert_eq!(db.store.trim_history("s", retention).await.unwrap(), 1);

    // A reader that never read version "1" would miss it: refused.
    let error = refusal(&db.store, before).await;
    assert!(
        error.contains("older than the retained history") && error.contains("beginning"),
        "{error}"
    );
    // A reader of source "t" only lost nothing.
    assert!(db.store.changes(before, &["t".to_owned()]).await.is_ok());
    // One that read "1" before it was trimmed reads on.
    let (versions, _) = read_feed(&db.store, after_both, &[]).await;
    let read = names(&versions);
    assert_eq!(read[&("s".to_owned(), "a".to_owned())], ["3"]);
    // From the beginning: what history still holds.
    let (versions, _) = read_feed(&db.store, FeedToken::START, &[]).await;
    assert_eq!(
        names(&versions)[&("s".to_owned(), "a".to_owned())],
        ["2 (ended)", "3"]
    );
}

/// A retention that trims while a read is under way (after it began, before a batch)
/// fails the read at that batch, before any token is handed out: the reader would
/// otherwise go on past versions it never got.
async fn a_trim_while_a_read_is_under_way_fails_the_read(db: TestStore) {
    let (_, before) = read_feed(&db.store, FeedToken::START, &[]).await;
    let long_ago = Utc::now() - Duration::days(400);
    put(&db, "s", "a", "1", long_ago).await;
    put(&db, "s", "a", "2", long_ago + Duration::days(10)).await;
    db.execute(
        "UPDATE department_history SET observed_at = valid_from WHERE valid_from < observed_at",
    )
    .await;
    crate::history::settled(&db.store).await;
    let mut feed = db.store.changes(before, &[]).await.unwrap();

    let retention = std::time::Duration::from_secs(30 * 86_400);
    assert_eq!(db.store.trim_history("s", retention).await.unwrap(), 1);

    let error = match feed.next_batch().await {
        Ok(batch) => panic!("the read went on without what was trimmed: {batch:?}"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("older than the retained history"), "{error}");
}

/// A copy of a database restored from a server whose transaction ids were further on
/// keeps that server's record of what its retention trimmed: the copy's new feed
/// forgets it, or it would refuse every token it hands out.
#[tokio::test]
async fn a_copy_forgets_what_the_originals_retention_trimmed() {
    let db = TestStore::postgres().await;
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    db.execute("INSERT INTO history_trimmed (source, position) VALUES ('s', 9000000000000)")
        .await;
    // As a restore into another database finds the row.
    db.execute("UPDATE feed_identity SET database_oid = 0")
        .await;

    let (_, token) = read_feed(&db.store, FeedToken::START, &[]).await;
    assert!(db.store.changes(token, &[]).await.is_ok());
    assert_eq!(db.count("SELECT count(*) FROM history_trimmed").await, 0);
}

async fn a_row_deleted_by_hand_ends_its_version_in_the_feed(db: TestStore) {
    put(&db, "s", "a", "A", at(2021, 1, 1)).await;
    put(&db, "s", "b", "B", at(2021, 1, 1)).await;
    let (_, token) = read_feed(&db.store, FeedToken::START, &[]).await;

    db.execute("DELETE FROM departments WHERE external_id = 'a'")
        .await;

    let (versions, _) = read_feed(&db.store, token, &[]).await;
    let ended: Vec<(&str, &str, bool)> = versions
        .iter()
        .map(|v| (v.external_id.as_str(), v.name.as_str(), v.deleted))
        .collect();
    assert_eq!(ended, [("a", "A", true)], "the feed says it was deleted");
    assert_eq!(versions[0].valid_to, Some(versions[0].valid_from));
    // Its history: the live version, ended when it was deleted, then the deletion.
    let (versions, _) = read_feed(&db.store, FeedToken::START, &[]).await;
    let a: Vec<(bool, bool)> = versions
        .iter()
        .filter(|v| v.external_id == "a")
        .map(|v| (v.deleted, v.valid_to.is_some()))
        .collect();
    assert_eq!(a, [(false, true), (true, true)]);
}

/// Opens (creating and migrating) the database `name` of `cluster`.
async fn open(cluster: &Cluster, name: &str) -> AnyStore {
    AnyStore::open(&cluster.url(name).into()).await.unwrap()
}

/// Connects to the database `name` of `cluster` as it is, as a reader does (no
/// migration).
async fn connect(cluster: &Cluster, name: &str) -> AnyStore {
    AnyStore::connect(&cluster.url(name).into(), deptsync::store::IfMissing::Fail)
        .await
        .unwrap()
}

/// `count` departments named `name`, ids `{prefix}{i}`.
fn departments(prefix: &str, name: &str, count: usize) -> Vec<Department> {
    (0..count)
        .map(|i| department(&format!("{prefix}{i}"), name, Some(at(2021, 1, 1))))
        .collect()
}

/// Commits each of `pages` as a page of one pass of `source`, without ending the pass:
/// its pages commit asynchronously, and nothing after them has flushed them to disk.
async fn commit_pages_in_flight(store: &AnyStore, source: &str, pages: &[Department]) {
    let (mut lease, run) = crate::helpers::locked_run(store, source).await;
    let (ledger, _) = crate::helpers::one_window();
    let window = match &ledger {
        deptsync::model::Checkpoint::Ledger(ledger) => ledger.windows[0].window,
        _ => unreachable!(),
    };
    let plan = deptsync::store::Commit {
        run,
        source,
        departments: &[],
        rejected: &[],
        checkpoint: &ledger,
    };
    store.commit_page(&mut lease, &plan).await.unwrap();
    for (i, department) in pages.iter().enumerate() {
        let position = deptsync::model::Checkpoint::Window {
            mode: deptsync::model::RunMode::Incremental,
            window,
            cursor: Some(format!("page {i}")),
        };
        let page = deptsync::store::Commit {
            run,
            source,
            departments: std::slice::from_ref(department),
            rejected: &[],
            checkpoint: &position,
        };
        store.commit_page(&mut lease, &page).await.unwrap();
    }
}

/// The feed from the beginning once it holds `at_least` versions (autovacuum's
/// transactions may hold the horizon back a moment).
async fn read_all(
    store: &AnyStore,
    since: FeedToken,
    at_least: usize,
) -> (Vec<DepartmentVersion>, FeedToken) {
    for _ in 0..500 {
        let read = read_feed_now(store, since, &[]).await;
        if read.0.len() >= at_least {
            return read;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the feed never held {at_least} versions");
}

/// A reader reads pages a pass committed asynchronously (`synchronous_commit = off`), and
/// the server crashes before they reach the disk. What the reader was given must survive
/// the crash, and its token must never be ahead of what the recovered server hands out:
/// otherwise the versions written under the transaction ids the server hands out again
/// are skipped for ever.
#[tokio::test]
async fn a_crash_after_a_read_never_makes_the_feed_skip() {
    // The WAL writer waits its longest, and nothing else flushes: commits made without
    // waiting for the disk stay off it until something else flushes them.
    let cluster = Cluster::start(&[
        "wal_writer_delay=10000ms",
        "bgwriter_lru_maxpages=0",
        "checkpoint_timeout=3600",
        "autovacuum=off",
    ]);
    let store = open(&cluster, "feed").await;
    commit_windowed(&store, "s", &departments("a", "A", 3)).await;
    commit_pages_in_flight(&store, "s", &departments("b", "B", 20)).await;
    let (before, token) = read_all(&store, FeedToken::START, 23).await;
    drop(store);

    cluster.crash_and_restart();

    let store = open(&cluster, "feed").await;
    // The service goes on: another source's pass writes 20 pages.
    commit_windowed(&store, "t", &departments("c", "C", 1)).await;
    commit_pages_in_flight(&store, "t", &departments("d", "D", 20)).await;
    // The cluster's other traffic moves its transaction ids on.
    let AnyStore::Postgres(pg) = &store else {
        unreachable!()
    };
    for _ in 0..100 {
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(pg.pool())
            .await
            .unwrap();
    }
    let (everything, _) = read_all(&store, FeedToken::START, 24).await;
    let (after, _) = read_feed_now(&store, token, &[]).await;

    let mut read = names(&before);
    for (key, mut more) in names(&after) {
        read.entry(key).or_default().append(&mut more);
    }
    assert_eq!(
        read,
        names(&everything),
        "what the reader got before and after the crash is the feed, each version once"
    );
}

/// A token kept across a restore of an older copy, or shown to a copy restored into
/// another database, is refused: the copy's versions are not the ones the reader has.
#[tokio::test]
async fn a_token_from_before_a_restore_is_refused() {
    let cluster = Cluster::start(&[]);
    let store = open(&cluster, "prod").await;
    commit_windowed(&store, "s", &departments("a", "A", 3)).await;
    let (_, dumped) = read_all(&store, FeedToken::START, 3).await;
    let dump = crate::helpers::TempDir::new();
    let file = dump.join("prod.dump");
    cluster.dump("prod", &file);
    commit_windowed(&store, "s", &departments("b", "B", 3)).await;
    let (_, later) = read_all(&store, dumped, 3).await;
    drop(store);

    // The dump restored as another database (staging beside production).
    cluster.psql("postgres", &["-c", "CREATE DATABASE copy"]);
    cluster.restore("copy", &file, false);
    let copy = connect(&cluster, "copy").await;
    let error = refusal(&copy, dumped).await;
    assert!(error.contains("read again from the beginning"), "{error}");
    let (versions, _) = read_feed_now(&copy, FeedToken::START, &[]).await;
    assert_eq!(versions.len(), 3, "from the beginning, the copy's feed");
    drop(copy);

    // The older copy restored over the database itself.
    cluster.restore("prod", &file, true);
    let prod = connect(&cluster, "prod").await;
    let error = refusal(&prod, later).await;
    assert!(error.contains("read again from the beginning"), "{error}");
    // Whatever the server's transactions do next, it stays refused.
    commit_windowed(&prod, "s", &departments("c", "C", 3)).await;
    read_all(&prod, FeedToken::START, 6).await;
    let error = refusal(&prod, later).await;
    assert!(error.contains("read again from the beginning"), "{error}");
}
