//! deptsync's integration tests: one binary, one database per test, fake upstreams.

mod cli;
mod daemon;
mod demo;
mod fleet;
mod helpers;
mod history;
mod hostile;
mod leases;
mod listings;
mod mews;
mod proxy;
mod reader;
mod real_upstreams;
mod resilience;
mod store;
