//! `result <group-id>`: a group (or a chord's header group) read or waited on from the command
//! line, with a progress bar.
//!
//! The bar goes to stderr: on a terminal one line redrawn with `\r`, otherwise (a pipe, a log
//! file) a plain `progress: done/total` line each time the count moves, so logs stay
//! readable. The members' outcomes go to stdout, one `<id> <STATE>` line each, then a summary;
//! the exit code is 2 when a member failed, as for a single task.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::App;
use crate::canvas::{GroupResult, Progress};

/// When `id` names a saved group, shows it (waiting for every member with `wait`, at most
/// `timeout`) and returns the exit code; `None` when no group has that id.
pub(crate) async fn group_result(
    app: &App,
    id: &str,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<Option<ExitCode>> {
    let Some(group) = GroupResult::<Value>::restore(app, id).await? else {
        return Ok(None);
    };
    let mut p = group.progress().await?;
    if wait {
        let started = Instant::now();
        let mut bar = Bar::new(std::io::stderr().is_terminal());
        let mut interval = Duration::from_millis(50);
        loop {
            bar.draw(p);
            if p.done() == p.total {
                break;
            }
            if let Some(t) = timeout {
                if started.elapsed() >= t {
                    bar.finish();
                    bail!(
                        "group {id} not ready after {:.3}s ({} of {} done)",
                        t.as_secs_f64(),
                        p.done(),
                        p.total
                    );
                }
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(500));
            p = group.progress().await?;
        }
        bar.finish();
    }
    let mut out = std::io::stdout().lock();
    for r in group.results() {
        writeln!(out, "{} {}", r.id(), r.state().await?)?;
    }
    writeln!(
        out,
        "group {id}: {} succeeded, {} failed, {} pending, of {}",
        p.succeeded,
        p.failed,
        p.total - p.done(),
        p.total
    )?;
    Ok(Some(if p.failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }))
}

/// The progress display: a redrawn bar on a terminal, plain lines elsewhere.
#[derive(Debug)]
struct Bar {
    tty: bool,
    last: Option<usize>,
}

impl Bar {
    fn new(tty: bool) -> Self {
        Bar { tty, last: None }
    }

    fn draw(&mut self, p: Progress) {
        if self.last == Some(p.done()) {
            return;
        }
        self.last = Some(p.done());
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{}", line(p)).and_then(|()| err.flush())
        } else {
            writeln!(err, "{}", line(p))
        };
    }

    fn finish(&self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}

/// `progress: [#####     ] 5/10 (1 failed)`.
fn line(p: Progress) -> String {
    const WIDTH: usize = 20;
    let filled = (p.done() * WIDTH)
        .checked_div(p.total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let failed = if p.failed > 0 {
        format!(" ({} failed)", p.failed)
    } else {
        String::new()
    };
    format!(
        "progress: [{}{}] {}/{}{failed}",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        p.done(),
        p.total
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_done_members() {
        let p = |succeeded, failed, total| Progress {
            succeeded,
            failed,
            total,
        };
        assert_eq!(
            line(p(0, 0, 4)),
            format!("progress: [{}] 0/4", " ".repeat(20))
        );
        assert_eq!(
            line(p(1, 1, 4)),
            format!(
                "progress: [{}{}] 2/4 (1 failed)",
                "#".repeat(10),
                " ".repeat(10)
            )
        );
        assert_eq!(
            line(p(0, 0, 0)),
            format!("progress: [{}] 0/0", "#".repeat(20))
        );
    }
}
