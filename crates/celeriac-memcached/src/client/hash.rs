//! Which server holds a key, when there are several.
//!
//! memcached servers know nothing of each other; each client picks a key's server itself, so
//! every client of a cluster must pick alike. The rule is the Python library's, and Celery
//! changed libraries in 5.7:
//!
//! - **pymemcache** (Celery 5.7, its only memcached library; [`Distribution::Rendezvous`], the
//!   default): `HashClient`'s rendezvous (highest random weight) hashing. Each server is named
//!   `host:port` (as pymemcache normalizes `host:port` strings: an IPv6 host without its
//!   brackets); a key goes to the server whose `murmur3_32("<server>-<key>", seed 0)` is the
//!   highest, ties to the greater name. A single server is a plain `Client`, no hashing.
//! - **python-memcached** (Celery up to 5.6 when pylibmc is not installed;
//!   [`Distribution::Crc32`]): `(crc32(key) >> 16) & 0x7fff` (zlib's CRC-32) modulo the number
//!   of servers. When a server is marked dead it rehashes to another; we do not.
//! - **pylibmc** (Celery up to 5.6, preferred when installed): libmemcached's defaults,
//!   `MEMCACHED_DISTRIBUTION_MODULA` with `MEMCACHED_HASH_DEFAULT` (Bob Jenkins's
//!   one-at-a-time hash) modulo the number of servers. Not implemented.
//!
//! Neither rule moves a key when a server is down: an unreachable server is an error for the
//! keys it holds, never a silent write to another server that other clients would not read.

/// How keys are spread over several servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Distribution {
    /// pymemcache's `HashClient` (Celery 5.7): rendezvous hashing with murmur3.
    #[default]
    Rendezvous,
    /// python-memcached's `cmemcache_hash` modulo the server count (Celery ≤ 5.6 without
    /// pylibmc).
    Crc32,
}

/// The index of the server holding `key` among `servers` (named `host:port`).
pub(crate) fn server_for(key: &str, servers: &[String], how: Distribution) -> usize {
    if servers.len() <= 1 {
        return 0;
    }
    match how {
        Distribution::Crc32 => cmemcache_hash(key.as_bytes()) as usize % servers.len(),
        Distribution::Rendezvous => {
            let mut best: Option<(u32, usize)> = None;
            for (i, name) in servers.iter().enumerate() {
                let score = murmur3_32(format!("{}-{key}", pymemcache_name(name)).as_bytes(), 0);
                best = match best {
                    Some((s, _)) if score > s => Some((score, i)),
                    Some((s, w)) if score == s => {
                        let wins = pymemcache_name(name) > pymemcache_name(&servers[w]);
                        Some((s, if wins { i } else { w }))
                    }
                    None => Some((score, i)),
                    keep => keep,
                };
            }
            best.map_or(0, |(_, i)| i)
        }
    }
}

/// The name pymemcache gives a `host:port` server: an IPv6 host loses its brackets.
fn pymemcache_name(addr: &str) -> String {
    match addr.strip_prefix('[') {
        Some(rest) => rest.replacen(']', "", 1),
        None => addr.to_owned(),
    }
}

/// MurmurHash3 x86 32-bit (what pymemcache's pure-Python `murmur3_32` computes for ASCII).
pub(crate) fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The CRC-32 (IEEE, zlib's and `binascii.crc32`'s) of `bytes`.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = 0xffff_ffffu32;
    for b in bytes {
        crc = TABLE[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc ^ 0xffff_ffff
}

/// python-memcached's `cmemcache_hash`: `(crc32(key) >> 16) & 0x7fff`.
pub(crate) fn cmemcache_hash(key: &[u8]) -> u32 {
    (crc32(key) >> 16) & 0x7fff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_is_pymemcaches() {
        // Values printed by pymemcache.client.murmur3.murmur3_32.
        for (s, want) in [
            ("", 0),
            ("a", 1_009_084_850),
            ("ab", 2_613_040_991),
            ("abc", 3_017_643_002),
            ("abcd", 1_139_631_978),
            ("hello world", 1_586_663_183),
            ("127.0.0.1:11211-celery-task-meta-abc", 1_461_648_313),
        ] {
            assert_eq!(murmur3_32(s.as_bytes(), 0), want, "{s:?}");
        }
    }

    #[test]
    fn rendezvous_picks_as_pymemcache_does() {
        // pymemcache's RendezvousHash over these three nodes, for celery-task-meta-0..5.
        let servers: Vec<String> = ["127.0.0.1:11211", "127.0.0.1:11212", "127.0.0.1:11213"]
            .map(str::to_owned)
            .to_vec();
        let got: Vec<usize> = (0..6)
            .map(|i| {
                server_for(
                    &format!("celery-task-meta-{i}"),
                    &servers,
                    Distribution::Rendezvous,
                )
            })
            .collect();
        assert_eq!(got, [1, 0, 0, 2, 0, 1]);
        assert_eq!(pymemcache_name("[::1]:11211"), "::1:11211");
    }

    #[test]
    fn crc32_is_zlibs_and_python_memcacheds() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // Values printed by Python's binascii.crc32.
        assert_eq!(crc32(b"celery-task-meta-abc"), 1_041_160_443);
        assert_eq!(crc32(b"a"), 3_904_355_907);
        // ((binascii.crc32(k) & 0xffffffff) >> 16) & 0x7fff, from Python.
        assert_eq!(cmemcache_hash(b"celery-task-meta-abc"), 15886);
        assert_eq!(
            cmemcache_hash(b"celery-task-meta-0f0e8c1a-5b7c-4a51-9e5e-1c8c2e7a8b11"),
            6135
        );
        let three = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(
            server_for("celery-task-meta-abc", &three, Distribution::Crc32),
            15886 % 3
        );
        assert_eq!(server_for("x", &three[..1], Distribution::Rendezvous), 0);
    }
}
