//! [`MemcachedBackend`]: Celery's cache result backend on memcached, spoken from Rust.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, ChordProtocol, timeout_error};
use celeriac_core::canvas::{ChordPart, ChordStatus};
use celeriac_core::protocol::codec::json_from_slice;
use celeriac_core::{BoxFuture, Config, Error, ErrorKind, Result, ResultBackend, TaskMeta};
use serde_json::{Value, json};

use crate::client::{CasOutcome, Client, ClientOptions, Item, flags};
use crate::poll::Poller;
use crate::url::parse_url;

/// Celery's `task_keyprefix`.
const TASK_PREFIX: &str = "celery-task-meta-";
/// Celery's `group_keyprefix`.
const GROUP_PREFIX: &str = "celery-taskset-meta-";
/// Celery's `chord_keyprefix`.
const CHORD_PREFIX: &str = "chord-unlock-";
/// How long the member completing a chord waits for the other members' results to show
/// (they were stored before their counts, so normally no wait at all).
const CHORD_JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a [`MemcachedBackend`] beyond its servers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemcachedOptions {
    /// The client's timeouts and value size limit.
    pub client: ClientOptions,
    /// How long results, groups and counters are kept (memcached's exptime; Celery's
    /// `result_expires`, default 1 day); `None` keeps them until memcached needs the memory.
    pub result_expires: Option<Duration>,
    /// The longest pause between two reads of a result `wait` polls (default 50 ms; the
    /// first reads come after 1, 2, 4, ... ms).
    pub poll_max_interval: Duration,
    /// Celery's `global_keyprefix` (`result_backend_transport_options`), put before every
    /// key, with a `_` after it unless it ends in one of `: _ - .`; a `global_keyprefix` in
    /// the URL wins.
    pub global_keyprefix: Option<String>,
}

impl Default for MemcachedOptions {
    fn default() -> Self {
        MemcachedOptions {
            client: ClientOptions::default(),
            result_expires: Some(Duration::from_secs(86_400)),
            poll_max_interval: Duration::from_millis(50),
            global_keyprefix: None,
        }
    }
}

impl MemcachedOptions {
    /// The settings of `config` (`result_expires`).
    pub fn from_config(config: &Config) -> Self {
        MemcachedOptions {
            result_expires: config.result_expires,
            ..Self::default()
        }
    }

    /// With client options.
    #[must_use]
    pub fn client(mut self, client: ClientOptions) -> Self {
        self.client = client;
        self
    }

    /// With a result expiry.
    #[must_use]
    pub fn result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }

    /// With Celery's `global_keyprefix`.
    #[must_use]
    pub fn global_keyprefix(mut self, prefix: impl Into<String>) -> Self {
        self.global_keyprefix = Some(prefix.into());
        self
    }

    /// With a longest poll interval for `wait`.
    #[must_use]
    pub fn poll_max_interval(mut self, interval: Duration) -> Self {
        self.poll_max_interval = interval;
        self
    }
}

/// A result backend on memcached, in the format of Celery's cache backend
/// (`cache+memcached://host:11211/`).
///
/// Clones share the client (one pipelined connection per server). See the [crate docs](crate)
/// for the keys, the values and what memcached does not keep.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use std::time::Duration;
/// use celeriac_core::{Config, ResultBackend, TaskMeta};
/// use celeriac_memcached::MemcachedBackend;
///
/// let backend =
///     MemcachedBackend::connect("cache+memcached://127.0.0.1:11211/", &Config::default()).await?;
/// backend.store(&TaskMeta::success("some-id", serde_json::json!(5))).await?;
/// let meta = backend.wait("some-id", Some(Duration::from_secs(5))).await?;
/// assert_eq!(meta.result, serde_json::json!(5));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemcachedBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    /// Seconds for memcached's exptime, 0 for none.
    expires_secs: u64,
    poll_max_interval: Duration,
    /// Celery's `global_keyprefix`, with its separator; empty for none.
    prefix: String,
    /// The shared poll of long waits.
    poller: Arc<Poller>,
    closed: AtomicBool,
}

impl MemcachedBackend {
    /// Opens the servers of a `cache+memcached://` URL with the settings of `config`, and
    /// checks that each one answers.
    ///
    /// Fails with [`ErrorKind::Config`] for a URL that names no server or a bad port, with
    /// [`ErrorKind::Backend`] (transient) when a server is unreachable.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::connect_with(url, MemcachedOptions::from_config(config)).await
    }

    /// Opens the servers of `url` with explicit options.
    pub async fn connect_with(url: &str, options: MemcachedOptions) -> Result<Self> {
        let parsed = parse_url(url)?;
        let client = Client::new(&parsed.servers, options.client)?;
        let mut prefix = parsed
            .keyprefix
            .or(options.global_keyprefix)
            .unwrap_or_default();
        // Celery's _add_global_keyprefix.
        if prefix.chars().last().is_some_and(|c| !":_-.".contains(c)) {
            prefix.push('_');
        }
        client.version().await?;
        Ok(MemcachedBackend {
            inner: Arc::new(Inner {
                client,
                expires_secs: options
                    .result_expires
                    .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                poll_max_interval: options.poll_max_interval,
                prefix,
                poller: Arc::default(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The client underneath, for raw reads and writes.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Celery's `global_keyprefix` with its separator; empty for none.
    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The key of a task's meta document, `celery-task-meta-<id>` (after the
    /// `global_keyprefix`, if any).
    pub fn task_key(&self, task_id: &str) -> String {
        task_key(&self.inner.prefix, task_id)
    }

    /// The key of a saved group, `celery-taskset-meta-<id>`.
    pub fn group_key(&self, group_id: &str) -> String {
        format!("{}{GROUP_PREFIX}{group_id}", self.inner.prefix)
    }

    /// The key of a chord's counter, `chord-unlock-<group id>`.
    pub fn chord_key(&self, group_id: &str) -> String {
        format!("{}{CHORD_PREFIX}{group_id}", self.inner.prefix)
    }

    /// Celery's `KeyValueStoreBackend.on_chord_part_return`: `incr` the chord's counter; the
    /// member that brings it to the header's size (the saved group's length) reads every
    /// member's result, deletes the counter and the group, and completes the chord.
    async fn chord_part(&self, part: ChordPart<'_>) -> Result<ChordStatus> {
        let gid = part.group_id;
        let Some(ids) = self.restore_group(gid).await? else {
            // Celery's worker fails the chord here; ours reports the missing group too.
            return Ok(ChordStatus::NotNative);
        };
        let key = self.chord_key(gid);
        let client = &self.inner.client;
        // Never repeated: the first may have counted.
        let Some(count) = client.incr(&key, 1).await? else {
            // No counter: not a chord sent through Celery's cache backend (or it expired).
            return Ok(ChordStatus::NotNative);
        };
        let size = ids.len() as u64;
        if count < size {
            // Celery refreshes the chord's keys on each part.
            let exp = self.inner.expires_secs;
            client.touch(&key, exp).await?;
            client.touch(&self.group_key(gid), exp).await?;
            return Ok(ChordStatus::Waiting);
        }
        if count > size {
            tracing::warn!(group_id = %gid, count, size, "chord counter incremented too many times");
            return Ok(ChordStatus::Waiting);
        }
        let mut parts = Vec::with_capacity(ids.len());
        for (id, got) in ids.iter().zip(self.get_many(&ids).await?) {
            match got {
                Some(meta) if meta.status.is_ready() => parts.push(meta),
                _ => parts.push(self.wait_for(id, Some(CHORD_JOIN_TIMEOUT)).await?),
            }
        }
        client.delete(&self.group_key(gid)).await?;
        client.delete(&key).await?;
        Ok(ChordStatus::Complete(parts))
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("memcached result backend"))
        } else {
            Ok(())
        }
    }

    async fn get_meta(&self, task_id: &str) -> Result<Option<TaskMeta>> {
        self.check_open()?;
        let key = self.task_key(task_id);
        match self.inner.client.get(&key).await? {
            Some(item) => decode_meta(&item).map(Some),
            None => Ok(None),
        }
    }

    /// Polls for a ready record: on its own after 1, 2, 4, ... ms while the interval is
    /// below `poll_max_interval`, then through the backend's shared poll, which reads every
    /// id waited on that long in one request per server and tick (see [`Poller`]). A server
    /// that is down does not end the wait (its errors are transient): the wait goes on to its
    /// deadline, and the timeout error then says the server was unreachable, or restarted (a
    /// result stored before the restart is lost).
    async fn wait_for(&self, task_id: &str, timeout: Option<Duration>) -> Result<TaskMeta> {
        self.check_open()?;
        let restarts = self.inner.client.restarts();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let max = self.inner.poll_max_interval;
        let mut interval = Duration::from_millis(1);
        let mut unreachable = None;
        while interval < max {
            unreachable = match self.get_meta(task_id).await {
                Ok(Some(meta)) if meta.status.is_ready() => return Ok(meta),
                Ok(_) => None,
                Err(e) if e.is_transient() => Some(e.to_string()),
                Err(e) => return Err(e),
            };
            let mut sleep = interval;
            if let Some(deadline) = deadline {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(self.timed_out(task_id, timeout, restarts, unreachable));
                }
                sleep = sleep.min(deadline - now);
            }
            tokio::time::sleep(sleep).await;
            interval *= 2;
            self.check_open()?;
        }
        let watch = self
            .inner
            .poller
            .watch(task_id, &self.inner.client, &self.inner.prefix, max);
        loop {
            let notified = watch.slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(meta) = watch.slot.found() {
                return Ok(meta);
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        let failing = self.inner.poller.failing().or(unreachable);
                        return Err(self.timed_out(task_id, timeout, restarts, failing));
                    }
                }
                None => notified.await,
            }
            self.check_open()?;
        }
    }

    /// The timeout error of a wait, saying what else is known: a restart during or before the
    /// wait, a server that did not answer.
    fn timed_out(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        restarts: u64,
        unreachable: Option<String>,
    ) -> Error {
        let mut text = timeout_error(task_id, timeout).to_string();
        if self.inner.client.restarts() != restarts {
            text.push_str(
                "; memcached restarted during the wait, so a result stored before the restart \
                 is lost",
            );
        } else if let Some((server, at)) = self.inner.client.last_restart() {
            text.push_str(&format!(
                "; memcached at {server} restarted {:.0}s ago, which lost every result stored \
                 before",
                at.elapsed().as_secs_f64()
            ));
        }
        if let Some(why) = unreachable {
            text.push_str(&format!("; memcached is unreachable ({why})"));
        }
        Error::new(ErrorKind::Timeout, text)
    }

    /// A counter update that may go below zero or start a new counter: read, compute, write
    /// back only if nobody wrote in between (`gets` + `cas`/`add`), again until it holds.
    async fn incr_cas(&self, key: &str, by: i64) -> Result<i64> {
        let client = &self.inner.client;
        let exp = self.inner.expires_secs;
        loop {
            match client.gets(key).await? {
                None => {
                    if client
                        .add(key, flags::INTEGER, by.to_string().as_bytes(), exp)
                        .await?
                    {
                        return Ok(by);
                    }
                }
                Some(item) => {
                    let now = parse_counter(key, &item)?;
                    let new = now.checked_add(by).ok_or_else(|| {
                        Error::new(ErrorKind::Backend, format!("counter {key} overflows"))
                    })?;
                    let cas = item.cas.unwrap_or_default();
                    let flags = if item.flags == flags::BYTES {
                        flags::BYTES
                    } else {
                        flags::INTEGER
                    };
                    match client
                        .cas(key, flags, new.to_string().as_bytes(), exp, cas)
                        .await?
                    {
                        CasOutcome::Stored => return Ok(new),
                        CasOutcome::Exists | CasOutcome::NotFound => {}
                    }
                }
            }
        }
    }
}

/// `<prefix>celery-task-meta-<id>`.
pub(crate) fn task_key(prefix: &str, task_id: &str) -> String {
    format!("{prefix}{TASK_PREFIX}{task_id}")
}

/// A stored document's bytes, checked against the flags the Python client wrote them with.
fn document<'a>(item: &'a Item, what: &str) -> Result<&'a [u8]> {
    match item.flags & !flags::TEXT {
        0 => Ok(&item.data),
        f if f & flags::PICKLE != 0 => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{what} at {} is a pickle (memcached flags {:#x}), which celeriac never reads; \
                 set Celery's result_serializer to json",
                item.key, item.flags
            ),
        )),
        f if f & flags::COMPRESSED != 0 => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{what} at {} is zlib-compressed (memcached flags {:#x}); celeriac reads \
                 uncompressed values only (leave min_compress_len unset)",
                item.key, item.flags
            ),
        )),
        _ => Err(Error::protocol(format!(
            "{what} at {} has memcached flags {:#x}, not a text document",
            item.key, item.flags
        ))),
    }
}

pub(crate) fn decode_meta(item: &Item) -> Result<TaskMeta> {
    let bytes = document(item, "the task meta")?;
    let v = json_from_slice(bytes)?;
    serde_json::from_value(v)
        .map_err(|e| Error::protocol("stored task meta is not celery's format").with_source(e))
}

fn parse_counter(key: &str, item: &Item) -> Result<i64> {
    std::str::from_utf8(&item.data)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::protocol(format!("counter {key} is not a decimal number")))
}

impl ResultBackend for MemcachedBackend {
    fn driver(&self) -> &'static str {
        "memcached"
    }

    /// Reads the stored state with its CAS unique and writes only if precedence allows and
    /// nobody wrote in between (`gets`, then `cas`, or `add` when there was nothing): a late
    /// STARTED never replaces SUCCESS even when the two race. Celery's own backend reads, then
    /// `set`s, and only guards SUCCESS.
    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let client = &self.inner.client;
            let key = self.task_key(&meta.task_id);
            let doc = serde_json::to_vec(meta)?;
            let exp = self.inner.expires_secs;
            loop {
                match client.gets(&key).await? {
                    None => {
                        if client.add(&key, flags::TEXT, &doc, exp).await? {
                            return Ok(true);
                        }
                    }
                    Some(item) => {
                        // A record we cannot read is replaced (it blocks nothing).
                        if let Ok(old) = decode_meta(&item) {
                            if !old.status.may_be_replaced_by(&meta.status) {
                                return Ok(false);
                            }
                        }
                        let cas = item.cas.unwrap_or_default();
                        match client.cas(&key, flags::TEXT, &doc, exp, cas).await? {
                            CasOutcome::Stored => return Ok(true),
                            CasOutcome::Exists | CasOutcome::NotFound => {}
                        }
                    }
                }
            }
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(self.get_meta(task_id))
    }

    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            self.check_open()?;
            if task_ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = task_ids.iter().map(|id| self.task_key(id)).collect();
            self.inner
                .client
                .get_many(&keys)
                .await?
                .into_iter()
                .map(|i| i.as_ref().map(decode_meta).transpose())
                .collect()
        })
    }

    /// Polls: memcached has no notifications. See the crate docs for the cost.
    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(self.wait_for(task_id, timeout))
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            self.inner.client.delete(&self.task_key(task_id)).await?;
            Ok(())
        })
    }

    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let tuple = celeriac_core::meta::group_tuple(group_id, task_ids);
            let doc = serde_json::to_vec(&json!({ "result": tuple }))?;
            self.inner
                .client
                .set(
                    &self.group_key(group_id),
                    flags::TEXT,
                    &doc,
                    self.inner.expires_secs,
                )
                .await
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            self.check_open()?;
            let Some(item) = self.inner.client.get(&self.group_key(group_id)).await? else {
                return Ok(None);
            };
            let v: Value = json_from_slice(document(&item, "the saved group")?)?;
            v.get("result")
                .and_then(celeriac_core::meta::group_tuple_members)
                .map(Some)
                .ok_or_else(|| {
                    Error::protocol("stored group is not celery's [[gid, parent], [members]]")
                })
        })
    }

    /// memcached's `incr` for a positive step on a counter that exists (one round trip);
    /// `add` to start a counter; `gets` + `cas` for a negative step (memcached's `decr`
    /// stops at 0) or a counter below zero (not a number to memcached).
    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move {
            self.check_open()?;
            let client = &self.inner.client;
            let key = &format!("{}{key}", self.inner.prefix);
            if by >= 0 {
                match client.incr(key, by.unsigned_abs()).await {
                    Ok(Some(n)) => {
                        return i64::try_from(n).map_err(|_| {
                            Error::new(ErrorKind::Backend, format!("counter {key} overflows"))
                        });
                    }
                    Ok(None) => {
                        if client
                            .add(
                                key,
                                flags::INTEGER,
                                by.to_string().as_bytes(),
                                self.inner.expires_secs,
                            )
                            .await?
                        {
                            return Ok(by);
                        }
                        // Someone started it first: count on theirs.
                    }
                    // A counter below zero is no number to memcached's incr.
                    Err(e) if e.to_string().contains("non-numeric") => {}
                    Err(e) => return Err(e),
                }
            }
            self.incr_cas(key, by).await
        })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        BackendCapabilities::none().chords(self).coordination(self)
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.poller.wake_all();
            Ok(())
        })
    }
}

/// Celery's chord counting on its cache backend, so chords complete whichever side's workers
/// run the header: the sender sets `chord-unlock-<gid>` to 0 (and saves the group), each
/// member's worker `incr`s it.
impl ChordProtocol for MemcachedBackend {
    fn set_chord_size<'a>(&'a self, group_id: &'a str, _size: usize) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            // Celery's CacheBackend._apply_chord_incr: `set(chord_key, 0)`, an int.
            self.inner
                .client
                .set(
                    &self.chord_key(group_id),
                    flags::INTEGER,
                    b"0",
                    self.inner.expires_secs,
                )
                .await
        })
    }

    fn chord_part_return<'a>(&'a self, part: ChordPart<'a>) -> BoxFuture<'a, Result<ChordStatus>> {
        Box::pin(async move {
            self.check_open()?;
            self.chord_part(part).await
        })
    }
}
