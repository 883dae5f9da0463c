//! Configuration: parsed, then validated into types that cannot be wrong, before any I/O.
//!
//! The file is TOML (read with the `config` crate); `DATABASE_URL` in the environment
//! overrides `[database] url`, and without either the store is the SQLite file
//! [`DEFAULT_DATABASE_URL`]. Every `[[sources]]` entry has a `name`, an optional
//! `schedule` and its secrets (`X_file`, `${ENV}`) read here; the rest of the table is
//! handed to whatever [`SourceEntry`] the settings are of (`crate::sources` validates each
//! kind's fields), so this module names no vendor. Unknown fields are errors everywhere,
//! and every error names the source and the field, so a typo cannot pass silently.
//!
//! A site with many sources can keep them in files of their own, one per tenant say:
//! `[include] sources = "sources.d/*.toml"` (or a list of such patterns, relative to the
//! config file's directory) reads every file the patterns match, in path order, after the
//! config file's own `[[sources]]`. Such a file holds `[[sources]]` tables only; they are
//! validated as the main file's are, names are unique across all the files, and every
//! error names the file it is in.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

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

    /// The error, said to be in the file at `path` (none: text read without a file, which
    /// the error cannot name).
    fn in_file(self, path: Option<&Path>) -> Self {
        match (self, path) {
            (ConfigError::Invalid { location, message }, Some(path)) => ConfigError::Invalid {
                location: format!("{}: {location}", path.display()),
                message,
            },
            (other, _) => other,
        }
    }
}

/// The validated configuration, its sources validated into `S`.
#[derive(Debug)]
pub struct Settings<S> {
    pub database: DatabaseSettings,
    pub daemon: DaemonSettings,
    pub sources: Vec<S>,
}

/// What one `[[sources]]` table is validated into. The config reads the fields every
/// source has (`name`, `kind`, `schedule`, `allow_insecure_http`) and hands the rest of
/// the table over.
pub trait SourceEntry: Sized {
    /// Validates a source from the rest of its table. Does no I/O.
    fn from_table(table: SourceTable<'_>) -> Result<Self, ConfigError>;
}

/// A `[[sources]]` table, its common fields read.
pub struct SourceTable<'a> {
    pub name: SourceName,
    /// The `kind` it names (which the config does not check).
    pub kind: String,
    /// When `run` starts a pass.
    pub schedule: Schedule,
    /// Every other field. The kind reads its own, and then the secret files
    /// ([`FieldContext::read_secret_files`]) of the rest.
    pub fields: Table,
    /// Where the fields are, for errors and checks.
    pub context: FieldContext<'a>,
}

/// The fields of a table of the config file.
pub type Table = config::Map<String, config::Value>;

/// How `deptsync run` behaves.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// Where to serve `/metrics` and `/healthz`; none when not set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long a shutdown waits for passes to commit the page in hand.
    pub shutdown_timeout: Duration,
    /// How long a source's lease lasts without renewal: a replica that dies frees its
    /// sources after at most this long. Default [`DEFAULT_LEASE_TTL`].
    pub lease_ttl: Duration,
    /// How many passes one process runs at once; the rest wait for the next free slot.
    /// Default [`DEFAULT_MAX_CONCURRENT_PASSES`].
    pub max_concurrent_passes: usize,
}

/// The default `[daemon] shutdown_timeout`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The default `[daemon] lease_ttl`.
pub const DEFAULT_LEASE_TTL: Duration = crate::store::lease::DEFAULT_TTL;

/// The default `[daemon] max_concurrent_passes`.
pub const DEFAULT_MAX_CONCURRENT_PASSES: usize = 8;

/// The default `[database] max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = crate::store::DEFAULT_MAX_CONNECTIONS;

/// Where the store lives: a PostgreSQL URL or an SQLite one. `Debug` and
/// [`DatabaseSettings::redacted_url`] never show the password.
#[derive(Debug)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub kind: DatabaseKind,
    /// `statement_timeout`: how long one statement may run (PostgreSQL ends it), and so
    /// what bounds every database call (see [`crate::store::call_timeout`]). Default
    /// [`crate::store::DEFAULT_STATEMENT_TIMEOUT`].
    pub statement_timeout: Duration,
    /// The most database connections one process opens, whatever the number of sources.
    /// Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: u32,
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
    include: Option<RawInclude>,
    #[serde(default)]
    sources: Vec<config::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<SecretString>,
    url_file: Option<String>,
    statement_timeout: Option<String>,
    max_connections: Option<config::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    metrics_listen: Option<String>,
    shutdown_timeout: Option<String>,
    lease_ttl: Option<String>,
    max_concurrent_passes: Option<config::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInclude {
    /// A glob pattern, or a list of them.
    sources: config::Value,
}

/// A file named by `[include] sources`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncludedFile {
    #[serde(default)]
    sources: Vec<config::Value>,
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
    /// Parses a cron schedule with seconds.
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

    /// The first time after `t` the schedule fires: a whole second (the cron parser
    /// would carry `t`'s fraction of a second into it).
    pub fn next_after(
        &self,
        t: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let whole = chrono::DurationRound::duration_trunc(t, chrono::TimeDelta::seconds(1)).ok()?;
        self.cron.find_next_occurrence(&whole, false).ok()
    }

    /// The time between the next two firings after `t`: the interval a pass is expected
    /// every.
    pub fn interval_after(&self, t: chrono::DateTime<chrono::Utc>) -> Option<chrono::Duration> {
        let first = self.next_after(t)?;
        let second = self.next_after(first)?;
        Some(second - first)
    }
}

impl<S: SourceEntry> Settings<S> {
    /// Reads the file at `path` and validates it, with the files its `[include]` names.
    /// Reads those files and the environment; touches nothing else. Every error names the
    /// file it is in.
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Settings<S>, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.to_owned(),
                message: "not found (pass --config FILE)".to_owned(),
            });
        }
        let text = read_config_file(path)?;
        Settings::from_text(&text, Some(path), env)
    }

    /// Parses and validates TOML text. Text has no directory for `[include]` patterns to be
    /// relative to, so an `[include]` is refused: read such a config with
    /// [`Settings::load`].
    pub fn parse(toml: &str, env: EnvLookup<'_>) -> Result<Settings<S>, ConfigError> {
        Settings::from_text(toml, None, env)
    }

    /// Validates `toml`, the text of the config file at `path` when it has one: then its
    /// errors name that path, and the files its `[include]` names are read.
    fn from_text(
        toml: &str,
        path: Option<&Path>,
        env: EnvLookup<'_>,
    ) -> Result<Settings<S>, ConfigError> {
        let in_this_file = |error: ConfigError| error.in_file(path);
        let raw: RawConfig = parse_toml(toml).map_err(in_this_file)?;
        let include_patterns = raw
            .include
            .map(|include| include_patterns(include.sources))
            .transpose()
            .map_err(in_this_file)?;
        let database =
            database_settings(raw.database.unwrap_or_default(), env).map_err(in_this_file)?;
        let daemon = daemon_settings(raw.daemon).map_err(in_this_file)?;

        let mut sources = SourceList::default();
        sources.add_tables(raw.sources, path, env)?;
        if let Some(patterns) = include_patterns {
            let Some(path) = path else {
                return Err(ConfigError::top(
                    "include.sources",
                    "include needs a config file, whose directory its patterns are relative \
                     to: read the config with Settings::load",
                ));
            };
            for included in included_files(&patterns, path).map_err(in_this_file)? {
                let text = read_config_file(&included)?;
                let raw: RawIncludedFile =
                    parse_toml(&text).map_err(|e| e.in_file(Some(&included)))?;
                sources.add_tables(raw.sources, Some(&included), env)?;
            }
        }

        Ok(Settings {
            database,
            daemon,
            sources: sources.sources,
        })
    }
}

/// The sources validated so far, with the file each is in, so that a name used twice is
/// refused naming both files.
struct SourceList<S> {
    sources: Vec<S>,
    /// The file each name is in (none for text read without a file).
    files_by_name: HashMap<SourceName, Option<PathBuf>>,
}

impl<S> Default for SourceList<S> {
    fn default() -> Self {
        SourceList {
            sources: Vec::new(),
            files_by_name: HashMap::new(),
        }
    }
}

impl<S: SourceEntry> SourceList<S> {
    /// Validates the `[[sources]]` tables of `file` and adds them. Errors name `file`.
    fn add_tables(
        &mut self,
        tables: Vec<config::Value>,
        file: Option<&Path>,
        env: EnvLookup<'_>,
    ) -> Result<(), ConfigError> {
        self.sources.reserve(tables.len());
        for (index, value) in tables.into_iter().enumerate() {
            self.add(index, value, file, env)
                .map_err(|error| error.in_file(file))?;
        }
        Ok(())
    }

    /// Validates the `index`th `[[sources]]` table of `file` and adds it.
    fn add(
        &mut self,
        index: usize,
        value: config::Value,
        file: Option<&Path>,
        env: EnvLookup<'_>,
    ) -> Result<(), ConfigError> {
        let table = source_table(index, value, env)?;
        if let Some(first_file) = self.files_by_name.get(&table.name) {
            let message = match (first_file, file) {
                (Some(first_file), Some(file)) if first_file != file => format!(
                    "is used by more than one source: here and in {}; names must be unique",
                    first_file.display()
                ),
                _ => "is used by more than one source; names must be unique".to_owned(),
            };
            return Err(ConfigError::Invalid {
                location: format!("source \"{}\": field `name`", table.name),
                message,
            });
        }
        self.files_by_name
            .insert(table.name.clone(), file.map(Path::to_owned));
        self.sources.push(S::from_table(table)?);
        Ok(())
    }
}

/// Reads a config file, or says which one could not be read.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Reads TOML text as `T`. A syntax error names its line but never quotes it.
fn parse_toml<T: DeserializeOwned>(toml: &str) -> Result<T, ConfigError> {
    config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Invalid {
            location: "config".to_owned(),
            message: with_duplicate_key_named(&without_quoted_lines(&e.to_string()), toml),
        })
}

fn database_settings(
    database: RawDatabase,
    env: EnvLookup<'_>,
) -> Result<DatabaseSettings, ConfigError> {
    let statement_timeout = duration_in(
        "database.statement_timeout",
        database.statement_timeout,
        Duration::from_millis(100)..=Duration::from_secs(3600),
        crate::store::DEFAULT_STATEMENT_TIMEOUT,
        "60s",
    )?;
    let max_connections = count_in(
        "database.max_connections",
        database.max_connections,
        1..=1000,
        DEFAULT_MAX_CONNECTIONS,
    )?;
    let url_from_file = match database.url_file {
        None => None,
        Some(path) => Some(
            read_secret_file(&path, env).map_err(|m| ConfigError::top("database.url_file", m))?,
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
    Ok(DatabaseSettings {
        url,
        kind,
        statement_timeout,
        max_connections,
    })
}

fn daemon_settings(daemon: RawDaemon) -> Result<DaemonSettings, ConfigError> {
    let metrics_listen = match daemon.metrics_listen {
        None => None,
        Some(text) => Some(text.parse().map_err(|e| {
            ConfigError::top(
                "daemon.metrics_listen",
                format!("{text:?} is not an address like \"127.0.0.1:9187\": {e}"),
            )
        })?),
    };
    let shutdown_timeout = duration_in(
        "daemon.shutdown_timeout",
        daemon.shutdown_timeout,
        Duration::ZERO..=Duration::MAX,
        DEFAULT_SHUTDOWN_TIMEOUT,
        "10s",
    )?;
    let lease_ttl = duration_in(
        "daemon.lease_ttl",
        daemon.lease_ttl,
        Duration::from_secs(1)..=Duration::from_secs(600),
        DEFAULT_LEASE_TTL,
        "30s",
    )?;
    let max_concurrent_passes = count_in(
        "daemon.max_concurrent_passes",
        daemon.max_concurrent_passes,
        1..=1024,
        DEFAULT_MAX_CONCURRENT_PASSES,
    )?;
    Ok(DaemonSettings {
        metrics_listen,
        shutdown_timeout,
        lease_ttl,
        max_concurrent_passes,
    })
}

/// The duration `field` of the config's own sections, written `text`, in `range`;
/// `default` when not given. `example` shows the form in errors.
fn duration_in(
    field: &str,
    text: Option<String>,
    range: RangeInclusive<Duration>,
    default: Duration,
    example: &str,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let duration = humantime::parse_duration(&text).map_err(|e| {
        ConfigError::top(
            field,
            format!("{text:?} is not a duration like \"{example}\": {e}"),
        )
    })?;
    if !range.contains(&duration) {
        return Err(ConfigError::top(
            field,
            format!(
                "{text:?} is not between {} and {}",
                humantime::format_duration(*range.start()),
                humantime::format_duration(*range.end())
            ),
        ));
    }
    Ok(duration)
}

/// The integer `field` of the config's own sections, in `range`; `default` when not given.
/// Only an integer is taken: `2.5` or `"8"` is refused, not rounded or parsed.
fn count_in<T>(
    field: &str,
    value: Option<config::Value>,
    range: RangeInclusive<T>,
    default: T,
) -> Result<T, ConfigError>
where
    T: TryFrom<i64> + PartialOrd + std::fmt::Display,
{
    let Some(value) = value else {
        return Ok(default);
    };
    let config::ValueKind::I64(number) = value.kind else {
        return Err(ConfigError::top(
            field,
            format!("must be an integer, got {}", value.kind),
        ));
    };
    T::try_from(number)
        .ok()
        .filter(|number| range.contains(number))
        .ok_or_else(|| {
            ConfigError::top(
                field,
                format!(
                    "must be between {} and {}, got {number}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// The patterns of `[include] sources` (one glob pattern or a list of them), each checked.
fn include_patterns(value: config::Value) -> Result<Vec<String>, ConfigError> {
    const FIELD: &str = "include.sources";
    let not_a_pattern = || {
        ConfigError::top(
            FIELD,
            "must be a glob pattern such as \"sources.d/*.toml\", or a list of them",
        )
    };
    let patterns = match value.kind {
        config::ValueKind::String(pattern) => vec![pattern],
        config::ValueKind::Array(values) => values
            .into_iter()
            .map(|value| match value.kind {
                config::ValueKind::String(pattern) => Ok(pattern),
                _ => Err(not_a_pattern()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(not_a_pattern()),
    };
    for pattern in &patterns {
        if pattern.is_empty() {
            return Err(ConfigError::top(FIELD, "a pattern is empty"));
        }
        glob::Pattern::new(pattern).map_err(|e| {
            ConfigError::top(FIELD, format!("{pattern:?} is not a glob pattern: {e}"))
        })?;
    }
    Ok(patterns)
}

/// The files `patterns` match, relative to the directory of the config file at
/// `config_path`: sorted by path, each once. As in a shell, `*` does not match a leading
/// `.`; directories are skipped.
fn included_files(patterns: &[String], config_path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let directory = config_path.parent().unwrap_or(Path::new(""));
    // Patterns are text: a directory that is not would silently match nothing.
    let Some(directory_text) = directory.to_str() else {
        return Err(ConfigError::File {
            path: directory.to_owned(),
            message: "is not UTF-8, so no `include.sources` pattern can be relative to it"
                .to_owned(),
        });
    };
    // The directory is matched literally, whatever characters its name has.
    let directory = glob::Pattern::escape(directory_text);
    let options = glob::MatchOptions {
        require_literal_leading_dot: true,
        ..glob::MatchOptions::new()
    };
    let mut files = BTreeSet::new();
    for pattern in patterns {
        // An absolute pattern stays as it is.
        let full_pattern = Path::new(&directory).join(pattern);
        let matches = glob::glob_with(&full_pattern.to_string_lossy(), options).map_err(|e| {
            ConfigError::top(
                "include.sources",
                format!("{pattern:?} is not a glob pattern: {e}"),
            )
        })?;
        for entry in matches {
            let path = entry.map_err(|e| ConfigError::File {
                path: e.path().to_owned(),
                message: e.error().to_string(),
            })?;
            if path.is_file() {
                files.insert(path);
            }
        }
    }
    Ok(files.into_iter().collect())
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
    source: String,
    pub env: EnvLookup<'a>,
    /// `allow_insecure_http`: the source may send its credentials over plain `http://`
    /// to a host that is not loopback.
    allow_insecure_http: bool,
}

impl FieldContext<'_> {
    /// A context for source `source`, for the tests of the modules that use one.
    #[cfg(test)]
    pub(crate) fn for_tests<'a>(source: &str, env: EnvLookup<'a>) -> FieldContext<'a> {
        FieldContext {
            source: source.to_owned(),
            env,
            allow_insecure_http: false,
        }
    }

    /// Reads `table` as a `T` (a kind's fields), naming the field serde complains of.
    /// `shared` lists the fields every kind takes, for an unknown field's message.
    pub fn deserialize<T: DeserializeOwned>(
        &self,
        table: Table,
        shared: &str,
    ) -> Result<T, ConfigError> {
        let value = config::Value::new(None, config::ValueKind::Table(table));
        value.try_deserialize::<T>().map_err(|e| {
            let mut message = e.to_string();
            // serde names the offending field in its message ("unknown field `x`",
            // "missing field `y`", "... for key `z`"); pull it out so that the location
            // names it.
            let field = field_named_in(&message).unwrap_or_else(|| "?".to_owned());
            if message.contains("expected one of") {
                // The kind's own fields only: the ones every kind takes are where typos
                // are.
                message.push_str(&format!(", or one every kind takes: {shared}"));
            }
            self.error(&field, message)
        })
    }

    /// Replaces every `X_file = "path"` of `table` by `X` = the file's content (see
    /// [`read_secret_file`]), so that any secret can come from a file.
    pub fn read_secret_files(&self, table: &mut Table) -> Result<(), ConfigError> {
        load_secret_files(table, self)
    }

    /// Takes the optional field `key` out of `table`, as text.
    pub fn take_text(&self, table: &mut Table, key: &str) -> Result<Option<String>, ConfigError> {
        table
            .remove(key)
            .map(|v| v.into_string().map_err(|e| self.error(key, e.to_string())))
            .transpose()
    }

    /// Takes the optional integer field `key` out of `table`, in `range`.
    pub fn take_int(
        &self,
        table: &mut Table,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        unit: &str,
    ) -> Result<Option<i64>, ConfigError> {
        match table.remove(key) {
            None => Ok(None),
            Some(v) => match v.into_int() {
                Ok(n) if range.contains(&n) => Ok(Some(n)),
                Ok(n) => Err(self.error(
                    key,
                    format!(
                        "must be between {} and {}{unit}, got {n}",
                        range.start(),
                        range.end()
                    ),
                )),
                Err(e) => Err(self.error(key, e.to_string())),
            },
        }
    }

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
                source = %self.source,
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

/// Reads the fields every source has from the `index`th `[[sources]]` table, and its
/// secret files.
fn source_table(
    index: usize,
    value: config::Value,
    env: EnvLookup<'_>,
) -> Result<SourceTable<'_>, ConfigError> {
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
    let context = FieldContext {
        source: name.as_str().to_owned(),
        env,
        allow_insecure_http,
    };
    let kind = take_string(&mut table, "kind").map_err(|m| context.error("kind", m))?;
    let schedule = context
        .take_text(&mut table, "schedule")?
        .unwrap_or_else(|| DEFAULT_SCHEDULE.to_owned());
    let schedule = Schedule::parse(&schedule).map_err(|m| context.error("schedule", m))?;
    Ok(SourceTable {
        name,
        kind,
        schedule,
        fields: table,
        context,
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

fn take_string(table: &mut Table, key: &str) -> Result<String, String> {
    match table.remove(key) {
        None => Err("missing".to_owned()),
        Some(v) => v.into_string().map_err(|e| e.to_string()),
    }
}

/// Replaces every `X_file = "path"` of a source by `X` = the file's content, so that any
/// secret can come from a file (systemd's `LoadCredential=`) instead of the config or the
/// environment.
fn load_secret_files(table: &mut Table, fields: &FieldContext<'_>) -> Result<(), ConfigError> {
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

    #[test]
    fn passwords_are_redacted_from_database_urls() {
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=hunter2"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://deptsync:hunter2@127.0.0.1:5432/deptsync"),
            "postgres://deptsync:***@127.0.0.1:5432/deptsync"
        );
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
