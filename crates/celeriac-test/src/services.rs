//! Fixtures for tests that need an external server, a SQLite file, a queue or a message.
//!
//! A test that needs a server (Redis, RabbitMQ, Postgres) calls [`require_service`] first. When
//! the server is unreachable the test prints a `SKIPPED:` notice and returns, so `cargo test` on
//! a laptop without the server stays green but says what it did not run. CI sets
//! `CELERIAC_REQUIRE_SERVICES=1`, which turns the notice into a failure: a missing server must
//! never pass silently there. (This is cargo's `requires` / `CARGO_TEST_REQUIRE_EXTERNAL_TOOLS`
//! pattern.)

use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use celeriac_core::protocol::new_id;
use celeriac_core::{Body, ContentType, Headers, Message};
use serde_json::{Map, json};

/// The variable that turns a missing service into a test failure.
pub const REQUIRE_SERVICES_VAR: &str = "CELERIAC_REQUIRE_SERVICES";

/// How long [`require_service`] waits for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Checks that `name` (e.g. `redis`) accepts TCP connections at `addr` (e.g. `127.0.0.1:6379`).
///
/// Returns `true` when it does. Otherwise, when `CELERIAC_REQUIRE_SERVICES=1`, panics with a
/// message naming the service; else prints `SKIPPED: <test> needs <name> at <addr> ...` to
/// stderr and returns `false`, and the caller returns early.
///
/// The test's name is taken from the current thread, which the test harness names after the
/// test; call this from the test's own thread (a setup function awaited by the test is fine).
///
/// ```no_run
/// # fn main() {
/// if !celeriac_test::services::require_service("redis", "127.0.0.1:6379") {
///     return; // skipped, with a notice on stderr
/// }
/// # }
/// ```
pub fn require_service(name: &str, addr: &str) -> bool {
    if reachable(addr) {
        return true;
    }
    let test = std::thread::current()
        .name()
        .map_or_else(|| "a test".to_owned(), str::to_owned);
    if services_required() {
        panic!(
            "{test} needs {name} at {addr}, which is unreachable \
             ({REQUIRE_SERVICES_VAR}=1 forbids skipping)"
        );
    }
    // Straight to the stream, not eprintln!: the test harness captures the macros' output of
    // passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: {test} needs {name} at {addr} (set {REQUIRE_SERVICES_VAR}=1 to fail instead)"
    );
    false
}

/// Whether the program `name` can be run (`name --version` succeeds), for tests that start a
/// private server of their own (e.g. `redis-server` on a free port). Like
/// [`require_service`]: when it cannot, the test is skipped with a visible notice, or fails
/// under `CELERIAC_REQUIRE_SERVICES=1`.
pub fn require_program(name: &str) -> bool {
    let runs = std::process::Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    let test = std::thread::current()
        .name()
        .map_or_else(|| "a test".to_owned(), str::to_owned);
    if services_required() {
        panic!(
            "{test} needs the program {name}, which cannot be run ({REQUIRE_SERVICES_VAR}=1 forbids skipping)"
        );
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: {test} needs the program {name} (set {REQUIRE_SERVICES_VAR}=1 to fail instead)"
    );
    false
}

/// A loopback TCP port that was free a moment ago, for a private server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether `CELERIAC_REQUIRE_SERVICES=1` is set.
#[allow(
    clippy::disallowed_methods,
    reason = "a switch of the test harness, like CARGO_TEST_REQUIRE_EXTERNAL_TOOLS, not app configuration"
)]
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES_VAR).is_ok_and(|v| v.trim() == "1")
}

fn reachable(addr: &str) -> bool {
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, CONNECT_TIMEOUT).is_ok())
}

/// The folder of test files: `<workspace>/target/celeriac-test/`, created if missing.
pub fn test_dir() -> PathBuf {
    // CARGO_MANIFEST_DIR is crates/celeriac-test; the workspace root is two levels up.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/celeriac-test")
        .components()
        .collect::<PathBuf>();
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create test directory {}: {e}", dir.display()));
    dir
}

/// A fresh SQLite file path under `<workspace>/target/celeriac-test/`, named after `name`.
///
/// Every call returns a new path (`<name>-<pid>-<n>.sqlite3`), so tests running in parallel
/// never share a file by accident; call it once and reuse the path to share one. A stale file
/// at that path, with its `-wal` and `-shm` companions, is removed. Files left behind by test
/// processes that have exited are removed on the first call in a process (Linux only).
pub fn temp_sqlite_path(name: &str) -> PathBuf {
    static CLEANED: Once = Once::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = test_dir();
    CLEANED.call_once(|| remove_files_of_dead_processes(&dir));
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{safe}-{}-{n}.sqlite3", std::process::id()));
    remove_sqlite_files(&path);
    path
}

fn remove_sqlite_files(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

fn remove_files_of_dead_processes(dir: &std::path::Path) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some(stem) = file_name.split(".sqlite3").next() else {
            continue;
        };
        // <name>-<pid>-<n>: the pid is the second field from the end.
        let Some(pid) = stem.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A queue name that no other test uses: `<prefix>-<random>`.
pub fn unique_queue(prefix: &str) -> String {
    // The random end of an id: its start is the time, shared by ids of the same moment.
    let id = new_id();
    format!("{prefix}-{}", &id[24..])
}

/// A valid protocol v2 task message for `task` with a fresh id and a JSON body `[[1, 2], {}]`.
///
/// ```
/// let m = celeriac_test::services::test_message("tasks.add");
/// assert_eq!(m.task(), "tasks.add");
/// assert_eq!(m.decode_body().unwrap().args.len(), 2);
/// ```
pub fn test_message(task: &str) -> Message {
    let headers = Headers::new(task, new_id());
    let body = Body::new(vec![json!(1), json!(2)], Map::new());
    Message::new(headers, &body, ContentType::Json).expect("a json body always encodes")
}
