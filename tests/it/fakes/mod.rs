//! Fakes of the vendors' APIs. They stand for the outside world and enforce its rules.

pub mod mews;
