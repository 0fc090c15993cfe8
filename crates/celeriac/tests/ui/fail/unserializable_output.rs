struct NotSerde;

#[celeriac::task]
fn t() -> NotSerde {
    NotSerde
}

fn main() {}
