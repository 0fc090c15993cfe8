#[celeriac::task(acks_late = "yes")]
fn t() {}

fn main() {}
