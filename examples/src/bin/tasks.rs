//! The example task app as a command line: `tasks worker`, `tasks call tasks.add --args '[2,3]'
//! --wait`, `tasks status`, ... against any broker URL (`--broker`, `CELERIAC_BROKER_URL` or
//! `celeriac.toml`; the default is `sqlite://celeriac.db`).

fn main() -> std::process::ExitCode {
    celeriac::cli::run(celeriac_examples::app())
}
