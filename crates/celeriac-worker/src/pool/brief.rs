//! Running brief blocking bodies inline on the runtime: [`Brief`].
//!
//! Handing a blocking body to another thread costs two thread wake-ups (there, and back to the
//! runtime) and two sleeps, several times what a body like `a + b` costs; profiles of a worker
//! draining such tasks spend ~30 % of its CPU in that handoff. So under [`Pool::Async`]
//! (crate::Pool) a blocking task that has proved brief runs on the runtime thread that took its
//! delivery, with no handoff.
//!
//! The proof is [`PROOF_RUNS`] consecutive runs on the blocking pool, each shorter than
//! [`BRIEF`]: such a body neither computes for long nor waits on anything slow. An inline run
//! longer than [`TOO_LONG`] is either the body's fault (it blocked, or computed that long) or
//! the machine's (the scheduler or the hypervisor paused the thread; on a busy 2-core machine
//! a 5 µs body is paused that long about once in a thousand runs), and a wall clock cannot tell
//! them apart. The thread's own accounting can, on Linux: a voluntary context switch
//! (`getrusage(RUSAGE_THREAD)`) means the body blocked, CPU time over [`TOO_LONG`]
//! (`CLOCK_THREAD_CPUTIME_ID`) means it computed, and neither means it was paused.
//! (`getrusage`'s own CPU times will not do: they advance only at the scheduler's ticks, so
//! over a short run they are off by up to a tick; the benchmark suite saw a no-op body
//! "use" 2.25 ms.) Reading both costs about 2 µs here before a run, and again after it only
//! when it was long, so only a body in doubt pays it: a long run that was not measured
//! strikes nothing but has the next [`DOUBT_RUNS`] inline runs of that body measured.
//!
//! A long run that is the body's fault (or any long run where the accounting is not available)
//! sends the body back to the pool to prove itself again; after [`STRIKES`] such runs it stays
//! there for good, with a warning. Strikes are forgotten after [`FORGIVEN_AFTER`] inline runs
//! without one. So a body whose slow path shows up at least once in that many runs holds up a
//! runtime thread at most `STRIKES + 1` times, and pauses of the machine alone demote nobody
//! (the benchmark suite saw up to 22 such demotions in one run before).
//!
//! A body that blocks on tokio from inside (`Handle::block_on`) works on the blocking pool but
//! panics on a runtime thread; such a panic demotes it too, and that one run fails with a
//! message saying so.
//! Workers that must never run a body on the runtime turn this off
//! ([`WorkerOptions::inline_brief`](crate::WorkerOptions)) or use [`Pool::Threads`]
//! (crate::Pool).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Finished;

/// Consecutive brief runs on the pool before a body runs inline.
pub(crate) const PROOF_RUNS: u32 = 32;
/// A run shorter than this counts as brief.
pub(crate) const BRIEF: Duration = Duration::from_micros(50);
/// An inline run longer than this, when it is the body's fault, sends the body back to the
/// pool to prove itself again.
pub(crate) const TOO_LONG: Duration = Duration::from_millis(1);
/// After this many too-long inline runs a body stays on the pool for good.
pub(crate) const STRIKES: u8 = 3;
/// Inline runs without a too-long one after which earlier strikes are forgotten.
pub(crate) const FORGIVEN_AFTER: u32 = 10_000;
/// Inline runs measured by the thread's accounting after a long run that was not.
pub(crate) const DOUBT_RUNS: u32 = FORGIVEN_AFTER;

/// Where one run of a blocking body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// On the runtime thread; `measured`: with the thread's accounting ([`timed`]).
    Inline {
        measured: bool,
    },
    Pool,
}

/// What one run took.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Took {
    pub(crate) wall: Duration,
    /// Whether the run was to be measured by the thread's accounting.
    pub(crate) measured: bool,
    /// From the thread's accounting, when the run was measured and long, and the accounting
    /// is available.
    pub(crate) usage: Option<Usage>,
}

/// What the thread's accounting says of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// CPU time of the thread (user and system).
    pub(crate) cpu: Duration,
    /// Whether the thread gave up its CPU voluntarily (slept, waited on a lock or on I/O).
    pub(crate) blocked: bool,
}

/// What is known of each blocking body, by handler identity.
#[derive(Debug, Default)]
pub(crate) struct Brief {
    bodies: Mutex<HashMap<usize, Record>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Record {
    /// Consecutive brief runs on the pool so far.
    proven: u32,
    /// Inline runs that took too long; at [`STRIKES`] the body stays on the pool.
    strikes: u8,
    /// Inline runs placed since the last strike.
    since_strike: u32,
    /// Inline runs still to be measured.
    doubt: u32,
}

impl Brief {
    fn with<R>(&self, body: usize, f: impl FnOnce(&mut Record) -> R) -> R {
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        f(bodies.entry(body).or_default())
    }

    /// Where the next run of `body` goes.
    pub(crate) fn place(&self, body: usize) -> Placement {
        self.with(body, |r| {
            if r.strikes < STRIKES && r.proven >= PROOF_RUNS {
                r.since_strike = r.since_strike.saturating_add(1);
                if r.since_strike >= FORGIVEN_AFTER {
                    r.strikes = 0;
                }
                let measured = r.doubt > 0;
                r.doubt = r.doubt.saturating_sub(1);
                Placement::Inline { measured }
            } else {
                Placement::Pool
            }
        })
    }

    /// Records a run on the pool that took `took` (wall time: on the pool, a pause costs the
    /// runtime nothing, and a too-slow proof only delays running inline).
    pub(crate) fn ran_on_pool(&self, body: usize, took: Duration) {
        self.with(body, |r| {
            r.proven = if took < BRIEF {
                r.proven.saturating_add(1)
            } else {
                0
            };
        });
    }

    /// Records an inline run that took `took` and ended with `finished`; returns what the run
    /// reports (a panic from blocking on the runtime gets an explanation). Logs go out in the
    /// delivery's span, which names the task.
    pub(crate) fn ran_inline(&self, body: usize, took: Took, finished: Finished) -> Finished {
        match finished {
            Finished::Panicked(msg) if blocked_on_runtime(&msg) => {
                self.with(body, |r| r.strikes = STRIKES);
                tracing::warn!(
                    "a brief blocking task blocked on the async runtime; it runs on the blocking pool from now on"
                );
                Finished::Panicked(format!(
                    "{msg} (the task ran on a runtime thread because its earlier runs were brief; \
                     it runs on the blocking pool from now on; set the worker's inline_brief = false \
                     or use the threads pool to never run tasks on the runtime)"
                ))
            }
            finished => {
                if took.wall > TOO_LONG {
                    let took_ms = took.wall.as_secs_f64() * 1e3;
                    match took.usage {
                        Some(u) if !u.blocked && u.cpu <= TOO_LONG => {
                            self.with(body, |r| r.doubt = DOUBT_RUNS);
                            tracing::debug!(
                                took_ms,
                                cpu_ms = u.cpu.as_secs_f64() * 1e3,
                                "a brief blocking task ran long inline because its thread was paused; it stays inline"
                            );
                            return finished;
                        }
                        None if MEASURABLE && !took.measured => {
                            self.with(body, |r| r.doubt = DOUBT_RUNS);
                            tracing::debug!(
                                took_ms,
                                "a brief blocking task ran long inline; its next inline runs are measured to tell why"
                            );
                            return finished;
                        }
                        _ => {}
                    }
                    let strikes = self.with(body, |r| {
                        r.proven = 0;
                        r.strikes = r.strikes.saturating_add(1);
                        r.since_strike = 0;
                        r.doubt = DOUBT_RUNS;
                        r.strikes
                    });
                    if strikes >= STRIKES {
                        tracing::warn!(
                            took_ms,
                            usage = ?took.usage,
                            "a brief blocking task ran long on the async runtime again; it runs on the blocking pool from now on"
                        );
                    } else {
                        tracing::debug!(
                            took_ms,
                            usage = ?took.usage,
                            strikes,
                            "a brief blocking task ran long inline; back to the blocking pool until it proves brief again"
                        );
                    }
                }
                finished
            }
        }
    }
}

/// Whether a panic message is tokio's refusal to block a runtime thread.
fn blocked_on_runtime(msg: &str) -> bool {
    msg.contains("Cannot start a runtime from within a runtime")
        || msg.contains("Cannot drop a runtime in a context where blocking is not allowed")
        || msg.contains("can call blocking only when running on the multi-threaded runtime")
}

/// Runs `run`, timing it, and with `measured` also by the thread's accounting (read after
/// the run only when it was long: a brief run strikes nothing).
pub(crate) fn timed<T>(run: impl FnOnce() -> T, measured: bool) -> (T, Took) {
    let before = if measured { usage::now() } else { None };
    let started = Instant::now();
    let out = run();
    let wall = started.elapsed();
    let usage = match before {
        Some(b) if wall > TOO_LONG => usage::now().map(|a| usage::between(b, a)),
        _ => None,
    };
    (
        out,
        Took {
            wall,
            measured,
            usage,
        },
    )
}

/// Whether this platform has the thread's accounting.
const MEASURABLE: bool = cfg!(target_os = "linux");

#[cfg(target_os = "linux")]
mod usage {
    use std::time::Duration;

    use nix::sys::resource::{UsageWho, getrusage};
    use nix::time::{ClockId, clock_gettime};

    use super::Usage;

    /// The calling thread's CPU time and voluntary context switches so far.
    pub(super) fn now() -> Option<(Duration, u64)> {
        let cpu = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
        let u = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
        Some((
            Duration::from(cpu),
            u64::try_from(u.voluntary_context_switches()).unwrap_or(0),
        ))
    }

    pub(super) fn between(before: (Duration, u64), after: (Duration, u64)) -> Usage {
        Usage {
            cpu: after.0.saturating_sub(before.0),
            blocked: after.1 > before.1,
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod usage {
    use std::time::Duration;

    use super::Usage;

    pub(super) fn now() -> Option<(Duration, u64)> {
        None
    }

    pub(super) fn between(_: (Duration, u64), _: (Duration, u64)) -> Usage {
        Usage {
            cpu: Duration::ZERO,
            blocked: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(p: Placement) -> bool {
        matches!(p, Placement::Inline { .. })
    }

    /// A long run the accounting blames on the body: it blocked.
    fn blocked(ms: u64) -> Took {
        Took {
            wall: Duration::from_millis(ms),
            measured: true,
            usage: Some(Usage {
                cpu: Duration::from_micros(20),
                blocked: true,
            }),
        }
    }

    /// A long run of a thread the machine paused.
    fn paused(ms: u64) -> Took {
        Took {
            wall: Duration::from_millis(ms),
            measured: true,
            usage: Some(Usage {
                cpu: Duration::from_micros(20),
                blocked: false,
            }),
        }
    }

    /// A run that was not measured.
    fn unmeasured(us: u64) -> Took {
        Took {
            wall: Duration::from_micros(us),
            measured: false,
            usage: None,
        }
    }

    fn lost() -> Finished {
        Finished::Lost(String::new())
    }

    fn prove(b: &Brief, body: usize) {
        for _ in 0..PROOF_RUNS {
            b.ran_on_pool(body, Duration::from_micros(5));
        }
        assert!(inline(b.place(body)), "proved brief");
    }

    #[test]
    fn a_body_runs_inline_after_its_proof_and_leaves_for_good_after_three_long_runs() {
        let b = Brief::default();
        for _ in 0..PROOF_RUNS - 1 {
            assert_eq!(b.place(1), Placement::Pool);
            b.ran_on_pool(1, Duration::from_micros(5));
        }
        // One slow run starts the proof over.
        b.ran_on_pool(1, Duration::from_millis(2));
        for _ in 0..PROOF_RUNS {
            assert_eq!(b.place(1), Placement::Pool);
            b.ran_on_pool(1, Duration::from_micros(5));
        }
        assert_eq!(b.place(1), Placement::Inline { measured: false });
        assert_eq!(b.place(2), Placement::Pool, "bodies are told apart");
        for strike in 1..=STRIKES {
            let f = b.ran_inline(1, blocked(3), Finished::Panicked("x".to_owned()));
            assert!(matches!(f, Finished::Panicked(m) if m == "x"));
            assert_eq!(b.place(1), Placement::Pool, "strike {strike}");
            for _ in 0..PROOF_RUNS {
                b.ran_on_pool(1, Duration::from_micros(5));
            }
            if strike < STRIKES {
                assert_eq!(
                    b.place(1),
                    Placement::Inline { measured: true },
                    "proved brief again, and measured"
                );
                // A brief inline run changes nothing.
                b.ran_inline(1, unmeasured(5), lost());
                assert!(inline(b.place(1)));
            }
        }
        assert_eq!(b.place(1), Placement::Pool, "demoted for good");
    }

    /// A long run that was not measured strikes nothing but has the next runs measured; a
    /// measured one strikes only when the body blocked or computed, never when the thread was
    /// paused; the measuring stops after `DOUBT_RUNS` runs.
    #[test]
    fn only_long_runs_that_are_the_bodys_fault_strike() {
        let b = Brief::default();
        prove(&b, 4);
        b.ran_inline(4, unmeasured(3_000), lost());
        for _ in 0..100 {
            assert_eq!(b.place(4), Placement::Inline { measured: true });
            b.ran_inline(4, paused(5), lost());
        }
        // Computing for longer than `TOO_LONG` is the body's fault.
        assert_eq!(b.place(4), Placement::Inline { measured: true });
        let computed = Took {
            wall: Duration::from_millis(4),
            measured: true,
            usage: Some(Usage {
                cpu: Duration::from_millis(3),
                blocked: false,
            }),
        };
        b.ran_inline(4, computed, lost());
        assert_eq!(b.place(4), Placement::Pool, "struck");
        prove(&b, 4);
        // A measured run whose accounting failed counts against the body.
        let failed = Took {
            wall: Duration::from_millis(4),
            measured: true,
            usage: None,
        };
        b.ran_inline(4, failed, lost());
        assert_eq!(b.place(4), Placement::Pool, "struck");
        prove(&b, 4);
        for _ in 1..DOUBT_RUNS {
            assert_eq!(b.place(4), Placement::Inline { measured: true });
        }
        assert_eq!(
            b.place(4),
            Placement::Inline { measured: false },
            "measured no longer"
        );
    }

    /// Strikes far apart never add up to a demotion; strikes close together still do.
    #[test]
    fn strikes_are_forgotten_after_many_brief_inline_runs() {
        let b = Brief::default();
        let strike = |b: &Brief| {
            b.ran_inline(3, blocked(2), lost());
        };
        for _ in 0..STRIKES * 3 {
            prove(&b, 3);
            for _ in 1..FORGIVEN_AFTER {
                assert!(inline(b.place(3)));
            }
            strike(&b);
        }
        // Still inline after nine strikes spread out; the last one counts, and two more
        // close to it make three.
        prove(&b, 3);
        strike(&b);
        prove(&b, 3);
        strike(&b);
        for _ in 0..PROOF_RUNS {
            b.ran_on_pool(3, Duration::from_micros(5));
        }
        assert_eq!(b.place(3), Placement::Pool, "strikes close together demote");
    }

    /// The thread's accounting itself: waiting on a lock or channel is a voluntary switch;
    /// computing shows as CPU time.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_accounting_tells_waiting_from_computing() {
        let (_tx, rx) = std::sync::mpsc::channel::<()>();
        let ((), waited) = timed(
            || {
                let _ = rx.recv_timeout(Duration::from_millis(3));
            },
            true,
        );
        let u = waited.usage.expect("measured");
        assert!(u.blocked, "{waited:?}");
        assert!(waited.wall >= Duration::from_millis(3), "{waited:?}");
        // A fixed amount of work, so the CPU time does not depend on how busy the machine is.
        let (_, computed) = timed(
            || {
                let mut x = 0u64;
                for i in 0..20_000_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
                x
            },
            true,
        );
        let u = computed.usage.expect("measured");
        assert!(u.cpu >= Duration::from_millis(2), "{computed:?}");
        assert!(
            u.cpu <= computed.wall + Duration::from_millis(5),
            "{computed:?}"
        );
        let ((), not) = timed(|| (), false);
        assert!(not.usage.is_none() && !not.measured);
        // The CPU time is exact, not as of the scheduler's last tick: 300 µs of spinning show.
        // The wall clock starts first, so the CPU interval (which includes the reading's own
        // system call) lies within it.
        let started = Instant::now();
        let before = usage::now().expect("measured");
        while started.elapsed() < Duration::from_micros(300) {
            std::hint::spin_loop();
        }
        let spun = usage::between(before, usage::now().expect("measured"));
        assert!(
            spun.cpu > Duration::ZERO && spun.cpu <= started.elapsed(),
            "{spun:?}"
        );
    }

    #[test]
    fn blocking_on_the_runtime_demotes_and_explains() {
        let b = Brief::default();
        for _ in 0..PROOF_RUNS {
            b.ran_on_pool(7, Duration::from_micros(1));
        }
        assert!(inline(b.place(7)));
        let msg = "Cannot start a runtime from within a runtime. This happens because ...";
        let f = b.ran_inline(7, unmeasured(3), Finished::Panicked(msg.to_owned()));
        let Finished::Panicked(m) = f else {
            panic!("still a panic")
        };
        assert!(
            m.starts_with(msg) && m.contains("inline_brief = false"),
            "{m}"
        );
        assert_eq!(b.place(7), Placement::Pool);
    }
}
