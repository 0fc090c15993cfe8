#[celeriac::task(retries = 3)]
fn t() {}

fn main() {}
