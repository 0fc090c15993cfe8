//! The memory broker's broadcast channels: remote control and events between the handles of
//! one process (clones of one [`MemoryBroker`](super::MemoryBroker)).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{broadcast, mpsc};

use crate::broadcast::{Broadcast, Broadcasted, Inbox, topic_matches};
use crate::broker::BoxFuture;
use crate::error::{Error, Result};

/// How many messages a slow listener may lag behind before it misses some (as a Redis
/// subscriber that cannot keep up loses messages).
const CAPACITY: usize = 1024;

/// Control requests, reply queues and events of one memory broker.
#[derive(Debug)]
pub(crate) struct Bus {
    control: broadcast::Sender<Broadcasted>,
    events: broadcast::Sender<Broadcasted>,
    replies: Mutex<HashMap<String, mpsc::UnboundedSender<Broadcasted>>>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            control: broadcast::channel(CAPACITY).0,
            events: broadcast::channel(CAPACITY).0,
            replies: Mutex::new(HashMap::new()),
        }
    }
}

#[derive(Debug)]
struct Listener {
    rx: broadcast::Receiver<Broadcasted>,
    binding: Option<String>,
}

impl Inbox for Listener {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(async move {
            loop {
                match self.rx.recv().await {
                    Ok(m) => {
                        if self
                            .binding
                            .as_deref()
                            .is_none_or(|b| topic_matches(b, &m.routing_key))
                        {
                            return Ok(Some(m));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "a memory broadcast listener fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                }
            }
        })
    }
}

#[derive(Debug)]
struct Replies(mpsc::UnboundedReceiver<Broadcasted>);

impl Inbox for Replies {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(async move { Ok(self.0.recv().await) })
    }
}

impl Broadcast for Bus {
    fn control_inbox<'a>(&'a self, _node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            Ok(Box::new(Listener {
                rx: self.control.subscribe(),
                binding: None,
            }) as Box<dyn Inbox>)
        })
    }

    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // No listener is not an error: nobody hears a broadcast nobody listens to.
            let _ = self.control.send(message.clone());
            Ok(())
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>> {
        Box::pin(async move {
            let key = crate::protocol::new_id();
            let (tx, rx) = mpsc::unbounded_channel();
            self.replies
                .lock()
                .map_err(|_| Error::broker("memory reply table poisoned"))?
                .insert(key.clone(), tx);
            Ok((key, Box::new(Replies(rx)) as Box<dyn Inbox>))
        })
    }

    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut replies = self
                .replies
                .lock()
                .map_err(|_| Error::broker("memory reply table poisoned"))?;
            if let Some(tx) = replies.get(&message.routing_key) {
                if tx.send(message.clone()).is_err() {
                    replies.remove(&message.routing_key);
                }
            }
            Ok(())
        })
    }

    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let _ = self.events.send(message.clone());
            Ok(())
        })
    }

    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            Ok(Box::new(Listener {
                rx: self.events.subscribe(),
                binding: Some(binding.to_owned()),
            }) as Box<dyn Inbox>)
        })
    }
}
