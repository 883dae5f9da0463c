//! The words every module shares: departments, windows, positions and run outcomes.
//!
//! Nothing here knows a vendor or a database; connectors produce these values, the store
//! persists them and the engine moves them from one to the other.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One department, normalized from whichever API it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Department {
    /// The vendor's id, as text.
    pub external_id: String,
    /// The partition the vendor files the department under (Mews: EnterpriseId).
    pub scope_id: Option<String>,
    pub name: String,
    pub is_active: bool,
    pub parent_external_id: Option<String>,
    pub source_created_at: Option<DateTime<Utc>>,
    pub source_updated_at: Option<DateTime<Utc>>,
    /// The record exactly as the vendor sent it.
    pub raw: RawRecord,
}

/// A vendor's record as it came in the response: its JSON text, checked but not parsed
/// into a tree. Connectors read the fields they need from it; the store keeps it whole.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct RawRecord(Box<serde_json::value::RawValue>);

impl RawRecord {
    /// `value` written as JSON text (records made here, not received: tests and the demo).
    pub fn from_value(value: &serde_json::Value) -> RawRecord {
        // Invariant: a `Value` always serializes (its map keys are strings).
        RawRecord(serde_json::value::to_raw_value(value).expect("a JSON value always serializes"))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The record as a tree, for the rare paths that need one (a rejected record).
    pub fn to_value(&self) -> serde_json::Value {
        // Valid JSON by construction; a nesting too deep for a tree is kept as its text.
        serde_json::from_str(self.as_str())
            .unwrap_or_else(|_| serde_json::Value::String(self.as_str().to_owned()))
    }

    /// Why PostgreSQL would refuse this record's JSON, if it would: a NUL character, or a
    /// `\u` escape of half a surrogate pair (checked while reading the response only in
    /// the fields a connector reads). JSON writes both only as escapes, so the text is
    /// parsed only when it holds one (the escape may also be an escaped backslash
    /// followed by "u0000", which is fine).
    pub fn storage_problem(&self) -> Option<&'static str> {
        let text = self.as_str();
        if !(text.contains("\\u0000") || text.contains("\\ud") || text.contains("\\uD")) {
            return None;
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) if json_has_nul(&value) => {
                Some("it contains a NUL character, which PostgreSQL cannot store")
            }
            Ok(_) => None,
            // A lone surrogate (or a record nested too deeply to check).
            Err(_) => Some("it holds a \\u escape PostgreSQL cannot store"),
        }
    }
}

impl PartialEq for RawRecord {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl std::fmt::Debug for RawRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record the vendor sent that cannot be stored as a department. It is kept, with the
/// reason, in `rejected_records` instead of being altered or dropped silently.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRecord {
    pub external_id: Option<String>,
    pub reason: String,
    pub payload: serde_json::Value,
}

/// A half-open interval of update times: `start <= updated < end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}..{}",
            self.start.format("%Y-%m-%dT%H:%M:%SZ"),
            self.end.format("%Y-%m-%dT%H:%M:%SZ")
        )
    }
}

/// How far one window of a windowed pass has been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowState {
    /// Not started.
    Pending,
    /// Read up to the page at `cursor` (the next to fetch).
    InProgress { cursor: String },
    /// Every page is stored.
    Done,
}

/// One window of a windowed pass and how far it has been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerWindow {
    pub window: Window,
    pub state: WindowState,
}

/// The range a person asked a backfill to read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillRange {
    pub from: DateTime<Utc>,
    /// The `--to` that was asked for; `None` means "until now" (re-evaluated on resume).
    pub requested_to: Option<DateTime<Utc>>,
}

/// A windowed pass in progress: every window it planned, each pending, in progress at a
/// cursor, or done. Several windows are read at once, so the ledger (not one position)
/// is what a resume starts from: it repeats at most the one page each window had in
/// flight, and skips none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The instant the pass reads up to: the high-water mark once every window is done
    /// (for an incremental pass).
    pub until: DateTime<Utc>,
    /// For a backfill, the range asked for; `None` for an incremental pass.
    pub backfill: Option<BackfillRange>,
    pub windows: Vec<LedgerWindow>,
}

impl Ledger {
    /// What the pass is, as `sync_runs.mode` and the ledger's key say it.
    pub fn mode(&self) -> RunMode {
        match self.backfill {
            Some(_) => RunMode::Backfill,
            None => RunMode::Incremental,
        }
    }

    /// The windows not done yet.
    pub fn outstanding(&self) -> impl Iterator<Item = &LedgerWindow> {
        self.windows.iter().filter(|w| w.state != WindowState::Done)
    }
}

/// A full listing in progress: the id the departments it has seen are recorded under,
/// and the cursor of its next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingProgress {
    pub listing_id: Uuid,
    pub cursor: Option<String>,
    /// When this listing re-reads everything to confirm the deletions another complete
    /// listing found: that listing. A department is deleted only when missing from both.
    pub confirms: Option<Uuid>,
}

/// Everything a source needs to resume, as last committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncState {
    /// Every update before this instant (less the lookback) has been read.
    pub high_water_mark: Option<DateTime<Utc>>,
    /// The incremental pass in progress, if one was interrupted.
    pub incremental: Option<Ledger>,
    /// The backfill in progress, if one was interrupted.
    pub backfill: Option<Ledger>,
    /// The full listing in progress, if one was interrupted.
    pub listing: Option<ListingProgress>,
    /// A complete listing whose missing departments await a confirming listing.
    pub pending_confirmation: Option<Uuid>,
    /// What this position is a position of: the fingerprint of the settings that decide
    /// what the source reads ([`crate::sources::Source::scope`]), when recorded.
    pub scope: Option<String>,
}

/// The position to commit together with a page: what the next read starts from. (A plan
/// and an abandoned listing are committed with an empty page; see [`Checkpoint::follows_page`].)
#[derive(Debug, Clone, PartialEq)]
pub enum Checkpoint {
    /// A windowed pass's plan: replaces the ledger of its mode (a new pass, or a resumed
    /// one planned on to a new end).
    Ledger(Ledger),
    /// The upstream found `window` of the `mode` ledger too heavy: it is replaced by
    /// `halves`, both pending (a cursor belongs to the window it was issued for).
    Split {
        mode: RunMode,
        window: Window,
        halves: [Window; 2],
    },
    /// A page of `window` of the `mode` ledger is stored: the window goes on at `cursor`,
    /// or, with `None`, is done. When that was the last window not done, the pass is
    /// complete: the ledger is cleared and, for an incremental pass, the high-water mark
    /// moves to its `until`.
    Window {
        mode: RunMode,
        window: Window,
        cursor: Option<String>,
    },
    /// The listing goes on from here; the page's ids are recorded as seen by it.
    Listing(ListingProgress),
    /// The page is the listing's last: the page's ids are recorded as seen. When live
    /// departments are missing from it and it `confirms` no other listing, nothing is
    /// deleted yet: they await a confirming listing ([`PageCounts::awaiting_confirmation`]).
    /// When it confirms one, every live department missing from both is marked deleted,
    /// as far as `deletions` allows.
    ListingDone {
        listing_id: Uuid,
        confirms: Option<Uuid>,
        deletions: DeletionPolicy,
    },
    /// The listing cannot be completed (it changed under its page numbers): forget what it
    /// saw, delete nothing, and start the next one from the beginning.
    ListingAbandoned { listing_id: Uuid },
}

impl Checkpoint {
    /// Whether this checkpoint follows a page fetched from the source, rather than being
    /// bookkeeping committed between pages (a plan, a split, an abandoned listing).
    pub fn follows_page(&self) -> bool {
        !matches!(
            self,
            Checkpoint::Ledger(_) | Checkpoint::Split { .. } | Checkpoint::ListingAbandoned { .. }
        )
    }
}

/// What a complete listing confirmed by another may mark deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletionPolicy {
    /// The mass-deletion guard: the largest share of the rows live when the first listing
    /// began that may be deleted, of the whole source and of each scope that held a
    /// meaningful number of them (`None`: a person confirmed any number).
    pub max_delete_fraction: Option<f64>,
    /// The scopes (`scope_id`s) the listing reads, when its settings name them: a
    /// department of any other scope is out of the listing's sight, never deleted for
    /// missing from it. `None`: the listing reads every scope of the source.
    pub scopes: Option<Vec<String>>,
}

/// How a page's departments landed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageCounts {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// Departments marked deleted (only by the last page of a full listing).
    pub deleted: u64,
    /// Deletions the mass-deletion guard refused to make: for the whole source, or for
    /// each scope it held back.
    pub withheld_deletions: Vec<WithheldDeletions>,
    /// Departments missing from a complete listing, awaiting a confirming listing.
    pub awaiting_confirmation: u64,
}

/// A complete listing would have marked `would_delete` of `live` rows deleted, more than
/// the source allows: nothing of them was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithheldDeletions {
    /// The scope (`scope_id`) held back, or `None` for the whole source.
    pub scope: Option<String>,
    pub would_delete: u64,
    pub live: u64,
}

/// What a pass is doing, as recorded in `sync_runs.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    Incremental,
    Backfill,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Incremental => "incremental",
            RunMode::Backfill => "backfill",
        }
    }
}

/// The id of one row of `sync_runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunId(pub Uuid);

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// One version of a department, as `department_versions` keeps it: what deptsync
/// normalizes, over `[valid_from, valid_to)` (`valid_to` is `None` while it is current).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepartmentVersion {
    pub source: String,
    pub external_id: String,
    pub scope_id: Option<String>,
    pub name: String,
    pub is_active: bool,
    pub parent_external_id: Option<String>,
    /// A complete listing no longer had the department from `valid_from` on.
    pub deleted: bool,
    /// The vendor's update time where the API gives one, else the commit that saw it.
    pub valid_from: DateTime<Utc>,
    pub valid_to: Option<DateTime<Utc>>,
    /// The run that wrote it: the source's run under way when it was committed.
    pub run_id: Option<RunId>,
    /// When deptsync committed it.
    pub observed_at: DateTime<Utc>,
    /// Where the change feed has it: the writing transaction's id on PostgreSQL, the
    /// number of the page transaction on SQLite.
    #[serde(skip)]
    pub position: i64,
    /// The order of the versions of one department at one position (an upgrade writes two
    /// for a deleted department): the ended ones first.
    #[serde(skip)]
    pub seq: i64,
}

/// Where a reader of the change feed stands (`deptsync changes --since`): it has every
/// version of the feed `feed` before `position`. Opaque to the reader: written down and
/// handed back as it came (`{feed}:{position}`, or `0` for the beginning).
///
/// The feed's identity is what lets a database refuse a token it did not hand out:
/// another database's, another server's, or its own from before it was restored. A
/// position alone (a transaction id, a count) means nothing outside its feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeedToken {
    /// The feed that handed it out; `None` for [`FeedToken::START`] (and for a token of a
    /// deptsync from before feeds had an identity, which is refused).
    pub(crate) feed: Option<Uuid>,
    pub(crate) position: i64,
}

impl FeedToken {
    /// Before the first version, of any feed.
    pub const START: FeedToken = FeedToken {
        feed: None,
        position: 0,
    };

    /// Whether this is [`FeedToken::START`].
    pub fn is_start(&self) -> bool {
        *self == FeedToken::START
    }
}

impl std::fmt::Display for FeedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.feed {
            Some(feed) => write!(f, "{}:{}", feed.simple(), self.position),
            None => self.position.fmt(f),
        }
    }
}

impl std::str::FromStr for FeedToken {
    type Err = String;

    fn from_str(text: &str) -> Result<FeedToken, String> {
        let position = |digits: &str| {
            digits
                .parse::<u64>()
                .ok()
                .and_then(|n| i64::try_from(n).ok())
        };
        let token = match text.split_once(':') {
            Some((feed, digits)) => {
                Uuid::try_parse(feed)
                    .ok()
                    .zip(position(digits))
                    .map(|(feed, position)| FeedToken {
                        feed: Some(feed),
                        position,
                    })
            }
            // A bare number: the beginning (0), or a token of an older deptsync, which
            // the feed refuses with a word on why.
            None => position(text).map(|position| FeedToken {
                feed: None,
                position,
            }),
        };
        token.ok_or_else(|| {
            format!(
                "{text:?} is not a change-feed token (the last line `deptsync changes` \
                 printed, or 0 for the beginning)"
            )
        })
    }
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    Failed { error: String },
    Cancelled,
}

impl RunOutcome {
    /// Why the run failed, if it did.
    pub fn error(&self) -> Option<&str> {
        match self {
            RunOutcome::Failed { error } => Some(error),
            _ => None,
        }
    }
}

impl RunOutcome {
    pub fn status(&self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed { .. } => "failed",
            RunOutcome::Cancelled => "cancelled",
        }
    }
}

/// One source as `deptsync status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceStatus {
    pub source: String,
    /// `running`, `succeeded`, `failed`, `cancelled`, or `never run` (`status` shows a
    /// source that never ran and is not late yet as `not run yet`).
    pub state: String,
    pub last_run_started_at: Option<DateTime<Utc>>,
    pub last_run_finished_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    /// The error of the newest failed run (which may be older than the last success).
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub high_water_mark: Option<DateTime<Utc>>,
    /// Where the source stands, in words: how far it has read, or where an interrupted
    /// pass will resume.
    pub position: String,
    pub first_run_at: Option<DateTime<Utc>>,
    pub live_rows: i64,
    pub deleted_rows: i64,
    pub rejected_records: i64,
    pub backfill_in_progress: bool,
    /// Why the source's position was last dropped (its settings changed, or an operator
    /// reset it), so that the pass after it read everything again from `start`.
    pub reset: Option<String>,
    /// When it was dropped.
    pub reset_at: Option<DateTime<Utc>>,
    /// When the service first had the source on its schedule.
    pub registered_at: Option<DateTime<Utc>>,
    /// The process holding the source's lease (`host:pid:id`), if one does: a pass of it
    /// is running there (or the process died, until `lease_expires_at`).
    pub lease_holder: Option<String>,
    /// The fence of the source's last lease: how many leases it has had.
    pub lease_fence: Option<i64>,
    /// When the held lease lapses unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the fleet's next pass of the source is due (its schedule's next firing, later
    /// while failing passes back off).
    pub next_due_at: Option<DateTime<Utc>>,
    /// Deletions the mass-deletion guard withholds, pass after pass, until a person
    /// confirms them or the missing departments come back.
    pub withheld_deletions: Option<StandingWithheld>,
}

/// A verdict of the mass-deletion guard that stands: since `since` (when the first
/// listing it refused began), complete listings would mark `would_delete` of the `live`
/// departments of that time deleted, and every pass refuses to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandingWithheld {
    pub since: DateTime<Utc>,
    pub would_delete: u64,
    pub live: u64,
    /// How many scopes are held back (their departments counted above); 0 when the whole
    /// source is.
    pub scopes: u64,
}

/// The longest department name deptsync stores, in characters. Longer names are not
/// truncated (that would alter the record) but rejected.
pub const MAX_NAME_CHARS: usize = 1000;
/// The longest vendor id deptsync stores, in characters.
pub const MAX_EXTERNAL_ID_CHARS: usize = 255;

impl Department {
    /// Why this department cannot be stored as it is, if it cannot: PostgreSQL refuses NUL
    /// characters in text and jsonb, and a row without a name or id is not a department.
    pub fn storage_problem(&self) -> Option<String> {
        let id = self.external_id.as_str();
        if id.trim().is_empty() {
            return Some("the id is empty".to_owned());
        }
        if id.chars().count() > MAX_EXTERNAL_ID_CHARS {
            return Some(format!(
                "the id is longer than {MAX_EXTERNAL_ID_CHARS} characters"
            ));
        }
        if self.name.trim().is_empty() {
            return Some("the name is empty".to_owned());
        }
        if self.name.chars().count() > MAX_NAME_CHARS {
            return Some(format!(
                "the name is longer than {MAX_NAME_CHARS} characters"
            ));
        }
        let texts = [
            Some(id),
            Some(self.name.as_str()),
            self.scope_id.as_deref(),
            self.parent_external_id.as_deref(),
        ];
        if texts.into_iter().flatten().any(|t| t.contains('\0')) {
            return Some("it contains a NUL character, which PostgreSQL cannot store".to_owned());
        }
        self.raw.storage_problem().map(str::to_owned)
    }

    /// This department as a rejected record, for `reason`.
    pub fn into_rejected(self, reason: String) -> RejectedRecord {
        RejectedRecord {
            external_id: Some(self.external_id),
            reason,
            payload: self.raw.to_value(),
        }
    }
}

fn json_has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || json_has_nul(value)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn department(name: &str) -> Department {
        Department {
            external_id: "1".to_owned(),
            scope_id: None,
            name: name.to_owned(),
            is_active: true,
            parent_external_id: None,
            source_created_at: None,
            source_updated_at: None,
            raw: RawRecord::from_value(&serde_json::json!({ "name": name })),
        }
    }

    #[test]
    fn a_token_reads_back_as_it_was_written() {
        let token = FeedToken {
            feed: Some(Uuid::new_v4()),
            position: 7_000_123,
        };
        assert_eq!(token.to_string().parse::<FeedToken>(), Ok(token));
        assert_eq!("0".parse::<FeedToken>(), Ok(FeedToken::START));
        assert_eq!(FeedToken::START.to_string(), "0");
        let legacy: FeedToken = "731".parse().unwrap();
        assert_eq!((legacy.feed, legacy.position), (None, 731));
        for bad in [
            "",
            "-1",
            "x:1",
            "abc",
            &format!("{}:", Uuid::nil().simple()),
        ] {
            assert!(bad.parse::<FeedToken>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn storable_departments_pass() {
        assert_eq!(department("Sales").storage_problem(), None);
    }

    #[test]
    fn unstorable_departments_say_why() {
        assert!(
            department("")
                .storage_problem()
                .unwrap()
                .contains("name is empty")
        );
        assert!(
            department("a\0b")
                .storage_problem()
                .unwrap()
                .contains("NUL")
        );
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert!(
            department(&long)
                .storage_problem()
                .unwrap()
                .contains("longer")
        );
        let mut nul_in_raw = department("Sales");
        nul_in_raw.raw =
            RawRecord::from_value(&serde_json::json!({ "note": ["fine", { "deep\0": 1 }] }));
        assert!(nul_in_raw.storage_problem().unwrap().contains("NUL"));
    }

    #[test]
    fn only_escapes_postgresql_refuses_make_a_record_unstorable() {
        let problem = |text: &str| {
            serde_json::from_str::<RawRecord>(text)
                .unwrap()
                .storage_problem()
        };
        assert!(problem(r#"{"a": "x\u0000y"}"#).unwrap().contains("NUL"));
        assert!(problem(r#"{"a\u0000": 1}"#).unwrap().contains("NUL"));
        assert!(
            problem(r#"{"a": "half \ud800 a pair"}"#)
                .unwrap()
                .contains("escape")
        );
        // An escaped backslash followed by the letters "u0000" is no NUL; a whole
        // surrogate pair is one character.
        assert_eq!(problem(r#"{"a": "C:\\u0000"}"#), None);
        assert_eq!(problem(r#"{"a": "\ud83d\ude00"}"#), None);
        assert_eq!(problem(r#"{"a": "fine"}"#), None);
    }
}
