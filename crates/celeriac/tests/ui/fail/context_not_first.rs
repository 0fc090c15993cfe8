#[celeriac::task]
fn t(x: i64, ctx: celeriac::TaskContext) -> i64 {
    let _ = ctx;
    x
}

fn main() {}
