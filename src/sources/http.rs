//! The HTTP plumbing every connector shares: one client, bearer and OAuth2
//! client-credentials auth, and turning responses into values or into errors that say
//! what the vendor said.

use std::time::Duration;

use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::SourceError;

/// Connect timeout: a vendor that cannot be reached in this time is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request timeout: a page that takes longer than this is not coming.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The one HTTP client of the process (it pools connections per host).
///
/// Redirects are not followed: a vendor API that redirects is misconfigured, and following
/// would resend the tokens (in Mews' case, in the request body) to another host.
pub fn build_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("deptsync/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .gzip(true)
        .build()
}

/// The HTTP client as one source uses it: every request it sends is counted by source
/// and status.
#[derive(Clone)]
pub struct SourceClient {
    client: reqwest::Client,
    source: std::sync::Arc<str>,
}

impl SourceClient {
    pub fn new(client: &reqwest::Client, source: &str) -> SourceClient {
        SourceClient {
            client: client.clone(),
            source: source.into(),
        }
    }

    pub fn get(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.client.get(url)
    }

    pub fn post(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.client.post(url)
    }

    /// Sends `request` and counts it.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SourceError> {
        match request.send().await {
            Ok(response) => {
                crate::metrics::http_request(&self.source, response.status().as_str());
                Ok(response)
            }
            Err(e) => {
                crate::metrics::http_request(&self.source, "error");
                Err(SourceError::Transport(e))
            }
        }
    }
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

/// How a token endpoint wants the client credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRequestStyle {
    /// A JSON body, with an `audience` (Procurify).
    Json { audience: String },
    /// A form body, as RFC 6749 describes.
    Form,
}

/// OAuth2 client credentials and where to exchange them for a token.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub token_url: reqwest::Url,
    pub client_id: String,
    pub client_secret: SecretString,
    pub style: TokenRequestStyle,
}

/// A token from client credentials and when to renew it.
pub struct CachedToken {
    token: SecretString,
    refresh_at: Instant,
    generation: u64,
}

/// How a connector proves who it is: a fixed bearer token, or one obtained with client
/// credentials, cached until shortly before it expires and renewed once when rejected.
pub enum Auth {
    Bearer(SecretString),
    ClientCredentials {
        credentials: Box<ClientCredentials>,
        cached: tokio::sync::Mutex<Option<CachedToken>>,
    },
}

/// A token is renewed this long before the expiry its endpoint announced (at most a tenth
/// of its life), so that it does not expire in flight.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Assumed life of a token whose endpoint does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    expires_in: Option<u64>,
}

impl Auth {
    pub fn client_credentials(credentials: ClientCredentials) -> Auth {
        Auth::ClientCredentials {
            credentials: Box::new(credentials),
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The token to send, and its generation (to renew exactly the one that was rejected).
    async fn token(&self, client: &SourceClient) -> Result<(SecretString, u64), SourceError> {
        let (credentials, cached) = match self {
            Auth::Bearer(token) => return Ok((token.clone(), 0)),
            Auth::ClientCredentials {
                credentials,
                cached,
            } => (credentials, cached),
        };
        let mut cached = cached.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok((token.token.clone(), token.generation));
        }
        let generation = cached.as_ref().map_or(1, |t| t.generation + 1);
        let fetched =
            fetch_token(client, credentials)
                .await
                .map_err(|source| SourceError::Token {
                    token_url: credentials.token_url.to_string(),
                    source: Box::new(source),
                })?;
        let lifetime = fetched
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let margin = TOKEN_EXPIRY_MARGIN.min(lifetime / 10);
        let token = fetched.access_token;
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime - margin,
            generation,
        });
        tracing::debug!(token_url = %credentials.token_url, expires_in = lifetime.as_secs(), "access token obtained");
        Ok((token, generation))
    }

    /// Forgets the token of `generation` after the API rejected it. Returns whether
    /// asking again can help (not for a fixed token).
    async fn forget(&self, generation: u64) -> bool {
        match self {
            Auth::Bearer(_) => false,
            Auth::ClientCredentials { cached, .. } => {
                let mut cached = cached.lock().await;
                if cached.as_ref().is_some_and(|t| t.generation == generation) {
                    *cached = None;
                }
                true
            }
        }
    }
}

async fn fetch_token(
    client: &SourceClient,
    credentials: &ClientCredentials,
) -> Result<TokenResponse, SourceError> {
    let secret = credentials.client_secret.expose_secret();
    let request = client.post(credentials.token_url.clone());
    let request = match &credentials.style {
        TokenRequestStyle::Json { audience } => request.json(&serde_json::json!({
            "client_id": credentials.client_id,
            "client_secret": secret,
            "audience": audience,
            "grant_type": "client_credentials",
        })),
        TokenRequestStyle::Form => request.form(&[
            ("grant_type", "client_credentials"),
            ("client_id", credentials.client_id.as_str()),
            ("client_secret", secret),
        ]),
    };
    let response = client.send(request).await?;
    if !response.status().is_success() {
        let fields = ErrorBody {
            message_field: "error_description",
            request_id_field: None,
        };
        return Err(error_from_response(response, None, fields).await);
    }
    read_json(response, None).await
}

/// Sends the request that `build` makes, with `Authorization: Bearer`. When the API
/// answers 401 and the token came from client credentials, gets a new token and sends
/// the request once more (a token can expire or be revoked in the middle of a pass).
pub async fn send_authorized(
    client: &SourceClient,
    auth: &Auth,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, SourceError> {
    let (token, generation) = auth.token(client).await?;
    let response = client
        .send(build().bearer_auth(token.expose_secret()))
        .await?;
    if response.status() != reqwest::StatusCode::UNAUTHORIZED || !auth.forget(generation).await {
        return Ok(response);
    }
    tracing::info!("access token rejected; getting a new one");
    let (token, _) = auth.token(client).await?;
    client
        .send(build().bearer_auth(token.expose_secret()))
        .await
}
