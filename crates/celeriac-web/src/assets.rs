//! The dashboard's files, built into the binary: it works offline and needs no CDN.

use axum::Router;
use axum::extract::OriginalUri;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");

pub(crate) fn routes() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(script))
        .route("/assets/style.css", get(style))
}

/// Every page asks for its assets again after a deploy, never from another site.
const SECURITY: [(header::HeaderName, &str); 3] = [
    (header::CACHE_CONTROL, "no-cache"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

/// The page. Mounted under a prefix (`Router::nest("/ops", web.router())`, page at `/ops`),
/// its assets are asked for under that prefix, and the script calls the API under it too.
async fn index(OriginalUri(uri): OriginalUri) -> Response {
    let path = uri.path();
    let mut prefix = String::with_capacity(path.len() + 1);
    for c in path.chars() {
        match c {
            '&' => prefix.push_str("&amp;"),
            '<' => prefix.push_str("&lt;"),
            '>' => prefix.push_str("&gt;"),
            '"' => prefix.push_str("&quot;"),
            '\'' => prefix.push_str("&#39;"),
            c => prefix.push(c),
        }
    }
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let page = INDEX.replace("\"assets/", &format!("\"{prefix}assets/"));
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        SECURITY,
        page,
    )
        .into_response()
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SECURITY,
        SCRIPT,
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        SECURITY,
        STYLE,
    )
}
