//! Clear errors for what a user can get wrong: the password, the database's name, the
//! user's privileges, the URL. Each names the cause in its message, never the password.

use celeriac_core::{Broker, Config, Error, ErrorKind, PublishOptions};
use celeriac_mysql::{MysqlBackend, MysqlBroker};
use sqlx::AssertSqlSafe;

use crate::util::{ADDR, DB, msg, url};

/// Runs `sql` as root on the test database.
async fn as_root(sql: &str) {
    let url = url().await.expect("server");
    let b = MysqlBroker::connect(&url, &Config::default())
        .await
        .unwrap();
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(b.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Creates `user` with password `password` (for both TCP host spellings) and `grants`.
async fn user(user: &str, password: &str, grants: &str) {
    for host in ["%", "localhost", "127.0.0.1"] {
        as_root(&format!(
            "CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY '{password}'"
        ))
        .await;
        as_root(&format!(
            "REVOKE ALL PRIVILEGES, GRANT OPTION FROM '{user}'@'{host}'"
        ))
        .await;
        if !grants.is_empty() {
            as_root(&format!("GRANT {grants} TO '{user}'@'{host}'")).await;
        }
    }
}

fn text(e: &Error) -> String {
    format!("{e:#}")
}

#[tokio::test]
async fn a_wrong_password_says_access_denied() {
    if url().await.is_none() {
        return;
    }
    user("celeriac_pw", "right-one", &format!("ALL ON {DB}.*")).await;
    let e = MysqlBroker::connect(
        &format!("mysql://celeriac_pw:wrong-one@{ADDR}/{DB}"),
        &Config::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(!e.is_transient());
    let t = text(&e);
    assert!(t.contains("wrong user name or password"), "{t}");
    assert!(t.contains("celeriac_pw:***@"), "{t}");
    assert!(!t.contains("wrong-one"), "the password leaked: {t}");
    // The right one works.
    MysqlBroker::connect(
        &format!("mysql://celeriac_pw:right-one@{ADDR}/{DB}"),
        &Config::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_missing_database_says_so() {
    if url().await.is_none() {
        return;
    }
    let e = MysqlBackend::connect(
        &format!("mysql://root@{ADDR}/celeriac_no_such_database"),
        &Config::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(
        text(&e).contains("the database does not exist"),
        "{}",
        text(&e)
    );
}

/// A user with no privilege on the database cannot even open it; one that may only read
/// opens (the tables exist) and fails on the first write, naming the missing privilege.
#[tokio::test]
async fn missing_privileges_say_permission_denied() {
    if url().await.is_none() {
        return;
    }
    user("celeriac_none", "pw", "").await;
    let e = MysqlBroker::connect(
        &format!("mysql://celeriac_none:pw@{ADDR}/{DB}"),
        &Config::default(),
    )
    .await
    .unwrap_err();
    assert!(
        text(&e).contains("access denied to the database"),
        "{}",
        text(&e)
    );

    user("celeriac_ro", "pw", &format!("SELECT ON {DB}.*")).await;
    let b = MysqlBroker::connect(
        &format!("mysql://celeriac_ro:pw@{ADDR}/{DB}"),
        &Config::default(),
    )
    .await
    .expect("a read-only user opens a database whose tables exist");
    let q = celeriac_test::services::unique_queue("ro");
    let e = b
        .publish(&q, &msg(), PublishOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    let t = text(&e);
    assert!(t.contains("permission denied"), "{t}");
    assert!(
        t.contains("command denied"),
        "the server's words are in the source: {t}"
    );

    // In a fresh database, the read-only user cannot create the tables.
    let fresh = format!("celeriac_it_ro_{}", std::process::id());
    crate::util::create_database(&fresh).await;
    as_root(&format!("GRANT SELECT ON {fresh}.* TO 'celeriac_ro'@'%'")).await;
    as_root(&format!(
        "GRANT SELECT ON {fresh}.* TO 'celeriac_ro'@'localhost'"
    ))
    .await;
    as_root(&format!(
        "GRANT SELECT ON {fresh}.* TO 'celeriac_ro'@'127.0.0.1'"
    ))
    .await;
    let e = MysqlBroker::connect(
        &format!("mysql://celeriac_ro:pw@{ADDR}/{fresh}"),
        &Config::default(),
    )
    .await
    .unwrap_err();
    let t = text(&e);
    assert!(t.contains("cannot create the celeriac tables"), "{t}");
    assert!(t.contains("permission denied"), "{t}");
    as_root(&format!("DROP DATABASE {fresh}")).await;
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    let port = celeriac_test::services::free_port();
    let e = MysqlBroker::connect(
        &format!("mysql://root@127.0.0.1:{port}/{DB}"),
        &Config::default(),
    )
    .await
    .unwrap_err();
    assert!(e.is_transient(), "{e:#}");
    assert!(text(&e).contains("cannot connect to mysql"), "{}", text(&e));
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    for bad in [
        "mysql://root@127.0.0.1:3306",
        "mysql://root@127.0.0.1/db?max-connections=none",
        "mysql://root@127.0.0.1/db?ssl-mode=often",
    ] {
        let e = MysqlBroker::connect(bad, &Config::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{bad}: {e:#}");
    }
}

/// TLS options reach sqlx: a server without TLS refuses `ssl-mode=REQUIRED` with an error,
/// while `PREFERRED` falls back.
#[tokio::test]
async fn tls_options_reach_the_connection() {
    let Some(url) = url().await else { return };
    let b = MysqlBroker::connect(&format!("{url}?ssl-mode=PREFERRED"), &Config::default())
        .await
        .expect("ssl-mode=PREFERRED connects with or without TLS");
    let tls: Option<String> = sqlx::query_scalar("SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'")
        .fetch_optional(b.pool())
        .await
        .unwrap_or(None);
    let required =
        MysqlBroker::connect(&format!("{url}?ssl-mode=REQUIRED"), &Config::default()).await;
    match tls.as_deref() {
        // A server without TLS: REQUIRED must fail, not connect in the clear.
        None | Some("") => {
            let e = required.expect_err("ssl-mode=REQUIRED against a server without TLS");
            assert_eq!(e.kind(), ErrorKind::Broker, "{e:#}");
        }
        Some(_) => {
            required.expect("ssl-mode=REQUIRED against a server with TLS");
        }
    }
    let e = MysqlBroker::connect(
        &format!("{url}?ssl-mode=VERIFY_CA&ssl-ca=/nonexistent/ca.pem"),
        &Config::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker, "{e:#}");
}
