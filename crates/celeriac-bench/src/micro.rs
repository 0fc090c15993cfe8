//! `--micro`: hot paths timed in-process (task ids, message encode/decode, envelope
//! encode/decode, routing, the rate limiter). A few lines instead of criterion, which is heavy
//! to build on two cores.

use std::hint::black_box;
use std::time::Instant;

use celeriac_core::protocol::{envelope, new_id};
use celeriac_core::{Body, Config, ContentType, Headers, Message, RateLimit, TokenBucket};

fn time(name: &str, iters: u32, mut f: impl FnMut()) {
    for _ in 0..iters / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
    println!("{name:<40} {ns:>10.0} ns/op");
}

/// Prints ns per operation for each hot path.
pub(crate) fn run() {
    let body = Body::new(vec![1.into(), 2.into()], Default::default());
    let msg = Message::new(
        Headers::new("tasks.add", new_id()),
        &body,
        ContentType::Json,
    )
    .expect("encodes");
    let wire = envelope::encode(&msg, "", "celery").expect("envelope encodes");
    time("task id (UUID v7)", 1_000_000, || {
        black_box(new_id());
    });
    time("message encode (headers + JSON body)", 200_000, || {
        black_box(
            Message::new(
                Headers::new("tasks.add", new_id()),
                &body,
                ContentType::Json,
            )
            .ok(),
        );
    });
    time("message body decode", 200_000, || {
        black_box(msg.decode_body().ok());
    });
    time("envelope encode (kombu JSON)", 200_000, || {
        black_box(envelope::encode(&msg, "", "celery").ok());
    });
    time("envelope decode (kombu JSON)", 200_000, || {
        black_box(envelope::decode(&wire).ok());
    });
    // Routing by the configured glob routes: twenty patterns, the match near the end.
    let mut config = Config::default();
    for i in 0..20 {
        config
            .routes
            .insert(format!("app{i:02}.*"), format!("queue{i}"));
    }
    time("routing (20 glob routes, late match)", 1_000_000, || {
        black_box(config.route(black_box("app18.tasks.add")));
    });
    let mut bucket = TokenBucket::new(RateLimit::per_second(1e9).expect("rate"));
    time("rate limiter try_take", 2_000_000, || {
        black_box(bucket.try_take(Instant::now()).is_ok());
    });
}
