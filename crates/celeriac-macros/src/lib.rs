//! The `#[celeriac::task]` attribute. Use it through the `celeriac` crate; the expansion refers
//! to `::celeriac` paths only.
//!
//! The attribute keeps the function as it is (calling it still runs it inline) and adds, under
//! the same name in the type namespace, a unit-like struct that implements `celeriac::Task`,
//! with `s(args..)` (a typed `Signature`) and `delay(&app, args..)` (send now).

mod expand;
mod options;

use proc_macro::TokenStream;

/// Turns a function into a celeriac task.
///
/// ```ignore
/// #[celeriac::task(name = "tasks.add", queue = "math", max_retries = 5, time_limit = 30)]
/// async fn add(x: i64, y: i64) -> i64 { x + y }
/// ```
///
/// `async fn` tasks run on the worker's runtime; plain `fn` tasks on its thread pool. The
/// function may take a `TaskContext` (or `&TaskContext`) first, and may return
/// `Result<T, E>` where `E` converts into `celeriac::TaskError`.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand::expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.into_compile_error().into(),
    }
}
