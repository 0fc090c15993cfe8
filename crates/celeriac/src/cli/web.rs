//! `dashboard`: serve the dashboard, the JSON API, Celery's status view and `/metrics`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::App;
use crate::web::{Auth, WebOptions};

/// `dashboard` flags.
#[derive(Args, Debug)]
pub(super) struct DashboardArgs {
    /// Address to listen on; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:5555")]
    bind: String,
    /// Ask for HTTP basic credentials: user:password.
    #[arg(long, env = "CELERIAC_WEB_AUTH", hide_env_values = true)]
    auth: Option<String>,
    /// Ask for `Authorization: Bearer <token>` instead.
    #[arg(
        long,
        env = "CELERIAC_WEB_TOKEN",
        hide_env_values = true,
        conflicts_with = "auth"
    )]
    token: Option<String>,
    /// Refuse every change (send, revoke, control, purge, requeue, beat).
    #[arg(long)]
    read_only: bool,
    /// Tasks kept in memory for the task list.
    #[arg(long, default_value_t = 100_000)]
    max_tasks: usize,
    /// Do not ask the workers to send task events (they must run with -E to be seen).
    #[arg(long)]
    no_enable_events: bool,
}

pub(super) async fn dashboard(app: &App, a: DashboardArgs) -> anyhow::Result<ExitCode> {
    let mut options = WebOptions::default();
    options.read_only = a.read_only;
    options.max_tasks = a.max_tasks.max(1);
    options.enable_events = !a.no_enable_events;
    options.auth = match (a.auth, a.token) {
        (Some(spec), _) => Some(Auth::basic(&spec).map_err(anyhow::Error::msg)?),
        (None, Some(token)) if !token.is_empty() => Some(Auth::Bearer(token)),
        _ => None,
    };
    let mut web = app.web().options(options);
    #[cfg(feature = "beat")]
    match super::beat::control_for(app).await {
        Ok(control) => web = web.beat(control),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "no beat entries on the dashboard"),
    }
    let listener = tokio::net::TcpListener::bind(&a.bind)
        .await
        .with_context(|| format!("cannot listen on {}", a.bind))?;
    let addr = listener.local_addr()?;
    let ip = addr.ip();
    if !ip.is_loopback() && web.web_options().auth.is_none() {
        tracing::warn!(%addr, "the dashboard listens beyond this machine without --auth or --token");
    }
    tracing::info!(url = %format!("http://{addr}/"), read_only = a.read_only, "dashboard listening");
    tokio::select! {
        r = web.serve(listener) => r.context("the web server stopped")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn terminate() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut s) = signal(SignalKind::terminate()) {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await;
}
