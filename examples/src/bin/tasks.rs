//! The example task app as a command line: `tasks worker`, `tasks call tasks.add --args '[2,3]'
//! --wait`, `tasks status`, ... against any broker URL (`--broker`, `CELERIAC_BROKER_URL` or
//! `celeriac.toml`; the default is `sqlite://celeriac.db`). The body is
//! [`celeriac_examples::bin::tasks_main`], which the end-to-end tests' copy runs too.

fn main() -> std::process::ExitCode {
    celeriac_examples::bin::tasks_main()
}
