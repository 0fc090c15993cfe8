#[celeriac::task(priority = 12)]
fn t() {}

fn main() {}
