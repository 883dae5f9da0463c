//! deptsync's integration tests: one binary, one database per test, fake upstreams.

mod cli;
mod fakes;
mod helpers;
mod listings;
mod mews;
mod store;
