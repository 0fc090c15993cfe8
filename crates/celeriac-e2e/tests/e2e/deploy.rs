//! The deployment files in `deploy/`: the systemd units pass `systemd-analyze verify` without
//! a warning, and the supervisor config runs a worker and a beat that stop cleanly. (The
//! Dockerfile is not built here: the test machine has no Docker daemon, and no registry to
//! pull the base images from.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use celeriac_examples::add;

use crate::support::{T, client, sqlite_url};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn app_binary() -> &'static str {
    env!("CARGO_BIN_EXE_e2e-tasks")
}

#[test]
fn the_systemd_units_verify_without_a_warning() {
    if !celeriac_test::services::require_program("systemd-analyze") {
        return;
    }
    let dir = celeriac_test::services::test_dir().join(format!("systemd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for unit in ["my-app-worker.service", "my-app-beat.service"] {
        let text = std::fs::read_to_string(deploy_dir().join("systemd").join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/my-app "), "{unit}");
        // The real binary in place of the placeholder, which verify checks is executable.
        let path = dir.join(unit);
        std::fs::write(&path, text.replace("/usr/local/bin/my-app", app_binary())).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
    }
}

fn supervisorctl(conf: &Path, args: &[&str]) -> Output {
    Command::new(celeriac_test::python::venv_command("supervisorctl"))
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run supervisorctl")
}

fn status(conf: &Path) -> String {
    String::from_utf8_lossy(&supervisorctl(conf, &["status"]).stdout).into_owned()
}

/// Kills supervisord (and with it what it runs) when the test ends, passing or not.
struct Supervisord(std::process::Child);

impl Drop for Supervisord {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_config_runs_a_worker_and_a_beat_that_stop_cleanly() {
    if !celeriac_test::python::require_python() {
        return;
    }
    let (url, db) = sqlite_url("deploy-supervisor");
    let dir = PathBuf::from(format!("{}.supervisor", db.display()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("celeriac.toml");
    std::fs::write(&config, format!("broker_url = {url:?}\n")).unwrap();
    // The shipped programs, pointed at this test's binary, directory and files, run as the
    // current user (supervisord is not root here).
    let shipped = std::fs::read_to_string(deploy_dir().join("supervisor/my-app.conf")).unwrap();
    let programs: String = shipped
        .replace("/usr/local/bin/my-app", app_binary())
        .replace("/var/lib/my-app", &dir.display().to_string())
        .replace("/etc/my-app/celeriac.toml", &config.display().to_string())
        .replace("/var/log/my-app", &dir.display().to_string())
        .lines()
        .filter(|l| !l.starts_with("user="))
        .collect::<Vec<_>>()
        .join("\n");
    // supervisord binds `<file>.<pid>` before renaming it, and a Unix socket path is at most
    // 107 bytes: a deep checkout overflows it, so the socket lives in the temp directory.
    let sock = std::env::temp_dir().join(format!("celeriac-sv-{}.sock", std::process::id()));
    let conf = dir.join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "[unix_http_server]\nfile={sock}\n\n[supervisord]\nlogfile={log}\npidfile={pid}\n\
             childlogdir={dir}\n\n[rpcinterface:supervisor]\n\
             supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=unix://{sock}\n\n{programs}\n",
            sock = sock.display(),
            log = dir.join("supervisord.log").display(),
            pid = dir.join("supervisord.pid").display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    let _supervisord = Supervisord(
        Command::new(celeriac_test::python::venv_command("supervisord"))
            .arg("-n")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("supervisord.stderr")).unwrap())
            .spawn()
            .expect("start supervisord"),
    );
    let deadline = Instant::now() + T;
    loop {
        let s = status(&conf);
        if s.matches("RUNNING").count() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not both running:\n{s}\nsupervisord said:\n{}",
            std::fs::read_to_string(dir.join("supervisord.stderr")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let app = client(&url).await;
    let r = add::delay(&app, 40, 2).await.unwrap();
    assert_eq!(r.get_timeout(T).await.unwrap(), 42);

    // `supervisorctl stop` sends SIGTERM: a warm shutdown that exits 0 well before
    // stopwaitsecs, so supervisor never has to SIGKILL.
    let stopped = supervisorctl(&conf, &["stop", "my-app-worker", "my-app-beat"]);
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert!(
        said.contains("my-app-worker: stopped") && said.contains("my-app-beat: stopped"),
        "{said}"
    );
    let log = std::fs::read_to_string(dir.join("supervisord.log")).unwrap();
    for program in ["my-app-worker", "my-app-beat"] {
        assert!(
            log.contains(&format!("stopped: {program} (exit status 0)")),
            "{program} did not exit 0 on SIGTERM:\n{log}"
        );
    }
    let worker_log = std::fs::read_to_string(dir.join("worker.log")).unwrap();
    assert!(worker_log.contains("worker stopped"), "{worker_log}");
    let _ = supervisorctl(&conf, &["shutdown"]);
    let _ = std::fs::remove_file(&sock);
}
