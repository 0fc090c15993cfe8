//! Celery's database URLs (`db+postgresql://…`, `sqla+mysql+pymysql://…`) turned into the URL
//! sqlx connects with, plus the options celeriac reads from the query string.

use celeriac_core::url::redact;
use celeriac_core::{Error, Result};

/// The two database families the crate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MariaDB or MySQL.
    MySql,
}

impl Dialect {
    /// The dialect's name as SQLAlchemy spells it (`postgresql`, `mysql`).
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgresql",
            Dialect::MySql => "mysql",
        }
    }
}

/// A parsed Celery database URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct DbUrl {
    pub dialect: Dialect,
    /// What sqlx connects to (`postgres://…` or `mysql://…`), without celeriac's own options.
    pub connect: String,
    /// celeriac's own query options (`key`, `value`), removed from [`DbUrl::connect`].
    pub options: Vec<(String, String)>,
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbUrl")
            .field("dialect", &self.dialect)
            .field("connect", &redact(&self.connect))
            .field("options", &self.options)
            .finish()
    }
}

/// Query keys that are celeriac's, not the database driver's.
const OWN_KEYS: &[&str] = &[
    "task_table",
    "group_table",
    "task_schema",
    "group_schema",
    "queue_table",
    "message_table",
    "polling_interval",
];

/// Parses `url`, which starts with `prefix` (`db+` or `sqla+`).
pub(crate) fn parse(url: &str, prefix: &str) -> Result<DbUrl> {
    let bad = |why: &str| Error::config(format!("{why}: {}", redact(url)));
    let rest = url
        .strip_prefix(prefix)
        .ok_or_else(|| bad(&format!("expected a url starting with {prefix}")))?;
    let (scheme, tail) = rest
        .split_once("://")
        .ok_or_else(|| bad("a database url needs `://`"))?;
    let database = scheme.split('+').next().unwrap_or_default();
    let dialect = match database {
        "postgresql" | "postgres" => Dialect::Postgres,
        "mysql" | "mariadb" => Dialect::MySql,
        other => {
            return Err(bad(&format!(
                "unsupported database {other:?} (celeriac speaks postgresql and mysql/mariadb)"
            )));
        }
    };
    let (base, query) = match tail.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (tail, None),
    };
    let mut options = Vec::new();
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if OWN_KEYS.contains(&k) {
            options.push((k.to_owned(), v.to_owned()));
        } else {
            // The driver's own (sslmode, charset, ...): sqlx reads the keys it knows.
            kept.push(pair.to_owned());
        }
    }
    let target = match dialect {
        Dialect::Postgres => "postgres",
        Dialect::MySql => "mysql",
    };
    let mut connect = format!("{target}://{base}");
    if !kept.is_empty() {
        connect.push('?');
        connect.push_str(&kept.join("&"));
    }
    Ok(DbUrl {
        dialect,
        connect,
        options,
    })
}

impl DbUrl {
    /// The value of one of celeriac's own query options.
    pub(crate) fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Checks that `name` is a plain SQL identifier (letters, digits, `_`, `$`), so that it can be
/// quoted into statements.
pub(crate) fn check_identifier(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} {name:?} is not a plain sql identifier (letters, digits, _ and $, at most \
             63 characters)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_spellings_map_to_sqlx_urls() {
        let u = parse("db+postgresql://u:pw@h:5432/db", "db+").unwrap();
        assert_eq!(u.dialect, Dialect::Postgres);
        assert_eq!(u.connect, "postgres://u:pw@h:5432/db");
        let u = parse("db+postgresql+psycopg2://h/db?sslmode=require", "db+").unwrap();
        assert_eq!(u.connect, "postgres://h/db?sslmode=require");
        let u = parse(
            "sqla+mysql+pymysql://root@h:3306/test?charset=utf8mb4",
            "sqla+",
        )
        .unwrap();
        assert_eq!(u.dialect, Dialect::MySql);
        assert_eq!(u.connect, "mysql://root@h:3306/test?charset=utf8mb4");
        let u = parse("db+mysql://h/db?task_table=results&x=1", "db+").unwrap();
        assert_eq!(u.connect, "mysql://h/db?x=1");
        assert_eq!(u.option("task_table"), Some("results"));
        assert!(parse("db+oracle://h/db", "db+").is_err());
        let e = parse("db+sqlite://:pw@h", "db+").unwrap_err().to_string();
        assert!(!e.contains("pw@"), "{e}");
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_identifier("celery_taskmeta", "table").is_ok());
        assert!(check_identifier("x\"; drop", "table").is_err());
        assert!(check_identifier("", "table").is_err());
    }
}
