//! Connectors: one module per vendor, behind two small traits, [`WindowedSource`] and
//! [`ListingSource`] (and [`Source`], what both answer).
//!
//! A connector knows its vendor's wire format, auth and paging, and nothing about storage.
//! It answers one question: "give me the page at this position" (of a window, or of the
//! listing). The engine decides
//! which positions to ask for and commits each page together with the position after it,
//! so a connector never has to remember anything between calls.
//!
//! Two kinds of API exist: those that can say "what changed between T1 and T2" (Mews: a
//! [`WindowedSource`]) and those that can only list everything (a [`ListingSource`],
//! whose deletions the engine works out from complete listings). A cursor is opaque to
//! the engine: each connector encodes in it whatever it needs to find the next page, and
//! checks that it still fits when it gets it back.
//!
//! Each vendor owns its config: the module defines the fields of its `[[sources]]` table,
//! validates them and builds its connector ([`kinds::SourceKind`]). Adding a kind: a
//! module here, a fake in `crate::fakes`, and one line in the registry ([`kinds`]).

pub mod data_v1;
pub mod http;
pub mod kinds;
pub mod mews;
mod not_utf8;
mod paging;
pub mod procurify;
pub mod settings;
pub mod snapbooks;

pub use kinds::{Connector, KindSettings, ListingConnector, WindowedConnector};
pub use settings::SourceSettings;

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};

use serde::de::{Deserialize, DeserializeOwned, Deserializer};

use crate::model::{Department, RawRecord, RejectedRecord, Window};

/// How a source that can only list everything is read, and what its listings may delete.
#[derive(Debug, Clone, PartialEq)]
pub struct FullListingMode {
    /// The most of the source's live rows (and of each scope's) one listing may delete.
    pub max_delete_fraction: f64,
    /// What the vendor calls the scope a department is filed under (`scope_id`), for
    /// messages: "client account", "branch".
    pub scope_noun: &'static str,
    /// The scopes the settings name, when they name some: the listing reads only those,
    /// so it may delete only departments of those. `None`: whatever the credential sees.
    pub scopes: Option<Vec<String>>,
}

/// How a source that filters by update time is read: `[high-water mark - lookback, now)`
/// (the first time, from `start`) in windows of at most `max_window_months`, paging
/// through each with a cursor, `page_size` records a page (less when the upstream finds
/// that too heavy), `concurrent_windows` windows at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowedMode {
    pub start: DateTime<Utc>,
    pub lookback: Duration,
    pub max_window_months: u32,
    pub concurrent_windows: u32,
    pub page_size: u32,
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    pub departments: Vec<Department>,
    /// Records that could not be read as departments.
    pub rejected: Vec<RejectedRecord>,
    /// Where the next page starts; `None` when the window or listing is exhausted.
    pub next_cursor: Option<String>,
    /// The vendor's id for the request that got this page, for errors about it.
    pub request_id: Option<String>,
}

impl Page {
    /// A page of `records`, read as the response was decoded.
    pub(crate) fn from_records<T>(records: Records<T>, next_cursor: Option<String>) -> Page {
        let Records(records) = records;
        let mut page = Page {
            departments: Vec::with_capacity(records.len()),
            rejected: Vec::new(),
            next_cursor,
            request_id: None,
        };
        for Record(read, _) in records {
            match read {
                Ok(department) => page.departments.push(department),
                Err(rejected) => page.rejected.push(rejected),
            }
        }
        page
    }
}

/// A department record as one vendor writes it: the fields deptsync reads from it, and
/// how they make a [`Department`].
pub(crate) trait VendorRecord: DeserializeOwned {
    /// The vendor's name, in the reason a record is rejected.
    const VENDOR: &'static str;
    /// The field holding a record's id, to name a rejected record.
    const ID_FIELD: &'static str;

    fn into_department(self, raw: RawRecord) -> Department;
}

/// One record of a response, read while the response is decoded: its text is kept as it
/// came, and the fields `T` needs are read from that text. A record that is not a `T` is
/// kept aside, with the reason, instead of failing the page.
pub(crate) struct Record<T>(Result<Department, RejectedRecord>, PhantomData<fn() -> T>);

impl<'de, T: VendorRecord> Deserialize<'de> for Record<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawRecord::deserialize(deserializer)?;
        if let Some(rejected) = not_utf8::reject(&raw, T::ID_FIELD) {
            return Ok(Record(Err(rejected), PhantomData));
        }
        let read = match serde_json::from_str::<T>(raw.as_str()) {
            Ok(fields) => Ok(fields.into_department(raw)),
            Err(error) => {
                let payload = raw.to_value();
                Err(RejectedRecord {
                    external_id: id_text(&payload, T::ID_FIELD),
                    reason: format!("not a {} department: {error}", T::VENDOR),
                    payload,
                })
            }
        };
        Ok(Record(read, PhantomData))
    }
}

/// The most records of one page that may fail to read as departments. Each is kept aside
/// with its payload and a reason, several times its size in the body; past this many the
/// response is not a departments page at all (`[{},{},…]` in a bounded body would
/// otherwise cost gigabytes), and the page fails.
pub const MAX_REJECTED_PER_PAGE: usize = 1000;

/// The records of a page, read as the response is decoded (see [`Record`]); more than
/// [`MAX_REJECTED_PER_PAGE`] that are not departments fail the page.
pub(crate) struct Records<T>(pub(crate) Vec<Record<T>>);

impl<T> Records<T> {
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl<T> Default for Records<T> {
    fn default() -> Self {
        Records(Vec::new())
    }
}

impl<'de, T: VendorRecord> Deserialize<'de> for Records<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(PhantomData<fn() -> T>);
        impl<'de, T: VendorRecord> serde::de::Visitor<'de> for Visit<T> {
            type Value = Records<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of department records")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Records<T>, A::Error> {
                let mut records = Vec::new();
                let mut rejected = 0;
                while let Some(record) = seq.next_element::<Record<T>>()? {
                    if record.0.is_err() {
                        rejected += 1;
                        if rejected > MAX_REJECTED_PER_PAGE {
                            return Err(serde::de::Error::custom(format!(
                                "more than {MAX_REJECTED_PER_PAGE} records of one page are not \
                                 {} departments",
                                T::VENDOR
                            )));
                        }
                    }
                    records.push(record);
                }
                Ok(Records(records))
            }
        }
        deserializer.deserialize_seq(Visit(PhantomData))
    }
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
    /// The body went past the source's `max_response_bytes` (decompressed) and was not
    /// read further: a fault or an attack, never a departments page.
    #[error("the response body is larger than max_response_bytes = {limit}; it was not read further (request id {})", request_id.as_deref().unwrap_or("none"))]
    TooLarge {
        limit: u64,
        request_id: Option<String>,
    },
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
    /// The listing changed under its page numbers (records added or removed while it was
    /// read), so pages may have shifted: the listing must start again to be complete.
    #[error("the listing changed while it was read: {0}")]
    ListingChanged(String),
    #[error("getting an access token from {token_url}")]
    Token {
        token_url: String,
        #[source]
        source: Box<SourceError>,
    },
    /// Mews' 408: the request was too heavy; ask for less (a smaller window).
    #[error("the request was too heavy for the upstream (408; ask for less) (request id {})", request_id.as_deref().unwrap_or("none"))]
    TooHeavy { request_id: Option<String> },
    /// A `Retry-After` longer than a pass waits holds the credential back.
    #[error(
        "the upstream asked to wait {seconds} s more before any request (Retry-After); a later pass goes on"
    )]
    HeldBack { seconds: u64 },
    #[error("gave up after {attempts} attempts")]
    GaveUp {
        attempts: u32,
        #[source]
        last: Box<SourceError>,
    },
}

/// What every connector answers.
pub trait Source: Send + Sync {
    /// One cheap authenticated call, to prove the URL and the credentials work.
    fn check(&self) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// A fingerprint of the settings that decide what this source reads (its kind, base
    /// URL, the scopes it names, where it starts; never a secret), so that a saved
    /// position is known to be a position of these settings. A change of tokens alone
    /// does not change it: a rotation for the same scope is routine.
    fn scope(&self) -> String;
}

/// A connector to an API that filters by update time: a pass reads
/// `[high-water mark - lookback, now)` in windows, each paged through with a cursor.
pub trait WindowedSource: Source {
    /// How its passes are windowed.
    fn windowing(&self) -> WindowedMode;

    /// The page of at most `page_size` of the updates in `window` at `cursor` (`None`: the
    /// window's first page).
    fn fetch_window_page(
        &self,
        window: &Window,
        cursor: Option<&str>,
        page_size: u32,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send;
}

/// A connector to an API that can only list everything: every pass reads the whole
/// listing, and a department missing from complete listings is marked deleted, behind
/// the guards.
pub trait ListingSource: Source {
    /// What its listings may delete.
    fn listing(&self) -> FullListingMode;

    /// The listing's page at `cursor` (`None`: its first page).
    fn fetch_listing_page(
        &self,
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send;
}

/// The fingerprint of the settings `parts` (see [`Source::scope`]): an md5 digest in hex,
/// short enough to keep whatever the lists hold.
pub(crate) fn fingerprint(parts: &[&str]) -> String {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    for part in parts {
        // Lengths first: no two lists of parts give the same bytes.
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// `items` sorted and joined by commas: a set of ids as one fingerprint part.
pub(crate) fn id_set<T: ToString>(items: &[T]) -> String {
    let mut ids: Vec<String> = items.iter().map(ToString::to_string).collect();
    ids.sort();
    ids.dedup();
    ids.join(",")
}

/// Encodes a full-listing connector's cursor as JSON, readable in `sync_state`.
pub(crate) fn encode_cursor(cursor: &impl serde::Serialize) -> String {
    // The cursors are structs of numbers and plain strings: serializing them to JSON has
    // no failure case (no maps with non-string keys, no custom Serialize).
    serde_json::to_string(cursor).expect("a cursor of plain fields always serializes")
}

/// Decodes a cursor saved by [`encode_cursor`]. One that does not parse (saved by another
/// version) means the listing has to start again.
pub(crate) fn decode_cursor<T: serde::de::DeserializeOwned>(
    cursor: Option<&str>,
) -> Result<Option<T>, SourceError> {
    cursor
        .map(|text| {
            serde_json::from_str(text).map_err(|e| {
                SourceError::ListingChanged(format!(
                    "saved position {text:?} is not understood ({e})"
                ))
            })
        })
        .transpose()
}

/// A record's id as text, whether the vendor sent a string or a number.
pub(crate) fn id_text(record: &serde_json::Value, field: &str) -> Option<String> {
    match record.get(field)? {
        serde_json::Value::String(id) => Some(id.clone()),
        serde_json::Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Named {
        id: i64,
        name: String,
    }

    impl VendorRecord for Named {
        const VENDOR: &'static str = "Test";
        const ID_FIELD: &'static str = "id";

        fn into_department(self, raw: RawRecord) -> Department {
            Department {
                external_id: self.id.to_string(),
                scope_id: None,
                name: self.name,
                is_active: true,
                parent_external_id: None,
                source_created_at: None,
                source_updated_at: None,
                raw,
            }
        }
    }

    fn records(good: usize, bad: usize) -> Result<Records<Named>, serde_json::Error> {
        let items: Vec<String> = (0..good)
            .map(|i| format!(r#"{{"id":{i},"name":"D{i}"}}"#))
            .chain((0..bad).map(|_| "{}".to_owned()))
            .collect();
        serde_json::from_str(&format!("[{}]", items.join(",")))
    }

    #[test]
    fn records_that_are_not_departments_are_kept_aside_up_to_a_bound() {
        let page = Page::from_records(records(5, MAX_REJECTED_PER_PAGE).unwrap(), None);
        assert_eq!(
            (page.departments.len(), page.rejected.len()),
            (5, MAX_REJECTED_PER_PAGE)
        );
        let error = records(5, MAX_REJECTED_PER_PAGE + 1)
            .err()
            .expect("a page of mostly junk fails");
        assert!(
            error.to_string().contains("are not Test departments"),
            "{error}"
        );
        // Any number of good ones.
        assert_eq!(records(5_000, 0).unwrap().len(), 5_000);
    }
}
