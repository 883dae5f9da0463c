//! deptsync's integration tests: one binary, one database per test, fake upstreams.

mod cli;
mod daemon;
mod fakes;
mod helpers;
mod listings;
mod mews;
mod proxy;
mod resilience;
mod store;
