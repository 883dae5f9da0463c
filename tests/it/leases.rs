//! Leases with fencing and the fleet's schedule, on both stores: one holder at a time, a
//! holder whose source another took over writes nothing more, each due source is claimed
//! once and shared among the replicas alive.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deptsync::model::RunMode;
use deptsync::store::lease::DEFAULT_TTL;
use deptsync::store::{AnyStore, Commit, Lease, PassEnd, Store, StoreError};

use crate::helpers::{TestStore, at, department, on_both_stores, one_window};

on_both_stores!(
    a_source_has_one_lease_holder_at_a_time,
    a_holder_whose_source_was_taken_over_writes_nothing_more,
    a_lease_renewed_in_time_is_never_taken,
    each_due_source_is_claimed_once_and_shared_among_the_replicas,
    a_claimed_source_is_due_again_at_its_schedules_next_firing,
    a_failed_pass_backs_off_and_a_cancelled_one_is_due_at_once,
    a_changed_schedule_moves_the_next_due_time,
);

async fn take(store: &AnyStore, source: &str, ttl: Duration) -> Option<Lease> {
    store.try_lease(source, ttl).await.unwrap()
}

/// The fence of `source`'s lease as the database has it.
async fn fence(db: &TestStore, source: &str) -> i64 {
    db.count(&format!(
        "SELECT fence FROM source_leases WHERE source = '{source}'"
    ))
    .await
}

async fn a_source_has_one_lease_holder_at_a_time(db: TestStore) {
    let replica = db.another().await;
    let lease = take(&db.store, "s", DEFAULT_TTL)
        .await
        .expect("the lease is free");
    assert_eq!(lease.fence, 1);
    assert!(
        take(&db.store, "s", DEFAULT_TTL).await.is_none(),
        "a second holder in the same process while the first lives"
    );
    assert!(
        take(&replica, "s", DEFAULT_TTL).await.is_none(),
        "a second holder in another process while the first lives"
    );
    let other = take(&replica, "t", DEFAULT_TTL)
        .await
        .expect("another source has a lease of its own");
    db.store.release(&lease, PassEnd::Succeeded).await.unwrap();
    let again = take(&replica, "s", DEFAULT_TTL)
        .await
        .expect("free once given back");
    assert_eq!(again.fence, 2, "each new holder has a new fence");
    assert_ne!(again.holder, lease.holder);
    replica.release(&again, PassEnd::Succeeded).await.unwrap();
    replica.release(&other, PassEnd::Succeeded).await.unwrap();
}

async fn a_holder_whose_source_was_taken_over_writes_nothing_more(db: TestStore) {
    let replica = db.another().await;
    let mut stale = take(&db.store, "s", Duration::from_millis(200))
        .await
        .unwrap();
    let run = db
        .store
        .start_run(&mut stale, RunMode::Incremental)
        .await
        .unwrap();
    // The holder pauses past its lease's expiry (no renewal); another process takes the
    // source over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut fresh = take(&replica, "s", DEFAULT_TTL)
        .await
        .expect("a lapsed lease is free");
    assert_eq!(fresh.fence, 2);

    // The paused holder wakes up: each of its writes is refused, in its own transaction.
    let page = [department("1", "late", Some(at(2020, 1, 1)))];
    let refused = db
        .store
        .commit_page(
            &mut stale,
            &Commit {
                run,
                source: "s",
                departments: &page,
                rejected: &[],
                checkpoint: &one_window().0,
            },
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::LeaseLost { fence: 1, .. })),
        "{refused:?}"
    );
    assert!(matches!(
        db.store.start_run(&mut stale, RunMode::Incremental).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        db.store.set_scope(&mut stale, Some("x"), None).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(
        !db.store.renew(&stale).await.unwrap(),
        "a renewal tells it lost"
    );
    // Giving it back changes nothing: the lease is the new holder's.
    db.store.release(&stale, PassEnd::Failed).await.unwrap();
    assert!(take(&db.store, "s", DEFAULT_TTL).await.is_none());
    assert_eq!(db.count("SELECT count(*) FROM departments").await, 0);
    assert_eq!(
        db.count(
            "SELECT pages FROM sync_runs WHERE holder IS NOT NULL ORDER BY started_at LIMIT 1"
        )
        .await,
        0
    );

    // The new holder writes, and its run records who and under which fence.
    let run = replica
        .start_run(&mut fresh, RunMode::Incremental)
        .await
        .unwrap();
    replica
        .commit_page(
            &mut fresh,
            &Commit {
                run,
                source: "s",
                departments: &page,
                rejected: &[],
                checkpoint: &one_window().0,
            },
        )
        .await
        .unwrap();
    assert_eq!(db.count("SELECT count(*) FROM departments").await, 1);
    assert_eq!(
        db.text(&format!(
            "SELECT holder FROM sync_runs WHERE run_id = '{run}' AND fence = 2"
        ))
        .await
        .as_deref(),
        Some(&*fresh.holder)
    );
    replica.release(&fresh, PassEnd::Succeeded).await.unwrap();
}

async fn a_lease_renewed_in_time_is_never_taken(db: TestStore) {
    let replica = db.another().await;
    let lease = take(&db.store, "s", Duration::from_millis(600))
        .await
        .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(db.store.renew(&lease).await.unwrap());
        assert!(
            take(&replica, "s", DEFAULT_TTL).await.is_none(),
            "renewed within its time to live"
        );
    }
    assert_eq!(fence(&db, "s").await, 1);
    db.store.release(&lease, PassEnd::Succeeded).await.unwrap();
}

/// Puts `sources` on an every-minute schedule.
async fn schedule(store: &AnyStore, sources: &[&str]) {
    let scheduled: Vec<(&str, &str)> = sources.iter().map(|s| (*s, "0 * * * * *")).collect();
    store.schedule(&scheduled, &in_a_minute).await.unwrap();
}

/// Due a minute after the claim.
fn in_a_minute(_: &str, now_ms: i64) -> Option<i64> {
    Some(now_ms + 60_000)
}

async fn claim(store: &AnyStore, sources: &[&str], room: usize) -> Vec<Lease> {
    store
        .claim(sources, room, DEFAULT_TTL, &in_a_minute)
        .await
        .unwrap()
        .leases
}

fn names(leases: &[Lease]) -> Vec<String> {
    let mut names: Vec<String> = leases.iter().map(|l| l.source.clone()).collect();
    names.sort();
    names
}

async fn each_due_source_is_claimed_once_and_shared_among_the_replicas(db: TestStore) {
    let replica = db.another().await;
    let sources: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    schedule(&db.store, &sources).await;
    // Both replicas say they are alive (no room yet).
    assert!(claim(&db.store, &sources, 0).await.is_empty());
    assert!(claim(&replica, &sources, 0).await.is_empty());

    // Each takes its fair share of what is due when it looks (rounded up), in turns.
    let first = db
        .store
        .claim(&sources, 8, DEFAULT_TTL, &in_a_minute)
        .await
        .unwrap();
    assert!(
        first.more_due,
        "it took 5 of 10: the replica looks again at once"
    );
    let first = first.leases;
    assert_eq!(first.len(), 5, "half of 10: {:?}", names(&first));
    let second = claim(&replica, &sources, 8).await;
    assert_eq!(second.len(), 3, "half of the 5 left: {:?}", names(&second));
    let mut claimed = [first, second];
    for turn in 0.. {
        let store = if turn % 2 == 0 { &db.store } else { &replica };
        let more = claim(store, &sources, 8).await;
        if more.is_empty() {
            break;
        }
        claimed[turn % 2].extend(more);
    }
    let mut all = names(&claimed[0]);
    all.extend(names(&claimed[1]));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "every due source once");
    assert_eq!(
        (claimed[0].len(), claimed[1].len()),
        (6, 4),
        "shared: 5, 3, 1, 1"
    );
    let last = db
        .store
        .claim(&sources, 8, DEFAULT_TTL, &in_a_minute)
        .await
        .unwrap();
    assert!(last.leases.is_empty(), "nothing is due twice");
    assert!(!last.more_due, "nor waits");
    assert!(claim(&replica, &sources, 8).await.is_empty());
    assert!(
        take(&db.store, "s0", DEFAULT_TTL).await.is_none(),
        "a claimed source's lease is held"
    );

    // A replica with room for fewer takes fewer.
    let more: Vec<&str> = vec!["m0", "m1", "m2", "m3"];
    schedule(&db.store, &more).await;
    assert_eq!(claim(&db.store, &more, 1).await.len(), 1);
}

async fn a_claimed_source_is_due_again_at_its_schedules_next_firing(db: TestStore) {
    schedule(&db.store, &["s"]).await;
    let claimed = claim(&db.store, &["s"], 1).await;
    assert_eq!(names(&claimed), ["s"]);
    let claimed_at = Utc::now().timestamp_millis();
    db.store
        .release(&claimed[0], PassEnd::Succeeded)
        .await
        .unwrap();
    // Free again, but not due until its next firing (a minute on).
    assert!(claim(&db.store, &["s"], 1).await.is_empty());
    let due = db
        .count("SELECT next_due_ms FROM source_leases WHERE source = 's'")
        .await;
    assert!(
        (claimed_at + 55_000..=claimed_at + 65_000).contains(&due),
        "{due} vs {claimed_at}"
    );
    // A holder that dies before it gives the lease back leaves the firing unserved: due
    // again as soon as the lease lapses, for a holder that serves that same firing.
    let short = Duration::from_millis(200);
    let not_due = db
        .store
        .claim(&["s"], 1, short, &in_a_minute)
        .await
        .unwrap();
    assert!(not_due.leases.is_empty(), "not due");
    // The replica is told when to look again: at the firing, not a second at a time.
    let wait = not_due
        .next_due_in
        .expect("a source is due later")
        .as_millis() as i64;
    let until_due = due - Utc::now().timestamp_millis();
    assert!(
        (until_due - 1_000..=until_due + 1_000).contains(&wait),
        "{wait} vs {until_due}"
    );
    db.execute("UPDATE source_leases SET next_due_ms = 1000")
        .await;
    let dying = db
        .store
        .claim(&["s"], 1, short, &in_a_minute)
        .await
        .unwrap()
        .leases;
    assert_eq!(names(&dying), ["s"]);
    assert_eq!(
        dying[0].due,
        DateTime::from_timestamp_millis(1000),
        "the firing due"
    );
    assert!(claim(&db.store, &["s"], 1).await.is_empty(), "held");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken_over = claim(&db.store, &["s"], 1).await;
    assert_eq!(names(&taken_over), ["s"], "lapsed unreleased: due at once");
    assert!(taken_over[0].fence > dying[0].fence);
    assert_eq!(
        taken_over[0].due, dying[0].due,
        "the new holder serves the firing the dead one did not"
    );
    db.store
        .release(&taken_over[0], PassEnd::Succeeded)
        .await
        .unwrap();
    // A manual sync may still take it between firings; it serves none.
    let manual = take(&db.store, "s", DEFAULT_TTL).await.unwrap();
    assert_eq!(manual.due, None);
}

/// Claims `s` with its next firing right away, so that only a backoff holds it back.
async fn claim_firing_now(store: &AnyStore) -> Vec<Lease> {
    store
        .claim(&["s"], 1, DEFAULT_TTL, &|_, now_ms| Some(now_ms))
        .await
        .unwrap()
        .leases
}

/// How far ahead of now `s` is due, in ms.
async fn due_in(db: &TestStore) -> i64 {
    db.count("SELECT next_due_ms FROM source_leases WHERE source = 's'")
        .await
        - Utc::now().timestamp_millis()
}

async fn a_failed_pass_backs_off_and_a_cancelled_one_is_due_at_once(db: TestStore) {
    schedule(&db.store, &["s"]).await;
    db.execute("UPDATE source_leases SET next_due_ms = 0").await;
    let claimed = claim(&db.store, &["s"], 1).await;
    db.store
        .release(&claimed[0], PassEnd::Cancelled)
        .await
        .unwrap();
    let again = claim_firing_now(&db.store).await;
    assert_eq!(
        names(&again),
        ["s"],
        "a cancelled pass is due again at once"
    );
    assert_eq!(again[0].failures, 0);

    // Failed once: 1 s before the next pass, however soon the schedule fires.
    db.store.release(&again[0], PassEnd::Failed).await.unwrap();
    assert!((500..=1_000).contains(&due_in(&db).await));
    assert!(claim_firing_now(&db.store).await.is_empty(), "backing off");
    // Failed twice: 2 s.
    db.execute("UPDATE source_leases SET next_due_ms = 0").await;
    let claimed = claim_firing_now(&db.store).await;
    assert_eq!(claimed[0].failures, 1);
    db.store
        .release(&claimed[0], PassEnd::Failed)
        .await
        .unwrap();
    assert!((1_500..=2_000).contains(&due_in(&db).await));

    // A backoff never brings a firing forward.
    db.execute("UPDATE source_leases SET next_due_ms = 0").await;
    let claimed = claim(&db.store, &["s"], 1).await;
    assert_eq!(claimed[0].failures, 2);
    db.store
        .release(&claimed[0], PassEnd::Failed)
        .await
        .unwrap();
    assert!(due_in(&db).await > 50_000);

    // A cancelled pass neither clears nor adds to them.
    db.execute("UPDATE source_leases SET next_due_ms = 0").await;
    let claimed = claim(&db.store, &["s"], 1).await;
    assert_eq!(claimed[0].failures, 3);
    db.store
        .release(&claimed[0], PassEnd::Cancelled)
        .await
        .unwrap();
    // A holder that died with the lease counts as a failure too.
    let dying = claim_firing_now(&db.store).await;
    assert_eq!(dying[0].failures, 3, "a cancelled pass kept them");
    db.execute("UPDATE source_leases SET expires_ms = 0").await;
    let claimed = claim(&db.store, &["s"], 1).await;
    assert_eq!(claimed[0].failures, 4, "the holder died with the lease");
    // A success clears the failures.
    db.store
        .release(&claimed[0], PassEnd::Succeeded)
        .await
        .unwrap();
    assert_eq!(
        db.count("SELECT failures FROM source_leases WHERE source = 's'")
            .await,
        0
    );
}

async fn due_ms(db: &TestStore) -> i64 {
    db.count("SELECT next_due_ms FROM source_leases WHERE source = 's'")
        .await
}

async fn a_changed_schedule_moves_the_next_due_time(db: TestStore) {
    // The schedule's next firing, a fixed distance after the database's clock here.
    let hourly = |_: &str, now_ms: i64| Some(now_ms + 3_600_000);
    // New to the fleet: due at once.
    db.store
        .schedule(&[("s", "0 0 * * * *")], &hourly)
        .await
        .unwrap();
    assert!(due_ms(&db).await <= Utc::now().timestamp_millis());
    // The same schedule again (a restart, another replica): kept.
    db.execute("UPDATE source_leases SET next_due_ms = 42")
        .await;
    db.store
        .schedule(&[("s", "0 0 * * * *")], &hourly)
        .await
        .unwrap();
    assert_eq!(due_ms(&db).await, 42);
    // Another schedule: its next firing, by the database's clock.
    let before = Utc::now().timestamp_millis();
    db.store
        .schedule(&[("s", "0 * * * * *")], &in_a_minute)
        .await
        .unwrap();
    let due = due_ms(&db).await;
    assert!(
        (before + 59_000..=Utc::now().timestamp_millis() + 61_000).contains(&due),
        "{due} vs {before}"
    );
    // A schedule that fires no more: never due again.
    db.store
        .schedule(&[("s", "0 0 0 1 1 * 2020")], &|_, _| None)
        .await
        .unwrap();
    assert_eq!(due_ms(&db).await, i64::MAX);
}
