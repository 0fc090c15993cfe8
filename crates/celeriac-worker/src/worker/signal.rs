//! SIGINT/SIGTERM handling for [`Worker::run_until_signal`](crate::Worker::run_until_signal).

use crate::pool::PoolHandle;
use crate::shutdown::ShutdownHandle;

/// SIGTTIN grows the pool by one, SIGTTOU shrinks it by one (Celery's prefork signals). The
/// listeners are installed now; the future serves them. `None` where there are no such
/// signals, or they cannot be listened to (logged).
#[cfg(unix)]
pub(super) fn resizer(pool: PoolHandle) -> Option<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    // SIGTTIN and SIGTTOU are 21 and 22 on Linux and the BSDs.
    let listen = || -> std::io::Result<_> {
        Ok((
            signal(SignalKind::from_raw(21))?,
            signal(SignalKind::from_raw(22))?,
        ))
    };
    let (mut grow, mut shrink) = match listen() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTTIN/SIGTTOU (pool grow/shrink)");
            return None;
        }
    };
    Some(async move {
        loop {
            tokio::select! {
                _ = grow.recv() => {
                    let size = pool.grow(1);
                    tracing::warn!(size, "SIGTTIN: pool grown by one");
                }
                _ = shrink.recv() => {
                    let size = pool.shrink(1);
                    tracing::warn!(size, "SIGTTOU: pool shrunk by one");
                }
            }
        }
    })
}

#[cfg(not(unix))]
pub(super) fn resizer(_pool: PoolHandle) -> Option<std::future::Ready<()>> {
    None
}

/// First signal: warm shutdown; second: cold. Logs both.
pub(super) async fn listen(handle: ShutdownHandle, signals: std::io::Result<Signals>) {
    // Listeners are installed once, before the first signal, so a quick second one is not
    // missed.
    let mut signals = match signals {
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
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    pub(super) fn new() -> std::io::Result<Self> {
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
pub(super) struct Signals;

#[cfg(not(unix))]
impl Signals {
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn next(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
