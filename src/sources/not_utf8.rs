//! Bytes that are not UTF-8 in a vendor's response. JSON is UTF-8, and one stray byte (a
//! name written in Latin-1) makes a whole body undecodable: the page's other records
//! would never be stored, and a listing never complete. Instead each such byte is
//! written into the text as a mark ([`MARK`] and the byte in two hex digits), the body is
//! decoded ([`decode_marked`]), and a record whose text holds a mark is set aside as
//! rejected, its bytes shown as `\xNN`. A mark outside a string leaves the JSON invalid,
//! as the byte did. Only a body that held such bytes is looked at for marks: a record of a
//! body that was all UTF-8 is never taken for one.

use std::cell::Cell;
use std::fmt::Write as _;

use serde::de::DeserializeOwned;

use crate::model::{RawRecord, RejectedRecord};

/// What stands for a byte that is not UTF-8, before its two hex digits: U+FDD0, a
/// noncharacter, which Unicode reserves for a program's own use and no vendor sends.
const MARK: char = '\u{FDD0}';

thread_local! {
    /// Whether the body being decoded on this thread was marked: set only for the length
    /// of [`decode_marked`], which decodes on the thread that calls it.
    static MARKED: Cell<bool> = const { Cell::new(false) };
}

/// Decodes `body` as a `T` with each byte that is not UTF-8 marked; `None` when it is all
/// UTF-8 (its own decoding error stands).
pub(super) fn decode_marked<T: DeserializeOwned>(
    body: &[u8],
) -> Option<Result<T, serde_json::Error>> {
    let marked = mark(body)?;
    /// Gives the thread back its mark as it was, however decoding ends.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            MARKED.set(self.0);
        }
    }
    let _restore = Restore(MARKED.replace(true));
    Some(serde_json::from_str(&marked))
}

/// `body` with each byte that is not UTF-8 marked; `None` when it is all UTF-8.
fn mark(body: &[u8]) -> Option<String> {
    if std::str::from_utf8(body).is_ok() {
        return None;
    }
    let mut marked = String::with_capacity(body.len() + 16);
    for chunk in body.utf8_chunks() {
        marked.push_str(chunk.valid());
        for byte in chunk.invalid() {
            // Writing to a String cannot fail.
            let _ = write!(marked, "{MARK}{byte:02x}");
        }
    }
    Some(marked)
}

/// The record `raw` as rejected, when it is of a marked body ([`decode_marked`]) and its
/// text holds bytes that were not UTF-8: its payload and id with each shown as `\xNN`.
/// `id_field` names the vendor's id field.
pub(super) fn reject(raw: &RawRecord, id_field: &str) -> Option<RejectedRecord> {
    let text = raw.as_str();
    if !MARKED.get() || !text.contains(MARK) {
        return None;
    }
    let mut escaped = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != MARK {
            escaped.push(c);
            continue;
        }
        // Inside a JSON string: `\\x` is a backslash and an x once decoded.
        escaped.push_str("\\\\x");
        escaped.extend(chars.by_ref().take(2));
    }
    let payload = serde_json::from_str(&escaped)
        .unwrap_or_else(|_| serde_json::Value::String(escaped.clone()));
    Some(RejectedRecord {
        external_id: super::id_text(&payload, id_field),
        reason: "it holds bytes that are not UTF-8 (shown as \\xNN)".to_owned(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_of_utf8_is_left_alone() {
        assert_eq!(mark("{\"name\": \"Café\"}".as_bytes()), None);
    }

    /// A record as a page reads it: set aside when [`reject`] says so.
    struct Read(Result<RawRecord, RejectedRecord>);

    impl<'de> serde::Deserialize<'de> for Read {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let raw = RawRecord::deserialize(deserializer)?;
            Ok(Read(reject(&raw, "id").map_or(Ok(raw), Err)))
        }
    }

    #[test]
    fn each_stray_byte_is_marked_and_shown_escaped() {
        let mut body = br#"[{"id": 7, "name": "Caf"#.to_vec();
        body.extend_from_slice(&[0xE9, b' ', 0xFF, 0xFE]);
        body.extend_from_slice(br#""}, {"id": 8, "name": "Fine"}]"#);
        let records: Vec<Read> = decode_marked(&body).unwrap().unwrap();
        let Err(rejected) = &records[0].0 else {
            panic!("the record with stray bytes was read")
        };
        assert_eq!(rejected.external_id.as_deref(), Some("7"));
        assert_eq!(rejected.payload["name"], "Caf\\xe9 \\xff\\xfe");
        assert!(rejected.reason.contains("not UTF-8"));
        assert!(records[1].0.is_ok());
    }

    #[test]
    fn a_body_of_utf8_holding_the_mark_itself_is_read_as_it_came() {
        let body = format!(r#"[{{"id": 1, "name": "odd {MARK}e9 but valid"}}]"#);
        let records: Vec<Read> = serde_json::from_str(&body).unwrap();
        assert!(records[0].0.is_ok());
        assert!(!MARKED.get());
    }

    #[test]
    fn a_sequence_cut_short_at_the_end_is_marked_too() {
        let marked = mark(&[b'"', 0xE2, 0x82]).unwrap();
        assert_eq!(marked, format!("\"{MARK}e2{MARK}82"));
    }
}
