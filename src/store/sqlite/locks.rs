//! The lock files beside an SQLite database: one that migrations take, and one every
//! process with the database open holds shared. (A source's lease is a row of the file:
//! see `crate::store::lease`.)

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The lock file migrations take, beside the database file `database`.
pub(super) fn migration_lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The lock file that every process with the database open holds shared.
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
