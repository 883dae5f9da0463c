//! Things going wrong: faulty upstreams, a killed process, a database that goes away,
//! and secrets that must stay out of every line printed meanwhile.

use std::time::Duration;

use deptsync::engine::{PassRequest, error_chain, run_pass};
use deptsync::fakes::Fault;
use deptsync::fakes::data_v1::{self, FakeDataV1};
use deptsync::fakes::mews::FakeMews;
use deptsync::fakes::procurify::{self, FakeProcurify};
use deptsync::fakes::snapbooks::{self, FakeSnapbooks};
use deptsync::store::postgres::{IfMissing, PgStore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestDb, at, config, connector, mews_config, run_binary};
use crate::proxy::PgProxy;

/// Every fault the vendors' APIs are known to produce; 408 only where it is retried.
const STORM: &[Fault] = &[
    Fault::TooManyRequests {
        retry_after: Some(1),
    },
    Fault::TooManyRequests { retry_after: None },
    Fault::Status(500),
    Fault::Status(503),
    Fault::Status(408),
    Fault::Dropped,
    Fault::Truncated,
    Fault::InvalidJson,
];

/// Retries quick enough for a test (Retry-After still holds them back), and enough of
/// them that a pass gets through a storm where three requests in ten fail.
const QUICK_RETRIES: &str = "max_attempts = 7\nmax_backoff = \"20ms\"";

/// Runs passes of the one source in `toml` until one succeeds. The retries must carry
/// it: two passes at most (without retries every pass would fail within a few requests).
async fn sync_until_it_succeeds(db: &TestDb, toml: &str) -> usize {
    let (settings, source) = connector(toml);
    for pass in 1..=2 {
        let result = run_pass(
            settings.name.as_str(),
            &source,
            &db.store,
            PassRequest::INCREMENTAL,
            &CancellationToken::new(),
        )
        .await;
        match result {
            Ok(_) => return pass,
            Err(e) => eprintln!(
                "pass {pass} failed (expected in a storm): {}",
                error_chain(&e)
            ),
        }
    }
    panic!("two passes through the storm and none succeeded: the retries did not carry it");
}

/// One pass of the one source in `toml`.
async fn pass(
    db: &TestDb,
    toml: &str,
) -> Result<deptsync::engine::PassReport, deptsync::engine::PassError> {
    let (settings, source) = connector(toml);
    run_pass(
        settings.name.as_str(),
        &source,
        &db.store,
        PassRequest::INCREMENTAL,
        &CancellationToken::new(),
    )
    .await
}

/// (id, name) of the live rows of the table.
async fn live_names(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as("SELECT external_id, name FROM departments WHERE deleted_at IS NULL ORDER BY 1")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mews_converges_through_a_storm_of_faults() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(400, 2, at(2019, 1, 1), at(2021, 1, 1));
    fake.shared.chaos(7, 0.3, STORM);
    fake.shared.inject(
        2,
        Fault::TooManyRequests {
            retry_after: Some(1),
        },
    );
    let toml = mews_config(
        &db.url,
        "mews",
        &fake.base_url,
        &format!("page_size = 20\n{QUICK_RETRIES}"),
    );

    sync_until_it_succeeds(&db, &toml).await;

    fake.assert_no_violations();
    let mut expected: Vec<(String, String)> = fake
        .departments()
        .iter()
        .map(|d| (d.id.to_string(), d.name().to_owned()))
        .collect();
    expected.sort();
    assert_eq!(live_names(&db).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procurify_converges_through_a_storm_of_faults() {
    let db = TestDb::new().await;
    let fake = FakeProcurify::start().await.unwrap();
    for id in 1..=120 {
        fake.put(id, &format!("Department {id}"), 1, true);
    }
    fake.shared.chaos(11, 0.3, STORM);
    fake.shared.inject(
        3,
        Fault::TooManyRequests {
            retry_after: Some(1),
        },
    );
    let source = format!(
        "[[sources]]\nname = \"proc\"\nkind = \"procurify\"\nbase_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\npage_size = 10\n{QUICK_RETRIES}\n",
        fake.base_url,
        procurify::CLIENT_ID,
        procurify::CLIENT_SECRET
    );

    sync_until_it_succeeds(&db, &config(&db.url, &source)).await;

    fake.shared.assert_no_violations();
    let expected: Vec<(String, String)> = {
        let mut rows: Vec<_> = fake.truth().into_iter().map(|r| (r.0, r.2)).collect();
        rows.sort();
        rows
    };
    assert_eq!(live_names(&db).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapbooks_converges_through_a_storm_of_faults() {
    let db = TestDb::new().await;
    let fake = FakeSnapbooks::start(&[1, 2]).await.unwrap();
    for id in 1..=90 {
        fake.put(
            id,
            &format!("Department {id}"),
            id % 2 + 1,
            Some(id % 4 != 0),
        );
    }
    fake.shared.chaos(13, 0.3, STORM);
    fake.shared.inject(
        2,
        Fault::TooManyRequests {
            retry_after: Some(1),
        },
    );
    let source = format!(
        "[[sources]]\nname = \"snap\"\nkind = \"snapbooks\"\nbase_url = \"{}\"\ntoken = \"{}\"\nclient_account_ids = [1, 2]\npage_size = 10\n{QUICK_RETRIES}\n",
        fake.base_url,
        snapbooks::TOKEN
    );

    sync_until_it_succeeds(&db, &config(&db.url, &source)).await;

    fake.shared.assert_no_violations();
    let mut expected: Vec<(String, String)> =
        fake.truth().into_iter().map(|r| (r.0, r.2)).collect();
    expected.sort();
    assert_eq!(live_names(&db).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_v1_converges_through_a_storm_of_faults() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    for i in 0..50 {
        fake.put(&format!("d{i:02}"), None, &format!("Department {i}"));
    }
    fake.shared.chaos(17, 0.3, STORM);
    fake.shared.inject(
        1,
        Fault::TooManyRequests {
            retry_after: Some(1),
        },
    );
    let source = format!(
        "[[sources]]\nname = \"hr\"\nkind = \"data_v1\"\nbase_url = \"{}\"\ntoken = \"{}\"\n{QUICK_RETRIES}\n",
        fake.base_url,
        data_v1::TOKEN
    );

    // One request a pass: its retries alone must carry the first pass.
    let passes = sync_until_it_succeeds(&db, &config(&db.url, &source)).await;
    assert_eq!(passes, 1);

    fake.shared.assert_no_violations();
    let expected: Vec<(String, String)> = (0..50)
        .map(|i| (format!("d{i:02}"), format!("Department {i}")))
        .collect();
    assert_eq!(live_names(&db).await, expected);
}

#[tokio::test]
async fn a_408_from_mews_halves_the_window_and_goes_on() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(60, 1, at(2019, 1, 1), at(2019, 4, 1));
    fake.fail_request(1, 408);
    // One window at a time, so that the first request is the window with the data.
    let toml = mews_config(&db.url, "mews", &fake.base_url, "concurrent_windows = 1");

    pass(&db, &toml).await.unwrap();

    let requests = fake.requests();
    assert_eq!(
        (requests[0].status, requests[0].window.unwrap().end),
        (408, at(2019, 4, 1))
    );
    let next = requests[1].window.unwrap();
    assert_eq!(next.start, at(2019, 1, 1));
    assert!(
        next.end < at(2019, 4, 1),
        "the 408'd window was halved: {next}"
    );
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(stored, 60);
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_cursor_that_never_ends_fails_the_window_instead_of_looping() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(50, 1, at(2019, 1, 1), at(2019, 2, 1));
    fake.loop_cursor();
    let toml = mews_config(&db.url, "mews", &fake.base_url, "page_size = 10");

    let error = pass(&db, &toml).await.map(|_| ()).unwrap_err();

    let message = error_chain(&error);
    assert!(message.contains("never end"), "{message}");
    assert!(
        message.contains("request id req-"),
        "the vendor's request id is named: {message}"
    );
    let looping = fake
        .requests()
        .iter()
        .filter(|r| r.window.is_some_and(|w| w.start == at(2019, 1, 1)))
        .count();
    assert!(looping < 5, "{looping} requests for the looping window");
}

#[tokio::test]
async fn the_rate_budget_spaces_requests_out() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(60, 1, at(2019, 1, 1), at(2019, 2, 1));
    // A credential of its own: the budget belongs to the credential, and the other tests
    // share theirs.
    fake.set_access_token("a-token-of-its-own");
    let toml = mews_config(
        &db.url,
        "mews",
        &fake.base_url,
        "page_size = 5\nrate_limit = \"4/1s\"",
    )
    .replace(deptsync::fakes::mews::ACCESS_TOKEN, "a-token-of-its-own");

    pass(&db, &toml).await.unwrap();

    assert!(fake.requests().len() >= 12);
    // At most the budget of 4 in any second, with room for network jitter at the edges
    // (without the budget, the whole pass would fit in one second).
    let busiest = fake.shared.busiest(Duration::from_secs(1));
    assert!(busiest <= 6, "{busiest} requests within one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_it_resumes_and_ends_with_the_upstream_truth() {
    let from = at(2020, 1, 1);
    let count = 1_500;
    // One clean sync first: how many pages a sync takes.
    let clean_pages = {
        let db = TestDb::new().await;
        let fake = FakeMews::start().await.unwrap();
        fake.generate(count, 3, from, from + chrono::Duration::days(200));
        let toml = mews_config(&db.url, "mews", &fake.base_url, "page_size = 25");
        pass(&db, &toml).await.unwrap();
        fake.requests()
            .iter()
            .filter(|r| r.status / 100 == 2)
            .count()
    };

    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(count, 3, from, from + chrono::Duration::days(200));
    // Slow enough that every kill lands mid-pass, with all three windows read at once.
    fake.shared.set_delay(Duration::from_millis(100));
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", Uuid::new_v4()));
    // A killed holder's lease lapses after its time to live: a second here.
    std::fs::write(
        &file,
        mews_config(&db.url, "mews", &fake.base_url, "page_size = 25")
            + "\n[daemon]\nlease_ttl = \"1s\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();

    let mut rng = fastrand::Rng::with_seed(2026);
    let kills = 4;
    for _ in 0..kills {
        // The last killed holder's lease has lapsed.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_deptsync"))
            .args(["sync", "--config", path])
            .env_remove("DATABASE_URL")
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.u64(300..900))).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
    }
    // The killed holder's lease lapses a second after its last renewal: until then a
    // sync is told the source is busy.
    let mut output = run_binary(&["sync", "--config", path], &[]).await;
    for _ in 0..10 {
        if !String::from_utf8_lossy(&output.stderr).contains("another process is syncing") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        output = run_binary(&["sync", "--config", path], &[]).await;
    }
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    fake.assert_no_violations();
    let mut expected: Vec<(String, String)> = fake
        .departments()
        .iter()
        .map(|d| (d.id.to_string(), d.name().to_owned()))
        .collect();
    expected.sort();
    assert_eq!(live_names(&db).await, expected);
    let pages = fake
        .requests()
        .iter()
        .filter(|r| r.status / 100 == 2)
        .count();
    // A kill loses at most the one page each window had in flight (three windows).
    assert!(
        pages <= clean_pages + kills * 3,
        "{pages} pages over all attempts, {clean_pages} for a clean sync"
    );
    let abandoned: i64 = db
        .scalar("SELECT count(*) FROM sync_runs WHERE error LIKE 'abandoned%'")
        .await;
    assert!(abandoned >= 1, "killed runs are recorded as abandoned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_mid_pass_fails_it_cleanly_and_the_next_completes() {
    let db = TestDb::new().await;
    let proxy = PgProxy::start("127.0.0.1:5432".to_owned()).await;
    let store = PgStore::connect(&proxy.url_for(&db.url).into(), IfMissing::Fail)
        .await
        .unwrap();
    let fake = FakeMews::start().await.unwrap();
    fake.generate(300, 1, at(2020, 1, 1), at(2020, 3, 1));
    fake.shared.set_delay(Duration::from_millis(20));
    let toml = mews_config(&db.url, "mews", &fake.base_url, "page_size = 10");
    let (settings, source) = connector(&toml);
    let name = settings.name.as_str();

    let cutter = {
        let pool = db.pool().clone();
        let proxy_down = std::sync::Arc::new(proxy);
        let proxy = proxy_down.clone();
        tokio::spawn(async move {
            crate::helpers::stored_at_least(&pool, 50).await;
            // Away for a second: the pass fails, and its failure is recorded once the
            // database is back.
            proxy.down();
            tokio::time::sleep(Duration::from_secs(1)).await;
            proxy.up();
        });
        proxy_down
    };
    let failed = run_pass(
        name,
        &source,
        &store,
        PassRequest::INCREMENTAL,
        &CancellationToken::new(),
    )
    .await;
    assert!(
        failed.is_err(),
        "the pass should fail while the database is away"
    );
    let kept: i64 = db.scalar("SELECT count(*) FROM departments").await;
    let (status, error): (String, String) = sqlx::query_as("SELECT status, error FROM sync_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(status, "failed");
    assert!(
        !error.contains("abandoned"),
        "the pass recorded its own failure: {error}"
    );

    cutter.up();
    run_pass(
        name,
        &source,
        &store,
        PassRequest::INCREMENTAL,
        &CancellationToken::new(),
    )
    .await
    .unwrap();

    assert!(kept >= 50);
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(stored, 300, "nothing lost");
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM sync_runs ORDER BY started_at")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        statuses,
        vec!["failed", "succeeded"],
        "the interrupted run is closed, not left running"
    );
    fake.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output_even_at_trace_level() {
    let db = TestDb::new().await;
    let fake = FakeMews::start().await.unwrap();
    fake.generate(5, 1, at(2020, 1, 1), at(2020, 2, 1));
    let password = "pw-never-printed-7f3a";
    // Trust authentication ignores the password, so the URL still works.
    let mut url = reqwest::Url::parse(&db.url).unwrap();
    url.set_password(Some(password)).unwrap();
    let url = url.to_string();
    let secrets = [
        password,
        deptsync::fakes::mews::CLIENT_TOKEN,
        deptsync::fakes::mews::ACCESS_TOKEN,
        "a-slow-secret-token",
        "a-refused-client-secret",
    ];
    let trace = [("RUST_LOG", "trace")];
    let write = |text: String| {
        let file = std::env::temp_dir().join(format!("deptsync-{}.toml", Uuid::new_v4()));
        std::fs::write(&file, text).unwrap();
        file
    };

    // A 401.
    fake.set_access_token("not-the-configured-one");
    let unauthorized = write(mews_config(&url, "mews", &fake.base_url, ""));
    // A timeout.
    let slow = FakeDataV1::start().await.unwrap();
    slow.shared.set_delay(Duration::from_secs(3));
    let timeout = write(config(
        &url,
        &format!(
            "[[sources]]\nname = \"slow\"\nkind = \"data_v1\"\nbase_url = \"{}\"\ntoken = \"a-slow-secret-token\"\nrequest_timeout = \"1s\"\nmax_attempts = 2\nmax_backoff = \"10ms\"\n",
            slow.base_url
        ),
    ));
    // A config error, in a file that holds the secrets.
    let bad = write(mews_config(&url, "mews", &fake.base_url, "page_size = 0"));
    // A TOML syntax error on the very line of a secret.
    let broken = write(mews_config(&url, "mews", &fake.base_url, "").replace(
        &format!("\"{}\"", deptsync::fakes::mews::ACCESS_TOKEN),
        &format!("\"{}", deptsync::fakes::mews::ACCESS_TOKEN),
    ));
    // A client secret refused by a token endpoint.
    let procurify = FakeProcurify::start().await.unwrap();
    let refused = write(config(
        &url,
        &format!(
            "[[sources]]\nname = \"proc\"\nkind = \"procurify\"\nbase_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"a-refused-client-secret\"\n",
            procurify.base_url,
            procurify::CLIENT_ID
        ),
    ));

    let mut outputs = Vec::new();
    for (file, expected_exit) in [
        (&unauthorized, 1),
        (&timeout, 1),
        (&bad, 2),
        (&broken, 2),
        (&refused, 1),
    ] {
        let output = run_binary(&["sync", "--config", file.to_str().unwrap()], &trace).await;
        std::fs::remove_file(file).unwrap();
        assert_eq!(
            output.status.code(),
            Some(expected_exit),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(output);
    }
    let output = run_binary(
        &["check", "--config", "/nonexistent"],
        &[("RUST_LOG", "trace"), ("DATABASE_URL", &url)],
    )
    .await;
    outputs.push(output);

    for output in &outputs {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            text.contains("error"),
            "no error reported, so nothing proven: {text}"
        );
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
    }
    let all: String = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(all.contains("Invalid AccessToken."), "the 401 was reported");
    assert!(
        all.contains("gave up after 2 attempts"),
        "the timeout was reported"
    );
    assert!(all.contains("line"), "the syntax error names its line");
    assert!(
        all.contains("oauth/token"),
        "the refused secret was reported"
    );
}

#[tokio::test]
async fn a_nul_in_an_id_rejects_the_record_and_never_blocks_the_source() {
    let db = TestDb::new().await;
    let fake = FakeDataV1::start().await.unwrap();
    fake.put("good", None, "Fine");
    fake.put("bad\0id", None, "Unstorable");
    let source = format!(
        "[[sources]]\nname = \"hr\"\nkind = \"data_v1\"\nbase_url = \"{}\"\ntoken = \"{}\"\n",
        fake.base_url,
        data_v1::TOKEN
    );
    let (settings, connector) = connector(&config(&db.url, &source));

    for _ in 0..2 {
        let report = run_pass(
            settings.name.as_str(),
            &connector,
            &db.store,
            PassRequest::INCREMENTAL,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(report.totals.counts.rejected, 1);
    }
    assert_eq!(
        live_names(&db).await,
        vec![("good".to_owned(), "Fine".to_owned())]
    );
    let (id, times): (Option<String>, i64) =
        sqlx::query_as("SELECT external_id, times_seen FROM rejected_records")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((id.as_deref(), times), (Some("bad\\u0000id"), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_sharing_a_credential_share_its_budget() {
    let db = TestDb::new().await;
    let token = "a-token-two-sources-share";
    let mut fakes = Vec::new();
    let mut sources = Vec::new();
    for name in ["hotel-a", "hotel-b"] {
        let fake = FakeMews::start().await.unwrap();
        fake.generate(30, 1, at(2019, 1, 1), at(2019, 2, 1));
        fake.set_access_token(token);
        let toml = mews_config(
            &db.url,
            name,
            &fake.base_url,
            "page_size = 5\nrate_limit = \"8/1s\"",
        )
        .replace(deptsync::fakes::mews::ACCESS_TOKEN, token);
        sources.push(connector(&toml));
        fakes.push(fake);
    }

    let cancel = CancellationToken::new();
    let passes = sources.iter().map(|(settings, source)| {
        run_pass(
            settings.name.as_str(),
            source,
            &db.store,
            PassRequest::INCREMENTAL,
            &cancel,
        )
    });
    for result in futures_util::future::join_all(passes).await {
        result.unwrap();
    }

    let arrivals: Vec<_> = fakes
        .iter()
        .flat_map(|fake| fake.shared.arrivals())
        .collect();
    assert!(arrivals.len() >= 16);
    let busiest = deptsync::fakes::busiest(arrivals, Duration::from_secs(1));
    // One budget of 8 a second (with room for network jitter at the edges); two budgets
    // would let about 16 through.
    assert!(
        busiest <= 10,
        "{busiest} requests on one credential within one second"
    );
}
