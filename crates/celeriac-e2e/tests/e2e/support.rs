use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use celeriac::App;

/// A fresh SQLite URL for one test.
pub(crate) fn sqlite_url(test: &str) -> (String, PathBuf) {
    let path = celeriac_test::services::temp_sqlite_path(&format!("e2e-{test}"));
    (format!("sqlite://{}", path.display()), path)
}

/// A client app on `url` that knows the example tasks.
pub(crate) async fn client(url: &str) -> App {
    App::builder()
        .broker_url(url)
        .collect_tasks()
        .build()
        .await
        .expect("client app")
}

/// A client app on broker `url` with results in `backend`.
pub(crate) async fn client_with(url: &str, backend: &str) -> App {
    App::builder()
        .broker_url(url)
        .result_backend(backend)
        .collect_tasks()
        .build()
        .await
        .expect("client app")
}

/// A worker process of the example task app.
pub(crate) struct WorkerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts `tasks worker` on `url` with extra arguments.
    pub(crate) fn start(url: &str, extra: &[&str]) -> Self {
        Self::spawn(url, None, extra)
    }

    /// Like [`WorkerProcess::start`], reading `config` as its `celeriac.toml`.
    pub(crate) fn start_with_config(url: &str, config: &str, extra: &[&str]) -> Self {
        Self::spawn(url, Some(config), extra)
    }

    fn spawn(url: &str, config: Option<&str>, extra: &[&str]) -> Self {
        let log = match url.strip_prefix("sqlite://") {
            Some(path) => PathBuf::from(format!("{path}.worker-{}.log", fastrand_suffix())),
            None => celeriac_test::services::test_dir()
                .join(format!("worker-{}.log", fastrand_suffix())),
        };
        let stderr = std::fs::File::create(&log).expect("worker log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-tasks"));
        if let Some(c) = config {
            cmd.env("CELERIAC_CONFIG", c);
        }
        let child = cmd
            .args(["--broker", url, "--loglevel", "info", "worker"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn worker");
        WorkerProcess {
            child: Some(child),
            log,
        }
    }

    /// The worker's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The worker's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Live (not zombie) child processes of the worker, from `/proc`.
    pub(crate) fn children(&self) -> usize {
        let pid = self.pid().to_string();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                // "pid (comm) state ppid ...": the fields after the last ')'.
                let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
                let state = rest.next();
                let ppid = rest.next();
                state != Some("Z") && ppid == Some(pid.as_str())
            })
            .count()
    }

    /// Sends SIGTERM (or SIGKILL) to the worker.
    pub(crate) fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {pid} failed");
    }

    /// Waits for the worker to exit, at most `timeout`.
    pub(crate) async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit in {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the worker's log contains `needle`.
    pub(crate) async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "worker log never showed {needle:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Eight random hex digits: the end of a fresh id (its start is the time).
fn fastrand_suffix() -> String {
    celeriac::core::protocol::new_id()[28..].to_owned()
}

/// Ten seconds: how long any single result may take in these tests.
pub(crate) const T: Duration = Duration::from_secs(20);
