//! A fake tenant data API: `GET /v1/data/departments` with `Authorization: Bearer` and
//! `Accept: application/json` (both required by its page) returns every department at once
//! as `{"success": true, "result": [{"id", "parent_id", "name"}]}`.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::Shared;

/// The bearer token the fake accepts.
pub const TOKEN: &str = "data-api-token";

/// The fake's departments, by id.
#[derive(Default)]
pub struct DataV1State {
    departments: BTreeMap<String, Value>,
}

/// A running fake data API on a loopback port.
#[derive(Clone)]
pub struct FakeDataV1 {
    /// Its base URL, as configured (`http://127.0.0.1:PORT`).
    pub base_url: String,
    /// Its state and the controls every fake offers.
    pub shared: Shared<DataV1State>,
}

impl FakeDataV1 {
    /// Starts serving, with no departments, on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<FakeDataV1> {
        let shared = Shared::new(DataV1State::default());
        let router = Router::new()
            .route("/v1/data/departments", get(departments))
            .with_state(shared.clone());
        Ok(FakeDataV1 {
            base_url: super::serve(router).await?,
            shared,
        })
    }

    /// Adds or replaces department `id`, under `parent` (`None`: a root).
    pub fn put(&self, id: &str, parent: Option<&str>, name: &str) {
        let record = json!({ "id": id, "parent_id": parent, "name": name });
        self.shared
            .lock()
            .1
            .departments
            .insert(id.to_owned(), record);
    }

    /// Removes department `id` from the listing.
    pub fn remove(&self, id: &str) {
        self.shared.lock().1.departments.remove(id);
    }
}

async fn departments(State(shared): State<Shared<DataV1State>>, headers: HeaderMap) -> Response {
    shared.slow_down().await;
    let (number, failure) = shared.arrive();
    let mut guard = shared.lock();
    let (control, state) = &mut *guard;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if header("Accept") != "application/json" {
        control.violation("a request without Accept: application/json");
        return (
            StatusCode::NOT_ACCEPTABLE,
            axum::Json(json!({ "success": false })),
        )
            .into_response();
    }
    if header("Authorization") != format!("Bearer {TOKEN}") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "success": false, "message": "Unauthorized" })),
        )
            .into_response();
    }
    if let Some(fault) = failure {
        return fault.respond(number, r#"{"data": [{"id": 1, "name": "Sales", "branch": {"id": 1}}], "result": [], "metadata": {}}"#);
    }
    let result: Vec<&Value> = state.departments.values().collect();
    axum::Json(json!({ "success": true, "result": result })).into_response()
}
