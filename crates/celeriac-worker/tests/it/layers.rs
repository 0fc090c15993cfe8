//! Users' layers: `Worker::layer` around each run, `Worker::delivery_layer` around each
//! delivery, on a real worker.

use std::sync::{Arc, Mutex};

use celeriac_core::memory::MemoryBackend;
use celeriac_core::{BoxFuture, TaskDef, TaskError, TaskState};
use celeriac_worker::{Layer, Next, Outcome, Request};
use serde_json::json;

use crate::support::*;

/// Writes down each task it sees and the outcome it saw.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn get(&self) -> Vec<String> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
}

impl Layer for Log {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let outcome = next.run(req).await;
            let kind = match &outcome {
                Outcome::Succeeded(v) => format!("succeeded {v}"),
                Outcome::Errored(e) => format!("errored {}", e.message()),
                Outcome::Failed(e) => format!("failed {}", e.message()),
                Outcome::Revoked { reason } => format!("revoked {reason}"),
                other => format!("{other:?}"),
            };
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {kind}", req.args()[0]));
            outcome
        })
    }
}

/// Refuses tasks whose first argument is "refuse", without running them.
#[derive(Debug)]
struct Refuse;

impl Layer for Refuse {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        if req.args().first() != Some(&json!("refuse")) {
            return next.run(req);
        }
        Box::pin(async {
            Outcome::Rejected {
                requeue: false,
                reason: "refused by policy".into(),
            }
        })
    }
}

fn tasks() -> Vec<TaskDef> {
    vec![blocking("t.echo", |_, mut a| {
        let v: serde_json::Value = a.take(0, "v")?;
        if v == json!("fail") {
            return Err(TaskError::fail("asked to"));
        }
        Ok(v)
    })]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_layers_see_started_tasks_and_delivery_layers_see_every_delivery() {
    let runs = Log::default();
    let deliveries = Log::default();
    let (r, d) = (runs.clone(), deliveries.clone());
    let h = start_built(
        TestBroker::new(),
        MemoryBackend::new(),
        tasks(),
        options(|_| {}),
        move |w| w.layer(r).delivery_layer(d).delivery_layer(Refuse),
    );
    let ok = h.call("t.echo", vec![json!("ok")]).await;
    let failed = h.call("t.echo", vec![json!("fail")]).await;
    let mut m = message("t.echo", vec![json!("late")]);
    m.headers.expires = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
    let expired = h.send(m).await;
    let refused = h.call("t.echo", vec![json!("refuse")]).await;
    assert_eq!(h.result(&ok).await.status, TaskState::Success);
    assert_eq!(h.result(&failed).await.status, TaskState::Failure);
    assert_eq!(h.result(&expired).await.status, TaskState::Revoked);
    h.until("every delivery settled", || async {
        deliveries.get().len() == 4 && h.stats().await.total() == 0
    })
    .await;
    assert!(
        h.stored(&refused).await.is_none(),
        "a refused task stores nothing"
    );
    let report = h.stop().await;
    assert_eq!(
        runs.get(),
        ["\"fail\" errored asked to", "\"ok\" succeeded \"ok\""],
        "the run layer sees only started tasks, before the retry decision"
    );
    assert_eq!(
        deliveries.get(),
        [
            "\"fail\" failed asked to",
            "\"late\" revoked expired",
            "\"ok\" succeeded \"ok\"",
            "\"refuse\" Rejected { requeue: false, reason: \"refused by policy\" }",
        ],
        "the delivery layer sees every delivery's final outcome"
    );
    assert_eq!(
        (
            report.succeeded,
            report.failed,
            report.revoked,
            report.rejected
        ),
        (1, 1, 1, 1)
    );
}
