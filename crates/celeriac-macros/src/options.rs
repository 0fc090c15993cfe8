//! Parsing `#[task(...)]` options.

use proc_macro2::TokenStream;
use quote::quote;
use syn::meta::ParseNestedMeta;
use syn::{Expr, ExprArray, ExprLit, Lit, LitStr, Path};

const KNOWN: &str = "name, queue, priority, rate_limit, max_retries, default_retry_delay, retry_backoff, \
retry_backoff_max, retry_jitter, autoretry_for, acks_late, soft_time_limit, time_limit, ignore_result, expires, \
track_started, rate_limit_scope, unique_for, unique_raise, max_concurrency";

#[derive(Default)]
pub(crate) struct Options {
    pub(crate) name: Option<LitStr>,
    /// Statements that set fields of a `TaskOptions` named `o`.
    pub(crate) setters: Vec<TokenStream>,
}

impl Options {
    pub(crate) fn parse(&mut self, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        match key.as_str() {
            "name" => {
                let s: LitStr = meta.value()?.parse()?;
                if s.value().is_empty() {
                    return Err(syn::Error::new(s.span(), "task name must not be empty"));
                }
                self.name = Some(s);
            }
            "queue" => {
                let s: LitStr = meta.value()?.parse()?;
                self.setters.push(
                    quote!(o.queue = ::std::option::Option::Some(::std::string::String::from(#s));),
                );
            }
            "priority" => {
                let lit: syn::LitInt = meta.value()?.parse()?;
                let p: u8 = lit.base10_parse().ok().filter(|p| *p <= 9).ok_or_else(|| {
                    syn::Error::new(lit.span(), "priority must be an integer from 0 to 9")
                })?;
                self.setters
                    .push(quote!(o.priority = ::std::option::Option::Some(#p);));
            }
            "rate_limit" => {
                let s: LitStr = meta.value()?.parse()?;
                let rate = parse_rate(&s.value()).ok_or_else(|| {
                    syn::Error::new(
                        s.span(),
                        "invalid rate limit: expected \"<n>/s\", \"<n>/m\", \"<n>/h\" or \"<n>\"",
                    )
                })?;
                self.setters.push(
                    quote!(o.rate_limit = ::celeriac::__private::RateLimit::per_second(#rate);),
                );
            }
            "rate_limit_scope" => {
                let s: LitStr = meta.value()?.parse()?;
                let scope = match s.value().as_str() {
                    "worker" => quote!(::celeriac::__private::RateLimitScope::Worker),
                    "cluster" => quote!(::celeriac::__private::RateLimitScope::Cluster),
                    _ => {
                        return Err(syn::Error::new(
                            s.span(),
                            "rate_limit_scope must be \"worker\" or \"cluster\"",
                        ));
                    }
                };
                self.setters.push(quote!(o.rate_limit_scope = #scope;));
            }
            "unique_for" => {
                let d = duration(meta, &key)?;
                self.setters
                    .push(quote!(o.unique_for = ::std::option::Option::Some(#d);));
            }
            "max_concurrency" => {
                let lit: syn::LitInt = meta.value()?.parse()?;
                let n: u32 = lit.base10_parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    syn::Error::new(lit.span(), "max_concurrency must be a positive integer")
                })?;
                self.setters
                    .push(quote!(o.max_concurrency = ::std::option::Option::Some(#n);));
            }
            "max_retries" => {
                let e: Expr = meta.value()?.parse()?;
                let v = match &e {
                    Expr::Path(p) if p.path.is_ident("None") => quote!(::std::option::Option::None),
                    Expr::Lit(ExprLit {
                        lit: Lit::Int(i), ..
                    }) => {
                        let n: u32 = i.base10_parse()?;
                        quote!(::std::option::Option::Some(#n))
                    }
                    _ => {
                        return Err(syn::Error::new_spanned(
                            e,
                            "max_retries must be an integer or None (unlimited)",
                        ));
                    }
                };
                self.setters.push(quote!(o.max_retries = #v;));
            }
            "default_retry_delay" => {
                let d = duration(meta, &key)?;
                self.setters.push(quote!(o.default_retry_delay = #d;));
            }
            "retry_backoff" => {
                let e: Expr = meta.value()?.parse()?;
                let v = match &e {
                    Expr::Lit(ExprLit {
                        lit: Lit::Bool(b), ..
                    }) => {
                        if b.value {
                            quote!(::std::option::Option::Some(
                                ::std::time::Duration::from_secs(1)
                            ))
                        } else {
                            quote!(::std::option::Option::None)
                        }
                    }
                    Expr::Lit(ExprLit { lit, .. }) => {
                        let d = seconds_lit(lit, &key)?;
                        quote!(::std::option::Option::Some(#d))
                    }
                    _ => {
                        return Err(syn::Error::new_spanned(
                            e,
                            "retry_backoff must be a bool or a number of seconds",
                        ));
                    }
                };
                self.setters.push(quote!(o.retry_backoff = #v;));
            }
            "retry_backoff_max" => {
                let d = duration(meta, &key)?;
                self.setters.push(quote!(o.retry_backoff_max = #d;));
            }
            "soft_time_limit" | "time_limit" | "expires" => {
                let d = duration(meta, &key)?;
                let field = syn::Ident::new(&key, meta.path.get_ident().expect("ident").span());
                self.setters
                    .push(quote!(o.#field = ::std::option::Option::Some(#d);));
            }
            "retry_jitter" | "acks_late" | "ignore_result" | "track_started" | "unique_raise" => {
                let e: Expr = meta.value()?.parse()?;
                let Expr::Lit(ExprLit {
                    lit: Lit::Bool(b), ..
                }) = &e
                else {
                    return Err(syn::Error::new_spanned(
                        e,
                        format!("{key} must be true or false"),
                    ));
                };
                let field = syn::Ident::new(&key, meta.path.get_ident().expect("ident").span());
                self.setters.push(quote!(o.#field = #b;));
            }
            "autoretry_for" => {
                let arr: ExprArray = meta.value()?.parse()?;
                let mut types: Vec<Path> = Vec::new();
                for el in &arr.elems {
                    match el {
                        Expr::Path(p) => types.push(p.path.clone()),
                        other => {
                            return Err(syn::Error::new_spanned(
                                other,
                                "autoretry_for takes a list of error types",
                            ));
                        }
                    }
                }
                if types.is_empty() {
                    return Err(syn::Error::new_spanned(
                        arr,
                        "autoretry_for needs at least one error type",
                    ));
                }
                self.setters.push(quote! {
                    o.autoretry = ::std::option::Option::Some({
                        fn classify(e: &::celeriac::__private::TaskError) -> bool {
                            false #(|| e.is::<#types>())*
                        }
                        classify
                    });
                });
            }
            _ => {
                return Err(meta.error(format!("unknown task option `{key}` (known: {KNOWN})")));
            }
        }
        Ok(())
    }
}

fn duration(meta: &ParseNestedMeta<'_>, key: &str) -> syn::Result<TokenStream> {
    let lit: Lit = meta.value()?.parse()?;
    seconds_lit(&lit, key)
}

/// A number of seconds (int or float literal) as a `Duration` expression.
fn seconds_lit(lit: &Lit, key: &str) -> syn::Result<TokenStream> {
    let secs: f64 = match lit {
        Lit::Int(i) => i.base10_parse::<u64>()? as f64,
        Lit::Float(f) => f.base10_parse()?,
        other => {
            return Err(syn::Error::new_spanned(
                other,
                format!("{key} must be a number of seconds"),
            ));
        }
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(syn::Error::new_spanned(
            lit,
            format!("{key} must be a non-negative number of seconds"),
        ));
    }
    let nanos = (secs * 1e9).round() as u64;
    Ok(quote!(::std::time::Duration::from_nanos(#nanos)))
}

/// Tasks per second for Celery's rate notation.
fn parse_rate(s: &str) -> Option<f64> {
    let (n, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
    let n: f64 = n.trim().parse().ok()?;
    let div = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    (n.is_finite() && n > 0.0).then_some(n / div)
}
