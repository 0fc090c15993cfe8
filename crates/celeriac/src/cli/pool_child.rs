//! The processes pool's child side, reached without user code.
//!
//! A worker running `-P processes` starts its pool children as this same binary with
//! `CELERIAC_POOL_CHILD=1` (see [`celeriac_worker::is_pool_child`]). [`run`](super::run) checks
//! for it before parsing arguments, so a user's `main` that calls `celeriac::cli::run(app)`
//! serves as a pool child as it is: the child builds the app's task registry (it opens no
//! broker nor backend) and runs [`celeriac_worker::run_child`] until the worker lets it go.

use std::process::ExitCode;

use crate::AppBuilder;

/// Runs the pool child loop when this process is a pool child; `None` otherwise.
pub(super) fn run_if_child(
    builder: &AppBuilder,
    layers: &mut Vec<super::BoxedLayer>,
) -> Option<ExitCode> {
    if !celeriac_worker::is_pool_child() {
        return None;
    }
    // The worker passes its logging flags on (see `child_command` in the worker command).
    let args = super::logging::LogArgs::from_child_args(std::env::args_os());
    let _ = super::logging::init(&args, std::mem::take(layers));
    Some(celeriac_worker::run_child(&builder.task_registry()))
}
