//! A small mutation fuzzer for the decoders of untrusted input, on the stable toolchain.
//!
//! [`fuzz`] feeds a target function inputs made by mutating seed inputs (real messages, frames,
//! URLs): bit flips, interesting bytes, inserted and deleted runs, splices of two seeds, and
//! tokens from a dictionary the target gives (JSON keys, header names). Any panic is a failure;
//! so is an input that takes longer than [`SLOW`]. A failing input is saved under
//! `target/fuzz-crashes/` and shown in the failure message with the seed that reproduces the
//! run; copy it into `fuzz/regressions/<target>/` and it is replayed first by every later run.
//!
//! The budget per target is `CELERIAC_FUZZ_SECS` seconds (default 1, which CI uses);
//! `scripts/fuzz` runs every target for longer. `CELERIAC_FUZZ_SEED` replays one run. Each
//! run's seed is written to stderr before it starts (past the test harness's capture) and to
//! `target/fuzz-crashes/<target>.running` until it ends, so an input that aborts the whole
//! process (a stack overflow) can still be replayed.
//!
//! ```
//! celeriac_test::fuzz::fuzz("example", &[b"10/m"], &[b"/s"], |input| {
//!     let _ = std::str::from_utf8(input).map(|s| s.split('/').count());
//! });
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An input slower than this fails the run (a decoder must not be made to spin).
pub const SLOW: Duration = Duration::from_secs(2);

/// Inputs never grow beyond this many bytes.
const MAX_LEN: usize = 64 * 1024;

/// Bytes that tend to sit on the edges of parsers.
const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b':', b',', b'-', b'.', b'0',
    b'9', b'e', b'/', b'@', b';', b'%', b' ', b'\n',
];

/// A switch of the test harness (budget, replay seed), not app configuration.
#[allow(clippy::disallowed_methods, reason = "a switch of the test harness")]
fn harness_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Runs `target` on the regression inputs of `name`, the seeds, and mutations of them for the
/// budget; panics with the failing input when `target` panics or is slow.
pub fn fuzz(name: &str, seeds: &[&[u8]], dictionary: &[&[u8]], target: impl Fn(&[u8])) {
    let budget = budget();
    let seed = harness_var("CELERIAC_FUZZ_SEED")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    // Written down before anything runs: an input that aborts the process (a stack
    // overflow) takes the test harness's captured output with it, and the seed replays it.
    let running = announce(name, seed);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut corpus: Vec<Vec<u8>> = regressions(name);
    let replayed = corpus.len();
    corpus.extend(seeds.iter().map(|s| s.to_vec()));
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    // Regression inputs and seeds first, as they are.
    for input in corpus.clone() {
        run_one(name, seed, &input, &target);
    }
    let started = Instant::now();
    let mut runs = 0u64;
    let mut input = Vec::new();
    while started.elapsed() < budget {
        // Half the time start again from the corpus, else go on mutating the last input.
        if input.is_empty() || rng.bool() {
            input.clone_from(&corpus[rng.usize(..corpus.len())]);
        }
        for _ in 0..rng.usize(1..=8) {
            mutate(&mut rng, &mut input, &corpus, dictionary);
        }
        input.truncate(MAX_LEN);
        run_one(name, seed, &input, &target);
        runs += 1;
    }
    eprintln!(
        "fuzz {name}: {runs} inputs in {:.1} s ({replayed} regression inputs), seed {seed}",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(running);
}

/// Says which seed target `name` runs with, where an aborted process cannot lose it: on the
/// process's stderr directly (not the test harness's capture) and in
/// `target/fuzz-crashes/<name>.running`, removed when the run ends without aborting.
fn announce(name: &str, seed: u64) -> PathBuf {
    use std::io::Write as _;
    let line = format!("fuzz {name}: seed {seed} (CELERIAC_FUZZ_SEED={seed} replays this run)\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    let dir = workspace().join("target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}.running"));
    let _ = std::fs::write(&path, &line);
    path
}

fn budget() -> Duration {
    let secs = harness_var("CELERIAC_FUZZ_SECS")
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs)
}

fn run_one(name: &str, seed: u64, input: &[u8], target: &impl Fn(&[u8])) {
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| target(input)));
    let took = started.elapsed();
    let failure = match outcome {
        Err(panic) => Some(format!("panicked: {}", panic_text(&*panic))),
        Ok(()) if took > SLOW => Some(format!("took {took:?}")),
        Ok(()) => None,
    };
    if let Some(failure) = failure {
        let saved = save_crash(name, input);
        panic!(
            "fuzz target {name} {failure}\ninput ({} bytes, saved to {}): {}\nreplay with \
             CELERIAC_FUZZ_SEED={seed}; keep it as a regression case in fuzz/regressions/{name}/",
            input.len(),
            saved.display(),
            preview(input)
        );
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// The input as text when it is mostly text, else as hex; at most 2 KiB of it.
fn preview(input: &[u8]) -> String {
    let shown = &input[..input.len().min(2048)];
    match std::str::from_utf8(shown) {
        Ok(s) => format!("{s:?}"),
        Err(_) => shown.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let len = input.len();
    match rng.u8(..9) {
        0 if len > 0 => {
            let i = rng.usize(..len);
            input[i] ^= 1 << rng.u8(..8);
        }
        1 if len > 0 => {
            let i = rng.usize(..len);
            input[i] = INTERESTING[rng.usize(..INTERESTING.len())];
        }
        2 => {
            let at = rng.usize(..=len);
            let n = rng.usize(1..=8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let from = rng.usize(..len);
            let to = (from + rng.usize(1..=16)).min(len);
            input.drain(from..to);
        }
        4 if len > 0 => {
            // Repeat a run: deep nesting, long numbers, many fields.
            let from = rng.usize(..len);
            let to = (from + rng.usize(1..=32)).min(len);
            let run = input[from..to].repeat(rng.usize(1..=64));
            input.splice(to..to, run);
        }
        5 if !dict.is_empty() => {
            let at = rng.usize(..=len);
            let token = dict[rng.usize(..dict.len())];
            input.splice(at..at, token.iter().copied());
        }
        6 if len > 0 => input.truncate(rng.usize(..len)),
        7 => {
            // Splice the head of this input onto the tail of another.
            let other = &corpus[rng.usize(..corpus.len())];
            let cut = rng.usize(..=len);
            let from = rng.usize(..=other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        _ if len > 0 => {
            // A multi-byte number edge in place: 0, -1, the largest and smallest values.
            let i = rng.usize(..len);
            let edge: &[u8] = match rng.u8(..4) {
                0 => b"-1",
                1 => b"18446744073709551616",
                2 => b"1e309",
                _ => b"-9223372036854775809",
            };
            input.splice(i..i, edge.iter().copied());
        }
        _ => input.push(rng.u8(..)),
    }
}

/// The workspace's root (two levels above this crate's manifest).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn regressions(name: &str) -> Vec<Vec<u8>> {
    let dir = workspace().join("fuzz/regressions").join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn save_crash(name: &str, input: &[u8]) -> PathBuf {
    let dir = workspace().join("target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_on_disk_while_the_target_runs_and_gone_after() {
        let path = workspace().join("target/fuzz-crashes/selftest-seed.running");
        let seen = std::cell::Cell::new(false);
        fuzz("selftest-seed", &[b"abc"], &[], |_| {
            if !seen.get() {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(text.contains("CELERIAC_FUZZ_SEED="), "{text:?}");
                seen.set(true);
            }
        });
        assert!(seen.get());
        assert!(!path.exists());
    }

    #[test]
    fn a_panicking_target_fails_with_the_input_saved() {
        let e = catch_unwind(|| {
            fuzz("selftest", &[b"abc"], &[b"!"], |input| {
                assert!(!input.contains(&b'!'), "found it");
            })
        })
        .unwrap_err();
        let text = panic_text(&*e);
        assert!(
            text.contains("fuzz target selftest panicked: found it"),
            "{text}"
        );
        let saved = text
            .split("saved to ")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap();
        assert!(std::fs::read(saved).unwrap().contains(&b'!'));
    }

    #[test]
    fn mutations_stay_bounded_and_vary() {
        let mut rng = fastrand::Rng::with_seed(7);
        let corpus = vec![b"{\"id\": 1}".to_vec()];
        let mut seen = std::collections::HashSet::new();
        let mut input = corpus[0].clone();
        for _ in 0..10_000 {
            mutate(&mut rng, &mut input, &corpus, &[b"\"eta\""]);
            input.truncate(MAX_LEN);
            seen.insert(input.clone());
        }
        assert!(seen.len() > 5_000, "{}", seen.len());
    }
}
