//! Tests for the processes pool: results, soft and hard time limits, crashes, recycling.
//!
//! The children are this test binary itself, started to run only [`pool_child_entry`] with
//! `CELERIAC_POOL_CHILD=1`: that test then serves the pool protocol with [`registry`] instead
//! of returning. Their stdout is this binary's, so libtest's "running 1 test" lines from the
//! children show up in the test output.

use std::time::{Duration, Instant};

use celeriac_core::meta::RemoteError;
use celeriac_core::{Broker, Registry, TaskContext, TaskError, TaskState};
use celeriac_worker::{ChildCommand, Pool, WorkerOptions};
use serde_json::json;

use crate::support::*;

const ENTRY: &str = "processes::pool_child_entry";

#[test]
fn pool_child_entry() {
    if celeriac_worker::is_pool_child() {
        let _ = celeriac_worker::run_child(&registry());
        #[allow(clippy::exit)] // a pool child must not go on to report a test result
        std::process::exit(0);
    }
}

fn pid() -> serde_json::Value {
    json!(std::process::id())
}

// Blocking bodies that really block: they run in the child processes.
#[allow(clippy::disallowed_methods)]
fn registry() -> Registry {
    let mut r = Registry::new();
    for def in [
        blocking("proc.pid", |_, _| Ok(pid())),
        blocking("proc.add", |_, args| {
            let mut args = args;
            let x: i64 = args.take(0, "x")?;
            let y: i64 = args.take(1, "y")?;
            Ok(json!(x + y))
        }),
        blocking("proc.fail", |_, _| Err(TaskError::new("ValueError", "no"))),
        blocking("proc.panic", |_, _| panic!("child boom")),
        blocking("proc.abort", |_, _| std::process::abort()),
        with_options(
            blocking("proc.abort.late", |_, _| std::process::abort()),
            |o| {
                o.acks_late = true;
            },
        ),
        with_options(
            blocking("proc.spin", |_, _| {
                #[allow(clippy::empty_loop)]
                loop {
                    std::hint::spin_loop();
                }
            }),
            |o| o.time_limit = Some(Duration::from_millis(500)),
        ),
        with_options(
            blocking("proc.soft", |ctx: TaskContext, _| {
                while !ctx.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(json!("cleaned up"))
            }),
            |o| {
                o.soft_time_limit = Some(Duration::from_millis(200));
                o.time_limit = Some(Duration::from_secs(10));
            },
        ),
        with_options(
            blocking("proc.linger", |_, args| {
                // Writes its pid, then blocks for a minute, deaf to its cancellation.
                let mut args = args;
                let path: String = args.take(0, "path")?;
                std::fs::write(&path, std::process::id().to_string())
                    .map_err(|e| TaskError::new("OSError", e.to_string()))?;
                std::thread::sleep(Duration::from_secs(60));
                Ok(pid())
            }),
            |o| o.acks_late = true,
        ),
        blocking("proc.grow", |_, _| {
            // Touch 64 MiB and keep it: the child's resident memory grows.
            let v = vec![1u8; 64 << 20];
            Box::leak(std::hint::black_box(v).into_boxed_slice());
            Ok(pid())
        }),
        with_options(blocking("proc.flaky", |_, _| Err(io_error())), |o| {
            o.autoretry = Some(|e| e.is::<std::io::Error>());
            o.max_retries = Some(1);
            o.default_retry_delay = Duration::ZERO;
        }),
    ] {
        r.insert(def);
    }
    r
}

fn io_error() -> TaskError {
    std::io::Error::other("flaky").into()
}

fn process_options(f: impl FnOnce(&mut WorkerOptions)) -> WorkerOptions {
    options(|o| {
        o.pool = Pool::Processes;
        let exe = std::env::current_exe().expect("test binary");
        o.child_command = Some(
            ChildCommand::new(exe)
                .arg(ENTRY)
                .arg("--exact")
                .arg("--nocapture")
                .arg("--test-threads=1"),
        );
        f(o);
    })
}

fn tasks() -> Vec<celeriac_core::TaskDef> {
    let r = registry();
    r.names()
        .into_iter()
        .map(|n| (**r.get(n).unwrap()).clone())
        .collect()
}

fn exc(meta: &celeriac_core::TaskMeta) -> RemoteError {
    meta.error().expect("an exception")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_tasks_run_in_reused_child_processes() {
    let h = start(tasks(), process_options(|_| {}));
    let mut pids = Vec::new();
    for _ in 0..6 {
        let id = h.call("proc.pid", vec![]).await;
        let meta = h.result(&id).await;
        assert_eq!(meta.status, TaskState::Success);
        pids.push(meta.result.as_u64().unwrap());
    }
    assert!(!pids.contains(&u64::from(std::process::id())));
    pids.sort_unstable();
    pids.dedup();
    assert!(pids.len() <= 2, "at most concurrency children: {pids:?}");

    let add = h.call("proc.add", vec![json!(2), json!(3)]).await;
    assert_eq!(h.result(&add).await.result, json!(5));
    let fail = h.call("proc.fail", vec![]).await;
    let meta = h.result(&fail).await;
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(exc(&meta).exc_type, "ValueError");
    let panic = h.call("proc.panic", vec![]).await;
    let meta = h.result(&panic).await;
    assert_eq!(exc(&meta).exc_type, "Panic");
    assert_eq!(exc(&meta).message(), "child boom");
    // autoretry looks at the error's source type, which only the child sees.
    let flaky = h.call("proc.flaky", vec![]).await;
    h.until("the flaky task retried once then failed", || async {
        h.stored(&flaky)
            .await
            .is_some_and(|m| m.status == TaskState::Failure && m.retries == Some(1))
    })
    .await;
    let report = h.stop().await;
    assert_eq!((report.succeeded, report.failed, report.retried), (7, 3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_limit_kills_a_spinning_child_and_the_pool_replaces_it() {
    let h = start(tasks(), process_options(|o| o.concurrency = 1));
    let before = h.call("proc.pid", vec![]).await;
    let before = h.result(&before).await.result;
    let started = Instant::now();
    let spin = h.call("proc.spin", vec![]).await;
    let meta = h.result(&spin).await;
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(
        meta.result,
        json!({"exc_type": "TimeLimitExceeded", "exc_message": [0.5], "exc_module": "billiard.exceptions"})
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let old = before.as_u64().unwrap();
    h.until("the spinning child is gone", || async {
        !std::path::Path::new(&format!("/proc/{old}")).exists() || zombie(old)
    })
    .await;
    let after = h.call("proc.pid", vec![]).await;
    let after = h.result(&after).await.result;
    assert_ne!(before, after, "a new child took over");
    assert_eq!(h.stop().await.failed, 1);
}

fn zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_limit_reaches_the_child_first() {
    let h = start(tasks(), process_options(|_| {}));
    let id = h.call("proc.soft", vec![]).await;
    let meta = h.result(&id).await;
    assert_eq!(
        (meta.status, meta.result),
        (TaskState::Success, json!("cleaned up"))
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborting_child_is_a_lost_worker_and_the_pool_goes_on() {
    let h = start(tasks(), process_options(|_| {}));
    let id = h.call("proc.abort", vec![]).await;
    let meta = h.result(&id).await;
    assert_eq!(meta.status, TaskState::Failure);
    let e = exc(&meta);
    assert_eq!(e.exc_type, "WorkerLostError");
    assert!(e.message().contains("signal 6 (SIGABRT)"), "{e:?}");
    let add = h.call("proc.add", vec![json!(1), json!(1)]).await;
    assert_eq!(h.result(&add).await.result, json!(2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acks_late_task_that_keeps_killing_its_child_ends_dead_lettered() {
    let h = start(tasks(), process_options(|o| o.max_redeliveries = 2));
    let id = h.call("proc.abort.late", vec![]).await;
    let meta = h.result(&id).await;
    let e = exc(&meta);
    assert_eq!(e.exc_type, "DeliveryLimitExceeded");
    h.until("dead-lettered", || async {
        h.broker
            .stats("celery.dead")
            .await
            .is_ok_and(|s| s.ready == 1)
    })
    .await;
    let report = h.stop().await;
    assert_eq!((report.requeued, report.dead_lettered), (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_are_recycled_after_max_tasks_and_max_memory() {
    let h = start(
        tasks(),
        process_options(|o| {
            o.concurrency = 1;
            o.max_tasks_per_child = Some(2);
        }),
    );
    let mut pids = Vec::new();
    for _ in 0..4 {
        let id = h.call("proc.pid", vec![]).await;
        pids.push(h.result(&id).await.result);
    }
    assert_eq!(pids[0], pids[1]);
    assert_ne!(pids[1], pids[2]);
    assert_eq!(pids[2], pids[3]);
    h.stop().await;

    let h = start(
        tasks(),
        process_options(|o| {
            o.concurrency = 1;
            o.max_memory_per_child = Some(32 * 1024);
        }),
    );
    let a = h.call("proc.grow", vec![]).await;
    let a = h.result(&a).await.result;
    let b = h.call("proc.pid", vec![]).await;
    let b = h.result(&b).await.result;
    let c = h.call("proc.pid", vec![]).await;
    let c = h.result(&c).await.result;
    assert_ne!(a, b, "the child over 32 MiB was replaced");
    assert_eq!(b, c, "a small child is kept");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_is_no_pool_child_gives_a_clear_lost_error() {
    let h = start(
        tasks(),
        process_options(|o| o.child_command = Some(ChildCommand::new("/bin/true"))),
    );
    let id = h.call("proc.pid", vec![]).await;
    let meta = h.result(&id).await;
    let e = exc(&meta);
    assert_eq!(e.exc_type, "WorkerLostError");
    assert!(e.message().contains("celeriac::cli::run"), "{e:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_revoke_signals_the_running_child_and_sticks_across_a_restart() {
    use celeriac_core::ResultBackend as _;
    let fast = |o: &mut WorkerOptions| {
        o.concurrency = 1;
        o.revoke_poll_interval = Duration::from_millis(50);
        o.cold_shutdown_grace = Duration::from_secs(5);
    };
    let h = start(tasks(), process_options(fast));
    let pidfile = std::env::temp_dir().join(format!(
        "celeriac-linger-{}.pid",
        celeriac_core::protocol::new_id()
    ));
    let m = message("proc.linger", vec![json!(pidfile.display().to_string())]);
    let copy = m.clone();
    let id = h.send(m).await;
    h.until("the child runs the task", || async {
        std::fs::read_to_string(&pidfile).is_ok_and(|p| p.parse::<u64>().is_ok())
    })
    .await;
    let child: u64 = std::fs::read_to_string(&pidfile).unwrap().parse().unwrap();
    std::fs::remove_file(&pidfile).unwrap();
    let started = Instant::now();
    h.backend
        .store(&celeriac_worker::revoke::revoked_meta(
            id.clone(),
            Some(celeriac_core::backend::revoke::Signal::Term),
        ))
        .await
        .unwrap();
    h.until("REVOKED(terminated)", || async {
        h.stored(&id).await.is_some_and(|m| {
            m.status == TaskState::Revoked && m.error().is_some_and(|e| e.message() == "terminated")
        })
    })
    .await;
    // SIGTERM ended it, well before the 5 s grace after which it would have been SIGKILLed.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    h.until("the child is gone", || async {
        !std::path::Path::new(&format!("/proc/{child}")).exists() || zombie(child)
    })
    .await;
    h.until("acked", || async {
        let s = h.stats().await;
        (s.ready, s.unacked) == (0, 0)
    })
    .await;
    // The pool carries on with a new child.
    let next = h.call("proc.pid", vec![]).await;
    assert_ne!(h.result(&next).await.result, json!(child));
    let (broker, backend) = (h.broker.clone(), h.backend.clone());
    let report = h.stop().await;
    assert_eq!((report.revoked, report.succeeded, report.failed), (1, 1, 0));

    // Restarted, the worker does not run the revoked id again.
    let h = start_with(broker, backend, tasks(), process_options(fast));
    h.send(copy).await;
    h.until("the copy is settled", || async {
        let s = h.stats().await;
        (s.ready, s.unacked) == (0, 0)
    })
    .await;
    let report = h.stop().await;
    assert_eq!((report.revoked, report.succeeded), (1, 0));
    assert!(!pidfile.exists(), "the copy never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_prestarts_its_children_and_grows_and_shrinks_at_run_time() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let go = Opening::new();
    let g = go.clone();
    let gated = async_task("tasks.gated", move |_, _| {
        let g = g.clone();
        async move {
            g.wait().await;
            Ok(json!(null))
        }
    });
    // Tracks how many run at once.
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), max.clone());
    let overlap = async_task("tasks.overlap", move |_, _| {
        let (n, m) = (n.clone(), m.clone());
        async move {
            let running = n.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    let mut defs = tasks();
    defs.extend([gated, overlap]);
    let h = start(
        defs,
        process_options(|o| {
            o.concurrency = 2;
            o.prefetch_buffer = 4;
            o.track_started = true;
        }),
    );
    h.until("two children prestarted", || async {
        h.pool.children() == Some(2)
    })
    .await;

    // Grow: a third child, and three tasks at once.
    assert_eq!(h.pool.grow(1), 3);
    h.until("a third child", || async { h.pool.children() == Some(3) })
        .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(h.call("tasks.gated", vec![]).await);
    }
    h.until("three running at once", || async {
        let mut started = 0;
        for id in &ids {
            if h.stored(id)
                .await
                .is_some_and(|m| m.status == TaskState::Started)
            {
                started += 1;
            }
        }
        started == 3
    })
    .await;

    // Shrink to one (never below): idle children retire, the slots go as tasks end.
    assert_eq!(h.pool.shrink(5), 1);
    assert_eq!(h.pool.size(), 1);
    h.until("one child left", || async { h.pool.children() == Some(1) })
        .await;
    go.open();
    for id in &ids {
        h.result(id).await;
    }
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(h.call("tasks.overlap", vec![]).await);
    }
    for id in &ids {
        assert_eq!(h.result(id).await.status, TaskState::Success);
    }
    assert_eq!(
        max.load(Ordering::SeqCst),
        1,
        "one at a time after the shrink"
    );
    // Blocking tasks still run, in the one child.
    let pid = h.call("proc.pid", vec![]).await;
    assert_eq!(h.result(&pid).await.status, TaskState::Success);
    h.stop().await;
}
