//! Which server holds a key, when there are several: python-memcached's rule.
//!
//! memcached servers know nothing of each other; each client picks a key's server itself, so
//! every client of a cluster must pick alike. Celery's cache backend uses pylibmc when it is
//! installed and python-memcached otherwise, and the two pick differently:
//!
//! - **python-memcached** (what [`server_for`] implements): `crc32(key)` (zlib's CRC-32 of the
//!   key's bytes), shifted right by 16 and masked with `0x7fff`, modulo the number of buckets
//!   (one bucket per server for the `host:port` strings Celery passes, which carry no
//!   weight). When a server is marked dead it rehashes `str(hash) + str(attempt)` and tries
//!   another for a while; we do not (see the crate docs: a key's server being down is an error
//!   here, never a silent move to another server).
//! - **pylibmc** (libmemcached's defaults, which Celery does not change): the distribution is
//!   `MEMCACHED_DISTRIBUTION_MODULA` and the hash `MEMCACHED_HASH_DEFAULT`, Bob Jenkins's
//!   one-at-a-time hash of the key's bytes, modulo the number of servers. Not implemented:
//!   with several servers, a celeriac process and a pylibmc client would look for the same
//!   result on different servers. With one server (the common case) both agree.

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

/// The index of the server holding `key` among `servers` servers, as python-memcached picks
/// it while every server is up.
pub(crate) fn server_for(key: &str, servers: usize) -> usize {
    if servers <= 1 {
        return 0;
    }
    cmemcache_hash(key.as_bytes()) as usize % servers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // Values printed by Python's binascii.crc32.
        assert_eq!(crc32(b"celery-task-meta-abc"), 1_041_160_443);
        assert_eq!(crc32(b"a"), 3_904_355_907);
    }

    #[test]
    fn server_choice_is_python_memcacheds() {
        // ((binascii.crc32(k) & 0xffffffff) >> 16) & 0x7fff, from Python.
        assert_eq!(cmemcache_hash(b"celery-task-meta-abc"), 15886);
        assert_eq!(
            cmemcache_hash(b"celery-task-meta-0f0e8c1a-5b7c-4a51-9e5e-1c8c2e7a8b11"),
            6135
        );
        assert_eq!(server_for("celery-task-meta-abc", 2), 0);
        assert_eq!(server_for("celery-task-meta-abc", 3), 15886 % 3);
        assert_eq!(server_for("anything", 1), 0);
    }
}
