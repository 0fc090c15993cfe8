//! The state a connection's reader task and its handles share: the connection's writer and
//! channel table ([`Shared`]), and each channel's pending reply, consumers, half-assembled
//! message and publisher confirms ([`ChanShared`]). The reader ([`super::conn`]) fills it in
//! as frames arrive; [`Channel`](super::Channel) methods wait on it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::WireError;
use super::channel::Delivery;
use super::codec::{self, DecodedProperties, FRAME_METHOD, Method};

/// How long the handshake and each synchronous method may take.
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection's socket: plain TCP or TLS.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// How many publishes a confirming channel keeps unconfirmed at once; a publish beyond it
/// waits for the oldest confirms.
pub(super) const CONFIRM_WINDOW: usize = 1024;

/// Above this many bytes queued for the socket, writers wait for the writer task to drain.
const OUTBOX_HIGH: usize = 4 << 20;

/// The socket's write half, owned by the writer task (and taken by `close` to shut it).
pub(super) type Writer = tokio::io::WriteHalf<Box<dyn Stream>>;

/// A content-bearing method waiting for its header and body.
pub(super) enum Pending {
    Deliver {
        consumer_tag: String,
        delivery: Delivery,
    },
    GetOk(Delivery),
    Return,
}

/// A message being put together from its method, header and body frames.
pub(super) struct Assembling {
    pub(super) what: Pending,
    pub(super) size: u64,
    pub(super) props: Option<DecodedProperties>,
    pub(super) body: Vec<u8>,
}

/// The reply to a synchronous method (with the message of a `basic.get-ok`).
pub(super) type Reply = Result<(Method, Option<Delivery>), WireError>;

/// What the reader and a channel's methods share, under [`ChanShared::state`]'s lock.
#[derive(Default)]
pub(super) struct ChanState {
    pub(super) closed: Option<WireError>,
    pub(super) reply: Option<oneshot::Sender<Reply>>,
    pub(super) consumers: HashMap<String, mpsc::UnboundedSender<Delivery>>,
    pub(super) assembling: Option<Assembling>,
    pub(super) confirms: Option<Confirms>,
    pub(super) acks: Acks,
}

/// Publisher confirms waiting for the broker, by sequence number, each holding a permit of
/// the channel's window.
pub(super) struct Confirms {
    pub(super) next: u64,
    pub(super) pending: BTreeMap<u64, (oneshot::Sender<bool>, OwnedSemaphorePermit)>,
    pub(super) window: Arc<Semaphore>,
}

impl Default for Confirms {
    fn default() -> Self {
        Confirms {
            next: 0,
            pending: BTreeMap::new(),
            window: Arc::new(Semaphore::new(CONFIRM_WINDOW)),
        }
    }
}

impl Confirms {
    pub(super) fn settle(&mut self, tag: u64, multiple: bool, ok: bool) {
        if multiple {
            let rest = self.pending.split_off(&(tag + 1));
            for (_, (tx, _permit)) in std::mem::replace(&mut self.pending, rest) {
                let _ = tx.send(ok);
            }
        } else if let Some((tx, _permit)) = self.pending.remove(&tag) {
            let _ = tx.send(ok);
        }
    }
}

/// The deliveries of a channel that wait for an ack from us, and the acks held back to go out
/// together (see [`Channel::ack_batched`](super::Channel::ack_batched)).
///
/// A `basic.ack` with `multiple` set acks *every* unacked delivery up to its tag, so one is
/// only sent for a tag below the lowest delivery still unsettled; acks above it go out one by
/// one. Every delivery to a manual-ack consumer (or a `basic.get` without no-ack) is entered
/// in `unsettled` by the reader before anyone sees it, and leaves it in the same critical
/// section that queues its ack, reject or nack frame, so a multiple ack never overtakes a
/// reject on the wire.
#[derive(Default)]
pub(super) struct Acks {
    /// Delivered to us and neither acked, rejected nor nacked.
    pub(super) unsettled: BTreeSet<u64>,
    /// Acked by the caller, frame not sent yet.
    pub(super) held: BTreeSet<u64>,
    /// Consumer tags consuming with manual acks.
    pub(super) manual: HashSet<String>,
    /// Whether the `basic.get` in flight acks manually.
    pub(super) get_manual: bool,
    /// How many held acks trigger a flush at once.
    pub(super) max_held: usize,
}

impl Acks {
    /// The ack frames for the held acks: one `multiple` ack for those below the lowest
    /// unsettled delivery, one single ack for each of the rest.
    pub(super) fn take_frames(&mut self) -> Vec<(u64, bool)> {
        let low = self.unsettled.first().copied().unwrap_or(u64::MAX);
        let above = self.held.split_off(&low);
        let below = std::mem::take(&mut self.held);
        let mut frames = Vec::with_capacity(1 + above.len());
        match below.len() {
            0 => {}
            1 => frames.push((*below.first().expect("one"), false)),
            _ => frames.push((*below.last().expect("some"), true)),
        }
        frames.extend(above.into_iter().map(|t| (t, false)));
        frames
    }

    /// Forgets `tag` (and with `multiple` every tag up to it) once its ack, reject or nack is
    /// queued.
    pub(super) fn forget(&mut self, tag: u64, multiple: bool) {
        if multiple {
            self.unsettled = self.unsettled.split_off(&(tag + 1));
            self.held = self.held.split_off(&(tag + 1));
        } else {
            self.unsettled.remove(&tag);
            self.held.remove(&tag);
        }
    }
}

/// One channel's shared state.
pub(super) struct ChanShared {
    pub(super) id: u16,
    pub(super) state: Mutex<ChanState>,
    /// One synchronous method in flight per channel.
    pub(super) rpc: tokio::sync::Mutex<()>,
    /// Wakes the channel's ack flusher (a first ack held, or the channel closed).
    pub(super) ack_wake: Notify,
}

impl ChanShared {
    /// Marks the channel closed: fails the pending reply and confirms, ends the consumers.
    pub(super) fn fail(&self, err: WireError) {
        let mut s = self.state.lock().expect("channel lock");
        if s.closed.is_none() {
            s.closed = Some(err.clone());
        }
        if let Some(tx) = s.reply.take() {
            let _ = tx.send(Err(err));
        }
        s.consumers.clear();
        s.assembling = None;
        if let Some(c) = &mut s.confirms {
            c.pending.clear();
        }
        // Held acks die with the channel: RabbitMQ requeues those deliveries.
        s.acks = Acks::default();
        drop(s);
        self.ack_wake.notify_one();
    }
}

/// One connection's shared state.
pub(super) struct Shared {
    pub(super) writer: tokio::sync::Mutex<Writer>,
    /// Frames queued for the writer task, which writes all that are queued in one go: frames
    /// of many callers (publishes, acks, confirms' methods) share one system call.
    pub(super) outbox: Mutex<Vec<u8>>,
    /// Wakes the writer task.
    pub(super) wake: Notify,
    /// Wakes writers waiting for a full outbox to drain.
    pub(super) drained: Notify,
    pub(super) channels: Mutex<HashMap<u16, Arc<ChanShared>>>,
    pub(super) next_channel: Mutex<u16>,
    pub(super) channel_max: u16,
    pub(super) frame_max: u32,
    /// `Some(reason)` once the connection is closed.
    pub(super) closed: watch::Sender<Option<WireError>>,
    pub(super) consumer_seq: AtomicU64,
}

impl Shared {
    pub(super) fn closed_error(&self) -> Option<WireError> {
        self.closed.borrow().clone()
    }

    pub(super) fn shut(&self, err: WireError) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(err.clone());
                true
            } else {
                false
            }
        });
        let chans: Vec<_> = self
            .channels
            .lock()
            .expect("channels lock")
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in chans {
            c.fail(err.clone());
        }
        self.drained.notify_waiters();
    }

    /// Queues `bytes` for the writer task. A write error surfaces as the connection's close
    /// (failing every pending call and confirm), not here.
    pub(super) async fn write(&self, bytes: &[u8]) -> Result<(), WireError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let full = self.queue(|out| out.extend_from_slice(bytes));
        if full {
            self.wait_drained().await;
        }
        Ok(())
    }

    /// Appends to the outbox with `f` and wakes the writer; `true` when the outbox is above
    /// its high mark (the caller should [`wait_drained`](Self::wait_drained)).
    pub(super) fn queue(&self, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut out = self.outbox.lock().expect("outbox lock");
        f(&mut out);
        let full = out.len() > OUTBOX_HIGH;
        drop(out);
        self.wake.notify_one();
        full
    }

    /// Waits until the outbox is below its high mark or the connection closed.
    pub(super) async fn wait_drained(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.outbox.lock().expect("outbox lock").len() <= OUTBOX_HIGH
                || self.closed_error().is_some()
            {
                return;
            }
            drained.await;
        }
    }

    pub(super) async fn send_method(&self, channel: u16, payload: &[u8]) -> Result<(), WireError> {
        let mut out = Vec::with_capacity(payload.len() + 8);
        codec::encode_frame(&mut out, FRAME_METHOD, channel, payload);
        self.write(&out).await
    }
}

/// The writer task: writes whatever is queued in the outbox, all of it at once, until the
/// connection closes. A write error closes the connection.
pub(super) async fn write_loop(shared: Arc<Shared>) {
    let mut closed = shared.closed.subscribe();
    let mut batch = Vec::new();
    loop {
        let closing = tokio::select! {
            () = shared.wake.notified() => false,
            _ = closed.wait_for(Option::is_some) => true,
        };
        if closing {
            // What was queued before the close (a `close-ok` answering the server's
            // `connection.close`, say) still goes out if the socket takes it at once.
            let rest = std::mem::take(&mut *shared.outbox.lock().expect("outbox lock"));
            if !rest.is_empty() {
                let mut w = shared.writer.lock().await;
                let _ = tokio::time::timeout(Duration::from_millis(100), async {
                    w.write_all(&rest).await?;
                    w.flush().await
                })
                .await;
            }
            return;
        }
        loop {
            std::mem::swap(&mut *shared.outbox.lock().expect("outbox lock"), &mut batch);
            if batch.is_empty() {
                break;
            }
            shared.drained.notify_waiters();
            let r = {
                let mut w = shared.writer.lock().await;
                match w.write_all(&batch).await {
                    Ok(()) => w.flush().await,
                    Err(e) => Err(e),
                }
            };
            batch.clear();
            if batch.capacity() > OUTBOX_HIGH {
                batch = Vec::new();
            }
            if let Err(e) = r {
                shared.shut(WireError::from(e));
                shared.drained.notify_waiters();
                return;
            }
        }
    }
}
