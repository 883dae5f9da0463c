//! A configured source: the fields every kind shares, read here, and its kind's own,
//! handed to the kind's module through the registry ([`super::kinds`]).

use super::http::{HTTP_FIELDS, HttpSettings};
use super::kinds::KindSettings;
use crate::config::{
    COMMON_SOURCE_FIELDS, ConfigError, Schedule, SourceEntry, SourceName, SourceTable,
};

/// One configured source.
#[derive(Debug)]
pub struct SourceSettings {
    pub name: SourceName,
    /// When `run` starts a pass.
    pub schedule: Schedule,
    /// Timeouts, retries and rate limit of its requests.
    pub http: HttpSettings,
    pub kind: KindSettings,
}

impl SourceEntry for SourceSettings {
    fn from_table(table: SourceTable<'_>) -> Result<SourceSettings, ConfigError> {
        let SourceTable {
            name,
            schedule,
            mut fields,
            context,
        } = table;
        let kind = context
            .take_text(&mut fields, "kind")?
            .ok_or_else(|| context.error("kind", "missing"))?;
        let mut http = HttpSettings::take_from(&mut fields, &context)?;
        let shared = format!("`kind`, {HTTP_FIELDS}, {COMMON_SOURCE_FIELDS}");
        let kind = KindSettings::parse(&kind, fields, &context, &shared)?;
        http.rate_limit = http.rate_limit.or(kind.default_rate_limit());
        Ok(SourceSettings {
            name,
            schedule,
            http,
            kind,
        })
    }
}

#[cfg(test)]
mod tests;
