//! `amqps://` for real: a TLS-terminating proxy written here (a self-signed certificate made
//! by the `openssl` command at test time) in front of the local RabbitMQ, so the shared server
//! keeps its configuration. Skips without `openssl`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use celeriac_amqp::AmqpBroker;
use celeriac_core::{Broker, Config, ConsumeOptions, ErrorKind, PublishOptions};
use celeriac_test::services::{test_dir, test_message, unique_queue};
use tokio::net::{TcpListener, TcpStream};
use tokio_native_tls::native_tls;

use crate::util::{self, ADDR};

/// Makes a self-signed certificate for 127.0.0.1 in `dir`: (cert, key) paths, or `None` when
/// there is no `openssl` command.
async fn self_signed(dir: &Path, name: &str) -> Option<(PathBuf, PathBuf)> {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let status = tokio::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .ok()?;
    status.success().then_some((cert, key))
}

/// Accepts TLS on a loopback port and relays each connection to RabbitMQ; returns the port.
async fn tls_proxy(cert: &Path, key: &Path) -> u16 {
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
    )
    .expect("identity from the generated certificate");
    let acceptor = tokio_native_tls::TlsAcceptor::from(
        native_tls::TlsAcceptor::new(identity).expect("tls acceptor"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses our certificate ends the handshake: nothing to relay.
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(ADDR).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_round_trips_through_a_tls_proxy_and_refuses_a_wrong_ca() {
    if !util::rabbit_up() {
        return;
    }
    let dir = test_dir().join(unique_queue("amqps"));
    std::fs::create_dir_all(&dir).unwrap();
    let (Some((cert, key)), Some((other, _))) = (
        self_signed(&dir, "server").await,
        self_signed(&dir, "other").await,
    ) else {
        eprintln!("SKIPPED: the amqps test needs the openssl command");
        return;
    };
    let port = tls_proxy(&cert, &key).await;
    let url = format!(
        "amqps://guest:guest@127.0.0.1:{port}//?cacert={}",
        cert.display()
    );
    let broker = AmqpBroker::connect(&url, &Config::default())
        .await
        .expect("amqps through the proxy, trusting its certificate");
    let q = unique_queue("amqps");
    broker.declare(&q).await.unwrap();
    let m = test_message("tasks.tls");
    broker
        .publish(&q, &m, PublishOptions::default())
        .await
        .unwrap();
    let mut c = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), c.next())
        .await
        .expect("a delivery over tls")
        .unwrap()
        .unwrap();
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    d.ack().await.unwrap();
    broker.close().await.unwrap();

    // The wrong CA: a clear, non-transient certificate error at start-up.
    let url = format!(
        "amqps://guest:secret-pw@127.0.0.1:{port}//?ssl_ca_certs={}",
        other.display()
    );
    let e = AmqpBroker::connect(&url, &Config::default())
        .await
        .expect_err("a certificate from another CA must be refused");
    assert_eq!(e.kind(), ErrorKind::Config, "{e:?}");
    assert!(!e.is_transient());
    let text = format!("{e} / {:?}", std::error::Error::source(&e));
    assert!(text.contains("tls handshake"), "{text}");
    assert!(text.contains("certificate"), "{text}");
    assert!(!text.contains("secret-pw"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
