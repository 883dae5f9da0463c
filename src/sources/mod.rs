//! Connectors: one module per vendor, behind the one small [`Source`] trait.
//!
//! A connector knows its vendor's wire format, auth and paging, and nothing about storage.
//! It answers one question: "give me the page at this position". The engine decides
//! which positions to ask for and commits each page together with the position after it,
//! so a connector never has to remember anything between calls.
//!
//! Adding a kind: a module here with its config, settings and [`Source`] impl, an arm in
//! [`crate::config::SourceKindSettings`] and one in [`Connector`].

pub mod http;
pub mod mews;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{SourceKindSettings, SourceSettings};
use crate::model::{Department, RejectedRecord, Window};

/// How the engine must read a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The API filters by update time: read `[high-water mark - lookback, now)` in
    /// windows of at most `max_window_months`, paging through each with a cursor.
    Windowed {
        start: DateTime<Utc>,
        lookback: Duration,
        max_window_months: u32,
    },
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    pub departments: Vec<Department>,
    /// Records that could not be read as departments.
    pub rejected: Vec<RejectedRecord>,
    /// Where the next page of this window starts; `None` when the window is exhausted.
    pub next_cursor: Option<String>,
}

/// What a vendor said, or why we could not hear it. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("upstream answered {status}: {message} (request id {})", request_id.as_deref().unwrap_or("none"))]
    Http {
        status: u16,
        message: String,
        request_id: Option<String>,
    },
    #[error("request failed")]
    Transport(#[source] reqwest::Error),
    #[error("unreadable response: {message} (request id {})", request_id.as_deref().unwrap_or("none"))]
    Decode {
        message: String,
        request_id: Option<String>,
    },
    #[error("upstream broke its paging rules: {message} (request id {})", request_id.as_deref().unwrap_or("none"))]
    Protocol {
        message: String,
        request_id: Option<String>,
    },
}

/// A connector.
pub trait Source: Send + Sync {
    /// How the engine must read this source.
    fn mode(&self) -> SyncMode;

    /// The page of `window` that starts at `cursor` (`None`: the first page).
    fn fetch_page(
        &self,
        window: &Window,
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send;

    /// One cheap authenticated call, to prove the URL and the credentials work.
    fn check(&self) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Every connector, known at compile time.
pub enum Connector {
    Mews(mews::Mews),
}

impl Connector {
    /// Builds the connector for a validated source. Does no I/O.
    pub fn new(settings: &SourceSettings, client: &reqwest::Client) -> Connector {
        match &settings.kind {
            SourceKindSettings::Mews(mews) => {
                Connector::Mews(mews::Mews::new(mews.clone(), client.clone()))
            }
        }
    }
}

impl Source for Connector {
    fn mode(&self) -> SyncMode {
        match self {
            Connector::Mews(source) => source.mode(),
        }
    }

    async fn fetch_page(&self, window: &Window, cursor: Option<&str>) -> Result<Page, SourceError> {
        match self {
            Connector::Mews(source) => source.fetch_page(window, cursor).await,
        }
    }

    async fn check(&self) -> Result<(), SourceError> {
        match self {
            Connector::Mews(source) => source.check().await,
        }
    }
}
