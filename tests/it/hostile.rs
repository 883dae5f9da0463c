//! Upstreams and infrastructure that misbehave in ways other than "down": what they send
//! must stay bounded and harmless, and what fails must say so honestly.

use axum::http::StatusCode;
use axum::routing::post;
use serde_json::json;

use crate::helpers::{TestDb, mews_config, run_binary, stderr};

/// No line of `output` starts with what the vendor tried to forge, and no escape character
/// reached it.
fn assert_harmless(output: &str) {
    assert!(
        !output.contains('\u{1b}'),
        "an escape reached the output: {output}"
    );
    assert!(
        !output.contains('\u{202e}'),
        "a bidi override reached the output: {output}"
    );
    assert!(
        !output
            .lines()
            .any(|line| line.trim_start().starts_with("FORGED")),
        "a vendor forged a line: {output}"
    );
}

#[tokio::test]
async fn vendor_text_never_reaches_a_terminal_or_a_log_line_raw() {
    let db = TestDb::new().await;
    let hostile =
        "\u{1b}[2J\u{1b}[31mpwned\nFORGED 2026-01-01T00:00:00Z ERROR a line of its own\u{202e}";
    let router = axum::Router::new().route(
        deptsync::fakes::mews::PATH,
        post(move || async move {
            (
                StatusCode::FORBIDDEN,
                axum::Json(json!({ "Message": hostile, "RequestId": "req\nFORGED id" })),
            )
        }),
    );
    let base_url = deptsync::fakes::serve(router).await.unwrap();
    let toml = mews_config(&db.url, "mews", &base_url, "max_attempts = 1");
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, &toml).unwrap();
    let config = file.to_str().unwrap();

    let sync = run_binary(&["sync", "--config", config], &[]).await;
    let status = run_binary(&["status", "--config", config], &[]).await;
    std::fs::remove_file(&file).unwrap();

    assert_eq!(sync.status.code(), Some(1), "{}", stderr(&sync));
    assert!(stderr(&sync).contains("pwned"), "{}", stderr(&sync));
    assert_harmless(&stderr(&sync));
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("403"), "{table}");
    assert_harmless(&table);
}

#[tokio::test]
async fn a_retry_after_holds_back_requests_already_waiting_for_their_turn() {
    let db = TestDb::new().await;
    let fake = deptsync::fakes::mews::FakeMews::start().await.unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    fake.generate(40, 1, start, start + chrono::Duration::days(365));
    // Four windows read at once, each request waiting its turn in a budget of one every
    // 300 ms; the third request gets a 429 with Retry-After: 1 while the other windows'
    // next requests wait for their turns.
    fake.shared.inject(
        3,
        deptsync::fakes::Fault::TooManyRequests {
            retry_after: Some(1),
        },
    );
    let toml = mews_config(
        &db.url,
        "mews",
        &fake.base_url,
        "start = \"2024-01-01T00:00:00Z\"\npage_size = 5\nconcurrent_windows = 4\n\
         rate_limit = \"10/3s\"",
    );
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, &toml).unwrap();

    let sync = run_binary(&["sync", "--config", file.to_str().unwrap()], &[]).await;
    std::fs::remove_file(&file).unwrap();

    assert_eq!(sync.status.code(), Some(0), "{}", stderr(&sync));
    fake.assert_no_violations();
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(stored, 40);
}

/// Raw deflate of `input` by a fresh compressor, ending with `flush`: a segment that
/// refers to nothing before it, so segments can be put one after another.
fn deflate(input: &[u8], flush: flate2::FlushCompress) -> Vec<u8> {
    let mut compress = flate2::Compress::new(flate2::Compression::fast(), false);
    let mut out = Vec::new();
    let mut rest = input;
    loop {
        out.reserve(64 * 1024);
        let before = compress.total_in();
        compress.compress_vec(rest, &mut out, flush).unwrap();
        rest = &rest[(compress.total_in() - before) as usize..];
        if rest.is_empty() && out.len() < out.capacity() {
            return out;
        }
    }
}

/// A gzip body that expands to `prefix`, `mib` MiB of the letter a, then `suffix`, in a
/// few kilobytes a MiB on the wire. Its trailer's checksum is not computed: a reader that
/// keeps to a bound never gets that far.
fn gzip_bomb(prefix: &str, mib: usize, suffix: &str) -> Vec<u8> {
    let mut body = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    body.extend(deflate(prefix.as_bytes(), flate2::FlushCompress::Full));
    let block = deflate(&vec![b'a'; 1024 * 1024], flate2::FlushCompress::Full);
    for _ in 0..mib {
        body.extend_from_slice(&block);
    }
    body.extend(deflate(suffix.as_bytes(), flate2::FlushCompress::Finish));
    body.extend_from_slice(&[0; 8]);
    body
}

/// Runs the binary with `args` and returns its exit code, its stderr and its peak
/// resident memory in KiB, read by `wait4` from outside the process.
// The child is reaped by the wait4 below, which is what reads its peak memory.
#[allow(clippy::zombie_processes)]
async fn run_binary_measured(args: &[&str]) -> (Option<i32>, String, u64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_deptsync"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    let (status, peak_kib) = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our child, not waited for by anything else.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(waited, pid, "wait4 failed");
        (status, usage.ru_maxrss as u64)
    })
    .await
    .unwrap();
    let code = std::process::ExitStatus::from_raw(status).code();
    (code, reader.join().unwrap(), peak_kib)
}

#[tokio::test]
async fn a_gzip_bomb_fails_the_pass_within_the_body_bound() {
    let db = TestDb::new().await;
    let prefix = r#"{"Departments":[{"Id":"98776d06-60e4-495f-82f1-95ab2f644d63","EnterpriseId":"3fa85f64-5717-4562-b3fc-2c963f66afa6","IsActive":true,"Name":""#;
    let suffix = r#"","CreatedUtc":"2024-01-01T00:00:00Z","UpdatedUtc":"2024-01-01T00:00:00Z"}],"Cursor":null}"#;
    // 512 MiB of JSON in a few megabytes on the wire.
    let bomb = axum::body::Bytes::from(gzip_bomb(prefix, 512, suffix));
    assert!(
        bomb.len() < 8 * 1024 * 1024,
        "{} bytes on the wire",
        bomb.len()
    );
    let router = axum::Router::new().route(
        deptsync::fakes::mews::PATH,
        post(move || {
            let bomb = bomb.clone();
            async move {
                (
                    [
                        ("Content-Type", "application/json"),
                        ("Content-Encoding", "gzip"),
                    ],
                    bomb,
                )
            }
        }),
    );
    let base_url = deptsync::fakes::serve(router).await.unwrap();
    let toml = mews_config(
        &db.url,
        "mews",
        &base_url,
        "max_response_bytes = 16777216\nmax_attempts = 1\nconcurrent_windows = 1",
    );
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, &toml).unwrap();

    let (code, stderr, peak_kib) =
        run_binary_measured(&["sync", "--config", file.to_str().unwrap()]).await;
    std::fs::remove_file(&file).unwrap();

    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        peak_kib < 128 * 1024,
        "memory stays near the 16 MiB limit, not the body's 512 MiB: peak {} MiB",
        peak_kib / 1024
    );
    assert!(
        stderr.contains("mews") && stderr.contains("max_response_bytes = 16777216"),
        "the error names the source and the limit: {stderr}"
    );
    let stored: i64 = db.scalar("SELECT count(*) FROM departments").await;
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_permanent_database_error_ends_run_at_once_with_the_cause_on_one_line() {
    // A role the server does not have: no wait will mend that.
    let mut url = reqwest::Url::parse(&crate::helpers::server_url()).unwrap();
    url.set_username("deptsync_no_such_role").unwrap();
    url.set_password(None).unwrap();
    url.set_path("deptsync_no_such_database");
    let fake = deptsync::fakes::mews::FakeMews::start().await.unwrap();
    let toml = mews_config(url.as_str(), "mews", &fake.base_url, "");
    let file = std::env::temp_dir().join(format!("deptsync-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, &toml).unwrap();

    let started = std::time::Instant::now();
    let run = run_binary(&["run", "--config", file.to_str().unwrap()], &[]).await;
    std::fs::remove_file(&file).unwrap();

    let stderr = stderr(&run);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "run waited {:?} for a database that cannot be reached: {stderr}",
        started.elapsed()
    );
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("deptsync_no_such_role"),
        "the cause is named: {stderr}"
    );
    assert!(fake.requests().is_empty());
}

/// A store at `url` whose statements end after 1 s, and a Mews source of 300 departments
/// over 30 pages of 20 ms each: a pass long enough to interfere with.
async fn slow_pass(
    db: &TestDb,
    url: &str,
) -> (
    deptsync::store::AnyStore,
    deptsync::fakes::mews::FakeMews,
    deptsync::sources::SourceSettings,
    deptsync::sources::Connector,
) {
    use std::time::Duration;
    let store = deptsync::store::AnyStore::connect_with(
        &url.to_owned().into(),
        deptsync::store::IfMissing::Fail,
        &deptsync::store::Limits {
            statement_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let fake = deptsync::fakes::mews::FakeMews::start().await.unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    fake.generate(300, 1, start, start + chrono::Duration::days(60));
    fake.shared.set_delay(Duration::from_millis(20));
    let toml = mews_config(&db.url, "mews", &fake.base_url, "page_size = 10");
    let (settings, source) = crate::helpers::connector(&toml);
    (store, fake, settings, source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_without_a_word_ends_the_pass_within_its_bound() {
    use deptsync::engine::{PassRequest, error_chain, run_pass};
    use std::time::{Duration, Instant};

    let db = TestDb::new().await;
    let proxy = crate::proxy::PgProxy::start("127.0.0.1:5432".to_owned()).await;
    // Statements end after 1 s, so every call is given up after 1.5 s.
    let (store, _fake, settings, source) = slow_pass(&db, &proxy.url_for(&db.url)).await;

    let proxy = std::sync::Arc::new(proxy);
    let frozen_at = {
        let (pool, proxy) = (db.pool().clone(), proxy.clone());
        tokio::spawn(async move {
            crate::helpers::stored_at_least(&pool, 50).await;
            proxy.freeze();
            Instant::now()
        })
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let pass = run_pass(
        settings.name.as_str(),
        &source,
        &store,
        PassRequest::INCREMENTAL,
        &cancel,
    );
    let result = tokio::time::timeout(Duration::from_secs(60), pass)
        .await
        .expect("the pass hung on a connection that never answers");
    let frozen_at = frozen_at.await.unwrap();

    let error = error_chain(&result.unwrap_err());
    assert!(error.contains("did not answer within"), "{error}");
    // The page's commit, the run's record and the unlock: three calls of 1.5 s at most.
    let took = frozen_at.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the pass took {took:?} to end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_blocked_on_a_lock_ends_at_the_statement_timeout() {
    use deptsync::engine::{PassRequest, error_chain, run_pass};
    use std::time::Duration;

    let db = TestDb::new().await;
    let (store, _fake, settings, source) = slow_pass(&db, &db.url).await;

    // Another session takes the window ledger's rows and keeps them.
    let pool = db.pool().clone();
    let locker = tokio::spawn(async move {
        crate::helpers::stored_at_least(&pool, 50).await;
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT * FROM sync_windows FOR UPDATE")
            .execute(&mut *tx)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        run_pass(
            settings.name.as_str(),
            &source,
            &store,
            PassRequest::INCREMENTAL,
            &cancel,
        ),
    )
    .await
    .expect("the pass waited on the lock");
    locker.abort();

    let error = error_chain(&result.unwrap_err());
    assert!(error.contains("statement timeout"), "{error}");
    let status: String = db.scalar("SELECT status FROM sync_runs").await;
    assert_eq!(status, "failed", "the failure is recorded");
}

/// The one `error:` line of a run of the binary.
fn error_line(output: &std::process::Output) -> String {
    let text = stderr(output);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    errors[0].to_owned()
}

#[tokio::test]
async fn database_errors_say_the_cause_once_and_what_to_check() {
    let dir = crate::helpers::TempDir::new();
    let config = dir.join("deptsync.toml");
    let run = |url: String| {
        let config = config.clone();
        async move {
            std::fs::write(&config, format!("[database]\nurl = \"{url}\"\n")).unwrap();
            let started = std::time::Instant::now();
            let output = run_binary(&["migrate", "--config", config.to_str().unwrap()], &[]).await;
            (output, started.elapsed())
        }
    };

    // Nothing listens there: said at once, not after a pool's timeout.
    let (refused, took) = run("postgres://postgres@127.0.0.1:1/deptsync".to_owned()).await;
    let line = error_line(&refused);
    assert!(
        took < std::time::Duration::from_secs(5),
        "took {took:?}: {line}"
    );
    assert!(line.contains("nothing listens at 127.0.0.1:1"), "{line}");

    // A role that does not exist: the cause once.
    let mut url = reqwest::Url::parse(&crate::helpers::server_url()).unwrap();
    url.set_username("deptsync_no_such_role").unwrap();
    let (missing_role, _) = run(url.to_string()).await;
    let line = error_line(&missing_role);
    assert_eq!(line.matches("does not exist").count(), 1, "{line}");

    // A database that does not exist, for a role that may not create one.
    let role = format!("deptsync_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&crate::helpers::server_url())
            .await
            .unwrap();
    sqlx::query(&format!("CREATE ROLE {role} LOGIN NOCREATEDB"))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&crate::helpers::server_url()).unwrap();
    url.set_username(&role).unwrap();
    url.set_path(&format!("{role}_db"));
    let (cannot_create, _) = run(url.to_string()).await;
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let line = error_line(&cannot_create);
    assert!(line.contains("may not create it"), "{line}");

    // An SQLite file in a directory that does not exist: the directory is named.
    let file = dir.join("no-such-directory").join("deptsync.db");
    let (no_directory, _) = run(format!("sqlite://{}", file.display())).await;
    let line = error_line(&no_directory);
    assert!(
        line.contains("no-such-directory") && line.contains("does not exist"),
        "{line}"
    );
}
