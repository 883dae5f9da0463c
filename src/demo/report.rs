//! The demo's last words: what the change feed gave, a department's history, a query
//! over `departments`, and how to query the file.

use anyhow::Context;

use super::world::HR_SOURCE;
use crate::config::redact_url;
use crate::model::{DepartmentVersion, FeedToken};
use crate::report::{change_line, table};
use crate::store::AnyStore;

/// Every version the change feed has after `since`, and the token to read on from: what
/// `deptsync changes --since` prints.
pub(super) async fn read_feed(
    store: &AnyStore,
    since: FeedToken,
) -> anyhow::Result<(Vec<DepartmentVersion>, FeedToken)> {
    let mut feed = store
        .changes(since, &[])
        .await
        .context("reading the change feed")?;
    let mut versions = Vec::new();
    while let Some(batch) = feed.next_batch().await.context("reading the change feed")? {
        versions.extend(batch);
    }
    Ok((versions, feed.next_token()))
}

/// How many versions of the feed the demo prints.
const SHOWN_CHANGES: usize = 6;

/// What `deptsync changes --since after_first` gave after the second pass (`changed`, and
/// `next`), and the history of one department it changed, whose earlier versions are in
/// `before`.
pub(super) fn history(
    after_first: FeedToken,
    before: &[DepartmentVersion],
    changed: &[DepartmentVersion],
    next: FeedToken,
) -> String {
    let mut text = format!(
        "\n`deptsync changes --since {after_first}` (the token the feed ended with after pass 1): \
         {} versions, the new, changed and deleted departments of pass 2{}\n",
        changed.len(),
        if changed.len() > SHOWN_CHANGES {
            format!("; the first {SHOWN_CHANGES}:")
        } else {
            ":".to_owned()
        }
    );
    for version in changed.iter().take(SHOWN_CHANGES) {
        text.push_str(&format!("  {}\n", change_line(version)));
    }
    text.push_str(&format!("  next: {next}\n"));
    let earlier = |v: &DepartmentVersion| {
        before
            .iter()
            .find(move |b| b.source == v.source && b.external_id == v.external_id)
    };
    // A renamed department shows history best; any that changed will do.
    let Some(shown) = changed
        .iter()
        .find(|v| earlier(v).is_some_and(|b| b.name != v.name))
        .or_else(|| changed.iter().find(|v| earlier(v).is_some()))
    else {
        return text;
    };
    let timeline: Vec<&DepartmentVersion> = before
        .iter()
        .chain(changed)
        .filter(|v| v.source == shown.source && v.external_id == shown.external_id)
        .collect();
    text.push_str(&format!(
        "\nIts history (`department_versions`), {} {}:\n",
        shown.source, shown.external_id
    ));
    let instant = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    for (i, version) in timeline.iter().enumerate() {
        let until = timeline
            .get(i + 1)
            .map_or_else(|| "now".to_owned(), |next| instant(next.valid_from));
        let state = if version.deleted {
            "deleted"
        } else if version.is_active {
            "active"
        } else {
            "inactive"
        };
        text.push_str(&format!(
            "  {} .. {until:<19}  {}  ({state})\n",
            instant(version.valid_from),
            version.name
        ));
    }
    text
}

/// The sample query: SQL that SQLite and PostgreSQL both speak.
pub(super) const SAMPLE_QUERY: &str = "\
SELECT source,
       SUM(CASE WHEN deleted_at IS NULL AND is_active THEN 1 ELSE 0 END)     AS active,
       SUM(CASE WHEN deleted_at IS NULL AND NOT is_active THEN 1 ELSE 0 END) AS inactive,
       SUM(CASE WHEN deleted_at IS NOT NULL THEN 1 ELSE 0 END)               AS deleted,
       SUM(CASE WHEN last_changed_at > first_synced_at THEN 1 ELSE 0 END)    AS changed,
       MAX(last_changed_at)                                                  AS last_changed
FROM departments
GROUP BY source
ORDER BY source";

/// One row of [`SAMPLE_QUERY`].
pub(super) struct SampleRow {
    source: String,
    active: i64,
    inactive: i64,
    deleted: i64,
    changed: i64,
    last_changed: String,
}

/// Runs [`SAMPLE_QUERY`] on whichever store the demo writes to; returns its table.
pub(super) async fn sample_query(store: &AnyStore) -> anyhow::Result<comfy_table::Table> {
    let rows = store
        .read_rows(SAMPLE_QUERY, |row| {
            let count = |column: &str| row.int(column).map(Option::unwrap_or_default);
            Ok(SampleRow {
                source: row.text("source")?.unwrap_or_default(),
                active: count("active")?,
                inactive: count("inactive")?,
                deleted: count("deleted")?,
                changed: count("changed")?,
                last_changed: row.time("last_changed")?.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                ),
            })
        })
        .await
        .context("running the sample query")?;
    let mut table = table();
    table.set_header([
        "source",
        "active",
        "inactive",
        "deleted",
        "changed",
        "last_changed (UTC)",
    ]);
    for row in rows {
        table.add_row([
            row.source,
            row.active.to_string(),
            row.inactive.to_string(),
            row.deleted.to_string(),
            row.changed.to_string(),
            row.last_changed,
        ]);
    }
    Ok(table)
}

pub(super) fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How to query the database the demo leaves behind.
pub(super) fn query_hints(database_url: &str) -> String {
    let changed = "SELECT source, external_id, name, is_active, deleted_at FROM departments \
                   WHERE last_changed_at > first_synced_at ORDER BY source, name";
    let tree = format!(
        "WITH RECURSIVE tree(id, path) AS (SELECT external_id, name FROM departments \
         WHERE source = '{HR_SOURCE}' AND parent_external_id IS NULL UNION ALL \
         SELECT d.external_id, tree.path || ' / ' || d.name FROM departments d JOIN tree \
         ON d.parent_external_id = tree.id WHERE d.source = '{HR_SOURCE}') \
         SELECT path FROM tree ORDER BY path LIMIT 12"
    );
    match crate::store::sqlite::database_path(database_url) {
        Ok(path) => {
            let file = shell_word(&path.display().to_string());
            format!(
                "The database is left for you to query:\n\n  \
                 sqlite3 -readonly {file} \"{changed}\"\n  \
                 sqlite3 -readonly {file} \"{tree}\"\n"
            )
        }
        Err(_) => {
            let url = shell_word(&redact_url(database_url));
            format!(
                "The database is left for you to query:\n\n  \
                 psql {url} -c \"{changed}\"\n  \
                 psql {url} -c \"{tree}\"\n"
            )
        }
    }
}

/// `text` as one word of a POSIX shell command line.
pub(super) fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@%+=,".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------
// The simulated upstreams and what they hold.

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("deptsync-demo.db"), "deptsync-demo.db");
        assert_eq!(shell_word("my demo.db"), "'my demo.db'");
        assert_eq!(shell_word("it's.db"), r"'it'\''s.db'");
    }
}
