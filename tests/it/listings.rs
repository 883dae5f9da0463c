//! Full-listing sources (Procurify, Snapbooks, the tenant data API) end to end: fake
//! upstream, real engine, real PostgreSQL. Change detection writes only what changed;
//! deletions come only from complete listings, behind the mass-deletion guard.

use chrono::{DateTime, Utc};
use deptsync::engine::{PassReport, PassRequest};
use deptsync::fakes::data_v1::{self, FakeDataV1};
use deptsync::fakes::procurify::{self, FakeProcurify};
use deptsync::fakes::snapbooks::{self, FakeSnapbooks};
use deptsync::store::Store;

use crate::helpers::{TestDb, config, pass, run_binary};

pub(crate) fn procurify_source(fake: &FakeProcurify, extra: &str) -> String {
    format!(
        r#"
[[sources]]
name = "proc"
kind = "procurify"
base_url = "{}"
client_id = "{}"
client_secret = "{}"
{extra}
"#,
        fake.base_url,
        procurify::CLIENT_ID,
        procurify::CLIENT_SECRET
    )
}

/// A database and a fake Procurify with `count` departments, synced once.
async fn procurify_synced(count: i64, extra: &str) -> (TestDb, FakeProcurify, String) {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=count {
        fake.put(id, &format!("Department {id}"), 1, true);
    }
    let source = procurify_source(&fake, extra);
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    (db, fake, source)
}

async fn sync(db: &TestDb, source_toml: &str, request: PassRequest) -> Result<PassReport, String> {
    pass(db, &config(&db.url, source_toml), request).await
}

/// The live rows of `source` as (id, scope, name, active).
async fn live(db: &TestDb, source: &str) -> Vec<(String, String, String, bool)> {
    sqlx::query_as(
        "SELECT external_id, COALESCE(scope_id, ''), name, is_active FROM departments
         WHERE source = $1 AND deleted_at IS NULL ORDER BY external_id",
    )
    .bind(source)
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// (id, xmin, last_changed_at) of every row: equal before and after means nothing was written.
async fn row_versions(db: &TestDb) -> Vec<(String, String, DateTime<Utc>)> {
    sqlx::query_as("SELECT external_id, xmin::text, last_changed_at FROM departments ORDER BY 1")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

async fn deleted_ids(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT external_id FROM departments WHERE deleted_at IS NOT NULL ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
}

fn sorted_by_id(
    mut rows: Vec<(String, String, String, bool)>,
) -> Vec<(String, String, String, bool)> {
    rows.sort();
    rows
}

#[tokio::test]
async fn procurify_full_sync_then_a_pass_with_no_change_writes_nothing() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=250 {
        fake.put(id, &format!("Department {id}"), id % 3 + 1, id % 7 != 0);
    }
    let source = procurify_source(&fake, "page_size = 100");

    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(
        (report.totals.counts.inserted, report.totals.pages),
        (250, 3)
    );
    assert_eq!(live(&db, "proc").await, sorted_by_id(fake.truth()));
    assert_eq!(fake.token_requests(), 1, "one token for the whole pass");
    let raw: serde_json::Value = db
        .scalar("SELECT raw FROM departments WHERE external_id = '7'")
        .await;
    assert_eq!(
        raw["branch"]["name"], "Branch 2",
        "raw keeps the record as received"
    );

    let before = row_versions(&db).await;
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    let counts = report.totals.counts;
    assert_eq!(
        (
            counts.inserted,
            counts.updated,
            counts.unchanged,
            counts.deleted
        ),
        (0, 0, 250, 0)
    );
    assert_eq!(
        row_versions(&db).await,
        before,
        "an unchanged pass rewrote rows"
    );
    let seen_left: i64 = db.scalar("SELECT count(*) FROM listing_seen").await;
    assert_eq!(seen_left, 0, "a finished listing leaves no seen ids behind");
    // The second listing's pages are the ones the next listing trusts: one digest each.
    let trusted: i64 = db
        .scalar(
            "SELECT count(*) FROM listing_page_digests d JOIN sync_state s
               ON s.source = d.source AND s.trusted_listing = d.listing_id",
        )
        .await;
    assert_eq!(trusted, 3);
    let digests: i64 = db.scalar("SELECT count(*) FROM listing_page_digests").await;
    assert_eq!(
        digests, 3,
        "only the last complete listing's digests are kept"
    );
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn a_page_seen_before_is_trusted_only_while_it_tells_what_is_stored() {
    let (db, fake, source) = procurify_synced(12, "page_size = 4").await;

    // The next listing reads department 4 renamed on page 1. Then, before page 2, four
    // departments appear before department 1 and the last four go (the count stays 12),
    // and 4 gets its old name back: page 2 is now exactly the first listing's page 1, which
    // that listing stored, but 4 no longer holds what that page says.
    fake.put(4, "Renamed", 1, true);
    let changing = fake.clone();
    let start = fake.shared.requests();
    fake.shared.on_request(move |n| {
        // start + 1 gets a token, start + 2 reads page 1, start + 3 asks for page 2.
        if n == start + 3 {
            for id in -3..=0 {
                changing.put(id, &format!("Department {id}"), 1, true);
            }
            for id in 9..=12 {
                changing.remove(id);
            }
            changing.put(4, "Department 4", 1, true);
        }
    });
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    // Whatever that listing (which met 1 to 4 twice) kept, the next one stores the truth.
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(live(&db, "proc").await, sorted_by_id(fake.truth()));
    let name: String = db
        .scalar("SELECT name FROM departments WHERE external_id = '4'")
        .await;
    assert_eq!(name, "Department 4");
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn renames_deactivations_deletions_and_reappearances() {
    let (db, fake, source) = procurify_synced(10, "page_size = 4").await;

    fake.put(2, "Renamed", 1, true);
    fake.put(3, "Department 3", 1, false);
    fake.remove(4);
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    let counts = report.totals.counts;
    // 7 unchanged in the first listing, 9 in the one that confirms the deletion.
    assert_eq!(
        (counts.updated, counts.deleted, counts.unchanged),
        (2, 1, 16)
    );
    assert_eq!(live(&db, "proc").await, sorted_by_id(fake.truth()));
    assert_eq!(deleted_ids(&db).await, vec!["4"]);
    let deleted_at: DateTime<Utc> = db
        .scalar("SELECT deleted_at FROM departments WHERE external_id = '4'")
        .await;

    // Deleted once: a later pass leaves the mark alone.
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(report.totals.counts.deleted, 0);
    let again: DateTime<Utc> = db
        .scalar("SELECT deleted_at FROM departments WHERE external_id = '4'")
        .await;
    assert_eq!(again, deleted_at);

    // It comes back: alive again.
    fake.put(4, "Department 4", 1, true);
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(report.totals.counts.updated, 1);
    assert!(deleted_ids(&db).await.is_empty());
    let runs: Vec<(i64, i64)> =
        sqlx::query_as("SELECT updated, deleted FROM sync_runs ORDER BY started_at")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(runs, vec![(0, 0), (2, 1), (0, 0), (1, 0)]);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn a_token_that_expires_in_the_middle_of_a_pass_is_renewed_once() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=30 {
        fake.put(id, &format!("Department {id}"), 1, true);
    }
    // Request 1 gets the token, 2 and 3 read pages; the token dies as request 4 arrives.
    let expiring = fake.clone();
    fake.shared.on_request(move |n| {
        if n == 4 {
            expiring.expire_tokens();
        }
    });

    let report = sync(
        &db,
        &procurify_source(&fake, "page_size = 5"),
        PassRequest::INCREMENTAL,
    )
    .await
    .unwrap();

    assert_eq!(report.totals.counts.inserted, 30);
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.department_pages(), 6, "no page was read twice");
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn bad_client_credentials_fail_with_the_token_endpoint_named() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    let source = procurify_source(&fake, "").replace(procurify::CLIENT_SECRET, "wrong-secret");

    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();

    assert!(
        error.contains("oauth/token") && error.contains("401") && error.contains("Unauthorized"),
        "{error}"
    );
    assert!(
        !error.contains("wrong-secret"),
        "the secret leaked: {error}"
    );
}

#[tokio::test]
async fn a_listing_that_fails_half_way_deletes_nothing_and_the_next_pass_resumes_it() {
    let (db, fake, source) = procurify_synced(20, "page_size = 5\nmax_attempts = 1").await;
    let requests_so_far = fake.shared.requests();

    fake.remove(20);
    // The next pass gets a token, reads page 1, and fails on page 2.
    fake.shared.fail_request(requests_so_far + 3, 500);
    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    assert!(error.contains("500"), "{error}");
    assert!(
        deleted_ids(&db).await.is_empty(),
        "a failed listing deleted something"
    );
    let cursor: Option<String> = db.scalar("SELECT listing_cursor FROM sync_state").await;
    assert!(cursor.is_some(), "the listing's position is saved");

    let pages_before = fake.department_pages();
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    // Pages 2 to 4, then 4 more: a second listing confirms what the first found missing.
    assert_eq!(
        fake.department_pages() - pages_before,
        7,
        "resumed at page 2 of 4"
    );
    assert_eq!(report.totals.counts.deleted, 1);
    assert_eq!(deleted_ids(&db).await, vec!["20"]);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn a_listing_that_changes_under_its_pages_starts_again() {
    let (db, fake, source) = procurify_synced(12, "page_size = 4").await;

    // While the next listing reads page 2, department 1 (on page 1) disappears: every
    // later department shifts one place back, and page 2 would skip one.
    let changing = fake.clone();
    let start = fake.shared.requests();
    fake.shared.on_request(move |n| {
        // start + 1 gets a token, start + 2 reads page 1, start + 3 asks for page 2.
        if n == start + 3 {
            changing.remove(1);
        }
    });
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    assert_eq!(
        deleted_ids(&db).await,
        vec!["1"],
        "only the department really gone"
    );
    assert_eq!(report.totals.counts.deleted, 1);
    assert_eq!(live(&db, "proc").await, sorted_by_id(fake.truth()));
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn the_mass_deletion_guard_deletes_nothing_until_a_person_confirms() {
    let (db, fake, source) = procurify_synced(10, "").await;
    for id in 1..=6 {
        fake.remove(id);
    }

    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    assert!(
        error.contains("6 of 10") && error.contains("max_delete_fraction 0.5"),
        "{error}"
    );
    assert!(error.contains("--allow-mass-delete"), "{error}");
    assert!(deleted_ids(&db).await.is_empty());
    let status: String = db
        .scalar("SELECT status FROM sync_runs ORDER BY started_at DESC LIMIT 1")
        .await;
    assert_eq!(status, "failed");

    // A higher fraction in the config lets it through...
    let lenient = procurify_source(&fake, "max_delete_fraction = 0.7");
    let report = sync(&db, &lenient, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(report.totals.counts.deleted, 6);
    for id in 1..=6 {
        fake.put(id, &format!("Department {id}"), 1, true);
    }
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert!(deleted_ids(&db).await.is_empty(), "they came back");
    for id in 1..=6 {
        fake.remove(id);
    }

    // ...and so does a person, through the binary.
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, config(&db.url, &source)).unwrap();
    let output = run_binary(
        &[
            "sync",
            "--allow-mass-delete",
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(deleted_ids(&db).await, vec!["1", "2", "3", "4", "5", "6"]);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn an_empty_listing_never_wipes_the_table() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("a", None, "Alpha");
    fake.put("b", None, "Beta");
    let source = data_v1_source(&fake, "");
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    fake.remove("a");
    fake.remove("b");

    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();

    assert!(error.contains("2 of 2"), "{error}");
    assert!(deleted_ids(&db).await.is_empty());
}

fn snapbooks_source(fake: &FakeSnapbooks, auth: &str, extra: &str) -> String {
    format!(
        r#"
[[sources]]
name = "snap"
kind = "snapbooks"
base_url = "{}"
{auth}
{extra}
"#,
        fake.base_url
    )
}

#[tokio::test]
async fn snapbooks_lists_inactive_departments_and_reads_each_client_account() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[456, 789, 999]).await.unwrap();
    for id in 1..=23 {
        let account = if id % 2 == 0 { 456 } else { 789 };
        let active = match id % 5 {
            0 => Some(false),
            1 => None,
            _ => Some(true),
        };
        fake.put(id, &format!("Department {id}"), account, active);
    }
    fake.put(100, "Other account", 999, Some(true));
    let token = format!("token = \"{}\"", snapbooks::TOKEN);
    let source = snapbooks_source(
        &fake,
        &token,
        "client_account_ids = [456, 789]\npage_size = 4",
    );

    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    let expected: Vec<_> = fake
        .truth()
        .into_iter()
        .filter(|row| row.1 != "999")
        .collect();
    assert_eq!(live(&db, "snap").await, sorted_by_id(expected));
    let inactive: i64 = db
        .scalar("SELECT count(*) FROM departments WHERE NOT is_active")
        .await;
    assert_eq!(inactive, 4, "inactive departments are listed too");
    let stamped: i64 = db
        .scalar("SELECT count(*) FROM departments WHERE source_updated_at IS NOT NULL")
        .await;
    assert_eq!(stamped, 23);

    // A deactivation is seen as a change, not as a deletion.
    fake.put(2, "Department 2", 456, Some(false));
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(
        (report.totals.counts.updated, report.totals.counts.deleted),
        (1, 0)
    );
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn snapbooks_with_client_credentials() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[456]).await.unwrap();
    fake.put(1, "Sales", 456, Some(true));
    let auth = format!(
        "client_id = \"{}\"\nclient_secret = \"{}\"\ntoken_url = \"{}\"",
        snapbooks::CLIENT_ID,
        snapbooks::CLIENT_SECRET,
        fake.token_url
    );

    let report = sync(
        &db,
        &snapbooks_source(&fake, &auth, ""),
        PassRequest::INCREMENTAL,
    )
    .await
    .unwrap();

    assert_eq!(report.totals.counts.inserted, 1);
    assert_eq!(fake.token_requests(), 1);
    fake.shared.assert_no_violations();
}

pub(crate) fn data_v1_source(fake: &FakeDataV1, extra: &str) -> String {
    format!(
        r#"
[[sources]]
name = "hr"
kind = "data_v1"
base_url = "{}"
token = "{}"
{extra}
"#,
        fake.base_url,
        data_v1::TOKEN
    )
}

#[tokio::test]
async fn data_v1_keeps_the_tree_of_parents_and_children() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("root", None, "Company");
    fake.put("hr", Some("root"), "Human Resources");
    fake.put("mobility", Some("hr"), "Mobility");
    fake.put("it", Some("root"), "IT");
    let source = data_v1_source(&fake, "");

    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    let tree: Vec<(String, Option<String>, bool)> = sqlx::query_as(
        "WITH RECURSIVE path AS (
             SELECT external_id, name::text AS path FROM departments WHERE parent_external_id IS NULL
             UNION ALL
             SELECT d.external_id, path.path || ' / ' || d.name
             FROM departments d JOIN path ON d.parent_external_id = path.external_id
         )
         SELECT path, (SELECT parent_external_id FROM departments WHERE external_id = p.external_id), true
         FROM path p ORDER BY path",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let paths: Vec<&str> = tree.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "Company",
            "Company / Human Resources",
            "Company / Human Resources / Mobility",
            "Company / IT"
        ]
    );

    // A child moves to another parent, another is deleted.
    fake.put("mobility", Some("it"), "Mobility");
    fake.remove("hr");
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(
        (report.totals.counts.updated, report.totals.counts.deleted),
        (1, 1)
    );
    let parent: Option<String> = db
        .scalar("SELECT parent_external_id FROM departments WHERE external_id = 'mobility'")
        .await;
    assert_eq!(parent.as_deref(), Some("it"));
    assert_eq!(deleted_ids(&db).await, vec!["hr"]);
    let active: bool = db
        .scalar("SELECT bool_and(is_active) FROM departments")
        .await;
    assert!(active);
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn every_kind_syncs_through_the_binary_and_backfill_is_only_for_windows() {
    let db = TestDb::new().await;
    let procurify = FakeProcurify::start().await.unwrap();
    procurify.put(1, "Purchasing", 1, true);
    let snapbooks = FakeSnapbooks::start(&[456]).await.unwrap();
    snapbooks.put(1, "Sales", 456, None);
    let data = FakeDataV1::start().await.unwrap();
    data.put("x", None, "HR");
    let token = format!("token = \"{}\"", snapbooks::TOKEN);
    let sources = [
        procurify_source(&procurify, ""),
        snapbooks_source(&snapbooks, &token, ""),
        data_v1_source(&data, ""),
    ]
    .concat();
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, config(&db.url, &sources)).unwrap();
    let path = file.to_str().unwrap();

    let output = run_binary(&["--config", path, "sync"], &[]).await;
    let backfill = run_binary(
        &[
            "--config",
            path,
            "sync",
            "--source",
            "proc",
            "--backfill",
            "--from",
            "2020-01-01T00:00:00Z",
        ],
        &[],
    )
    .await;
    std::fs::remove_file(&file).unwrap();

    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let per_source: Vec<(String, i64)> =
        sqlx::query_as("SELECT source, count(*) FROM departments GROUP BY source ORDER BY source")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        per_source,
        vec![
            ("hr".to_owned(), 1),
            ("proc".to_owned(), 1),
            ("snap".to_owned(), 1)
        ]
    );
    assert_eq!(
        backfill.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&backfill.stderr)
    );
    let state = db.store.load_state("proc").await.unwrap();
    assert_eq!(state.listing, None);
}

#[tokio::test]
async fn a_resumed_listing_whose_next_page_is_gone_starts_again() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=20 {
        fake.put(id, &format!("Department {id}"), 1, true);
    }
    let source = procurify_source(&fake, "page_size = 5\nmax_attempts = 1");
    // Token, pages 1 to 3, then page 4 fails: the listing stops with page 4 to read.
    fake.shared.fail_request(5, 503);
    sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();
    let rows: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(rows, 15);

    // Before the next pass, half the departments go: page 4 is now past the end (404).
    for id in 11..=20 {
        fake.remove(id);
    }
    let report = sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    assert_eq!(
        report.totals.counts.deleted, 5,
        "11 to 15 were stored and are gone"
    );
    assert_eq!(live(&db, "proc").await, sorted_by_id(fake.truth()));
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn a_shift_that_keeps_the_count_never_deletes_a_present_department() {
    let (db, fake, source) = procurify_synced(12, "page_size = 4").await;

    // While page 2 is read, 1 goes and 13 comes: the total stays 12, every department
    // after 1 shifts back a place, and page 2 never shows 5. One listing cannot tell;
    // the listing that confirms the deletions can.
    let changing = fake.clone();
    let start = fake.shared.requests();
    fake.shared.on_request(move |n| {
        if n == start + 3 {
            changing.remove(1);
            changing.put(13, "Department 13", 1, true);
        }
    });
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();

    // 5 was missed by the first listing only: it stays. 1 was seen by the first listing
    // before it went, so its deletion waits for the next pass.
    assert!(deleted_ids(&db).await.is_empty());
    sync(&db, &source, PassRequest::INCREMENTAL).await.unwrap();
    assert_eq!(deleted_ids(&db).await, vec!["1"]);
    assert_eq!(live(&db, "proc").await, sorted_by_id(fake.truth()));
    fake.shared.assert_no_violations();
}

#[tokio::test]
async fn departments_the_listing_adds_do_not_dilute_the_guard() {
    let (db, fake, source) = procurify_synced(10, "").await;
    // Every id replaced by another (a wrong tenant behind the same URL, say).
    for id in 1..=10 {
        fake.remove(id);
        fake.put(id + 10, "Someone else's", 1, true);
    }

    let error = sync(&db, &source, PassRequest::INCREMENTAL)
        .await
        .unwrap_err();

    assert!(error.contains("10 of 10"), "{error}");
    assert!(deleted_ids(&db).await.is_empty());
}

#[tokio::test]
async fn a_token_is_renewed_before_it_expires() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=12 {
        fake.put(id, &format!("Department {id}"), 1, true);
    }
    // Tokens live 2 s; twelve pages at 300 ms outlive two of them.
    fake.set_token_lifetime(2);
    fake.shared.set_delay(std::time::Duration::from_millis(300));

    let report = sync(
        &db,
        &procurify_source(&fake, "page_size = 1"),
        PassRequest::INCREMENTAL,
    )
    .await
    .unwrap();

    assert_eq!(report.totals.counts.inserted, 12);
    assert!(
        fake.token_requests() >= 2,
        "{} tokens",
        fake.token_requests()
    );
    assert_eq!(
        fake.expired_rejections(),
        0,
        "a token was used after it expired"
    );
    fake.shared.assert_no_violations();
}
