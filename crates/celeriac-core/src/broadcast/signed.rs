//! Control requests and replies under serializer `auth`.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Broadcast, Broadcasted, Inbox};
use crate::broker::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::security::{BodySigner, SIGNED_CONTENT_ENCODING};

/// A broker's broadcast channels as an app or a worker uses them: with a signer (serializer
/// `auth`), control requests and replies are signed on the way out, and only those whose
/// signature verifies come in; without one, signed requests and replies are dropped, since
/// they cannot be checked. Events pass unchanged either way.
///
/// This is Celery's behaviour under `setup_security()`: its mailbox publishes with the task
/// serializer and accepts only `accept_content` (`["auth"]`), while events keep
/// `event_serializer` (JSON). A dropped message is logged with the reason, the way kombu
/// logs a message of a content type it does not accept; a request that cannot be read gets
/// no reply.
///
/// ```
/// use celeriac_core::broadcast::{Broadcast, Signed};
/// use celeriac_core::memory::MemoryBroker;
/// use celeriac_core::Broker;
///
/// # async fn demo() -> celeriac_core::Result<()> {
/// let broker = MemoryBroker::new();
/// // `None`: no security configured, so control travels as plain JSON.
/// let channels = Signed::new(broker.broadcast().expect("the memory broker has channels"), None);
/// let (_key, _replies) = channels.reply_inbox().await?;
/// # Ok(()) }
/// ```
pub struct Signed<'a> {
    inner: &'a dyn Broadcast,
    signer: Option<Arc<dyn BodySigner>>,
}

impl<'a> Signed<'a> {
    /// `inner`'s channels, signed and checked by `signer` (none: plain JSON only).
    pub fn new(inner: &'a dyn Broadcast, signer: Option<Arc<dyn BodySigner>>) -> Self {
        Signed { inner, signer }
    }

    fn seal(&self, message: &Broadcasted) -> Result<Option<Broadcasted>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        if message.signed {
            return Ok(None);
        }
        let json = serde_json::to_vec(&message.body)
            .map_err(|e| Error::protocol("a control body cannot be written").with_source(e))?;
        let signed = signer.sign_body("application/json", SIGNED_CONTENT_ENCODING, &json)?;
        let text = String::from_utf8(signed)
            .map_err(|_| Error::new(ErrorKind::Security, "a signed body is not text"))?;
        Ok(Some(Broadcasted {
            routing_key: message.routing_key.clone(),
            headers: message.headers.clone(),
            body: Value::String(text),
            signed: true,
        }))
    }

    fn checked(&self, inbox: Box<dyn Inbox>, channel: &'static str) -> Box<dyn Inbox> {
        Box::new(Checked {
            inner: inbox,
            signer: self.signer.clone(),
            channel,
        })
    }
}

impl fmt::Debug for Signed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("inner", &self.inner)
            .field("signing", &self.signer.is_some())
            .finish()
    }
}

impl Broadcast for Signed<'_> {
    fn control_inbox<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        Box::pin(async move {
            let inbox = self.inner.control_inbox(node).await?;
            Ok(self.checked(inbox, "control request"))
        })
    }

    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.seal(message)? {
                Some(signed) => self.inner.send_control(&signed).await,
                None => self.inner.send_control(message).await,
            }
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>> {
        Box::pin(async move {
            let (key, inbox) = self.inner.reply_inbox().await?;
            Ok((key, self.checked(inbox, "control reply")))
        })
    }

    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.seal(message)? {
                Some(signed) => self.inner.send_reply(&signed).await,
                None => self.inner.send_reply(message).await,
            }
        })
    }

    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>> {
        self.inner.send_event(message)
    }

    fn send_event_json<'a>(
        &'a self,
        routing_key: &'a str,
        headers: &'a Map<String, Value>,
        body: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.send_event_json(routing_key, headers, body)
    }

    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>> {
        self.inner.event_inbox(binding)
    }
}

/// Control requests or replies, let through only when they meet the policy.
struct Checked {
    inner: Box<dyn Inbox>,
    signer: Option<Arc<dyn BodySigner>>,
    channel: &'static str,
}

impl fmt::Debug for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checked")
            .field("inner", &self.inner)
            .field("channel", &self.channel)
            .finish()
    }
}

impl Inbox for Checked {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>> {
        Box::pin(async move {
            loop {
                let Some(message) = self.inner.next().await? else {
                    return Ok(None);
                };
                match open(message, self.signer.as_deref()) {
                    Ok(message) => return Ok(Some(message)),
                    Err(e) => tracing::warn!(
                        channel = self.channel,
                        error = %format_args!("{e:#}"),
                        "{} dropped",
                        self.channel
                    ),
                }
            }
        })
    }
}

/// `message` as its readers expect it under the policy: with a signer, only a signed message
/// whose signature verifies, its body read back as JSON; without one, only an unsigned one.
pub(crate) fn open(message: Broadcasted, signer: Option<&dyn BodySigner>) -> Result<Broadcasted> {
    let refuse = |why: &str| Err(Error::new(ErrorKind::Security, why.to_owned()));
    match (signer, message.signed) {
        (None, false) => Ok(message),
        (None, true) => refuse(
            "a signed message, and security is not configured here (serializer \"auth\"), so \
             it cannot be checked",
        ),
        (Some(_), false) => refuse(
            "an unsigned message, and serializer \"auth\" accepts only signed ones \
             (application/data)",
        ),
        (Some(signer), true) => {
            let Value::String(text) = &message.body else {
                return refuse("a signed message whose body is not text");
            };
            let packed = signer.verify_body(text.as_bytes())?;
            if packed.content_type != "application/json" {
                return Err(Error::new(
                    ErrorKind::Security,
                    format!(
                        "a signed control message in {} (only application/json is read)",
                        packed.content_type
                    ),
                ));
            }
            let body = serde_json::from_slice(&packed.body)
                .map_err(|e| Error::protocol("a signed control body is not JSON").with_source(e))?;
            Ok(Broadcasted {
                body,
                signed: false,
                ..message
            })
        }
    }
}
