//! The state a connection's reader task and its handles share: the connection's writer and
//! channel table ([`Shared`]), and each channel's pending reply, consumers, half-assembled
//! message and publisher confirms ([`ChanShared`]). The reader ([`super::conn`]) fills it in
//! as frames arrive; [`Channel`](super::Channel) methods wait on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::WireError;
use super::channel::Delivery;
use super::codec::{self, DecodedProperties, FRAME_METHOD, Method};

/// How long the handshake and each synchronous method may take.
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection's socket: plain TCP or TLS.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// The socket's write half, shared by all writers under [`Shared::writer`]'s lock.
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
}

/// Publisher confirms waiting for the broker, by sequence number.
#[derive(Default)]
pub(super) struct Confirms {
    pub(super) next: u64,
    pub(super) pending: BTreeMap<u64, oneshot::Sender<bool>>,
}

impl Confirms {
    pub(super) fn settle(&mut self, tag: u64, multiple: bool, ok: bool) {
        if multiple {
            let rest = self.pending.split_off(&(tag + 1));
            for (_, tx) in std::mem::replace(&mut self.pending, rest) {
                let _ = tx.send(ok);
            }
        } else if let Some(tx) = self.pending.remove(&tag) {
            let _ = tx.send(ok);
        }
    }
}

/// One channel's shared state.
pub(super) struct ChanShared {
    pub(super) id: u16,
    pub(super) state: Mutex<ChanState>,
    /// One synchronous method in flight per channel.
    pub(super) rpc: tokio::sync::Mutex<()>,
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
    }
}

/// One connection's shared state.
pub(super) struct Shared {
    pub(super) writer: tokio::sync::Mutex<Writer>,
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
    }

    pub(super) async fn write(&self, bytes: &[u8]) -> Result<(), WireError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let mut w = self.writer.lock().await;
        let r = async {
            w.write_all(bytes).await?;
            w.flush().await
        }
        .await;
        if let Err(e) = r {
            let err = WireError::from(e);
            drop(w);
            self.shut(err.clone());
            return Err(err);
        }
        Ok(())
    }

    pub(super) async fn send_method(&self, channel: u16, payload: &[u8]) -> Result<(), WireError> {
        let mut out = Vec::with_capacity(payload.len() + 8);
        codec::encode_frame(&mut out, FRAME_METHOD, channel, payload);
        self.write(&out).await
    }
}
