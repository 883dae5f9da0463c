//! A configured source: the fields every kind shares, read here, and its kind's own,
//! handed to the kind's module through the registry ([`super::kinds`]).

use super::http::{HTTP_FIELDS, HttpSettings};
use super::kinds::KindSettings;
use crate::config::{ConfigError, Schedule, SourceEntry, SourceName, SourceTable};

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
            kind,
            schedule,
            mut fields,
            context,
        } = table;
        let mut http = HttpSettings::take_from(&mut fields, &context)?;
        context.read_secret_files(&mut fields)?;
        let shared = format!(
            "`name`, `kind`, `schedule`, {HTTP_FIELDS}, `allow_insecure_http`, and `X_file` \
             for any secret field `X`"
        );
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
