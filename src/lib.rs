//! deptsync keeps an SQL copy of the departments held in several SaaS APIs, incrementally.
//!
//! - [`config`]: the config file, parsed then validated before any I/O.
//! - [`sources`]: one connector per vendor behind the [`sources::Source`] trait.
//! - [`store`]: where departments and positions are kept, behind [`store::Store`].
//! - [`engine`]: one pass of one source: plan, fetch, commit each page with its checkpoint.
//! - [`plan`]: cutting time ranges into the windows an API accepts.
//! - [`model`]: the words every module shares.
//! - [`cli`]: the subcommands.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod sources;
pub mod store;
