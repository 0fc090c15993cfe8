//! The example `tasks` command ([`celeriac_examples::bin::tasks_main`]), built in this package
//! so the tests can run it as `CARGO_BIN_EXE_tasks`.

fn main() -> std::process::ExitCode {
    celeriac_examples::bin::tasks_main()
}
