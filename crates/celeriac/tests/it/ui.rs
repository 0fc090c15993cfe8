//! `#[task]` compile-time checks: what compiles, and the exact errors for misuse.

#[test]
fn task_macro_ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
