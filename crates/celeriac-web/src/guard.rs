//! The checks in front of every route: credentials, read-only mode, and requests that change
//! something coming from another site.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::Web;
use crate::api::error;

/// Credentials the server asks for.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// HTTP basic authentication with this user and password.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

impl Auth {
    /// `user:password` as basic credentials; the password may contain `:`.
    pub fn basic(spec: &str) -> Result<Auth, String> {
        match spec.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => Ok(Auth::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err("--auth must be user:password, both non-empty".to_owned()),
        }
    }

    /// Whether `headers` carry these credentials.
    fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        match self {
            Auth::Bearer(token) => given
                .strip_prefix("Bearer ")
                .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes())),
            Auth::Basic { user, password } => given
                .strip_prefix("Basic ")
                .and_then(|b| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .ok()
                })
                .is_some_and(|pair| {
                    let want = format!("{user}:{password}");
                    same(&pair, want.as_bytes())
                }),
        }
    }

    fn challenge(&self) -> &'static str {
        match self {
            Auth::Basic { .. } => "Basic realm=\"celeriac\"",
            Auth::Bearer(_) => "Bearer",
        }
    }
}

/// Compares without stopping at the first difference (no timing hint of how much matched).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `router` behind the checks of `web`'s options.
pub(crate) fn wrap(router: axum::Router, web: Web) -> axum::Router {
    router.layer(middleware::from_fn_with_state(web, check))
}

async fn check(State(web): State<Web>, request: Request, next: Next) -> Response {
    let o = &web.shared.options;
    let path = request.uri().path();
    if let Some(auth) = &o.auth
        && path != "/healthz"
        && !auth.accepts(request.headers())
    {
        let mut r = error(StatusCode::UNAUTHORIZED, "authentication required").into_response();
        if let Ok(v) = auth.challenge().parse() {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }
    let changes = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if changes {
        if o.read_only {
            return error(StatusCode::FORBIDDEN, "this server is read-only").into_response();
        }
        if let Err(why) = same_site(request.headers()) {
            return error(StatusCode::FORBIDDEN, &why).into_response();
        }
    }
    next.run(request).await
}

/// A request that changes something must come from this site: a cross-site form can send
/// neither a JSON content type nor a custom header without the browser asking first (which
/// this server never allows), and the browser names the page's origin.
fn same_site(h: &HeaderMap) -> Result<(), String> {
    let text = |n: header::HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(format!(
            "cross-site request refused (Sec-Fetch-Site: {site})"
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or_default();
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        if origin == "null" || origin_host != host {
            return Err(format!(
                "cross-site request refused (Origin {origin}, Host {host})"
            ));
        }
    }
    let json = text(header::CONTENT_TYPE).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json && h.get("x-requested-with").is_none() {
        return Err(
            "a request that changes something needs Content-Type: application/json or an X-Requested-With header"
                .to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn credentials_are_checked_exactly() {
        let a = Auth::basic("ops:s3:cret").unwrap();
        let good = base64::engine::general_purpose::STANDARD.encode("ops:s3:cret");
        assert!(a.accepts(&headers(&[("authorization", &format!("Basic {good}"))])));
        let bad = base64::engine::general_purpose::STANDARD.encode("ops:s3:cre");
        assert!(!a.accepts(&headers(&[("authorization", &format!("Basic {bad}"))])));
        assert!(!a.accepts(&headers(&[("authorization", "Basic !!")])));
        assert!(!a.accepts(&HeaderMap::new()));
        let b = Auth::Bearer("tok".into());
        assert!(b.accepts(&headers(&[("authorization", "Bearer tok")])));
        assert!(!b.accepts(&headers(&[("authorization", "Bearer tok2")])));
        assert!(Auth::basic("nopassword").is_err());
        assert_eq!(format!("{a:?}"), "Basic(ops, ***)");
    }

    #[test]
    fn changes_must_come_from_this_site() {
        let json = ("content-type", "application/json");
        assert!(same_site(&headers(&[json])).is_ok());
        assert!(same_site(&headers(&[("x-requested-with", "fetch")])).is_ok());
        assert!(
            same_site(&headers(&[(
                "content-type",
                "application/x-www-form-urlencoded"
            )]))
            .is_err()
        );
        assert!(
            same_site(&headers(&[
                json,
                ("host", "127.0.0.1:5555"),
                ("origin", "http://127.0.0.1:5555")
            ]))
            .is_ok()
        );
        assert!(
            same_site(&headers(&[
                json,
                ("host", "127.0.0.1:5555"),
                ("origin", "http://evil.example")
            ]))
            .is_err()
        );
        assert!(same_site(&headers(&[json, ("sec-fetch-site", "cross-site")])).is_err());
    }
}
