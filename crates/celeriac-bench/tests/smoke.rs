//! The harness runs end to end on a small N (no timed assertions: figures are reported, not
//! checked). SQLite only, so it needs no server.

use std::process::Command;

/// Runs `celeriac-bench` with `args`, asserts that it succeeded and returns its stdout.
fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_celeriac-bench"))
        .args(args)
        .output()
        .expect("runs celeriac-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "celeriac-bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn quick_run_without_python() {
    let stdout = bench(&[
        "--quick",
        "--n",
        "200",
        "--delayed",
        "500",
        "--no-python",
        "--brokers",
        "sqlite",
    ]);
    assert!(
        stdout.contains("throughput, 1 worker"),
        "no table:\n{stdout}"
    );
    assert!(
        stdout.contains("CPU per task, 4 worker process(es): worker"),
        "no CPU split of the scaling run:\n{stdout}"
    );
}

#[test]
fn scaling_probe_runs_alone() {
    let stdout = bench(&["--scaling-only", "--n", "200", "--brokers", "sqlite"]);
    assert!(
        stdout.contains("throughput, 2 worker process(es), results"),
        "no scaling rows:\n{stdout}"
    );
    assert!(
        !stdout.contains("enqueue, sequential"),
        "the probe ran more than the scaling:\n{stdout}"
    );
}

#[test]
fn micro_mode_runs() {
    assert!(bench(&["--micro"]).contains("envelope decode"));
}
