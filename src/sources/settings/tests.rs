//! Whole config files: the config's own fields and each kind's, validated together.

use secrecy::ExposeSecret;

use super::SourceSettings;
use crate::config::{
    DEFAULT_DATABASE_URL, DEFAULT_LEASE_TTL, DEFAULT_MAX_CONCURRENT_PASSES,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_SCHEDULE, DEFAULT_SHUTDOWN_TIMEOUT,
};
use crate::sources::kinds::KindSettings;
use crate::store::DatabaseKind;

type Settings = crate::config::Settings<SourceSettings>;

mod basics {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const GOOD: &str = r#"
        [database]
        url = "postgres://deptsync:hunter2@127.0.0.1:5432/deptsync"

        [[sources]]
        name = "mews-main"
        kind = "mews"
        base_url = "https://api.mews-demo.com"
        client_token = "client-secret-token"
        access_token = "${MEWS_ACCESS}"
        start = "2019-01-01T00:00:00Z"
        lookback = "10m"
        page_size = 500
        enterprise_ids = ["3fa85f64-5717-4562-b3fc-2c963f66afa6"]
    "#;

    fn env(name: &str) -> Option<String> {
        (name == "MEWS_ACCESS").then(|| "access-from-env".to_owned())
    }

    fn error_of(toml: &str) -> String {
        match Settings::parse(toml, &env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_config_validates() {
        let settings = Settings::parse(GOOD, &env).unwrap();
        assert_eq!(settings.sources.len(), 1);
        let source = &settings.sources[0];
        assert_eq!(source.name.as_str(), "mews-main");
        assert_eq!(source.schedule.as_str(), DEFAULT_SCHEDULE);
        let KindSettings::Mews(mews) = &source.kind else {
            panic!("expected a mews source");
        };
        assert_eq!(mews.page_size, 500);
        assert_eq!(mews.lookback, std::time::Duration::from_secs(600));
        assert_eq!(mews.access_token.expose_secret(), "access-from-env");
        assert_eq!(
            mews.client,
            format!("deptsync {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn plain_http_is_refused_for_credentials_unless_loopback_or_allowed() {
        let with_url = |url: &str, extra: &str| {
            GOOD.replace("https://api.mews-demo.com", url)
                .replace("page_size = 500", &format!("page_size = 500\n{extra}"))
        };
        let error = error_of(&with_url("http://api.mews.com", ""));
        assert!(
            error.contains("field `base_url`") && error.contains("unencrypted"),
            "{error}"
        );
        for loopback in [
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:9",
        ] {
            Settings::parse(&with_url(loopback, ""), &env).unwrap();
        }
        Settings::parse(
            &with_url("http://api.mews.com", "allow_insecure_http = true"),
            &env,
        )
        .unwrap();
        let error = error_of(&with_url(
            "http://api.mews.com",
            "allow_insecure_http = \"maybe\"",
        ));
        assert!(error.contains("field `allow_insecure_http`"), "{error}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let settings = Settings::parse(GOOD, &env).unwrap();
        let debug = format!("{settings:?}");
        for secret in ["hunter2", "client-secret-token", "access-from-env"] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
        assert_eq!(
            settings.database.redacted_url(),
            "postgres://deptsync:***@127.0.0.1:5432/deptsync"
        );
    }

    #[test]
    fn database_url_from_the_environment_wins() {
        let env = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://other@db/x".to_owned()),
            "MEWS_ACCESS" => Some("a".to_owned()),
            _ => None,
        };
        let settings = Settings::parse(GOOD, &env).unwrap();
        assert_eq!(
            settings.database.url.expose_secret(),
            "postgres://other@db/x"
        );
    }

    #[test]
    fn unknown_fields_name_the_source_and_the_field() {
        let message = error_of(&GOOD.replace("page_size", "pagesize"));
        assert!(message.contains("source \"mews-main\""), "{message}");
        assert!(message.contains("`pagesize`"), "{message}");

        let message = error_of(&format!("{GOOD}\n[extra]\nx = 1\n"));
        assert!(message.contains("extra"), "{message}");
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let message = error_of(&GOOD.replace("page_size = 500", "page_size = 1001"));
        assert!(
            message.contains("source \"mews-main\": field `page_size`"),
            "{message}"
        );
        let message = error_of(&GOOD.replace("page_size = 500", "page_size = \"many\""));
        assert!(message.contains("`page_size`"), "{message}");
        let message = error_of(&GOOD.replace("2019-01-01T00:00:00Z", "yesterday"));
        assert!(message.contains("field `start`"), "{message}");
        let message = error_of(&GOOD.replace("\"10m\"", "\"soon\""));
        assert!(message.contains("field `lookback`"), "{message}");
        let message = error_of(&GOOD.replace("https://api.mews-demo.com", "ftp://x"));
        assert!(message.contains("field `base_url`"), "{message}");
        let message = error_of(&GOOD.replace("3fa85f64-5717-4562-b3fc-2c963f66afa6", "nope"));
        assert!(message.contains("field `enterprise_ids`"), "{message}");
    }

    #[test]
    fn missing_fields_and_env_are_named() {
        let message = error_of(&GOOD.replace("client_token = \"client-secret-token\"", ""));
        assert!(
            message.contains("source \"mews-main\": field `client_token`"),
            "{message}"
        );
        let message = match Settings::parse(GOOD, &no_env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains("field `access_token`"), "{message}");
        assert!(message.contains("MEWS_ACCESS is not set"), "{message}");
    }

    #[test]
    fn names_kinds_and_schedules_are_checked() {
        let message = error_of(&GOOD.replace("mews-main", "Mews Main"));
        assert!(message.contains("sources[0]: field `name`"), "{message}");
        let message = error_of(&GOOD.replace("kind = \"mews\"", "kind = \"opera\""));
        assert!(
            message.contains("field `kind`") && message.contains("opera"),
            "{message}"
        );
        let message = error_of(&GOOD.replace("lookback", "schedule = \"every hour\"\nlookback"));
        assert!(message.contains("field `schedule`"), "{message}");
        let twice = format!("{GOOD}{}", &GOOD[GOOD.find("[[sources]]").unwrap()..]);
        let message = error_of(&twice);
        assert!(message.contains("more than one source"), "{message}");
    }

    #[test]
    fn a_syntax_error_names_the_line_but_never_quotes_it() {
        let message = error_of(&GOOD.replace("\"client-secret-token\"", "\"client-secret-token"));
        assert!(message.contains("line"), "{message}");
        assert!(!message.contains("client-secret-token"), "{message}");
    }

    #[test]
    fn without_a_database_the_store_is_an_sqlite_file_in_the_working_directory() {
        for toml in [
            GOOD.replace(
                "url = \"postgres://deptsync:hunter2@127.0.0.1:5432/deptsync\"",
                "",
            ),
            GOOD.replace(
                "[database]\n        url = \"postgres://deptsync:hunter2@127.0.0.1:5432/deptsync\"",
                "",
            ),
        ] {
            let settings = Settings::parse(&toml, &env).unwrap();
            assert_eq!(settings.database.url.expose_secret(), DEFAULT_DATABASE_URL);
            assert_eq!(settings.database.kind, DatabaseKind::Sqlite);
            assert_eq!(settings.database.redacted_url(), "sqlite://deptsync.db");
        }
    }

    #[test]
    fn sqlite_urls_are_files() {
        for url in [
            "sqlite://data/deptsync.db",
            "sqlite:///var/lib/deptsync/deptsync.db",
        ] {
            let toml = GOOD.replace("postgres://deptsync:hunter2@127.0.0.1:5432/deptsync", url);
            let settings = Settings::parse(&toml, &env).unwrap();
            assert_eq!(settings.database.kind, DatabaseKind::Sqlite);
            assert_eq!(settings.database.redacted_url(), url);
        }
        let message = error_of(&GOOD.replace(
            "postgres://deptsync:hunter2@127.0.0.1:5432/deptsync",
            "sqlite::memory:",
        ));
        assert!(
            message.contains("field `database.url`") && message.contains("names no file"),
            "{message}"
        );
    }

    #[test]
    fn a_database_url_of_another_kind_is_named_without_its_password() {
        let message = error_of(&GOOD.replace("postgres://", "mysql://"));
        assert!(message.contains("field `database.url`"), "{message}");
        assert!(
            message.contains("neither a PostgreSQL URL") && message.contains("SQLite"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
}

mod full_listing_kinds {
    use super::*;

    fn parse(source: &str) -> Result<Settings, String> {
        let text = format!("[database]\nurl = \"postgres://x@h/db\"\n[[sources]]\n{source}");
        Settings::parse(&text, &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn history_retention_is_a_duration_of_a_day_or_more() {
        let source = |retention: &str| {
            format!(
                "name = \"p\"\nkind = \"procurify\"\nbase_url = \"https://acme.procurify.com\"\n\
                 client_id = \"id\"\nclient_secret = \"s\"\n{retention}"
            )
        };
        let kept =
            |retention: &str| parse(&source(retention)).map(|s| s.sources[0].history_retention);
        assert_eq!(kept(""), Ok(None), "history is kept for ever by default");
        assert_eq!(
            kept("history_retention = \"400d\""),
            Ok(Some(std::time::Duration::from_secs(400 * 86_400)))
        );
        for bad in ["\"soon\"", "\"1h\"", "\"0s\""] {
            let error = kept(&format!("history_retention = {bad}")).unwrap_err();
            assert!(error.contains("history_retention"), "{error}");
        }
    }

    #[test]
    fn procurify_defaults_its_token_url_and_page_size() {
        let settings = parse(
            "name = \"p\"\nkind = \"procurify\"\nbase_url = \"https://acme.procurify.com\"\n\
             client_id = \"id\"\nclient_secret = \"s\"",
        )
        .unwrap();
        let KindSettings::Procurify(p) = &settings.sources[0].kind else {
            panic!("expected procurify");
        };
        assert_eq!(
            p.credentials.token_url.as_str(),
            "https://acme.procurify.com/oauth/token"
        );
        assert_eq!((p.page_size, p.max_delete_fraction), (100, 0.5));
    }

    #[test]
    fn snapbooks_takes_a_token_or_client_credentials_not_both_nor_half() {
        let base = "name = \"s\"\nkind = \"snapbooks\"\nbase_url = \"https://api.snapbooks.no/snapbooks\"\n";
        assert!(parse(&format!("{base}token = \"t\"")).is_ok());
        let both = parse(&format!("{base}token = \"t\"\nclient_id = \"c\"")).unwrap_err();
        assert!(
            both.contains("field `token`") && both.contains("not both"),
            "{both}"
        );
        let half = parse(&format!("{base}client_id = \"c\"\nclient_secret = \"s\"")).unwrap_err();
        assert!(half.contains("field `token_url`"), "{half}");
        let none = parse(base).unwrap_err();
        assert!(
            none.contains("field `client_id`") || none.contains("field `token`"),
            "{none}"
        );
    }

    #[test]
    fn max_delete_fraction_is_a_fraction() {
        let source = "name = \"hr\"\nkind = \"data_v1\"\nbase_url = \"https://hr.example.com\"\ntoken = \"t\"\n";
        let error = parse(&format!("{source}max_delete_fraction = 1.5")).unwrap_err();
        assert!(
            error.contains("source \"hr\": field `max_delete_fraction`"),
            "{error}"
        );
        assert!(parse(&format!("{source}max_delete_fraction = 1.0")).is_ok());
        let error = parse(&format!("{source}lookback = \"5m\"")).unwrap_err();
        assert!(
            error.contains("field `lookback`"),
            "a Mews field on another kind: {error}"
        );
    }
}

mod files_and_daemon {
    use super::*;

    const SOURCE: &str =
        "[[sources]]\nname = \"hr\"\nkind = \"data_v1\"\nbase_url = \"https://hr.example.com\"\n";

    fn parse(text: &str, credentials: Option<&str>) -> Result<Settings, String> {
        let credentials = credentials.map(str::to_owned);
        let env = move |name: &str| {
            (name == "CREDENTIALS_DIRECTORY")
                .then(|| credentials.clone())
                .flatten()
        };
        Settings::parse(text, &env).map_err(|e| e.to_string())
    }

    #[test]
    fn only_secret_fields_come_from_files_and_the_common_fields_are_named_in_order() {
        let dir = std::env::temp_dir().join(format!("deptsync-files-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("timeout"), "5s\n").unwrap();
        std::fs::write(dir.join("token"), "t\n").unwrap();
        let with = |extra: &str| format!("{SOURCE}token_file = \"token\"\n{extra}");
        // The fields every kind takes are read before secret files: an `X_file` for one of
        // them is no field at all.
        for field in ["connect_timeout", "rate_limit", "max_attempts"] {
            let error = parse(
                &with(&format!("{field}_file = \"timeout\"\n")),
                dir.to_str(),
            )
            .unwrap_err();
            assert!(
                error.contains(&format!("unknown field `{field}`")),
                "{error}"
            );
            assert!(
                error.contains(
                    "every kind takes: `name`, `kind`, `schedule`, `connect_timeout`, \
                     `request_timeout`, `max_attempts`, `max_backoff`, `rate_limit`, \
                     `max_response_bytes`, `history_retention`, `allow_insecure_http`, and \
                     `X_file`"
                ),
                "{error}"
            );
        }
        let error = parse(&with("kind_file = \"timeout\"\n"), dir.to_str()).unwrap_err();
        assert!(error.contains("unknown field `kind`"), "{error}");
        assert!(parse(&with(""), dir.to_str()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_fields_every_kind_takes_are_the_ones_named() {
        let mut table = crate::config::Table::new();
        for field in crate::sources::http::HTTP_FIELDS.split(", ") {
            let field = field.trim_matches('`');
            let value = match field {
                "max_attempts" => config::Value::from(3),
                "max_response_bytes" => config::Value::from(4096),
                "rate_limit" => config::Value::from("10/1s"),
                _ => config::Value::from("5s"),
            };
            table.insert(field.to_owned(), value);
        }
        let env = |_: &str| None;
        let context = crate::config::FieldContext::for_tests("s", &env);
        crate::sources::http::HttpSettings::take_from(&mut table, &context).unwrap();
        assert!(
            table.is_empty(),
            "not read: {:?}",
            table.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn secrets_come_from_files_absolute_or_in_the_credentials_directory() {
        let directory = std::env::temp_dir().join(format!("deptsync-creds-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::write(directory.join("hr-token"), "from-a-file\n").unwrap();
        std::fs::write(directory.join("db"), "postgres://u:pw@h/db").unwrap();
        let dir = directory.to_str().unwrap();

        let relative =
            format!("[database]\nurl_file = \"db\"\n{SOURCE}token_file = \"hr-token\"\n");
        let settings = parse(&relative, Some(dir)).unwrap();
        let KindSettings::DataV1(hr) = &settings.sources[0].kind else {
            panic!("expected data_v1");
        };
        assert_eq!(hr.token.expose_secret(), "from-a-file");
        assert_eq!(
            settings.database.url.expose_secret(),
            "postgres://u:pw@h/db"
        );

        let absolute = format!(
            "[database]\nurl = \"postgres://h/db\"\n{SOURCE}token_file = \"{dir}/hr-token\"\n"
        );
        assert!(parse(&absolute, None).is_ok());

        let error = parse(&relative, None).unwrap_err();
        assert!(
            error.contains("database.url_file") && error.contains("CREDENTIALS_DIRECTORY"),
            "{error}"
        );
        let both = format!(
            "[database]\nurl = \"postgres://h/db\"\n{SOURCE}token = \"t\"\ntoken_file = \"x\"\n"
        );
        let error = parse(&both, Some(dir)).unwrap_err();
        assert!(
            error.contains("source \"hr\": field `token_file`") && error.contains("not both"),
            "{error}"
        );
        let missing =
            format!("[database]\nurl = \"postgres://h/db\"\n{SOURCE}token_file = \"nope\"\n");
        let error = parse(&missing, Some(dir)).unwrap_err();
        assert!(
            error.contains("field `token_file`") && error.contains("nope"),
            "{error}"
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn the_daemon_section_is_validated() {
        let base = format!("[database]\nurl = \"postgres://h/db\"\n{SOURCE}token = \"t\"\n");
        let settings = parse(&base, None).unwrap();
        assert_eq!(settings.daemon.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(settings.daemon.metrics_listen, None);
        let daemon = format!(
            "[daemon]\nmetrics_listen = \"127.0.0.1:9187\"\nshutdown_timeout = \"30s\"\n{base}"
        );
        let settings = parse(&daemon, None).unwrap();
        assert_eq!(
            settings.daemon.metrics_listen,
            Some("127.0.0.1:9187".parse().unwrap())
        );
        assert_eq!(
            settings.daemon.shutdown_timeout,
            std::time::Duration::from_secs(30)
        );
        let error = parse(
            &format!("[daemon]\nmetrics_listen = \"localhost\"\n{base}"),
            None,
        )
        .unwrap_err();
        assert!(error.contains("daemon.metrics_listen"), "{error}");
        let error = parse(&format!("[daemon]\nmetricslisten = \"x\"\n{base}"), None).unwrap_err();
        assert!(error.contains("metricslisten"), "{error}");
    }

    #[test]
    fn leases_passes_at_once_and_connections_have_defaults_and_bounds() {
        let base = format!("[database]\nurl = \"postgres://h/db\"\n{SOURCE}token = \"t\"\n");
        let settings = parse(&base, None).unwrap();
        assert_eq!(settings.daemon.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(DEFAULT_LEASE_TTL, std::time::Duration::from_secs(30));
        assert_eq!(
            settings.daemon.max_concurrent_passes,
            DEFAULT_MAX_CONCURRENT_PASSES
        );
        assert_eq!(DEFAULT_MAX_CONCURRENT_PASSES, 8);
        assert_eq!(settings.database.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(DEFAULT_MAX_CONNECTIONS, 4);

        let with = |lease_ttl: &str, passes: &str, connections: &str| {
            let text = format!(
                "[daemon]\nlease_ttl = {lease_ttl}\nmax_concurrent_passes = {passes}\n{}",
                base.replace(
                    "url = \"postgres://h/db\"",
                    &format!("url = \"postgres://h/db\"\nmax_connections = {connections}"),
                )
            );
            parse(&text, None)
        };
        let settings = with("\"2m\"", "64", "20").unwrap();
        assert_eq!(
            settings.daemon.lease_ttl,
            std::time::Duration::from_secs(120)
        );
        assert_eq!(settings.daemon.max_concurrent_passes, 64);
        assert_eq!(settings.database.max_connections, 20);
        let settings = with("\"1s\"", "1", "1").unwrap();
        assert_eq!(settings.daemon.lease_ttl, std::time::Duration::from_secs(1));
        let settings = with("\"10m\"", "1024", "1000").unwrap();
        assert_eq!(
            settings.daemon.lease_ttl,
            std::time::Duration::from_secs(600)
        );

        for (lease_ttl, passes, connections, field) in [
            ("\"999ms\"", "8", "4", "daemon.lease_ttl"),
            ("\"11m\"", "8", "4", "daemon.lease_ttl"),
            ("\"soon\"", "8", "4", "daemon.lease_ttl"),
            ("\"30s\"", "0", "4", "daemon.max_concurrent_passes"),
            ("\"30s\"", "1025", "4", "daemon.max_concurrent_passes"),
            ("\"30s\"", "\"many\"", "4", "daemon.max_concurrent_passes"),
            ("\"30s\"", "8", "0", "database.max_connections"),
            ("\"30s\"", "8", "1001", "database.max_connections"),
            ("\"30s\"", "8", "-1", "database.max_connections"),
            ("\"30s\"", "8", "2.5", "database.max_connections"),
        ] {
            let error = with(lease_ttl, passes, connections).unwrap_err();
            assert!(error.contains(&format!("field `{field}`")), "{error}");
        }
    }
}

mod includes {
    use std::path::PathBuf;

    use super::*;

    /// A directory holding a config file and its `sources.d/`, removed when dropped.
    struct ConfigDir(PathBuf);

    impl ConfigDir {
        fn new() -> ConfigDir {
            let path =
                std::env::temp_dir().join(format!("deptsync-include-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(path.join("sources.d")).unwrap();
            ConfigDir(path)
        }

        fn path(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }

        /// Writes `main` as `deptsync.toml` and loads it.
        fn load(&self, main: &str) -> Result<Settings, String> {
            self.write("deptsync.toml", main);
            Settings::load(&self.0.join("deptsync.toml"), &env).map_err(|e| e.to_string())
        }
    }

    impl Drop for ConfigDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn env(name: &str) -> Option<String> {
        (name == "HR_TOKEN").then(|| "token-from-env".to_owned())
    }

    const MAIN: &str =
        "[database]\nurl = \"postgres://h/db\"\n\n[include]\nsources = \"sources.d/*.toml\"\n";

    fn source(name: &str) -> String {
        format!(
            "[[sources]]\nname = \"{name}\"\nkind = \"data_v1\"\n\
             base_url = \"https://hr.example.com\"\ntoken = \"${{HR_TOKEN}}\"\n"
        )
    }

    fn names(settings: &Settings) -> Vec<&str> {
        settings.sources.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn included_files_add_their_sources_after_the_main_ones_in_path_order() {
        let dir = ConfigDir::new();
        dir.write(
            "sources.d/b.toml",
            &format!("{}{}", source("b-1"), source("b-2")),
        );
        dir.write("sources.d/a.toml", &source("a"));
        dir.write("sources.d/empty.toml", "");
        dir.write("sources.d/notes.txt", "not toml, not matched");
        dir.write("sources.d/.hidden.toml", "not toml either, and hidden");
        std::fs::create_dir(dir.0.join("sources.d/old.toml")).unwrap();
        let settings = dir.load(&format!("{MAIN}{}", source("main"))).unwrap();
        assert_eq!(names(&settings), ["main", "a", "b-1", "b-2"]);
        let KindSettings::DataV1(hr) = &settings.sources[1].kind else {
            panic!("expected data_v1");
        };
        assert_eq!(hr.token.expose_secret(), "token-from-env");
    }

    #[test]
    fn include_takes_a_list_of_patterns_relative_or_absolute_each_file_once() {
        let dir = ConfigDir::new();
        std::fs::create_dir(dir.0.join("tenants")).unwrap();
        dir.write("sources.d/a.toml", &source("a"));
        dir.write("tenants/t.toml", &source("t"));
        let absolute = dir.path("tenants/*.toml");
        let main = MAIN.replace(
            "sources = \"sources.d/*.toml\"",
            &format!("sources = [\"sources.d/a.toml\", \"{absolute}\", \"sources.d/*\"]"),
        );
        let settings = dir.load(&main).unwrap();
        assert_eq!(names(&settings), ["a", "t"]);
    }

    #[test]
    fn a_name_used_in_two_files_is_refused_naming_both() {
        let dir = ConfigDir::new();
        dir.write("sources.d/a.toml", &source("x"));
        dir.write("sources.d/b.toml", &source("x"));
        let error = dir.load(MAIN).unwrap_err();
        assert!(
            error.contains("source \"x\": field `name`")
                && error.contains(&dir.path("sources.d/a.toml"))
                && error.contains(&dir.path("sources.d/b.toml")),
            "{error}"
        );

        let dir = ConfigDir::new();
        dir.write("sources.d/a.toml", &source("main"));
        let error = dir.load(&format!("{MAIN}{}", source("main"))).unwrap_err();
        assert!(
            error.contains(&dir.path("deptsync.toml"))
                && error.contains(&dir.path("sources.d/a.toml")),
            "{error}"
        );
    }

    #[test]
    fn an_error_in_an_included_file_names_that_file_and_the_field() {
        let dir = ConfigDir::new();
        dir.write("sources.d/a.toml", &source("a"));
        dir.write(
            "sources.d/b.toml",
            &format!("{}max_delete_fraction = 1.5\n", source("b")),
        );
        let error = dir.load(MAIN).unwrap_err();
        assert!(
            error.starts_with(&format!(
                "{}: source \"b\": field `max_delete_fraction`",
                dir.path("sources.d/b.toml")
            )),
            "{error}"
        );

        dir.write("sources.d/b.toml", &source("B"));
        let error = dir.load(MAIN).unwrap_err();
        assert!(
            error.contains(&format!(
                "{}: sources[0]: field `name`",
                dir.path("sources.d/b.toml")
            )),
            "{error}"
        );

        dir.write(
            "sources.d/b.toml",
            "[[sources]]\nname = \"b\"\ntoken = \"unterminated\n",
        );
        let error = dir.load(MAIN).unwrap_err();
        assert!(
            error.contains(&dir.path("sources.d/b.toml")) && error.contains("line"),
            "{error}"
        );
        assert!(!error.contains("unterminated"), "{error}");

        // Not UTF-8: the file cannot be read as text.
        std::fs::write(dir.0.join("sources.d/b.toml"), [0xff, 0xfe, 0x00]).unwrap();
        let error = dir.load(MAIN).unwrap_err();
        assert!(error.contains(&dir.path("sources.d/b.toml")), "{error}");
    }

    #[test]
    fn an_included_file_holds_only_sources() {
        let dir = ConfigDir::new();
        dir.write(
            "sources.d/a.toml",
            &format!("[daemon]\nshutdown_timeout = \"1s\"\n{}", source("a")),
        );
        let error = dir.load(MAIN).unwrap_err();
        assert!(
            error.contains(&dir.path("sources.d/a.toml")) && error.contains("`daemon`"),
            "{error}"
        );
        dir.write("sources.d/a.toml", "[include]\nsources = \"*.toml\"\n");
        let error = dir.load(MAIN).unwrap_err();
        assert!(
            error.contains(&dir.path("sources.d/a.toml")) && error.contains("`include`"),
            "{error}"
        );
    }

    #[test]
    fn an_invalid_pattern_is_refused_naming_the_field() {
        let dir = ConfigDir::new();
        for sources in [
            "\"sources.d/[a.toml\"",
            "\"sources.d/a**.toml\"",
            "[\"ok/*.toml\", 3]",
            "\"\"",
        ] {
            let main = MAIN.replace("\"sources.d/*.toml\"", sources);
            let error = dir.load(&main).unwrap_err();
            assert!(
                error.contains(&format!(
                    "{}: field `include.sources`",
                    dir.path("deptsync.toml")
                )),
                "{sources}: {error}"
            );
        }
    }

    #[test]
    fn a_pattern_that_matches_nothing_adds_no_source() {
        let dir = ConfigDir::new();
        let settings = dir.load(&format!("{MAIN}{}", source("main"))).unwrap();
        assert_eq!(names(&settings), ["main"]);
        let main = MAIN.replace("sources.d/*.toml", "nowhere/*.toml");
        assert!(dir.load(&main).unwrap().sources.is_empty());
    }

    #[test]
    fn include_needs_a_config_file() {
        let error = match Settings::parse(MAIN, &env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains("field `include.sources`")
                && error.contains("include needs a config file"),
            "{error}"
        );
    }
}

mod example {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/deptsync.example.toml");

    #[test]
    fn the_shipped_example_config_is_valid() {
        let settings = Settings::parse(EXAMPLE, &|_| None).unwrap();
        assert_eq!(settings.sources[0].name.as_str(), "mews-demo");
    }

    /// The example with the commented `[[sources]]` block starting at line `start`
    /// uncommented as its comment says to (one `# ` taken off each line of the block; a
    /// `## ` line stays a comment).
    fn uncommented(start: usize) -> String {
        let mut in_block = false;
        EXAMPLE
            .lines()
            .enumerate()
            .map(|(number, line)| {
                if number == start {
                    in_block = true;
                }
                if in_block && !line.starts_with('#') {
                    in_block = false;
                }
                match line.strip_prefix("# ") {
                    Some(rest) if in_block => rest.to_owned(),
                    _ => line.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn each_commented_source_of_the_example_validates_once_uncommented() {
        let blocks: Vec<usize> = EXAMPLE
            .lines()
            .enumerate()
            .filter(|(_, line)| line.trim() == "# [[sources]]")
            .map(|(number, _)| number)
            .collect();
        assert_eq!(blocks.len(), 3, "procurify, snapbooks, data_v1");
        let env = |name: &str| (name != "DATABASE_URL").then(|| format!("value of {name}"));
        for start in blocks {
            let text = uncommented(start);
            let settings = Settings::parse(&text, &env)
                .unwrap_or_else(|e| panic!("the block at line {}: {e}", start + 1));
            assert_eq!(settings.sources.len(), 2, "the block at line {}", start + 1);
        }
    }
}
