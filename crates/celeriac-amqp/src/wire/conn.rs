//! Connections: the handshake, the reader task that routes frames to channels, heartbeats.
//!
//! The state the reader shares with the channels is in [`super::shared`], the channels'
//! methods in [`super::channel`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::WireError;
use super::channel::{Channel, Delivery};
use super::codec::{
    self, CLASS_BASIC, Enc, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD,
    FRAME_MIN, FieldTable, FieldValue, Method, Properties,
};
use super::shared::{
    Assembling, ChanShared, ChanState, Pending, RPC_TIMEOUT, Shared, Stream, write_loop,
};

/// The frame size we ask for (RabbitMQ's default).
const FRAME_MAX: u32 = 131_072;

/// TLS settings of a connection (`amqps://`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Tls {
    /// PEM file of the CA certificates to trust (else the system's).
    pub ca_file: Option<std::path::PathBuf>,
    /// Whether to verify the server's certificate chain (default true).
    pub verify: bool,
    /// Whether to check the certificate's host name (default true).
    pub check_hostname: bool,
    /// The name to verify the certificate against (default: the host).
    pub server_name: Option<String>,
}

impl Default for Tls {
    fn default() -> Self {
        Self::new()
    }
}

impl Tls {
    /// Verifying TLS with the system's CAs.
    pub fn new() -> Self {
        Tls {
            ca_file: None,
            verify: true,
            check_hostname: true,
            server_name: None,
        }
    }
}

/// Where and how to connect.
#[derive(Clone)]
#[non_exhaustive]
pub struct ConnectionParams {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User for PLAIN login.
    pub user: String,
    /// Password (never in `Debug`).
    pub password: String,
    /// Virtual host.
    pub vhost: String,
    /// Heartbeat in seconds we propose (0 disables, if the server agrees).
    pub heartbeat: u16,
    /// The `connection_name` client property.
    pub name: String,
    /// TLS, or plain TCP when `None`.
    pub tls: Option<Tls>,
}

impl fmt::Debug for ConnectionParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .field("heartbeat", &self.heartbeat)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ConnectionParams {
    /// Parameters for `host:port` with guest credentials on vhost `/`, plain TCP.
    pub fn new(host: &str, port: u16) -> Self {
        ConnectionParams {
            host: host.to_owned(),
            port,
            user: "guest".to_owned(),
            password: "guest".to_owned(),
            vhost: "/".to_owned(),
            heartbeat: 60,
            name: "celeriac".to_owned(),
            tls: None,
        }
    }
}

/// An open AMQP connection. Cheap to clone; closing one clone closes all, and dropping the
/// last clone closes it too (its channels fail from then on).
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    _last: Arc<LastHandle>,
}

/// Shuts the connection when the last [`Connection`] clone goes.
struct LastHandle(Arc<Shared>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        self.0.shut(WireError::ClosedByClient);
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    frame_max: u32,
) -> Result<(u8, u16, Vec<u8>), WireError> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head).await?;
    let kind = head[0];
    let channel = u16::from_be_bytes([head[1], head[2]]);
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    if size > frame_max.max(FRAME_MIN) {
        return Err(WireError::Protocol(format!(
            "frame of {size} bytes exceeds frame_max {frame_max}"
        )));
    }
    let mut payload = vec![0u8; size as usize + 1];
    r.read_exact(&mut payload).await?;
    if payload.pop() != Some(FRAME_END) {
        return Err(WireError::Protocol(
            "frame without its end octet".to_owned(),
        ));
    }
    Ok((kind, channel, payload))
}

async fn connect_stream(params: &ConnectionParams) -> Result<Box<dyn Stream>, WireError> {
    let tcp = tokio::net::TcpStream::connect((params.host.as_str(), params.port)).await?;
    let _ = tcp.set_nodelay(true);
    match &params.tls {
        None => Ok(Box::new(tcp)),
        Some(tls) => tls_stream(tcp, params, tls).await,
    }
}

#[cfg(feature = "tls")]
async fn tls_stream(
    tcp: tokio::net::TcpStream,
    params: &ConnectionParams,
    tls: &Tls,
) -> Result<Box<dyn Stream>, WireError> {
    use tokio_native_tls::native_tls;
    let mut b = native_tls::TlsConnector::builder();
    if let Some(path) = &tls.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            WireError::Tls(format!("cannot read the CA file {}: {e}", path.display()))
        })?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
            WireError::Tls(format!("the CA file {} is not PEM: {e}", path.display()))
        })?;
        b.add_root_certificate(cert);
    }
    if !tls.verify {
        b.danger_accept_invalid_certs(true);
    }
    if !tls.verify || !tls.check_hostname {
        b.danger_accept_invalid_hostnames(true);
    }
    let connector =
        tokio_native_tls::TlsConnector::from(b.build().map_err(|e| WireError::Tls(e.to_string()))?);
    let name = tls.server_name.as_deref().unwrap_or(&params.host);
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| WireError::Tls(e.to_string()))?;
    Ok(Box::new(stream))
}

#[cfg(not(feature = "tls"))]
async fn tls_stream(
    _: tokio::net::TcpStream,
    _: &ConnectionParams,
    _: &Tls,
) -> Result<Box<dyn Stream>, WireError> {
    Err(WireError::Tls(
        "this build has no TLS (enable the `tls` feature)".to_owned(),
    ))
}

fn method_of(kind: u8, payload: &[u8]) -> Result<Method, WireError> {
    if kind != FRAME_METHOD {
        return Err(WireError::Protocol(format!(
            "expected a method frame during the handshake, got type {kind}"
        )));
    }
    codec::decode_method(payload)
}

impl Connection {
    /// Connects, logs in with PLAIN, negotiates limits and heartbeats, opens the vhost.
    ///
    /// A refused login is [`WireError::ConnectionClosed`] with code 403, an unknown or
    /// forbidden vhost code 530 (or 403).
    pub async fn open(params: &ConnectionParams) -> Result<Connection, WireError> {
        match tokio::time::timeout(RPC_TIMEOUT, Self::handshake(params)).await {
            Ok(r) => r,
            Err(_) => Err(WireError::Io(format!(
                "handshake did not finish within {RPC_TIMEOUT:?}"
            ))),
        }
    }

    async fn handshake(params: &ConnectionParams) -> Result<Connection, WireError> {
        let stream = connect_stream(params).await?;
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        w.write_all(b"AMQP\x00\x00\x09\x01").await?;
        w.flush().await?;
        let send = |payload: Vec<u8>| {
            let mut out = Vec::new();
            codec::encode_frame(&mut out, FRAME_METHOD, 0, &payload);
            out
        };
        let next = |m: Method| -> Result<Method, WireError> {
            match m {
                Method::ConnectionClose(reason) => Err(WireError::ConnectionClosed(reason)),
                m => Ok(m),
            }
        };
        let (kind, _, payload) = read_frame(&mut r, FRAME_MIN).await.map_err(|e| match e {
            WireError::Protocol(_) => {
                WireError::Protocol("the server does not speak AMQP 0-9-1".to_owned())
            }
            e => e,
        })?;
        let Method::ConnectionStart { mechanisms } = next(method_of(kind, &payload)?)? else {
            return Err(WireError::Protocol("expected connection.start".to_owned()));
        };
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(WireError::Protocol(format!(
                "the server offers no PLAIN login (only {mechanisms})"
            )));
        }
        let mut caps = FieldTable::new();
        for c in [
            "publisher_confirms",
            "consumer_cancel_notify",
            "authentication_failure_close",
            "basic.nack",
            "connection.blocked",
        ] {
            caps.insert(c.to_owned(), FieldValue::Bool(true));
        }
        let mut props = FieldTable::new();
        props.insert("product".to_owned(), FieldValue::str("celeriac"));
        props.insert(
            "version".to_owned(),
            FieldValue::str(env!("CARGO_PKG_VERSION")),
        );
        props.insert("platform".to_owned(), FieldValue::str("Rust"));
        props.insert("connection_name".to_owned(), FieldValue::str(&params.name));
        props.insert("capabilities".to_owned(), FieldValue::Table(caps));
        let mut response = vec![0u8];
        response.extend_from_slice(params.user.as_bytes());
        response.push(0);
        response.extend_from_slice(params.password.as_bytes());
        let mut e = Enc::method(10, 11);
        e.table(&props)?;
        e.shortstr("PLAIN")?;
        e.longstr(&response)?;
        e.shortstr("en_US")?;
        w.write_all(&send(e.buf)).await?;
        w.flush().await?;

        let (kind, _, payload) = read_frame(&mut r, FRAME_MIN).await.map_err(|e| match e {
            // RabbitMQ may drop the socket on a failed login.
            WireError::Io(text) => WireError::Io(format!(
                "{text} (the server closed the connection during login: wrong user or password?)"
            )),
            e => e,
        })?;
        let Method::ConnectionTune {
            channel_max,
            frame_max,
            heartbeat,
        } = next(method_of(kind, &payload)?)?
        else {
            return Err(WireError::Protocol("expected connection.tune".to_owned()));
        };
        let pick = |ours: u32, theirs: u32| match (ours, theirs) {
            (0, t) => t,
            (o, 0) => o,
            (o, t) => o.min(t),
        };
        let channel_max = match channel_max {
            0 => u16::MAX,
            n => n,
        }
        .min(2047);
        let frame_max = pick(FRAME_MAX, frame_max).max(FRAME_MIN);
        let heartbeat = if params.heartbeat == 0 {
            0
        } else {
            pick(u32::from(params.heartbeat), u32::from(heartbeat)) as u16
        };
        let mut e = Enc::method(10, 31);
        e.u16(channel_max).u32(frame_max).u16(heartbeat);
        w.write_all(&send(e.buf)).await?;
        let mut e = Enc::method(10, 40);
        e.shortstr(&params.vhost)?;
        e.shortstr("")?;
        e.bit(false);
        w.write_all(&send(e.buf)).await?;
        w.flush().await?;
        loop {
            let (kind, _, payload) = read_frame(&mut r, frame_max).await?;
            if kind == FRAME_HEARTBEAT {
                continue;
            }
            match next(method_of(kind, &payload)?)? {
                Method::ConnectionOpenOk => break,
                other => {
                    return Err(WireError::Protocol(format!(
                        "expected connection.open-ok, got {other:?}"
                    )));
                }
            }
        }

        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(w),
            outbox: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            drained: tokio::sync::Notify::new(),
            channels: Mutex::new(HashMap::new()),
            next_channel: Mutex::new(0),
            channel_max,
            frame_max,
            closed: watch::channel(None).0,
            consumer_seq: AtomicU64::new(0),
        });
        let silence = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat) * 2));
        tokio::spawn(read_loop(shared.clone(), r, silence));
        tokio::spawn(write_loop(shared.clone()));
        if heartbeat > 0 {
            tokio::spawn(heartbeats(
                Arc::downgrade(&shared),
                Duration::from_millis(u64::from(heartbeat) * 500),
            ));
        }
        Ok(Connection {
            _last: Arc::new(LastHandle(shared.clone())),
            shared,
        })
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.shared.closed.borrow().is_none()
    }

    /// Resolves once the connection is closed (by either side or a failure), with the reason.
    pub async fn closed(&self) -> WireError {
        let mut rx = self.shared.closed.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return WireError::ClosedByClient;
            }
        }
    }

    /// Like [`closed`](Self::closed), as a future that does not keep the connection open: it
    /// resolves with [`WireError::ClosedByClient`] once the last handle is dropped.
    pub fn on_close(&self) -> impl Future<Output = WireError> + Send + 'static {
        let mut rx = self.shared.closed.subscribe();
        async move {
            loop {
                if let Some(e) = rx.borrow_and_update().clone() {
                    return e;
                }
                if rx.changed().await.is_err() {
                    return WireError::ClosedByClient;
                }
            }
        }
    }

    /// Opens a channel.
    pub async fn open_channel(&self) -> Result<Channel, WireError> {
        if let Some(e) = self.shared.closed_error() {
            return Err(e);
        }
        let chan = {
            let mut chans = self.shared.channels.lock().expect("channels lock");
            let mut next = self.shared.next_channel.lock().expect("channel id lock");
            let mut id = None;
            for _ in 0..self.shared.channel_max {
                *next = if *next >= self.shared.channel_max {
                    1
                } else {
                    *next + 1
                };
                if !chans.contains_key(&*next) {
                    id = Some(*next);
                    break;
                }
            }
            let id = id.ok_or_else(|| WireError::Protocol("no free channel id".to_owned()))?;
            let chan = Arc::new(ChanShared {
                id,
                state: Mutex::new(ChanState::default()),
                rpc: tokio::sync::Mutex::new(()),
                ack_wake: tokio::sync::Notify::new(),
            });
            chans.insert(id, chan.clone());
            chan
        };
        Channel::open(self.shared.clone(), chan).await
    }

    /// Closes the connection (`connection.close` 200, waiting briefly for `close-ok`), sending
    /// the acks its channels hold back first.
    pub async fn close(&self) -> Result<(), WireError> {
        if !self.is_open() {
            return Ok(());
        }
        let chans: Vec<_> = self
            .shared
            .channels
            .lock()
            .expect("channels lock")
            .values()
            .cloned()
            .collect();
        for c in chans {
            let mut s = c.state.lock().expect("channel lock");
            if s.closed.is_none() {
                super::channel::flush_acks_of(&self.shared, c.id, &mut s);
            }
        }
        let mut e = Enc::method(10, 50);
        e.u16(200).shortstr("bye")?.u16(0).u16(0);
        let mut rx = self.shared.closed.subscribe();
        self.shared.send_method(0, &e.buf).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        self.shared.shut(WireError::ClosedByClient);
        let mut w = self.shared.writer.lock().await;
        let _ = w.shutdown().await;
        Ok(())
    }
}

async fn heartbeats(shared: std::sync::Weak<Shared>, every: Duration) {
    let mut frame = Vec::new();
    codec::encode_frame(&mut frame, FRAME_HEARTBEAT, 0, &[]);
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.closed_error().is_some() || shared.write(&frame).await.is_err() {
            return;
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(shared: Arc<Shared>, mut r: R, silence: Option<Duration>) {
    let mut closed = shared.closed.subscribe();
    let err = loop {
        let frame = async {
            match silence {
                Some(limit) => tokio::time::timeout(limit, read_frame(&mut r, shared.frame_max))
                    .await
                    .unwrap_or_else(|_| {
                        Err(WireError::Io(format!(
                            "no heartbeat from the server for {limit:?}"
                        )))
                    }),
                None => read_frame(&mut r, shared.frame_max).await,
            }
        };
        let frame = tokio::select! {
            f = frame => f,
            _ = closed.wait_for(Option::is_some) => return,
        };
        let (kind, channel, payload) = match frame {
            Ok(f) => f,
            Err(e) => break e,
        };
        if let Err(e) = dispatch(&shared, kind, channel, payload).await {
            break e;
        }
        if shared.closed_error().is_some() {
            return;
        }
    };
    tracing::debug!(error = %err, "amqp connection ended");
    shared.shut(err);
}

/// Routes one frame; an error ends the connection.
async fn dispatch(
    shared: &Arc<Shared>,
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
) -> Result<(), WireError> {
    if kind == FRAME_HEARTBEAT {
        return Ok(());
    }
    if channel == 0 {
        if kind != FRAME_METHOD {
            return Err(WireError::Protocol(format!(
                "frame type {kind} on channel 0"
            )));
        }
        match codec::decode_method(&payload)? {
            Method::ConnectionClose(reason) => {
                let ok = Enc::method(10, 51);
                let _ = shared.send_method(0, &ok.buf).await;
                tracing::warn!(reason = %reason, "rabbitmq closed the connection");
                return Err(WireError::ConnectionClosed(reason));
            }
            Method::ConnectionCloseOk => {
                shared.shut(WireError::ClosedByClient);
            }
            Method::ConnectionBlocked { reason } => {
                tracing::warn!(%reason, "rabbitmq blocked the connection (resource alarm)");
            }
            Method::ConnectionUnblocked => {
                tracing::info!("rabbitmq unblocked the connection");
            }
            other => tracing::debug!(method = ?other, "ignoring a connection method"),
        }
        return Ok(());
    }
    let Some(chan) = shared
        .channels
        .lock()
        .expect("channels lock")
        .get(&channel)
        .cloned()
    else {
        // A late frame for a channel we closed.
        return Ok(());
    };
    match kind {
        FRAME_METHOD => channel_method(shared, &chan, codec::decode_method(&payload)?).await,
        FRAME_HEADER => {
            let (class, size, props) = codec::decode_header(&payload)?;
            let mut s = chan.state.lock().expect("channel lock");
            let Some(a) = s.assembling.as_mut().filter(|a| a.props.is_none()) else {
                return Err(WireError::Protocol(format!(
                    "unexpected content header on channel {channel}"
                )));
            };
            if class != CLASS_BASIC {
                return Err(WireError::Protocol(format!(
                    "content header of class {class}"
                )));
            }
            if let Some(why) = &props.malformed {
                tracing::warn!(channel, error = %why, "rabbitmq delivered a message whose properties cannot be decoded; they were skipped");
            }
            a.size = size;
            a.props = Some(props);
            if size == 0 {
                finish_content(&mut s);
            }
            Ok(())
        }
        FRAME_BODY => {
            let mut s = chan.state.lock().expect("channel lock");
            let Some(a) = s.assembling.as_mut().filter(|a| a.props.is_some()) else {
                return Err(WireError::Protocol(format!(
                    "unexpected body frame on channel {channel}"
                )));
            };
            a.body.extend_from_slice(&payload);
            if a.body.len() as u64 > a.size {
                return Err(WireError::Protocol(
                    "body longer than its header said".to_owned(),
                ));
            }
            if a.body.len() as u64 == a.size {
                finish_content(&mut s);
            }
            Ok(())
        }
        other => Err(WireError::Protocol(format!("unknown frame type {other}"))),
    }
}

fn finish_content(s: &mut ChanState) {
    let Some(a) = s.assembling.take() else {
        return;
    };
    let props = a.props.unwrap_or_default();
    let fill = |mut d: Delivery| {
        d.properties = props.properties;
        d.malformed = props.malformed;
        d.body = a.body;
        d
    };
    match a.what {
        Pending::Deliver {
            consumer_tag,
            delivery,
        } => {
            let d = fill(delivery);
            if s.acks.manual.contains(&consumer_tag) {
                s.acks.unsettled.insert(d.delivery_tag);
            }
            if let Some(tx) = s.consumers.get(&consumer_tag) {
                if tx.send(d).is_err() {
                    s.consumers.remove(&consumer_tag);
                }
            }
        }
        Pending::GetOk(delivery) => {
            if std::mem::take(&mut s.acks.get_manual) {
                s.acks.unsettled.insert(delivery.delivery_tag);
            }
            if let Some(tx) = s.reply.take() {
                let _ = tx.send(Ok((Method::BasicGetEmpty, Some(fill(delivery)))));
            }
        }
        Pending::Return => {}
    }
}

fn delivery(
    delivery_tag: u64,
    redelivered: bool,
    exchange: String,
    routing_key: String,
) -> Delivery {
    Delivery {
        delivery_tag,
        redelivered,
        exchange,
        routing_key,
        properties: Properties::default(),
        malformed: None,
        body: Vec::new(),
    }
}

async fn channel_method(
    shared: &Arc<Shared>,
    chan: &Arc<ChanShared>,
    m: Method,
) -> Result<(), WireError> {
    let start = |what: Pending| Assembling {
        what,
        size: 0,
        props: None,
        body: Vec::new(),
    };
    match m {
        Method::BasicDeliver {
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        } => {
            chan.state.lock().expect("channel lock").assembling = Some(start(Pending::Deliver {
                consumer_tag,
                delivery: delivery(delivery_tag, redelivered, exchange, routing_key),
            }));
        }
        Method::BasicGetOk {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        } => {
            chan.state.lock().expect("channel lock").assembling = Some(start(Pending::GetOk(
                delivery(delivery_tag, redelivered, exchange, routing_key),
            )));
        }
        Method::BasicReturn {
            reply_code,
            reply_text,
            routing_key,
            ..
        } => {
            tracing::debug!(reply_code, %reply_text, %routing_key, "rabbitmq returned a message");
            chan.state.lock().expect("channel lock").assembling = Some(start(Pending::Return));
        }
        Method::BasicAck {
            delivery_tag,
            multiple,
        } => {
            if let Some(c) = &mut chan.state.lock().expect("channel lock").confirms {
                c.settle(delivery_tag, multiple, true);
            }
        }
        Method::BasicNack {
            delivery_tag,
            multiple,
        } => {
            if let Some(c) = &mut chan.state.lock().expect("channel lock").confirms {
                c.settle(delivery_tag, multiple, false);
            }
        }
        Method::BasicCancel { consumer_tag } => {
            tracing::warn!(%consumer_tag, "rabbitmq cancelled a consumer (queue deleted?)");
            let mut s = chan.state.lock().expect("channel lock");
            s.consumers.remove(&consumer_tag);
            s.acks.manual.remove(&consumer_tag);
        }
        Method::ChannelFlow { active } => {
            let mut e = Enc::method(20, 21);
            e.bit(active);
            shared.send_method(chan.id, &e.buf).await?;
        }
        Method::ChannelClose(reason) => {
            tracing::debug!(channel = chan.id, reason = %reason, "rabbitmq closed a channel");
            shared
                .channels
                .lock()
                .expect("channels lock")
                .remove(&chan.id);
            chan.fail(WireError::ChannelClosed(reason));
            shared
                .send_method(chan.id, &Enc::method(20, 41).buf)
                .await?;
        }
        Method::ChannelCloseOk => {
            shared
                .channels
                .lock()
                .expect("channels lock")
                .remove(&chan.id);
            let mut s = chan.state.lock().expect("channel lock");
            if let Some(tx) = s.reply.take() {
                let _ = tx.send(Ok((Method::ChannelCloseOk, None)));
            }
            drop(s);
            chan.fail(WireError::ClosedByClient);
        }
        Method::BasicGetEmpty
        | Method::ChannelOpenOk
        | Method::ExchangeDeclareOk
        | Method::ExchangeDeleteOk
        | Method::QueueDeclareOk { .. }
        | Method::QueueBindOk
        | Method::QueueUnbindOk
        | Method::QueuePurgeOk { .. }
        | Method::QueueDeleteOk { .. }
        | Method::BasicQosOk
        | Method::BasicConsumeOk { .. }
        | Method::BasicCancelOk { .. }
        | Method::BasicRecoverOk
        | Method::ConfirmSelectOk => {
            if let Some(tx) = chan.state.lock().expect("channel lock").reply.take() {
                let _ = tx.send(Ok((m, None)));
            }
        }
        other => {
            return Err(WireError::Protocol(format!(
                "unexpected method on channel {}: {other:?}",
                chan.id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The client against a scripted server on loopback: what RabbitMQ will not send on
    //! request (an undecodable headers table, a server-side cancel and channel close).

    use super::*;
    use tokio::net::TcpListener;

    struct Script {
        r: BufReader<tokio::io::ReadHalf<tokio::net::TcpStream>>,
        w: tokio::io::WriteHalf<tokio::net::TcpStream>,
    }

    impl Script {
        async fn expect(&mut self, class: u16, method: u16) -> Vec<u8> {
            loop {
                let (kind, _, payload) = read_frame(&mut self.r, FRAME_MAX).await.unwrap();
                if kind == FRAME_HEARTBEAT {
                    continue;
                }
                assert_eq!(kind, FRAME_METHOD);
                let got = (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                );
                assert_eq!(got, (class, method));
                return payload[4..].to_vec();
            }
        }
        async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
            let mut out = Vec::new();
            codec::encode_frame(&mut out, kind, channel, payload);
            self.w.write_all(&out).await.unwrap();
        }
    }

    /// Accepts one client, runs the handshake and opens channel 1.
    async fn server() -> (u16, tokio::task::JoinHandle<Script>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (r, w) = tokio::io::split(socket);
            let mut s = Script {
                r: BufReader::new(r),
                w,
            };
            let mut hello = [0u8; 8];
            s.r.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"AMQP\x00\x00\x09\x01");
            let mut e = Enc::method(10, 10);
            e.u8(0).u8(9).table(&FieldTable::new()).unwrap();
            e.longstr(b"PLAIN AMQPLAIN")
                .unwrap()
                .longstr(b"en_US")
                .unwrap();
            s.send(FRAME_METHOD, 0, &e.buf).await;
            s.expect(10, 11).await;
            let mut e = Enc::method(10, 30);
            e.u16(0).u32(FRAME_MAX).u16(0);
            s.send(FRAME_METHOD, 0, &e.buf).await;
            s.expect(10, 31).await;
            s.expect(10, 40).await;
            let mut e = Enc::method(10, 41);
            e.shortstr("").unwrap();
            s.send(FRAME_METHOD, 0, &e.buf).await;
            s.expect(20, 10).await;
            let mut e = Enc::method(20, 11);
            e.longstr(b"").unwrap();
            s.send(FRAME_METHOD, 1, &e.buf).await;
            s
        });
        (port, task)
    }

    async fn deliver(s: &mut Script, tag: &str, n: u64, header: &[u8], body: &[u8]) {
        let mut e = Enc::method(60, 60);
        e.shortstr(tag).unwrap().u64(n).bit(false);
        e.shortstr("").unwrap().shortstr("q").unwrap();
        s.send(FRAME_METHOD, 1, &e.buf).await;
        s.send(FRAME_HEADER, 1, header).await;
        s.send(FRAME_BODY, 1, body).await;
    }

    #[tokio::test]
    async fn an_undecodable_headers_table_is_skipped_and_the_next_delivery_arrives() {
        let (port, script) = server().await;
        let mut params = ConnectionParams::new("127.0.0.1", port);
        params.heartbeat = 0;
        let conn = Connection::open(&params).await.unwrap();
        let ch = conn.open_channel().await.unwrap();
        let mut s = script.await.unwrap();

        let consume = tokio::spawn({
            let ch = ch.clone();
            async move { ch.basic_consume("q", false).await }
        });
        let req = s.expect(60, 20).await;
        let mut d = codec::Dec::new(&req);
        d.u16().unwrap();
        assert_eq!(d.shortstr().unwrap(), "q");
        let tag = d.shortstr().unwrap();
        let mut e = Enc::method(60, 21);
        e.shortstr(&tag).unwrap();
        s.send(FRAME_METHOD, 1, &e.buf).await;
        let (_, mut rx) = consume.await.unwrap().unwrap();

        // content_type, a headers table with the unknown tag `Z`, correlation_id.
        let mut bad = Enc::default();
        bad.u16(CLASS_BASIC).u16(0).u64(2);
        bad.u16((1 << 15) | (1 << 13) | (1 << 10));
        bad.shortstr("application/json").unwrap();
        bad.u32(3).u8(1).u8(b'n').u8(b'Z');
        bad.shortstr("bad-id").unwrap();
        deliver(&mut s, &tag, 1, &bad.buf, b"{}").await;
        let mut good = Properties::default();
        let mut headers = FieldTable::new();
        headers.insert("big".to_owned(), FieldValue::I64L(-5_000_000_000));
        good.headers = Some(headers.clone());
        let header = codec::encode_header(&good, 2).unwrap();
        deliver(&mut s, &tag, 2, &header, b"ok").await;

        let first = rx.recv().await.expect("the bad delivery");
        assert_eq!(first.delivery_tag, 1);
        assert!(
            first
                .malformed
                .as_deref()
                .unwrap()
                .contains("unknown field type tag")
        );
        assert_eq!(first.properties.correlation_id.as_deref(), Some("bad-id"));
        assert_eq!(first.body, b"{}");
        let second = rx.recv().await.expect("the connection survived");
        assert_eq!(second.delivery_tag, 2);
        assert_eq!(second.malformed, None);
        assert_eq!(second.properties.headers, Some(headers));
        assert!(conn.is_open());

        // A server-sent cancel ends the consumer; a channel.close surfaces its reason.
        let mut e = Enc::method(60, 30);
        e.shortstr(&tag).unwrap().bit(false);
        s.send(FRAME_METHOD, 1, &e.buf).await;
        assert!(rx.recv().await.is_none(), "cancelled consumers end");
        let purge = tokio::spawn({
            let ch = ch.clone();
            async move { ch.queue_purge("gone").await }
        });
        s.expect(50, 30).await;
        let mut e = Enc::method(20, 40);
        e.u16(404).shortstr("NOT_FOUND - no queue 'gone'").unwrap();
        e.u16(50).u16(30);
        s.send(FRAME_METHOD, 1, &e.buf).await;
        s.expect(20, 41).await;
        let err = purge.await.unwrap().unwrap_err();
        assert_eq!(err.reply_code(), Some(404), "{err}");
        assert!(err.to_string().contains("NOT_FOUND"), "{err}");
        assert!(!ch.is_open() && conn.is_open());

        // A connection.close is answered and surfaces on the connection.
        let mut e = Enc::method(10, 50);
        e.u16(320).shortstr("CONNECTION_FORCED - shutdown").unwrap();
        e.u16(0).u16(0);
        s.send(FRAME_METHOD, 0, &e.buf).await;
        s.expect(10, 51).await;
        let why = conn.closed().await;
        assert_eq!(why.reply_code(), Some(320), "{why}");
    }

    #[tokio::test]
    async fn a_garbage_frame_fails_the_connection_with_a_protocol_error() {
        let (port, script) = server().await;
        let mut params = ConnectionParams::new("127.0.0.1", port);
        params.heartbeat = 0;
        let conn = Connection::open(&params).await.unwrap();
        let _ch = conn.open_channel().await.unwrap();
        let mut s = script.await.unwrap();
        // A frame without its end octet.
        s.w.write_all(&[1, 0, 1, 0, 0, 0, 1, 0, 0]).await.unwrap();
        let why = conn.closed().await;
        assert!(matches!(why, WireError::Protocol(_)), "{why}");
    }
}
