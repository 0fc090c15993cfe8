//! A private MariaDB server (started by the test on a free port) SIGKILLed and restarted in
//! the middle of a run: nothing published is lost, consumers and publishers resume.
//!
//! Needs `mariadb-install-db` and `mariadbd` (Debian's `mariadb-server`); skips with a
//! notice without them.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celeriac_core::{
    Broker, Config, ConsumeOptions, PublishOptions, ResultBackend, TaskMeta, TaskState,
};
use celeriac_mysql::{MysqlBackend, MysqlBroker, MysqlOptions};

/// A MariaDB server of this test's own, in a temporary directory.
pub(crate) struct PrivateServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateServer {
    /// Initialises a data directory and starts the server; `None` (after a notice) when the
    /// programs are missing.
    pub(crate) async fn start() -> Option<Self> {
        if !celeriac_test::services::require_program("mariadbd")
            || !celeriac_test::services::require_program("mariadb-install-db")
        {
            return None;
        }
        let dir = celeriac_test::services::test_dir().join(format!(
            "mariadb-restart-{}-{}",
            std::process::id(),
            celeriac_test::services::free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("server dir");
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=root", "--skip-test-db"])
            .arg(format!("--datadir={}", dir.join("data").display()))
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = PrivateServer {
            dir,
            port: celeriac_test::services::free_port(),
            child: None,
        };
        s.spawn().await;
        Some(s)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub(crate) fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Retries `f` on transient errors (the server is down) for up to a minute.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = celeriac_core::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_and_restarted_mid_run_loses_nothing() {
    const N: usize = 400;
    let Some(mut server) = PrivateServer::start().await else {
        return;
    };
    let url = format!("{}?poll-interval-ms=20", server.url());
    let config = Config::default();
    // The test database of the private server.
    {
        use sqlx::Connection as _;
        let mut c = sqlx::mysql::MySqlConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::raw_sql("CREATE DATABASE restart_test")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let url = url.replace("/mysql?", "/restart_test?");
    let options = MysqlOptions::from_url(&url, &config)
        .unwrap()
        .visibility_timeout(Duration::from_secs(2));
    let broker = MysqlBroker::open(options.clone()).await.expect("broker");
    let backend = MysqlBackend::open(options).await.expect("backend");
    let queue = "restart".to_owned();

    // Two consumers that store a result and ack each task, retrying through the outage.
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (broker, backend, done, queue) =
            (broker.clone(), backend.clone(), done.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut c = retry("consume", || {
                broker.consume(std::slice::from_ref(&queue), ConsumeOptions::new(8))
            })
            .await;
            loop {
                let d = match c.next().await {
                    Ok(Some(d)) => d,
                    Ok(None) => return,
                    Err(e) if e.is_transient() => continue,
                    Err(e) => panic!("next: {e:#}"),
                };
                let id = d.message.as_ref().expect("decodes").id().to_owned();
                let meta = TaskMeta::new(&id, TaskState::Success, serde_json::json!(1));
                retry("store", || backend.store(&meta)).await;
                // An ack lost in the outage brings the message back after its lease: a
                // duplicate, which at-least-once allows.
                let _ = d.ack().await;
                done.lock().unwrap().insert(id);
            }
        }));
    }

    let mut ids = Vec::with_capacity(N);
    let publish = async |ids: &mut Vec<String>, n: usize| {
        for _ in 0..n {
            let m = celeriac_test::services::test_message("tests.restart");
            retry("publish", || {
                broker.publish(&queue, &m, PublishOptions::default())
            })
            .await;
            ids.push(m.id().to_owned());
        }
    };
    publish(&mut ids, N / 2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.lock().unwrap().len() < N / 4 {
        assert!(Instant::now() < deadline, "too slow before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.spawn().await;
    let restarted = killed.elapsed();
    publish(&mut ids, N - N / 2).await;

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n = done.lock().unwrap().len();
        if ids.iter().all(|id| done.lock().unwrap().contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {N} tasks done after the restart:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = killed.elapsed();
    for id in &ids {
        let meta = retry("get", || backend.get(id)).await;
        assert_eq!(meta.map(|m| m.status), Some(TaskState::Success), "{id}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = retry("stats", || broker.stats(&queue)).await;
        if s.total() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "queue not drained: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "mariadb restart: {N} tasks, server back {:.2}s after SIGKILL, every task done {:.2}s after it",
        restarted.as_secs_f64(),
        recovered.as_secs_f64()
    );
    broker.close().await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
}
