//! The HTTP plumbing every connector shares: one client, and turning responses into
//! values or into errors that say what the vendor said.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;

use super::SourceError;

/// Connect timeout: a vendor that cannot be reached in this time is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request timeout: a page that takes longer than this is not coming.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The one HTTP client of the process (it pools connections per host).
pub fn build_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("deptsync/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .gzip(true)
        .build()
}

/// The vendor's request id from `header`, if the response carries one.
pub fn request_id(headers: &HeaderMap, header: &str) -> Option<String> {
    headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Reads the whole body and decodes it as JSON. A body that is cut short or is not the
/// JSON we expect is a [`SourceError::Decode`] naming the request.
pub async fn read_json<T: DeserializeOwned>(
    response: reqwest::Response,
    request_id: Option<&str>,
) -> Result<T, SourceError> {
    let body = response.bytes().await.map_err(|e| SourceError::Decode {
        message: format!("body could not be read: {e}"),
        request_id: request_id.map(str::to_owned),
    })?;
    serde_json::from_slice(&body).map_err(|e| SourceError::Decode {
        message: e.to_string(),
        request_id: request_id.map(str::to_owned),
    })
}

/// Where a vendor puts the explanation in an error body.
pub struct ErrorBody<'a> {
    pub message_field: &'a str,
    /// The body's own request id field, used when the header is missing.
    pub request_id_field: Option<&'a str>,
}

/// Turns an error response into [`SourceError::Http`], with the vendor's message when its
/// body has one, and the start of the body otherwise.
pub async fn error_from_response(
    response: reqwest::Response,
    request_id: Option<String>,
    fields: ErrorBody<'_>,
) -> SourceError {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let parsed = serde_json::from_str::<serde_json::Value>(&body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get(fields.message_field))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let snippet: String = body.chars().take(200).collect();
            if snippet.is_empty() {
                "(empty body)".to_owned()
            } else {
                snippet
            }
        });
    let request_id = request_id.or_else(|| {
        let field = fields.request_id_field?;
        parsed.as_ref()?.get(field)?.as_str().map(str::to_owned)
    });
    SourceError::Http {
        status,
        message,
        request_id,
    }
}
