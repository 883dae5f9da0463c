//! Simulated vendor APIs: Mews, Procurify, Snapbooks and a tenant data API, each served
//! on a loopback port. They stand for the outside world and enforce its rules: a request
//! that breaks one is recorded as a violation (and refused), and every test ends by
//! asserting there were none.
//!
//! `deptsync demo` serves them with generated departments ([`crate::demo`]); the
//! integration tests and the benchmark (`benches/sync.rs`) drive them to every corner of
//! the vendors' behaviour (faults, throttling, slow pages). Compiled with the `demo`
//! feature (on by default).
#![warn(missing_docs)]

pub mod data_v1;
pub mod mews;
pub mod procurify;
pub mod snapbooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Serves `router` on an ephemeral loopback port for as long as the runtime runs; returns
/// its base URL (`http://127.0.0.1:PORT`).
pub async fn serve(router: Router) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(%address, error = %e, "a simulated upstream stopped serving");
        }
    });
    Ok(format!("http://{address}"))
}

/// Reads page-number paging parameters (`page` and `size_key`, both from 1), or says why
/// they break the API's rules.
pub fn paging(
    query: &std::collections::BTreeMap<String, String>,
    size_key: &str,
    default_size: u64,
) -> Result<(u64, u64), String> {
    let number = |key: &str, default: u64| {
        query
            .get(key)
            .map_or(Some(default), |v| v.parse::<u64>().ok())
    };
    match (number("page", 1), number(size_key, default_size)) {
        (Some(page), Some(size)) if page >= 1 && size >= 1 => Ok((page, size)),
        _ => Err(format!(
            "page and {size_key} must be whole numbers from 1: {query:?}"
        )),
    }
}

/// The most of `arrivals` within any `window`.
pub fn busiest(mut arrivals: Vec<std::time::Instant>, window: std::time::Duration) -> usize {
    arrivals.sort();
    (0..arrivals.len())
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|t| **t < arrivals[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

type Hook = Box<dyn Fn(usize) + Send>;

/// A way an upstream can fail one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An error status with a JSON error body.
    Status(u16),
    /// 429, with or without `Retry-After` (seconds). A request that comes back before the
    /// time it asked for is a violation.
    TooManyRequests {
        /// The `Retry-After` header, in seconds; none when `None`.
        retry_after: Option<u64>,
    },
    /// The connection drops after the status line, before any body.
    Dropped,
    /// The body stops half way.
    Truncated,
    /// A 200 whose body is not JSON.
    InvalidJson,
}

impl Fault {
    /// The answer that fails request `number`; `sample` is a valid body to spoil.
    pub fn respond(self, number: usize, sample: &str) -> Response {
        let request_id = format!("req-{number}");
        let body = json!({ "Message": "injected failure", "detail": "injected failure", "message": "injected failure", "RequestId": request_id });
        let broken = |chunks: Vec<Result<Bytes, std::io::Error>>| {
            let stream = futures_util::stream::iter(chunks);
            (
                StatusCode::OK,
                [
                    ("Request-Id", request_id.clone()),
                    ("Content-Type", "application/json".to_owned()),
                ],
                Body::from_stream(stream),
            )
                .into_response()
        };
        let cut = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected");
        match self {
            Fault::Status(status) => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                [("Request-Id", request_id.clone())],
                axum::Json(body),
            )
                .into_response(),
            Fault::TooManyRequests { retry_after } => {
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("Request-Id", request_id.clone())],
                    axum::Json(body),
                )
                    .into_response();
                if let Some(seconds) = retry_after {
                    response.headers_mut().insert("Retry-After", seconds.into());
                }
                response
            }
            Fault::Dropped => broken(vec![Err(cut())]),
            Fault::Truncated => {
                let half = Bytes::copy_from_slice(&sample.as_bytes()[..sample.len() / 2]);
                broken(vec![Ok(half), Err(cut())])
            }
            Fault::InvalidJson => (
                StatusCode::OK,
                [("Request-Id", request_id.clone())],
                format!(
                    "{{\"oops\": {}",
                    sample.get(..sample.len() / 3).unwrap_or_default()
                ),
            )
                .into_response(),
        }
    }
}

/// A client reading several windows at once has other requests on the wire when a 429
/// answers one of them; it cannot take back those. Requests arriving this soon after the
/// 429 was answered are taken as sent before the client could read it, and excused. On
/// loopback that is the time the fake's own handler takes to be scheduled on a busy
/// machine, not a wait the client may spend: a request that waited for its rate-limit
/// turn and went out after the 429 arrives later than this, and is a violation.
const IN_FLIGHT_GRACE: std::time::Duration = std::time::Duration::from_millis(40);

/// Seeded random faults: each request fails with probability `rate`, with one of `faults`.
struct Chaos {
    rng: fastrand::Rng,
    rate: f64,
    faults: Vec<Fault>,
}

/// What every fake keeps besides its data: the requests it saw, the rule breaches among
/// them and the failures a test asked it to inject.
#[derive(Default)]
pub struct Control {
    requests: usize,
    violations: Vec<String>,
    failures: HashMap<usize, Fault>,
    chaos: Option<Chaos>,
    /// Set by a 429 with `Retry-After`: no request may arrive before, except those
    /// arriving before `in_flight_until` (see [`IN_FLIGHT_GRACE`]).
    not_before: Option<std::time::Instant>,
    in_flight_until: Option<std::time::Instant>,
    /// When each request arrived.
    arrivals: Vec<std::time::Instant>,
}

impl Control {
    /// Records a breach of the API's rules.
    pub fn violation(&mut self, message: impl Into<String>) {
        self.violations.push(message.into());
    }
}

/// A fake's shared state, with the test-facing controls every fake offers.
pub struct Shared<T> {
    inner: Arc<Mutex<(Control, T)>>,
    /// Kept apart from the data so that a hook may change the data.
    hooks: Arc<Mutex<Vec<Hook>>>,
    /// How long every answer takes (a slow upstream).
    delay: Arc<Mutex<std::time::Duration>>,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            inner: self.inner.clone(),
            hooks: self.hooks.clone(),
            delay: self.delay.clone(),
        }
    }
}

impl<T> Shared<T> {
    /// A fake's state `state`, with no request seen yet.
    pub fn new(state: T) -> Self {
        Shared {
            inner: Arc::new(Mutex::new((Control::default(), state))),
            hooks: Arc::default(),
            delay: Arc::default(),
        }
    }

    /// Every answer from now on takes `delay` more.
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self
            .delay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = delay;
    }

    fn delay(&self) -> std::time::Duration {
        *self
            .delay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits as long as a slow upstream would (handlers call it before answering).
    pub async fn slow_down(&self) {
        let delay = self.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// The control and the data, locked together.
    pub fn lock(&self) -> MutexGuard<'_, (Control, T)> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a request, runs the hooks (before any lock on the data is taken), and says
    /// whether to fail it and how. Every handler calls it first.
    pub fn arrive(&self) -> (usize, Option<Fault>) {
        let (number, failure) = {
            let mut guard = self.lock();
            let control = &mut guard.0;
            control.requests += 1;
            let number = control.requests;
            let now = std::time::Instant::now();
            control.arrivals.push(now);
            let in_flight = control.in_flight_until.is_some_and(|t| now < t);
            if let Some(not_before) = control.not_before.filter(|t| now < *t && !in_flight) {
                let early = not_before - now;
                control.violation(format!(
                    "request {number} came {early:?} before the Retry-After had passed"
                ));
            }
            let mut failure = control.failures.get(&number).copied();
            if let Some(chaos) = control.chaos.as_mut()
                && failure.is_none()
                && chaos.rng.f64() < chaos.rate
            {
                failure = Some(chaos.faults[chaos.rng.usize(..chaos.faults.len())]);
            }
            if let Some(Fault::TooManyRequests {
                retry_after: Some(seconds),
            }) = failure
            {
                control.not_before = Some(now + std::time::Duration::from_secs(seconds));
                let answered = now + self.delay();
                control.in_flight_until = Some(answered + IN_FLIGHT_GRACE);
            }
            (number, failure)
        };
        let hooks = self
            .hooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for hook in hooks.iter() {
            hook(number);
        }
        (number, failure)
    }

    /// Answers request number `n` (from 1, over the fake's life) with `status`.
    pub fn fail_request(&self, n: usize, status: u16) {
        self.inject(n, Fault::Status(status));
    }

    /// Fails request number `n` (from 1, over the fake's life) with `fault`.
    pub fn inject(&self, n: usize, fault: Fault) {
        self.lock().0.failures.insert(n, fault);
    }

    /// From now on, fails each request with probability `rate`, with one of `faults`
    /// chosen by a generator seeded with `seed`.
    pub fn chaos(&self, seed: u64, rate: f64, faults: &[Fault]) {
        self.lock().0.chaos = Some(Chaos {
            rng: fastrand::Rng::with_seed(seed),
            rate,
            faults: faults.to_vec(),
        });
    }

    /// Calls `hook` with the request number as each request arrives.
    pub fn on_request(&self, hook: impl Fn(usize) + Send + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Box::new(hook));
    }

    /// Requests seen so far.
    pub fn requests(&self) -> usize {
        self.lock().0.requests
    }

    /// When each request arrived.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.lock().0.arrivals.clone()
    }

    /// The most requests that arrived within any `window`.
    pub fn busiest(&self, window: std::time::Duration) -> usize {
        busiest(self.arrivals(), window)
    }

    /// The breaches of the API's rules recorded so far.
    pub fn violations(&self) -> Vec<String> {
        self.lock().0.violations.clone()
    }

    /// Fails the test if deptsync broke a rule of the API (for tests: it panics).
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "deptsync broke the API's rules: {violations:#?}"
        );
    }
}
