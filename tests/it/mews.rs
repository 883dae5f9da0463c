//! The Mews pass end to end: fake upstream, real engine, real PostgreSQL.

use chrono::{DateTime, Utc};
use deptsync::engine::{PassRequest, run_pass};
use deptsync::fakes::mews::{FakeDepartment, FakeMews};
use deptsync::model::{RunOutcome, Window, WindowState};
use deptsync::store::Store;
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestDb, assert_resumed, at, connector, mews_config, pass};

/// Every department in the table, as (id, enterprise, name, active, updated, raw).
async fn table(
    db: &TestDb,
) -> Vec<(
    String,
    String,
    String,
    bool,
    DateTime<Utc>,
    serde_json::Value,
)> {
    sqlx::query(
        "SELECT external_id, scope_id, name, is_active, source_updated_at, raw
         FROM departments WHERE source = 'mews' ORDER BY external_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect()
}

/// What the table should hold: the upstream's truth.
fn truth(
    fake: &FakeMews,
) -> Vec<(
    String,
    String,
    String,
    bool,
    DateTime<Utc>,
    serde_json::Value,
)> {
    let mut rows: Vec<_> = fake
        .departments()
        .into_iter()
        .map(|d| {
            let active = d.json["IsActive"].as_bool().unwrap();
            (
                d.id.to_string(),
                d.enterprise_id.to_string(),
                d.name().to_owned(),
                active,
                d.updated,
                d.json,
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

type Row6 = (
    String,
    String,
    String,
    bool,
    DateTime<Utc>,
    serde_json::Value,
);

/// Fails, naming the first rows that differ, unless the table equals the upstream's truth.
async fn assert_matches_upstream(db: &TestDb, fake: &FakeMews) {
    let stored: Vec<Row6> = table(db).await;
    let expected: Vec<Row6> = truth(fake);
    let missing: Vec<&Row6> = expected
        .iter()
        .filter(|row| !stored.contains(row))
        .take(3)
        .collect();
    let extra: Vec<&Row6> = stored
        .iter()
        .filter(|row| !expected.contains(row))
        .take(3)
        .collect();
    assert!(
        stored.len() == expected.len() && missing.is_empty() && extra.is_empty(),
        "table has {} rows, upstream {}; first missing {missing:#?}; first unexpected {extra:#?}",
        stored.len(),
        expected.len()
    );
}

async fn sync(
    db: &TestDb,
    fake: &FakeMews,
    extra: &str,
    request: PassRequest,
) -> Result<deptsync::engine::PassReport, String> {
    pass(
        db,
        &mews_config(&db.url, "mews", &fake.base_url, extra),
        request,
    )
    .await
}

#[tokio::test]
async fn a_full_sync_copies_every_department_in_windows_mews_accepts() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(
        1_250,
        3,
        at(2019, 1, 1),
        Utc::now() - chrono::Duration::hours(1),
    );

    let report = sync(&db, &fake, "page_size = 100", PassRequest::INCREMENTAL)
        .await
        .unwrap();

    fake.assert_no_violations();
    assert_matches_upstream(&db, &fake).await;
    assert_eq!(report.outcome, RunOutcome::Succeeded);
    assert_eq!(report.totals.counts.inserted, 1_250);
    let requests = fake.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.count == 100 && r.status / 100 == 2)
    );
    // Windows chain from `start` to the run's now without gap or overlap.
    let mut windows: Vec<Window> = requests.iter().filter_map(|r| r.window).collect();
    windows.sort_by_key(|w| w.start);
    windows.dedup();
    assert_eq!(windows[0].start, at(2019, 1, 1));
    for pair in windows.windows(2) {
        assert_eq!(pair[0].end, pair[1].start);
    }
    let state = db.store.load_state("mews").await.unwrap();
    assert_eq!(state.high_water_mark, Some(windows.last().unwrap().end));
    assert_eq!(state.incremental, None);

    let run =
        sqlx::query("SELECT status, fetched, inserted, updated, unchanged, error FROM sync_runs")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(run.get::<String, _>("status"), "succeeded");
    assert_eq!(run.get::<i64, _>("fetched"), 1_250);
    assert_eq!(run.get::<i64, _>("inserted"), 1_250);
    assert_eq!(run.get::<Option<String>, _>("error"), None);
}

#[tokio::test]
async fn an_incremental_sync_rereads_only_recent_windows_and_writes_only_changes() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(
        300,
        2,
        at(2019, 1, 1),
        Utc::now() - chrono::Duration::days(1),
    );
    // Three updated just before the first pass: the next pass's lookback re-reads them.
    for i in 0..3 {
        let updated = Utc::now() - chrono::Duration::minutes(3);
        fake.insert(FakeDepartment::new(
            Uuid::from_u128(900 + i),
            Uuid::from_u128(1),
            "Recent",
            updated,
        ));
    }
    sync(&db, &fake, "lookback = \"10m\"", PassRequest::INCREMENTAL)
        .await
        .unwrap();
    let mark = db
        .store
        .load_state("mews")
        .await
        .unwrap()
        .high_water_mark
        .unwrap();
    let before: Vec<(String, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT external_id, last_changed_at, xmin::text FROM departments ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();

    // One department renamed, one new, both updated after the first pass.
    let renamed = fake.departments()[17].clone();
    let recently = Utc::now() - chrono::Duration::seconds(2);
    let mut changed = FakeDepartment::new(renamed.id, renamed.enterprise_id, "Renamed", recently);
    changed.json["CreatedUtc"] = renamed.json["CreatedUtc"].clone();
    fake.insert(changed);
    let new_id = Uuid::from_u128(42);
    fake.insert(FakeDepartment::new(
        new_id,
        renamed.enterprise_id,
        "Brand new",
        recently,
    ));
    let first_pass_requests = fake.requests().len();

    let report = sync(&db, &fake, "lookback = \"10m\"", PassRequest::INCREMENTAL)
        .await
        .unwrap();

    fake.assert_no_violations();
    let second_pass = &fake.requests()[first_pass_requests..];
    assert!(!second_pass.is_empty());
    for request in second_pass {
        let window = request.window.unwrap();
        assert!(
            window.start >= mark - chrono::Duration::minutes(10),
            "re-read old window {window}"
        );
    }
    let counts = report.totals.counts;
    assert_eq!(
        (counts.inserted, counts.updated, counts.unchanged),
        (1, 1, 3)
    );
    assert_matches_upstream(&db, &fake).await;
    let after: Vec<(String, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT external_id, last_changed_at, xmin::text FROM departments ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let untouched = after.iter().filter(|row| before.contains(row)).count();
    assert_eq!(untouched, 302, "only the renamed row may be rewritten");
}

#[tokio::test]
async fn a_sync_that_fails_mid_window_resumes_each_window_at_its_cursor() {
    // Four windows hold data, read four at a time.
    let settings = "page_size = 50\nconcurrent_windows = 4";
    let clean_pages = {
        let db = TestDb::new().await;
        let fake = FakeMews::start().await.unwrap();
        fake.generate(1_000, 1, at(2019, 1, 1), at(2019, 12, 1));
        sync(&db, &fake, settings, PassRequest::INCREMENTAL)
            .await
            .unwrap();
        fake.requests()
            .iter()
            .filter(|r| r.status / 100 == 2)
            .count()
    };

    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(1_000, 1, at(2019, 1, 1), at(2019, 12, 1));
    fake.fail_request(11, 500);

    let error = sync(
        &db,
        &fake,
        &format!("{settings}\nmax_attempts = 1"),
        PassRequest::INCREMENTAL,
    )
    .await
    .unwrap_err();
    assert!(error.contains("500") && error.contains("req-11"), "{error}");
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    let counted: i64 = db.scalar("SELECT inserted FROM sync_runs").await;
    assert!(
        stored >= 50,
        "pages before the failure are kept, got {stored}"
    );
    assert_eq!(stored, counted, "every stored page is counted in its run");
    let state = db.store.load_state("mews").await.unwrap();
    let ledger = state.incremental.expect("the windows' positions are saved");
    assert!(
        ledger
            .windows
            .iter()
            .any(|w| matches!(w.state, WindowState::InProgress { .. })),
        "{ledger:?}"
    );
    assert_eq!(state.high_water_mark, None);
    let (status, recorded): (String, String) =
        sqlx::query_as("SELECT status, error FROM sync_runs")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(
        recorded.contains("injected failure") && recorded.contains("req-11"),
        "{recorded}"
    );

    let before_rerun = fake.requests().len();
    sync(&db, &fake, "page_size = 50", PassRequest::INCREMENTAL)
        .await
        .unwrap();

    fake.assert_no_violations();
    assert_resumed(&ledger, &fake.requests()[before_rerun..]);
    let ok_pages = fake
        .requests()
        .iter()
        .filter(|r| r.status / 100 == 2)
        .count();
    // At most the one page each window had in flight is read twice.
    assert!(
        ok_pages <= clean_pages + 4,
        "{ok_pages} pages read where a clean sync reads {clean_pages}"
    );
    assert_matches_upstream(&db, &fake).await;
}

#[tokio::test]
async fn a_cancelled_pass_is_recorded_and_the_next_one_resumes() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(500, 1, at(2019, 1, 1), at(2019, 2, 1));
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    fake.on_request(move |n| {
        if n == 4 {
            trigger.cancel();
        }
    });
    // One window at a time, so that the first three requests are the pages before the
    // cancel (with several windows, they would be other windows' first pages).
    let (_, source) = connector(&mews_config(
        &db.url,
        "mews",
        &fake.base_url,
        "page_size = 50\nconcurrent_windows = 1",
    ));
    let report = run_pass(
        "mews",
        &source,
        &db.store,
        PassRequest::INCREMENTAL,
        &cancel,
    )
    .await
    .unwrap();
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    let status: String = db.scalar("SELECT status FROM sync_runs").await;
    assert_eq!(status, "cancelled");
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    let counted: i64 = db.scalar("SELECT inserted FROM sync_runs").await;
    assert!(
        (150..=200).contains(&stored) && stored == counted,
        "pages before the cancel are kept, got {stored}"
    );

    sync(&db, &fake, "page_size = 50", PassRequest::INCREMENTAL)
        .await
        .unwrap();
    fake.assert_no_violations();
    assert_matches_upstream(&db, &fake).await;
}

#[tokio::test]
async fn a_backfill_restores_deleted_rows_and_leaves_the_high_water_mark() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(600, 2, at(2019, 1, 1), at(2022, 1, 1));
    sync(&db, &fake, "page_size = 40", PassRequest::INCREMENTAL)
        .await
        .unwrap();
    let mark = db.store.load_state("mews").await.unwrap().high_water_mark;
    let deleted = sqlx::query(
        "DELETE FROM departments WHERE source_updated_at >= '2020-01-01' AND source_updated_at < '2021-01-01'",
    )
    .execute(db.pool())
    .await
    .unwrap()
    .rows_affected();
    assert!(deleted > 100);

    let before = fake.requests().len();
    let request = PassRequest::Backfill {
        from: at(2020, 1, 1),
        to: Some(at(2021, 1, 1)),
    };
    let report = sync(&db, &fake, "page_size = 40", request).await.unwrap();

    fake.assert_no_violations();
    assert_eq!(report.totals.counts.inserted, deleted);
    assert_matches_upstream(&db, &fake).await;
    for r in &fake.requests()[before..] {
        let window = r.window.unwrap();
        assert!(
            window.start >= at(2020, 1, 1) && window.end <= at(2021, 1, 1),
            "{window}"
        );
    }
    let state = db.store.load_state("mews").await.unwrap();
    assert_eq!(state.high_water_mark, mark);
    assert_eq!(state.backfill, None);
    let mode: String = db
        .scalar("SELECT mode FROM sync_runs ORDER BY started_at DESC LIMIT 1")
        .await;
    assert_eq!(mode, "backfill");
}

#[tokio::test]
async fn an_interrupted_backfill_resumes_when_run_again() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(400, 1, at(2020, 1, 1), at(2020, 12, 1));
    fake.fail_request(5, 503);
    let request = PassRequest::Backfill {
        from: at(2020, 1, 1),
        to: None,
    };

    sync(&db, &fake, "page_size = 30\nmax_attempts = 1", request)
        .await
        .unwrap_err();
    let progress = db
        .store
        .load_state("mews")
        .await
        .unwrap()
        .backfill
        .expect("backfill progress saved");
    assert_eq!(
        progress.backfill.map(|range| range.from),
        Some(at(2020, 1, 1))
    );
    assert_eq!(
        db.store.load_state("mews").await.unwrap().high_water_mark,
        None
    );

    let before = fake.requests().len();
    sync(&db, &fake, "page_size = 30", request).await.unwrap();
    assert_resumed(&progress, &fake.requests()[before..]);
    fake.assert_no_violations();
    assert_matches_upstream(&db, &fake).await;
    assert_eq!(db.store.load_state("mews").await.unwrap().backfill, None);
}

#[tokio::test]
async fn an_older_version_never_replaces_a_newer_row() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let id = Uuid::from_u128(7);
    let enterprise = Uuid::from_u128(8);
    fake.insert(FakeDepartment::new(
        id,
        enterprise,
        "Current name",
        at(2021, 6, 1),
    ));
    sync(&db, &fake, "", PassRequest::INCREMENTAL)
        .await
        .unwrap();

    // The upstream serves a stale copy, updated earlier, with another name.
    fake.insert(FakeDepartment::new(
        id,
        enterprise,
        "Stale name",
        at(2021, 5, 1),
    ));
    let request = PassRequest::Backfill {
        from: at(2021, 4, 1),
        to: Some(at(2021, 7, 1)),
    };
    let report = sync(&db, &fake, "", request).await.unwrap();

    assert_eq!(report.totals.counts.unchanged, 1);
    assert_eq!(report.totals.counts.updated, 0);
    let (name, updated): (String, DateTime<Utc>) =
        sqlx::query_as("SELECT name, source_updated_at FROM departments")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((name.as_str(), updated), ("Current name", at(2021, 6, 1)));
}

#[tokio::test]
async fn bad_tokens_fail_the_source_with_the_vendor_message_and_request_id() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(10, 1, at(2020, 1, 1), at(2020, 2, 1));
    fake.set_access_token("another-token");

    let error = sync(&db, &fake, "", PassRequest::INCREMENTAL)
        .await
        .unwrap_err();

    assert!(
        error.contains("401") && error.contains("Invalid AccessToken.") && error.contains("req-1"),
        "{error}"
    );
    assert!(
        !error.contains(deptsync::fakes::mews::ACCESS_TOKEN),
        "the token leaked: {error}"
    );
    let recorded: String = db.scalar("SELECT error FROM sync_runs").await;
    assert_eq!(recorded, error);
    fake.assert_no_violations();
}

#[tokio::test]
async fn records_that_cannot_be_stored_are_kept_aside_and_the_page_goes_on() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(20, 1, at(2020, 1, 1), at(2020, 2, 1));
    let mut nameless =
        FakeDepartment::new(Uuid::from_u128(1), Uuid::from_u128(2), "x", at(2020, 1, 5));
    nameless.json.as_object_mut().unwrap().remove("Name");
    fake.insert(nameless);
    fake.insert(FakeDepartment::new(
        Uuid::from_u128(3),
        Uuid::from_u128(2),
        "nul\0byte",
        at(2020, 1, 6),
    ));

    let report = sync(&db, &fake, "", PassRequest::INCREMENTAL)
        .await
        .unwrap();
    assert_eq!(
        (report.totals.counts.inserted, report.totals.counts.rejected),
        (20, 2)
    );

    // The same bad records seen again do not pile up.
    sync(
        &db,
        &fake,
        "",
        PassRequest::Backfill {
            from: at(2020, 1, 1),
            to: Some(at(2020, 3, 1)),
        },
    )
    .await
    .unwrap();
    let rejected: Vec<(Option<String>, String, i64)> = sqlx::query_as(
        "SELECT external_id, reason, times_seen FROM rejected_records ORDER BY external_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(
        rejected[0].0.as_deref(),
        Some(Uuid::from_u128(1).to_string().as_str())
    );
    assert!(rejected[0].1.contains("Name"), "{}", rejected[0].1);
    assert!(rejected[1].1.contains("NUL"), "{}", rejected[1].1);
    assert!(rejected.iter().all(|r| r.2 == 2));
    let rejected_count: i64 = db
        .scalar("SELECT sum(rejected)::bigint FROM sync_runs")
        .await;
    assert_eq!(rejected_count, 4);
}

#[tokio::test]
async fn enterprise_ids_limit_the_sync_and_empty_pages_may_come_as_200() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.never_204();
    // Data only in 2020: the 2019 windows and those after come back empty.
    fake.generate(90, 3, at(2020, 2, 1), at(2020, 11, 1));
    let wanted = [Uuid::from_u128(0xE000), Uuid::from_u128(0xE002)];
    let extra = format!("enterprise_ids = [\"{}\", \"{}\"]", wanted[0], wanted[1]);

    let report = sync(&db, &fake, &extra, PassRequest::INCREMENTAL)
        .await
        .unwrap();

    fake.assert_no_violations();
    assert_eq!(report.totals.counts.inserted, 60);
    let scopes: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT scope_id FROM departments ORDER BY 1")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(scopes, wanted.map(|id| id.to_string()).to_vec());
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.returned == 0 && r.status == 200)
    );
    assert!(
        db.store
            .load_state("mews")
            .await
            .unwrap()
            .high_water_mark
            .is_some()
    );
}

#[tokio::test]
async fn windows_are_read_several_at_once_up_to_concurrent_windows() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(300, 2, at(2019, 1, 1), at(2021, 1, 1));
    fake.shared.set_delay(std::time::Duration::from_millis(200));

    sync(
        &db,
        &fake,
        "page_size = 50\nconcurrent_windows = 3",
        PassRequest::INCREMENTAL,
    )
    .await
    .unwrap();

    fake.assert_no_violations();
    assert_matches_upstream(&db, &fake).await;
    // A window asks for its next page only after the last one came back (200 ms later), so
    // requests closer together than that come from different windows.
    let at_once = fake.shared.busiest(std::time::Duration::from_millis(100));
    assert!(
        (2..=3).contains(&at_once),
        "{at_once} requests within 100 ms"
    );
}
