//! A fake Mews Connector API `departments/getAll` that keeps the vendor's documented rules
//! and records every breach as a violation (answered with a 400, so the sync fails too):
//!
//! - `POST` with a JSON body carrying `ClientToken`, `AccessToken` and `Client` (wrong
//!   token values get the vendor's 401, which is not a violation);
//! - `Limitation.Count` 1..=1000, `EnterpriseIds` at most 1000;
//! - an `UpdatedUtc` interval of at most three months (deptsync always sends one);
//! - `Limitation.Cursor` only as a cursor this fake issued for the same interval;
//! - newest-first paging, the response `Cursor` being the oldest item returned, null when
//!   nothing came back; `204` for an empty page when `Prefer: return=minimal` is sent;
//! - when a test turns it on, at most R requests per access token in any sliding period
//!   (Mews documents 200 per 30 seconds): a request over it gets a 429 with `Retry-After`.
//!
//! Switches for what the real API does and a friendly fake would not (BEHAVIOUR.md): a
//! request too heavy for it gets a 408 ([`FakeMews::too_heavy_over`]); cursors it issued
//! can stop being accepted (400, [`FakeMews::forget_cursors`]); a department can become
//! visible with an `UpdatedUtc` earlier than the moment it did ([`FakeMews::commit_late`]).
//!
//! The fake must never be what a benchmark measures: each department is encoded to JSON
//! once, when it arrives; departments are kept ordered by `(UpdatedUtc, Id)`, so a page is
//! a range lookup; and a page's body is the pre-encoded records put together byte by byte.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::time::{Duration, Instant};

use crate::model::Window;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Months, SubsecRound, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Fault, Shared};

/// The `ClientToken` the fake accepts.
pub const CLIENT_TOKEN: &str = "fake-client-token";
/// The `AccessToken` the fake accepts (unless [`FakeMews::set_access_token`] says otherwise).
pub const ACCESS_TOKEN: &str = "fake-access-token";
/// Where the fake serves `departments/getAll`.
pub const PATH: &str = "/api/connector/v1/departments/getAll";

/// One department as a test writes it: the record is a JSON value it may change before
/// inserting it.
#[derive(Debug, Clone)]
pub struct FakeDepartment {
    /// `Id`.
    pub id: Uuid,
    /// `EnterpriseId`.
    pub enterprise_id: Uuid,
    /// `UpdatedUtc`, by which the fake orders and selects departments.
    pub updated: DateTime<Utc>,
    /// The record as the fake sends it.
    pub json: Value,
}

impl FakeDepartment {
    /// An active department named `name`, updated at `updated` (whole seconds) and
    /// created 30 days before.
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

    /// `Name`.
    pub fn name(&self) -> &str {
        self.json["Name"].as_str().unwrap_or_default()
    }
}

/// `t` as the fake writes instants: RFC 3339 in whole seconds, `Z`.
pub fn format_utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One department of a generated history, already encoded as the fake sends it. The same
/// records can be loaded elsewhere (a benchmark copies them into PostgreSQL directly).
#[derive(Debug, Clone)]
pub struct GeneratedDepartment {
    /// `Id`.
    pub id: Uuid,
    /// `EnterpriseId`.
    pub enterprise_id: Uuid,
    /// `Name`.
    pub name: String,
    /// `CreatedUtc`.
    pub created: DateTime<Utc>,
    /// `UpdatedUtc`.
    pub updated: DateTime<Utc>,
    /// The record as the fake sends it (`IsActive` is always true).
    pub json: Vec<u8>,
}

/// `count` departments over `enterprises` enterprises, updated evenly over `[from, to)` in
/// whole seconds, oldest first. Department `i` has id `0x1000_0000 + i`, enterprise
/// `0xE000 + i % enterprises` and name `Department {i}`, whatever `count` is.
pub fn history(
    count: usize,
    enterprises: u128,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> impl Iterator<Item = GeneratedDepartment> {
    let span = (to - from).num_seconds().max(1);
    let enterprises = enterprises.max(1);
    (0..count).map(move |i| {
        let offset = span * i as i64 / count as i64;
        let updated = (from + chrono::Duration::seconds(offset)).trunc_subsecs(0);
        let created = updated - chrono::Duration::days(30);
        let id = Uuid::from_u128(0x1000_0000 + i as u128);
        let enterprise_id = Uuid::from_u128(0xE000 + (i as u128 % enterprises));
        let name = format!("Department {i}");
        let json = encode(id, enterprise_id, &name, created, updated);
        GeneratedDepartment {
            id,
            enterprise_id,
            name,
            created,
            updated,
            json,
        }
    })
}

/// The record of an active department, written straight to bytes (no `Value` on the way).
fn encode(
    id: Uuid,
    enterprise_id: Uuid,
    name: &str,
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
) -> Vec<u8> {
    let mut json = Vec::with_capacity(200 + name.len());
    // Invariant (the three expects): writing to a Vec cannot fail, and a str always encodes.
    write!(
        json,
        r#"{{"Id":"{id}","EnterpriseId":"{enterprise_id}","IsActive":true,"Name":"#
    )
    .expect("writing to a Vec cannot fail");
    serde_json::to_writer(&mut json, name).expect("a str always encodes");
    write!(
        json,
        r#","CreatedUtc":"{}","UpdatedUtc":"{}"}}"#,
        format_utc(created),
        format_utc(updated)
    )
    .expect("writing to a Vec cannot fail");
    json
}

/// What one request asked for and what it got.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The `UpdatedUtc` interval asked for, when the request got that far.
    pub window: Option<Window>,
    /// `Limitation.Cursor`.
    pub cursor: Option<String>,
    /// `Limitation.Count`.
    pub count: i64,
    /// The status answered.
    pub status: u16,
    /// Departments returned.
    pub returned: usize,
}

/// Where a department sits in the fake's order: newest first means the largest key first;
/// the id breaks ties so that the order is total.
type SortKey = (DateTime<Utc>, Uuid);

/// A department as the fake keeps it.
struct StoredDepartment {
    enterprise_id: Uuid,
    /// The record, encoded once.
    json: Box<[u8]>,
}

impl StoredDepartment {
    /// `department` as the fake keeps it.
    fn of(department: &FakeDepartment) -> StoredDepartment {
        // Invariant: a Value (string keys) always encodes, and into a Vec cannot fail.
        let json = serde_json::to_vec(&department.json).expect("a Value always encodes");
        StoredDepartment {
            enterprise_id: department.enterprise_id,
            json: json.into_boxed_slice(),
        }
    }
}

/// Mews' request limit: at most `requests` per access token in any sliding `period`.
struct RateLimit {
    requests: usize,
    period: Duration,
    /// Per access token, when each of its requests in the last `period` arrived.
    arrivals: HashMap<String, VecDeque<Instant>>,
}

impl RateLimit {
    /// Counts a request of `token` arriving at `now` (a refused one counts too: the
    /// vendor saw it); when it is over the limit, how long until one more would fit.
    fn admit(&mut self, token: &str, now: Instant) -> Option<Duration> {
        let arrivals = self.arrivals.entry(token.to_owned()).or_default();
        while arrivals
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.period)
        {
            arrivals.pop_front();
        }
        let over = arrivals
            .front()
            .filter(|_| arrivals.len() >= self.requests)
            .map(|oldest| self.period.saturating_sub(now.duration_since(*oldest)));
        arrivals.push_back(now);
        over
    }
}

/// The fake's departments, the requests it saw and the cursors it issued.
#[derive(Default)]
pub struct MewsState {
    departments: BTreeMap<SortKey, StoredDepartment>,
    /// Each department's key in `departments`, to replace it when it comes again.
    keys: HashMap<Uuid, SortKey>,
    requests: Vec<RecordedRequest>,
    /// (cursor, the interval it was issued for) → the sort key it stands at.
    cursors: HashMap<(String, Window), SortKey>,
    access_token: String,
    /// Answer empty pages with 200 and an empty list even when 204 is asked for.
    never_204: bool,
    /// Misbehave: send back the cursor that was asked with, so that paging never ends.
    loop_cursor: bool,
    rate_limit: Option<RateLimit>,
    /// A request asking for more than this `Limitation.Count` over an interval longer
    /// than this is too heavy: 408.
    too_heavy_over: Option<(i64, chrono::Duration)>,
    /// Cursors issued before [`FakeMews::forget_cursors`]: the API no longer takes them
    /// (400, which is the vendor's right, not deptsync's fault).
    forgotten_cursors: std::collections::HashSet<String>,
    /// Departments committed late: each becomes visible when request number `n` arrives.
    late: Vec<(usize, Uuid, DateTime<Utc>, StoredDepartment)>,
}

impl MewsState {
    fn put(&mut self, id: Uuid, updated: DateTime<Utc>, department: StoredDepartment) {
        let key = (updated, id);
        if let Some(old) = self.keys.insert(id, key)
            && old != key
        {
            self.departments.remove(&old);
        }
        self.departments.insert(key, department);
    }
}

/// A running fake Mews server on a loopback port.
#[derive(Clone)]
pub struct FakeMews {
    /// Its base URL, as configured (`http://127.0.0.1:PORT`).
    pub base_url: String,
    /// Its state and the controls every fake offers.
    pub shared: Shared<MewsState>,
}

impl FakeMews {
    /// Starts serving, with no departments, on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<FakeMews> {
        let shared = Shared::new(MewsState {
            access_token: ACCESS_TOKEN.to_owned(),
            ..MewsState::default()
        });
        let app = Router::new()
            .route(PATH, post(get_all))
            .with_state(shared.clone());
        Ok(FakeMews {
            base_url: super::serve(app).await?,
            shared,
        })
    }

    /// Adds `department`, or replaces the one with its id.
    pub fn insert(&self, department: FakeDepartment) {
        let stored = StoredDepartment::of(&department);
        self.shared
            .lock()
            .1
            .put(department.id, department.updated, stored);
    }

    /// Adds (or replaces) every department of `departments`, under one lock.
    pub fn load(&self, departments: impl IntoIterator<Item = GeneratedDepartment>) {
        let state = &mut self.shared.lock().1;
        for department in departments {
            let stored = StoredDepartment {
                enterprise_id: department.enterprise_id,
                json: department.json.into_boxed_slice(),
            };
            state.put(department.id, department.updated, stored);
        }
    }

    /// `count` departments over `enterprises` enterprises, updated evenly over `[from, to)`:
    /// the [`history`] of those arguments.
    pub fn generate(
        &self,
        count: usize,
        enterprises: u128,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) {
        self.load(history(count, enterprises, from, to));
    }

    /// Forgets every department (a benchmark frees one step's data before the next).
    pub fn clear(&self) {
        let state = &mut self.shared.lock().1;
        state.departments = BTreeMap::new();
        state.keys = HashMap::new();
        state.cursors = HashMap::new();
    }

    /// How many departments the fake holds.
    pub fn department_count(&self) -> usize {
        self.shared.lock().1.departments.len()
    }

    /// Every department, oldest update first (decoded again: for tests, not for bulk).
    pub fn departments(&self) -> Vec<FakeDepartment> {
        let state = &self.shared.lock().1;
        state
            .departments
            .iter()
            // The fake encoded every record itself: none fails to decode.
            .filter_map(|(&(updated, id), stored)| {
                let json = serde_json::from_slice(&stored.json).ok()?;
                Some(FakeDepartment {
                    id,
                    enterprise_id: stored.enterprise_id,
                    updated,
                    json,
                })
            })
            .collect()
    }

    /// A late commit: `department` becomes visible only when request number `n` (from 1,
    /// over the fake's life) arrives, with the `UpdatedUtc` it carries (which may be long
    /// before that moment, as when the vendor's transaction commits after its timestamp).
    pub fn commit_late(&self, n: usize, department: FakeDepartment) {
        let stored = StoredDepartment::of(&department);
        self.shared
            .lock()
            .1
            .late
            .push((n, department.id, department.updated, stored));
    }

    /// From now on, a request whose `Limitation.Count` is over `count` and whose
    /// interval is longer than `window` is too heavy and answered 408, as Mews answers
    /// requests that would take it tens of seconds. Asking for less is the cure.
    pub fn too_heavy_over(&self, count: i64, window: chrono::Duration) {
        self.shared.lock().1.too_heavy_over = Some((count, window));
    }

    /// The API stops accepting every cursor it issued so far: they are answered 400.
    pub fn forget_cursors(&self) {
        let state = &mut self.shared.lock().1;
        let issued: Vec<String> = state
            .cursors
            .drain()
            .map(|((cursor, _), _)| cursor)
            .collect();
        state.forgotten_cursors.extend(issued);
    }

    /// Answers request number `n` (from 1, over the fake's life) with `status`.
    pub fn fail_request(&self, n: usize, status: u16) {
        self.shared.fail_request(n, status);
    }

    /// Calls `hook` with the request number before each request is answered.
    pub fn on_request(&self, hook: impl Fn(usize) + Send + 'static) {
        self.shared.on_request(hook);
    }

    /// Every page from now on takes `delay` more (a slow upstream).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.set_delay(delay);
    }

    /// From now on, at most `requests` per access token in any sliding `period`, as Mews
    /// enforces it (200 per 30 s): a request over it is answered 429 with `Retry-After`
    /// and recorded as a violation, since deptsync's budget must keep it under.
    pub fn enforce_rate_limit(&self, requests: usize, period: Duration) {
        self.shared.lock().1.rate_limit = Some(RateLimit {
            requests: requests.max(1),
            period,
            arrivals: HashMap::new(),
        });
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

    /// Every request so far, in the order they were answered.
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

/// The access token a request body carries, if it is JSON with one.
fn access_token_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Tokens {
        #[serde(rename = "AccessToken")]
        access_token: Option<String>,
    }
    serde_json::from_slice::<Tokens>(body)
        .ok()
        .and_then(|t| t.access_token)
}

async fn get_all(
    State(shared): State<Shared<MewsState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The limit counts requests as they arrive; the slowness is the upstream's, after that.
    let arrived = Instant::now();
    let throttled = {
        let state = &mut shared.lock().1;
        match (state.rate_limit.as_mut(), access_token_of(&body)) {
            (Some(limit), Some(token)) => limit
                .admit(&token, arrived)
                .map(|wait| (wait, limit.requests, limit.period)),
            _ => None,
        }
    };
    shared.slow_down().await;
    let (number, failure) = shared.arrive();
    let mut guard = shared.lock();
    let (control, state) = &mut *guard;
    let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut state.late)
        .into_iter()
        .partition(|(visible_at, ..)| *visible_at <= number);
    state.late = later;
    for (_, id, updated, department) in due {
        state.put(id, updated, department);
    }
    let request_id = format!("req-{number}");
    let mut record = RecordedRequest {
        window: None,
        cursor: None,
        count: 0,
        status: 200,
        returned: 0,
    };
    let response = if let Some((wait, requests, period)) = throttled {
        control.violation(format!(
            "request {number} went over {requests} requests per {period:?} for its access token"
        ));
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            &request_id,
            "Too many requests.",
        );
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, seconds.max(1).into());
        response
    } else {
        let failure = failure.map(|fault| (number, fault));
        match answer(state, &headers, &body, &request_id, &mut record, failure) {
            Ok(response) => response,
            Err((status, message, violation)) => {
                if violation {
                    control.violation(format!("request {number}: {message}"));
                }
                error(status, &request_id, &message)
            }
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
    let Some(limit) = start.checked_add_months(Months::new(3)) else {
        return Err(violation(format!(
            "UpdatedUtc {window} starts too late to be an instant"
        )));
    };
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

    if let Some((max_count, max_window)) = state.too_heavy_over
        && count > max_count
        && end - start > max_window
    {
        return Err((
            StatusCode::REQUEST_TIMEOUT,
            "The request took too long; ask for less.".to_owned(),
            false,
        ));
    }
    let after = match &cursor {
        None => None,
        Some(cursor) => match state.cursors.get(&(cursor.clone(), window)) {
            Some(key) => Some(*key),
            None if state.forgotten_cursors.contains(cursor) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("Invalid Cursor {cursor}."),
                    false,
                ));
            }
            None => {
                return Err(violation(format!(
                    "cursor {cursor} was never issued for {window}"
                )));
            }
        },
    };

    // Newest first, below the cursor when there is one: a range of the ordered map. The
    // nil id is the smallest, so `(end, nil)` excludes every department updated at `end`.
    let lowest: SortKey = (start, Uuid::nil());
    let above = after.map_or((end, Uuid::nil()), |key| key.min((end, Uuid::nil())));
    let page: Vec<(&SortKey, &StoredDepartment)> = if lowest < above {
        state
            .departments
            .range(lowest..above)
            .rev()
            .filter(|(_, d)| {
                enterprises
                    .as_ref()
                    .is_none_or(|ids| ids.contains(&d.enterprise_id))
            })
            .take(count as usize)
            .collect()
    } else {
        Vec::new()
    };
    record.returned = page.len();

    let Some(&(&oldest, _)) = page.last() else {
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
        _ => oldest.1.to_string(),
    };
    let encoded: usize = page.iter().map(|(_, d)| d.json.len() + 1).sum();
    let mut body = Vec::with_capacity(encoded + next_cursor.len() + 64);
    body.extend_from_slice(br#"{"Departments":["#);
    for (i, (_, department)) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&department.json);
    }
    body.extend_from_slice(br#"],"Cursor":"#);
    // Invariant: a str always encodes, and into a Vec cannot fail.
    serde_json::to_writer(&mut body, &next_cursor).expect("a str always encodes");
    body.push(b'}');
    state.cursors.insert((next_cursor, window), oldest);
    Ok((
        [
            ("Request-Id", request_id.to_owned()),
            ("Content-Type", "application/json".to_owned()),
        ],
        body,
    )
        .into_response())
}
