//! Integration tests of the `celeriac` facade, in one binary.

// The #[task] macro: trybuild pass/fail cases.
mod ui;
