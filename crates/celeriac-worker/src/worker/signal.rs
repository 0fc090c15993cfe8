//! SIGINT/SIGTERM handling for [`Worker::run_until_signal`](crate::Worker::run_until_signal).

use crate::shutdown::ShutdownHandle;

/// First signal: warm shutdown; second: cold. Logs both.
pub(super) async fn listen(handle: ShutdownHandle) {
    // Listeners are installed once, before the first signal, so a quick second one is not
    // missed.
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for shutdown signals");
            return;
        }
    };
    signals.next().await;
    tracing::warn!("signal received: warm shutdown (finishing running tasks; again for cold)");
    handle.warm();
    signals.next().await;
    tracing::warn!("second signal received: cold shutdown (cancelling running tasks)");
    handle.cold();
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn next(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
