//! Clear errors, each on a private server with password authentication: a wrong password, a
//! missing database, a role without the right to the tables; and bad URLs.

use celeriac_core::{Broker, Config, ErrorKind, ResultBackend};
use celeriac_postgres::{PgBackend, PgBroker};

use crate::private_pg::{PASSWORD, PrivatePg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_missing_database_and_missing_permission_say_so() {
    let Some(pg) = PrivatePg::start("errors") else {
        return;
    };
    let config = Config::default();

    let e = PgBroker::connect(&pg.url("postgres", "wrong-pw", "postgres"), &config)
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(
        !e.is_transient(),
        "a wrong password is no transient failure"
    );
    assert!(text.contains("refused the user's credentials"), "{text}");
    assert!(!text.contains("wrong-pw"), "the password leaked: {text}");

    let e = PgBackend::connect(&pg.url("postgres", PASSWORD, "no_such_db"), &config)
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(text.contains("the database does not exist"), "{text}");
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");

    // The tables exist (made by the owner); a role that may log in but was granted nothing
    // cannot use them.
    let owner = PgBroker::connect(&pg.url("postgres", PASSWORD, "postgres"), &config)
        .await
        .expect("the owner creates the tables");
    owner.declare("celery").await.unwrap();
    pg.psql("CREATE ROLE nobody LOGIN PASSWORD 'nobody-pw'");
    let e = PgBroker::connect(&pg.url("nobody", "nobody-pw", "postgres"), &config)
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("permission denied: grant"), "{text}");
    // With only USAGE on the schema, the first statement on a table says the same.
    pg.psql("GRANT USAGE ON SCHEMA celeriac TO nobody; GRANT SELECT ON celeriac.meta TO nobody");
    let b = PgBroker::connect(&pg.url("nobody", "nobody-pw", "postgres"), &config)
        .await
        .expect("connects: the tables are there");
    let e = b
        .publish(
            "celery",
            &celeriac_test::services::test_message("t.x"),
            Default::default(),
        )
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("permission denied: grant"), "{text}");
    // Granted, it works: the schema's docs name exactly these rights.
    pg.psql(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA celeriac TO nobody; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA celeriac TO nobody",
    );
    b.publish(
        "celery",
        &celeriac_test::services::test_message("t.x"),
        Default::default(),
    )
    .await
    .expect("publish once granted");
    let backend = PgBackend::connect(&pg.url("nobody", "nobody-pw", "postgres"), &config)
        .await
        .unwrap();
    assert!(backend.get("none").await.unwrap().is_none());
}

#[tokio::test]
async fn bad_urls_are_config_errors_without_secrets() {
    let config = Config::default();
    for url in [
        "postgres://u:topsecret@h/db?sslmode=maybe",
        "postgres://u:topsecret@h/db?schema=Robert');DROP",
        "postgres://u:topsecret@h/db?pool_size=none",
    ] {
        let e = PgBroker::connect(url, &config).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{url}");
        assert!(!format!("{e:#}").contains("topsecret"), "{e:#}");
    }
    // An unreachable server is a transient error (a worker retries on startup).
    let port = celeriac_test::services::free_port();
    let e = PgBroker::connect(&format!("postgres://u:pw@127.0.0.1:{port}/db"), &config)
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:#}");
}
