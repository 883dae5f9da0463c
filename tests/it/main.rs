//! deptsync's integration tests: one binary, one database per test, fake upstreams.

mod cli;
mod cluster;
mod daemon;
mod demo;
mod feed;
mod fleet;
mod helpers;
mod history;
mod hostile;
mod leases;
mod listings;
mod mews;
mod operations;
mod proxy;
mod reader;
mod real_upstreams;
mod resilience;
mod store;
