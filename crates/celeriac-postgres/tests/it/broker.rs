//! Broker behaviour beyond the conformance suite: the fencing token of a lease.

use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, PublishOptions};
use celeriac_postgres::PgBroker;

use crate::util::{available, options};

/// A worker whose lease ran out cannot delete (ack) or keep (extend) the message now leased
/// to another: the fencing token (`deliveries`) no longer matches.
#[test]
fn a_late_ack_of_an_expired_lease_does_not_delete_the_redelivered_message() {
    celeriac_test::conformance::run_case(async {
        if !available() {
            return;
        }
        let broker = PgBroker::open(options("t_conformance")).await.unwrap();
        let q = celeriac_test::services::unique_queue("fence");
        let m = celeriac_test::services::test_message("t.fence");
        broker
            .publish(&q, &m, PublishOptions::default())
            .await
            .unwrap();
        let queues = [q.clone()];
        let mut first = broker
            .consume(
                &queues,
                ConsumeOptions::new(1).lease(Duration::from_millis(300)),
            )
            .await
            .unwrap();
        let stale = first.next().await.unwrap().unwrap();
        assert_eq!(stale.redeliveries, 0);
        let mut second = broker
            .consume(&queues, ConsumeOptions::new(1))
            .await
            .unwrap();
        let fresh = tokio::time::timeout(Duration::from_secs(10), second.next())
            .await
            .expect("redelivered after the lease")
            .unwrap()
            .unwrap();
        assert_eq!(fresh.redeliveries, 1);
        let e = stale
            .extend_lease(Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("lease lost"), "{e}");
        stale
            .ack()
            .await
            .expect("a fenced ack is a no-op, not an error");
        assert_eq!(
            broker.stats(&q).await.unwrap().unacked,
            1,
            "the late ack deleted it"
        );
        fresh.ack().await.unwrap();
        assert_eq!(broker.stats(&q).await.unwrap().total(), 0);
    });
}

/// Runs `sql` on the shared test server through `psql`; returns its unaligned output.
fn psql(sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-At"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Tables made by the first release (schema version 1, without `messages.lease`) are
/// upgraded when a broker opens them: the column is added, the version is 2, and messages
/// published before the upgrade are delivered, extended and acked under the new fencing.
#[test]
fn version_1_tables_are_upgraded() {
    celeriac_test::conformance::run_case(async {
        if !available() || !celeriac_test::services::require_program("psql") {
            return;
        }
        let schema = crate::util::fresh_schema("v1");
        let v1 = celeriac_postgres::schema_sql(&schema)
            .replace(",\n    lease       bigint\n", "\n")
            .replace("('version', '2')", "('version', '1')");
        assert!(
            !v1.contains("lease       bigint"),
            "the version 1 DDL: {v1}"
        );
        psql(&v1);
        psql(&format!(
            "INSERT INTO \"{schema}\".queues VALUES ('old'); \
             INSERT INTO \"{schema}\".messages (queue, visible_at, body) VALUES ('old', 0, 'x')"
        ));
        let broker = PgBroker::open(options(&schema)).await.unwrap();
        let version = psql(&format!(
            "SELECT value FROM \"{schema}\".meta WHERE key = 'version'"
        ));
        assert_eq!(version, "2");
        let m = celeriac_test::services::test_message("t.upgraded");
        broker
            .publish("new", &m, PublishOptions::default())
            .await
            .unwrap();
        let queues = ["new".to_owned()];
        let mut c = broker
            .consume(&queues, ConsumeOptions::new(1))
            .await
            .unwrap();
        let d = c.next().await.unwrap().expect("delivered");
        d.extend_lease(Duration::from_secs(60)).await.unwrap();
        d.ack().await.unwrap();
        assert_eq!(broker.stats("new").await.unwrap().total(), 0);
        assert_eq!(broker.stats("old").await.unwrap().total(), 1, "kept");
        broker.close().await.unwrap();
        psql(&format!("DROP SCHEMA \"{schema}\" CASCADE"));
    });
}
