//! Failover between the servers of a `;`-separated URL list. Running two RabbitMQ nodes is not
//! cheap, so each "server" here is a TCP proxy written below, on a loopback port, in front of
//! the one real RabbitMQ; killing a proxy (its listener and every connection through it) is
//! what a node going down looks like to the client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_amqp::AmqpBroker;
use celeriac_core::broadcast::Broadcasted;
use celeriac_core::{Broker, Config, ConsumeOptions, PublishOptions};
use celeriac_test::services::{test_message, unique_queue};
use serde_json::{Map, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::util::ADDR;

/// A TCP proxy to RabbitMQ on a loopback port, until killed.
struct Proxy {
    port: u16,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (kill, killed) = watch::channel(false);
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut stop = killed.clone();
            loop {
                let socket = tokio::select! {
                    _ = stop.wait_for(|k| *k) => return,
                    s = listener.accept() => match s {
                        Ok((socket, _)) => socket,
                        Err(_) => return,
                    },
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut stop = killed.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(ADDR).await else {
                        return;
                    };
                    let (mut client, mut upstream) = (socket, upstream);
                    // Dropping both sockets on a kill cuts the client off and makes RabbitMQ
                    // see its client gone (so it requeues what that client had unacked).
                    tokio::select! {
                        _ = stop.wait_for(|k| *k) => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            accepted,
            kill,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}//", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Drops the listener and cuts every live connection.
    fn kill(&self) {
        self.kill.send_replace(true);
    }
}

/// A loopback port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// What the consumer saw: task id → when each copy arrived and whether RabbitMQ flagged it
/// redelivered.
type Seen = Arc<Mutex<HashMap<String, Vec<(Instant, bool)>>>>;

/// The first server of the list dies in the middle of a run of publishes and consumes: the
/// publisher and the consumer follow to the second, no message whose publish was confirmed
/// is lost, and the pause is measured (from the kill to the first delivery that came through
/// the second server). A broadcast inbox follows too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_over_to_the_next_url_without_losing_messages() {
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    const TOTAL: usize = 300;
    const KILL_AT: usize = 150;
    let (p1, p2) = (Proxy::start().await, Proxy::start().await);
    let url = format!("{};{}", p1.url(), p2.url());
    let broker = AmqpBroker::connect(&url, &Config::default())
        .await
        .expect("connect through the first url");
    let q = unique_queue("failover");
    broker.declare(&q).await.unwrap();
    let channels = broker.broadcast().expect("broadcast channels");
    let topic = unique_queue("failover-events");
    let mut events = channels.event_inbox(&format!("{topic}.#")).await.unwrap();

    let seen: Seen = Arc::default();
    let mut consumer = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(10))
        .await
        .unwrap();
    let consuming = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(d)) = consumer.next().await {
                let id = d.message.as_ref().expect("a valid message").id().to_owned();
                seen.lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push((Instant::now(), d.redeliveries > 0));
                // Acking on a channel that just died fails; RabbitMQ redelivers that one.
                let _ = d.ack().await;
            }
        })
    };
    // The consumer connects in the background; every connection goes to the first url.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p1.accepted() < 3 {
        assert!(
            Instant::now() < deadline,
            "publisher, inbox and consumer connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p2.accepted(), 0, "nothing goes to the second url early");

    // The kill comes from another task while publishes and deliveries are in flight.
    let published = Arc::new(AtomicUsize::new(0));
    let killer = {
        let published = published.clone();
        let kill = p1.kill.clone();
        tokio::spawn(async move {
            while published.load(Ordering::SeqCst) < KILL_AT {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            kill.send_replace(true);
            Instant::now()
        })
    };
    let mut confirmed = Vec::with_capacity(TOTAL);
    let mut publish_errors = 0;
    let mut first_publish_after_kill = None;
    for _ in 0..TOTAL {
        let m = test_message("tasks.failover");
        // A publish whose confirm was lost is sent again: it may have reached the queue, so
        // this can duplicate, never lose.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match broker.publish(&q, &m, PublishOptions::default()).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.is_transient(), "{e:?}");
                    assert!(Instant::now() < deadline, "publishing never resumed: {e:?}");
                    publish_errors += 1;
                }
            }
        }
        if *p1.kill.borrow() && first_publish_after_kill.is_none() {
            first_publish_after_kill = Some((Instant::now(), confirmed.len()));
        }
        confirmed.push(m.id().to_owned());
        published.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let killed_at = killer.await.unwrap();
    let (first_publish_after_kill, published_before_kill) = first_publish_after_kill.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            confirmed
                .iter()
                .filter(|id| !seen.contains_key(*id))
                .count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} confirmed messages never arrived after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Late redeliveries would show up as duplicates: give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The broadcast inbox reconnected to the second url as well.
    let event = Broadcasted::new(format!("{topic}.after"), Map::new(), json!({"n": 1}));
    let arrived = async {
        loop {
            channels.send_event(&event).await.unwrap();
            if let Ok(Ok(Some(m))) =
                tokio::time::timeout(Duration::from_millis(500), events.next()).await
            {
                return m;
            }
        }
    };
    let m = tokio::time::timeout(Duration::from_secs(30), arrived)
        .await
        .expect("the event inbox follows to the second url");
    assert_eq!(m.routing_key, format!("{topic}.after"));

    let seen = seen.lock().unwrap().clone();
    let lost = confirmed
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .count();
    let duplicates: usize = seen.values().map(|v| v.len() - 1).sum();
    let published_after: std::collections::HashSet<&String> =
        confirmed[published_before_kill..].iter().collect();
    // The first delivery that must have come through the second url: a redelivery, or a
    // message published after the kill.
    let resumed = seen
        .iter()
        .flat_map(|(id, copies)| copies.iter().map(move |c| (id, c)))
        .filter(|(id, (at, redelivered))| {
            *at > killed_at && (*redelivered || published_after.contains(id))
        })
        .map(|(_, (at, _))| *at)
        .min()
        .expect("deliveries after the kill");
    let pause = resumed - killed_at;
    let publish_pause = first_publish_after_kill - killed_at;
    println!(
        "rabbitmq failover: {TOTAL} published ({publish_errors} publish attempts failed and were \
         retried), lost {lost}, duplicates {duplicates}, pause {pause:?} (kill to the next \
         delivery), first confirmed publish {publish_pause:?} after the kill; connections \
         through url 1: {}, url 2: {}",
        p1.accepted(),
        p2.accepted()
    );
    assert_eq!(lost, 0);
    assert!(p2.accepted() >= 3, "publisher, inbox and consumer moved");
    assert!(pause < Duration::from_secs(10), "{pause:?}");

    broker.close().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), consuming).await;
    p2.kill();
}

/// Log lines, captured from this thread (so the test runs on a current-thread runtime).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The first url is down at start-up: the broker connects through the second, and its
/// consumer goes straight there too. The logs name the url that failed and the next one,
/// without the password.
#[tokio::test]
async fn a_first_url_down_at_start_up_connects_through_the_second() {
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    let logs = Logs::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let down = closed_port().await;
    let p2 = Proxy::start().await;
    let url = format!("amqp://guest:secret-pw@127.0.0.1:{down}//;{}", p2.url());
    let broker = AmqpBroker::connect(&url, &Config::default())
        .await
        .expect("connect through the second url");
    assert!(!format!("{broker:?}").contains("secret-pw"));
    let q = unique_queue("failover-start");
    broker.declare(&q).await.unwrap();
    let m = test_message("tasks.first_down");
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
        .expect("a delivery through the second url")
        .unwrap()
        .unwrap();
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    d.ack().await.unwrap();
    assert_eq!(
        p2.accepted(),
        2,
        "publisher and consumer, each at the first try"
    );
    let text = logs.text();
    let warned = text
        .lines()
        .find(|l| l.contains("trying the next url"))
        .unwrap_or_else(|| panic!("no failover warning in:\n{text}"));
    assert!(
        warned.contains(&format!("url=amqp://guest:***@127.0.0.1:{down}//"))
            && warned.contains(&format!("next=amqp://guest:***@127.0.0.1:{}//", p2.port)),
        "{warned}"
    );

    // With nothing reachable, the error is transient and names every url, redacted.
    let gone = closed_port().await;
    let e = AmqpBroker::connect(
        &format!(
            "amqp://guest:secret-pw@127.0.0.1:{down}//;amqp://guest:secret-pw@127.0.0.1:{gone}//"
        ),
        &Config::default(),
    )
    .await
    .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    let text = format!("{e} {e:?}\n{}", logs.text());
    assert!(!text.contains("secret-pw"), "{text}");
    assert!(
        e.to_string()
            .starts_with("cannot connect to rabbitmq at any of its 2 urls")
            && e.to_string().contains(&format!(":{gone}//")),
        "{e}"
    );
    broker.close().await.unwrap();
    p2.kill();
}
