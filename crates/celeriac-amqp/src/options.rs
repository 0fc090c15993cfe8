//! Connection and topology settings, read from the URL and [`Config`].

use std::time::Duration;

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

/// Settings of an AMQP broker or rpc backend.
///
/// Read from the URL:
/// `amqp://user:password@host:port/vhost?heartbeat=60&max_priority=10&queue_type=quorum&connection_name=app`.
/// The vhost is the path after the first `/`, percent-decoded (`//` or `/%2F` is `/`; no path
/// is `/` too, as kombu reads it).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AmqpOptions {
    /// Host name or address.
    pub host: String,
    /// Port (5672).
    pub port: u16,
    /// User (`guest`).
    pub user: String,
    /// Password (`guest`); never logged.
    pub password: String,
    /// Virtual host (`/`).
    pub vhost: String,
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
    /// TLS (`amqps://`), or plain TCP.
    pub tls: Option<Tls>,
    /// The URL with its password redacted, for logs and errors.
    pub redacted: String,
}

impl AmqpOptions {
    /// Parses an `amqp://`, `pyamqp://` or `rpc://` URL (`rpc://` alone means the broker's
    /// defaults: guest on localhost).
    pub fn from_url(url: &str, config: &Config) -> Result<Self> {
        let redacted = celeriac_core::url::redact(url);
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::config(format!("not an amqp url: {redacted}")));
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
            other => return Err(Error::config(format!("not an amqp url scheme: {other}"))),
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
        let mut o = AmqpOptions {
            host,
            port,
            user: if user.is_empty() {
                "guest".to_owned()
            } else {
                user
            },
            password,
            vhost,
            heartbeat: 120,
            max_priority: None,
            queue_type: QueueType::Classic,
            reply_expires: config.result_expires,
            connection_name: "celeriac".to_owned(),
            tls,
            redacted: redacted.clone(),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || Error::config(format!("bad value for {k} in {redacted}"));
            match k {
                "connection_name" => o.connection_name = decode(v)?,
                "heartbeat" => o.heartbeat = v.parse().map_err(|_| bad())?,
                "max_priority" | "x-max-priority" => {
                    let p: u8 = v.parse().map_err(|_| bad())?;
                    o.max_priority = (p > 0).then_some(p);
                }
                "queue_type" | "x-queue-type" => {
                    o.queue_type = match v {
                        "classic" => QueueType::Classic,
                        "quorum" => QueueType::Quorum,
                        _ => return Err(bad()),
                    }
                }
                // kombu's `ssl_*` query names (kombu.utils.url), plus `cacert`/`ca_certs`.
                "ssl_ca_certs" | "ca_certs" | "cacert" => {
                    o.tls_mut(k, &redacted)?.ca_file = Some(decode(v)?.into());
                }
                "ssl_cert_reqs" | "cert_reqs" => {
                    o.tls_mut(k, &redacted)?.verify = match v {
                        "CERT_REQUIRED" | "required" | "CERT_OPTIONAL" | "optional" => true,
                        "CERT_NONE" | "none" => {
                            tracing::warn!(url = %redacted, "amqps with ssl_cert_reqs=CERT_NONE: the server's certificate is not verified");
                            false
                        }
                        _ => return Err(bad()),
                    }
                }
                "ssl_check_hostname" => {
                    o.tls_mut(k, &redacted)?.check_hostname = !v.eq_ignore_ascii_case("false");
                }
                "ssl_server_hostname" | "server_hostname" => {
                    o.tls_mut(k, &redacted)?.server_name = Some(decode(v)?);
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
        if o.queue_type == QueueType::Quorum && o.max_priority.is_some() {
            return Err(Error::config(
                "max_priority needs classic queues; quorum queues have no x-max-priority",
            ));
        }
        Ok(o)
    }
}

impl AmqpOptions {
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

    #[test]
    fn urls_read_as_kombu_reads_them() {
        let o = parse("amqp://u:p%40ss@rabbit:5673//");
        assert_eq!((o.host.as_str(), o.port), ("rabbit", 5673));
        assert_eq!(
            (o.user.as_str(), o.password.as_str(), o.vhost.as_str()),
            ("u", "p@ss", "/")
        );
        assert!(!o.redacted.contains("p%40ss"));
        let o = parse("pyamqp://localhost");
        assert_eq!(
            (o.user.as_str(), o.vhost.as_str(), o.port),
            ("guest", "/", 5672)
        );
        assert_eq!(parse("amqp://h/prod").vhost, "prod");
        assert_eq!(parse("amqp://h/%2F").vhost, "/");
        let o = parse("amqp://h?heartbeat=10&max_priority=10&queue_type=classic");
        assert_eq!((o.heartbeat, o.max_priority), (10, Some(10)));
        assert_eq!(
            parse("amqp://h?queue_type=quorum").queue_type,
            QueueType::Quorum
        );
        assert_eq!(parse("rpc://").host, "localhost");
    }

    #[test]
    fn amqps_reads_kombus_ssl_options() {
        if !cfg!(feature = "tls") {
            let e = AmqpOptions::from_url("amqps://u:secret@h//", &Config::default()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(!e.to_string().contains("secret"));
            return;
        }
        let o = parse("amqps://u:p@h//?ssl_ca_certs=%2Ftmp%2Fca.pem&ssl_check_hostname=false");
        let tls = o.tls.expect("tls");
        assert_eq!(o.port, 5671);
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert!(tls.verify && !tls.check_hostname);
        let o = parse("amqps://h:5673/?cacert=ca.pem&ssl_cert_reqs=CERT_NONE");
        assert_eq!(o.port, 5673);
        assert!(!o.tls.expect("tls").verify);
        assert!(parse("amqp://h").tls.is_none());
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
}
