//! How the PostgreSQL store writes a page's departments: an optional strategy behind the
//! one rule every store follows (a row is written only when its content changed, never
//! with an older `source_updated_at`). New rows in runs are loaded with `COPY`, without a
//! lookup each; a full listing's page is looked up by its content digests, and a page
//! exactly as the trusted listing saw it costs one lookup in all.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::model::Department;
use crate::store::StoreError;
use crate::store::checkpoint::Written;
use crate::store::db;

const UPSERT_DEPARTMENTS: &str = include_str!("queries/upsert_departments.sql");

/// Writes the departments of a page (one version per id) that are new or changed: a
/// full listing's page with its digests, any other as `load` says. `persistent`: whether
/// statements are prepared under a name and kept (see `PgStore`).
pub(super) async fn write_departments(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    rows: &[&Department],
    listing: Option<Uuid>,
    load: Load,
    persistent: bool,
) -> Result<Written, StoreError> {
    if let Some(listing_id) = listing {
        return write_listing_page(tx, source, listing_id, rows.to_vec(), persistent).await;
    }
    // A windowed page has no digests: its rows are new or compared in full.
    let rows: Vec<_> = rows.iter().map(|d| (*d, None)).collect();
    if load == Load::AllNew {
        let inserted = copy_new(tx, source, &rows).await?;
        return Ok(Written {
            inserted,
            updated: 0,
            rewrote: false,
        });
    }
    let upserted = upsert(tx, source, &rows, persistent).await?;
    Ok(Written {
        inserted: upserted.inserted,
        updated: upserted.updated,
        rewrote: upserted.touched > 0,
    })
}

/// Writes a full listing's page (`rows`, one per id). A page exactly as the trusted
/// listing saw it costs one lookup of its digest. Otherwise each id is looked up with
/// its content digest (16 bytes back): rows not stored are loaded with `COPY`, changed
/// ones upserted, and unchanged ones not sent at all.
async fn write_listing_page(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    listing_id: Uuid,
    mut rows: Vec<&Department>,
    persistent: bool,
) -> Result<Written, StoreError> {
    rows.sort_unstable_by(|a, b| a.external_id.cmp(&b.external_id));
    let digests: Vec<[u8; 16]> = rows.iter().map(|d| content_digest(d)).collect();
    let page = page_digest(&digests);
    // Known: the trusted listing stored this very page, and this listing has rewritten
    // no stored row since (one it rewrote may be on this page, as it was before). The
    // digest is then recorded for this listing too.
    let known: bool = sqlx::query_scalar(
        "WITH known AS (
             SELECT EXISTS (
                 SELECT 1 FROM listing_page_digests d JOIN sync_state s
                   ON s.source = d.source AND s.trusted_listing = d.listing_id
                 WHERE d.source = $1 AND d.page_md5 = $3 AND d.listing_id <> $2)
             AND NOT EXISTS (
                 SELECT 1 FROM sync_state
                 WHERE source = $1 AND listing_id = $2 AND listing_rewrote) AS known
         ),
         recorded AS (
             INSERT INTO listing_page_digests (source, listing_id, page_md5)
             SELECT $1, $2, $3 FROM known WHERE known
             ON CONFLICT DO NOTHING
         )
         SELECT known FROM known",
    )
    .persistent(persistent)
    .bind(source)
    .bind(listing_id)
    .bind(&page[..])
    .fetch_one(&mut **tx)
    .await
    .map_err(db("looking up the page's digest"))?;
    if known {
        return Ok(Written::default());
    }
    let ids: Vec<&str> = rows.iter().map(|d| d.external_id.as_str()).collect();
    let stored: HashMap<String, Option<Vec<u8>>> = sqlx::query_as(
        "SELECT external_id, CASE WHEN deleted_at IS NULL THEN content_md5 END
         FROM departments WHERE source = $1 AND external_id = ANY($2)",
    )
    .persistent(persistent)
    .bind(source)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("looking up the stored departments"))?
    .into_iter()
    .collect();
    let mut new = Vec::new();
    let mut changed = Vec::new();
    for (department, digest) in rows.into_iter().zip(digests) {
        match stored.get(department.external_id.as_str()) {
            None => new.push((department, Some(digest))),
            Some(Some(known)) if known.as_slice() == digest.as_slice() => {}
            Some(_) => changed.push((department, Some(digest))),
        }
    }
    let copied = copy_new(tx, source, &new).await?;
    let upserted = upsert(tx, source, &changed, persistent).await?;
    // Every row as the page has it, unless a stored one was newer: then the page's
    // digest would not tell what is stored, and is not recorded.
    if upserted.inserted + upserted.touched == changed.len() as u64 {
        sqlx::query(
            "INSERT INTO listing_page_digests (source, listing_id, page_md5)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .persistent(persistent)
        .bind(source)
        .bind(listing_id)
        .bind(&page[..])
        .execute(&mut **tx)
        .await
        .map_err(db("recording the page's digest"))?;
    }
    Ok(Written {
        inserted: copied + upserted.inserted,
        updated: upserted.updated,
        rewrote: upserted.touched > 0,
    })
}

/// Loads `rows`, none of them stored yet, with `COPY`: no lookup per row, rows
/// written in batches. A row that was stored after all fails the statement (a unique
/// violation), and with it the transaction; nothing is half written.
async fn copy_new(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    rows: &[(&Department, Option<[u8; 16]>)],
) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut data = Vec::with_capacity(rows.len() * 400);
    for (department, digest) in rows {
        copy_row(&mut data, source, department, digest.as_ref());
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY departments (source, external_id, scope_id, name, is_active,
                 parent_external_id, source_created_at, source_updated_at, raw, content_md5)
             FROM STDIN",
        )
        .await
        .map_err(db("loading new departments"))?;
    copy.send(data)
        .await
        .map_err(db("loading new departments"))?;
    copy.finish().await.map_err(db("loading new departments"))
}

/// Writes `rows` (each with its content digest, for a listing) with the upsert
/// statement, which compares each with what is stored.
async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    rows: &[(&Department, Option<[u8; 16]>)],
    persistent: bool,
) -> Result<Upserted, StoreError> {
    if rows.is_empty() {
        return Ok(Upserted::default());
    }
    let texts =
        |f: fn(&Department) -> Option<&str>| rows.iter().map(|(d, _)| f(d)).collect::<Vec<_>>();
    let external_ids = texts(|d| Some(d.external_id.as_str()));
    let scope_ids = texts(|d| d.scope_id.as_deref());
    let names = texts(|d| Some(d.name.as_str()));
    let parents = texts(|d| d.parent_external_id.as_deref());
    let raw = texts(|d| Some(d.raw.as_str()));
    let active: Vec<bool> = rows.iter().map(|(d, _)| d.is_active).collect();
    let created: Vec<Option<DateTime<Utc>>> =
        rows.iter().map(|(d, _)| d.source_created_at).collect();
    let updated: Vec<Option<DateTime<Utc>>> =
        rows.iter().map(|(d, _)| d.source_updated_at).collect();
    let digests: Vec<Option<&[u8]>> = rows
        .iter()
        .map(|(_, digest)| digest.as_ref().map(|d| &d[..]))
        .collect();

    let row = sqlx::query(UPSERT_DEPARTMENTS)
        .persistent(persistent)
        .bind(source)
        .bind(&external_ids)
        .bind(&scope_ids)
        .bind(&names)
        .bind(&active)
        .bind(&parents)
        .bind(&created)
        .bind(&updated)
        .bind(&raw)
        .bind(&digests)
        .fetch_one(&mut **tx)
        .await
        .map_err(db("upserting departments"))?;
    let count = |column: &str| row.get::<i64, _>(column) as u64;
    Ok(Upserted {
        inserted: count("inserted"),
        updated: count("updated"),
        touched: count("touched"),
    })
}

/// How a windowed page's departments are written (a full listing's page is written with
/// its digests: see [`write_listing_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    /// Expected to be new, every one: loaded with `COPY`, no lookups.
    AllNew,
    /// Each compared with what is stored, by the upsert statement.
    Compare,
}

/// What the upsert statement did.
#[derive(Debug, Default)]
struct Upserted {
    inserted: u64,
    /// Updated with a change of content.
    updated: u64,
    /// Updated at all.
    touched: u64,
}

/// The digest of a listing page, from the content digests of its rows in id order.
fn page_digest(rows: &[[u8; 16]]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    for row in rows {
        hasher.update(row);
    }
    hasher.finalize().into()
}

/// Appends `department` as one line of `COPY`'s text format, in the column order of
/// [`copy_new`].
fn copy_row(data: &mut Vec<u8>, source: &str, department: &Department, digest: Option<&[u8; 16]>) {
    let instant =
        |t: Option<DateTime<Utc>>| t.map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string());
    copy_field(data, Some(source));
    copy_field(data, Some(&department.external_id));
    copy_field(data, department.scope_id.as_deref());
    copy_field(data, Some(&department.name));
    copy_field(data, Some(if department.is_active { "t" } else { "f" }));
    copy_field(data, department.parent_external_id.as_deref());
    copy_field(data, instant(department.source_created_at).as_deref());
    copy_field(data, instant(department.source_updated_at).as_deref());
    copy_field(data, Some(department.raw.as_str()));
    let digest = digest.map(|d| {
        let mut hex = String::with_capacity(34);
        hex.push_str("\\x");
        for byte in d {
            hex.push_str(&format!("{byte:02x}"));
        }
        hex
    });
    copy_field(data, digest.as_deref());
    // The last field's tab becomes the end of the line.
    data.pop();
    data.push(b'\n');
}

/// Appends one field of `COPY`'s text format and the tab after it: `\N` for NULL; a
/// backslash, tab, newline or carriage return escaped with a backslash. (A NUL never
/// reaches here: such a department is rejected before it is stored.)
fn copy_field(data: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => data.extend_from_slice(b"\\N"),
        Some(text) => {
            for byte in text.bytes() {
                match byte {
                    b'\\' => data.extend_from_slice(b"\\\\"),
                    b'\t' => data.extend_from_slice(b"\\t"),
                    b'\n' => data.extend_from_slice(b"\\n"),
                    b'\r' => data.extend_from_slice(b"\\r"),
                    _ => data.push(byte),
                }
            }
        }
    }
    data.push(b'\t');
}

/// A digest of what a department row holds (every column the upsert compares), to tell an
/// unchanged row without sending it. Each field is framed (a tag, and a length for text),
/// so that no two different rows can run together into the same bytes.
fn content_digest(department: &Department) -> [u8; 16] {
    use md5::{Digest, Md5};
    fn text(hasher: &mut Md5, value: Option<&str>) {
        match value {
            None => hasher.update([0]),
            Some(text) => {
                hasher.update([1]);
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    fn instant(hasher: &mut Md5, value: Option<DateTime<Utc>>) {
        match value {
            None => hasher.update([0]),
            // Microseconds: what PostgreSQL keeps of an instant.
            Some(t) => {
                hasher.update([1]);
                hasher.update(t.timestamp_micros().to_le_bytes());
            }
        }
    }
    let mut hasher = Md5::new();
    text(&mut hasher, Some(&department.external_id));
    text(&mut hasher, department.scope_id.as_deref());
    text(&mut hasher, Some(&department.name));
    hasher.update([u8::from(department.is_active)]);
    text(&mut hasher, department.parent_external_id.as_deref());
    instant(&mut hasher, department.source_created_at);
    instant(&mut hasher, department.source_updated_at);
    // The record as received: a vendor that writes the same record differently (its keys
    // in another order) only costs a full comparison, which finds it unchanged.
    text(&mut hasher, Some(department.raw.as_str()));
    hasher.finalize().into()
}
