//! Fakes of the vendors' APIs. They stand for the outside world and enforce its rules:
//! a request that breaks one is recorded as a violation (and refused), and every test
//! ends by asserting there were none.

pub mod data_v1;
pub mod mews;
pub mod procurify;
pub mod snapbooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;

/// Serves `router` on a loopback port for the rest of the test; returns its base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{address}")
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

type Hook = Box<dyn Fn(usize) + Send>;

/// What every fake keeps besides its data: the requests it saw, the rule breaches among
/// them and the failures a test asked it to inject.
#[derive(Default)]
pub struct Control {
    requests: usize,
    violations: Vec<String>,
    failures: HashMap<usize, u16>,
}

impl Control {
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

    /// Waits as long as a slow upstream would (handlers call it before answering).
    pub async fn slow_down(&self) {
        let delay = *self
            .delay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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
    /// whether to fail it and with which status. Every handler calls it first.
    pub fn arrive(&self) -> (usize, Option<u16>) {
        let (number, failure) = {
            let mut guard = self.lock();
            guard.0.requests += 1;
            let number = guard.0.requests;
            (number, guard.0.failures.get(&number).copied())
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
        self.lock().0.failures.insert(n, status);
    }

    /// Calls `hook` with the request number as each request arrives.
    pub fn on_request(&self, hook: impl Fn(usize) + Send + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Box::new(hook));
    }

    pub fn requests(&self) -> usize {
        self.lock().0.requests
    }

    /// Fails the test if deptsync broke a rule of the API.
    pub fn assert_no_violations(&self) {
        let violations = self.lock().0.violations.clone();
        assert!(
            violations.is_empty(),
            "deptsync broke the API's rules: {violations:#?}"
        );
    }
}
