//! The word-count dataflow as a command: sends a document (a file, or standard input) through
//! [`celeriac_examples::word_count_graph`] and prints the running word totals while the workers
//! (`tasks worker` on the same broker) count, then the final totals.
//!
//! ```text
//! wordcount --broker sqlite://celeriac.db [--timeout SECS] [FILE]
//! ```
//!
//! Each progress line is `pending=<n> words=<distinct> counted=<total>`; the final totals are
//! one `<word> <count>` line each, most frequent first, then `run <id> done`. The body is
//! [`celeriac_examples::bin::wordcount_main`], which the end-to-end tests' copy runs too.

fn main() -> std::process::ExitCode {
    celeriac_examples::bin::wordcount_main()
}
