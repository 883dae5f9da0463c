//! A fake Procurify API v3, keeping its documented rules:
//!
//! - `POST /oauth/token` takes JSON `{client_id, client_secret, audience, grant_type}` with
//!   the audience `https://api.procurify.com/` and grant `client_credentials`, and returns
//!   `{access_token, expires_in, token_type, scope}`;
//! - `GET /api/v3/departments/` wants `Authorization: Bearer` with a live token (else 401)
//!   and `X-Procurify-Client: api`; it pages DRF style (`next` a full URL or null) and
//!   answers 404 past the last page.
//!
//! Switches for what the real API may do (BEHAVIOUR.md): serve fewer per page than asked
//! and say so in `pagination` ([`FakeProcurify::cap_page_size`]); send `pagination` that
//! disagrees with itself ([`FakeProcurify::misstate_num_pages`]).
//!
//! Departments are encoded to JSON once, when they arrive, and kept in a vector ordered by
//! id, so a page is a slice and its body the slice's bytes put together: the fake is never
//! what a benchmark measures.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::Shared;

/// The OAuth2 client id the fake's token endpoint accepts.
pub const CLIENT_ID: &str = "procurify-client";
/// The OAuth2 client secret the fake's token endpoint accepts.
pub const CLIENT_SECRET: &str = "procurify-secret";

/// The record of department `id` as the fake sends it, written straight to bytes.
fn encode(id: i64, name: &str, branch: i64, active: bool) -> Box<[u8]> {
    let mut json = Vec::with_capacity(160 + name.len());
    // Invariant (the three expects): writing to a Vec cannot fail, and a str always encodes.
    write!(json, r#"{{"id":{id},"name":"#).expect("writing to a Vec cannot fail");
    serde_json::to_writer(&mut json, name).expect("a str always encodes");
    write!(
        json,
        r#","branch":{{"id":{branch},"name":"Branch {branch}","headquarter":{headquarter}}},"external_id":null,"active":{active},"punchout_email":null}}"#,
        headquarter = branch == 1,
    )
    .expect("writing to a Vec cannot fail");
    json.into_boxed_slice()
}

/// `count` departments over `branches` branches (from 1), all active: department `i`
/// (from 1) has name `Department {i}` and branch `i % branches + 1`. Pairs of id and
/// record as the fake sends it, in id order.
pub fn history(count: usize, branches: i64) -> impl Iterator<Item = (i64, Box<[u8]>)> {
    let branches = branches.max(1);
    (1..=count as i64).map(move |id| {
        let record = encode(id, &format!("Department {id}"), id % branches + 1, true);
        (id, record)
    })
}

/// The fake's departments and the tokens it issued.
#[derive(Default)]
pub struct ProcurifyState {
    /// Ordered by id, each record encoded once.
    departments: Vec<(i64, Box<[u8]>)>,
    live_tokens: HashSet<String>,
    /// When each token issued expires.
    expiries: std::collections::HashMap<String, std::time::Instant>,
    /// The `expires_in` of the tokens issued (86400 unless a test says otherwise).
    token_lifetime: Option<u64>,
    /// 401s answered for tokens that had expired.
    expired_rejections: usize,
    issued: usize,
    token_requests: usize,
    department_pages: usize,
    /// The most departments served in one page, whatever `page_size` asks.
    page_size_cap: Option<u64>,
    /// `num_pages` as sent (and `next` as it implies), whatever the listing holds.
    misstated_num_pages: Option<u64>,
}

/// A running fake Procurify on a loopback port.
#[derive(Clone)]
pub struct FakeProcurify {
    /// Its base URL, as configured (`http://127.0.0.1:PORT`).
    pub base_url: String,
    /// Its state and the controls every fake offers.
    pub shared: Shared<ProcurifyState>,
}

impl FakeProcurify {
    /// Starts serving, with no departments, on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<FakeProcurify> {
        let shared = Shared::new(ProcurifyState::default());
        let router = Router::new()
            .route("/oauth/token", post(token))
            .route("/api/v3/departments/", get(departments))
            .with_state(shared.clone());
        Ok(FakeProcurify {
            base_url: super::serve(router).await?,
            shared,
        })
    }

    /// From now on, at most `cap` departments a page, however many `page_size` asks for;
    /// `pagination.page_size`, `num_pages` and `next` say what is served.
    pub fn cap_page_size(&self, cap: u64) {
        self.shared.lock().1.page_size_cap = Some(cap.max(1));
    }

    /// From now on, `pagination.num_pages` says `pages` and `next` follows it, whatever
    /// the listing holds (a page past the real end is still a 404).
    pub fn misstate_num_pages(&self, pages: u64) {
        self.shared.lock().1.misstated_num_pages = Some(pages);
    }

    /// Adds or replaces department `id`.
    pub fn put(&self, id: i64, name: &str, branch: i64, active: bool) {
        self.load([(id, encode(id, name, branch, active))]);
    }

    /// Adds (or replaces) every department of `records` (from [`history`]), under one lock;
    /// fastest when they come in increasing id order after the ones already there.
    pub fn load(&self, records: impl IntoIterator<Item = (i64, Box<[u8]>)>) {
        let departments = &mut self.shared.lock().1.departments;
        for (id, record) in records {
            if departments.last().is_none_or(|(last, _)| *last < id) {
                departments.push((id, record));
                continue;
            }
            match departments.binary_search_by_key(&id, |(id, _)| *id) {
                Ok(at) => departments[at].1 = record,
                Err(at) => departments.insert(at, (id, record)),
            }
        }
    }

    /// `count` active departments over `branches` branches: the [`history`] of those.
    pub fn generate(&self, count: usize, branches: i64) {
        self.load(history(count, branches));
    }

    /// Forgets every department (a benchmark frees one step's data before the next).
    pub fn clear(&self) {
        self.shared.lock().1.departments = Vec::new();
    }

    /// Removes department `id` from the listing.
    pub fn remove(&self, id: i64) {
        let departments = &mut self.shared.lock().1.departments;
        if let Ok(at) = departments.binary_search_by_key(&id, |(id, _)| *id) {
            departments.remove(at);
        }
    }

    /// Every token issued so far stops working (it expired, or was revoked).
    pub fn expire_tokens(&self) {
        self.shared.lock().1.live_tokens.clear();
    }

    /// Tokens issued from now on expire after `seconds`.
    pub fn set_token_lifetime(&self, seconds: u64) {
        self.shared.lock().1.token_lifetime = Some(seconds);
    }

    /// How many requests came with a token that had expired.
    pub fn expired_rejections(&self) -> usize {
        self.shared.lock().1.expired_rejections
    }

    /// Requests made to the token endpoint.
    pub fn token_requests(&self) -> usize {
        self.shared.lock().1.token_requests
    }

    /// Department pages served with a 200.
    pub fn department_pages(&self) -> usize {
        self.shared.lock().1.department_pages
    }

    /// The departments as deptsync should store them: (id, branch, name, active).
    pub fn truth(&self) -> Vec<(String, String, String, bool)> {
        let state = self.shared.lock();
        let mut rows: Vec<_> = state
            .1
            .departments
            .iter()
            // Every record was encoded by `encode`: none fails to decode.
            .filter_map(|(_, record)| serde_json::from_slice::<Value>(record).ok())
            .map(|d| {
                (
                    d["id"].to_string(),
                    d["branch"]["id"].to_string(),
                    d["name"].as_str().unwrap_or_default().to_owned(),
                    d["active"].as_bool().unwrap_or_default(),
                )
            })
            .collect();
        rows.sort();
        rows
    }
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    (status, axum::Json(json!({ "detail": detail }))).into_response()
}

async fn token(State(shared): State<Shared<ProcurifyState>>, body: String) -> Response {
    let (number, failure) = shared.arrive();
    if let Some(fault) = failure {
        return fault.respond(
            number,
            r#"{"access_token": "x", "expires_in": 86400, "token_type": "Bearer"}"#,
        );
    }
    let mut guard = shared.lock();
    let (control, state) = &mut *guard;
    state.token_requests += 1;
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        control.violation("token request body is not JSON");
        return refuse(StatusCode::BAD_REQUEST, "JSON expected");
    };
    if body["audience"] != "https://api.procurify.com/"
        || body["grant_type"] != "client_credentials"
    {
        control.violation(format!(
            "token request without the documented audience and grant: {body}"
        ));
        return refuse(StatusCode::BAD_REQUEST, "bad audience or grant_type");
    }
    if body["client_id"] != CLIENT_ID || body["client_secret"] != CLIENT_SECRET {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "error": "access_denied", "error_description": "Unauthorized" })),
        )
            .into_response();
    }
    state.issued += 1;
    let token = format!("procurify-token-{}", state.issued);
    state.live_tokens.insert(token.clone());
    let lifetime = state.token_lifetime.unwrap_or(86400);
    let expiry = std::time::Instant::now() + std::time::Duration::from_secs(lifetime);
    state.expiries.insert(token.clone(), expiry);
    axum::Json(json!({
        "access_token": token,
        "expires_in": lifetime,
        "token_type": "Bearer",
        "scope": "read",
    }))
    .into_response()
}

async fn departments(
    State(shared): State<Shared<ProcurifyState>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    // A token is judged as it arrives; the slowness is the upstream's, after that.
    let arrived = std::time::Instant::now();
    shared.slow_down().await;
    let (number, failure) = shared.arrive();
    let mut guard = shared.lock();
    let (control, state) = &mut *guard;
    if headers
        .get("X-Procurify-Client")
        .and_then(|v| v.to_str().ok())
        != Some("api")
    {
        control.violation("a departments request without X-Procurify-Client: api");
        return refuse(StatusCode::BAD_REQUEST, "X-Procurify-Client missing");
    }
    let token = headers
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expired = token
        .and_then(|t| state.expiries.get(t))
        .is_some_and(|expiry| *expiry <= arrived);
    if expired {
        state.expired_rejections += 1;
    }
    if expired || !token.is_some_and(|t| state.live_tokens.contains(t)) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Authentication credentials were not provided or have expired.",
        );
    }
    if let Some(fault) = failure {
        return fault.respond(number, r#"{"data": [{"id": 1, "name": "Sales", "branch": {"id": 1}}], "result": [], "metadata": {}}"#);
    }
    let (page, page_size) = match super::paging(&query, "page_size", 10) {
        Ok(paging) => paging,
        Err(message) => {
            control.violation(message);
            return refuse(StatusCode::BAD_REQUEST, "bad paging");
        }
    };
    let page_size = state
        .page_size_cap
        .map_or(page_size, |cap| page_size.min(cap));
    let count = state.departments.len() as u64;
    let real_pages = count.div_ceil(page_size).max(1);
    if page > real_pages {
        return refuse(StatusCode::NOT_FOUND, "Invalid page.");
    }
    let num_pages = state.misstated_num_pages.unwrap_or(real_pages);
    state.department_pages += 1;
    let first = ((page - 1) * page_size) as usize;
    let last = (first + page_size as usize).min(state.departments.len());
    let records = &state.departments[first..last];
    let link = |p: u64| {
        format!("https://acme.procurify.com/api/v3/departments/?page={p}&page_size={page_size}")
    };
    let metadata = json!({ "pagination": {
        "count": count,
        "next": (page < num_pages).then(|| link(page + 1)),
        "previous": (page > 1).then(|| link(page - 1)),
        "page_size": page_size,
        "num_pages": num_pages,
        "current_page": page,
    }});
    let encoded: usize = records.iter().map(|(_, record)| record.len() + 1).sum();
    let mut body = Vec::with_capacity(encoded + 512);
    body.extend_from_slice(br#"{"metadata":"#);
    // Invariant: a Value (string keys) always encodes, and into a Vec cannot fail.
    serde_json::to_writer(&mut body, &metadata).expect("a Value always encodes");
    body.extend_from_slice(br#","data":["#);
    for (i, (_, record)) in records.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(record);
    }
    body.extend_from_slice(b"]}");
    ([("Content-Type", "application/json")], body).into_response()
}
