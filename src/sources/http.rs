//! The HTTP plumbing every connector shares: one retrying, rate-limited client per source,
//! bearer and OAuth2 client-credentials auth, and turning responses into values or into
//! errors that say what the vendor said.
//!
//! What is retried: connection errors and timeouts, 5xx, 408 and 429, and a 2xx whose body
//! is cut short or is not the JSON expected. Waits grow exponentially with full jitter up
//! to `max_backoff`; a `Retry-After` (seconds or an HTTP date) is the floor, and it holds
//! back every source that shares the credential. Other 4xx fail at once with the vendor's
//! message. Every request first takes its turn in its credential's rate budget, so that
//! 429s are rare rather than routine.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::SourceError;
use crate::config::{ConfigError, FieldContext, Table};

/// How a source's requests behave when the network or the vendor misbehaves. Every kind
/// takes these fields.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// `connect_timeout`, default 10 s.
    pub connect_timeout: Duration,
    /// `request_timeout` (the whole request), default 60 s.
    pub request_timeout: Duration,
    /// `max_attempts` for one request, default 5 (1 = no retry).
    pub max_attempts: u32,
    /// `max_backoff`: the longest wait between two attempts, default 60 s.
    pub max_backoff: Duration,
    /// `rate_limit` ("180/30s"): the request budget of the source's credential, shared by
    /// every source that uses the same credential. Default: the vendor's (Mews), or none.
    pub rate_limit: Option<RateLimit>,
    /// `max_response_bytes`: the most bytes of one response body read, counted after
    /// decompression while reading, default [`DEFAULT_MAX_RESPONSE_BYTES`].
    pub max_response_bytes: u64,
}

/// The fields of [`HttpSettings`], as a source's table spells them.
pub const HTTP_FIELDS: &str = "`connect_timeout`, `request_timeout`, `max_attempts`, \
     `max_backoff`, `rate_limit`, `max_response_bytes`";

/// The default bound on one response body, decompressed: 64 MiB. No departments listing
/// page comes near it (a Mews page of 1000 departments is about 300 kB); a body past it is
/// a fault or an attack (a gzip bomb), not data.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_attempts: 5,
            max_backoff: Duration::from_secs(60),
            rate_limit: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl HttpSettings {
    /// Takes the fields every kind shares about its requests out of a source's table.
    pub fn take_from(
        table: &mut Table,
        fields: &FieldContext<'_>,
    ) -> Result<HttpSettings, ConfigError> {
        let defaults = HttpSettings::default();
        let connect_timeout = fields.take_text(table, "connect_timeout")?;
        let request_timeout = fields.take_text(table, "request_timeout")?;
        let max_backoff = fields.take_text(table, "max_backoff")?;
        let rate_limit = fields.take_text(table, "rate_limit")?;
        let max_attempts = fields
            .take_int(table, "max_attempts", 1..=20, "")?
            .map_or(defaults.max_attempts, |n| n as u32);
        // At least a page's worth; at most what a 32-bit build could hold.
        let max_response_bytes = fields
            .take_int(table, "max_response_bytes", 1024..=1 << 31, " bytes")?
            .map_or(defaults.max_response_bytes, |n| n as u64);
        let duration = |key: &str, text: Option<String>, default: Duration| {
            fields.duration(key, text.as_deref(), default)
        };
        Ok(HttpSettings {
            connect_timeout: duration(
                "connect_timeout",
                connect_timeout,
                defaults.connect_timeout,
            )?,
            request_timeout: duration(
                "request_timeout",
                request_timeout,
                defaults.request_timeout,
            )?,
            max_attempts,
            max_backoff: duration("max_backoff", max_backoff, defaults.max_backoff)?,
            rate_limit: rate_limit
                .map(|r| RateLimit::parse(&r).map_err(|m| fields.error("rate_limit", m)))
                .transpose()?,
            max_response_bytes,
        })
    }
}

/// At most `requests` in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Parses `"180/30s"`.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let bad = || format!("{text:?} is not a rate like \"180/30s\" (requests/period)");
        let (requests, per) = text.split_once('/').ok_or_else(bad)?;
        let requests: u32 = requests.trim().parse().map_err(|_| bad())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
        if requests == 0 || per.is_zero() {
            return Err(bad());
        }
        if (per / requests).is_zero() {
            return Err(format!(
                "{text:?} is more than one request per nanosecond: no limit at all"
            ));
        }
        Ok(RateLimit { requests, per })
    }
}

/// The first retry waits up to this long; each further one up to twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest `Retry-After` a pass waits out; a longer one ends the pass.
const MAX_RETRY_AFTER_IN_PASS: Duration = Duration::from_secs(300);
/// The longest one call of a source may take, retries, waits and a token fetch of its own
/// included: how long a pass may go without a word from its source before it is stuck.
pub fn longest_call(settings: &HttpSettings) -> Duration {
    let attempts = (settings.request_timeout + settings.max_backoff)
        .saturating_mul(settings.max_attempts)
        + MAX_RETRY_AFTER_IN_PASS;
    // A client-credentials token is itself fetched through the same retrying client.
    attempts.saturating_mul(2)
}

/// The longest token life believed, whatever the token endpoint says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the retry layer needs to know about a vendor's API.
pub struct Vendor {
    pub errors: ErrorBody<'static>,
    /// The response header that carries the vendor's request id.
    pub request_id_header: Option<&'static str>,
    /// A 408 means "ask for less" (Mews): it is returned as [`SourceError::TooHeavy`] for
    /// the caller to shrink its request, instead of being retried as it is.
    pub shrink_on_408: bool,
}

/// How an OAuth2 token endpoint explains its errors.
const TOKEN_ENDPOINT: Vendor = Vendor {
    errors: ErrorBody {
        message_field: "error_description",
        request_id_field: None,
    },
    request_id_header: None,
    shrink_on_408: false,
};

/// What a call got.
#[derive(Debug)]
pub enum Reply<T> {
    Json(T),
    NoContent,
}

/// A reply and the vendor's id for the request that got it.
#[derive(Debug)]
pub struct Replied<T> {
    pub reply: Reply<T>,
    pub request_id: Option<String>,
}

impl<T> Replied<T> {
    /// The JSON body, which this call must have had.
    pub fn into_json(self) -> Result<T, SourceError> {
        match self.reply {
            Reply::Json(value) => Ok(value),
            Reply::NoContent => Err(SourceError::Decode {
                message: "expected a JSON body, got 204 No Content".to_owned(),
                request_id: self.request_id,
            }),
        }
    }
}

/// What an error status means for the request that got it (`error`, what the vendor said
/// of it): 408 and 429 and 5xx are worth another attempt (after `retry_after` when given),
/// a 408 of a vendor that means "ask for less" goes back to the caller, a 401 may want a
/// new token, and any other status is final.
fn failure(
    status: StatusCode,
    shrink_on_408: bool,
    error: SourceError,
    retry_after: Option<Duration>,
) -> Failure {
    match status {
        StatusCode::REQUEST_TIMEOUT if shrink_on_408 => {
            let request_id = match error {
                SourceError::Http { request_id, .. } => request_id,
                _ => None,
            };
            Failure::Final(SourceError::TooHeavy { request_id })
        }
        StatusCode::UNAUTHORIZED => Failure::Unauthorized(error),
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
            Failure::Transient { error, retry_after }
        }
        status if status.is_server_error() => Failure::Transient { error, retry_after },
        _ => Failure::Final(error),
    }
}

/// Why one attempt did not get a reply.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt, after at least `retry_after` when the vendor said so.
    Transient {
        error: SourceError,
        retry_after: Option<Duration>,
    },
    /// A 401: a new token may help, once.
    Unauthorized(SourceError),
    Final(SourceError),
}

/// The request budget of one credential, shared by every source that uses it.
struct Budget {
    limiter: Option<DefaultDirectRateLimiter>,
    /// A `Retry-After` holds back every request on the credential until then.
    blocked_until: Mutex<Option<Instant>>,
}

impl Budget {
    fn new(rate: Option<RateLimit>) -> Budget {
        // One request per `per / requests`, no burst: at most `requests` (+1) in any
        // window of `per`, spread evenly rather than front-loaded.
        let limiter = rate.and_then(|rate| {
            let spacing = rate.per / rate.requests;
            Quota::with_period(spacing)
                .map(|quota| RateLimiter::direct(quota.allow_burst(NonZeroU32::MIN)))
        });
        Budget {
            limiter,
            blocked_until: Mutex::new(None),
        }
    }

    /// Waits until a request may be sent: no `Retry-After` holds the credential back, and
    /// the rate budget has a turn for it. A hold that arrives while the request waits for
    /// its turn (another request got a 429 meanwhile) holds it too: the hold applies to
    /// every request not sent yet, whenever it was queued.
    ///
    /// A hold longer than a pass waits out fails the request at once: the pass ends, and
    /// a later one finds the hold over (a pass asleep for hours would also look stuck).
    async fn wait_turn(&self) -> Result<(), SourceError> {
        loop {
            if let Some(until) = self.held_until() {
                let wait = until - Instant::now();
                if wait > MAX_RETRY_AFTER_IN_PASS {
                    return Err(SourceError::HeldBack {
                        seconds: wait.as_secs(),
                    });
                }
                tokio::time::sleep_until(until).await;
            }
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            if self.held_until().is_none() {
                return Ok(());
            }
        }
    }

    /// Until when a `Retry-After` holds the credential back, if it still does.
    fn held_until(&self) -> Option<Instant> {
        let blocked = *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner());
        blocked.filter(|until| *until > Instant::now())
    }

    fn hold_back(&self, wait: Duration) {
        // A vendor's absurd Retry-After must not overflow the clock.
        let Some(until) = Instant::now().checked_add(wait) else {
            return;
        };
        let mut blocked = self.blocked_until.lock().unwrap_or_else(|p| p.into_inner());
        if blocked.is_none_or(|current| current < until) {
            *blocked = Some(until);
        }
    }
}

/// The budget of the credential `credential` (never stored: only a hash of it is a key),
/// shared by every source that uses it. The first source to ask sets its rate; a source
/// that configures another rate for the same credential is told it is not used.
fn budget_for(credential: &str, rate: Option<RateLimit>, source: &str) -> Arc<Budget> {
    /// Credential hash → the rate the budget was made with, and the budget.
    type Budgets = HashMap<u64, (Option<RateLimit>, Arc<Budget>)>;
    static BUDGETS: Mutex<Option<Budgets>> = Mutex::new(None);
    let mut hasher = std::hash::DefaultHasher::new();
    credential.hash(&mut hasher);
    let key = hasher.finish();
    let mut budgets = BUDGETS.lock().unwrap_or_else(|p| p.into_inner());
    let (budget_rate, budget) = budgets
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert_with(|| (rate, Arc::new(Budget::new(rate))));
    if *budget_rate != rate {
        tracing::warn!(
            source,
            configured = ?rate,
            shared = ?budget_rate,
            "another source already set this credential's rate_limit; it is shared as set"
        );
    }
    budget.clone()
}

/// Builds the HTTP client of one source.
///
/// Redirects are not followed: a vendor API that redirects is misconfigured, and following
/// would resend the tokens (in Mews' case, in the request body) to another host.
pub fn build_client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("deptsync/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .gzip(true)
        .build()
}

/// The HTTP client as one source uses it: timeouts, retries and rate budget from its
/// settings, every request counted by source and status.
#[derive(Clone)]
pub struct SourceClient {
    client: reqwest::Client,
    source: Arc<str>,
    max_attempts: u32,
    max_backoff: Duration,
    max_response_bytes: u64,
    budget: Arc<Budget>,
}

impl SourceClient {
    /// The client of source `source`, whose requests spend the budget of `credential`.
    pub fn new(
        settings: &HttpSettings,
        source: &str,
        credential: &str,
    ) -> Result<SourceClient, reqwest::Error> {
        Ok(SourceClient {
            client: build_client(settings)?,
            source: source.into(),
            max_attempts: settings.max_attempts.max(1),
            max_backoff: settings.max_backoff,
            max_response_bytes: settings.max_response_bytes,
            budget: budget_for(credential, settings.rate_limit, source),
        })
    }

    pub fn get(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.client.get(url)
    }

    pub fn post(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.client.post(url)
    }

    /// Sends the request `build` makes (again for each attempt), with a bearer token from
    /// `auth` when given, and reads its JSON reply, retrying what is worth retrying.
    #[tracing::instrument(name = "http_call", level = "debug", skip_all, fields(source = %self.source))]
    pub async fn call<T: DeserializeOwned + Send + 'static>(
        &self,
        vendor: &Vendor,
        auth: Option<&Auth>,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Replied<T>, SourceError> {
        let mut attempt = 0;
        let mut renewed_token = false;
        loop {
            attempt += 1;
            let mut request = build();
            let mut generation = None;
            if let Some(auth) = auth {
                let (token, issued) = auth.token(self).await?;
                request = request.bearer_auth(token.expose_secret());
                generation = Some(issued);
            }
            // After the token: a hold set while it was fetched holds this request too.
            self.budget.wait_turn().await?;
            match self.attempt::<T>(vendor, request).await {
                Ok(replied) => return Ok(replied),
                Err(Failure::Final(error)) => return Err(error),
                Err(Failure::Unauthorized(error)) => {
                    let renewable = match (auth, generation) {
                        (Some(auth), Some(generation)) if !renewed_token => {
                            auth.forget(generation).await
                        }
                        _ => false,
                    };
                    if !renewable {
                        return Err(error);
                    }
                    tracing::info!(
                        source = %self.source,
                        error = %crate::error_chain(&error),
                        "access token rejected; getting a new one"
                    );
                    renewed_token = true;
                    attempt -= 1;
                }
                Err(Failure::Transient { error, retry_after }) => {
                    if let Some(retry_after) = retry_after {
                        self.budget.hold_back(retry_after);
                    }
                    // A Retry-After longer than a pass should wait ends the pass (the
                    // budget keeps the next requests back until then).
                    let too_long = retry_after.is_some_and(|wait| wait > MAX_RETRY_AFTER_IN_PASS);
                    if attempt >= self.max_attempts || too_long {
                        return Err(SourceError::GaveUp {
                            attempts: attempt,
                            last: Box::new(error),
                        });
                    }
                    let wait = self.backoff(attempt, retry_after);
                    tracing::warn!(
                        source = %self.source,
                        attempt,
                        retry_in = ?wait,
                        error = %crate::error_chain(&error),
                        "request failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The wait before attempt `attempt + 1`: a random share of an exponentially growing
    /// ceiling (full jitter), never less than what the vendor asked for.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = FIRST_BACKOFF
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.max_backoff);
        let jittered = ceiling.mul_f64(fastrand::f64());
        retry_after.map_or(jittered, |floor| jittered.max(floor))
    }

    async fn attempt<T: DeserializeOwned + Send + 'static>(
        &self,
        vendor: &Vendor,
        request: reqwest::RequestBuilder,
    ) -> Result<Replied<T>, Failure> {
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                crate::metrics::http_request(&self.source, "error");
                return Err(Failure::Transient {
                    error: SourceError::Transport(e),
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        crate::metrics::http_request(&self.source, status.as_str());
        let request_id = vendor
            .request_id_header
            .and_then(|header| request_id(response.headers(), header));
        if status == StatusCode::NO_CONTENT {
            return Ok(Replied {
                reply: Reply::NoContent,
                request_id,
            });
        }
        if status.is_success() {
            return match read_json(response, request_id.as_deref(), self.max_response_bytes).await {
                Ok(value) => Ok(Replied {
                    reply: Reply::Json(value),
                    request_id,
                }),
                // The same request would get the same body.
                Err(error @ SourceError::TooLarge { .. }) => Err(Failure::Final(error)),
                Err(error) => Err(Failure::Transient {
                    error,
                    retry_after: None,
                }),
            };
        }
        let retry_after = retry_after(response.headers());
        let error = error_from_response(response, request_id, &vendor.errors).await;
        Err(failure(status, vendor.shrink_on_408, error, retry_after))
    }
}

/// `Retry-After` as a wait: delay-seconds, or an HTTP date (a date in the past is no wait).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The vendor's request id from `header`, if the response carries one.
pub fn request_id(headers: &HeaderMap, header: &str) -> Option<String> {
    headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Bodies at least this long are decoded on the blocking pool.
const DECODE_ASIDE_BYTES: usize = 64 * 1024;

/// The most of an error body read: only its message is wanted.
const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;

/// Reads the body, decompressed, into memory, failing as soon as it holds more than
/// `limit` bytes: the bound is counted while reading, so a body of any size (a gzip bomb
/// of gigabytes in a few megabytes) costs at most `limit` of memory.
async fn read_bounded(mut response: reqwest::Response, limit: u64) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(BodyError::TooLarge(body));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Why a body could not be read whole.
enum BodyError {
    Read(reqwest::Error),
    /// Past the limit: what was read up to it.
    TooLarge(Vec<u8>),
}

/// Reads the body (at most `limit` bytes, decompressed) and decodes it as JSON. A body
/// that is cut short or is not the JSON we expect is a [`SourceError::Decode`] naming the
/// request; one over the limit is [`SourceError::TooLarge`].
///
/// A page of departments is decoded (every record read) on the blocking pool: a pass
/// stores its pages from the same thread that reads them, and a page's decoding there
/// would keep the database waiting for the next one.
async fn read_json<T: DeserializeOwned + Send + 'static>(
    response: reqwest::Response,
    request_id: Option<&str>,
    limit: u64,
) -> Result<T, SourceError> {
    let unreadable = |message: String| SourceError::Decode {
        message,
        request_id: request_id.map(str::to_owned),
    };
    let body = match read_bounded(response, limit).await {
        Ok(body) => body,
        Err(BodyError::Read(e)) => return Err(unreadable(format!("body could not be read: {e}"))),
        Err(BodyError::TooLarge(_)) => {
            return Err(SourceError::TooLarge {
                limit,
                request_id: request_id.map(str::to_owned),
            });
        }
    };
    let decoded = if body.len() < DECODE_ASIDE_BYTES {
        decode_json(&body)
    } else {
        tokio::task::spawn_blocking(move || decode_json(&body))
            .await
            .map_err(|e| unreadable(format!("decoding stopped: {e}")))?
    };
    decoded.map_err(|e| unreadable(e.to_string()))
}

/// Decodes `body` as JSON. A body that holds bytes that are not UTF-8 (a vendor that
/// wrote one record's name in Latin-1) is decoded with those bytes marked (see
/// [`super::not_utf8`]): the records holding them are set aside, and the page's other
/// records are read. Only a body that fails to decode is looked at for them.
fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(body)
        .or_else(|error| super::not_utf8::decode_marked(body).unwrap_or(Err(error)))
}

/// Where a vendor puts the explanation in an error body.
pub struct ErrorBody<'a> {
    pub message_field: &'a str,
    /// The body's own request id field, used when the header is missing.
    pub request_id_field: Option<&'a str>,
}

/// Turns an error response into [`SourceError::Http`], with the vendor's message when its
/// body has one, and the start of the body otherwise.
async fn error_from_response(
    response: reqwest::Response,
    request_id: Option<String>,
    fields: &ErrorBody<'_>,
) -> SourceError {
    let status = response.status().as_u16();
    // Only the message is wanted: what is past the bound, or unreadable, is left.
    let body = match read_bounded(response, MAX_ERROR_BODY_BYTES).await {
        Ok(body) | Err(BodyError::TooLarge(body)) => String::from_utf8_lossy(&body).into_owned(),
        Err(BodyError::Read(_)) => String::new(),
    };
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
        // Boxed: getting a token is itself a call, through the same retrying client.
        let fetched = Box::pin(fetch_token(client, credentials))
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
            refresh_at: Instant::now() + lifetime.min(MAX_TOKEN_LIFETIME) - margin,
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
    let build = || {
        let secret = credentials.client_secret.expose_secret();
        let request = client.post(credentials.token_url.clone());
        match &credentials.style {
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
        }
    };
    match client
        .call::<TokenResponse>(&TOKEN_ENDPOINT, None, build)
        .await?
        .reply
    {
        Reply::Json(token) => Ok(token),
        Reply::NoContent => Err(SourceError::Decode {
            message: "the token endpoint answered without a token".to_owned(),
            request_id: None,
        }),
    }
}

/// The URL of `path` (relative, no leading slash) under a source's `base_url`, which the
/// config keeps with a trailing slash, so that the base's own path is kept. Joining a
/// fixed relative path onto a validated http(s) URL cannot fail; were it to, the base is
/// asked, and its answer says what is wrong.
pub(crate) fn endpoint(base_url: &reqwest::Url, path: &str) -> reqwest::Url {
    base_url.join(path).unwrap_or_else(|_| base_url.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(status: u16) -> SourceError {
        SourceError::Http {
            status,
            message: "no".to_owned(),
            request_id: Some("r-1".to_owned()),
        }
    }

    #[test]
    fn error_statuses_are_retried_renewed_shrunk_or_final() {
        let wait = Some(Duration::from_secs(3));
        let classify = |status: u16, shrink_on_408: bool| {
            let status = StatusCode::from_u16(status).unwrap();
            failure(status, shrink_on_408, said(status.as_u16()), wait)
        };
        for status in [408, 429, 500, 502, 503] {
            assert!(
                matches!(classify(status, false), Failure::Transient { retry_after, .. } if retry_after == wait),
                "{status}"
            );
        }
        // Mews' 408 means "ask for less": back to the caller, with the request's id.
        assert!(matches!(
            classify(408, true),
            Failure::Final(SourceError::TooHeavy { request_id: Some(id) }) if id == "r-1"
        ));
        assert!(matches!(classify(401, false), Failure::Unauthorized(_)));
        for status in [400, 403, 404, 422] {
            assert!(
                matches!(
                    classify(status, false),
                    Failure::Final(SourceError::Http { .. })
                ),
                "{status}"
            );
        }
    }
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    fn with_retry_after(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_a_date() {
        assert_eq!(
            retry_after(&with_retry_after("7")),
            Some(Duration::from_secs(7))
        );
        let in_a_minute =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let wait = retry_after(&with_retry_after(&in_a_minute)).unwrap();
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        // A date in the past is no wait; what is neither is no Retry-After.
        assert_eq!(
            retry_after(&with_retry_after("Thu, 01 Jan 1970 00:00:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&with_retry_after("soon")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    fn client(max_backoff: Duration) -> SourceClient {
        let settings = HttpSettings {
            max_backoff,
            ..HttpSettings::default()
        };
        SourceClient::new(&settings, "test", "a credential of the http tests").unwrap()
    }

    #[test]
    fn backoff_grows_to_its_ceiling_and_never_undercuts_retry_after() {
        let client = client(Duration::from_secs(2));
        for attempt in 1..=20 {
            let ceiling =
                (FIRST_BACKOFF * 2u32.pow((attempt - 1).min(16))).min(Duration::from_secs(2));
            assert!(
                client.backoff(attempt, None) <= ceiling,
                "attempt {attempt}"
            );
            assert!(
                client.backoff(attempt, Some(Duration::from_secs(5))) >= Duration::from_secs(5),
                "a Retry-After is the floor"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_delays_every_request_not_sent_and_a_long_one_fails_them() {
        let budget = Budget::new(None);
        budget.hold_back(Duration::from_secs(3));
        let started = Instant::now();
        budget.wait_turn().await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(3));

        budget.hold_back(MAX_RETRY_AFTER_IN_PASS + Duration::from_secs(60));
        assert!(matches!(
            budget.wait_turn().await,
            Err(SourceError::HeldBack { .. })
        ));
    }
}
