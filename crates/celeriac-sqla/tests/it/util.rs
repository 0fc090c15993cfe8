//! The test databases: `celeriac_sqla` on each server, made on first use.

use std::sync::Arc;

use celeriac_core::{Config, DynBackend, DynBroker};
use celeriac_sqla::{SqlaBackend, SqlaBroker};
use celeriac_test::services::require_service;
use tokio::sync::OnceCell;

/// The database every test of this crate uses (tables are shared; ids and queues are unique).
pub(crate) const DATABASE: &str = "celeriac_sqla";

/// Which server a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    Postgres,
    Maria,
}

impl Server {
    /// The URL prefix-less location, as sqlx and SQLAlchemy both read it.
    pub(crate) fn location(self) -> String {
        match self {
            Server::Postgres => format!("postgres@127.0.0.1:5432/{DATABASE}"),
            Server::Maria => format!("root@127.0.0.1:3306/{DATABASE}"),
        }
    }

    /// Celery's result backend URL (the one Python uses too, with its driver).
    pub(crate) fn db_url(self) -> String {
        match self {
            Server::Postgres => format!("db+postgresql://{}", self.location()),
            Server::Maria => format!("db+mysql+pymysql://{}", self.location()),
        }
    }

    /// kombu's transport URL.
    pub(crate) fn sqla_url(self) -> String {
        match self {
            Server::Postgres => format!("sqla+postgresql://{}", self.location()),
            Server::Maria => format!("sqla+mysql+pymysql://{}", self.location()),
        }
    }

    fn admin_url(self) -> &'static str {
        match self {
            Server::Postgres => "postgres://postgres@127.0.0.1:5432/postgres",
            Server::Maria => "mysql://root@127.0.0.1:3306/",
        }
    }

    /// Whether the server answers (else a SKIPPED notice), with the test database made.
    pub(crate) async fn ready(self) -> bool {
        let (name, addr) = match self {
            Server::Postgres => ("postgresql", "127.0.0.1:5432"),
            Server::Maria => ("mariadb", "127.0.0.1:3306"),
        };
        if !require_service(name, addr) {
            return false;
        }
        static PG: OnceCell<()> = OnceCell::const_new();
        static MY: OnceCell<()> = OnceCell::const_new();
        let cell = match self {
            Server::Postgres => &PG,
            Server::Maria => &MY,
        };
        cell.get_or_init(|| async move { create_database(self).await })
            .await;
        true
    }
}

async fn create_database(server: Server) {
    use sqlx::Connection as _;
    match server {
        Server::Postgres => {
            let mut c = sqlx::PgConnection::connect(server.admin_url())
                .await
                .expect("connect to postgresql");
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                    .bind(DATABASE)
                    .fetch_optional(&mut c)
                    .await
                    .expect("look for the test database");
            if exists.is_none() {
                // Another test binary may create it at the same moment.
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
                    .execute(&mut c)
                    .await;
            }
        }
        Server::Maria => {
            let mut c = sqlx::MySqlConnection::connect(server.admin_url())
                .await
                .expect("connect to mariadb");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE IF NOT EXISTS {DATABASE}"
            )))
            .execute(&mut c)
            .await
            .expect("create the test database");
        }
    }
}

pub(crate) fn config() -> Config {
    let mut c = Config::default();
    c.worker.concurrency = 4;
    c
}

pub(crate) async fn backend(server: Server) -> Option<SqlaBackend> {
    if !server.ready().await {
        return None;
    }
    Some(
        SqlaBackend::connect(&server.db_url(), &config())
            .await
            .expect("open the db+ backend"),
    )
}

pub(crate) async fn dyn_backend(server: Server) -> Option<DynBackend> {
    backend(server).await.map(|b| Arc::new(b) as DynBackend)
}
pub(crate) async fn broker(server: Server) -> Option<SqlaBroker> {
    if !server.ready().await {
        return None;
    }
    Some(
        SqlaBroker::connect(&server.sqla_url(), &config())
            .await
            .expect("open the sqla+ broker"),
    )
}

pub(crate) async fn dyn_broker(server: Server) -> Option<DynBroker> {
    broker(server).await.map(|b| Arc::new(b) as DynBroker)
}
