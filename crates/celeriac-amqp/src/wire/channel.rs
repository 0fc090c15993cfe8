//! Channels: synchronous methods, consumers, publishing with confirms.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::WireError;
use super::codec::{
    self, Enc, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, FieldTable, Method, Properties,
};
use super::shared::{ChanShared, Confirms, RPC_TIMEOUT, Reply, Shared};

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

    async fn send(&self, payload: &[u8]) -> Result<(), WireError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        self.conn.send_method(self.chan.id, payload).await
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
        self.chan
            .state
            .lock()
            .expect("channel lock")
            .consumers
            .insert(tag.clone(), tx);
        let mut e = Enc::method(60, 20);
        e.u16(0).shortstr(queue)?.shortstr(&tag)?;
        e.bit(false).bit(no_ack).bit(false).bit(false);
        e.table(&FieldTable::new())?;
        if let Err(err) = self.call(e.buf).await {
            self.chan
                .state
                .lock()
                .expect("channel lock")
                .consumers
                .remove(&tag);
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
        self.chan
            .state
            .lock()
            .expect("channel lock")
            .consumers
            .remove(consumer_tag);
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
        Ok(self.call(e.buf).await?.1)
    }

    /// `basic.ack`.
    pub async fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), WireError> {
        let mut e = Enc::method(60, 80);
        e.u64(delivery_tag).bit(multiple);
        self.send(&e.buf).await
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
        self.send(&e.buf).await
    }

    /// `basic.reject`.
    pub async fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), WireError> {
        let mut e = Enc::method(60, 90);
        e.u64(delivery_tag).bit(requeue);
        self.send(&e.buf).await
    }

    /// `confirm.select`: from now on every publish is confirmed ([`Channel::publish`] returns
    /// a receiver of the broker's ack (`true`) or nack (`false`)).
    pub async fn confirm_select(&self) -> Result<(), WireError> {
        let mut e = Enc::method(85, 10);
        e.bit(false);
        self.call(e.buf).await?;
        let mut s = self.chan.state.lock().expect("channel lock");
        s.confirms.get_or_insert_with(Confirms::default);
        Ok(())
    }

    /// `basic.publish` (not mandatory): the method, header and body frames go out together.
    /// On a confirming channel, returns the receiver of the confirm; it fails (sender dropped)
    /// when the channel or connection closes first.
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
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        // The sequence number is taken under the writer lock, so numbers follow wire order.
        let mut w = self.conn.writer.lock().await;
        let rx = {
            let mut s = self.chan.state.lock().expect("channel lock");
            if let Some(e) = s.closed.clone() {
                return Err(e);
            }
            s.confirms.as_mut().map(|c| {
                let (tx, rx) = oneshot::channel();
                c.next += 1;
                c.pending.insert(c.next, tx);
                rx
            })
        };
        let r = async {
            w.write_all(&out).await?;
            w.flush().await
        }
        .await;
        drop(w);
        if let Err(e) = r {
            let err = WireError::from(e);
            self.conn.shut(err.clone());
            return Err(err);
        }
        Ok(rx)
    }

    /// Closes the channel (`channel.close` 200).
    pub async fn close(&self) -> Result<(), WireError> {
        if !self.is_open() {
            return Ok(());
        }
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

fn unexpected(want: &str, got: &Method) -> WireError {
    WireError::Protocol(format!("expected {want}, got {got:?}"))
}
