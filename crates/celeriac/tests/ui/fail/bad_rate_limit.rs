#[celeriac::task(rate_limit = "10/d")]
fn t() {}

fn main() {}
