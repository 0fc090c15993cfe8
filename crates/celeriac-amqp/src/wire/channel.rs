//! Channels: synchronous methods, consumers, publishing with confirms.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::WireError;
use super::codec::{
    self, Enc, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, FieldTable, Method, Properties,
};
use super::shared::{ChanShared, ChanState, Confirms, RPC_TIMEOUT, Reply, Shared};

/// A message received by `basic.deliver` or `basic.get`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// The channel's delivery tag, for ack/reject.
    pub delivery_tag: u64,
    /// Whether RabbitMQ delivered it before.
    pub redelivered: bool,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties (without the parts that could not be decoded).
    pub properties: Properties,
    /// Why part of its properties (usually the headers table) could not be decoded and was
    /// skipped; such a delivery should be rejected without requeue.
    pub malformed: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// Options of `queue.declare`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct QueueDeclare {
    /// Only check that it exists (404 closes the channel otherwise).
    pub passive: bool,
    /// Survives a broker restart.
    pub durable: bool,
    /// Owned by this connection.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// `x-...` arguments.
    pub arguments: FieldTable,
}

/// An open channel. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    conn: Arc<Shared>,
    chan: Arc<ChanShared>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.chan.id)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Channel {
    /// Opens `chan`, just added to `conn`'s channel table (`channel.open`).
    pub(super) async fn open(
        conn: Arc<Shared>,
        chan: Arc<ChanShared>,
    ) -> Result<Channel, WireError> {
        let ch = Channel { conn, chan };
        let mut e = Enc::method(20, 10);
        e.shortstr("")?;
        ch.call(e.buf).await?;
        Ok(ch)
    }

    /// The channel id.
    pub fn id(&self) -> u16 {
        self.chan.id
    }

    /// Whether the channel (and its connection) is open.
    pub fn is_open(&self) -> bool {
        self.closed_error().is_none()
    }

    fn closed_error(&self) -> Option<WireError> {
        self.chan
            .state
            .lock()
            .expect("channel lock")
            .closed
            .clone()
            .or_else(|| self.conn.closed_error())
    }

    /// Sends a synchronous method and waits for its reply (or the channel's close).
    async fn call(&self, payload: Vec<u8>) -> Reply {
        let _one = self.chan.rpc.lock().await;
        self.call_locked(payload).await
    }

    /// [`call`](Self::call) with the channel's rpc lock already held.
    async fn call_locked(&self, payload: Vec<u8>) -> Reply {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.chan.state.lock().expect("channel lock");
            if let Some(e) = s.closed.clone() {
                return Err(e);
            }
            s.reply = Some(tx);
        }
        self.conn.send_method(self.chan.id, &payload).await?;
        match tokio::time::timeout(RPC_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.closed_error().unwrap_or(WireError::ClosedByClient)),
            Err(_) => Err(WireError::Io(format!(
                "rabbitmq did not answer within {RPC_TIMEOUT:?}"
            ))),
        }
    }

    /// `exchange.declare` (not passive, not auto-delete, not internal).
    pub async fn exchange_declare(
        &self,
        name: &str,
        kind: &str,
        durable: bool,
    ) -> Result<(), WireError> {
        let mut e = Enc::method(40, 10);
        e.u16(0).shortstr(name)?.shortstr(kind)?;
        e.bit(false).bit(durable).bit(false).bit(false).bit(false);
        e.table(&FieldTable::new())?;
        self.call(e.buf).await.map(|_| ())
    }

    /// `queue.declare`: (queue name, ready messages, consumers).
    pub async fn queue_declare(
        &self,
        name: &str,
        o: &QueueDeclare,
    ) -> Result<(String, u32, u32), WireError> {
        let mut e = Enc::method(50, 10);
        e.u16(0).shortstr(name)?;
        e.bit(o.passive)
            .bit(o.durable)
            .bit(o.exclusive)
            .bit(o.auto_delete)
            .bit(false);
        e.table(&o.arguments)?;
        match self.call(e.buf).await? {
            (
                Method::QueueDeclareOk {
                    queue,
                    messages,
                    consumers,
                },
                _,
            ) => Ok((queue, messages, consumers)),
            (m, _) => Err(unexpected("queue.declare-ok", &m)),
        }
    }

    /// `queue.bind` with no arguments.
    pub async fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), WireError> {
        let mut e = Enc::method(50, 20);
        e.u16(0)
            .shortstr(queue)?
            .shortstr(exchange)?
            .shortstr(key)?;
        e.bit(false);
        e.table(&FieldTable::new())?;
        self.call(e.buf).await.map(|_| ())
    }

    /// `queue.purge`: how many messages were dropped.
    pub async fn queue_purge(&self, queue: &str) -> Result<u32, WireError> {
        let mut e = Enc::method(50, 30);
        e.u16(0).shortstr(queue)?;
        e.bit(false);
        match self.call(e.buf).await? {
            (Method::QueuePurgeOk { messages }, _) => Ok(messages),
            (m, _) => Err(unexpected("queue.purge-ok", &m)),
        }
    }

    /// `queue.delete` (unconditional): how many messages went with it.
    pub async fn queue_delete(&self, queue: &str) -> Result<u32, WireError> {
        let mut e = Enc::method(50, 40);
        e.u16(0).shortstr(queue)?;
        e.bit(false).bit(false).bit(false);
        match self.call(e.buf).await? {
            (Method::QueueDeleteOk { messages }, _) => Ok(messages),
            (m, _) => Err(unexpected("queue.delete-ok", &m)),
        }
    }

    /// `exchange.delete` (unconditional).
    pub async fn exchange_delete(&self, name: &str) -> Result<(), WireError> {
        let mut e = Enc::method(40, 20);
        e.u16(0).shortstr(name)?;
        e.bit(false).bit(false);
        self.call(e.buf).await.map(|_| ())
    }

    /// `basic.qos` with a message count (`global`: per channel rather than per consumer).
    pub async fn basic_qos(&self, prefetch: u16, global: bool) -> Result<(), WireError> {
        let mut e = Enc::method(60, 10);
        e.u32(0).u16(prefetch);
        e.bit(global);
        self.call(e.buf).await.map(|_| ())
    }

    /// `basic.consume`: the consumer tag and its deliveries. The receiver ends when the
    /// consumer is cancelled (by us or by the server, e.g. its queue was deleted) or the
    /// channel closes.
    pub async fn basic_consume(
        &self,
        queue: &str,
        no_ack: bool,
    ) -> Result<(String, mpsc::UnboundedReceiver<Delivery>), WireError> {
        let n = self.conn.consumer_seq.fetch_add(1, Ordering::Relaxed);
        let tag = format!("celeriac-{}-{n}", self.chan.id);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut s = self.chan.state.lock().expect("channel lock");
            s.consumers.insert(tag.clone(), tx);
            if !no_ack {
                s.acks.manual.insert(tag.clone());
            }
        }
        let mut e = Enc::method(60, 20);
        e.u16(0).shortstr(queue)?.shortstr(&tag)?;
        e.bit(false).bit(no_ack).bit(false).bit(false);
        e.table(&FieldTable::new())?;
        if let Err(err) = self.call(e.buf).await {
            let mut s = self.chan.state.lock().expect("channel lock");
            s.consumers.remove(&tag);
            s.acks.manual.remove(&tag);
            return Err(err);
        }
        Ok((tag, rx))
    }

    /// `basic.cancel`.
    pub async fn basic_cancel(&self, consumer_tag: &str) -> Result<(), WireError> {
        let mut e = Enc::method(60, 30);
        e.shortstr(consumer_tag)?;
        e.bit(false);
        self.call(e.buf).await?;
        let mut s = self.chan.state.lock().expect("channel lock");
        s.consumers.remove(consumer_tag);
        s.acks.manual.remove(consumer_tag);
        Ok(())
    }

    /// `basic.get`: one message, or `None` when the queue is empty.
    pub async fn basic_get(
        &self,
        queue: &str,
        no_ack: bool,
    ) -> Result<Option<Delivery>, WireError> {
        let mut e = Enc::method(60, 70);
        e.u16(0).shortstr(queue)?;
        e.bit(no_ack);
        // The rpc lock is taken inside `call`; the flag is read by the reader on get-ok.
        let _one = self.chan.rpc.lock().await;
        self.chan
            .state
            .lock()
            .expect("channel lock")
            .acks
            .get_manual = !no_ack;
        let r = self.call_locked(e.buf).await;
        self.chan
            .state
            .lock()
            .expect("channel lock")
            .acks
            .get_manual = false;
        Ok(r?.1)
    }

    /// `basic.ack`, sent now (queued behind the frames already queued).
    pub async fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), WireError> {
        let mut e = Enc::method(60, 80);
        e.u64(delivery_tag).bit(multiple);
        self.settle(delivery_tag, multiple, &e.buf).await
    }

    /// `basic.nack`.
    pub async fn basic_nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), WireError> {
        let mut e = Enc::method(60, 120);
        e.u64(delivery_tag).bit(multiple).bit(requeue);
        self.settle(delivery_tag, multiple, &e.buf).await
    }

    /// `basic.reject`. Never covered by a multiple ack of [`ack_batched`](Self::ack_batched):
    /// the delivery leaves the unsettled set in the same step that queues this frame.
    pub async fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), WireError> {
        let mut e = Enc::method(60, 90);
        e.u64(delivery_tag).bit(requeue);
        self.settle(delivery_tag, false, &e.buf).await
    }

    /// Queues a settling frame for `tag` and forgets the tag, under the channel's lock, so a
    /// flush of held acks never computes a multiple ack that covers it before this frame.
    async fn settle(&self, tag: u64, multiple: bool, payload: &[u8]) -> Result<(), WireError> {
        let full = {
            let mut s = self.chan.state.lock().expect("channel lock");
            if let Some(e) = s.closed.clone().or_else(|| self.conn.closed_error()) {
                return Err(e);
            }
            s.acks.forget(tag, multiple);
            self.conn.queue(|out| {
                codec::encode_frame(out, FRAME_METHOD, self.chan.id, payload);
            })
        };
        if full {
            self.conn.wait_drained().await;
        }
        Ok(())
    }

    /// Holds back acks of this channel's deliveries to send them together: a held ack goes
    /// out at the latest `max_delay` after it was held, or at once when `max_held` acks are
    /// held, or on [`flush_acks`](Self::flush_acks) and [`close`](Self::close). Acks of a
    /// run of deliveries below the lowest one still unsettled go out as one `basic.ack` with
    /// `multiple` set; the others one by one. Until this is called,
    /// [`ack_batched`](Self::ack_batched) sends at once.
    pub fn batch_acks(&self, max_delay: Duration, max_held: usize) {
        let first = {
            let mut s = self.chan.state.lock().expect("channel lock");
            let first = s.acks.max_held == 0;
            s.acks.max_held = max_held.max(1);
            first
        };
        if first {
            tokio::spawn(ack_flusher(
                Arc::downgrade(&self.conn),
                self.chan.clone(),
                max_delay,
            ));
        }
    }

    /// Acks a delivery, held back to go out with others when
    /// [`batch_acks`](Self::batch_acks) was called on this channel, else at once. Returns
    /// once the ack is held or queued: an ack lost with the connection before it went out
    /// leaves the delivery to be redelivered by RabbitMQ, as any unacked delivery is.
    pub fn ack_batched(&self, delivery_tag: u64) -> Result<(), WireError> {
        let mut s = self.chan.state.lock().expect("channel lock");
        if let Some(e) = s.closed.clone().or_else(|| self.conn.closed_error()) {
            return Err(e);
        }
        if s.acks.max_held == 0 || !s.acks.unsettled.remove(&delivery_tag) {
            // Not batching, or not a delivery we track: ack it now.
            s.acks.forget(delivery_tag, false);
            let mut e = Enc::method(60, 80);
            e.u64(delivery_tag).bit(false);
            self.conn.queue(|out| {
                codec::encode_frame(out, FRAME_METHOD, self.chan.id, &e.buf);
            });
            return Ok(());
        }
        s.acks.held.insert(delivery_tag);
        if s.acks.held.len() >= s.acks.max_held {
            self.flush_locked(&mut s);
        } else if s.acks.held.len() == 1 {
            drop(s);
            self.chan.ack_wake.notify_one();
        }
        Ok(())
    }

    /// Sends the held acks now.
    pub fn flush_acks(&self) {
        let mut s = self.chan.state.lock().expect("channel lock");
        if s.closed.is_none() {
            self.flush_locked(&mut s);
        }
    }

    fn flush_locked(&self, s: &mut ChanState) {
        flush_acks_of(&self.conn, self.chan.id, s);
    }

    /// `confirm.select`: from now on every publish is confirmed ([`Channel::publish`] returns
    /// a receiver of the broker's ack (`true`) or nack (`false`)). At most 1024 publishes of
    /// the channel wait for their confirm at once; a publish beyond that waits in
    /// [`Channel::publish`] until the oldest are confirmed.
    pub async fn confirm_select(&self) -> Result<(), WireError> {
        let mut e = Enc::method(85, 10);
        e.bit(false);
        self.call(e.buf).await?;
        let mut s = self.chan.state.lock().expect("channel lock");
        s.confirms.get_or_insert_with(Confirms::default);
        Ok(())
    }

    /// `basic.publish` (not mandatory): the method, header and body frames go out together.
    /// Returns once the frames are queued for the socket (the connection's writer task writes
    /// what many callers queued in one system call). On a confirming channel, returns the
    /// receiver of the confirm; it fails (sender dropped) when the channel or connection
    /// closes first, which is also how a failed write surfaces.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
        body: &[u8],
    ) -> Result<Option<oneshot::Receiver<bool>>, WireError> {
        let header = codec::encode_header(properties, body.len() as u64)?;
        self.publish_raw(exchange, routing_key, &header, body).await
    }

    /// Publishes with a content header payload given as is: for tests that need to send what
    /// a broken client would (an undecodable headers table).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        header: &[u8],
        body: &[u8],
    ) -> Result<Option<oneshot::Receiver<bool>>, WireError> {
        let mut m = Enc::method(60, 40);
        m.u16(0).shortstr(exchange)?.shortstr(routing_key)?;
        m.bit(false).bit(false);
        let mut out = Vec::with_capacity(body.len() + header.len() + m.buf.len() + 64);
        codec::encode_frame(&mut out, FRAME_METHOD, self.chan.id, &m.buf);
        codec::encode_frame(&mut out, FRAME_HEADER, self.chan.id, header);
        let chunk = (self.conn.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            codec::encode_frame(&mut out, FRAME_BODY, self.chan.id, part);
        }
        // A place in the confirm window first (waiting while it is full).
        let window = {
            let s = self.chan.state.lock().expect("channel lock");
            if let Some(e) = s.closed.clone() {
                return Err(e);
            }
            s.confirms.as_ref().map(|c| c.window.clone())
        };
        let permit = match window {
            Some(w) => Some(
                w.acquire_owned()
                    .await
                    .map_err(|_| WireError::ClosedByClient)?,
            ),
            None => None,
        };
        // The sequence number is taken in the same step that queues the frames, so numbers
        // follow wire order.
        let (rx, full) = {
            let mut s = self.chan.state.lock().expect("channel lock");
            if let Some(e) = s.closed.clone().or_else(|| self.conn.closed_error()) {
                return Err(e);
            }
            let rx = match (s.confirms.as_mut(), permit) {
                (Some(c), Some(permit)) => {
                    let (tx, rx) = oneshot::channel();
                    c.next += 1;
                    c.pending.insert(c.next, (tx, permit));
                    Some(rx)
                }
                _ => None,
            };
            let full = self.conn.queue(|q| q.extend_from_slice(&out));
            (rx, full)
        };
        if full {
            self.conn.wait_drained().await;
        }
        Ok(rx)
    }

    /// Closes the channel (`channel.close` 200), sending the held acks first.
    pub async fn close(&self) -> Result<(), WireError> {
        if !self.is_open() {
            return Ok(());
        }
        self.flush_acks();
        let mut e = Enc::method(20, 40);
        e.u16(200).shortstr("bye")?.u16(0).u16(0);
        let r = self.call(e.buf).await.map(|_| ());
        self.conn
            .channels
            .lock()
            .expect("channels lock")
            .remove(&self.chan.id);
        self.chan.fail(WireError::ClosedByClient);
        r
    }
}

/// Queues the frames of the held acks of channel `id` (see [`Acks`](super::shared::Acks)).
pub(super) fn flush_acks_of(conn: &Shared, id: u16, s: &mut ChanState) {
    let frames = s.acks.take_frames();
    if frames.is_empty() {
        return;
    }
    conn.queue(|out| {
        for (tag, multiple) in frames {
            let mut e = Enc::method(60, 80);
            e.u64(tag).bit(multiple);
            codec::encode_frame(out, FRAME_METHOD, id, &e.buf);
        }
    });
}

/// Sends a channel's held acks `max_delay` after the first of a batch was held; ends with the
/// channel.
async fn ack_flusher(conn: Weak<Shared>, chan: Arc<ChanShared>, max_delay: Duration) {
    loop {
        let wake = chan.ack_wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let idle = {
            let s = chan.state.lock().expect("channel lock");
            if s.closed.is_some() {
                return;
            }
            s.acks.held.is_empty()
        };
        if idle {
            wake.await;
            continue;
        }
        tokio::time::sleep(max_delay).await;
        let Some(conn) = conn.upgrade() else {
            return;
        };
        {
            let mut s = chan.state.lock().expect("channel lock");
            if s.closed.is_some() || conn.closed_error().is_some() {
                return;
            }
            flush_acks_of(&conn, chan.id, &mut s);
        }
    }
}

fn unexpected(want: &str, got: &Method) -> WireError {
    WireError::Protocol(format!("expected {want}, got {got:?}"))
}
