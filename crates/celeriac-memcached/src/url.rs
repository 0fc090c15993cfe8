//! `cache+memcached://` URLs, as Celery splits them.

use celeriac_core::url::redact;
use celeriac_core::{Error, Result};

/// The servers of a cache backend URL: `cache+memcached://h1:11211;h2:11211/` gives
/// `["h1:11211", "h2:11211"]` (Celery's `CacheBackend`: the part after `://`, trailing `/`s
/// removed, split at `;`). `memcached://`, `memcache://`, `pylibmc://` and `pymemcache://`
/// with or without the `cache+` prefix are the same.
pub(crate) fn parse_url(url: &str) -> Result<Vec<String>> {
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
    if rest.contains('?') || rest.contains('@') {
        return Err(Error::config(format!(
            "memcached url {:?}: Celery's cache backend takes servers only \
             (cache+memcached://h1:11211;h2:11211/), no credentials or options",
            redact(url)
        )));
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
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_as_celery_reads_them() {
        assert_eq!(
            parse_url("cache+memcached://127.0.0.1:11211/").unwrap(),
            ["127.0.0.1:11211"]
        );
        assert_eq!(
            parse_url("cache+memcached://h1:11211;h2:11212/").unwrap(),
            ["h1:11211", "h2:11212"]
        );
        assert_eq!(parse_url("memcache://h").unwrap(), ["h"]);
        assert_eq!(parse_url("cache+pylibmc://h:1//").unwrap(), ["h:1"]);
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
