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
