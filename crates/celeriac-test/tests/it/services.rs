//! Service fixtures: skip notices, SQLite paths, queue names, messages.

use std::net::TcpListener;

use celeriac_test::services::{
    require_service, services_required, temp_sqlite_path, test_message, unique_queue,
};

#[test]
fn a_listening_service_is_required_without_notice() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    assert!(require_service("a listener", &addr));
}

#[test]
fn an_unreachable_service_skips_or_fails() {
    // Port 1 (tcpmux) is not served on a test machine.
    let outcome = std::panic::catch_unwind(|| require_service("nothing", "127.0.0.1:1"));
    if services_required() {
        let panic =
            outcome.expect_err("CELERIAC_REQUIRE_SERVICES=1 must turn a skip into a failure");
        let message = panic
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(message.contains("nothing at 127.0.0.1:1"), "{message}");
    } else {
        assert_eq!(
            outcome.ok(),
            Some(false),
            "an unreachable service is skipped"
        );
    }
}

#[test]
fn sqlite_paths_are_fresh_and_under_target() {
    let a = temp_sqlite_path("fixture test");
    let b = temp_sqlite_path("fixture test");
    assert_ne!(a, b, "each call gives a new file");
    for p in [&a, &b] {
        assert!(!p.exists(), "{} must not exist yet", p.display());
        let dir = p.parent().expect("parent");
        assert!(dir.is_dir());
        assert!(dir.ends_with("target/celeriac-test"), "{}", dir.display());
        let name = p.file_name().and_then(|n| n.to_str()).expect("utf-8 name");
        assert!(
            name.starts_with("fixture_test-") && name.ends_with(".sqlite3"),
            "{name}"
        );
    }
}

#[test]
fn queues_are_unique_and_messages_valid() {
    let (a, b) = (unique_queue("q"), unique_queue("q"));
    assert_ne!(a, b);
    assert!(a.starts_with("q-"), "{a}");
    let m = test_message("tasks.add");
    assert_eq!(m.task(), "tasks.add");
    assert_eq!(m.properties.correlation_id, m.id());
    assert_ne!(m.id(), test_message("tasks.add").id());
    m.decode_body().expect("a valid body");
}
