//! `celeriac`: a command line and dashboard for a Celery or celeriac cluster that holds no
//! task code, so it can watch and steer Python Celery workers as Flower and `celery
//! inspect`/`control`/`events` do.
//!
//! ```text
//! celeriac -b redis://127.0.0.1:6379/0 dashboard --bind 127.0.0.1:5555
//! celeriac -b redis://127.0.0.1:6379/0 inspect ping
//! celeriac -b amqp://guest:guest@127.0.0.1// --result-backend redis://127.0.0.1/0 \
//!     call tasks.add --args '[2, 3]' --wait
//! ```
//!
//! The broker comes from `-b`, `CELERIAC_BROKER_URL` or `celeriac.toml`, as for an app's own
//! binary (docs/configuration.md). See docs/standalone.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    celeriac::cli::run_without_tasks(
        celeriac::App::builder().load_config(),
        "celeriac",
        std::env::args_os(),
    )
}
