//! A fake Snapbooks API v2 under `/snapbooks`, keeping its documented rules:
//!
//! - `Authorization: Bearer` with the account token, or with a token from
//!   `POST /v2/oauth/token` (a client-credentials form post);
//! - `GET /snapbooks/api/v2/departments?page&per_page[&client_account_id][&is_active]`,
//!   `meta.pages` telling how many pages; 403 for a client account the token cannot see;
//! - only active departments are listed unless `is_active=null` is asked for.
//!
//! Switches for what the real API may do (BEHAVIOUR.md): serve fewer per page than asked
//! and say so in `meta` ([`FakeSnapbooks::cap_per_page`]); answer one client account with
//! an empty 200 ([`FakeSnapbooks::empty_account`]); send `meta` that disagrees with itself
//! ([`FakeSnapbooks::misstate_pages`]).

use std::collections::{BTreeMap, HashSet};

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::Shared;

/// The account token (a bearer token) the fake accepts.
pub const TOKEN: &str = "snapbooks-account-token";
/// The client id of the client-credentials grant the fake accepts.
pub const CLIENT_ID: &str = "snapbooks-client";
/// The client secret of the client-credentials grant the fake accepts.
pub const CLIENT_SECRET: &str = "snapbooks-secret";

/// The fake's departments, the client accounts its tokens see, and the tokens it issued.
#[derive(Default)]
pub struct SnapbooksState {
    departments: BTreeMap<i64, Value>,
    visible_accounts: HashSet<i64>,
    live_tokens: HashSet<String>,
    token_requests: usize,
    /// The most departments served in one page, whatever `per_page` asks.
    per_page_cap: Option<u64>,
    /// Client accounts answered with an empty 200 (a permission change, a vendor fault).
    empty_accounts: HashSet<i64>,
    /// `meta.pages` as sent, whatever the listing holds.
    misstated_pages: Option<u64>,
}

/// A running fake Snapbooks on a loopback port.
#[derive(Clone)]
pub struct FakeSnapbooks {
    /// The API's base URL, as configured (`…/snapbooks`).
    pub base_url: String,
    /// The client-credentials token endpoint.
    pub token_url: String,
    /// Its state and the controls every fake offers.
    pub shared: Shared<SnapbooksState>,
}

impl FakeSnapbooks {
    /// Starts serving, with no departments, on an ephemeral loopback port; its tokens
    /// see the client accounts `visible_accounts` (403 for any other).
    pub async fn start(visible_accounts: &[i64]) -> std::io::Result<FakeSnapbooks> {
        let shared = Shared::new(SnapbooksState {
            visible_accounts: visible_accounts.iter().copied().collect(),
            live_tokens: HashSet::from([TOKEN.to_owned()]),
            ..SnapbooksState::default()
        });
        let router = Router::new()
            .route("/v2/oauth/token", post(token))
            .route("/snapbooks/api/v2/departments", get(departments))
            .with_state(shared.clone());
        let root = super::serve(router).await?;
        Ok(FakeSnapbooks {
            base_url: format!("{root}/snapbooks"),
            token_url: format!("{root}/v2/oauth/token"),
            shared,
        })
    }

    /// Adds or replaces department `id`; `is_active: None` leaves the field out.
    pub fn put(&self, id: i64, name: &str, account: i64, is_active: Option<bool>) {
        let mut record = json!({
            "id": id,
            "name": name,
            "client_account_id": account,
            "sequence_number": id,
            "created_at": "2024-03-15T10:00:00Z",
            "updated_at": "2024-03-15T10:00:00Z",
            "created_by_id": 789,
            "updated_by_id": 789,
        });
        if let Some(active) = is_active {
            record["is_active"] = json!(active);
        }
        self.shared.lock().1.departments.insert(id, record);
    }

    /// From now on, at most `cap` departments a page, however many `per_page` asks for;
    /// `meta.per_page` and `meta.pages` say what is served.
    pub fn cap_per_page(&self, cap: u64) {
        self.shared.lock().1.per_page_cap = Some(cap.max(1));
    }

    /// From now on, client account `account` is answered with an empty 200 (no data,
    /// `records` 0) while the others are whole; `empty: false` lifts it.
    pub fn empty_account(&self, account: i64, empty: bool) {
        let accounts = &mut self.shared.lock().1.empty_accounts;
        if empty {
            accounts.insert(account);
        } else {
            accounts.remove(&account);
        }
    }

    /// From now on, `meta.pages` says `pages`, whatever the listing holds.
    pub fn misstate_pages(&self, pages: u64) {
        self.shared.lock().1.misstated_pages = Some(pages);
    }

    /// Removes department `id` (as a hard delete upstream would).
    pub fn remove(&self, id: i64) {
        self.shared.lock().1.departments.remove(&id);
    }

    /// Requests made to the token endpoint.
    pub fn token_requests(&self) -> usize {
        self.shared.lock().1.token_requests
    }

    /// The departments as deptsync should store them: (id, account, name, active).
    pub fn truth(&self) -> Vec<(String, String, String, bool)> {
        let state = self.shared.lock();
        let mut rows: Vec<_> = state
            .1
            .departments
            .values()
            .map(|d| {
                (
                    d["id"].to_string(),
                    d["client_account_id"].to_string(),
                    d["name"].as_str().unwrap_or_default().to_owned(),
                    d.get("is_active").and_then(Value::as_bool).unwrap_or(true),
                )
            })
            .collect();
        rows.sort();
        rows
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}

async fn token(
    State(shared): State<Shared<SnapbooksState>>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
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
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        control.violation(format!(
            "token request without grant_type=client_credentials: {form:?}"
        ));
        return refuse(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    let token = format!("snapbooks-oauth-{}", state.token_requests);
    state.live_tokens.insert(token.clone());
    axum::Json(json!({ "access_token": token, "token_type": "Bearer", "expires_in": 86400 }))
        .into_response()
}

async fn departments(
    State(shared): State<Shared<SnapbooksState>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    shared.slow_down().await;
    let (number, failure) = shared.arrive();
    let mut guard = shared.lock();
    let (control, state) = &mut *guard;
    let token = headers
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| state.live_tokens.contains(t)) {
        return refuse(StatusCode::UNAUTHORIZED, "Unauthenticated.");
    }
    if let Some(fault) = failure {
        return fault.respond(number, r#"{"data": [{"id": 1, "name": "Sales", "branch": {"id": 1}}], "result": [], "metadata": {}}"#);
    }
    let (page, per_page) = match super::paging(&query, "per_page", 50) {
        Ok(paging) => paging,
        Err(message) => {
            control.violation(message);
            return refuse(StatusCode::BAD_REQUEST, "bad paging");
        }
    };
    let account = match query.get("client_account_id").map(|v| v.parse::<i64>()) {
        None => None,
        Some(Ok(account)) if state.visible_accounts.contains(&account) => Some(account),
        Some(_) => return refuse(StatusCode::FORBIDDEN, "No access to client account"),
    };
    // The documented default lists only active departments.
    let wanted: Option<bool> = match query.get("is_active").map(String::as_str) {
        None => Some(true),
        Some("null") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            control.violation(format!("is_active={other} is not a value the API takes"));
            return refuse(StatusCode::BAD_REQUEST, "bad is_active");
        }
    };
    let listed: Vec<&Value> = state
        .departments
        .values()
        .filter(|d| {
            // `put` always writes the account.
            d["client_account_id"].as_i64().is_some_and(|in_account| {
                state.visible_accounts.contains(&in_account)
                    && account.is_none_or(|a| a == in_account)
            })
        })
        .filter(|d| {
            let active = d.get("is_active").and_then(Value::as_bool).unwrap_or(true);
            wanted.is_none_or(|w| w == active)
        })
        .filter(|d| {
            d["client_account_id"]
                .as_i64()
                .is_some_and(|a| !state.empty_accounts.contains(&a))
        })
        .collect();
    let per_page = state.per_page_cap.map_or(per_page, |cap| per_page.min(cap));
    let records = listed.len() as u64;
    let pages = state
        .misstated_pages
        .unwrap_or_else(|| records.div_ceil(per_page).max(1));
    let data: Vec<&Value> = listed
        .into_iter()
        .skip(((page - 1) * per_page) as usize)
        .take(per_page as usize)
        .collect();
    axum::Json(json!({
        "data": data,
        "meta": { "page": page, "pages": pages, "per_page": per_page, "records": records },
    }))
    .into_response()
}
