//! deploy/postgres-setup.sql as an operator runs it, and an analyst granted the reader
//! role running the README's queries.

use std::process::Command;

use crate::helpers::{readme_sql_blocks, run_binary, server_url, stderr};

/// Runs `psql` on `database` of the test server as `user`, with `args`; its output.
fn psql(user: &str, database: &str, args: &[&str]) -> std::process::Output {
    try_psql(user, database, args)
        .expect("psql is installed with PostgreSQL (scripts/ensure-postgres)")
}

/// [`psql`], or why it could not run.
fn try_psql(user: &str, database: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    let mut url = reqwest::Url::parse(&server_url()).unwrap();
    url.set_username(user).unwrap();
    url.set_password(None).unwrap();
    url.set_path(database);
    Command::new("psql")
        .arg(url.as_str())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .output()
}

#[tokio::test]
async fn an_analyst_granted_the_reader_role_runs_every_query_the_readme_shows() {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let (owner, reader, database, analyst) = (
        format!("deptsync_owner_{suffix}"),
        format!("deptsync_reader_{suffix}"),
        format!("deptsync_db_{suffix}"),
        format!("analyst_{suffix}"),
    );
    // Whatever happens, the test's database and roles go (roles are the server's, not
    // the database's: another test run must not find them).
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            // One statement a call: one failing leaves the others to run.
            for statement in &self.0 {
                let _ = try_psql("postgres", "postgres", &["-c", statement]);
            }
        }
    }
    let _cleanup = Cleanup(vec![
        format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
        format!("DROP ROLE IF EXISTS {analyst}, {reader}, {owner}"),
    ]);
    let setup = |extra: &[&str]| {
        let owner_var = format!("owner={owner}");
        let reader_var = format!("reader={reader}");
        let database_var = format!("database={database}");
        let mut args = vec!["-v", &owner_var, "-v", &reader_var, "-v", &database_var];
        args.extend_from_slice(extra);
        args.extend(["-f", "deploy/postgres-setup.sql"]);
        psql("postgres", "postgres", &args)
    };

    // Without a password it stops at once, having done nothing.
    let refused = setup(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("password"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Twice: it runs again safely.
    for _ in 0..2 {
        let done = setup(&["-v", "password=choose-one"]);
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    // deptsync creates its tables as the owner.
    let mut url = reqwest::Url::parse(&server_url()).unwrap();
    url.set_username(&owner).unwrap();
    url.set_password(Some("choose-one")).unwrap();
    url.set_path(&database);
    let config = std::env::temp_dir().join(format!("deptsync-{suffix}.toml"));
    std::fs::write(&config, format!("[database]\nurl = \"{url}\"\n")).unwrap();
    let migrated = run_binary(&["migrate", "--config", config.to_str().unwrap()], &[]).await;
    std::fs::remove_file(&config).unwrap();
    assert!(migrated.status.success(), "{}", stderr(&migrated));

    // An analyst, as the README says to grant it.
    let granted = psql(
        "postgres",
        "postgres",
        &[
            "-c",
            &format!("CREATE ROLE {analyst} LOGIN IN ROLE {reader}"),
        ],
    );
    assert!(
        granted.status.success(),
        "{}",
        String::from_utf8_lossy(&granted.stderr)
    );
    let blocks = readme_sql_blocks();
    assert!(!blocks.is_empty());
    let mut failures = Vec::new();
    for block in &blocks {
        let ran = psql(&analyst, &database, &["-c", block]);
        if !ran.status.success() {
            failures.push(format!("{block}\n{}", String::from_utf8_lossy(&ran.stderr)));
        }
    }
    // The analyst reads, and may not write.
    let wrote = psql(&analyst, &database, &["-c", "DELETE FROM departments"]);

    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
    assert!(!wrote.status.success(), "the reader role may not write");
}
