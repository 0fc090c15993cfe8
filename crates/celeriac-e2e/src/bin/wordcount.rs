//! The example `wordcount` command ([`celeriac_examples::bin::wordcount_main`]), built in this
//! package so the tests can run it as `CARGO_BIN_EXE_wordcount`.

fn main() -> std::process::ExitCode {
    celeriac_examples::bin::wordcount_main()
}
