//! A private PostgreSQL server for one test: `initdb` and `pg_ctl` on a free port in a
//! temporary directory, with password (SCRAM) authentication. Never the shared server: tests
//! that stop it or need a password use this.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian puts the server programs; `PATH` is tried first.
const BIN_DIRS: &[&str] = &["/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin"];

/// The superuser's password on private servers.
pub(crate) const PASSWORD: &str = "s3cret-pw";

/// A running private server, stopped and deleted when dropped.
#[derive(Debug)]
pub(crate) struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    /// The port it listens on (127.0.0.1).
    pub(crate) port: u16,
    /// Whether the programs run as the `postgres` user (the tests run as root, which the
    /// server refuses).
    as_postgres: bool,
    /// Server options added on every start (`-c name=value …`).
    extra: String,
}

fn find_bin() -> Option<PathBuf> {
    let in_path = Command::new("initdb")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if in_path {
        return Some(PathBuf::new());
    }
    BIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivatePg {
    /// Starts a server, or returns `None` after a `SKIPPED` notice when `initdb` cannot be
    /// found (a failure under `CELERIAC_REQUIRE_SERVICES=1`).
    pub(crate) fn start(name: &str) -> Option<Self> {
        Self::start_with(name, "")
    }

    /// [`start`](Self::start) with server options (`-c name=value …`) kept for every start.
    pub(crate) fn start_with(name: &str, extra: &str) -> Option<Self> {
        let Some(bin) = find_bin() else {
            let path = BIN_DIRS.join(":");
            let _ = celeriac_test::services::require_program(&format!(
                "initdb (also looked in {path})"
            ));
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "celeriac-pg-{name}-{}-{}",
            std::process::id(),
            celeriac_test::services::free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server directory");
        let as_postgres = is_root();
        let pg = PrivatePg {
            port: celeriac_test::services::free_port(),
            dir,
            bin,
            as_postgres,
            extra: extra.to_owned(),
        };
        std::fs::write(pg.dir.join("pw"), PASSWORD).expect("write the password file");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot give {} to the postgres user", pg.dir.display());
        }
        let data = pg.data();
        let pwfile = pg.dir.join("pw");
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--pwfile",
                path_str(&pwfile),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.start_again();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).output().expect("run a postgres program");
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}\n{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub(crate) fn start_again(&self) {
        let data = self.data();
        let log = self.dir.join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            path_str(&self.dir),
            self.extra
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash would (`-m immediate`: no checkpoint, clients cut).
    pub(crate) fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Runs SQL as the superuser (through `psql`).
    pub(crate) fn psql(&self, sql: &str) {
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("psql"))
            .env("PGPASSWORD", PASSWORD)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output();
        let out = match out {
            Ok(o) => o,
            // psql is not always next to initdb.
            Err(_) => Command::new("psql")
                .env("PGPASSWORD", PASSWORD)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
                .output()
                .expect("run psql"),
        };
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL of this server.
    pub(crate) fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temporary path")
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.data();
        let program = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let _ = cmd
            .args(["-D", path_str(&data), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
