//! A small async memcached client: the text protocol over tokio TCP, one pipelined connection
//! per server, keys spread over several servers as pymemcache (Celery 5.7's library) or
//! python-memcached spreads them ([`Distribution`]).
//!
//! It does what the result backend needs and little more: `get` (also of many keys in one
//! request per server), `gets`/`cas` for updates that must not lose a race, `set`, `add`,
//! `incr`, `delete`, a compare-and-delete (the meta command `md` with a CAS unique, memcached
//! 1.6 and later), `touch`, `stats`. Every request has a timeout; a lost connection is
//! opened again on the next request, and requests that may be repeated safely (`get`, `set`,
//! `delete`, `touch`) are sent once more on the new connection when the old one turns out to
//! be gone (after a server restart, the first write on the old connection fails).
//!
//! ```no_run
//! # async fn demo() -> celeriac_core::Result<()> {
//! use celeriac_memcached::client::{Client, ClientOptions, flags};
//!
//! let client = Client::new(&["127.0.0.1:11211".to_owned()], ClientOptions::default())?;
//! client.set("greeting", flags::TEXT, b"hello", 60).await?;
//! let item = client.get("greeting").await?.expect("stored a moment ago");
//! assert_eq!(item.data, b"hello");
//! assert_eq!(client.incr("hits", 1).await?, None); // no such counter yet
//! # Ok(()) }
//! ```

mod conn;
mod hash;
mod proto;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celeriac_core::{Error, ErrorKind, Result};
use tokio::sync::oneshot;

pub use hash::Distribution;
pub use proto::{Item, MAX_KEY_LEN};

use conn::{Conn, Lost, Server};
use proto::{Expect, Reply};

/// The client flags python-memcached and pylibmc (Celery ≤ 5.6) store with a value to
/// remember its Python type (both libraries use the same bits), and read it back as that
/// type. pymemcache (Celery 5.7) as Celery sets it up has no serializer: it writes flags 0 and
/// hands back the stored bytes whatever the flags. So celeriac writes JSON documents as
/// [`TEXT`](flags::TEXT) (the older libraries get the `str` Celery stored, pymemcache the
/// same bytes) and counters as [`INTEGER`](flags::INTEGER).
pub mod flags {
    /// Plain bytes (`bytes` in Python 3).
    pub const BYTES: u32 = 0;
    /// A pickle. Never written by celeriac, and refused when read: unpickling runs code.
    pub const PICKLE: u32 = 1 << 0;
    /// An `int`, as its decimal digits.
    pub const INTEGER: u32 = 1 << 1;
    /// A Python 2 `long`, as its decimal digits.
    pub const LONG: u32 = 1 << 2;
    /// zlib-compressed (python-memcached's `min_compress_len`, pylibmc's `min_compress_len`);
    /// not supported by celeriac.
    pub const COMPRESSED: u32 = 1 << 3;
    /// A `str`, as UTF-8.
    pub const TEXT: u32 = 1 << 4;
}

/// memcached takes an expiry above 30 days as a Unix time, not a number of seconds.
const RELATIVE_EXPIRY_MAX: u64 = 60 * 60 * 24 * 30;

/// Timeouts and limits of a [`Client`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// How long opening a TCP connection may take (default 5 s).
    pub connect_timeout: Duration,
    /// How long a request may wait for its reply (default 5 s).
    pub timeout: Duration,
    /// The largest value sent (default 1 MiB, memcached's default item size, `-I`); larger
    /// ones are refused before they are sent. The server's own limit also counts the key and
    /// about 50 bytes of header, and is reported as the same error.
    pub max_value_size: usize,
    /// How keys are spread over several servers: as the Python library of the other clients
    /// does (default: pymemcache's, Celery 5.7's).
    pub distribution: Distribution,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            max_value_size: 1024 * 1024,
            distribution: Distribution::default(),
        }
    }
}

impl ClientOptions {
    /// With a connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// With a request timeout.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// With a rule for spreading keys over several servers.
    #[must_use]
    pub fn distribution(mut self, how: Distribution) -> Self {
        self.distribution = how;
        self
    }

    /// With a value size limit.
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }
}

/// What a `cas` (or a [`Client::delete_cas`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CasOutcome {
    /// Written (deleted, for [`Client::delete_cas`]).
    Stored,
    /// Someone changed the item since it was read: not written.
    Exists,
    /// The item is gone (deleted or expired): not written.
    NotFound,
}

/// Requests that may be sent again when the connection they went out on was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Safe,
    Never,
}

/// An async memcached client over one or more servers. Clones share the connections.
#[derive(Debug, Clone)]
pub struct Client {
    servers: Arc<[Server]>,
    /// The servers' `host:port` names, for hashing.
    names: Arc<[String]>,
    options: ClientOptions,
}

impl Client {
    /// A client of `servers` (`host:port`, `host` for port 11211, `[v6addr]:port`); connects on
    /// first use. The order matters when there are several: it decides which server holds
    /// which key, and must be the order every other client (Python's) uses.
    pub fn new(servers: &[String], options: ClientOptions) -> Result<Client> {
        if servers.is_empty() {
            return Err(Error::config("no memcached server given"));
        }
        let servers = servers
            .iter()
            .map(|s| normalize_addr(s).map(Server::new))
            .collect::<Result<Vec<_>>>()?;
        let names: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        Ok(Client {
            servers: servers.into(),
            names: names.into(),
            options,
        })
    }

    /// The servers' addresses, in order.
    pub fn servers(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// How many times a server was found restarted (a new process, empty) when the client
    /// connected to it again, over all servers.
    pub fn restarts(&self) -> u64 {
        self.servers.iter().map(Server::restarts).sum()
    }

    /// The server whose restart was noticed last, and when, if any was.
    pub fn last_restart(&self) -> Option<(String, std::time::Instant)> {
        self.servers
            .iter()
            .filter_map(|s| s.last_restart().map(|t| (s.addr.clone(), t)))
            .max_by_key(|(_, t)| *t)
    }

    /// The options.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn server_of(&self, key: &str) -> &Server {
        &self.servers[hash::server_for(key, &self.names, self.options.distribution)]
    }

    /// Connects to every server and returns their versions (`version`): a check that all are
    /// up.
    pub async fn version(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for s in self.servers.iter() {
            match self
                .call(s, proto::line(&["version"]), Expect::Line, Retry::Safe)
                .await?
            {
                Reply::Line(l) => out.push(l.trim_start_matches("VERSION ").to_owned()),
                other => return Err(unexpected(s, "version", &other)),
            }
        }
        Ok(out)
    }

    /// The item at `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Item>> {
        self.retrieve("get", key).await
    }

    /// The item at `key` with its CAS unique, for [`Client::cas`].
    pub async fn gets(&self, key: &str) -> Result<Option<Item>> {
        self.retrieve("gets", key).await
    }

    async fn retrieve(&self, cmd: &str, key: &str) -> Result<Option<Item>> {
        check_key(key)?;
        let s = self.server_of(key);
        match self
            .call(
                s,
                proto::retrieval(cmd, &[key]),
                Expect::Values,
                Retry::Safe,
            )
            .await?
        {
            Reply::Values(items) => Ok(items.into_iter().find(|i| i.key == key)),
            other => Err(unexpected(s, cmd, &other)),
        }
    }

    /// The items at `keys`, in order (`None` where there is none): one `get` per server,
    /// all sent before any reply is awaited.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Item>>> {
        for k in keys {
            check_key(k)?;
        }
        let mut by_server: Vec<Vec<&str>> = vec![Vec::new(); self.servers.len()];
        for k in keys {
            by_server[hash::server_for(k, &self.names, self.options.distribution)].push(k);
        }
        let mut asked = Vec::new();
        for (i, ks) in by_server.iter().enumerate() {
            if ks.is_empty() {
                continue;
            }
            let s = &self.servers[i];
            let bytes = proto::retrieval("get", ks);
            let (conn, fresh) = self.connect(s).await?;
            let rx = conn.send(bytes.clone(), Expect::Values);
            asked.push((s, conn, fresh, bytes, rx));
        }
        let mut found = std::collections::HashMap::new();
        for (s, conn, fresh, bytes, rx) in asked {
            let reply = match self.finish(s, &conn, rx, "get").await {
                Ok(r) => r,
                Err(Failure::Lost(_)) if !fresh => {
                    self.call(s, bytes, Expect::Values, Retry::Never).await?
                }
                Err(f) => return Err(f.into_error()),
            };
            match reply {
                Reply::Values(items) => {
                    for i in items {
                        found.insert(i.key.clone(), i);
                    }
                }
                other => return Err(unexpected(s, "get", &other)),
            }
        }
        Ok(keys
            .iter()
            .map(|k| found.get(k.as_str()).cloned())
            .collect())
    }

    /// Stores `data` at `key` with `flags`, for `expires` seconds (0: no expiry).
    pub async fn set(&self, key: &str, flags: u32, data: &[u8], expires: u64) -> Result<()> {
        match self
            .store("set", key, flags, data, expires, None, Retry::Safe)
            .await?
            .as_str()
        {
            "STORED" => Ok(()),
            other => Err(unexpected_line(self.server_of(key), "set", other)),
        }
    }

    /// Stores `data` at `key` unless there is an item there; `false` when there was.
    pub async fn add(&self, key: &str, flags: u32, data: &[u8], expires: u64) -> Result<bool> {
        match self
            .store("add", key, flags, data, expires, None, Retry::Never)
            .await?
            .as_str()
        {
            "STORED" => Ok(true),
            "NOT_STORED" => Ok(false),
            other => Err(unexpected_line(self.server_of(key), "add", other)),
        }
    }

    /// Stores `data` at `key` if the item is still the one read with CAS unique `cas`.
    pub async fn cas(
        &self,
        key: &str,
        flags: u32,
        data: &[u8],
        expires: u64,
        cas: u64,
    ) -> Result<CasOutcome> {
        match self
            .store("cas", key, flags, data, expires, Some(cas), Retry::Never)
            .await?
            .as_str()
        {
            "STORED" => Ok(CasOutcome::Stored),
            "EXISTS" => Ok(CasOutcome::Exists),
            "NOT_FOUND" => Ok(CasOutcome::NotFound),
            other => Err(unexpected_line(self.server_of(key), "cas", other)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn store(
        &self,
        cmd: &str,
        key: &str,
        flags: u32,
        data: &[u8],
        expires: u64,
        cas: Option<u64>,
        retry: Retry,
    ) -> Result<String> {
        check_key(key)?;
        let s = self.server_of(key);
        if data.len() > self.options.max_value_size {
            return Err(too_large(s, key, data.len(), self.options.max_value_size));
        }
        let bytes = proto::storage(cmd, key, flags, exptime(expires), data, cas);
        match self.call(s, bytes, Expect::Line, retry).await {
            Ok(Reply::Line(l)) => Ok(l),
            Ok(other) => Err(unexpected(s, cmd, &other)),
            Err(e) if e.to_string().contains("too large") => {
                Err(too_large(s, key, data.len(), self.options.max_value_size).with_source(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Adds `by` to the counter at `key` and returns the new value; `None` when there is no
    /// item at `key` (memcached's `incr` creates nothing). Fails when the item is not a
    /// decimal number.
    pub async fn incr(&self, key: &str, by: u64) -> Result<Option<u64>> {
        check_key(key)?;
        let s = self.server_of(key);
        // Never sent twice: the first may have counted.
        match self
            .call(
                s,
                proto::line(&["incr", key, &by.to_string()]),
                Expect::Number,
                Retry::Never,
            )
            .await?
        {
            Reply::Number(n) => Ok(Some(n)),
            Reply::Line(l) if l == "NOT_FOUND" => Ok(None),
            other => Err(unexpected(s, "incr", &other)),
        }
    }

    /// Deletes the item at `key`; `false` when there was none.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let s = self.server_of(key);
        match self
            .call(s, proto::line(&["delete", key]), Expect::Line, Retry::Safe)
            .await?
        {
            Reply::Line(l) if l == "DELETED" => Ok(true),
            Reply::Line(l) if l == "NOT_FOUND" => Ok(false),
            other => Err(unexpected(s, "delete", &other)),
        }
    }

    /// Deletes the item at `key` only if it is still the one read with CAS unique `cas`
    /// (memcached's meta delete, `md <key> C<cas>`, in memcached 1.6 and later):
    /// [`CasOutcome::Stored`] when it was deleted, [`CasOutcome::Exists`] when someone changed
    /// it since, [`CasOutcome::NotFound`] when it is gone. Never sent twice: the first may
    /// have deleted it.
    pub async fn delete_cas(&self, key: &str, cas: u64) -> Result<CasOutcome> {
        check_key(key)?;
        let s = self.server_of(key);
        let reply = self
            .call(
                s,
                proto::line(&["md", key, &format!("C{cas}")]),
                Expect::Line,
                Retry::Never,
            )
            .await
            .map_err(|e| {
                if e.to_string().ends_with(": ERROR") {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "memcached at {} does not know the meta delete command (`md`), \
                             which memcached 1.6 and later have",
                            s.addr
                        ),
                    )
                    .with_source(e)
                } else {
                    e
                }
            })?;
        match reply {
            Reply::Line(l) if l == "HD" => Ok(CasOutcome::Stored),
            Reply::Line(l) if l == "EX" => Ok(CasOutcome::Exists),
            Reply::Line(l) if l == "NF" => Ok(CasOutcome::NotFound),
            other => Err(unexpected(s, "md", &other)),
        }
    }

    /// Sets the expiry of the item at `key` to `expires` seconds from now (0: none); `false`
    /// when there is no item.
    pub async fn touch(&self, key: &str, expires: u64) -> Result<bool> {
        check_key(key)?;
        let s = self.server_of(key);
        let exp = exptime(expires).to_string();
        match self
            .call(
                s,
                proto::line(&["touch", key, &exp]),
                Expect::Line,
                Retry::Safe,
            )
            .await?
        {
            Reply::Line(l) if l == "TOUCHED" => Ok(true),
            Reply::Line(l) if l == "NOT_FOUND" => Ok(false),
            other => Err(unexpected(s, "touch", &other)),
        }
    }

    async fn connect(&self, s: &Server) -> Result<(Arc<Conn>, bool)> {
        s.connection(self.options.connect_timeout, self.options.timeout)
            .await
    }

    /// Sends one request to `s` and waits for its reply; a memcached error reply becomes an
    /// error.
    async fn call(
        &self,
        s: &Server,
        bytes: Vec<u8>,
        expect: Expect,
        retry: Retry,
    ) -> Result<Reply> {
        let what = String::from_utf8_lossy(
            &bytes[..bytes
                .iter()
                .position(|b| *b == b' ' || *b == b'\r')
                .unwrap_or(0)],
        )
        .into_owned();
        let (conn, fresh) = self.connect(s).await?;
        let again = (retry == Retry::Safe && !fresh).then(|| bytes.clone());
        let rx = conn.send(bytes, expect);
        match self.finish(s, &conn, rx, &what).await {
            Ok(r) => Ok(r),
            Err(Failure::Lost(why)) => match again {
                // The connection was an old one: the server may have restarted since. Once
                // more on a new connection.
                Some(bytes) => {
                    tracing::debug!(server = %s.addr, reason = %why, "memcached connection lost; sending {what} again");
                    let (conn, _) = self.connect(s).await?;
                    let rx = conn.send(bytes, expect);
                    self.finish(s, &conn, rx, &what)
                        .await
                        .map_err(Failure::into_error)
                }
                None => Err(Failure::Lost(why).into_error()),
            },
            Err(f) => Err(f.into_error()),
        }
    }

    async fn finish(
        &self,
        s: &Server,
        conn: &Arc<Conn>,
        rx: oneshot::Receiver<std::result::Result<Reply, Lost>>,
        what: &str,
    ) -> std::result::Result<Reply, Failure> {
        let lost = |why: String| {
            Failure::Lost(
                Error::new(
                    ErrorKind::Backend,
                    format!(
                        "lost the connection to memcached at {} during `{what}` ({why})",
                        s.addr
                    ),
                )
                .transient(),
            )
        };
        match tokio::time::timeout(self.options.timeout, rx).await {
            Ok(Ok(Ok(Reply::Error(text)))) => Err(Failure::Other(Error::new(
                ErrorKind::Backend,
                format!("memcached at {} refused `{what}`: {text}", s.addr),
            ))),
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(why))) => {
                s.discard(conn).await;
                Err(lost(why))
            }
            Ok(Err(_)) => {
                s.discard(conn).await;
                Err(lost("the connection's tasks stopped".to_owned()))
            }
            Err(_) => {
                // A server that stopped answering: the next request gets a new connection.
                s.discard(conn).await;
                Err(Failure::Other(
                    Error::new(
                        ErrorKind::Backend,
                        format!(
                            "memcached at {} did not answer `{what}` within {:.1}s",
                            s.addr,
                            self.options.timeout.as_secs_f64()
                        ),
                    )
                    .transient(),
                ))
            }
        }
    }
}

/// How a request failed.
enum Failure {
    /// The connection went away before the reply came.
    Lost(Error),
    /// Anything else.
    Other(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Lost(e) | Failure::Other(e) => e,
        }
    }
}

fn check_key(key: &str) -> Result<()> {
    proto::check_key(key).map_err(|m| Error::new(ErrorKind::Backend, m))
}

fn too_large(s: &Server, key: &str, len: usize, max: usize) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!(
            "value of {len} bytes for {key} is too large for memcached at {} (items are limited \
             to {max} bytes, the server's -I setting); not stored",
            s.addr
        ),
    )
}

fn unexpected(s: &Server, what: &str, reply: &Reply) -> Error {
    Error::protocol(format!(
        "memcached at {} answered `{what}` with {reply:?}",
        s.addr
    ))
}

fn unexpected_line(s: &Server, what: &str, line: &str) -> Error {
    Error::protocol(format!(
        "memcached at {} answered `{what}` with {line:?}",
        s.addr
    ))
}

/// memcached's exptime for an expiry of `secs` seconds: the seconds themselves up to 30 days,
/// a Unix time beyond (memcached reads larger numbers as one).
fn exptime(secs: u64) -> u64 {
    if secs <= RELATIVE_EXPIRY_MAX {
        secs
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        now + secs
    }
}

/// `host:port` for a server as Celery spells it (`host`, `host:port`, `[v6]:port`,
/// python-memcached's `inet:host:port`).
fn normalize_addr(s: &str) -> Result<String> {
    let s = s.trim();
    let s = s.strip_prefix("inet:").unwrap_or(s);
    if s.is_empty() {
        return Err(Error::config("an empty memcached server name"));
    }
    if s.starts_with("unix:") || s.starts_with('/') {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("memcached over a unix socket ({s}) is not supported; use host:port"),
        ));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let Some((host, port)) = rest.split_once(']') else {
            return Err(Error::config(format!("bad memcached server {s:?}")));
        };
        let port = match port.strip_prefix(':') {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| Error::config(format!("bad port in memcached server {s:?}")))?,
            None if port.is_empty() => 11211,
            None => return Err(Error::config(format!("bad memcached server {s:?}"))),
        };
        return Ok(format!("[{host}]:{port}"));
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| Error::config(format!("bad port in memcached server {s:?}")))?;
            Ok(format!("{host}:{port}"))
        }
        None => Ok(format!("{s}:11211")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(normalize_addr("h").unwrap(), "h:11211");
        assert_eq!(normalize_addr("h:1").unwrap(), "h:1");
        assert_eq!(normalize_addr("inet:h:2").unwrap(), "h:2");
        assert_eq!(normalize_addr("[::1]:3").unwrap(), "[::1]:3");
        assert_eq!(normalize_addr("[::1]").unwrap(), "[::1]:11211");
        assert!(normalize_addr("h:x").is_err());
        assert_eq!(
            normalize_addr("unix:/tmp/m.sock").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn long_expiries_become_unix_times() {
        assert_eq!(exptime(0), 0);
        assert_eq!(exptime(86_400), 86_400);
        assert_eq!(exptime(RELATIVE_EXPIRY_MAX), RELATIVE_EXPIRY_MAX);
        assert!(exptime(RELATIVE_EXPIRY_MAX + 1) > 1_700_000_000);
    }
}
