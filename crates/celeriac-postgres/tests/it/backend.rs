//! The result backend beyond the conformance suite: batched stores keep precedence.

use std::sync::Arc;

use celeriac_core::{ResultBackend, TaskMeta, TaskState};
use celeriac_postgres::PgBackend;
use serde_json::json;

use crate::util::{available, options};

/// Many stores of one task id at once (they go out in batches, a repeated id waiting for the
/// next batch): no error, and SUCCESS is final whatever the order.
#[test]
fn concurrent_stores_of_one_id_keep_precedence() {
    celeriac_test::conformance::run_case(async {
        if !available() {
            return;
        }
        let b = Arc::new(PgBackend::open(options("t_conformance")).await.unwrap());
        let id = celeriac_core::protocol::new_id();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..60 {
            let (b, id) = (b.clone(), id.clone());
            set.spawn(async move {
                let meta = match i % 3 {
                    0 => TaskMeta::new(&id, TaskState::Started, json!(null)),
                    1 => TaskMeta::success(&id, json!(i)),
                    _ => TaskMeta::new(&id, TaskState::Retry, json!(null)),
                };
                b.store(&meta).await
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().expect("store");
        }
        let got = b.get(&id).await.unwrap().expect("stored");
        assert_eq!(got.status, TaskState::Success);
        // A late STARTED after SUCCESS is refused.
        let late = TaskMeta::new(&id, TaskState::Started, json!(null));
        assert!(!b.store(&late).await.unwrap());
        assert_eq!(
            b.get(&id).await.unwrap().unwrap().status,
            TaskState::Success
        );
    });
}
