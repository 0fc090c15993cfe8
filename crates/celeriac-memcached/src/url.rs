//! `cache+memcached://` URLs, as Celery splits them.

use celeriac_core::url::redact;
use celeriac_core::{Error, Result};

/// The servers of a cache backend URL: `cache+memcached://h1:11211;h2:11211/` gives
/// `["h1:11211", "h2:11211"]` (Celery's `CacheBackend`: the part after `://`, trailing `/`s
/// removed, split at `;`). `memcached://`, `memcache://`, `pylibmc://` and `pymemcache://`
/// with or without the `cache+` prefix are the same.
///
/// One query parameter is ours (Celery's URL takes none): `global_keyprefix=<text>`
/// (percent-encoded), Celery's `result_backend_transport_options["global_keyprefix"]`.
pub(crate) fn parse_url(url: &str) -> Result<Parsed> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| Error::config(format!("{:?} is not a memcached url", redact(url))))?;
    let scheme = scheme.strip_prefix("cache+").unwrap_or(scheme);
    if !["memcached", "memcache", "pylibmc", "pymemcache"].contains(&scheme) {
        return Err(Error::config(format!(
            "{:?} is not a memcached url (expected cache+memcached://host:11211/)",
            redact(url)
        )));
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    if rest.contains('@') {
        return Err(Error::config(format!(
            "memcached url {:?}: Celery's cache backend takes servers only \
             (cache+memcached://h1:11211;h2:11211/), no credentials",
            redact(url)
        )));
    }
    let mut keyprefix = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("global_keyprefix", v)) => {
                keyprefix = Some(percent_decode(v).map_err(|why| {
                    Error::config(format!("memcached url {:?}: {why}", redact(url)))
                })?);
            }
            _ => {
                return Err(Error::config(format!(
                    "memcached url {:?}: unknown option {pair:?} (the only one is \
                     global_keyprefix=<text>)",
                    redact(url)
                )));
            }
        }
    }
    let servers: Vec<String> = rest
        .trim_end_matches('/')
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if servers.is_empty() {
        return Err(Error::config(format!(
            "memcached url {:?} names no server (expected cache+memcached://host:11211/)",
            redact(url)
        )));
    }
    Ok(Parsed { servers, keyprefix })
}

/// A parsed `cache+memcached://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The servers, in order.
    pub(crate) servers: Vec<String>,
    /// Celery's `global_keyprefix`, if given.
    pub(crate) keyprefix: Option<String>,
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not utf-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_as_celery_reads_them() {
        let servers = |u: &str| parse_url(u).unwrap().servers;
        assert_eq!(
            servers("cache+memcached://127.0.0.1:11211/"),
            ["127.0.0.1:11211"]
        );
        assert_eq!(
            servers("cache+memcached://h1:11211;h2:11212/"),
            ["h1:11211", "h2:11212"]
        );
        assert_eq!(servers("memcache://h"), ["h"]);
        assert_eq!(servers("cache+pylibmc://h:1//"), ["h:1"]);
        let p = parse_url("cache+memcached://h/?global_keyprefix=app%3A").unwrap();
        assert_eq!(p.servers, ["h"]);
        assert_eq!(p.keyprefix.as_deref(), Some("app:"));
        assert!(parse_url("cache+memcached://h/?x=1").is_err());
        assert!(parse_url("cache+memcached:///").is_err());
        assert!(parse_url("redis://h").is_err());
        assert!(
            parse_url("cache+memcached://u:secret@h/")
                .unwrap_err()
                .to_string()
                .contains("***")
        );
    }
}
