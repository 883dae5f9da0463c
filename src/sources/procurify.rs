//! Procurify API v3: `GET {base_url}/api/v3/departments/?page=N&page_size=M`.
//!
//! - Machine-to-machine auth: OAuth2 client credentials posted as JSON with the audience
//!   `https://api.procurify.com/`; every call sends `Authorization: Bearer` and
//!   `X-Procurify-Client: api`.
//! - Django REST Framework paging: `metadata.pagination.next` is null on the last page, and
//!   a page past the end is a 404.
//! - No updated-since filter and no timestamps: every pass reads the whole listing.
//!
//! The cursor is `{"page": N, "count": C}`: the page to read and the total the listing
//! reported on its first page. A different total, or a 404 for a page the listing said
//! exists, means records were added or removed while it was read and pages may have
//! shifted: the listing is reported as changed and starts again.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::http::{Auth, ClientCredentials, ErrorBody, SourceClient, TokenRequestStyle, Vendor};
use super::kinds::SourceKind;
use super::paging::PageMeta;
use super::{
    FullListingMode, ListingSource, Page, Records, Source, SourceError, VendorRecord,
    decode_cursor, encode_cursor, fingerprint,
};
use crate::config::{ConfigError, FieldContext};
use crate::model::{Department, RawRecord};

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
const AUDIENCE: &str = "https://api.procurify.com/";
const ENDPOINT: &str = "api/v3/departments/";
const VENDOR: Vendor = Vendor {
    errors: ErrorBody {
        message_field: "detail",
        request_id_field: None,
    },
    request_id_header: None,
    shrink_on_408: false,
};

/// A `kind = "procurify"` source as written in the config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcurifyConfig {
    base_url: String,
    client_id: String,
    client_secret: SecretString,
    token_url: Option<String>,
    page_size: Option<i64>,
    max_delete_fraction: Option<f64>,
}

/// A validated Procurify source.
#[derive(Debug, Clone)]
pub struct ProcurifySettings {
    pub base_url: reqwest::Url,
    pub credentials: ClientCredentials,
    pub page_size: u32,
    pub max_delete_fraction: f64,
}

/// A configured token URL is an endpoint, not a base: keep it as it was written.
fn without_trailing_slash(mut url: reqwest::Url) -> reqwest::Url {
    let path = url.path().trim_end_matches('/').to_owned();
    if !path.is_empty() {
        url.set_path(&path);
    }
    url
}

/// The Procurify connector.
pub struct Procurify {
    settings: ProcurifySettings,
    endpoint: reqwest::Url,
    client: SourceClient,
    auth: Auth,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Cursor {
    page: u64,
    count: u64,
}

#[derive(Deserialize)]
struct ListResponse {
    metadata: Metadata,
    data: Records<ProcurifyDepartment>,
}

#[derive(Deserialize)]
struct Metadata {
    pagination: Pagination,
}

#[derive(Deserialize)]
struct Pagination {
    count: u64,
    next: Option<String>,
    /// The page size the server used, which may be less than the one asked for.
    page_size: Option<u64>,
    num_pages: Option<u64>,
}

#[derive(Deserialize)]
struct ProcurifyDepartment {
    id: i64,
    name: String,
    branch: Branch,
    active: bool,
}

/// `branch` is an object when read (an integer only in write bodies); take either.
#[derive(Deserialize)]
#[serde(untagged)]
enum Branch {
    Object { id: i64 },
    Id(i64),
}

impl Procurify {
    async fn list(&self, page: u64, page_size: u32) -> Result<Option<ListResponse>, SourceError> {
        let called = self
            .client
            .call(&VENDOR, Some(&self.auth), || {
                self.client
                    .get(self.endpoint.clone())
                    .query(&[
                        ("page", page.to_string()),
                        ("page_size", page_size.to_string()),
                    ])
                    .header("X-Procurify-Client", "api")
                    .header("Accept", "application/json")
            })
            .await;
        match called {
            Ok(replied) => replied.into_json().map(Some),
            // A page past the end: the listing is shorter than it said.
            Err(SourceError::Http { status: 404, .. }) if page > 1 => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl VendorRecord for ProcurifyDepartment {
    const VENDOR: &'static str = "Procurify";
    const ID_FIELD: &'static str = "id";

    fn into_department(self, raw: RawRecord) -> Department {
        Department {
            external_id: self.id.to_string(),
            scope_id: Some(match self.branch {
                Branch::Object { id } | Branch::Id(id) => id.to_string(),
            }),
            name: self.name,
            is_active: self.active,
            parent_external_id: None,
            source_created_at: None,
            source_updated_at: None,
            raw,
        }
    }
}

impl SourceKind for Procurify {
    const KIND: &'static str = "procurify";
    type Config = ProcurifyConfig;
    type Settings = ProcurifySettings;

    fn validate(
        config: ProcurifyConfig,
        fields: &FieldContext<'_>,
    ) -> Result<ProcurifySettings, ConfigError> {
        let base_url = fields.base_url("base_url", &config.base_url)?;
        let token_url = match &config.token_url {
            Some(url) => fields.base_url("token_url", url)?,
            // Joining a plain relative path onto a base URL ending in '/' cannot fail.
            None => base_url
                .join("oauth/token")
                .map_err(|e| fields.error("base_url", e.to_string()))?,
        };
        if config.client_id.trim().is_empty() {
            return Err(fields.error("client_id", "must not be empty"));
        }
        Ok(ProcurifySettings {
            credentials: ClientCredentials {
                token_url: without_trailing_slash(token_url),
                client_id: config.client_id,
                client_secret: fields.secret("client_secret", config.client_secret)?,
                style: TokenRequestStyle::Json {
                    audience: AUDIENCE.to_owned(),
                },
            },
            base_url,
            page_size: fields.count(
                "page_size",
                config.page_size,
                DEFAULT_PAGE_SIZE,
                MAX_PAGE_SIZE,
            )?,
            max_delete_fraction: fields.delete_fraction(config.max_delete_fraction)?,
        })
    }

    fn credential(settings: &ProcurifySettings) -> &str {
        &settings.credentials.client_id
    }

    fn connect(settings: ProcurifySettings, client: SourceClient) -> Procurify {
        let endpoint = super::http::endpoint(&settings.base_url, ENDPOINT);
        let auth = Auth::client_credentials(settings.credentials.clone());
        Procurify {
            settings,
            endpoint,
            client,
            auth,
        }
    }
}

impl Source for Procurify {
    fn scope(&self) -> String {
        fingerprint(&["procurify", self.settings.base_url.as_str()])
    }

    async fn check(&self) -> Result<(), SourceError> {
        self.list(1, 1).await.map(|_| ())
    }
}

impl ListingSource for Procurify {
    fn listing(&self) -> FullListingMode {
        FullListingMode {
            max_delete_fraction: self.settings.max_delete_fraction,
            scope_noun: "branch",
            scopes: None,
        }
    }

    async fn fetch_listing_page(&self, cursor: Option<&str>) -> Result<Page, SourceError> {
        let expected: Option<Cursor> = decode_cursor(cursor)?;
        let page = expected.as_ref().map_or(1, |c| c.page);
        let Some(response) = self.list(page, self.settings.page_size).await? else {
            return Err(SourceError::ListingChanged(format!(
                "page {page} is no longer there (404)"
            )));
        };
        let count = response.metadata.pagination.count;
        if let Some(expected) = expected.filter(|c| c.count != count) {
            return Err(SourceError::ListingChanged(format!(
                "it had {} departments on its first page and {count} on page {page}",
                expected.count
            )));
        }
        let pagination = &response.metadata.pagination;
        let more = PageMeta {
            page,
            served: response.data.len() as u64,
            total: count,
            per_page: pagination.page_size,
            pages: pagination.num_pages,
            has_next: Some(pagination.next.is_some()),
        }
        .next_page_follows()
        .map_err(|message| SourceError::Protocol {
            message,
            request_id: None,
        })?;
        let next_cursor = more.then(|| {
            encode_cursor(&Cursor {
                page: page + 1,
                count,
            })
        });
        Ok(Page::from_records(response.data, next_cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn departments(json: &str) -> Page {
        let records: Records<ProcurifyDepartment> =
            serde_json::from_str(json).expect("a list of records");
        Page::from_records(records, None)
    }

    #[test]
    fn the_branch_is_the_scope_whether_an_object_or_an_id() {
        let page = departments(
            r#"[{"id": 1, "name": "Ops", "branch": {"id": 7, "name": "HQ"}, "active": true},
                {"id": 2, "name": "Old", "branch": 8, "active": false}]"#,
        );
        let read: Vec<(&str, Option<&str>, bool)> = page
            .departments
            .iter()
            .map(|d| (d.external_id.as_str(), d.scope_id.as_deref(), d.is_active))
            .collect();
        assert_eq!(read, [("1", Some("7"), true), ("2", Some("8"), false)]);
        // Procurify says nothing of when a department changed.
        assert!(
            page.departments
                .iter()
                .all(|d| d.source_updated_at.is_none())
        );
    }

    #[test]
    fn a_cursor_says_the_page_and_the_count_the_listing_began_with() {
        let cursor = encode_cursor(&Cursor {
            page: 3,
            count: 250,
        });
        let decoded: Option<Cursor> = decode_cursor(Some(&cursor)).unwrap();
        assert_eq!(
            decoded,
            Some(Cursor {
                page: 3,
                count: 250
            })
        );
        // One saved by another version starts the listing again.
        let old = decode_cursor::<Cursor>(Some("3"));
        assert!(
            matches!(old, Err(SourceError::ListingChanged(_))),
            "{old:?}"
        );
    }
}
