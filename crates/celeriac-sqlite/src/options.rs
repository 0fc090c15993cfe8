//! Where the database is and how to use it: [`SqliteOptions`] and `sqlite://` URL parsing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use celeriac_core::{Config, Error, Result};

/// Settings of a SQLite broker or result backend.
///
/// Defaults: a 5 s `busy_timeout`, a one hour lease, results kept one day. Build them from a
/// [`Config`] with [`SqliteOptions::from_config`].
///
/// When a broker and a backend of one process open the same file they share one connection,
/// and the first to open it sets its `busy_timeout`.
///
/// ```
/// use std::time::Duration;
/// use celeriac_sqlite::SqliteOptions;
///
/// let options = SqliteOptions::default()
///     .busy_timeout(Duration::from_secs(1))
///     .visibility_timeout(Duration::from_secs(300))
///     .result_expires(None);
/// assert_eq!(options.get_busy_timeout(), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    busy_timeout: Duration,
    visibility_timeout: Duration,
    result_expires: Option<Duration>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            visibility_timeout: Duration::from_secs(3600),
            result_expires: Some(Duration::from_secs(86_400)),
        }
    }
}

impl SqliteOptions {
    /// Defaults with the lease (`visibility_timeout`) and `result_expires` of `config`.
    pub fn from_config(config: &Config) -> Self {
        SqliteOptions::default()
            .visibility_timeout(config.visibility_timeout)
            .result_expires(config.result_expires)
    }

    /// How long a statement waits for another process's write lock before failing with a
    /// transient error.
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The default lease of a delivery, when the consumer does not choose one.
    #[must_use]
    pub fn visibility_timeout(mut self, lease: Duration) -> Self {
        self.visibility_timeout = lease;
        self
    }

    /// How long results, groups and chord counters are kept; `None` keeps them for good.
    #[must_use]
    pub fn result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }

    /// The `busy_timeout`.
    pub fn get_busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// The default lease.
    pub fn get_visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// How long results are kept.
    pub fn get_result_expires(&self) -> Option<Duration> {
        self.result_expires
    }
}

/// The database a URL or path names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Location {
    /// A private in-memory database (`:memory:`), never shared.
    Memory,
    /// A file.
    File(PathBuf),
}

impl Location {
    pub(crate) fn from_path(path: &Path) -> Self {
        if path.as_os_str() == ":memory:" {
            Location::Memory
        } else {
            Location::File(path.to_owned())
        }
    }

    /// Reads `sqlite://relative.db`, `sqlite:///absolute.db` or `sqlite://:memory:`.
    pub(crate) fn from_url(url: &str) -> Result<Self> {
        let Some(rest) = url.strip_prefix("sqlite://") else {
            return Err(Error::config(format!(
                "not a sqlite url: {url:?} (expected sqlite://path/to/file.db)"
            )));
        };
        if rest.contains(['?', '#']) {
            return Err(Error::config(format!(
                "sqlite url {url:?} takes no query or fragment"
            )));
        }
        if rest.is_empty() || rest == "/" {
            return Err(Error::config(format!(
                "sqlite url {url:?} names no file (expected sqlite://path/to/file.db)"
            )));
        }
        Ok(Location::from_path(Path::new(rest)))
    }

    pub(crate) fn display(&self) -> String {
        match self {
            Location::Memory => ":memory:".to_owned(),
            Location::File(p) => p.display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Location::from_url("sqlite://celeriac.db").unwrap(),
            Location::File("celeriac.db".into())
        );
        assert_eq!(
            Location::from_url("sqlite://dir/x.db").unwrap(),
            Location::File("dir/x.db".into())
        );
        assert_eq!(
            Location::from_url("sqlite:///abs/x.db").unwrap(),
            Location::File("/abs/x.db".into())
        );
        assert_eq!(
            Location::from_url("sqlite://:memory:").unwrap(),
            Location::Memory
        );
        for bad in [
            "sqlite://",
            "redis://x",
            "sqlite://x.db?mode=ro",
            "sqlite:///",
        ] {
            let e = Location::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), celeriac_core::ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn options_follow_the_config() {
        let mut config = Config::default();
        config.visibility_timeout = Duration::from_secs(7);
        config.result_expires = None;
        let o = SqliteOptions::from_config(&config);
        assert_eq!(o.get_visibility_timeout(), Duration::from_secs(7));
        assert_eq!(o.get_result_expires(), None);
    }
}
