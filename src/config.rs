//! Configuration: parsed, then validated into types that cannot be wrong, before any I/O.
//!
//! The file is TOML (read with the `config` crate); `DATABASE_URL` in the environment
//! overrides `[database] url`, and without either the store is the SQLite file
//! [`DEFAULT_DATABASE_URL`]. Every `[[sources]]` entry has a `name`, a `kind` and an
//! optional `schedule`; the rest of its fields belong to its kind, whose module under
//! `crate::sources` defines and validates them. Unknown fields are errors everywhere, and
//! every error names the source and the field, so a typo cannot pass silently.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::sources::data_v1::{DataV1Config, DataV1Settings};
use crate::sources::mews::{MewsConfig, MewsSettings};
use crate::sources::procurify::{ProcurifyConfig, ProcurifySettings};
use crate::sources::snapbooks::{SnapbooksConfig, SnapbooksSettings};
use crate::store::DatabaseKind;

/// The config file read when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/deptsync/deptsync.toml";

/// The store used when none is configured: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://deptsync.db";

/// The default schedule: every 15 minutes, on the quarter hour (cron with seconds).
pub const DEFAULT_SCHEDULE: &str = "0 */15 * * * *";

/// Why a config cannot be used. Every variant says where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
}

impl ConfigError {
    fn top(field: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            location: format!("field `{field}`"),
            message: message.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub daemon: DaemonSettings,
    pub sources: Vec<SourceSettings>,
}

/// How `deptsync run` behaves.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// Where to serve `/metrics` and `/healthz`; none when not set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long a shutdown waits for passes to commit the page in hand.
    pub shutdown_timeout: std::time::Duration,
}

/// The default `[daemon] shutdown_timeout`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the store lives: a PostgreSQL URL or an SQLite one. `Debug` and
/// [`DatabaseSettings::redacted_url`] never show the password.
#[derive(Debug)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub kind: DatabaseKind,
    /// `statement_timeout`: how long one statement may run (PostgreSQL ends it), and so
    /// what bounds every database call (see [`crate::store::call_timeout`]). Default
    /// [`crate::store::DEFAULT_STATEMENT_TIMEOUT`].
    pub statement_timeout: std::time::Duration,
}

impl DatabaseSettings {
    /// The URL with any password replaced, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

/// The URL with its password (if any, in the user part or as a `password` query
/// parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    if url.starts_with("sqlite:") {
        // A path: SQLite has no password to hide, and a relative path is no URL host.
        return url.to_owned();
    }
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return "<unparseable database url>".to_owned();
    };
    if parsed.password().is_some() {
        // Cannot fail for a URL that already has a password (it has a host).
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    "***".into()
                } else {
                    value
                };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// One configured source.
#[derive(Debug)]
pub struct SourceSettings {
    pub name: SourceName,
    /// When `run` starts a pass.
    pub schedule: Schedule,
    /// Timeouts, retries and rate limit of its requests.
    pub http: HttpSettings,
    pub kind: SourceKindSettings,
}

/// How a source's requests behave when the network or the vendor misbehaves. Every kind
/// takes these fields.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// `connect_timeout`, default 10 s.
    pub connect_timeout: std::time::Duration,
    /// `request_timeout` (the whole request), default 60 s.
    pub request_timeout: std::time::Duration,
    /// `max_attempts` for one request, default 5 (1 = no retry).
    pub max_attempts: u32,
    /// `max_backoff`: the longest wait between two attempts, default 60 s.
    pub max_backoff: std::time::Duration,
    /// `rate_limit` ("180/30s"): the request budget of the source's credential, shared by
    /// every source that uses the same credential. Default: the vendor's (Mews), or none.
    pub rate_limit: Option<RateLimit>,
    /// `max_response_bytes`: the most bytes of one response body read, counted after
    /// decompression while reading, default [`DEFAULT_MAX_RESPONSE_BYTES`].
    pub max_response_bytes: u64,
}

/// The default bound on one response body, decompressed: 64 MiB. No departments listing
/// page comes near it (a Mews page of 1000 departments is about 300 kB); a body past it is
/// a fault or an attack (a gzip bomb), not data.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: std::time::Duration::from_secs(10),
            request_timeout: std::time::Duration::from_secs(60),
            max_attempts: 5,
            max_backoff: std::time::Duration::from_secs(60),
            rate_limit: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// At most `requests` in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: std::time::Duration,
}

impl RateLimit {
    /// Parses `"180/30s"`.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let bad = || format!("{text:?} is not a rate like \"180/30s\" (requests/period)");
        let (requests, per) = text.split_once('/').ok_or_else(bad)?;
        let requests: u32 = requests.trim().parse().map_err(|_| bad())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
        if requests == 0 || per.is_zero() {
            return Err(bad());
        }
        if (per / requests).is_zero() {
            return Err(format!(
                "{text:?} is more than one request per nanosecond: no limit at all"
            ));
        }
        Ok(RateLimit { requests, per })
    }
}

/// The kind-specific settings: one arm per connector.
#[derive(Debug)]
pub enum SourceKindSettings {
    Mews(MewsSettings),
    Procurify(ProcurifySettings),
    Snapbooks(SnapbooksSettings),
    DataV1(DataV1Settings),
}

impl SourceKindSettings {
    /// The vendor's published request limit, when it has one.
    fn default_rate_limit(&self) -> Option<RateLimit> {
        match self {
            SourceKindSettings::Mews(_) => Some(crate::sources::mews::DEFAULT_RATE_LIMIT),
            SourceKindSettings::Procurify(_)
            | SourceKindSettings::Snapbooks(_)
            | SourceKindSettings::DataV1(_) => None,
        }
    }
}

/// The `kind` values, as the config file spells them.
const KINDS: &str = "mews, procurify, snapbooks, data_v1";

/// A source name: unique, `[a-z0-9][a-z0-9_-]*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceName(String);

impl SourceName {
    pub fn parse(name: &str) -> Result<Self, String> {
        let mut chars = name.chars();
        let valid_first = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid_rest =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if valid_first && valid_rest && name.len() <= 63 {
            Ok(SourceName(name.to_owned()))
        } else {
            Err(format!(
                "{name:?} is not a valid name: use [a-z0-9][a-z0-9_-]*, at most 63 characters"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SourceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Looks up an environment variable. Injected so that validation stays pure and testable.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`Settings::load`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: Option<RawDatabase>,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    sources: Vec<config::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<SecretString>,
    url_file: Option<String>,
    statement_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    metrics_listen: Option<String>,
    shutdown_timeout: Option<String>,
}

/// A cron schedule with seconds (`sec min hour day month weekday [year]`), in UTC.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Schedule").field(&self.text).finish()
    }
}

impl Schedule {
    /// Parses a schedule the way the daemon's scheduler does.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(text)
            .map_err(|e| {
                format!(
                    "{text:?} is not a cron expression with seconds (sec min hour day month weekday, \
                     e.g. \"0 */15 * * * *\"): {e}"
                )
            })?;
        Ok(Schedule {
            text: text.to_owned(),
            cron,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time after `t` the schedule fires.
    pub fn next_after(
        &self,
        t: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// The time between the next two firings after `t`: the interval a pass is expected
    /// every.
    pub fn interval_after(&self, t: chrono::DateTime<chrono::Utc>) -> Option<chrono::Duration> {
        let first = self.next_after(t)?;
        let second = self.next_after(first)?;
        Some(second - first)
    }
}

impl Settings {
    /// Reads the file at `path` and validates it. Reads the file and the environment;
    /// touches nothing else.
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Settings, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.to_owned(),
                message: "not found (pass --config FILE)".to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Settings::parse(&text, env).map_err(|e| match e {
            ConfigError::Invalid { location, message } => ConfigError::Invalid {
                location: format!("{}: {location}", path.display()),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(toml: &str, env: EnvLookup<'_>) -> Result<Settings, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Invalid {
                location: "config".to_owned(),
                message: with_duplicate_key_named(&without_quoted_lines(&e.to_string()), toml),
            })?;

        let database = raw.database.unwrap_or(RawDatabase {
            url: None,
            url_file: None,
            statement_timeout: None,
        });
        let statement_timeout = match database.statement_timeout {
            None => crate::store::DEFAULT_STATEMENT_TIMEOUT,
            Some(text) => match humantime::parse_duration(&text) {
                Ok(timeout)
                    if (std::time::Duration::from_millis(100)
                        ..=std::time::Duration::from_secs(3600))
                        .contains(&timeout) =>
                {
                    timeout
                }
                Ok(_) => {
                    return Err(ConfigError::top(
                        "database.statement_timeout",
                        format!("{text:?} is not between 100ms and 1h"),
                    ));
                }
                Err(e) => {
                    return Err(ConfigError::top(
                        "database.statement_timeout",
                        format!("{text:?} is not a duration like \"60s\": {e}"),
                    ));
                }
            },
        };
        let url_from_file = match database.url_file {
            None => None,
            Some(path) => Some(
                read_secret_file(&path, env)
                    .map_err(|m| ConfigError::top("database.url_file", m))?,
            ),
        };
        let configured_url = match (database.url, url_from_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::top(
                    "database.url_file",
                    "give `url` or `url_file`, not both",
                ));
            }
            (url, from_file) => url.or(from_file),
        };
        let url = match (
            env("DATABASE_URL").filter(|u| !u.is_empty()),
            configured_url,
        ) {
            (Some(url), _) => SecretString::from(url),
            (None, Some(url)) => {
                expand_secret(url, env).map_err(|m| ConfigError::top("database.url", m))?
            }
            (None, None) => SecretString::from(DEFAULT_DATABASE_URL),
        };
        let kind = DatabaseKind::of_url(url.expose_secret()).map_err(|message| {
            let written = url.expose_secret();
            // A bare file name (no scheme, no `@`, no `key=value`, no space) holds no
            // password: show it as written, with the form that was probably meant.
            let a_file_name =
                !written.contains([':', '@', '=']) && !written.contains(char::is_whitespace);
            if a_file_name {
                return ConfigError::top(
                    "database.url",
                    format!(
                        "{written:?} is not a database URL: for an SQLite file write \
                         \"sqlite://{written}\", for PostgreSQL \
                         \"postgres://user@host:port/database\""
                    ),
                );
            }
            ConfigError::top("database.url", format!("{} {message}", redact_url(written)))
        })?;

        let mut sources = Vec::with_capacity(raw.sources.len());
        let mut seen = HashSet::new();
        for (index, value) in raw.sources.into_iter().enumerate() {
            let source = validate_source(index, value, env)?;
            if !seen.insert(source.name.clone()) {
                return Err(ConfigError::Invalid {
                    location: format!("source \"{}\": field `name`", source.name),
                    message: "is used by more than one source; names must be unique".to_owned(),
                });
            }
            sources.push(source);
        }

        let daemon = DaemonSettings {
            metrics_listen: match raw.daemon.metrics_listen {
                None => None,
                Some(text) => Some(text.parse().map_err(|e| {
                    ConfigError::top(
                        "daemon.metrics_listen",
                        format!("{text:?} is not an address like \"127.0.0.1:9187\": {e}"),
                    )
                })?),
            },
            shutdown_timeout: match raw.daemon.shutdown_timeout {
                None => DEFAULT_SHUTDOWN_TIMEOUT,
                Some(text) => humantime::parse_duration(&text).map_err(|e| {
                    ConfigError::top(
                        "daemon.shutdown_timeout",
                        format!("{text:?} is not a duration like \"10s\": {e}"),
                    )
                })?,
            },
        };

        Ok(Settings {
            database: DatabaseSettings {
                url,
                kind,
                statement_timeout,
            },
            daemon,
            sources,
        })
    }
}

/// A TOML parser's "duplicate key" message, with the key named: the text before `=` on
/// the line it points at (a key, never a value, so nothing secret is quoted).
fn with_duplicate_key_named(message: &str, toml: &str) -> String {
    if !message.contains("duplicate key") {
        return message.to_owned();
    }
    let key = message
        .split("at line ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|number| number.parse::<usize>().ok())
        .and_then(|number| toml.lines().nth(number.checked_sub(1)?))
        .and_then(|line| line.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    match key {
        Some(key) => message.replacen("duplicate key", &format!("duplicate key `{key}`"), 1),
        None => message.to_owned(),
    }
}

/// A TOML parser's message without the lines it quotes from the file: they may hold a
/// secret (an unterminated token string, say). Line and column stay.
fn without_quoted_lines(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let trimmed = line.trim_start();
            let quoted = trimmed.starts_with('|')
                || trimmed
                    .split_once(" |")
                    .is_some_and(|(number, _)| number.chars().all(|c| c.is_ascii_digit()));
            !quoted && !trimmed.is_empty()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Tells a kind's module where a field error is, so that it can say so.
pub struct FieldContext<'a> {
    source: &'a str,
    pub env: EnvLookup<'a>,
    /// `allow_insecure_http`: the source may send its credentials over plain `http://`
    /// to a host that is not loopback.
    allow_insecure_http: bool,
}

impl FieldContext<'_> {
    /// An error about `field` of this source.
    pub fn error(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            location: format!("source \"{}\": field `{field}`", self.source),
            message: message.into(),
        }
    }

    /// A secret field, with `${ENV_NAME}` replaced by that variable's value.
    pub fn secret(&self, field: &str, value: SecretString) -> Result<SecretString, ConfigError> {
        expand_secret(value, self.env).map_err(|m| self.error(field, m))
    }

    /// An `http(s)://` URL without credentials or query, ending in `/` so that relative
    /// paths join under it.
    ///
    /// Every request to it carries a secret, so plain `http://` is refused unless the host
    /// is loopback (the demo and tests) or the source says `allow_insecure_http = true`,
    /// which is warned about.
    pub fn base_url(&self, field: &str, text: &str) -> Result<reqwest::Url, ConfigError> {
        let url = parse_base_url(text).map_err(|m| self.error(field, m))?;
        if url.scheme() == "http" && !is_loopback(&url) {
            if !self.allow_insecure_http {
                return Err(self.error(
                    field,
                    format!(
                        "{text:?} would send the source's credentials unencrypted: use \
                         https://, or set allow_insecure_http = true if that is really wanted"
                    ),
                ));
            }
            tracing::warn!(
                source = self.source,
                field,
                url = %url,
                "allow_insecure_http: credentials are sent unencrypted over plain http"
            );
        }
        Ok(url)
    }

    /// An optional count `field` in `1..=max` (a page size, windows read at once).
    pub fn count(
        &self,
        field: &str,
        value: Option<i64>,
        default: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if (1..=i64::from(max)).contains(&n) => Ok(n as u32),
            Some(n) => Err(self.error(field, format!("must be between 1 and {max}, got {n}"))),
        }
    }

    /// An optional `max_delete_fraction` in `0.0..=1.0`.
    pub fn delete_fraction(&self, value: Option<f64>) -> Result<f64, ConfigError> {
        match value {
            None => Ok(DEFAULT_MAX_DELETE_FRACTION),
            Some(f) if (0.0..=1.0).contains(&f) => Ok(f),
            Some(f) => Err(self.error(
                "max_delete_fraction",
                format!("must be between 0.0 and 1.0, got {f}"),
            )),
        }
    }

    /// An optional duration such as `"5m"` or `"1h 30m"`.
    pub fn duration(
        &self,
        field: &str,
        value: Option<&str>,
        default: std::time::Duration,
    ) -> Result<std::time::Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                self.error(
                    field,
                    format!("{text:?} is not a duration like \"5m\": {e}"),
                )
            }),
        }
    }
}

/// A full listing that would mark more than this fraction of a source's live rows deleted
/// deletes nothing, unless a person confirms it.
pub const DEFAULT_MAX_DELETE_FRACTION: f64 = 0.5;

/// Whether `url` names this machine: `localhost` or a loopback address.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // An IPv6 host is written in brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

fn parse_base_url(text: &str) -> Result<reqwest::Url, String> {
    let with_slash = if text.ends_with('/') {
        text.to_owned()
    } else {
        format!("{text}/")
    };
    let url =
        reqwest::Url::parse(&with_slash).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{text:?} is not an http(s) URL"));
    }
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a query or credentials".to_owned());
    }
    Ok(url)
}

fn validate_source(
    index: usize,
    value: config::Value,
    env: EnvLookup<'_>,
) -> Result<SourceSettings, ConfigError> {
    let at_index = |field: &str, message: String| ConfigError::Invalid {
        location: format!("sources[{index}]: field `{field}`"),
        message,
    };
    let mut table = value
        .into_table()
        .map_err(|e| at_index("sources", format!("must be a table: {e}")))?;
    let name = take_string(&mut table, "name").map_err(|m| at_index("name", m))?;
    let name = SourceName::parse(&name).map_err(|m| at_index("name", m))?;
    let allow_insecure_http = match table.remove("allow_insecure_http") {
        None => false,
        Some(v) => v
            .into_bool()
            .map_err(|e| at_index("allow_insecure_http", e.to_string()))?,
    };
    let fields = FieldContext {
        source: name.as_str(),
        env,
        allow_insecure_http,
    };
    let kind = take_string(&mut table, "kind").map_err(|m| fields.error("kind", m))?;
    let schedule = match table.remove("schedule") {
        None => DEFAULT_SCHEDULE.to_owned(),
        Some(v) => v
            .into_string()
            .map_err(|e| fields.error("schedule", e.to_string()))?,
    };
    let schedule = Schedule::parse(&schedule).map_err(|m| fields.error("schedule", m))?;
    let mut http = take_http_settings(&mut table, &fields)?;
    load_secret_files(&mut table, &fields)?;

    let rest = config::Value::new(None, config::ValueKind::Table(table));
    let kind = match kind.as_str() {
        "mews" => {
            SourceKindSettings::Mews(parse_kind::<MewsConfig>(rest, &fields)?.validate(&fields)?)
        }
        "procurify" => SourceKindSettings::Procurify(
            parse_kind::<ProcurifyConfig>(rest, &fields)?.validate(&fields)?,
        ),
        "snapbooks" => SourceKindSettings::Snapbooks(
            parse_kind::<SnapbooksConfig>(rest, &fields)?.validate(&fields)?,
        ),
        "data_v1" => SourceKindSettings::DataV1(
            parse_kind::<DataV1Config>(rest, &fields)?.validate(&fields)?,
        ),
        other => {
            return Err(fields.error(
                "kind",
                format!("unknown kind {other:?}; expected one of: {KINDS}"),
            ));
        }
    };
    http.rate_limit = http.rate_limit.or(kind.default_rate_limit());
    Ok(SourceSettings {
        name,
        schedule,
        http,
        kind,
    })
}

/// The fields every kind of source takes, besides its own.
const SHARED_FIELDS: &str = "`name`, `kind`, `schedule`, `connect_timeout`, `request_timeout`, \
     `max_attempts`, `max_backoff`, `rate_limit`, `max_response_bytes`, \
     `allow_insecure_http`, and `X_file` for any secret field `X`";

fn parse_kind<T: DeserializeOwned>(
    rest: config::Value,
    fields: &FieldContext<'_>,
) -> Result<T, ConfigError> {
    rest.try_deserialize::<T>().map_err(|e| {
        let mut message = e.to_string();
        // serde names the offending field in its message ("unknown field `x`", "missing
        // field `y`", "... for key `z`"); pull it out so that the location names it.
        let field = field_named_in(&message).unwrap_or_else(|| "?".to_owned());
        if message.contains("expected one of") {
            // The kind's own fields only: the ones every kind takes are where typos are.
            message.push_str(&format!(", or one every kind takes: {SHARED_FIELDS}"));
        }
        fields.error(&field, message)
    })
}

fn field_named_in(message: &str) -> Option<String> {
    let markers = [
        ("unknown field `", '`'),
        ("missing field `", '`'),
        ("missing configuration field \"", '"'),
        ("for key `", '`'),
        ("for key \"", '"'),
    ];
    for (marker, close) in markers {
        if let Some(start) = message.find(marker) {
            let rest = &message[start + marker.len()..];
            if let Some(end) = rest.find(close) {
                return Some(rest[..end].to_owned());
            }
        }
    }
    None
}

fn take_string(
    table: &mut config::Map<String, config::Value>,
    key: &str,
) -> Result<String, String> {
    match table.remove(key) {
        None => Err("missing".to_owned()),
        Some(v) => v.into_string().map_err(|e| e.to_string()),
    }
}

/// Takes the fields every kind shares about its requests out of a source's table.
fn take_http_settings(
    table: &mut config::Map<String, config::Value>,
    fields: &FieldContext<'_>,
) -> Result<HttpSettings, ConfigError> {
    let mut text = |key: &str| -> Result<Option<String>, ConfigError> {
        table
            .remove(key)
            .map(|v| {
                v.into_string()
                    .map_err(|e| fields.error(key, e.to_string()))
            })
            .transpose()
    };
    let defaults = HttpSettings::default();
    let connect_timeout = text("connect_timeout")?;
    let request_timeout = text("request_timeout")?;
    let max_backoff = text("max_backoff")?;
    let rate_limit = text("rate_limit")?;
    let max_attempts = match table.remove("max_attempts") {
        None => defaults.max_attempts,
        Some(v) => match v.into_int() {
            Ok(n) if (1..=20).contains(&n) => n as u32,
            Ok(n) => {
                return Err(
                    fields.error("max_attempts", format!("must be between 1 and 20, got {n}"))
                );
            }
            Err(e) => return Err(fields.error("max_attempts", e.to_string())),
        },
    };
    let max_response_bytes = match table.remove("max_response_bytes") {
        None => defaults.max_response_bytes,
        Some(v) => match v.into_int() {
            // At least a page's worth; at most what a 32-bit build could hold.
            Ok(n) if (1024..=1 << 31).contains(&n) => n as u64,
            Ok(n) => {
                return Err(fields.error(
                    "max_response_bytes",
                    format!("must be between 1024 and 2147483648 bytes, got {n}"),
                ));
            }
            Err(e) => return Err(fields.error("max_response_bytes", e.to_string())),
        },
    };
    Ok(HttpSettings {
        max_response_bytes,
        connect_timeout: fields.duration(
            "connect_timeout",
            connect_timeout.as_deref(),
            defaults.connect_timeout,
        )?,
        request_timeout: fields.duration(
            "request_timeout",
            request_timeout.as_deref(),
            defaults.request_timeout,
        )?,
        max_attempts,
        max_backoff: fields.duration(
            "max_backoff",
            max_backoff.as_deref(),
            defaults.max_backoff,
        )?,
        rate_limit: rate_limit
            .map(|r| RateLimit::parse(&r).map_err(|m| fields.error("rate_limit", m)))
            .transpose()?,
    })
}

/// Replaces every `X_file = "path"` of a source by `X` = the file's content, so that any
/// secret can come from a file (systemd's `LoadCredential=`) instead of the config or the
/// environment.
fn load_secret_files(
    table: &mut config::Map<String, config::Value>,
    fields: &FieldContext<'_>,
) -> Result<(), ConfigError> {
    let file_keys: Vec<String> = table
        .keys()
        .filter(|k| k.ends_with("_file"))
        .cloned()
        .collect();
    for key in file_keys {
        let field = key.trim_end_matches("_file").to_owned();
        if table.contains_key(&field) {
            return Err(fields.error(&key, format!("give `{field}` or `{key}`, not both")));
        }
        let path = table
            .remove(&key)
            .map(|v| v.into_string())
            .transpose()
            .map_err(|e| fields.error(&key, e.to_string()))?
            .unwrap_or_default();
        let secret = read_secret_file(&path, fields.env).map_err(|m| fields.error(&key, m))?;
        table.insert(field, config::Value::from(secret.expose_secret()));
    }
    Ok(())
}

/// Reads a secret from `path`: absolute, or relative to `$CREDENTIALS_DIRECTORY` (where
/// systemd puts `LoadCredential=` files). One trailing newline is not part of it.
fn read_secret_file(path: &str, env: EnvLookup<'_>) -> Result<SecretString, String> {
    let full = match (Path::new(path).is_absolute(), env("CREDENTIALS_DIRECTORY")) {
        (true, _) => PathBuf::from(path),
        (false, Some(directory)) => Path::new(&directory).join(path),
        (false, None) => {
            return Err(format!(
                "{path:?} is relative, and CREDENTIALS_DIRECTORY is not set (give an absolute path)"
            ));
        }
    };
    let text =
        std::fs::read_to_string(&full).map_err(|e| format!("reading {}: {e}", full.display()))?;
    let secret = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if secret.is_empty() {
        return Err(format!("{} is empty", full.display()));
    }
    Ok(SecretString::from(secret.to_owned()))
}

/// `${ENV_NAME}` becomes that variable's value; anything else is taken as it is.
fn expand_secret(value: SecretString, env: EnvLookup<'_>) -> Result<SecretString, String> {
    let text = value.expose_secret();
    let expanded = match text.strip_prefix("${").and_then(|t| t.strip_suffix('}')) {
        Some(var) => {
            let valid =
                !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "\"${{{var}}}\" is not a valid environment reference"
                ));
            }
            match env(var) {
                Some(v) => SecretString::from(v),
                None => return Err(format!("environment variable {var} is not set")),
            }
        }
        None => value,
    };
    if expanded.expose_secret().is_empty() {
        return Err("is empty".to_owned());
    }
    Ok(expanded)
}

#[cfg(test)]
mod tests {
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
        let SourceKindSettings::Mews(mews) = &source.kind else {
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
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=hunter2"),
            "postgres://u@h/db?sslmode=require&password=***"
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

#[cfg(test)]
mod full_listing_kinds {
    use super::*;

    fn parse(source: &str) -> Result<Settings, String> {
        let text = format!("[database]\nurl = \"postgres://x@h/db\"\n[[sources]]\n{source}");
        Settings::parse(&text, &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn procurify_defaults_its_token_url_and_page_size() {
        let settings = parse(
            "name = \"p\"\nkind = \"procurify\"\nbase_url = \"https://acme.procurify.com\"\n\
             client_id = \"id\"\nclient_secret = \"s\"",
        )
        .unwrap();
        let SourceKindSettings::Procurify(p) = &settings.sources[0].kind else {
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

#[cfg(test)]
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
    fn secrets_come_from_files_absolute_or_in_the_credentials_directory() {
        let directory = std::env::temp_dir().join(format!("deptsync-creds-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::write(directory.join("hr-token"), "from-a-file\n").unwrap();
        std::fs::write(directory.join("db"), "postgres://u:pw@h/db").unwrap();
        let dir = directory.to_str().unwrap();

        let relative =
            format!("[database]\nurl_file = \"db\"\n{SOURCE}token_file = \"hr-token\"\n");
        let settings = parse(&relative, Some(dir)).unwrap();
        let SourceKindSettings::DataV1(hr) = &settings.sources[0].kind else {
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
    fn schedules_are_cron_with_seconds() {
        let schedule = Schedule::parse("0 */15 * * * *").unwrap();
        let at = chrono::DateTime::parse_from_rfc3339("2026-01-01T10:07:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            schedule.next_after(at).unwrap().to_rfc3339(),
            "2026-01-01T10:15:00+00:00"
        );
        assert_eq!(
            schedule.interval_after(at),
            Some(chrono::Duration::minutes(15))
        );
        assert!(
            Schedule::parse("*/15 * * * *").is_err(),
            "five fields lack the seconds"
        );
        assert!(Schedule::parse("0 61 * * * *").is_err());
    }
}

#[cfg(test)]
mod example {
    use super::*;

    const EXAMPLE: &str = include_str!("../deploy/deptsync.example.toml");

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
