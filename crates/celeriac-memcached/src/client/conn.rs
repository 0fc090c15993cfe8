//! One pipelined TCP connection to one memcached server.
//!
//! memcached answers a connection's requests in the order they came, so any number of callers
//! can share one connection: each request is written at once, and the reply that comes back
//! next belongs to the oldest request still waiting. Two tasks keep the connection: the writer
//! takes requests from a channel, hands each one's reply slot to the reader (in order,
//! before the bytes go out) and writes them, several per `write` when they queue up; the
//! reader parses replies from what it reads and fills the slots. Neither ever selects between
//! reading and writing, so a large value in each direction cannot deadlock, and no parse is
//! ever cancelled halfway.
//!
//! When the reader fails (the server closed the connection, a read error, a reply that is not
//! memcached's) every waiting slot gets the reason and the connection is marked dead; the
//! [`Server`] then opens a new one for the next request. Dropping the last handle of a
//! connection stops both tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use celeriac_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use super::proto::{self, Expect, Garbled, Reply};

/// Why a request got no reply: the connection was lost, for this reason.
pub(crate) type Lost = String;

/// A request's reply slot.
type Slot = oneshot::Sender<std::result::Result<Reply, Lost>>;

struct Job {
    bytes: Vec<u8>,
    expect: Expect,
    reply: Slot,
}

/// A live connection; dropping the last handle stops its tasks.
pub(crate) struct Conn {
    jobs: mpsc::UnboundedSender<Job>,
    dead: Arc<AtomicBool>,
    tasks: [AbortHandle; 2],
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Conn {
    fn start(stream: TcpStream) -> Conn {
        let (read, write) = stream.into_split();
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        let dead = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(run_writer(write, jobs_rx, pending_tx, dead.clone()));
        let reader = tokio::spawn(run_reader(read, pending_rx, dead.clone()));
        Conn {
            jobs,
            dead,
            tasks: [writer.abort_handle(), reader.abort_handle()],
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire) || self.jobs.is_closed()
    }

    /// Queues a request; its reply (or why none will come) arrives on the receiver.
    pub(crate) fn send(
        &self,
        bytes: Vec<u8>,
        expect: Expect,
    ) -> oneshot::Receiver<std::result::Result<Reply, Lost>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job {
            bytes,
            expect,
            reply: tx,
        }) {
            self.dead.store(true, Ordering::Release);
            let _ = job.reply.send(Err("the connection is closed".to_owned()));
        }
        rx
    }
}

async fn run_writer(
    mut write: OwnedWriteHalf,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    pending: mpsc::UnboundedSender<(Expect, Slot)>,
    dead: Arc<AtomicBool>,
) {
    let mut out = Vec::new();
    while let Some(first) = jobs.recv().await {
        let mut next = Some(first);
        while let Some(job) = next {
            out.extend_from_slice(&job.bytes);
            if let Err(mpsc::error::SendError((_, reply))) = pending.send((job.expect, job.reply)) {
                let _ = reply.send(Err("the connection is closed".to_owned()));
                dead.store(true, Ordering::Release);
                return;
            }
            // Bounded batches, so a burst of large values does not pile up here.
            next = if out.len() < 256 * 1024 {
                jobs.try_recv().ok()
            } else {
                None
            };
        }
        if write.write_all(&out).await.is_err() {
            // The reader sees the broken connection too and fails what waits.
            dead.store(true, Ordering::Release);
            return;
        }
        out.clear();
    }
}

async fn run_reader(
    mut read: OwnedReadHalf,
    mut pending: mpsc::UnboundedReceiver<(Expect, Slot)>,
    dead: Arc<AtomicBool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    while let Some((expect, reply)) = pending.recv().await {
        let mut reply = Some(reply);
        let why = loop {
            match proto::parse(&buf, expect) {
                Ok(Some((r, used))) => {
                    buf.drain(..used);
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(r));
                    }
                    break None;
                }
                Ok(None) => {
                    if buf.capacity() - buf.len() < 8 * 1024 {
                        buf.reserve(64 * 1024);
                    }
                    match read.read_buf(&mut buf).await {
                        Ok(0) => break Some("the server closed the connection".to_owned()),
                        Ok(_) => {}
                        Err(e) => break Some(format!("read error: {e}")),
                    }
                }
                Err(Garbled(text)) => {
                    break Some(format!("a reply that is not memcached's: {text:?}"));
                }
            }
        };
        if let Some(why) = why {
            dead.store(true, Ordering::Release);
            if let Some(reply) = reply.take() {
                let _ = reply.send(Err(why.clone()));
            }
            pending.close();
            while let Ok((_, r)) = pending.try_recv() {
                let _ = r.send(Err(why.clone()));
            }
            return;
        }
    }
}

/// One memcached server: its address, its current connection (opened on first use and again
/// after it is lost), and what we know of the process behind it.
pub(crate) struct Server {
    pub(crate) addr: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// `(pid, start time)` of the server process last seen, from `stats`.
    boot: std::sync::Mutex<Option<(String, i64)>>,
    restarts: AtomicU64,
    /// When a restart was last noticed.
    last_restart: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("restarts", &self.restarts())
            .finish_non_exhaustive()
    }
}

impl Server {
    pub(crate) fn new(addr: String) -> Server {
        Server {
            addr,
            conn: tokio::sync::Mutex::new(None),
            boot: std::sync::Mutex::new(None),
            restarts: AtomicU64::new(0),
            last_restart: std::sync::Mutex::new(None),
        }
    }

    /// How many times the server process was found replaced (restarted) on a reconnect.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Acquire)
    }

    /// When a restart was last noticed, if ever.
    pub(crate) fn last_restart(&self) -> Option<std::time::Instant> {
        *self.last_restart.lock().expect("restart lock")
    }

    /// The live connection, or a new one; `true` with a connection opened by this call.
    pub(crate) async fn connection(
        &self,
        connect_timeout: Duration,
        op_timeout: Duration,
    ) -> Result<(Arc<Conn>, bool)> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_dead() {
                return Ok((c.clone(), false));
            }
        }
        *slot = None;
        let stream =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(&self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        format!("cannot connect to memcached at {}", self.addr),
                    )
                    .transient()
                    .with_source(e));
                }
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        format!(
                            "cannot connect to memcached at {} within {:.1}s",
                            self.addr,
                            connect_timeout.as_secs_f64()
                        ),
                    )
                    .transient());
                }
            };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::start(stream));
        // Which process is this? A different one than last time means everything the old one
        // held is gone (memcached keeps nothing across a restart).
        let rx = conn.send(proto::line(&["stats"]), Expect::Stats);
        match tokio::time::timeout(op_timeout, rx).await {
            Ok(Ok(Ok(Reply::Stats(stats)))) => self.note_boot(&stats),
            Ok(Ok(Ok(other))) => {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "{} does not answer `stats` as memcached does: {other:?}",
                        self.addr
                    ),
                ));
            }
            Ok(Ok(Err(why))) => {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "lost the new connection to memcached at {}: {why}",
                        self.addr
                    ),
                )
                .transient());
            }
            Ok(Err(_)) => {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!("lost the new connection to memcached at {}", self.addr),
                )
                .transient());
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "memcached at {} did not answer `stats` within {:.1}s",
                        self.addr,
                        op_timeout.as_secs_f64()
                    ),
                )
                .transient());
            }
        }
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    /// Forgets `conn` if it is still the current connection (it failed or timed out).
    pub(crate) async fn discard(&self, conn: &Arc<Conn>) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
    }

    fn note_boot(&self, stats: &[(String, String)]) {
        let stat = |name: &str| {
            stats
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let pid = stat("pid").unwrap_or("?").to_owned();
        let started = match (
            stat("time").and_then(|t| t.parse::<i64>().ok()),
            stat("uptime").and_then(|u| u.parse::<i64>().ok()),
        ) {
            (Some(t), Some(u)) => t - u,
            _ => 0,
        };
        let mut boot = self.boot.lock().expect("boot lock");
        if let Some((old_pid, old_started)) = boot.as_ref() {
            if *old_pid != pid || (old_started - started).abs() > 1 {
                *self.last_restart.lock().expect("restart lock") = Some(std::time::Instant::now());
                self.restarts.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(
                    server = %self.addr,
                    pid = %pid,
                    "memcached at {} was restarted (or replaced) since the last connection: \
                     every result, group and chord counter it held is gone",
                    self.addr
                );
            }
        }
        *boot = Some((pid, started));
    }
}
