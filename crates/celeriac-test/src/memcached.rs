//! A private `memcached` on a free port, for the memcached result backend's tests.
//!
//! Debian's `memcached` package provides the program. Without it [`Memcached::start`] returns
//! `None` after a `SKIPPED:` notice, or panics under `CELERIAC_REQUIRE_SERVICES=1` (see
//! [`require_program`]).
//!
//! The server runs under a small `sh` that holds a pipe from the test process and kills the
//! server when the pipe closes, so a server outlives no test process, even one that ends
//! without running destructors (a shared server in a `static`, a killed test binary).
//!
//! ```no_run
//! # fn main() {
//! use celeriac_test::memcached::Memcached;
//!
//! let Some(mut server) = Memcached::start() else {
//!     return; // skipped, with a notice on stderr
//! };
//! let url = server.url(); // cache+memcached://127.0.0.1:<port>/
//! server.kill(); // everything it held is gone
//! server.restart(); // the same port, empty
//! # }
//! ```

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::services::{free_port, require_program};

/// How long a server may take to listen.
const READY: Duration = Duration::from_secs(10);

/// A `memcached` of the test's own; killed when dropped (or when the test process ends).
#[derive(Debug)]
pub struct Memcached {
    port: u16,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    /// The `sh` keeping the server.
    keeper: Child,
    /// Closing it makes the keeper kill the server.
    _pipe: ChildStdin,
    /// The server's own process id.
    pid: u32,
}

impl Memcached {
    /// Starts `memcached` on a free loopback port and waits until it listens; `None` (after a
    /// notice) when the program is missing.
    ///
    /// Call from the test's own thread: the notice names the test after it.
    pub fn start() -> Option<Memcached> {
        if !require_program("memcached") {
            return None;
        }
        let mut m = Memcached {
            port: free_port(),
            running: None,
        };
        m.restart();
        Some(m)
    }

    /// One server for the whole test process (the conformance suite's), started on first use.
    pub fn shared() -> Option<&'static Memcached> {
        static SHARED: OnceLock<Option<Memcached>> = OnceLock::new();
        if !require_program("memcached") {
            return None;
        }
        SHARED.get_or_init(Memcached::start).as_ref()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `cache+memcached://127.0.0.1:<port>/`, Celery's URL for it.
    pub fn url(&self) -> String {
        format!("cache+memcached://127.0.0.1:{}/", self.port)
    }

    /// Kills the server at once (SIGKILL): its connections drop and everything it held is
    /// lost. [`Memcached::restart`] starts it again.
    pub fn kill(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = Command::new("kill")
                .args(["-9", &r.pid.to_string()])
                .status();
            let _ = r.keeper.kill();
            let _ = r.keeper.wait();
        }
        // Wait until the port is free again, so a restart can bind it.
        let deadline = Instant::now() + READY;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            pause();
        }
    }

    /// Starts the server again on the same port (killing the running one first), empty, and
    /// waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        // `-u` is required when running as root and ignored otherwise.
        let script = format!(
            "memcached -l 127.0.0.1 -p {} -U 0 -m 64 -t 2 -u \"$(id -un)\" & \
             echo $!; read _; kill -9 $! 2>/dev/null",
            self.port
        );
        let mut keeper = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for memcached");
        let pipe = keeper.stdin.take().expect("keeper stdin");
        let mut line = String::new();
        BufReader::new(keeper.stdout.take().expect("keeper stdout"))
            .read_line(&mut line)
            .expect("read memcached's pid");
        let pid: u32 = line.trim().parse().expect("memcached's pid");
        self.running = Some(Running {
            keeper,
            _pipe: pipe,
            pid,
        });
        let deadline = Instant::now() + READY;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "memcached never listened on port {}",
                self.port
            );
            pause();
        }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = Command::new("kill")
                .args(["-9", &r.pid.to_string()])
                .status();
            let _ = r.keeper.kill();
            let _ = r.keeper.wait();
        }
    }
}

/// A short pause while a server starts or stops.
#[allow(
    clippy::disallowed_methods,
    reason = "test set-up, a few times 20 ms while a server process starts or stops; also \
              called from sync code (the shared server's OnceLock)"
)]
fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}
