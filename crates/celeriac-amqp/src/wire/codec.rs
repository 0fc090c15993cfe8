//! Frames, methods, content headers and field tables of AMQP 0-9-1, encoded and decoded.
//!
//! Decoding never panics: every read is bounds-checked and a short or garbled input is a
//! [`WireError::Protocol`]. Field tables follow RabbitMQ's type table with py-amqp's extras:
//! `t b B s u U I i l L f d D S x A T F V`, where `s` and `U` are signed 16-bit, `u` unsigned
//! 16-bit, `I` signed and `i` unsigned 32-bit, and both `l` and `L` signed 64-bit (RabbitMQ
//! reads `l` so; py-amqp writes `L` for integers beyond ±2^31).

use std::collections::BTreeMap;
use std::fmt;

use super::WireError;

/// Frame types.
pub(crate) const FRAME_METHOD: u8 = 1;
pub(crate) const FRAME_HEADER: u8 = 2;
pub(crate) const FRAME_BODY: u8 = 3;
pub(crate) const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub(crate) const FRAME_END: u8 = 0xCE;
/// The smallest frame size every peer accepts (and the limit before `tune`).
pub(crate) const FRAME_MIN: u32 = 4096;
/// The class id of `basic`, the only content class.
pub(crate) const CLASS_BASIC: u16 = 60;

/// A field table: names (at most 255 bytes) to values, in name order.
pub type FieldTable = BTreeMap<String, FieldValue>;

/// A value in a field table or array, by its type tag.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FieldValue {
    /// `t`: boolean.
    Bool(bool),
    /// `b`: signed 8-bit.
    I8(i8),
    /// `B`: unsigned 8-bit.
    U8(u8),
    /// `s` (RabbitMQ) and `U` (py-amqp): signed 16-bit; written as `s`.
    I16(i16),
    /// `u`: unsigned 16-bit.
    U16(u16),
    /// `I`: signed 32-bit.
    I32(i32),
    /// `i`: unsigned 32-bit.
    U32(u32),
    /// `l`: signed 64-bit (RabbitMQ's tag).
    I64(i64),
    /// `L`: signed 64-bit as py-amqp writes it; kept apart so a round trip keeps the tag.
    I64L(i64),
    /// `f`: 32-bit float.
    F32(f32),
    /// `d`: 64-bit float.
    F64(f64),
    /// `D`: decimal, `value / 10^scale`.
    Decimal {
        /// Number of decimal places.
        scale: u8,
        /// The unscaled value (signed, as py-amqp writes it).
        value: i32,
    },
    /// `S`: long string (bytes; UTF-8 in practice).
    LongStr(Vec<u8>),
    /// `x`: byte array.
    Bytes(Vec<u8>),
    /// `A`: array.
    Array(Vec<FieldValue>),
    /// `T`: timestamp, seconds since the epoch.
    Timestamp(u64),
    /// `F`: nested table.
    Table(FieldTable),
    /// `V`: void (no value; Python's `None`).
    Void,
}

impl FieldValue {
    /// A long string from text.
    pub fn str(s: &str) -> Self {
        FieldValue::LongStr(s.as_bytes().to_vec())
    }
}

/// The properties of a `basic` content header.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Properties {
    /// MIME content type.
    pub content_type: Option<String>,
    /// MIME content encoding.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Option<FieldTable>,
    /// 1 transient, 2 persistent.
    pub delivery_mode: Option<u8>,
    /// Priority 0-9 (more on queues declared so).
    pub priority: Option<u8>,
    /// Correlation id (Celery: the task id).
    pub correlation_id: Option<String>,
    /// Queue to reply to.
    pub reply_to: Option<String>,
    /// Per-message TTL in ms, as text.
    pub expiration: Option<String>,
    /// Message id.
    pub message_id: Option<String>,
    /// Timestamp, seconds since the epoch.
    pub timestamp: Option<u64>,
    /// Message type name.
    pub kind: Option<String>,
    /// Creating user.
    pub user_id: Option<String>,
    /// Creating application.
    pub app_id: Option<String>,
    /// Deprecated cluster id.
    pub cluster_id: Option<String>,
}

/// A content header's properties as decoded: what could be read, and what could not.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DecodedProperties {
    pub(crate) properties: Properties,
    /// Why some property (usually the headers table) could not be decoded; it was skipped.
    pub(crate) malformed: Option<String>,
}

// ===== encoding =====

/// Appends AMQP primitives to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Enc {
    pub(crate) buf: Vec<u8>,
    bits: Option<(usize, u8)>,
}

impl Enc {
    pub(crate) fn method(class: u16, method: u16) -> Self {
        let mut e = Enc::default();
        e.u16(class).u16(method);
        e
    }

    fn end_bits(&mut self) {
        self.bits = None;
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.end_bits();
        self.buf.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.end_bits();
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.end_bits();
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.end_bits();
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A short string; longer than 255 bytes is an error.
    pub(crate) fn shortstr(&mut self, s: &str) -> Result<&mut Self, WireError> {
        let len = u8::try_from(s.len()).map_err(|_| {
            WireError::Protocol(format!("short string longer than 255 bytes: {}…", head(s)))
        })?;
        self.u8(len);
        self.buf.extend_from_slice(s.as_bytes());
        Ok(self)
    }
    pub(crate) fn longstr(&mut self, s: &[u8]) -> Result<&mut Self, WireError> {
        let len = u32::try_from(s.len())
            .map_err(|_| WireError::Protocol("long string longer than 4 GiB".to_owned()))?;
        self.u32(len);
        self.buf.extend_from_slice(s);
        Ok(self)
    }
    /// A bit; consecutive bits share octets, as the spec packs them.
    pub(crate) fn bit(&mut self, b: bool) -> &mut Self {
        match self.bits {
            Some((at, n)) if n < 8 => {
                if b {
                    self.buf[at] |= 1 << n;
                }
                self.bits = Some((at, n + 1));
            }
            _ => {
                self.buf.push(u8::from(b));
                self.bits = Some((self.buf.len() - 1, 1));
            }
        }
        self
    }
    pub(crate) fn table(&mut self, t: &FieldTable) -> Result<&mut Self, WireError> {
        self.end_bits();
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        for (k, v) in t {
            self.shortstr(k)?;
            self.value(v)?;
        }
        self.patch_len(at)?;
        Ok(self)
    }
    fn patch_len(&mut self, at: usize) -> Result<(), WireError> {
        let len = u32::try_from(self.buf.len() - at - 4)
            .map_err(|_| WireError::Protocol("field table longer than 4 GiB".to_owned()))?;
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
    fn value(&mut self, v: &FieldValue) -> Result<(), WireError> {
        match v {
            FieldValue::Bool(b) => {
                self.u8(b't').u8(u8::from(*b));
            }
            FieldValue::I8(i) => {
                self.u8(b'b').buf.extend_from_slice(&i.to_be_bytes());
            }
            FieldValue::U8(i) => {
                self.u8(b'B').u8(*i);
            }
            FieldValue::I16(i) => {
                self.u8(b's').buf.extend_from_slice(&i.to_be_bytes());
            }
            FieldValue::U16(i) => {
                self.u8(b'u').u16(*i);
            }
            FieldValue::I32(i) => {
                self.u8(b'I').buf.extend_from_slice(&i.to_be_bytes());
            }
            FieldValue::U32(i) => {
                self.u8(b'i').u32(*i);
            }
            FieldValue::I64(i) => {
                self.u8(b'l').buf.extend_from_slice(&i.to_be_bytes());
            }
            FieldValue::I64L(i) => {
                self.u8(b'L').buf.extend_from_slice(&i.to_be_bytes());
            }
            FieldValue::F32(f) => {
                self.u8(b'f').buf.extend_from_slice(&f.to_be_bytes());
            }
            FieldValue::F64(f) => {
                self.u8(b'd').buf.extend_from_slice(&f.to_be_bytes());
            }
            FieldValue::Decimal { scale, value } => {
                self.u8(b'D')
                    .u8(*scale)
                    .buf
                    .extend_from_slice(&value.to_be_bytes());
            }
            FieldValue::LongStr(s) => {
                self.u8(b'S').longstr(s)?;
            }
            FieldValue::Bytes(s) => {
                self.u8(b'x').longstr(s)?;
            }
            FieldValue::Array(items) => {
                self.u8(b'A');
                let at = self.buf.len();
                self.buf.extend_from_slice(&[0; 4]);
                for item in items {
                    self.value(item)?;
                }
                self.patch_len(at)?;
            }
            FieldValue::Timestamp(t) => {
                self.u8(b'T').u64(*t);
            }
            FieldValue::Table(t) => {
                self.u8(b'F').table(t)?;
            }
            FieldValue::Void => {
                self.u8(b'V');
            }
        }
        Ok(())
    }
}

fn head(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The payload of a content header frame for `properties` and a body of `size` bytes.
pub(crate) fn encode_header(properties: &Properties, size: u64) -> Result<Vec<u8>, WireError> {
    let mut e = Enc::default();
    e.u16(CLASS_BASIC).u16(0).u64(size);
    let p = properties;
    let mut flags = 0u16;
    let mut list = Enc::default();
    let mut flag = |bit: u16, present: bool| {
        if present {
            flags |= 1 << bit;
        }
    };
    flag(15, p.content_type.is_some());
    flag(14, p.content_encoding.is_some());
    flag(13, p.headers.is_some());
    flag(12, p.delivery_mode.is_some());
    flag(11, p.priority.is_some());
    flag(10, p.correlation_id.is_some());
    flag(9, p.reply_to.is_some());
    flag(8, p.expiration.is_some());
    flag(7, p.message_id.is_some());
    flag(6, p.timestamp.is_some());
    flag(5, p.kind.is_some());
    flag(4, p.user_id.is_some());
    flag(3, p.app_id.is_some());
    flag(2, p.cluster_id.is_some());
    for s in [&p.content_type, &p.content_encoding].into_iter().flatten() {
        list.shortstr(s)?;
    }
    if let Some(h) = &p.headers {
        list.table(h)?;
    }
    for v in [p.delivery_mode, p.priority].into_iter().flatten() {
        list.u8(v);
    }
    for s in [&p.correlation_id, &p.reply_to, &p.expiration, &p.message_id]
        .into_iter()
        .flatten()
    {
        list.shortstr(s)?;
    }
    if let Some(t) = p.timestamp {
        list.u64(t);
    }
    for s in [&p.kind, &p.user_id, &p.app_id, &p.cluster_id]
        .into_iter()
        .flatten()
    {
        list.shortstr(s)?;
    }
    e.u16(flags);
    e.buf.extend_from_slice(&list.buf);
    Ok(e.buf)
}

// ===== decoding =====

/// Reads AMQP primitives from a byte slice; every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    bits: Option<(u8, u8)>,
}

fn short(what: &str) -> WireError {
    WireError::Protocol(format!("truncated {what}"))
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec {
            buf,
            pos: 0,
            bits: None,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        self.bits = None;
        if self.remaining() < n {
            return Err(short(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let s = self.take(N, what)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>("octet")?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array("short")?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array("long")?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array("long long")?))
    }
    pub(crate) fn bit(&mut self) -> Result<bool, WireError> {
        let (octet, n) = match self.bits {
            Some((octet, n)) if n < 8 => (octet, n),
            _ => (self.u8()?, 0),
        };
        self.bits = Some((octet, n + 1));
        Ok(octet & (1 << n) != 0)
    }
    pub(crate) fn shortstr(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u8()?);
        let s = self.take(len, "short string")?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }
    pub(crate) fn longstr(&mut self) -> Result<Vec<u8>, WireError> {
        let len = self.u32()? as usize;
        Ok(self.take(len, "long string")?.to_vec())
    }
    pub(crate) fn table(&mut self) -> Result<FieldTable, WireError> {
        let len = self.u32()? as usize;
        let inner = self.take(len, "field table")?;
        decode_table_body(inner, 0)
    }
}

/// Nesting limit of tables and arrays: deeper input is refused, never a stack overflow.
const MAX_DEPTH: usize = 64;

fn decode_table_body(buf: &[u8], depth: usize) -> Result<FieldTable, WireError> {
    let mut d = Dec::new(buf);
    let mut t = FieldTable::new();
    while d.remaining() > 0 {
        let name = d.shortstr()?;
        let v = decode_value(&mut d, depth)?;
        t.insert(name, v);
    }
    Ok(t)
}

fn decode_value(d: &mut Dec<'_>, depth: usize) -> Result<FieldValue, WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::Protocol(
            "field table nested too deep".to_owned(),
        ));
    }
    let tag = d.u8()?;
    Ok(match tag {
        b't' => FieldValue::Bool(d.u8()? != 0),
        b'b' => FieldValue::I8(i8::from_be_bytes(d.array("value")?)),
        b'B' => FieldValue::U8(d.u8()?),
        b's' | b'U' => FieldValue::I16(i16::from_be_bytes(d.array("value")?)),
        b'u' => FieldValue::U16(d.u16()?),
        b'I' => FieldValue::I32(i32::from_be_bytes(d.array("value")?)),
        b'i' => FieldValue::U32(d.u32()?),
        b'l' => FieldValue::I64(i64::from_be_bytes(d.array("value")?)),
        b'L' => FieldValue::I64L(i64::from_be_bytes(d.array("value")?)),
        b'f' => FieldValue::F32(f32::from_be_bytes(d.array("value")?)),
        b'd' => FieldValue::F64(f64::from_be_bytes(d.array("value")?)),
        b'D' => FieldValue::Decimal {
            scale: d.u8()?,
            value: i32::from_be_bytes(d.array("value")?),
        },
        b'S' => FieldValue::LongStr(d.longstr()?),
        b'x' => FieldValue::Bytes(d.longstr()?),
        b'A' => {
            let len = d.u32()? as usize;
            let mut inner = Dec::new(d.take(len, "field array")?);
            let mut items = Vec::new();
            while inner.remaining() > 0 {
                items.push(decode_value(&mut inner, depth + 1)?);
            }
            FieldValue::Array(items)
        }
        b'T' => FieldValue::Timestamp(d.u64()?),
        b'F' => {
            let len = d.u32()? as usize;
            FieldValue::Table(decode_table_body(d.take(len, "field table")?, depth + 1)?)
        }
        b'V' => FieldValue::Void,
        other => {
            return Err(WireError::Protocol(format!(
                "unknown field type tag {:?} (0x{other:02x})",
                char::from(other)
            )));
        }
    })
}

/// Decodes a content header payload: (class, body size, properties). A headers table that
/// cannot be decoded is skipped (it is length-prefixed) and reported in `malformed`, so the
/// other properties and the body still arrive; only a header too short to frame the body is
/// an error.
pub(crate) fn decode_header(payload: &[u8]) -> Result<(u16, u64, DecodedProperties), WireError> {
    let mut d = Dec::new(payload);
    let class = d.u16()?;
    let _weight = d.u16()?;
    let size = d.u64()?;
    let mut out = DecodedProperties::default();
    if let Err(e) = decode_properties(&mut d, &mut out) {
        out.malformed = Some(match out.malformed.take() {
            Some(first) => format!("{first}; then {e}"),
            None => e.to_string(),
        });
    }
    Ok((class, size, out))
}

fn decode_properties(d: &mut Dec<'_>, out: &mut DecodedProperties) -> Result<(), WireError> {
    let mut flags = d.u16()?;
    // Continuation flag words (bit 0) carry no properties of class basic; skip them.
    let mut more = flags & 1 != 0;
    while more {
        more = d.u16()? & 1 != 0;
    }
    let has = |bit: u16| flags & (1 << bit) != 0;
    let p = &mut out.properties;
    if has(15) {
        p.content_type = Some(d.shortstr()?);
    }
    if has(14) {
        p.content_encoding = Some(d.shortstr()?);
    }
    if has(13) {
        let len = d.u32()? as usize;
        let raw = d.take(len, "headers table")?;
        match decode_table_body(raw, 0) {
            Ok(t) => p.headers = Some(t),
            Err(e) => {
                out.malformed = Some(format!("undecodable headers table ({len} bytes): {e}"));
            }
        }
    }
    if has(12) {
        p.delivery_mode = Some(d.u8()?);
    }
    if has(11) {
        p.priority = Some(d.u8()?);
    }
    if has(10) {
        p.correlation_id = Some(d.shortstr()?);
    }
    if has(9) {
        p.reply_to = Some(d.shortstr()?);
    }
    if has(8) {
        p.expiration = Some(d.shortstr()?);
    }
    if has(7) {
        p.message_id = Some(d.shortstr()?);
    }
    if has(6) {
        p.timestamp = Some(d.u64()?);
    }
    if has(5) {
        p.kind = Some(d.shortstr()?);
    }
    if has(4) {
        p.user_id = Some(d.shortstr()?);
    }
    if has(3) {
        p.app_id = Some(d.shortstr()?);
    }
    if has(2) {
        p.cluster_id = Some(d.shortstr()?);
    }
    flags &= !1;
    let _ = flags;
    Ok(())
}

// ===== methods =====

/// The methods a client receives (the rest are [`Method::Other`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Method {
    ConnectionStart {
        mechanisms: String,
    },
    ConnectionTune {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    ConnectionOpenOk,
    ConnectionClose(CloseReason),
    ConnectionCloseOk,
    ConnectionBlocked {
        reason: String,
    },
    ConnectionUnblocked,
    ChannelOpenOk,
    ChannelFlow {
        active: bool,
    },
    ChannelClose(CloseReason),
    ChannelCloseOk,
    ExchangeDeclareOk,
    ExchangeDeleteOk,
    QueueDeclareOk {
        queue: String,
        messages: u32,
        consumers: u32,
    },
    QueueBindOk,
    QueueUnbindOk,
    QueuePurgeOk {
        messages: u32,
    },
    QueueDeleteOk {
        messages: u32,
    },
    BasicQosOk,
    BasicConsumeOk {
        consumer_tag: String,
    },
    BasicCancelOk {
        consumer_tag: String,
    },
    BasicCancel {
        consumer_tag: String,
    },
    BasicReturn {
        reply_code: u16,
        reply_text: String,
        exchange: String,
        routing_key: String,
    },
    BasicDeliver {
        consumer_tag: String,
        delivery_tag: u64,
        redelivered: bool,
        exchange: String,
        routing_key: String,
    },
    BasicGetOk {
        delivery_tag: u64,
        redelivered: bool,
        exchange: String,
        routing_key: String,
    },
    BasicGetEmpty,
    BasicAck {
        delivery_tag: u64,
        multiple: bool,
    },
    BasicNack {
        delivery_tag: u64,
        multiple: bool,
    },
    BasicRecoverOk,
    ConfirmSelectOk,
    Other {
        class: u16,
        method: u16,
    },
}

/// Why a peer closed a connection or channel (`connection.close`, `channel.close`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// Reply code (200 normal, 403 access refused, 404 not found, 406 precondition failed,
    /// 530 not allowed, 320 forced, ...).
    pub code: u16,
    /// Reply text (RabbitMQ: `NOT_FOUND - no queue 'x' in vhost '/'`).
    pub text: String,
    /// Class of the method that caused it (0 if none).
    pub class: u16,
    /// Method id of the method that caused it.
    pub method: u16,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)?;
        if self.class != 0 {
            write!(f, " (on method {}.{})", self.class, self.method)?;
        }
        Ok(())
    }
}

fn close_reason(d: &mut Dec<'_>) -> Result<CloseReason, WireError> {
    Ok(CloseReason {
        code: d.u16()?,
        text: d.shortstr()?,
        class: d.u16()?,
        method: d.u16()?,
    })
}

/// Decodes a method frame payload.
pub(crate) fn decode_method(payload: &[u8]) -> Result<Method, WireError> {
    let mut d = Dec::new(payload);
    let class = d.u16()?;
    let method = d.u16()?;
    Ok(match (class, method) {
        (10, 10) => {
            let _major = d.u8()?;
            let _minor = d.u8()?;
            let _server = d.table()?;
            let mechanisms = String::from_utf8_lossy(&d.longstr()?).into_owned();
            let _locales = d.longstr()?;
            Method::ConnectionStart { mechanisms }
        }
        (10, 30) => Method::ConnectionTune {
            channel_max: d.u16()?,
            frame_max: d.u32()?,
            heartbeat: d.u16()?,
        },
        (10, 41) => Method::ConnectionOpenOk,
        (10, 50) => Method::ConnectionClose(close_reason(&mut d)?),
        (10, 51) => Method::ConnectionCloseOk,
        (10, 60) => Method::ConnectionBlocked {
            reason: d.shortstr()?,
        },
        (10, 61) => Method::ConnectionUnblocked,
        (20, 11) => Method::ChannelOpenOk,
        (20, 20) => Method::ChannelFlow { active: d.bit()? },
        (20, 40) => Method::ChannelClose(close_reason(&mut d)?),
        (20, 41) => Method::ChannelCloseOk,
        (40, 11) => Method::ExchangeDeclareOk,
        (40, 21) => Method::ExchangeDeleteOk,
        (50, 11) => Method::QueueDeclareOk {
            queue: d.shortstr()?,
            messages: d.u32()?,
            consumers: d.u32()?,
        },
        (50, 21) => Method::QueueBindOk,
        (50, 51) => Method::QueueUnbindOk,
        (50, 31) => Method::QueuePurgeOk { messages: d.u32()? },
        (50, 41) => Method::QueueDeleteOk { messages: d.u32()? },
        (60, 11) => Method::BasicQosOk,
        (60, 21) => Method::BasicConsumeOk {
            consumer_tag: d.shortstr()?,
        },
        (60, 31) => Method::BasicCancelOk {
            consumer_tag: d.shortstr()?,
        },
        (60, 30) => Method::BasicCancel {
            consumer_tag: d.shortstr()?,
        },
        (60, 50) => Method::BasicReturn {
            reply_code: d.u16()?,
            reply_text: d.shortstr()?,
            exchange: d.shortstr()?,
            routing_key: d.shortstr()?,
        },
        (60, 60) => Method::BasicDeliver {
            consumer_tag: d.shortstr()?,
            delivery_tag: d.u64()?,
            redelivered: d.bit()?,
            exchange: d.shortstr()?,
            routing_key: d.shortstr()?,
        },
        (60, 71) => Method::BasicGetOk {
            delivery_tag: d.u64()?,
            redelivered: d.bit()?,
            exchange: d.shortstr()?,
            routing_key: d.shortstr()?,
        },
        (60, 72) => Method::BasicGetEmpty,
        (60, 80) => Method::BasicAck {
            delivery_tag: d.u64()?,
            multiple: d.bit()?,
        },
        (60, 120) => Method::BasicNack {
            delivery_tag: d.u64()?,
            multiple: d.bit()?,
        },
        (60, 111) => Method::BasicRecoverOk,
        (85, 11) => Method::ConfirmSelectOk,
        (class, method) => Method::Other { class, method },
    })
}

/// One frame: type, channel, payload.
pub(crate) fn encode_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_type() -> FieldTable {
        let mut inner = FieldTable::new();
        inner.insert("k".to_owned(), FieldValue::str("v"));
        let mut t = FieldTable::new();
        let values = [
            FieldValue::Bool(true),
            FieldValue::I8(-5),
            FieldValue::U8(250),
            FieldValue::I16(-30_000),
            FieldValue::U16(60_000),
            FieldValue::I32(-2_000_000_000),
            FieldValue::U32(4_000_000_000),
            FieldValue::I64(-9_000_000_000),
            FieldValue::I64L(5_000_000_000),
            FieldValue::F32(1.5),
            FieldValue::F64(-2.25),
            FieldValue::Decimal {
                scale: 2,
                value: 12345,
            },
            FieldValue::str("héllo"),
            FieldValue::Bytes(vec![0, 255, 7]),
            FieldValue::Array(vec![FieldValue::Void, FieldValue::I32(1)]),
            FieldValue::Timestamp(1_700_000_000),
            FieldValue::Table(inner),
            FieldValue::Void,
        ];
        for (i, v) in values.into_iter().enumerate() {
            t.insert(format!("f{i:02}"), v);
        }
        t
    }

    #[test]
    fn every_field_type_round_trips() {
        let t = every_type();
        let mut e = Enc::default();
        e.table(&t).unwrap();
        let mut d = Dec::new(&e.buf);
        assert_eq!(d.table().unwrap(), t);
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn py_amqp_and_rabbitmq_tags_read_as_rabbitmq_reads_them() {
        // name "n", tag, value
        let cases: [(&[u8], FieldValue); 4] = [
            (b"L\xff\xff\xff\xff\xff\xff\xff\xfe", FieldValue::I64L(-2)),
            (
                b"l\x00\x00\x00\x01\x00\x00\x00\x00",
                FieldValue::I64(1 << 32),
            ),
            (b"U\xff\xfe", FieldValue::I16(-2)),
            (b"s\x00\x07", FieldValue::I16(7)),
        ];
        for (raw, want) in cases {
            let mut body = vec![1, b'n'];
            body.extend_from_slice(raw);
            let mut buf = (body.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&body);
            let t = Dec::new(&buf).table().unwrap();
            assert_eq!(t["n"], want);
        }
    }

    #[test]
    fn truncated_and_garbage_input_are_errors_not_panics() {
        let mut e = Enc::default();
        e.table(&every_type()).unwrap();
        for cut in 0..e.buf.len() {
            assert!(Dec::new(&e.buf[..cut]).table().is_err(), "cut at {cut}");
        }
        // An unknown tag.
        let buf = [0, 0, 0, 3, 1, b'n', b'Z'];
        let err = Dec::new(&buf).table().unwrap_err();
        assert!(err.to_string().contains("unknown field type tag"), "{err}");
        // A length beyond the input.
        assert!(Dec::new(&[0xff, 0xff, 0xff, 0xff, 1]).table().is_err());
        // Nesting beyond the limit.
        let mut v = FieldValue::Void;
        for _ in 0..100 {
            v = FieldValue::Array(vec![v]);
        }
        let mut t = FieldTable::new();
        t.insert("deep".to_owned(), v);
        let mut e = Enc::default();
        e.table(&t).unwrap();
        assert!(Dec::new(&e.buf).table().is_err());
        // Arbitrary bytes never panic.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = Dec::new(&bytes).table();
            let _ = decode_method(&bytes);
            let _ = decode_header(&bytes);
        }
    }

    #[test]
    fn properties_round_trip_and_a_bad_headers_table_is_skipped() {
        let p = Properties {
            content_type: Some("application/json".to_owned()),
            content_encoding: Some("utf-8".to_owned()),
            headers: Some(every_type()),
            delivery_mode: Some(2),
            priority: Some(7),
            correlation_id: Some("id".to_owned()),
            reply_to: Some("r".to_owned()),
            expiration: Some("1000".to_owned()),
            message_id: Some("m".to_owned()),
            timestamp: Some(5),
            kind: Some("t".to_owned()),
            user_id: Some("guest".to_owned()),
            app_id: Some("a".to_owned()),
            cluster_id: Some("c".to_owned()),
        };
        let raw = encode_header(&p, 42).unwrap();
        let (class, size, got) = decode_header(&raw).unwrap();
        assert_eq!((class, size), (CLASS_BASIC, 42));
        assert_eq!(got.properties, p);
        assert_eq!(got.malformed, None);

        // content_type, headers with an unknown tag, then correlation_id.
        let mut e = Enc::default();
        e.u16(CLASS_BASIC).u16(0).u64(3);
        e.u16((1 << 15) | (1 << 13) | (1 << 10));
        e.shortstr("application/json").unwrap();
        e.u32(3).u8(1).u8(b'n').u8(b'Z');
        e.shortstr("the-id").unwrap();
        let (_, size, got) = decode_header(&e.buf).unwrap();
        assert_eq!(size, 3);
        assert_eq!(got.properties.headers, None);
        assert_eq!(got.properties.correlation_id.as_deref(), Some("the-id"));
        assert!(got.malformed.unwrap().contains("headers table"));

        // A property list cut short still frames the body.
        let (_, size, got) = decode_header(&raw[..raw.len() - 3]).unwrap();
        assert_eq!(size, 42);
        assert!(got.malformed.is_some());
        // A header without even its size is an error.
        assert!(decode_header(&raw[..6]).is_err());
    }

    #[test]
    fn methods_decode_and_bits_pack() {
        let mut e = Enc::method(60, 60);
        e.shortstr("ctag").unwrap();
        e.u64(9).bit(true);
        e.shortstr("").unwrap().shortstr("q").unwrap();
        assert_eq!(
            decode_method(&e.buf).unwrap(),
            Method::BasicDeliver {
                consumer_tag: "ctag".to_owned(),
                delivery_tag: 9,
                redelivered: true,
                exchange: String::new(),
                routing_key: "q".to_owned(),
            }
        );
        let mut e = Enc::method(50, 10);
        e.bit(false).bit(true).bit(false).bit(true).bit(true);
        assert_eq!(e.buf[4], 0b11010);
        let mut e = Enc::method(10, 50);
        e.u16(403)
            .shortstr("ACCESS_REFUSED - Login was refused")
            .unwrap();
        e.u16(10).u16(11);
        let Method::ConnectionClose(r) = decode_method(&e.buf).unwrap() else {
            panic!("not a close")
        };
        assert_eq!(r.code, 403);
        assert!(r.to_string().contains("ACCESS_REFUSED"));
        assert!(decode_method(&[0, 60]).is_err());
        assert!(Enc::default().shortstr(&"x".repeat(256)).is_err());
    }

    #[test]
    fn fuzz_frames() {
        let mut table = Enc::default();
        table.table(&every_type()).unwrap();
        let header = encode_header(
            &Properties {
                content_type: Some("application/json".to_owned()),
                content_encoding: Some("utf-8".to_owned()),
                headers: Some(every_type()),
                delivery_mode: Some(2),
                priority: Some(3),
                correlation_id: Some("id".to_owned()),
                reply_to: Some("q".to_owned()),
                timestamp: Some(1_700_000_000),
                ..Properties::default()
            },
            42,
        )
        .unwrap();
        // basic.deliver: consumer tag, delivery tag, redelivered, exchange, routing key.
        let mut deliver = Enc::method(60, 60);
        deliver
            .shortstr("ctag")
            .unwrap()
            .u64(7)
            .bit(true)
            .shortstr("")
            .unwrap()
            .shortstr("celery")
            .unwrap();
        // connection.start: versions, server properties, mechanisms, locales.
        let mut start = Enc::method(10, 10);
        start
            .u8(0)
            .u8(9)
            .table(&every_type())
            .unwrap()
            .longstr(b"PLAIN AMQPLAIN")
            .unwrap()
            .longstr(b"en_US")
            .unwrap();
        let seeds: [&[u8]; 4] = [&table.buf, &header, &deliver.buf, &start.buf];
        celeriac_test::fuzz::fuzz(
            "amqp_frames",
            &seeds,
            &[b"\x00\x3c", b"L", b"F", b"A"],
            |input| {
                let _ = Dec::new(input).table();
                let _ = decode_method(input);
                if let Ok((_, _, p)) = decode_header(input) {
                    // What was read encodes again.
                    let _ = encode_header(&p.properties, 1);
                }
            },
        );
    }
}
