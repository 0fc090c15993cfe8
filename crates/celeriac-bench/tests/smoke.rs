//! The harness runs end to end on a small N (no timed assertions: figures are reported, not
//! checked). SQLite only, so it needs no server.

use std::process::Command;

#[test]
fn quick_run_without_python() {
    let out = Command::new(env!("CARGO_BIN_EXE_celeriac-bench"))
        .args([
            "--quick",
            "--n",
            "200",
            "--delayed",
            "500",
            "--no-python",
            "--brokers",
            "sqlite",
        ])
        .output()
        .expect("runs celeriac-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "celeriac-bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = Command::new(env!("CARGO_BIN_EXE_celeriac-bench"))
        .args(["--scaling-only", "--n", "200", "--brokers", "sqlite"])
        .output()
        .expect("runs celeriac-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "celeriac-bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = Command::new(env!("CARGO_BIN_EXE_celeriac-bench"))
        .arg("--micro")
        .output()
        .expect("runs celeriac-bench");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("envelope decode"));
}
