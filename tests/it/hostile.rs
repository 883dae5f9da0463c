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
