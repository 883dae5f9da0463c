//! Snapbooks API v2: `GET {base_url}/api/v2/departments?page=N&per_page=M`.
//!
//! - A bearer token, or one obtained with OAuth2 client credentials (a form post).
//! - `page` (from 1) and `per_page`; `meta.pages` says how many; the last is `page >= pages`.
//!   The server may serve fewer than `per_page` asks (`meta.per_page` says): its metadata,
//!   not the request, says where the listing ends ([`super::paging`]).
//! - The list holds only active departments unless asked with `is_active=null`: without
//!   it a deactivation would never be seen, so every request sends it. A record without
//!   `is_active` is active.
//! - One listing per configured client account (`client_account_id`), or one for all.
//!
//! The cursor is `{"account": A, "page": N, "records": R}`: the client account being read
//! (null for all), the page to read, and the total the account's listing reported on its
//! first page. A different total means the listing changed under its page numbers and
//! starts again.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::http::{Auth, ClientCredentials, ErrorBody, SourceClient, TokenRequestStyle, Vendor};
use super::kinds::SourceKind;
use super::paging::PageMeta;
use super::{
    FullListingMode, ListingSource, Page, Records, Source, SourceError, VendorRecord,
    decode_cursor, encode_cursor, fingerprint, id_set,
};
use crate::config::{ConfigError, FieldContext};
use crate::model::{Department, RawRecord};

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;
const ENDPOINT: &str = "api/v2/departments";
const VENDOR: Vendor = Vendor {
    errors: ErrorBody {
        message_field: "message",
        request_id_field: None,
    },
    request_id_header: None,
    shrink_on_408: false,
};

/// A `kind = "snapbooks"` source as written in the config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapbooksConfig {
    base_url: String,
    token: Option<SecretString>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    token_url: Option<String>,
    #[serde(default)]
    client_account_ids: Vec<i64>,
    page_size: Option<i64>,
    max_delete_fraction: Option<f64>,
}

/// How a Snapbooks source authenticates.
#[derive(Debug, Clone)]
pub enum SnapbooksAuth {
    Token(SecretString),
    ClientCredentials(ClientCredentials),
}

/// A validated Snapbooks source.
#[derive(Debug, Clone)]
pub struct SnapbooksSettings {
    pub base_url: reqwest::Url,
    pub auth: SnapbooksAuth,
    pub client_account_ids: Vec<i64>,
    pub page_size: u32,
    pub max_delete_fraction: f64,
}

/// The Snapbooks connector.
pub struct Snapbooks {
    settings: SnapbooksSettings,
    endpoint: reqwest::Url,
    client: SourceClient,
    auth: Auth,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    account: Option<i64>,
    page: u64,
    /// `None` until the account's first page has told it.
    records: Option<u64>,
}

#[derive(Deserialize)]
struct ListResponse {
    data: Records<SnapbooksDepartment>,
    meta: Meta,
}

#[derive(Deserialize)]
struct Meta {
    pages: u64,
    records: u64,
    /// The page size the server used, which may be less than the one asked for.
    per_page: Option<u64>,
}

/// A client account as logs and errors name it.
fn account_name(account: Option<i64>) -> String {
    account.map_or("(all)".to_owned(), |a| a.to_string())
}

#[derive(Deserialize)]
struct SnapbooksDepartment {
    id: i64,
    name: String,
    client_account_id: i64,
    /// Absent (older API versions) means active.
    is_active: Option<bool>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

impl Snapbooks {
    /// The listings of one pass: one per configured client account, or one for all.
    fn accounts(&self) -> Vec<Option<i64>> {
        if self.settings.client_account_ids.is_empty() {
            vec![None]
        } else {
            self.settings
                .client_account_ids
                .iter()
                .copied()
                .map(Some)
                .collect()
        }
    }

    async fn list(
        &self,
        account: Option<i64>,
        page: u64,
        per_page: u32,
    ) -> Result<ListResponse, SourceError> {
        let replied = self
            .client
            .call(&VENDOR, Some(&self.auth), || {
                let mut query = vec![
                    ("page", page.to_string()),
                    ("per_page", per_page.to_string()),
                    ("is_active", "null".to_owned()),
                ];
                if let Some(account) = account {
                    query.push(("client_account_id", account.to_string()));
                }
                self.client
                    .get(self.endpoint.clone())
                    .query(&query)
                    .header("Accept", "application/json")
            })
            .await?;
        replied.into_json()
    }
}

impl VendorRecord for SnapbooksDepartment {
    const VENDOR: &'static str = "Snapbooks";
    const ID_FIELD: &'static str = "id";

    fn into_department(self, raw: RawRecord) -> Department {
        Department {
            external_id: self.id.to_string(),
            scope_id: Some(self.client_account_id.to_string()),
            name: self.name,
            is_active: self.is_active.unwrap_or(true),
            parent_external_id: None,
            source_created_at: self.created_at,
            source_updated_at: self.updated_at,
            raw,
        }
    }
}

impl SourceKind for Snapbooks {
    const KIND: &'static str = "snapbooks";
    type Config = SnapbooksConfig;
    type Settings = SnapbooksSettings;

    fn validate(
        config: SnapbooksConfig,
        fields: &FieldContext<'_>,
    ) -> Result<SnapbooksSettings, ConfigError> {
        let base_url = fields.base_url("base_url", &config.base_url)?;
        let auth = match (
            config.token,
            config.client_id,
            config.client_secret,
            config.token_url,
        ) {
            (Some(token), None, None, None) => SnapbooksAuth::Token(fields.secret("token", token)?),
            (None, Some(client_id), Some(secret), Some(token_url)) => {
                if client_id.trim().is_empty() {
                    return Err(fields.error("client_id", "must not be empty"));
                }
                let mut token_url = fields.base_url("token_url", &token_url)?;
                let path = token_url.path().trim_end_matches('/').to_owned();
                token_url.set_path(&path);
                SnapbooksAuth::ClientCredentials(ClientCredentials {
                    token_url,
                    client_id,
                    client_secret: fields.secret("client_secret", secret)?,
                    style: TokenRequestStyle::Form,
                })
            }
            (Some(_), _, _, _) => {
                return Err(fields.error(
                    "token",
                    "give either `token` or `client_id` + `client_secret` + `token_url`, not both",
                ));
            }
            (None, client_id, secret, token_url) => {
                let missing = [
                    ("client_id", client_id.is_none()),
                    ("client_secret", secret.is_none()),
                    ("token_url", token_url.is_none()),
                ]
                .into_iter()
                .find(|(_, missing)| *missing)
                .map_or("token", |(field, _)| field);
                return Err(fields.error(
                    missing,
                    "missing: give `token`, or `client_id` + `client_secret` + `token_url`",
                ));
            }
        };
        if let Some(bad) = config.client_account_ids.iter().find(|id| **id <= 0) {
            return Err(fields.error(
                "client_account_ids",
                format!("{bad} is not a client account id"),
            ));
        }
        Ok(SnapbooksSettings {
            base_url,
            auth,
            client_account_ids: config.client_account_ids,
            page_size: fields.count(
                "page_size",
                config.page_size,
                DEFAULT_PAGE_SIZE,
                MAX_PAGE_SIZE,
            )?,
            max_delete_fraction: fields.delete_fraction(config.max_delete_fraction)?,
        })
    }

    fn credential(settings: &SnapbooksSettings) -> &str {
        match &settings.auth {
            SnapbooksAuth::Token(token) => token.expose_secret(),
            SnapbooksAuth::ClientCredentials(credentials) => &credentials.client_id,
        }
    }

    fn connect(settings: SnapbooksSettings, client: SourceClient) -> Snapbooks {
        let endpoint = super::http::endpoint(&settings.base_url, ENDPOINT);
        let auth = match &settings.auth {
            SnapbooksAuth::Token(token) => Auth::Bearer(token.clone()),
            SnapbooksAuth::ClientCredentials(credentials) => {
                Auth::client_credentials(credentials.clone())
            }
        };
        Snapbooks {
            settings,
            endpoint,
            client,
            auth,
        }
    }
}

impl Source for Snapbooks {
    fn scope(&self) -> String {
        let accounts = id_set(&self.settings.client_account_ids);
        fingerprint(&["snapbooks", self.settings.base_url.as_str(), &accounts])
    }

    async fn check(&self) -> Result<(), SourceError> {
        for account in self.accounts() {
            self.list(account, 1, 1).await?;
        }
        Ok(())
    }
}

impl ListingSource for Snapbooks {
    fn listing(&self) -> FullListingMode {
        let accounts = &self.settings.client_account_ids;
        FullListingMode {
            max_delete_fraction: self.settings.max_delete_fraction,
            scope_noun: "client account",
            scopes: (!accounts.is_empty())
                .then(|| accounts.iter().map(ToString::to_string).collect()),
        }
    }

    async fn fetch_listing_page(&self, cursor: Option<&str>) -> Result<Page, SourceError> {
        let accounts = self.accounts();
        let saved: Option<Cursor> = decode_cursor(cursor)?;
        // A saved account that is no longer configured: the listing starts again.
        let (index, expected) = match saved {
            None => (0, None),
            Some(saved) => match accounts.iter().position(|a| *a == saved.account) {
                Some(index) => (index, Some(saved)),
                None => {
                    return Err(SourceError::ListingChanged(
                        "the saved client account is no longer configured".to_owned(),
                    ));
                }
            },
        };
        let account = accounts[index];
        let page = expected.map_or(1, |c| c.page);
        let response = self.list(account, page, self.settings.page_size).await?;
        let records = response.meta.records;
        if let Some(first) = expected
            .and_then(|c| c.records)
            .filter(|first| *first != records)
        {
            return Err(SourceError::ListingChanged(format!(
                "client account {}: {first} departments on its first page, {records} on page {page}",
                account_name(account),
            )));
        }
        // The server's metadata, not the page size asked for, says whether a page follows:
        // a server that caps its pages serves fewer and says so.
        let more = PageMeta {
            page,
            served: response.data.len() as u64,
            total: records,
            per_page: response.meta.per_page,
            pages: Some(response.meta.pages),
            has_next: None,
        }
        .next_page_follows()
        .map_err(|message| SourceError::Protocol {
            message: format!("client account {}: {message}", account_name(account)),
            request_id: None,
        })?;
        let next = if more {
            Some(Cursor {
                account,
                page: page + 1,
                records: Some(records),
            })
        } else {
            accounts.get(index + 1).map(|next| Cursor {
                account: *next,
                page: 1,
                records: None,
            })
        };
        let next_cursor = next.as_ref().map(encode_cursor);
        Ok(Page::from_records(response.data, next_cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_department_without_is_active_is_active_and_keeps_its_account_and_times() {
        let records: Records<SnapbooksDepartment> = serde_json::from_str(
            r#"[{"id": 10, "name": "Payroll", "client_account_id": 4501,
                 "created_at": "2024-01-02T03:04:05Z"},
                {"id": 11, "name": "Old", "client_account_id": 4501, "is_active": false}]"#,
        )
        .expect("a list of records");
        let page = Page::from_records(records, None);
        let [active, inactive] = page.departments.as_slice() else {
            panic!("two departments");
        };
        assert!(active.is_active && !inactive.is_active);
        assert_eq!(active.scope_id.as_deref(), Some("4501"));
        assert!(active.source_created_at.is_some() && active.source_updated_at.is_none());
    }
}
