//! `rediss://` against a private TLS-only redis-server with a throwaway CA.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use celeriac_core::broadcast::Broadcasted;
use celeriac_core::{
    Broker, Config, ConsumeOptions, ErrorKind, PublishOptions, ResultBackend, TaskMeta,
};
use celeriac_redis::{RedisBackend, RedisBroker, RedisOptions};
use serde_json::{Map, json};

use crate::util::{msg, next_within};

const PASSWORD: &str = "tls-s3cret-pw";

/// A redis-server of our own, killed when dropped (also when the test panics).
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A self-signed CA `<name>.crt` / `<name>.key` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    run(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=celeriac test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// Generates a CA, a server certificate for 127.0.0.1 and localhost signed by it, and a second,
/// unrelated CA; starts a TLS-only redis-server with a password on a free port.
async fn start() -> Option<Server> {
    if !have("openssl") || !have("redis-server") {
        celeriac_test::python::skip_or_fail("the openssl and redis-server commands");
        return None;
    }
    let dir = celeriac_test::services::test_dir().join(format!(
        "redis-tls-{}-{}",
        std::process::id(),
        celeriac_test::services::unique_queue("d")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    make_ca(&dir, "ca");
    make_ca(&dir, "other-ca");
    run(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .args(["--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--requirepass", PASSWORD])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let server = Server { child, port, dir };
    // Wait until it listens (a loop with a deadline, not a timed assertion).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TLS redis-server did not start listening on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(server)
}

impl Server {
    fn url(&self, query: &str) -> String {
        format!("rediss://:{PASSWORD}@127.0.0.1:{}/0?{query}", self.port)
    }

    fn ca(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The error and all its sources, as text.
fn chain(e: &celeriac_core::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(" / ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_results_round_trip_over_tls_and_a_wrong_ca_is_refused() {
    let Some(server) = start().await else {
        return;
    };
    let url = server.url(&format!(
        "ssl_cert_reqs=required&ssl_ca_certs={}",
        server.ca("ca.crt")
    ));

    // A broker round trip, consumer and wake-ups included.
    let broker = RedisBroker::connect_with(&url, RedisOptions::default())
        .await
        .expect("connect over TLS");
    broker.declare("tls").await.unwrap();
    let m = msg();
    broker
        .publish("tls", &m, PublishOptions::default())
        .await
        .unwrap();
    let mut consumer = broker
        .consume(&["tls".to_owned()], ConsumeOptions::new(4))
        .await
        .unwrap();
    let d = next_within(&mut consumer, Duration::from_secs(20)).await;
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    d.ack().await.unwrap();
    assert_eq!(broker.stats("tls").await.unwrap().unacked, 0);

    // The broadcast channels: a subscription, a reply list and its own connection, over TLS.
    let b = broker.broadcast().expect("broadcast channels");
    let mut node = b.control_inbox("w1@tls").await.expect("subscribe over TLS");
    let (key, mut replies) = b.reply_inbox().await.expect("a reply queue over TLS");
    let request = Broadcasted::new("", Map::new(), json!({"method": "ping", "ticket": "t"}));
    b.send_control(&request).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), node.next()).await;
    assert_eq!(got.unwrap().unwrap(), Some(request));
    let reply = Broadcasted::new(key, Map::new(), json!({"w1@tls": {"ok": "pong"}}));
    b.send_reply(&reply).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), replies.next()).await;
    assert_eq!(got.unwrap().unwrap().map(|m| m.body), Some(reply.body));

    // A result round trip: a waiter (pub/sub over TLS) sees a result stored by another client.
    let backend = RedisBackend::connect(&url, &Config::default())
        .await
        .expect("connect the backend over TLS");
    let writer = RedisBackend::connect(&url, &Config::default())
        .await
        .unwrap();
    let waiting = {
        let backend = backend.clone();
        tokio::spawn(async move {
            backend
                .wait("tls-task", Some(Duration::from_secs(20)))
                .await
        })
    };
    assert!(
        writer
            .store(&TaskMeta::success("tls-task", json!([1, "two"])))
            .await
            .unwrap()
    );
    let meta = waiting.await.unwrap().expect("the result arrives");
    assert_eq!(meta.result, json!([1, "two"]));

    // CERT_NONE skips the check: no CA needed.
    RedisBroker::connect_with(
        &server.url("ssl_cert_reqs=CERT_NONE"),
        RedisOptions::default(),
    )
    .await
    .expect("connect without verification");

    // A CA that did not sign the server's certificate: a clear error at start-up, no secret.
    let wrong = server.url(&format!(
        "ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={}",
        server.ca("other-ca.crt")
    ));
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        RedisBroker::connect_with(&wrong, RedisOptions::default()),
    )
    .await
    .expect("fails, does not hang")
    .unwrap_err();
    let text = chain(&e);
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(text.contains("TLS certificate was not accepted"), "{text}");
    assert!(text.contains("rediss://:***@127.0.0.1"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(!format!("{e:?}").contains(PASSWORD));
    assert!(!e.is_transient(), "{text}");
    let e = RedisBackend::connect(&wrong, &Config::default())
        .await
        .unwrap_err();
    assert!(chain(&e).contains("certificate"), "{}", chain(&e));

    // A missing CA file is named, not a hang.
    let e = RedisBroker::connect_with(
        &server.url("ssl_ca_certs=/nonexistent/ca.pem"),
        RedisOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        chain(&e).contains("cannot read ssl_ca_certs"),
        "{}",
        chain(&e)
    );
    assert!(!chain(&e).contains(PASSWORD));
    drop(server);
}
