//! Cross-process wake-ups.
//!
//! Another process's commit reaches this one when the connection thread reads a new `PRAGMA
//! data_version`. Polling that value bounds how soon a waiting consumer or result waiter hears of
//! the commit. On Linux a watcher thread also follows the database's directory with inotify:
//! every commit appends to the `-wal` file, so the kernel reports it at once and the thread reads
//! `data_version` right away. Polling stays as the fallback (other systems, missed events).
//!
//! SQLite writes the WAL a page at a time, so one commit raises several events, in every process
//! that watches the file (its own included). Waking the watcher for each of them cost more than
//! the commits (a third of all CPU time in the SQLite benchmark). So after each report the watcher
//! waits until the connection thread has read `data_version` (or, when nobody waits for other
//! processes' writes, until somebody does): the kernel merges the events raised meanwhile, and
//! writers do not wake a blocked reader. A change that happens while it waits is still seen: the
//! connection thread reads `data_version` after resuming it, at its next poll at the latest, and
//! the merged event is read on resume.

use std::path::Path;
use std::sync::Weak;

use crate::conn::Conn;

/// Starts the watcher for the database file at `path` (canonical), waking `conn` on writes.
///
/// The watcher thread ends with its first event after `conn` is gone, or on an inotify error
/// (then only polling remains, which is logged at debug level).
#[cfg(target_os = "linux")]
pub(crate) fn watch(path: &Path, conn: Weak<Conn>) {
    use inotify::{Inotify, WatchMask};
    use std::ffi::OsString;

    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let mut wal = OsString::from(name);
    wal.push("-wal");
    let mut inotify = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!(error = %e, "no inotify; sqlite waits poll data_version only");
            return;
        }
    };
    if let Err(e) = inotify.watches().add(dir, WatchMask::MODIFY) {
        tracing::debug!(error = %e, dir = %dir.display(), "cannot watch the sqlite directory; polling only");
        return;
    }
    let (resume_tx, resume_rx) = std::sync::mpsc::sync_channel(1);
    match conn.upgrade() {
        Some(c) => c.shared.set_resume(resume_tx),
        None => return,
    }
    let spawned = std::thread::Builder::new()
        .name("celeriac-sqlite-wake".to_owned())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let hit = match inotify.read_events_blocking(&mut buf) {
                    Ok(events) => events
                        .into_iter()
                        .any(|e| e.name.is_some_and(|n| n == wal.as_os_str())),
                    Err(e) => {
                        tracing::debug!(error = %e, "inotify read failed; polling only");
                        return;
                    }
                };
                let Some(c) = conn.upgrade() else {
                    return;
                };
                if !hit {
                    continue;
                }
                c.wake_watchers();
                drop(c);
                // Until the connection thread has looked (or a waiter arrives): then read the
                // events that came meanwhile. The sender goes with the connection.
                if resume_rx.recv().is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "cannot start the sqlite wake thread; polling only");
    }
}

/// Other systems rely on polling alone.
#[cfg(not(target_os = "linux"))]
pub(crate) fn watch(_path: &Path, _conn: Weak<Conn>) {}
