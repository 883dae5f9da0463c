//! The PostgreSQL store on its own: the guarantees the engine relies on.

use chrono::{DateTime, TimeZone, Utc};
use deptsync::model::{Checkpoint, Department, Ledger, LedgerWindow, RunMode, Window, WindowState};
use deptsync::store::Store;

use crate::helpers::TestDb;

fn department(id: &str, name: &str, updated: DateTime<Utc>) -> Department {
    Department {
        external_id: id.to_owned(),
        scope_id: Some("scope".to_owned()),
        name: name.to_owned(),
        is_active: true,
        parent_external_id: None,
        source_created_at: None,
        source_updated_at: Some(updated),
        raw: serde_json::json!({ "id": id, "name": name }),
    }
}

/// Neither rows nor a position were kept.
async fn assert_nothing_kept(db: &TestDb) {
    let rows: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(rows, 0);
    assert_eq!(
        db.store.load_state("s").await.unwrap().high_water_mark,
        None
    );
}

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
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

#[tokio::test]
async fn a_page_with_the_same_id_twice_keeps_the_newest() {
    let db = TestDb::new().await;
    let mut lease = db.store.try_lock("s").await.unwrap().unwrap();
    let run = db
        .store
        .start_run(&mut lease, "s", RunMode::Incremental)
        .await
        .unwrap();
    let page = [
        department("1", "old", at(2020, 1, 1)),
        department("1", "new", at(2020, 2, 1)),
        department("2", "two", at(2020, 1, 1)),
    ];
    let w = window(at(2020, 1, 1), at(2020, 3, 1));
    db.store
        .commit_page(&mut lease, run, "s", &[], &[], &plan(at(2020, 3, 1), &[w]))
        .await
        .unwrap();
    let counts = db
        .store
        .commit_page(&mut lease, run, "s", &page, &[], &done(w))
        .await
        .unwrap();
    assert_eq!(
        (counts.inserted, counts.updated, counts.unchanged),
        (2, 0, 1)
    );
    let name: String = db
        .scalar("SELECT name FROM departments WHERE external_id = '1'")
        .await;
    assert_eq!(name, "new");
}

#[tokio::test]
async fn the_high_water_mark_never_moves_backwards() {
    let db = TestDb::new().await;
    let mut lease = db.store.try_lock("s").await.unwrap().unwrap();
    let run = db
        .store
        .start_run(&mut lease, "s", RunMode::Incremental)
        .await
        .unwrap();
    for mark in [at(2021, 1, 1), at(2020, 1, 1)] {
        let w = window(at(2019, 1, 1), mark);
        for checkpoint in [plan(mark, &[w]), done(w)] {
            db.store
                .commit_page(&mut lease, run, "s", &[], &[], &checkpoint)
                .await
                .unwrap();
        }
    }
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, Some(at(2021, 1, 1)));
}

#[tokio::test]
async fn the_mark_moves_only_when_every_window_of_the_ledger_is_done() {
    let db = TestDb::new().await;
    let mut lease = db.store.try_lock("s").await.unwrap().unwrap();
    let run = db
        .store
        .start_run(&mut lease, "s", RunMode::Incremental)
        .await
        .unwrap();
    let first = window(at(2020, 1, 1), at(2020, 4, 1));
    let second = window(at(2020, 4, 1), at(2020, 6, 1));
    let mut commit = async |checkpoint: Checkpoint| {
        db.store
            .commit_page(&mut lease, run, "s", &[], &[], &checkpoint)
            .await
    };
    commit(plan(at(2020, 6, 1), &[first, second]))
        .await
        .unwrap();
    // The windows finish out of order, as concurrent windows do.
    commit(Checkpoint::Window {
        mode: RunMode::Incremental,
        window: first,
        cursor: Some("c1".to_owned()),
    })
    .await
    .unwrap();
    commit(done(second)).await.unwrap();
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, None);
    let ledger = state.incremental.expect("the pass is not complete");
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

    // A window the ledger does not hold is refused, and the page with it.
    let stranger = window(at(2019, 1, 1), at(2019, 2, 1));
    assert!(commit(done(stranger)).await.is_err());

    commit(done(first)).await.unwrap();
    let state = db.store.load_state("s").await.unwrap();
    assert_eq!(state.high_water_mark, Some(at(2020, 6, 1)));
    assert_eq!(state.incremental, None, "a complete ledger is cleared");
    let rows: i64 = db.scalar("SELECT count(*) FROM sync_windows").await;
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_failed_commit_keeps_neither_rows_nor_position() {
    let db = TestDb::new().await;
    let mut lease = db.store.try_lock("s").await.unwrap().unwrap();
    let run = db
        .store
        .start_run(&mut lease, "s", RunMode::Incremental)
        .await
        .unwrap();
    // A NUL in a name makes PostgreSQL refuse the statement (the engine rejects such
    // records before they get here; this proves the transaction, not the filter).
    let page = [
        department("1", "fine", at(2020, 1, 1)),
        department("2", "bad\0", at(2020, 1, 1)),
    ];
    let w = window(at(2020, 1, 1), at(2021, 1, 1));
    db.store
        .commit_page(&mut lease, run, "s", &[], &[], &plan(at(2021, 1, 1), &[w]))
        .await
        .unwrap();
    assert!(
        db.store
            .commit_page(&mut lease, run, "s", &page, &[], &done(w))
            .await
            .is_err()
    );
    assert_nothing_kept(&db).await;
}

#[tokio::test]
async fn a_page_whose_run_cannot_be_counted_is_not_kept() {
    let db = TestDb::new().await;
    // The upsert and the checkpoint succeed; counting the page in a run that does not
    // exist fails last, and the whole page must go with it.
    let unknown_run = deptsync::model::RunId(uuid::Uuid::new_v4());
    let mut lease = db.store.try_lock("s").await.unwrap().unwrap();
    let page = [department("1", "fine", at(2020, 1, 1))];
    let w = window(at(2020, 1, 1), at(2021, 1, 1));
    assert!(
        db.store
            .commit_page(
                &mut lease,
                unknown_run,
                "s",
                &page,
                &[],
                &plan(at(2021, 1, 1), &[w])
            )
            .await
            .is_err()
    );
    assert_nothing_kept(&db).await;
    assert_eq!(db.store.load_state("s").await.unwrap().incremental, None);
}

#[tokio::test]
async fn a_lost_lock_loses_the_write_too() {
    let db = TestDb::new().await;
    let mut lease = db.store.try_lock("s").await.unwrap().unwrap();
    let run = db
        .store
        .start_run(&mut lease, "s", RunMode::Incremental)
        .await
        .unwrap();
    // The lock's connection dies (a network blip, pg_terminate_backend): the lock is free...
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut lease)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(db.pool())
        .await
        .unwrap();
    let mut other = db
        .store
        .try_lock("s")
        .await
        .unwrap()
        .expect("another process may take it now");

    // ...and the first holder can no longer write.
    let page = [department("1", "late", at(2020, 1, 1))];
    let w = window(at(2020, 1, 1), at(2021, 1, 1));
    assert!(
        db.store
            .commit_page(
                &mut lease,
                run,
                "s",
                &page,
                &[],
                &plan(at(2021, 1, 1), &[w])
            )
            .await
            .is_err()
    );
    let rows: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(rows, 0);
    let _ = db
        .store
        .start_run(&mut other, "s", RunMode::Incremental)
        .await
        .unwrap();
}
