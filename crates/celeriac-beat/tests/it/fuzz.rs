//! Fuzzing the crontab parser and the next-tick search (crontab text reaches beat from the
//! config, `beat add --crontab` and the dashboard): every text parses or fails with an error,
//! and a parsed crontab's next tick is found in bounded time and lies in the future.

use celeriac_beat::{Crontab, Zone};
use celeriac_test::fuzz::fuzz;

#[test]
fn fuzz_crontab() {
    let seeds: &[&[u8]] = &[
        b"*/15 * * * *",
        b"0 9-17/2 * * mon-fri",
        b"30 4 1,15 * *",
        b"0 0 29 2 *",
        b"59 23 31 12 sun",
        b"5 0 * 8 *",
    ];
    let zones = [
        Zone::Utc,
        Zone::named("Europe/Berlin").unwrap_or_default(),
        Zone::named("America/New_York").unwrap_or_default(),
    ];
    let after = chrono::DateTime::parse_from_rfc3339("2026-03-29T00:30:00Z")
        .unwrap()
        .to_utc();
    let dictionary: &[&[u8]] = &[b"*", b"/", b"-", b",", b"mon", b"sun", b"jan", b"60", b"0"];
    fuzz("crontab", seeds, dictionary, |input| {
        let Ok(c) = Crontab::parse(&String::from_utf8_lossy(input)) else {
            return;
        };
        for zone in &zones {
            if let Some(next) = c.next_after(after, zone) {
                assert!(next > after, "{next} is not after {after}");
            }
        }
    });
}
