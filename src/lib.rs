//! deptsync keeps an SQL copy of the departments held in several SaaS APIs, incrementally.
//!
//! - [`config`]: the config file, parsed then validated before any I/O.
//! - [`sources`]: one connector per vendor behind the [`sources::Source`] trait.
//! - [`store`]: where departments and positions are kept, behind [`store::Store`].
//! - [`engine`]: one pass of one source: plan, fetch, commit each page with its checkpoint.
//! - [`plan`]: cutting time ranges into the windows an API accepts.
//! - [`model`]: the words every module shares.
//! - [`cli`]: the subcommands.
//! - `demo` and `fakes` (feature `demo`, on by default): `deptsync demo`, and the simulated
//!   vendor APIs it syncs from, which the tests and the benchmark use too.

pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
#[cfg(feature = "demo")]
pub mod fakes;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod progress;
pub mod sources;
pub mod store;

/// An error and all its causes on one line, `outer: inner: innermost`: what logs and
/// `sync_runs.error` keep of a failure.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
