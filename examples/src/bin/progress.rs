//! An axum app whose page starts a group of tasks on a button press and shows a progress bar
//! that polls the group's progress by `fetch` until done: `progress [--broker URL] [--bind
//! 127.0.0.1:8000] [--no-worker]`. The body is [`celeriac_examples::progress::progress_main`].

fn main() -> std::process::ExitCode {
    celeriac_examples::progress::progress_main()
}
