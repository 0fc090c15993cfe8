//! Task ids: time-ordered UUIDs (version 7) from the operating system's randomness.
//!
//! Celery makes ids with `uuid4()`, and any UUID string is a valid id on the wire. celeriac
//! makes version 7 ones (RFC 9562): the first 48 bits are the Unix time in milliseconds, the
//! other 74 free bits are random. Ids made later sort later as text, so a result table or
//! index keyed by task id (SQLite, PostgreSQL) grows at its end instead of at a random page per
//! insert; ids still reveal nothing but their creation time.
//!
//! The random bits come from the operating system's generator, as `uuid4()`'s do, but each
//! thread fetches them 512 ids' worth at a time instead of with one system call per id.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Random bytes fetched at once per thread (10 per id).
const POOL: usize = 5120;

/// Bytes of randomness one id takes (74 bits used).
const PER_ID: usize = 10;

struct Pool {
    bytes: [u8; POOL],
    used: usize,
}

thread_local! {
    static RANDOM: RefCell<Pool> = const {
        RefCell::new(Pool { bytes: [0; POOL], used: POOL })
    };
}

/// Ten fresh random bytes for one id.
fn random() -> [u8; PER_ID] {
    RANDOM.with_borrow_mut(|pool| {
        if pool.used + PER_ID > POOL {
            // The OS generator only fails when the platform has none at all; then every way
            // of making an unpredictable id is gone and continuing would hand out duplicates.
            getrandom::fill(&mut pool.bytes).expect("the operating system has no random source");
            pool.used = 0;
        }
        let mut out = [0; PER_ID];
        out.copy_from_slice(&pool.bytes[pool.used..pool.used + PER_ID]);
        pool.used += PER_ID;
        out
    })
}

/// The 16 bytes of a version 7 UUID for Unix time `ms` and the random bytes `r`.
fn v7(ms: u64, r: [u8; PER_ID]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70 | (r[0] & 0x0f);
    b[7] = r[1];
    b[8] = 0x80 | (r[2] & 0x3f);
    b[9..].copy_from_slice(&r[3..]);
    b
}

/// `b` in the hyphenated lowercase form, `8-4-4-4-12` hex digits.
fn hyphenated(b: [u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(byte >> 4)] as char);
        s.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    s
}

/// A new task id: a version 7 UUID (RFC 9562) in hyphenated form, its random bits from the
/// operating system's generator, fetched for 512 ids at a time per thread.
///
/// Ids made later sort later as text, so tables keyed by task id grow at their end. Its first
/// 13 characters are the time in milliseconds; the first 8 change only every 65 s. Code that
/// wants a short random string takes the end of an id (`&id[24..]`: 48 random bits).
pub fn new_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    hyphenated(v7(ms & 0xffff_ffff_ffff, random()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn layout_is_rfc_9562_version_7() {
        let b = v7(0x0123_4567_89ab, [0xff; PER_ID]);
        assert_eq!(
            hyphenated(b),
            "01234567-89ab-7fff-bfff-ffffffffffff",
            "time first, version 7, variant 10"
        );
        let b = v7(0x0123_4567_89ab, [0; PER_ID]);
        assert_eq!(hyphenated(b), "01234567-89ab-7000-8000-000000000000");
    }

    #[test]
    fn ids_carry_the_time_and_differ() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let ids: Vec<String> = (0..5000).map(|_| new_id()).collect();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        // More than one pool's worth, so a refill happened on the way.
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        for id in &ids {
            assert_eq!(id.len(), 36);
            let ms = u64::from_str_radix(&id[..8], 16).unwrap() << 16
                | u64::from_str_radix(&id[9..13], 16).unwrap();
            assert!(
                (before.as_millis() as u64..=after.as_millis() as u64).contains(&ms),
                "{id}"
            );
            assert_eq!(&id[14..15], "7", "{id}");
            assert!("89ab".contains(&id[19..20]), "{id}");
        }
        // Ids of later milliseconds sort later as text.
        let last_ms = ids.iter().map(|id| &id[..13]).max().unwrap().to_owned();
        let later = loop {
            let id = new_id();
            if id[..13] > *last_ms {
                break id;
            }
        };
        assert!(ids.iter().all(|id| *id < later));
        // The random part is not all the same.
        let tails: HashSet<&str> = ids.iter().map(|id| &id[24..]).collect();
        assert_eq!(tails.len(), ids.len());
    }

    #[test]
    fn threads_draw_different_bytes() {
        let a = std::thread::spawn(|| (0..100).map(|_| new_id()).collect::<Vec<_>>());
        let b = std::thread::spawn(|| (0..100).map(|_| new_id()).collect::<Vec<_>>());
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let all: HashSet<_> = a.iter().chain(&b).collect();
        assert_eq!(all.len(), 200);
    }
}
