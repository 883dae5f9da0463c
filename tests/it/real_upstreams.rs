//! What real vendors do that a friendly fake never did (`shared/api-docs/BEHAVIOUR.md`),
//! each turned on in the fake by its switch, against the real engine and PostgreSQL: late
//! commits across an interrupted pass, a scope that changes between passes, pages capped
//! by the server, 408s that only a smaller page cures, cursors the vendor stops taking,
//! one scope coming back empty. None of them may lose data or delete what is still there.

use chrono::{DateTime, Duration, SubsecRound, Utc};
use deptsync::engine::{PassReport, PassRequest};
use deptsync::fakes::mews::{self, FakeDepartment, FakeMews, format_utc};
use deptsync::fakes::procurify::{self, FakeProcurify};
use deptsync::fakes::snapbooks::{self, FakeSnapbooks};
use deptsync::store::Store;
use uuid::Uuid;

use crate::helpers::{TestDb, config, mews_config, pass, run_binary, stderr};

async fn sync(db: &TestDb, toml: &str, request: PassRequest) -> Result<PassReport, String> {
    pass(db, toml, request).await
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.scalar(sql).await
}

/// A Mews source that starts a day ago (one window), with `extra` settings.
fn recent_mews(db: &TestDb, fake: &FakeMews, start: DateTime<Utc>, extra: &str) -> String {
    let extra = format!("start = \"{}\"\n{extra}", format_utc(start));
    mews_config(&db.url, "mews", &fake.base_url, &extra)
}

/// A database and a fake Mews holding 100 departments of one enterprise, updated from
/// 2019 to two days ago, and the config of a source reading them.
async fn mews_with_history() -> (TestDb, FakeMews, String) {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let since = DateTime::parse_from_rfc3339("2019-02-01T00:00:00Z").unwrap();
    fake.generate(100, 1, since.to_utc(), Utc::now() - Duration::days(2));
    let toml = mews_config(&db.url, "mews", &fake.base_url, "");
    (db, fake, toml)
}

fn a_day_ago() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0) - Duration::days(1)
}

#[tokio::test]
async fn a_resumed_pass_rereads_the_lookback_before_the_point_it_continues_from() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let start = a_day_ago();
    fake.generate(200, 1, start, Utc::now() - Duration::hours(1));
    let toml = recent_mews(&db, &fake, start, "page_size = 50\nmax_attempts = 1");
    // The first page is stored, the second fails: the pass stops inside its one window.
    fake.fail_request(2, 500);
    sync(&db, &toml, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    let until = db
        .store
        .load_state("mews")
        .await
        .unwrap()
        .incremental
        .expect("an interrupted pass leaves its ledger")
        .until;
    // Committed late: updated a second before the interrupted pass's end, but visible
    // only after the part of the window it sits in was read.
    let late_id = Uuid::from_u128(7);
    fake.commit_late(
        2,
        FakeDepartment::new(
            late_id,
            Uuid::from_u128(0xE000),
            "Committed late",
            until - Duration::seconds(1),
        ),
    );

    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();

    fake.assert_no_violations();
    let stored = count(
        &db,
        &format!("SELECT count(*) FROM departments WHERE external_id = '{late_id}'"),
    )
    .await;
    assert_eq!(
        stored, 1,
        "the late commit before the resumed pass's end is read"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 201);
}

#[tokio::test]
async fn an_enterprise_added_to_the_config_is_read_from_start_and_a_new_token_is_not() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    // Two enterprises whose departments were all updated long ago.
    fake.generate(
        400,
        2,
        DateTime::parse_from_rfc3339("2019-02-01T00:00:00Z")
            .unwrap()
            .to_utc(),
        DateTime::parse_from_rfc3339("2021-01-01T00:00:00Z")
            .unwrap()
            .to_utc(),
    );
    let (first, second) = (Uuid::from_u128(0xE000), Uuid::from_u128(0xE001));
    let only_first = format!("enterprise_ids = [\"{first}\"]");
    sync(
        &db,
        &mews_config(&db.url, "mews", &fake.base_url, &only_first),
        PassRequest::INCREMENTAL,
    )
    .await
    .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 200);

    let both = format!("enterprise_ids = [\"{first}\", \"{second}\"]");
    let widened = mews_config(&db.url, "mews", &fake.base_url, &both);
    sync(&db, &widened, PassRequest::INCREMENTAL).await.unwrap();

    assert_eq!(
        count(&db, "SELECT count(*) FROM departments").await,
        400,
        "the added enterprise's departments are read from start"
    );
    let status = db.store.status(&["mews".to_owned()]).await.unwrap();
    let reset = status[0].reset.as_deref().unwrap_or_default();
    assert!(reset.contains("settings changed"), "{status:?}");

    // A routine token rotation for the same scope reads only the lookback again.
    let mark = db
        .store
        .load_state("mews")
        .await
        .unwrap()
        .high_water_mark
        .unwrap();
    fake.set_access_token("rotated-token");
    let rotated = widened.replace(mews::ACCESS_TOKEN, "rotated-token");
    let before = fake.requests().len();
    sync(&db, &rotated, PassRequest::INCREMENTAL).await.unwrap();
    for request in &fake.requests()[before..] {
        let window = request.window.unwrap();
        assert!(
            window.start >= mark - Duration::minutes(5),
            "a new token re-read {window}"
        );
    }
    fake.assert_no_violations();
}

fn snapbooks_source(fake: &FakeSnapbooks, extra: &str) -> String {
    format!(
        r#"
[[sources]]
name = "snap"
kind = "snapbooks"
base_url = "{}"
token = "{}"
{extra}
"#,
        fake.base_url,
        snapbooks::TOKEN
    )
}

async fn deleted(db: &TestDb) -> i64 {
    count(
        db,
        "SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL",
    )
    .await
}

#[tokio::test]
async fn a_client_account_taken_out_of_the_config_deletes_none_of_its_rows() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[456, 789]).await.unwrap();
    for id in 1..=50 {
        fake.put(
            id,
            &format!("D{id}"),
            if id <= 30 { 456 } else { 789 },
            None,
        );
    }
    let both = snapbooks_source(&fake, "client_account_ids = [456, 789]");
    sync(&db, &config(&db.url, &both), PassRequest::INCREMENTAL)
        .await
        .unwrap();

    let narrower = config(
        &db.url,
        &snapbooks_source(&fake, "client_account_ids = [456]"),
    );
    sync(&db, &narrower, PassRequest::INCREMENTAL)
        .await
        .unwrap();
    sync(&db, &narrower, PassRequest::INCREMENTAL)
        .await
        .unwrap();

    assert_eq!(deleted(&db).await, 0, "rows out of scope are not deleted");
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 50);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn snapbooks_follows_the_page_size_the_server_serves() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[456, 789]).await.unwrap();
    for id in 1..=300 {
        fake.put(
            id,
            &format!("D{id}"),
            if id % 2 == 0 { 456 } else { 789 },
            None,
        );
    }
    fake.cap_per_page(100);
    let source = config(
        &db.url,
        &snapbooks_source(&fake, "client_account_ids = [456, 789]\npage_size = 1000"),
    );

    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 300);
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(
        (report.totals.counts.unchanged, report.totals.counts.deleted),
        (300, 0)
    );
    assert_eq!(deleted(&db).await, 0);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn procurify_follows_the_page_size_the_server_serves() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    fake.generate(250, 3);
    fake.cap_page_size(100);
    let source = config(
        &db.url,
        &format!(
            "[[sources]]\nname = \"proc\"\nkind = \"procurify\"\nbase_url = \"{}\"\n\
             client_id = \"{}\"\nclient_secret = \"{}\"\npage_size = 1000\n",
            fake.base_url,
            procurify::CLIENT_ID,
            procurify::CLIENT_SECRET
        ),
    );
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 250);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn a_procurify_page_count_short_of_the_records_fails_and_deletes_nothing() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    fake.generate(300, 3);
    let source = config(
        &db.url,
        &format!(
            "[[sources]]\nname = \"proc\"\nkind = \"procurify\"\nbase_url = \"{}\"\n\
             client_id = \"{}\"\nclient_secret = \"{}\"\npage_size = 100\n",
            fake.base_url,
            procurify::CLIENT_ID,
            procurify::CLIENT_SECRET
        ),
    );
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    // Two pages said for 300 records of 100 a page, and no next link after the second.
    fake.misstate_num_pages(2);
    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();

    assert!(error.contains("disagree"), "{error}");
    assert_eq!(deleted(&db).await, 0);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn a_listing_whose_metadata_disagrees_with_itself_fails_and_deletes_nothing() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[456]).await.unwrap();
    for id in 1..=150 {
        fake.put(id, &format!("D{id}"), 456, None);
    }
    let source = config(&db.url, &snapbooks_source(&fake, "page_size = 50"));
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    // 150 records of 50 a page, and it says one page.
    fake.misstate_pages(1);
    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    assert!(error.contains("disagree"), "{error}");
    assert_eq!(deleted(&db).await, 0);

    // And a page count that goes on past what the records fill.
    fake.misstate_pages(1_000_000);
    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    assert!(error.contains("disagree"), "{error}");
    assert_eq!(deleted(&db).await, 0);
}

#[tokio::test]
async fn a_408_on_a_short_window_asks_for_fewer_departments_a_page() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let start = a_day_ago();
    fake.generate(300, 1, start, Utc::now() - Duration::minutes(1));
    // Any request for more than 100 departments is too heavy, whatever its window.
    fake.too_heavy_over(100, Duration::zero());
    let toml = recent_mews(&db, &fake, start, "");

    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 300);
    // The next pass's window is minutes long: it must not fail either.
    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_408_inside_a_window_keeps_its_place_and_asks_for_fewer() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let start = a_day_ago();
    fake.generate(200, 1, start, Utc::now() - Duration::hours(1));
    // From the second request on, more than 25 a page is too heavy.
    let heavy = fake.clone();
    fake.on_request(move |n| {
        if n == 2 {
            heavy.too_heavy_over(25, Duration::zero());
        }
    });
    let toml = recent_mews(&db, &fake, start, "page_size = 50");

    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();

    let requests = fake.requests();
    assert_eq!((requests[1].status, requests[1].count), (408, 50));
    assert_eq!(
        (requests[2].status, requests[2].count, requests[2].window),
        (200, 25, requests[1].window),
        "the same window, fewer a page"
    );
    assert_eq!(
        requests[2].cursor, requests[1].cursor,
        "from the same place: the window is not read again"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 200);
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_position_saved_before_fingerprints_is_read_again_from_start_once() {
    let (db, fake, toml) = mews_with_history().await;
    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    // As a database from before the fingerprint was kept.
    sqlx::query("UPDATE sync_state SET scope_fingerprint = NULL")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM departments")
        .execute(db.pool())
        .await
        .unwrap();

    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 100);
    let status = db.store.status(&["mews".to_owned()]).await.unwrap();
    assert!(
        status[0]
            .reset
            .as_deref()
            .is_some_and(|r| r.contains("no record")),
        "{status:?}"
    );

    // Once: the next pass reads only the lookback again.
    let before = fake.requests().len();
    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    assert!(
        fake.requests()[before..]
            .iter()
            .all(|r| r.window.unwrap().start > Utc::now() - Duration::days(1))
    );
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_saved_cursor_the_vendor_rejects_is_dropped_and_its_window_read_again() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    let start = a_day_ago();
    fake.generate(200, 1, start, Utc::now() - Duration::hours(1));
    let toml = recent_mews(&db, &fake, start, "page_size = 50\nmax_attempts = 1");
    fake.fail_request(2, 500);
    sync(&db, &toml, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    fake.forget_cursors();

    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();

    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 200);
    assert!(
        fake.requests().iter().any(|r| r.status == 400),
        "the saved cursor was sent and refused"
    );
    fake.assert_no_violations();
}

#[tokio::test]
async fn one_client_account_coming_back_empty_deletes_none_of_it() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[1, 2, 3]).await.unwrap();
    let accounts = [(1, 192), (2, 129), (3, 129)];
    let mut id = 0;
    for (account, departments) in accounts {
        for _ in 0..departments {
            id += 1;
            fake.put(id, &format!("D{id}"), account, None);
        }
    }
    let source = config(
        &db.url,
        &snapbooks_source(&fake, "client_account_ids = [1, 2, 3]\npage_size = 100"),
    );
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    fake.empty_account(1, true);
    // And one department really gone from another account.
    fake.remove(200);

    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();

    assert!(
        error.contains("client account 1") && error.contains("192 of 192"),
        "{error}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL AND scope_id = '1'"
        )
        .await,
        0,
        "nothing of the empty account is deleted"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM departments WHERE deleted_at IS NOT NULL AND external_id = '200'"
        )
        .await,
        1,
        "the other accounts' deletions go ahead"
    );

    // A person confirms.
    let report = sync(
        &db,
        &source,
        PassRequest::Incremental {
            allow_mass_delete: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.totals.counts.deleted, 192);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn reset_drops_the_position_so_the_next_pass_reads_from_start() {
    let (db, fake, toml) = mews_with_history().await;
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", Uuid::new_v4()));
    std::fs::write(&file, &toml).unwrap();
    let config_arg = file.to_str().unwrap().to_owned();
    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    sqlx::query(
        "DELETE FROM departments WHERE external_id NOT IN
             (SELECT external_id FROM departments ORDER BY external_id LIMIT 10)",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let reset = |yes: bool| {
        let mut args = vec!["reset", "--source", "mews", "--config", config_arg.as_str()];
        args.extend(yes.then_some("--yes"));
        async move { run_binary(&args, &[]).await }
    };
    // Not on a terminal, it wants --yes.
    let output = reset(false).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--yes"), "{}", stderr(&output));
    assert!(
        db.store
            .load_state("mews")
            .await
            .unwrap()
            .high_water_mark
            .is_some()
    );

    // It refuses while the source is being synced.
    let lease = db
        .store
        .try_lease("mews", deptsync::store::lease::DEFAULT_TTL)
        .await
        .unwrap()
        .unwrap();
    let output = reset(true).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("another process is syncing"),
        "{}",
        stderr(&output)
    );
    db.store
        .release(&lease, deptsync::store::PassEnd::Succeeded)
        .await
        .unwrap();

    let output = reset(true).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        db.store.load_state("mews").await.unwrap(),
        Default::default(),
        "the position, ledger and listing are gone"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM departments").await,
        10,
        "rows stay"
    );
    let status = db.store.status(&["mews".to_owned()]).await.unwrap();
    assert!(
        status[0]
            .reset
            .as_deref()
            .is_some_and(|r| r.contains("operator")),
        "{status:?}"
    );

    sync(&db, &toml, PassRequest::INCREMENTAL).await.unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM departments").await, 100);
    fake.assert_no_violations();
}
