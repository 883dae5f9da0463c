//! A fake Mews Connector API `departments/getAll` that keeps the vendor's documented rules
//! and records every breach as a violation (answered with a 400, so the sync fails too):
//!
//! - `POST` with a JSON body carrying `ClientToken`, `AccessToken` and `Client` (wrong
//!   token values get the vendor's 401, which is not a violation);
//! - `Limitation.Count` 1..=1000, `EnterpriseIds` at most 1000;
//! - an `UpdatedUtc` interval of at most three months (deptsync always sends one);
//! - `Limitation.Cursor` only as a cursor this fake issued for the same interval;
//! - newest-first paging, the response `Cursor` being the oldest item returned, null when
//!   nothing came back; `204` for an empty page when `Prefer: return=minimal` is sent.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Months, SubsecRound, Utc};
use deptsync::model::Window;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Fault, Shared};

pub const CLIENT_TOKEN: &str = "fake-client-token";
pub const ACCESS_TOKEN: &str = "fake-access-token";
pub const PATH: &str = "/api/connector/v1/departments/getAll";

/// One department as the fake holds it.
#[derive(Debug, Clone)]
pub struct FakeDepartment {
    pub id: Uuid,
    pub enterprise_id: Uuid,
    pub updated: DateTime<Utc>,
    /// The record as the fake sends it.
    pub json: Value,
}

impl FakeDepartment {
    pub fn new(id: Uuid, enterprise_id: Uuid, name: &str, updated: DateTime<Utc>) -> Self {
        // Whole seconds, as the fake sends them.
        let updated = updated.trunc_subsecs(0);
        let json = json!({
            "Id": id,
            "EnterpriseId": enterprise_id,
            "IsActive": true,
            "Name": name,
            "CreatedUtc": format_utc(updated - chrono::Duration::days(30)),
            "UpdatedUtc": format_utc(updated),
        });
        FakeDepartment {
            id,
            enterprise_id,
            updated,
            json,
        }
    }

    pub fn name(&self) -> &str {
        self.json["Name"].as_str().unwrap_or_default()
    }
}

pub fn format_utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What one request asked for and what it got.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub window: Option<Window>,
    pub cursor: Option<String>,
    pub count: i64,
    pub status: u16,
    pub returned: usize,
}

#[derive(Default)]
pub struct MewsState {
    departments: Vec<FakeDepartment>,
    requests: Vec<RecordedRequest>,
    /// (cursor, the interval it was issued for) → the sort key it stands at.
    cursors: HashMap<(String, Window), (DateTime<Utc>, Uuid)>,
    access_token: String,
    /// Answer empty pages with 200 and an empty list even when 204 is asked for.
    never_204: bool,
    /// Misbehave: send back the cursor that was asked with, so that paging never ends.
    loop_cursor: bool,
}

/// A running fake Mews server on a loopback port.
#[derive(Clone)]
pub struct FakeMews {
    pub base_url: String,
    pub shared: Shared<MewsState>,
}

impl FakeMews {
    pub async fn start() -> FakeMews {
        let shared = Shared::new(MewsState {
            access_token: ACCESS_TOKEN.to_owned(),
            ..MewsState::default()
        });
        let app = Router::new()
            .route(PATH, post(get_all))
            .with_state(shared.clone());
        FakeMews {
            base_url: super::serve(app).await,
            shared,
        }
    }

    pub fn insert(&self, department: FakeDepartment) {
        let state = &mut self.shared.lock().1;
        state.departments.retain(|d| d.id != department.id);
        state.departments.push(department);
    }

    /// `count` departments over `enterprises` enterprises, updated evenly over `[from, to)`.
    pub fn generate(
        &self,
        count: usize,
        enterprises: u128,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) {
        let span = (to - from).num_seconds().max(1);
        for i in 0..count {
            let offset = span * i as i64 / count as i64;
            let updated = from + chrono::Duration::seconds(offset);
            let id = Uuid::from_u128(0x1000_0000 + i as u128);
            let enterprise = Uuid::from_u128(0xE000 + (i as u128 % enterprises));
            self.insert(FakeDepartment::new(
                id,
                enterprise,
                &format!("Department {i}"),
                updated,
            ));
        }
    }

    pub fn departments(&self) -> Vec<FakeDepartment> {
        self.shared.lock().1.departments.clone()
    }

    /// Answers request number `n` (from 1, over the fake's life) with `status`.
    pub fn fail_request(&self, n: usize, status: u16) {
        self.shared.fail_request(n, status);
    }

    /// Calls `hook` with the request number before each request is answered.
    pub fn on_request(&self, hook: impl Fn(usize) + Send + 'static) {
        self.shared.on_request(hook);
    }

    /// From now on, every page's cursor is the one it was asked with (a broken upstream).
    pub fn loop_cursor(&self) {
        self.shared.lock().1.loop_cursor = true;
    }

    /// Empty pages come back as 200 with an empty list, as without `Prefer: return=minimal`.
    pub fn never_204(&self) {
        self.shared.lock().1.never_204 = true;
    }

    /// The fake accepts only this access token from now on.
    pub fn set_access_token(&self, token: &str) {
        self.shared.lock().1.access_token = token.to_owned();
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().1.requests.clone()
    }

    /// Fails the test if deptsync broke a rule of the API.
    pub fn assert_no_violations(&self) {
        self.shared.assert_no_violations();
    }
}

fn error(status: StatusCode, request_id: &str, message: &str) -> Response {
    let body = json!({ "Message": message, "RequestId": request_id, "Details": null });
    (
        status,
        [("Request-Id", request_id.to_owned())],
        axum::Json(body),
    )
        .into_response()
}

fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

async fn get_all(
    State(shared): State<Shared<MewsState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.slow_down().await;
    let (number, failure) = shared.arrive();
    let mut guard = shared.lock();
    let (control, state) = &mut *guard;
    let request_id = format!("req-{number}");
    let mut record = RecordedRequest {
        window: None,
        cursor: None,
        count: 0,
        status: 200,
        returned: 0,
    };
    let failure = failure.map(|fault| (number, fault));
    let result = answer(state, &headers, &body, &request_id, &mut record, failure);
    let response = match result {
        Ok(response) => response,
        Err((status, message, violation)) => {
            if violation {
                control.violation(format!("request {number}: {message}"));
            }
            error(status, &request_id, &message)
        }
    };
    record.status = response.status().as_u16();
    state.requests.push(record);
    response
}

type Refusal = (StatusCode, String, bool);

fn violation(message: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, message.into(), true)
}

fn answer(
    state: &mut MewsState,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
    record: &mut RecordedRequest,
    failure: Option<(usize, Fault)>,
) -> Result<Response, Refusal> {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| violation(format!("body is not JSON: {e}")))?;
    let text = |field: &str| {
        request
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (client_token, access_token, client) =
        (text("ClientToken"), text("AccessToken"), text("Client"));
    if client_token.is_empty() || access_token.is_empty() || client.is_empty() {
        return Err(violation(
            "ClientToken, AccessToken and Client are required",
        ));
    }

    let limitation = request
        .get("Limitation")
        .ok_or_else(|| violation("Limitation is required"))?;
    let count = limitation
        .get("Count")
        .and_then(Value::as_i64)
        .ok_or_else(|| violation("Limitation.Count is required"))?;
    record.count = count;
    if !(1..=1000).contains(&count) {
        return Err(violation(format!(
            "Limitation.Count {count} is not in 1..=1000"
        )));
    }
    let cursor = limitation
        .get("Cursor")
        .and_then(Value::as_str)
        .map(str::to_owned);
    record.cursor = cursor.clone();

    let interval = request
        .get("UpdatedUtc")
        .ok_or_else(|| violation("deptsync must always send UpdatedUtc"))?;
    let (start, end) = match (
        interval.get("StartUtc").and_then(parse_time),
        interval.get("EndUtc").and_then(parse_time),
    ) {
        (Some(start), Some(end)) => (start, end),
        _ => return Err(violation("UpdatedUtc needs StartUtc and EndUtc")),
    };
    let window = Window { start, end };
    record.window = Some(window);
    if start >= end {
        return Err(violation(format!(
            "UpdatedUtc {window} is empty or inverted"
        )));
    }
    // At most three calendar months (the last day clamped to the shorter month).
    let limit = start.checked_add_months(Months::new(3)).unwrap();
    if end > limit {
        return Err(violation(format!(
            "UpdatedUtc {window} is longer than 3 months"
        )));
    }
    let enterprises: Option<Vec<Uuid>> = match request.get("EnterpriseIds") {
        None | Some(Value::Null) => None,
        Some(ids) => {
            let ids: Vec<Uuid> = serde_json::from_value(ids.clone())
                .map_err(|e| violation(format!("EnterpriseIds: {e}")))?;
            if ids.is_empty() || ids.len() > 1000 {
                return Err(violation("EnterpriseIds takes 1 to 1000 ids"));
            }
            Some(ids)
        }
    };

    if let Some((number, fault)) = failure {
        let sample = r#"{"Departments": [{"Id": "98776d06-60e4-495f-82f1-95ab2f644d63", "Name": "Sales"}], "Cursor": null}"#;
        return Ok(fault.respond(number, sample));
    }
    if client_token != CLIENT_TOKEN || access_token != state.access_token {
        return Err((
            StatusCode::UNAUTHORIZED,
            "Invalid AccessToken.".to_owned(),
            false,
        ));
    }

    let after = match &cursor {
        None => None,
        Some(cursor) => match state.cursors.get(&(cursor.clone(), window)) {
            Some(key) => Some(*key),
            None => {
                return Err(violation(format!(
                    "cursor {cursor} was never issued for {window}"
                )));
            }
        },
    };

    let mut matching: Vec<&FakeDepartment> = state
        .departments
        .iter()
        .filter(|d| start <= d.updated && d.updated < end)
        .filter(|d| {
            enterprises
                .as_ref()
                .is_none_or(|ids| ids.contains(&d.enterprise_id))
        })
        .collect();
    // Newest first; the id breaks ties so that the order is total.
    matching.sort_by_key(|d| std::cmp::Reverse((d.updated, d.id)));
    let page: Vec<&FakeDepartment> = matching
        .into_iter()
        .filter(|d| after.is_none_or(|key| (d.updated, d.id) < key))
        .take(count as usize)
        .collect();
    record.returned = page.len();

    let Some(oldest) = page.last() else {
        let minimal = headers
            .get("Prefer")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("return=minimal"));
        if minimal && !state.never_204 {
            return Ok((
                StatusCode::NO_CONTENT,
                [("Request-Id", request_id.to_owned())],
            )
                .into_response());
        }
        let body = json!({ "Departments": [], "Cursor": null });
        return Ok(([("Request-Id", request_id.to_owned())], axum::Json(body)).into_response());
    };
    let next_cursor = match (&cursor, state.loop_cursor) {
        (Some(asked), true) => asked.clone(),
        _ => oldest.id.to_string(),
    };
    let key = (oldest.updated, oldest.id);
    let departments: Vec<Value> = page.iter().map(|d| d.json.clone()).collect();
    state.cursors.insert((next_cursor.clone(), window), key);
    let body = json!({ "Departments": departments, "Cursor": next_cursor });
    Ok(([("Request-Id", request_id.to_owned())], axum::Json(body)).into_response())
}
