//! A configured source: the fields every kind shares, read here, and its kind's own,
//! handed to the kind's module through the registry ([`super::kinds`]).

use super::http::{HTTP_FIELDS, HttpSettings};
use super::kinds::KindSettings;
use crate::config::{ConfigError, FieldContext, Schedule, SourceEntry, SourceName, SourceTable};

/// One configured source.
#[derive(Debug)]
pub struct SourceSettings {
    pub name: SourceName,
    /// When `run` starts a pass.
    pub schedule: Schedule,
    /// Timeouts, retries and rate limit of its requests.
    pub http: HttpSettings,
    /// How long closed versions of its departments are kept (`None`: for ever).
    pub history_retention: Option<std::time::Duration>,
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
        let history_retention = context
            .take_text(&mut fields, "history_retention")?
            .map(|text| history_retention(&context, &text))
            .transpose()?;
        context.read_secret_files(&mut fields)?;
        let shared = format!(
            "`name`, `kind`, `schedule`, {HTTP_FIELDS}, `history_retention`, \
             `allow_insecure_http`, and `X_file` for any secret field `X`"
        );
        let kind = KindSettings::parse(&kind, fields, &context, &shared)?;
        http.rate_limit = http.rate_limit.or(kind.default_rate_limit());
        Ok(SourceSettings {
            name,
            schedule,
            http,
            history_retention,
            kind,
        })
    }
}

/// The shortest `history_retention`: a downstream job that reads the change feed daily
/// sees every version before it is trimmed.
const MIN_HISTORY_RETENTION: std::time::Duration = std::time::Duration::from_secs(86_400);

fn history_retention(
    context: &FieldContext<'_>,
    text: &str,
) -> Result<std::time::Duration, ConfigError> {
    let retention = context.duration("history_retention", Some(text), MIN_HISTORY_RETENTION)?;
    if retention < MIN_HISTORY_RETENTION {
        return Err(context.error(
            "history_retention",
            format!("{text:?} is shorter than a day (\"1d\"), the least history kept"),
        ));
    }
    Ok(retention)
}

#[cfg(test)]
mod tests;
