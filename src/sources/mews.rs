//! The Mews Connector API: `POST {base_url}/api/connector/v1/departments/getAll`.
//!
//! - Tokens and the client name travel in the JSON body, not in headers.
//! - `UpdatedUtc` filters by update time, at most three months at a time (half-open).
//! - Paging goes from newest to oldest: the response `Cursor` is the id of the oldest item
//!   returned, sent back as `Limitation.Cursor` for the next page. A null cursor or a page
//!   shorter than `Limitation.Count` ends the window; `204 No Content` is an empty page.
//! - Errors carry `{ "Message", "RequestId", "Details" }`, and every response a
//!   `Request-Id` header.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::http::{ErrorBody, RateLimit, Reply, SourceClient, Vendor};
use super::kinds::SourceKind;
use super::{
    Page, Records, Source, SourceError, VendorRecord, WindowedMode, WindowedSource, fingerprint,
    id_set,
};
use crate::config::{ConfigError, FieldContext};
use crate::model::{Department, RawRecord, Window};

/// The longest `UpdatedUtc` interval Mews accepts, in calendar months.
pub const MAX_WINDOW_MONTHS: u32 = 3;
/// The most departments Mews returns in one page (`Limitation.Count`).
pub const MAX_PAGE_SIZE: u32 = 1000;
/// The most ids `EnterpriseIds` takes in one call.
pub const MAX_ENTERPRISE_IDS: usize = 1000;
/// How many windows a pass reads at once by default: enough to keep the rate budget busy
/// while pages take their time to come back; the budget, not this, bounds the request rate.
pub const DEFAULT_CONCURRENT_WINDOWS: u32 = 4;
/// The most windows a pass may read at once.
pub const MAX_CONCURRENT_WINDOWS: u32 = 16;
/// The default overlap re-read on every incremental pass: covers clock skew and
/// updates committed late on the vendor's side.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(5 * 60);

/// Mews allows 200 requests per access token in a sliding 30 seconds; stay a little under.
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    requests: 180,
    per: Duration::from_secs(30),
};

const ENDPOINT: &str = "api/connector/v1/departments/getAll";
const VENDOR: Vendor = Vendor {
    errors: ErrorBody {
        message_field: "Message",
        request_id_field: Some("RequestId"),
    },
    request_id_header: Some("Request-Id"),
    shrink_on_408: true,
};

/// A `kind = "mews"` source as written in the config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MewsConfig {
    base_url: String,
    client_token: SecretString,
    access_token: SecretString,
    client: Option<String>,
    #[serde(default)]
    enterprise_ids: Vec<String>,
    start: String,
    page_size: Option<i64>,
    lookback: Option<String>,
    concurrent_windows: Option<i64>,
}

/// A validated Mews source.
#[derive(Debug, Clone)]
pub struct MewsSettings {
    pub base_url: reqwest::Url,
    pub client_token: SecretString,
    pub access_token: SecretString,
    pub client: String,
    pub enterprise_ids: Vec<Uuid>,
    pub start: DateTime<Utc>,
    pub page_size: u32,
    pub lookback: Duration,
    pub concurrent_windows: u32,
}

/// The Mews connector.
pub struct Mews {
    settings: MewsSettings,
    endpoint: reqwest::Url,
    client: SourceClient,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct GetAllRequest<'a> {
    client_token: &'a str,
    access_token: &'a str,
    client: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    enterprise_ids: &'a [Uuid],
    updated_utc: Interval,
    limitation: Limitation<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Interval {
    start_utc: String,
    end_utc: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Limitation<'a> {
    count: u32,
    cursor: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetAllResponse {
    departments: Records<MewsDepartment>,
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MewsDepartment {
    id: Uuid,
    enterprise_id: Uuid,
    is_active: bool,
    name: String,
    created_utc: DateTime<Utc>,
    updated_utc: DateTime<Utc>,
}

/// The page a response of at most `page_size` departments is. A null cursor or a short
/// page ends the window. (A cursor that comes back is the engine's to catch, for every
/// windowed source.)
fn page_of(response: GetAllResponse, page_size: u32) -> Page {
    let full_page = response.departments.len() >= page_size as usize;
    let next_cursor = response.cursor.filter(|_| full_page);
    Page::from_records(response.departments, next_cursor)
}

fn utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl Mews {
    async fn get_all(
        &self,
        window: &Window,
        cursor: Option<&str>,
        count: u32,
    ) -> Result<(Option<GetAllResponse>, Option<String>), SourceError> {
        let body = GetAllRequest {
            client_token: self.settings.client_token.expose_secret(),
            access_token: self.settings.access_token.expose_secret(),
            client: &self.settings.client,
            enterprise_ids: &self.settings.enterprise_ids,
            updated_utc: Interval {
                start_utc: utc(window.start),
                end_utc: utc(window.end),
            },
            limitation: Limitation { count, cursor },
        };
        let build = || {
            self.client
                .post(self.endpoint.clone())
                .header("Prefer", "return=minimal")
                .json(&body)
        };
        let replied = self
            .client
            .call::<GetAllResponse>(&VENDOR, None, build)
            .await?;
        match replied.reply {
            Reply::Json(page) => Ok((Some(page), replied.request_id)),
            Reply::NoContent => Ok((None, replied.request_id)),
        }
    }
}

impl VendorRecord for MewsDepartment {
    const VENDOR: &'static str = "Mews";
    const ID_FIELD: &'static str = "Id";

    fn into_department(self, raw: RawRecord) -> Department {
        Department {
            external_id: self.id.to_string(),
            scope_id: Some(self.enterprise_id.to_string()),
            name: self.name,
            is_active: self.is_active,
            parent_external_id: None,
            source_created_at: Some(self.created_utc),
            source_updated_at: Some(self.updated_utc),
            raw,
        }
    }
}

impl SourceKind for Mews {
    const KIND: &'static str = "mews";
    const DEFAULT_RATE_LIMIT: Option<RateLimit> = Some(DEFAULT_RATE_LIMIT);
    type Config = MewsConfig;
    type Settings = MewsSettings;

    fn validate(
        config: MewsConfig,
        fields: &FieldContext<'_>,
    ) -> Result<MewsSettings, ConfigError> {
        let base_url = fields.base_url("base_url", &config.base_url)?;
        let client = config
            .client
            .unwrap_or_else(|| format!("deptsync {}", env!("CARGO_PKG_VERSION")));
        if client.trim().is_empty() {
            return Err(fields.error("client", "must not be empty"));
        }
        if config.enterprise_ids.len() > MAX_ENTERPRISE_IDS {
            return Err(fields.error(
                "enterprise_ids",
                format!("Mews takes at most {MAX_ENTERPRISE_IDS} ids"),
            ));
        }
        let enterprise_ids = config
            .enterprise_ids
            .iter()
            .map(|id| {
                Uuid::parse_str(id).map_err(|e| {
                    fields.error("enterprise_ids", format!("{id:?} is not a UUID: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = DateTime::parse_from_rfc3339(&config.start)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                fields.error(
                    "start",
                    format!(
                        "{:?} is not an RFC 3339 time like 2019-01-01T00:00:00Z: {e}",
                        config.start
                    ),
                )
            })?;
        let page_size =
            fields.count("page_size", config.page_size, MAX_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let lookback = fields.duration("lookback", config.lookback.as_deref(), DEFAULT_LOOKBACK)?;
        let concurrent_windows = fields.count(
            "concurrent_windows",
            config.concurrent_windows,
            DEFAULT_CONCURRENT_WINDOWS,
            MAX_CONCURRENT_WINDOWS,
        )?;
        Ok(MewsSettings {
            base_url,
            client_token: fields.secret("client_token", config.client_token)?,
            access_token: fields.secret("access_token", config.access_token)?,
            client,
            enterprise_ids,
            start,
            page_size,
            lookback,
            concurrent_windows,
        })
    }

    fn credential(settings: &MewsSettings) -> &str {
        settings.access_token.expose_secret()
    }

    fn connect(settings: MewsSettings, client: SourceClient) -> Mews {
        // A base URL always ends in '/' (see FieldContext::base_url) and ENDPOINT is a relative
        // path, so joining cannot fail.
        let endpoint = super::http::endpoint(&settings.base_url, ENDPOINT);
        Mews {
            settings,
            endpoint,
            client,
        }
    }
}

impl Source for Mews {
    fn scope(&self) -> String {
        let enterprises = id_set(&self.settings.enterprise_ids);
        let start = utc(self.settings.start);
        fingerprint(&[
            "mews",
            self.settings.base_url.as_str(),
            &enterprises,
            &start,
        ])
    }

    async fn check(&self) -> Result<(), SourceError> {
        let end = Utc::now();
        let window = Window {
            start: end - chrono::Duration::hours(1),
            end,
        };
        self.get_all(&window, None, 1).await.map(|_| ())
    }
}

impl WindowedSource for Mews {
    fn windowing(&self) -> WindowedMode {
        WindowedMode {
            start: self.settings.start,
            lookback: self.settings.lookback,
            max_window_months: MAX_WINDOW_MONTHS,
            concurrent_windows: self.settings.concurrent_windows,
            page_size: self.settings.page_size,
        }
    }

    async fn fetch_window_page(
        &self,
        window: &Window,
        cursor: Option<&str>,
        page_size: u32,
    ) -> Result<Page, SourceError> {
        // The engine asks for fewer after a 408; never more than Mews takes.
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let (response, request_id) = self.get_all(window, cursor, page_size).await?;
        let Some(response) = response else {
            tracing::debug!(
                request_id = request_id.as_deref().unwrap_or(""),
                "empty page (204)"
            );
            return Ok(Page::default());
        };
        let received = response.departments.len();
        let mut page = page_of(response, page_size);
        tracing::debug!(
            request_id = request_id.as_deref().unwrap_or(""),
            received,
            more = page.next_cursor.is_some(),
            "page fetched"
        );
        page.request_id = request_id;
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPARTMENT: &str = r#"{"Id": "5f1c5d6a-0000-4000-8000-000000000001",
        "EnterpriseId": "5f1c5d6a-0000-4000-8000-0000000000e1", "IsActive": false,
        "Name": "Spa", "CreatedUtc": "2021-01-01T00:00:00Z",
        "UpdatedUtc": "2024-05-06T07:08:09Z"}"#;

    fn response(departments: &[&str], cursor: Option<&str>) -> GetAllResponse {
        let cursor = cursor.map_or("null".to_owned(), |c| format!("{c:?}"));
        let body = format!(
            r#"{{"Departments": [{}], "Cursor": {cursor}}}"#,
            departments.join(",")
        );
        serde_json::from_str(&body).expect("a Mews response")
    }

    #[test]
    fn a_department_keeps_its_enterprise_times_and_flag() {
        let page = page_of(response(&[DEPARTMENT], None), 10);
        let [department] = page.departments.as_slice() else {
            panic!("one department, got {:?}", page.departments.len());
        };
        assert_eq!(
            department.external_id,
            "5f1c5d6a-0000-4000-8000-000000000001"
        );
        assert_eq!(
            department.scope_id.as_deref(),
            Some("5f1c5d6a-0000-4000-8000-0000000000e1")
        );
        assert!(!department.is_active);
        assert_eq!(
            department.source_updated_at.map(utc).as_deref(),
            Some("2024-05-06T07:08:09Z")
        );
        assert_eq!(department.raw.as_str(), DEPARTMENT);
    }

    #[test]
    fn only_a_full_page_with_a_cursor_goes_on() {
        let two = [DEPARTMENT, DEPARTMENT];
        let cursor = Some("5f1c5d6a-0000-4000-8000-000000000001");
        assert!(page_of(response(&two, cursor), 2).next_cursor.is_some());
        // A short page ends the window, whatever cursor it carries.
        assert_eq!(page_of(response(&two, cursor), 3).next_cursor, None);
        // So does a null cursor after a full page.
        assert_eq!(page_of(response(&two, None), 2).next_cursor, None);
    }

    #[test]
    fn a_record_that_is_not_a_department_is_set_aside_with_its_id() {
        let broken = r#"{"Id": "5f1c5d6a-0000-4000-8000-000000000002", "Name": "no times"}"#;
        let page = page_of(response(&[DEPARTMENT, broken], None), 10);
        assert_eq!(page.departments.len(), 1);
        let [rejected] = page.rejected.as_slice() else {
            panic!("one rejected record");
        };
        assert_eq!(
            rejected.external_id.as_deref(),
            Some("5f1c5d6a-0000-4000-8000-000000000002")
        );
        assert!(
            rejected.reason.starts_with("not a Mews department"),
            "{}",
            rejected.reason
        );
    }
}
