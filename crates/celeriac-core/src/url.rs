//! URLs: choosing a driver by scheme, and keeping secrets out of logs.

use std::fmt;

use crate::backend::DynBackend;
use crate::beat::DynBeatStore;
use crate::broker::{BoxFuture, DynBroker};
use crate::config::Config;
use crate::error::{Error, Result};

/// Opens a broker for a URL.
pub type BrokerFactory = fn(String, Config) -> BoxFuture<'static, Result<DynBroker>>;

/// Opens a result backend for a URL.
pub type BackendFactory = fn(String, Config) -> BoxFuture<'static, Result<DynBackend>>;

/// Opens a beat store for a URL.
pub type BeatStoreFactory = fn(String, Config) -> BoxFuture<'static, Result<DynBeatStore>>;

/// The drivers an application can open, by URL scheme: brokers, result backends and beat
/// stores.
#[derive(Clone, Default)]
pub struct Drivers {
    brokers: Vec<(&'static str, BrokerFactory)>,
    backends: Vec<(&'static str, BackendFactory)>,
    beat_stores: Vec<(&'static str, BeatStoreFactory)>,
}

impl fmt::Debug for Drivers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drivers")
            .field(
                "brokers",
                &self.brokers.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .field(
                "backends",
                &self.backends.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .field(
                "beat_stores",
                &self.beat_stores.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Drivers {
    /// The in-memory drivers (`memory://`) only.
    pub fn new() -> Self {
        let mut d = Drivers::default();
        d.add_broker("memory", |_, _| {
            Box::pin(async {
                Ok(std::sync::Arc::new(crate::memory::MemoryBroker::new()) as DynBroker)
            })
        });
        d.add_backend("memory", |_, _| {
            Box::pin(async {
                Ok(std::sync::Arc::new(crate::memory::MemoryBackend::new()) as DynBackend)
            })
        });
        d.add_beat_store("memory", |_, _| {
            Box::pin(async {
                Ok(std::sync::Arc::new(crate::memory::MemoryBeatStore::new()) as DynBeatStore)
            })
        });
        d
    }

    /// Registers a broker driver for `scheme`.
    pub fn add_broker(&mut self, scheme: &'static str, open: BrokerFactory) {
        self.brokers.retain(|(s, _)| *s != scheme);
        self.brokers.push((scheme, open));
    }

    /// Registers a result backend driver for `scheme`.
    pub fn add_backend(&mut self, scheme: &'static str, open: BackendFactory) {
        self.backends.retain(|(s, _)| *s != scheme);
        self.backends.push((scheme, open));
    }

    /// Registers a beat store driver for `scheme`.
    pub fn add_beat_store(&mut self, scheme: &'static str, open: BeatStoreFactory) {
        self.beat_stores.retain(|(s, _)| *s != scheme);
        self.beat_stores.push((scheme, open));
    }

    /// Opens the broker for `url`.
    pub async fn open_broker(&self, url: &str, config: &Config) -> Result<DynBroker> {
        let open = pick(&self.brokers, url, "broker")?;
        open(url.to_owned(), config.clone()).await
    }

    /// Opens the result backend for `url`.
    pub async fn open_backend(&self, url: &str, config: &Config) -> Result<DynBackend> {
        let open = pick(&self.backends, url, "result backend")?;
        open(url.to_owned(), config.clone()).await
    }

    /// Opens the beat store for `url`: usually the broker's URL, so that beat keeps its state
    /// next to the broker's (the same SQLite file, the same Redis).
    ///
    /// An unknown scheme is an error listing the known ones and saying how to choose another
    /// store.
    ///
    /// ```
    /// # async fn demo() -> celeriac_core::Result<()> {
    /// let drivers = celeriac_core::Drivers::new();
    /// let config = celeriac_core::Config::default();
    /// let store = drivers.open_beat_store("memory://", &config).await?;
    /// assert!(store.load().await?.is_empty());
    /// let e = drivers.open_beat_store("amqp://h//", &config).await.unwrap_err();
    /// assert!(e.to_string().contains("no beat store for amqp:// (known: memory)"));
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn open_beat_store(&self, url: &str, config: &Config) -> Result<DynBeatStore> {
        let s = scheme(url);
        let Some((_, open)) = self.beat_stores.iter().find(|(name, _)| Some(*name) == s) else {
            let known: Vec<&str> = self.beat_stores.iter().map(|(n, _)| *n).collect();
            return Err(Error::config(format!(
                "no beat store for {}:// (known: {}); set `store` in [beat], e.g. \
                 store = \"sqlite://beat.db\"",
                s.map_or_else(|| redact(url), str::to_owned),
                known.join(", ")
            )));
        };
        open(url.to_owned(), config.clone()).await
    }
}

fn pick<F: Copy>(table: &[(&'static str, F)], url: &str, what: &str) -> Result<F> {
    let s = scheme(url).ok_or_else(|| {
        Error::config(format!(
            "{what} url {:?} has no scheme (expected e.g. sqlite://celeriac.db)",
            redact(url)
        ))
    })?;
    if let Some((_, f)) = table.iter().find(|(name, _)| *name == s) {
        return Ok(*f);
    }
    let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
    let hint = known
        .iter()
        .map(|k| (distance(k, s), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!("; did you mean {k}://?"))
        .unwrap_or_default();
    Err(Error::config(format!(
        "unknown {what} scheme {s:?} (known: {}; a driver may need its cargo feature){hint}",
        known.join(", ")
    )))
}

/// The scheme of a URL (`sqlite` in `sqlite://x.db`).
pub fn scheme(url: &str) -> Option<&str> {
    let (s, _) = url.split_once("://")?;
    (!s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    .then_some(s)
}

/// A URL with its password replaced by `***`, safe to log. A `;`-separated list of URLs
/// (failover servers, sentinels) has each one's password replaced.
pub fn redact(url: &str) -> String {
    // A `;` inside a password is no list: only split when every part is a URL of its own.
    let is_list = url.contains(';')
        && url
            .split(';')
            .all(|part| part.trim().is_empty() || scheme(part.trim()).is_some());
    if is_list {
        return url.split(';').map(redact_one).collect::<Vec<_>>().join(";");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The authority ends at the path. A `?` or `#` before it is taken as part of a password
    // that was not percent-encoded (a fuzzed case): better to hide too much than a secret.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let host = &authority[at..];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***{host}{tail}"),
                None => format!("{scheme}://{userinfo}{host}{tail}"),
            }
        }
        None => url.to_owned(),
    }
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("redis://:s3cret@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1//"),
            "amqp://guest:***@127.0.0.1//"
        );
        assert_eq!(redact("amqp://user@host/v"), "amqp://user@host/v");
        assert_eq!(redact("sqlite://celeriac.db"), "sqlite://celeriac.db");
        assert_eq!(redact("redis://u:p@ss@h/0"), "redis://u:***@h/0");
        assert_eq!(redact("redis://:pa?s#s@h/0?x=1"), "redis://:***@h/0?x=1");
        assert_eq!(
            redact("amqp://a:one@h1//;amqp://b:two@h2//; amqps://h3"),
            "amqp://a:***@h1//;amqp://b:***@h2//; amqps://h3"
        );
        assert_eq!(redact("redis://:pa;ss@h/0"), "redis://:***@h/0");
    }

    #[tokio::test]
    async fn unknown_schemes_list_the_known_ones_with_a_hint() {
        let d = Drivers::new();
        let e = d
            .open_broker("memroy://", &Config::default())
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("unknown broker scheme \"memroy\""), "{msg}");
        assert!(msg.contains("known: memory"), "{msg}");
        assert!(msg.contains("did you mean memory://"), "{msg}");
        let e = d
            .open_broker("redis://:pw@h", &Config::default())
            .await
            .unwrap_err();
        assert!(!e.to_string().contains("pw"));
        let e = d
            .open_backend("no-scheme", &Config::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("has no scheme"));
        assert!(d.open_broker("memory://", &Config::default()).await.is_ok());
    }

    #[tokio::test]
    async fn beat_stores_by_scheme() {
        let mut d = Drivers::new();
        let config = Config::default();
        assert!(d.open_beat_store("memory://", &config).await.is_ok());
        let e = d
            .open_beat_store("amqp://guest:s3cret@127.0.0.1:5672//", &config)
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(
            msg.contains("no beat store for amqp:// (known: memory)")
                && msg.contains("set `store` in [beat]")
                && !msg.contains("s3cret"),
            "{msg}"
        );
        let e = d
            .open_beat_store("beat.db", &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no beat store for beat.db://"), "{e}");
        // A registered scheme is listed, and a later registration replaces an earlier one.
        d.add_beat_store("other", |_, _| {
            Box::pin(async { Err(Error::config("other store")) })
        });
        d.add_beat_store("other", |_, _| {
            Box::pin(async { Err(Error::config("the replacement")) })
        });
        let e = d
            .open_beat_store("other://", &config)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the replacement");
        let e = d
            .open_beat_store("x://", &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("(known: memory, other)"), "{e}");
        assert!(format!("{d:?}").contains("beat_stores"));
    }
}
