//! The lock files beside an SQLite database: one per source (a pass holds it), one that
//! migrations take, and one every process with the database open holds shared.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The lock file of `source` beside the database file `database`, or with `None` the
/// one migrations take.
pub(super) fn lock_path(database: &Path, source: Option<&str>) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    if let Some(source) = source {
        name.push(".");
        name.push(file_name_safe(source));
    }
    name.push(".lock");
    PathBuf::from(name)
}

/// The lock file that every process with the database open holds shared. A source's
/// lock file name escapes its dots, so `in.use` is none of theirs, whatever the file
/// system's case rules.
pub fn in_use_lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".in.use.lock");
    PathBuf::from(name)
}

/// Whether no process (this one included) has the database `database` open as a store:
/// then the lock that keeps any from opening it (held until dropped), or `None` when
/// there is no lock file (no store ever opened it). `Err(WouldBlock)` when one has.
pub fn lock_unused(database: &Path) -> Result<Option<File>, TryLockError> {
    let path = in_use_lock_path(database);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TryLockError::Error(e)),
    };
    file.try_lock()?;
    Ok(Some(file))
}

/// Opens a lock file, creating it when missing; its content is never used. An existing
/// one is opened read-only: `flock` needs no more, and one created by another user (root
/// running a manual `sync`) is then usable by every user who may read it.
pub(super) fn open_lock_file(path: &Path) -> std::io::Result<File> {
    match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path),
        opened => opened,
    }
}

/// `name` as part of a file name: letters, digits, `-` and `_` as they are (every source
/// name the config accepts), any other byte as `%XX`.
pub(super) fn file_name_safe(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => char::from(b).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
