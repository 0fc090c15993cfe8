//! Connection and topology settings, read from the URL and [`Config`].

use std::fmt;
use std::time::Duration;

use celeriac_core::config::FailoverStrategy;
use celeriac_core::{Config, Error, ErrorKind, Result};

use crate::wire::Tls;

/// The kind of queue declared for task queues (Celery's `task_default_queue_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// Classic queues: durable, optionally with `x-max-priority`.
    #[default]
    Classic,
    /// Quorum queues (`x-queue-type: quorum`): replicated, no priorities.
    Quorum,
}

/// When [`Broker::publish`](celeriac_core::Broker::publish) returns (URL query
/// `publish_confirms=wait|pipelined`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PublishConfirms {
    /// Once RabbitMQ confirmed the message (the `Broker` contract: the broker holds it). Many
    /// callers' confirms are in flight at once on the publisher's channel, so concurrent
    /// senders share round trips; one sender waits one round trip per message.
    #[default]
    Wait,
    /// Once the message is queued for the socket and a place in the window of 1,024
    /// unconfirmed messages is free. The driver keeps each message until it is confirmed and
    /// publishes it again on the next connection when the connection is lost first (a
    /// duplicate is possible, a loss is not). A message RabbitMQ refuses (nack) is reported
    /// by the next `publish` on the handle, which fails naming the refused task ids (and is
    /// itself not sent), and by [`AmqpBroker::flush`](crate::AmqpBroker::flush), which waits
    /// for every confirm. Messages parked for a delay, `publish_batch` and the redelivery
    /// copies of `reject(After)` always wait.
    ///
    /// Meant for producers: in a worker, a message a task sends without a delay (a chain
    /// step, a retry without countdown) is not yet held by RabbitMQ when the worker acks the
    /// task, so a worker killed in between could lose it. Workers keep [`Wait`](Self::Wait).
    Pipelined,
}

/// One RabbitMQ server of a broker URL: where to connect and as whom.
///
/// A URL list (`amqp://h1//;amqp://h2//`) gives one per URL. Its `Debug` leaves the password
/// out.
#[derive(Clone)]
#[non_exhaustive]
pub struct AmqpHost {
    /// Host name or address.
    pub host: String,
    /// Port (5672, or 5671 for `amqps://`).
    pub port: u16,
    /// User (`guest`).
    pub user: String,
    /// Password (`guest`); never logged.
    pub password: String,
    /// Virtual host (`/`).
    pub vhost: String,
    /// TLS (`amqps://`), or plain TCP.
    pub tls: Option<Tls>,
    /// This URL with its password redacted, for logs and errors.
    pub redacted: String,
}

impl fmt::Debug for AmqpHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpHost")
            .field("url", &self.redacted)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Settings of an AMQP broker or rpc backend.
///
/// Read from the URL:
/// `amqp://user:password@host:port/vhost?heartbeat=60&max_priority=10&queue_type=quorum&connection_name=app`.
/// The vhost is the path after the first `/`, percent-decoded (`//` or `/%2F` is `/`; no path
/// is `/` too, as kombu reads it).
///
/// Several URLs separated by `;` (`amqp://h1//;amqps://h2//`) name the servers of one
/// cluster, tried in the order of [`failover`](Self::failover) (the config's
/// `broker_failover_strategy`) at start-up and whenever a connection is lost. Each URL has its
/// own host, credentials, vhost and TLS options; the settings of the connection (`heartbeat`,
/// `max_priority`, `queue_type`, `connection_name`) may be given on any of them, and two URLs
/// giving different values for one of them is an error. Empty parts (a trailing `;`) are
/// ignored.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AmqpOptions {
    /// The servers, in the order the URL lists them; never empty.
    pub hosts: Vec<AmqpHost>,
    /// The order in which the servers are tried (`round-robin`: as listed, from the one after
    /// the server that failed; `shuffle`: a random order, drawn again after each round).
    pub failover: FailoverStrategy,
    /// Heartbeat in seconds (Celery's default `broker_heartbeat` is 120; 0 disables).
    pub heartbeat: u16,
    /// `x-max-priority` of task queues; `None` declares queues without it, as Celery does by
    /// default. Python must declare the same value (`task_queue_max_priority`).
    pub max_priority: Option<u8>,
    /// Classic or quorum task queues.
    pub queue_type: QueueType,
    /// `x-expires` of the rpc reply queue (Celery: `result_expires`, 1 day).
    pub reply_expires: Option<Duration>,
    /// Prefix of the connection names shown by `rabbitmqctl list_connections` (`celeriac`).
    pub connection_name: String,
    /// When a publish returns (`publish_confirms=wait|pipelined`; default `wait`).
    pub publish_confirms: PublishConfirms,
    /// The URL (every URL of a list, `;`-separated) with passwords redacted, for logs and
    /// errors.
    pub redacted: String,
}

/// The settings of the connection a URL of a list may give, before they are merged.
#[derive(Default)]
struct Shared {
    heartbeat: Option<u16>,
    max_priority: Option<u8>,
    queue_type: Option<QueueType>,
    connection_name: Option<String>,
    publish_confirms: Option<PublishConfirms>,
}

impl AmqpOptions {
    /// Parses an `amqp://`, `amqps://`, `pyamqp://` or `rpc://` URL (`rpc://` alone means the
    /// broker's defaults: guest on localhost), or several of them separated by `;`.
    ///
    /// ```
    /// use celeriac_amqp::AmqpOptions;
    /// let o = AmqpOptions::from_url(
    ///     "amqp://u:secret@h1//;amqp://u:secret@h2:5673//?heartbeat=30",
    ///     &celeriac_core::Config::default(),
    /// )?;
    /// assert_eq!(o.hosts.len(), 2);
    /// assert_eq!((o.hosts[1].host.as_str(), o.hosts[1].port), ("h2", 5673));
    /// assert_eq!(o.heartbeat, 30);
    /// assert!(!o.redacted.contains("secret"));
    /// # Ok::<(), celeriac_core::Error>(())
    /// ```
    pub fn from_url(url: &str, config: &Config) -> Result<Self> {
        let parts: Vec<&str> = url
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if parts.is_empty() {
            return Err(Error::config("the amqp url is empty"));
        }
        let redacted = parts
            .iter()
            .map(|p| celeriac_core::url::redact(p))
            .collect::<Vec<_>>()
            .join(";");
        let mut shared = Shared::default();
        let mut hosts = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let at = if parts.len() == 1 {
                String::new()
            } else {
                format!(" (url {} of {})", i + 1, parts.len())
            };
            hosts.push(parse_one(part, &at, &mut shared)?);
        }
        let max_priority = shared.max_priority.filter(|p| *p > 0);
        let queue_type = shared.queue_type.unwrap_or_default();
        if queue_type == QueueType::Quorum && max_priority.is_some() {
            return Err(Error::config(
                "max_priority needs classic queues; quorum queues have no x-max-priority",
            ));
        }
        Ok(AmqpOptions {
            hosts,
            failover: config.broker_failover_strategy,
            heartbeat: shared.heartbeat.unwrap_or(120),
            max_priority,
            queue_type,
            reply_expires: config.result_expires,
            connection_name: shared
                .connection_name
                .unwrap_or_else(|| "celeriac".to_owned()),
            publish_confirms: shared.publish_confirms.unwrap_or_default(),
            redacted,
        })
    }
}

/// Parses one URL of a list into its server, adding the connection settings it gives to
/// `shared`. `at` says which URL of the list it is, for messages (empty for a single URL).
fn parse_one(url: &str, at: &str, shared: &mut Shared) -> Result<AmqpHost> {
    let redacted = celeriac_core::url::redact(url);
    // Not echoed: without a scheme, `redact` cannot tell a password from a host.
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Error::config(format!(
            "not an amqp url{at}: expected amqp://, amqps:// or pyamqp://"
        )));
    };
    let tls = match scheme {
        "amqp" | "pyamqp" | "rpc" => None,
        "amqps" | "pyamqps" => {
            if cfg!(feature = "tls") {
                Some(Tls::new())
            } else {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("amqps (TLS) needs celeriac-amqp's `tls` feature: {redacted}"),
                ));
            }
        }
        other => {
            return Err(Error::config(format!(
                "not an amqp url scheme{at}: {other} (expected amqp, amqps or pyamqp)"
            )));
        }
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((u, p)) => (decode(u)?, decode(p)?),
            None => (decode(u)?, "guest".to_owned()),
        },
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.to_owned(),
            p.parse::<u16>()
                .map_err(|_| Error::config(format!("bad port in {redacted}")))?,
        ),
        _ => (hostport.to_owned(), if tls.is_some() { 5671 } else { 5672 }),
    };
    let host = if host.is_empty() {
        "localhost".to_owned()
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    };
    let vhost = match path {
        None | Some("") => "/".to_owned(),
        Some(p) => decode(p)?,
    };
    let mut h = AmqpHost {
        host,
        port,
        user: if user.is_empty() {
            "guest".to_owned()
        } else {
            user
        },
        password,
        vhost,
        tls,
        redacted: redacted.clone(),
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || Error::config(format!("bad value for {k} in {redacted}"));
        match k {
            "connection_name" => agree(&mut shared.connection_name, decode(v)?, k, at)?,
            "heartbeat" => agree(&mut shared.heartbeat, v.parse().map_err(|_| bad())?, k, at)?,
            "max_priority" | "x-max-priority" => {
                agree(
                    &mut shared.max_priority,
                    v.parse().map_err(|_| bad())?,
                    k,
                    at,
                )?;
            }
            "publish_confirms" => {
                let c = match v {
                    "wait" => PublishConfirms::Wait,
                    "pipelined" => PublishConfirms::Pipelined,
                    _ => return Err(bad()),
                };
                agree(&mut shared.publish_confirms, c, k, at)?;
            }
            "queue_type" | "x-queue-type" => {
                let t = match v {
                    "classic" => QueueType::Classic,
                    "quorum" => QueueType::Quorum,
                    _ => return Err(bad()),
                };
                agree(&mut shared.queue_type, t, k, at)?;
            }
            // kombu's `ssl_*` query names (kombu.utils.url), plus `cacert`/`ca_certs`.
            "ssl_ca_certs" | "ca_certs" | "cacert" => {
                h.tls_mut(k, &redacted)?.ca_file = Some(decode(v)?.into());
            }
            "ssl_cert_reqs" | "cert_reqs" => {
                h.tls_mut(k, &redacted)?.verify = match v {
                    "CERT_REQUIRED" | "required" | "CERT_OPTIONAL" | "optional" => true,
                    "CERT_NONE" | "none" => {
                        tracing::warn!(url = %redacted, "amqps with ssl_cert_reqs=CERT_NONE: the server's certificate is not verified");
                        false
                    }
                    _ => return Err(bad()),
                }
            }
            "ssl_check_hostname" => {
                h.tls_mut(k, &redacted)?.check_hostname = !v.eq_ignore_ascii_case("false");
            }
            "ssl_server_hostname" | "server_hostname" => {
                h.tls_mut(k, &redacted)?.server_name = Some(decode(v)?);
            }
            "ssl_certfile" | "ssl_keyfile" | "certfile" | "keyfile" => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("client certificates ({k}) are not supported yet: {redacted}"),
                ));
            }
            _ => tracing::debug!(param = k, "ignoring unknown amqp url parameter"),
        }
    }
    Ok(h)
}

/// Records a connection setting given by one URL of a list; another URL may have given it
/// already, with the same value only (one connection setting cannot differ between servers).
fn agree<T: PartialEq>(slot: &mut Option<T>, value: T, key: &str, at: &str) -> Result<()> {
    match slot {
        Some(old) if *old != value => Err(Error::config(format!(
            "{key}{at} differs from the value an earlier url of the list gives; a connection setting must be the same on every url (or given once)"
        ))),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

impl AmqpHost {
    fn tls_mut(&mut self, key: &str, redacted: &str) -> Result<&mut Tls> {
        self.tls
            .as_mut()
            .ok_or_else(|| Error::config(format!("{key} needs an amqps:// url: {redacted}")))
    }
}

fn decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            let b = u8::from_str_radix(hex, 16)
                .map_err(|_| Error::config("bad percent-encoding in amqp url"))?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config("amqp url is not valid utf-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> AmqpOptions {
        AmqpOptions::from_url(url, &Config::default()).expect(url)
    }

    /// The only server of a single URL.
    fn one(url: &str) -> AmqpHost {
        let mut o = parse(url);
        assert_eq!(o.hosts.len(), 1, "{url}");
        o.hosts.remove(0)
    }

    #[test]
    fn urls_read_as_kombu_reads_them() {
        let o = one("amqp://u:p%40ss@rabbit:5673//");
        assert_eq!((o.host.as_str(), o.port), ("rabbit", 5673));
        assert_eq!(
            (o.user.as_str(), o.password.as_str(), o.vhost.as_str()),
            ("u", "p@ss", "/")
        );
        assert!(!o.redacted.contains("p%40ss"));
        assert!(!format!("{o:?}").contains("p@ss"));
        let o = one("pyamqp://localhost");
        assert_eq!(
            (o.user.as_str(), o.vhost.as_str(), o.port),
            ("guest", "/", 5672)
        );
        assert_eq!(one("amqp://h/prod").vhost, "prod");
        assert_eq!(one("amqp://h/%2F").vhost, "/");
        let o = parse("amqp://h?heartbeat=10&max_priority=10&queue_type=classic");
        assert_eq!((o.heartbeat, o.max_priority), (10, Some(10)));
        assert_eq!(
            parse("amqp://h?queue_type=quorum").queue_type,
            QueueType::Quorum
        );
        assert_eq!(one("rpc://").host, "localhost");
    }

    #[test]
    fn amqps_reads_kombus_ssl_options() {
        if !cfg!(feature = "tls") {
            let e = AmqpOptions::from_url("amqps://u:secret@h//", &Config::default()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(!e.to_string().contains("secret"));
            return;
        }
        let o = one("amqps://u:p@h//?ssl_ca_certs=%2Ftmp%2Fca.pem&ssl_check_hostname=false");
        let tls = o.tls.expect("tls");
        assert_eq!(o.port, 5671);
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert!(tls.verify && !tls.check_hostname);
        let o = one("amqps://h:5673/?cacert=ca.pem&ssl_cert_reqs=CERT_NONE");
        assert_eq!(o.port, 5673);
        assert!(!o.tls.expect("tls").verify);
        assert!(one("amqp://h").tls.is_none());
        for bad in [
            "amqp://h?cacert=ca.pem",
            "amqps://h?ssl_cert_reqs=maybe",
            "amqps://h?ssl_certfile=c.pem",
        ] {
            assert!(
                AmqpOptions::from_url(bad, &Config::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn url_lists_name_one_server_each_and_share_the_connection_settings() {
        let o = parse(
            "amqp://u:pw-one@h1:5672//; amqp://v:pw-two@h2:5673/prod?heartbeat=30;;\
             pyamqp://h3?heartbeat=30&max_priority=5;",
        );
        let hosts: Vec<(&str, u16, &str, &str, &str)> = o
            .hosts
            .iter()
            .map(|h| {
                (
                    h.host.as_str(),
                    h.port,
                    h.user.as_str(),
                    h.password.as_str(),
                    h.vhost.as_str(),
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                ("h1", 5672, "u", "pw-one", "/"),
                ("h2", 5673, "v", "pw-two", "prod"),
                ("h3", 5672, "guest", "guest", "/"),
            ]
        );
        // Settings of the connection may come from any URL; they hold for all.
        assert_eq!((o.heartbeat, o.max_priority), (30, Some(5)));
        assert_eq!(o.failover, FailoverStrategy::RoundRobin);
        assert_eq!(
            o.redacted,
            "amqp://u:***@h1:5672//;amqp://v:***@h2:5673/prod?heartbeat=30;\
             pyamqp://h3?heartbeat=30&max_priority=5"
        );
        assert_eq!(
            o.hosts[1].redacted,
            "amqp://v:***@h2:5673/prod?heartbeat=30"
        );
        let debug = format!("{o:?}");
        assert!(!debug.contains("pw-"), "{debug}");
        // A single URL with a trailing `;` is a single server.
        assert_eq!(parse("amqp://h1//;").hosts.len(), 1);

        let config = Config::from_sources(
            Some((
                std::path::Path::new("celeriac.toml"),
                "broker_failover_strategy = \"shuffle\"",
            )),
            |_| None,
        )
        .unwrap();
        let o = AmqpOptions::from_url("amqp://h1//;amqp://h2//", &config).unwrap();
        assert_eq!(o.failover, FailoverStrategy::Shuffle);
        let e = Config::from_sources(
            Some((
                std::path::Path::new("celeriac.toml"),
                "broker_failover_strategy = \"random\"",
            )),
            |_| None,
        )
        .unwrap_err();
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("known: round-robin, shuffle"), "{cause}");
    }

    #[test]
    fn amqp_and_amqps_mix_in_one_list() {
        if !cfg!(feature = "tls") {
            let e = AmqpOptions::from_url("amqp://h1//;amqps://u:secret@h2//", &Config::default())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(!e.to_string().contains("secret"), "{e}");
            return;
        }
        let o = parse("amqp://h1//;amqps://h2//?ssl_check_hostname=false;amqps://h3:6671//");
        let tls: Vec<(u16, Option<bool>)> = o
            .hosts
            .iter()
            .map(|h| (h.port, h.tls.as_ref().map(|t| t.check_hostname)))
            .collect();
        // TLS options belong to the URL that gives them.
        assert_eq!(tls, [(5672, None), (5671, Some(false)), (6671, Some(true))]);
    }

    #[test]
    fn bad_url_lists_fail_clearly_without_a_password() {
        let err = |url: &str| {
            let e = AmqpOptions::from_url(url, &Config::default()).unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(!text.contains("secret"), "{url}: {text}");
            (e.kind(), e.to_string())
        };
        for empty in ["", ";", " ; ;"] {
            assert_eq!(
                err(empty),
                (ErrorKind::Config, "the amqp url is empty".to_owned())
            );
        }
        let (kind, text) = err("amqp://u:secret@h1//;redis://u:secret@h2//");
        assert_eq!(kind, ErrorKind::Config);
        assert_eq!(
            text,
            "not an amqp url scheme (url 2 of 2): redis (expected amqp, amqps or pyamqp)"
        );
        // Without a scheme the part is not echoed: its password could not be told apart.
        let (_, text) = err("amqp://u:secret@h1//;u:secret@h2");
        assert_eq!(
            text,
            "not an amqp url (url 2 of 2): expected amqp://, amqps:// or pyamqp://"
        );
        let (_, text) = err("amqp://u:secret@h1//;amqp://u:secret@h2:56x72//");
        assert_eq!(text, "bad port in amqp://u:***@h2:56x72//");
        let (_, text) = err("amqp://u:secret@h1//?heartbeat=10;amqp://u:secret@h2//?heartbeat=20");
        assert!(
            text.starts_with("heartbeat (url 2 of 2) differs from the value an earlier url"),
            "{text}"
        );
        let (_, text) =
            err("amqp://u:secret@h1//?queue_type=quorum;amqp://u:secret@h2//?max_priority=3");
        assert!(
            text.starts_with("max_priority needs classic queues"),
            "{text}"
        );
    }
}
