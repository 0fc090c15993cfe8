//! Where the server is and how to talk to it: [`RedisOptions`] and URL parsing.

use std::time::Duration;

use celeriac_core::config::TransportOptions;
use celeriac_core::url::redact;
use celeriac_core::{Config, Error, ErrorKind, Result};

/// Sentinels' default port, for `sentinel://host` without one.
pub(crate) const SENTINEL_PORT: u16 = 26379;

/// Settings of a Redis broker or result backend.
///
/// Defaults: a one hour visibility timeout, results kept one day, no key prefix, and 20 s of
/// reconnect attempts before an operation fails. Build them from a [`Config`] with
/// [`RedisOptions::from_config`]; a `global_keyprefix` in the URL's query wins over the one set
/// here. For a `sentinel://` URL, [`RedisOptions::master_name`] names the master to ask the
/// Sentinels for (kombu's transport option `master_name`).
///
/// ```
/// use std::time::Duration;
/// use celeriac_redis::RedisOptions;
///
/// let options = RedisOptions::default()
///     .visibility_timeout(Duration::from_secs(300))
///     .global_keyprefix("tenant-a:");
/// assert_eq!(options.get_visibility_timeout(), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    visibility_timeout: Duration,
    result_expires: Option<Duration>,
    global_keyprefix: String,
    retry_for: Duration,
    master_name: Option<String>,
    sentinel_username: Option<String>,
    sentinel_password: Option<Secret>,
    native_queues: Vec<String>,
}

/// A password: compared, cloned, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            visibility_timeout: Duration::from_secs(3600),
            result_expires: Some(Duration::from_secs(86_400)),
            global_keyprefix: String::new(),
            retry_for: Duration::from_secs(20),
            master_name: None,
            sentinel_username: None,
            sentinel_password: None,
            native_queues: Vec::new(),
        }
    }
}

impl RedisOptions {
    /// Defaults with the `visibility_timeout` and `result_expires` of `config`, and its
    /// `broker_transport_options` (a result backend then applies
    /// [`Config::backend_transport_options`] with [`RedisOptions::transport_options`]).
    pub fn from_config(config: &Config) -> Self {
        RedisOptions::default()
            .visibility_timeout(config.visibility_timeout)
            .result_expires(config.result_expires)
            .transport_options(&config.broker_transport_options)
    }

    /// Takes `master_name` and `sentinel_kwargs` from a transport options table (Celery's
    /// `broker_transport_options` or `result_backend_transport_options`), replacing the
    /// Sentinel settings held so far.
    #[must_use]
    pub fn transport_options(mut self, t: &TransportOptions) -> Self {
        self.master_name = t.master_name.clone();
        self.sentinel_username = t.sentinel_kwargs.username.clone();
        self.sentinel_password = t.sentinel_kwargs.password.clone().map(Secret);
        self.native_queues = t.native_queues.clone();
        self
    }

    /// Queue globs kept in celeriac's native layout (Redis Streams, see the crate docs)
    /// rather than kombu's lists: only for queues that no Python process sends to, serves or
    /// inspects. The transport option `native_queues`; a `native_queues=` parameter in the
    /// broker URL's query (globs separated by commas, percent-encoded) wins over it.
    #[must_use]
    pub fn native_queues<S: Into<String>>(mut self, globs: impl IntoIterator<Item = S>) -> Self {
        self.native_queues = globs.into_iter().map(Into::into).collect();
        self
    }

    /// The queue globs in the native layout.
    pub fn get_native_queues(&self) -> &[String] {
        &self.native_queues
    }

    /// kombu's `master_name`: the name the Sentinels of a `sentinel://` URL monitor the
    /// master under. Required by such a URL; ignored by the others.
    #[must_use]
    pub fn master_name(mut self, name: impl Into<String>) -> Self {
        self.master_name = Some(name.into());
        self
    }

    /// The Sentinels' own credentials (kombu's `sentinel_kwargs`), for Sentinels configured
    /// with a password; the URL's credentials are the master's. Never logged.
    #[must_use]
    pub fn sentinel_credentials(mut self, username: Option<&str>, password: Option<&str>) -> Self {
        self.sentinel_username = username.map(str::to_owned);
        self.sentinel_password = password.map(|p| Secret(p.to_owned()));
        self
    }

    /// kombu's `visibility_timeout`: how long a delivery stays in the `unacked` hash before any
    /// consumer puts it back in its queue. Every consumer of one Redis, Python or Rust, must use
    /// the same value.
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// How long results, groups and counters are kept; `None` keeps them for good.
    #[must_use]
    pub fn result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }

    /// kombu's and Celery's `global_keyprefix` transport option (see the crate docs for how
    /// each side applies it).
    #[must_use]
    pub fn global_keyprefix(mut self, prefix: impl Into<String>) -> Self {
        self.global_keyprefix = prefix.into();
        self
    }

    /// How long an operation keeps reconnecting after the connection dropped before it fails
    /// with a transient error.
    #[must_use]
    pub fn retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// The visibility timeout.
    pub fn get_visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// How long results are kept.
    pub fn get_result_expires(&self) -> Option<Duration> {
        self.result_expires
    }

    /// The global key prefix, as given (before Celery's `_` rule for result keys).
    pub fn get_global_keyprefix(&self) -> &str {
        &self.global_keyprefix
    }

    /// How long an operation retries a lost connection.
    pub fn get_retry_for(&self) -> Duration {
        self.retry_for
    }

    /// The master's name for Sentinel, if set.
    pub fn get_master_name(&self) -> Option<&str> {
        self.master_name.as_deref()
    }

    pub(crate) fn sentinel_auth(&self) -> (Option<&str>, Option<&str>) {
        (
            self.sentinel_username.as_deref(),
            self.sentinel_password.as_ref().map(|s| s.0.as_str()),
        )
    }
}

/// A parsed `redis://` URL: what the client library connects to, plus our own parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The URL handed to the `redis` crate (our query parameters removed, kombu's forms
    /// rewritten to its own).
    pub(crate) client_url: String,
    /// The URL as given, password replaced, for logs and errors.
    pub(crate) redacted: String,
    /// `global_keyprefix` from the query, if any.
    pub(crate) keyprefix: Option<String>,
    /// `native_queues` from the query (comma-separated globs), if any.
    pub(crate) native_queues: Option<Vec<String>>,
    /// The database number.
    pub(crate) db: i64,
    /// TLS settings, for `rediss://`.
    pub(crate) tls: Option<Tls>,
    /// For `sentinel://`: the Sentinels and how to reach the master they name. `client_url`
    /// is then the first Sentinel's address with the master's credentials, used by nothing.
    pub(crate) sentinel: Option<SentinelTarget>,
}

/// The Sentinels of a `sentinel://` list, in order, and the master's URL around the address
/// they give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelTarget {
    /// `(host, port)` of each Sentinel.
    pub(crate) sentinels: Vec<(String, u16)>,
    /// `redis://[userinfo@]`, the first URL's credentials as given.
    head: String,
    /// `/<db>[?<parameters for the redis crate>]`.
    tail: String,
}

impl SentinelTarget {
    /// The URL of the master at `host:port`, with the credentials and database of the list's
    /// first URL.
    pub(crate) fn master_url(&self, host: &str, port: u16) -> String {
        if host.contains(':') {
            format!("{}[{host}]:{port}{}", self.head, self.tail)
        } else {
            format!("{}{host}:{port}{}", self.head, self.tail)
        }
    }
}

/// `host[:port]` or `[v6]:port`, with `default` for a missing port.
fn host_port(s: &str, default: u16) -> std::result::Result<(String, u16), String> {
    let (host, port) = match s.strip_prefix('[') {
        Some(r) => {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("unclosed [ in {s:?}"))?;
            (h, after.strip_prefix(':'))
        }
        None => match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        },
    };
    if host.is_empty() {
        return Err("a sentinel without a host".to_owned());
    }
    let port = match port {
        None | Some("") => default,
        Some(p) => p
            .parse()
            .map_err(|_| format!("port must be a number, not {p:?}"))?,
    };
    Ok((host.to_owned(), port))
}

/// Parses kombu's Sentinel list `sentinel://[[user]:password@]host[:port][/db][?…];
/// sentinel://host2[:port];…`: every URL gives a Sentinel (port 26379 by default); the
/// first one's credentials, database and parameters are the master's, as in kombu.
fn parse_sentinels(url: &str, kind: ErrorKind) -> Result<Target> {
    let redacted = redact(url);
    let bad = |why: &str| Error::new(kind, format!("invalid sentinel url {redacted}: {why}"));
    let parts: Vec<&str> = url
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let mut sentinels = Vec::with_capacity(parts.len());
    for part in &parts {
        let rest = part
            .strip_prefix("sentinel://")
            .ok_or_else(|| bad("every url of the list must start with sentinel://"))?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        sentinels.push(host_port(host, SENTINEL_PORT).map_err(|e| bad(&e))?);
    }
    let first = parts
        .first()
        .and_then(|p| p.strip_prefix("sentinel://"))
        .ok_or_else(|| bad("no sentinel"))?;
    if first.contains("ssl_") {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "cannot use {redacted}: TLS to Redis through Sentinel is not supported (use \
                 rediss:// to one server, or a TLS tunnel such as stunnel on each host)"
            ),
        ));
    }
    let mut target = parse_shown(&format!("redis://{first}"), &redacted, kind)?;
    let after_scheme = &target.client_url["redis://".len()..];
    let (authority, tail) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
    let head = match authority.rsplit_once('@') {
        Some((userinfo, _)) => format!("redis://{userinfo}@"),
        None => "redis://".to_owned(),
    };
    target.sentinel = Some(SentinelTarget {
        sentinels,
        head,
        tail: format!("/{tail}"),
    });
    Ok(target)
}

/// How a `rediss://` connection checks the server, from kombu's and Celery's URL parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Tls {
    /// Whether the server's certificate is verified (`ssl_cert_reqs` `required` or
    /// `optional`; not for `none`).
    pub(crate) verify: bool,
    /// `ssl_ca_certs`: a PEM file of the CA to trust instead of the system's.
    pub(crate) ca_certs: Option<String>,
    /// `ssl_certfile` and `ssl_keyfile`: a client certificate and its key (PEM), for servers
    /// that authenticate clients.
    pub(crate) certfile: Option<String>,
    pub(crate) keyfile: Option<String>,
}

/// kombu's and Celery's spellings of `ssl_cert_reqs`: Python's `ssl.CERT_*` names, any case,
/// with or without the prefix. `optional` verifies like `required`: Python's client side does
/// the same (a server always presents a certificate).
fn cert_reqs(v: &str) -> Option<bool> {
    let v = v.to_ascii_lowercase();
    match v.strip_prefix("cert_").unwrap_or(&v) {
        "required" | "optional" => Some(true),
        "none" => Some(false),
        _ => None,
    }
}

/// Parses the URL forms kombu and Celery accept:
///
/// - `redis://[[user]:password@]host[:port][/db]` (db also as `?virtual_host=N`),
/// - `rediss://…` (TLS, with feature `tls`) and its parameters `ssl_cert_reqs`
///   (`required` by default, `optional`, `none`, or Python's `CERT_*` names), `ssl_ca_certs`,
///   `ssl_certfile`, `ssl_keyfile` (paths, percent-encoded); without the feature, a clear
///   error,
/// - `unix:///path/redis.sock?db=N`, kombu's `redis+socket:///path?virtual_host=N` and
///   Celery's `socket:///path?db=N`.
///
/// - kombu's Sentinel list `sentinel://host:26379[/db];sentinel://host2:26379;…` (see
///   [`parse_sentinels`]).
///
/// `global_keyprefix=<text>` in the query sets the key prefix.
pub(crate) fn parse_url(url: &str, kind: ErrorKind) -> Result<Target> {
    if url.starts_with("sentinel://") {
        return parse_sentinels(url, kind);
    }
    parse_shown(url, &redact(url), kind)
}

/// [`parse_url`] of one URL, shown as `redacted` in errors.
fn parse_shown(url: &str, redacted: &str, kind: ErrorKind) -> Result<Target> {
    let redacted = redacted.to_owned();
    let bad = |why: &str| Error::new(kind, format!("invalid redis url {redacted}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("no scheme (expected redis://host:port/db)"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let mut keyprefix = None;
    let mut native_queues = None;
    let mut db: Option<String> = None;
    let mut passthrough = Vec::new();
    let mut tls = Tls {
        verify: true,
        ..Tls::default()
    };
    let mut tls_params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "global_keyprefix" => keyprefix = Some(percent_decode(v).map_err(|e| bad(&e))?),
            "native_queues" => {
                let globs = percent_decode(v).map_err(|e| bad(&e))?;
                native_queues = Some(
                    globs
                        .split(',')
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect(),
                );
            }
            "virtual_host" | "db" => db = Some(v.to_owned()),
            "ssl_cert_reqs" => {
                tls.verify = cert_reqs(v).ok_or_else(|| {
                    bad(&format!(
                        "ssl_cert_reqs must be required, optional or none \
                         (or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE), not {v:?}"
                    ))
                })?;
                tls_params.push(k);
            }
            "ssl_ca_certs" | "ssl_certfile" | "ssl_keyfile" => {
                let path = percent_decode(v).map_err(|e| bad(&e))?;
                if path.is_empty() {
                    return Err(bad(&format!("{k} needs a file path")));
                }
                match k {
                    "ssl_ca_certs" => tls.ca_certs = Some(path),
                    "ssl_certfile" => tls.certfile = Some(path),
                    _ => tls.keyfile = Some(path),
                }
                tls_params.push(k);
            }
            _ => passthrough.push(pair.to_owned()),
        }
    }
    let (client_scheme, authority, path, unix) = match scheme {
        "redis" => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            ("redis", authority, path, false)
        }
        "rediss" if cfg!(feature = "tls") => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            ("rediss", authority, path, false)
        }
        "rediss" => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot use {redacted}: TLS (rediss://) needs celeriac-redis's `tls` \
                     feature (the celeriac facade's `redis` feature enables it); or use a TLS \
                     tunnel (stunnel, spiped) to a redis:// address"
                ),
            ));
        }
        "unix" | "redis+socket" | "socket" | "redis+unix" => ("unix", "", rest, true),
        other => return Err(bad(&format!("unknown scheme {other:?}"))),
    };
    let tls = if client_scheme == "rediss" {
        if tls.certfile.is_some() != tls.keyfile.is_some() {
            return Err(bad("ssl_certfile and ssl_keyfile go together"));
        }
        Some(tls)
    } else {
        if let Some(k) = tls_params.first() {
            return Err(bad(&format!(
                "{k} is a TLS setting: use rediss:// for a TLS connection"
            )));
        }
        None
    };
    let db_text = if unix {
        db.unwrap_or_default()
    } else {
        // kombu: the path is the "virtual host"; `/` or nothing is db 0.
        let p = path.trim_matches('/');
        if p.is_empty() {
            db.unwrap_or_default()
        } else {
            p.to_owned()
        }
    };
    let db_num: i64 = if db_text.is_empty() {
        0
    } else {
        db_text
            .parse()
            .map_err(|_| bad(&format!("database must be a number, not {db_text:?}")))?
    };
    if db_num < 0 {
        return Err(bad("database must not be negative"));
    }
    let client_url = if unix {
        if path.is_empty() || !path.starts_with('/') {
            return Err(bad(
                "a unix socket url needs an absolute path, e.g. unix:///run/redis.sock",
            ));
        }
        let mut q = vec![format!("db={db_num}")];
        q.extend(passthrough);
        format!("unix://{path}?{}", q.join("&"))
    } else {
        if authority
            .rsplit_once('@')
            .map_or(authority, |(_, h)| h)
            .is_empty()
        {
            return Err(bad("no host"));
        }
        let mut u = format!("{client_scheme}://{authority}/{db_num}");
        if !passthrough.is_empty() {
            u.push('?');
            u.push_str(&passthrough.join("&"));
        }
        if tls.as_ref().is_some_and(|t| !t.verify) {
            // The redis crate's spelling of "do not verify the server".
            u.push_str("#insecure");
        }
        u
    };
    Ok(Target {
        client_url,
        redacted,
        keyprefix,
        native_queues,
        db: db_num,
        tls,
        sentinel: None,
    })
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not utf-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Target {
        parse_url(url, ErrorKind::Broker).unwrap()
    }

    #[test]
    fn tcp_forms() {
        let t = parse("redis://localhost:6379/3");
        assert_eq!(t.client_url, "redis://localhost:6379/3");
        assert_eq!(t.db, 3);
        assert_eq!(parse("redis://h").client_url, "redis://h/0");
        assert_eq!(parse("redis://h:1/").client_url, "redis://h:1/0");
        assert_eq!(parse("redis://h?virtual_host=2").db, 2);
        let t = parse("redis://:s3cret@h:6380/1?global_keyprefix=app%3A1%3A&protocol=resp2");
        assert_eq!(t.client_url, "redis://:s3cret@h:6380/1?protocol=resp2");
        assert_eq!(t.keyprefix.as_deref(), Some("app:1:"));
        assert_eq!(
            t.redacted,
            "redis://:***@h:6380/1?global_keyprefix=app%3A1%3A&protocol=resp2"
        );
        assert_eq!(
            parse("redis://user:pw@h/0").client_url,
            "redis://user:pw@h/0"
        );
    }

    #[test]
    fn unix_forms() {
        for url in [
            "unix:///run/redis.sock?db=4",
            "redis+socket:///run/redis.sock?virtual_host=4",
            "socket:///run/redis.sock?db=4",
        ] {
            assert_eq!(
                parse(url).client_url,
                "unix:///run/redis.sock?db=4",
                "{url}"
            );
        }
        assert_eq!(parse("unix:///s.sock").db, 0);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_forms() {
        let t = parse("rediss://:pw@h:6380/2");
        assert_eq!(t.client_url, "rediss://:pw@h:6380/2");
        assert_eq!(
            t.tls,
            Some(Tls {
                verify: true,
                ..Tls::default()
            }),
            "verified by default"
        );
        for (reqs, verify) in [
            ("required", true),
            ("CERT_REQUIRED", true),
            ("optional", true),
            ("CERT_OPTIONAL", true),
            ("none", false),
            ("CERT_NONE", false),
        ] {
            let t = parse(&format!("rediss://h/0?ssl_cert_reqs={reqs}"));
            assert_eq!(t.tls.as_ref().unwrap().verify, verify, "{reqs}");
            assert_eq!(t.client_url.ends_with("#insecure"), !verify, "{reqs}");
        }
        let t = parse(
            "rediss://h/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fca.pem\
             &ssl_certfile=/c.pem&ssl_keyfile=/k.pem&protocol=resp3",
        );
        assert_eq!(t.client_url, "rediss://h/0?protocol=resp3");
        let tls = t.tls.unwrap();
        assert_eq!(tls.ca_certs.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(
            (tls.certfile.as_deref(), tls.keyfile.as_deref()),
            (Some("/c.pem"), Some("/k.pem"))
        );
        assert_eq!(parse("redis://h/0").tls, None);
        for (url, want) in [
            (
                "rediss://:pw@h/0?ssl_cert_reqs=sometimes",
                "ssl_cert_reqs must be",
            ),
            ("rediss://:pw@h/0?ssl_certfile=%2Fc.pem", "go together"),
            ("rediss://:pw@h/0?ssl_ca_certs=", "needs a file path"),
        ] {
            let e = parse_url(url, ErrorKind::Broker).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("pw@"), "{url} leaks the password: {e}");
        }
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_needs_the_feature() {
        let e = parse_url("rediss://:pw@h/0", ErrorKind::Broker).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("`tls` feature"), "{e}");
        assert!(!e.to_string().contains("pw@"), "{e}");
    }

    #[test]
    fn clear_errors_without_secrets() {
        for (url, want) in [
            ("redis://:pw@h/x", "database must be a number"),
            ("redis://:pw@/0", "no host"),
            ("unix://rel.sock", "absolute path"),
            ("redis://:pw@h/0?global_keyprefix=%zz", "percent escape"),
            ("redis://:pw@h/0?ssl_cert_reqs=required", "use rediss://"),
            ("memcache://:pw@h", "unknown scheme"),
        ] {
            let e = parse_url(url, ErrorKind::Broker).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(want), "{url}: {e}");
            assert!(!e.contains("pw@"), "{url} leaks the password: {e}");
        }
    }

    #[test]
    fn sentinel_lists() {
        let t = parse(
            "sentinel://:pw@10.0.0.1:26380/2?global_keyprefix=app%3A;sentinel://10.0.0.2;\
             sentinel://:other@[::1]:26381/5",
        );
        let s = t.sentinel.expect("a sentinel target");
        assert_eq!(
            s.sentinels,
            [
                ("10.0.0.1".to_owned(), 26380),
                ("10.0.0.2".to_owned(), SENTINEL_PORT),
                ("::1".to_owned(), 26381),
            ]
        );
        // The first URL's credentials, database and prefix are the master's.
        assert_eq!(t.db, 2);
        assert_eq!(t.keyprefix.as_deref(), Some("app:"));
        assert_eq!(
            s.master_url("127.0.0.1", 7000),
            "redis://:pw@127.0.0.1:7000/2"
        );
        assert_eq!(s.master_url("::1", 7000), "redis://:pw@[::1]:7000/2");
        assert!(!t.redacted.contains("pw@") && !t.redacted.contains("other@"));
        assert_eq!(
            t.redacted,
            "sentinel://:***@10.0.0.1:26380/2?global_keyprefix=app%3A;sentinel://10.0.0.2;\
             sentinel://:***@[::1]:26381/5"
        );
        let one = parse("sentinel://h").sentinel.unwrap();
        assert_eq!(one.sentinels, [("h".to_owned(), 26379)]);
        assert_eq!(one.master_url("m", 1), "redis://m:1/0");
        let user = parse("sentinel://app:pw@h/0?protocol=resp3")
            .sentinel
            .unwrap();
        assert_eq!(
            user.master_url("m", 1),
            "redis://app:pw@m:1/0?protocol=resp3"
        );
    }

    #[test]
    fn bad_sentinel_lists_say_why_without_secrets() {
        for (url, want) in [
            ("sentinel://:pw@h:x/0", "port must be a number"),
            (
                "sentinel://:pw@h/0;redis://h2",
                "must start with sentinel://",
            ),
            ("sentinel://:pw@/0", "without a host"),
            ("sentinel://:pw@h/zero", "database must be a number"),
            ("sentinel://:pw@[::1/0", "unclosed ["),
        ] {
            let e = parse_url(url, ErrorKind::Backend).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Backend, "{url}");
            let e = e.to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("pw@"), "{url} leaks the password: {e}");
        }
        let e = parse_url("sentinel://:pw@h/0?ssl_cert_reqs=none", ErrorKind::Broker).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string()
                .contains("TLS to Redis through Sentinel is not supported"),
            "{e}"
        );
        assert!(!e.to_string().contains("pw@"), "{e}");
    }

    #[test]
    fn options_take_celerys_transport_options_and_hide_the_password() {
        let text = "[broker_transport_options]\nmaster_name = \"mymaster\"\n\
                    sentinel_kwargs = { password = \"s3cret\" }\n";
        let config =
            Config::from_sources(Some((std::path::Path::new("c.toml"), text)), |_| None).unwrap();
        let o = RedisOptions::from_config(&config);
        assert_eq!(o.get_master_name(), Some("mymaster"));
        assert_eq!(o.sentinel_auth(), (None, Some("s3cret")));
        assert!(!format!("{o:?}").contains("s3cret"), "{o:?}");
        let o = RedisOptions::default()
            .master_name("m")
            .sentinel_credentials(Some("u"), Some("p"));
        assert_eq!(o.sentinel_auth(), (Some("u"), Some("p")));
    }

    #[test]
    fn native_queues_come_from_the_transport_options_and_the_url() {
        let text = "[broker_transport_options]\nnative_queues = [\"fast.*\", \"bulk\"]\n";
        let config =
            Config::from_sources(Some((std::path::Path::new("c.toml"), text)), |_| None).unwrap();
        let o = RedisOptions::from_config(&config);
        assert_eq!(o.get_native_queues(), ["fast.*", "bulk"]);
        let t = parse("redis://h/0?native_queues=a%2Cb.*&protocol=resp2");
        assert_eq!(
            t.native_queues,
            Some(vec!["a".to_owned(), "b.*".to_owned()])
        );
        assert_eq!(t.client_url, "redis://h/0?protocol=resp2");
        assert_eq!(parse("redis://h/0").native_queues, None);
    }
}
