//! The tenant data API: `GET {base_url}/v1/data/departments`.
//!
//! One bearer-authenticated GET returns every department as
//! `{"success": true, "result": [{"id", "parent_id", "name"}]}`: no paging, no timestamps,
//! no active flag. The content itself is the only change signal, and a department is
//! deleted when it is no longer listed. `parent_id` forms a tree.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::http::{Auth, ErrorBody, SourceClient, Vendor};
use super::kinds::SourceKind;
use super::{
    FullListingMode, ListingSource, Page, Records, Source, SourceError, VendorRecord, fingerprint,
};
use crate::config::{ConfigError, FieldContext};
use crate::model::{Department, RawRecord};

const ENDPOINT: &str = "v1/data/departments";
const VENDOR: Vendor = Vendor {
    errors: ErrorBody {
        message_field: "message",
        request_id_field: None,
    },
    request_id_header: None,
    shrink_on_408: false,
};

/// A `kind = "data_v1"` source as written in the config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataV1Config {
    base_url: String,
    token: SecretString,
    max_delete_fraction: Option<f64>,
}

/// A validated tenant data API source.
#[derive(Debug, Clone)]
pub struct DataV1Settings {
    pub base_url: reqwest::Url,
    pub token: SecretString,
    pub max_delete_fraction: f64,
}

/// The tenant data API connector.
pub struct DataV1 {
    settings: DataV1Settings,
    endpoint: reqwest::Url,
    client: SourceClient,
    auth: Auth,
}

#[derive(Deserialize)]
struct ListResponse {
    success: bool,
    #[serde(default)]
    result: Records<DataV1Department>,
}

#[derive(Deserialize)]
struct DataV1Department {
    id: String,
    parent_id: Option<String>,
    name: String,
}

impl DataV1 {
    async fn list(&self) -> Result<Records<DataV1Department>, SourceError> {
        let replied = self
            .client
            .call(&VENDOR, Some(&self.auth), || {
                self.client
                    .get(self.endpoint.clone())
                    .header("Accept", "application/json")
            })
            .await?;
        let listed: ListResponse = replied.into_json()?;
        if !listed.success {
            return Err(SourceError::Decode {
                message: "the API answered \"success\": false".to_owned(),
                request_id: None,
            });
        }
        Ok(listed.result)
    }
}

impl VendorRecord for DataV1Department {
    const VENDOR: &'static str = "data API";
    const ID_FIELD: &'static str = "id";

    fn into_department(self, raw: RawRecord) -> Department {
        Department {
            external_id: self.id,
            scope_id: None,
            name: self.name,
            is_active: true,
            parent_external_id: self.parent_id,
            source_created_at: None,
            source_updated_at: None,
            raw,
        }
    }
}

impl SourceKind for DataV1 {
    const KIND: &'static str = "data_v1";
    type Config = DataV1Config;
    type Settings = DataV1Settings;

    fn validate(
        config: DataV1Config,
        fields: &FieldContext<'_>,
    ) -> Result<DataV1Settings, ConfigError> {
        Ok(DataV1Settings {
            base_url: fields.base_url("base_url", &config.base_url)?,
            token: fields.secret("token", config.token)?,
            max_delete_fraction: fields.delete_fraction(config.max_delete_fraction)?,
        })
    }

    fn credential(settings: &DataV1Settings) -> &str {
        settings.token.expose_secret()
    }

    fn connect(settings: DataV1Settings, client: SourceClient) -> DataV1 {
        let endpoint = super::http::endpoint(&settings.base_url, ENDPOINT);
        let auth = Auth::Bearer(settings.token.clone());
        DataV1 {
            settings,
            endpoint,
            client,
            auth,
        }
    }
}

impl Source for DataV1 {
    fn scope(&self) -> String {
        fingerprint(&["data_v1", self.settings.base_url.as_str()])
    }

    async fn check(&self) -> Result<(), SourceError> {
        self.list().await.map(|_| ())
    }
}

impl ListingSource for DataV1 {
    fn listing(&self) -> FullListingMode {
        FullListingMode {
            max_delete_fraction: self.settings.max_delete_fraction,
            scope_noun: "scope",
            scopes: None,
        }
    }

    async fn fetch_listing_page(&self, cursor: Option<&str>) -> Result<Page, SourceError> {
        if cursor.is_some() {
            // The listing is one request, so it has no position but its start.
            return Err(SourceError::ListingChanged(
                "the data API is read in one request; a saved position is not one of its"
                    .to_owned(),
            ));
        }
        Ok(Page::from_records(self.list().await?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departments_keep_their_parent_and_a_missing_result_is_an_empty_list() {
        let response: ListResponse = serde_json::from_str(
            r#"{"success": true, "result": [
                {"id": "root", "parent_id": null, "name": "Company"},
                {"id": "hr", "parent_id": "root", "name": "HR"}]}"#,
        )
        .expect("a data API response");
        assert!(response.success);
        let page = Page::from_records(response.result, None);
        let tree: Vec<(&str, Option<&str>)> = page
            .departments
            .iter()
            .map(|d| (d.external_id.as_str(), d.parent_external_id.as_deref()))
            .collect();
        assert_eq!(tree, [("root", None), ("hr", Some("root"))]);
        assert!(
            page.departments
                .iter()
                .all(|d| d.is_active && d.scope_id.is_none())
        );

        let failed: ListResponse =
            serde_json::from_str(r#"{"success": false}"#).expect("a failure response");
        assert!(!failed.success && failed.result.len() == 0);
    }
}
