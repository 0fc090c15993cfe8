//! memcached's text protocol: encoding requests and parsing replies from a byte buffer.
//!
//! Pure functions, so the parser is tested without a server. [`parse`] is incremental: it
//! looks at what has arrived so far and says either how many bytes one complete reply took, or
//! that more are needed; the connection's reader calls it again after each read.

use std::fmt::Write as _;

/// The longest key memcached accepts.
pub const MAX_KEY_LEN: usize = 250;

/// One item of a `get`/`gets` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The key.
    pub key: String,
    /// The client flags stored with the value (python-memcached and pylibmc mark the value's
    /// Python type here: see [`crate::client::flags`]).
    pub flags: u32,
    /// The value's bytes.
    pub data: Vec<u8>,
    /// The CAS unique, for `gets`.
    pub cas: Option<u64>,
}

/// The shape of reply a request expects, so the parser knows where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// `VALUE ...` items up to `END` (`get`, `gets`).
    Values,
    /// One status line (`set`, `add`, `cas`, `delete`, `touch`, `version`).
    Line,
    /// A number or `NOT_FOUND` (`incr`, `decr`).
    Number,
    /// `STAT name value` lines up to `END` (`stats`).
    Stats,
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The items found (`get`, `gets`).
    Values(Vec<Item>),
    /// A status line: `STORED`, `NOT_STORED`, `EXISTS`, `NOT_FOUND`, `DELETED`, `TOUCHED`,
    /// `VERSION x`.
    Line(String),
    /// The new value of an `incr`/`decr`.
    Number(u64),
    /// `stats` lines.
    Stats(Vec<(String, String)>),
    /// `ERROR`, `CLIENT_ERROR <text>` or `SERVER_ERROR <text>`: the request failed, the
    /// connection is fine.
    Error(String),
}

/// A reply that is not memcached's text protocol: the connection cannot be trusted further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Garbled(pub(crate) String);

/// Checks a key as memcached's text protocol needs it: 1 to 250 bytes, no space or control
/// character (python-memcached checks the same before it sends).
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a memcached key cannot be empty".to_owned());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "memcached key of {} bytes is longer than {MAX_KEY_LEN}: {}...",
            key.len(),
            key.chars().take(40).collect::<String>()
        ));
    }
    if let Some(b) = key.bytes().find(|b| *b <= b' ' || *b == 0x7f) {
        return Err(format!(
            "memcached key {key:?} holds byte {b:#04x} (spaces and control characters are not allowed)"
        ));
    }
    Ok(())
}

/// `<cmd> <key> <flags> <exptime> <bytes>[ <cas>]\r\n<data>\r\n` (`set`, `add`, `cas`).
pub(crate) fn storage(
    cmd: &str,
    key: &str,
    flags: u32,
    exptime: u64,
    data: &[u8],
    cas: Option<u64>,
) -> Vec<u8> {
    let mut head = format!("{cmd} {key} {flags} {exptime} {}", data.len());
    if let Some(cas) = cas {
        let _ = write!(head, " {cas}");
    }
    head.push_str("\r\n");
    let mut out = Vec::with_capacity(head.len() + data.len() + 2);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// `get k1 k2 ...\r\n` (or `gets`).
pub(crate) fn retrieval(cmd: &str, keys: &[&str]) -> Vec<u8> {
    let mut out = String::with_capacity(5 + keys.iter().map(|k| k.len() + 1).sum::<usize>());
    out.push_str(cmd);
    for k in keys {
        out.push(' ');
        out.push_str(k);
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A one-line command: `delete <key>`, `incr <key> <n>`, `touch <key> <exptime>`, `stats`,
/// `version`.
pub(crate) fn line(words: &[&str]) -> Vec<u8> {
    let mut out = words.join(" ");
    out.push_str("\r\n");
    out.into_bytes()
}

/// The first complete line of `buf` (without `\r\n`) and the bytes it took, if there is one.
fn take_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn error_reply(line: &str) -> Option<Reply> {
    if line == "ERROR"
        || line.starts_with("ERROR ")
        || line.starts_with("CLIENT_ERROR")
        || line.starts_with("SERVER_ERROR")
    {
        Some(Reply::Error(line.to_owned()))
    } else {
        None
    }
}

/// Parses one reply of the `expect` shape from the start of `buf`: `Ok(Some((reply, used)))`
/// when it is complete, `Ok(None)` when more bytes are needed.
pub(crate) fn parse(buf: &[u8], expect: Expect) -> Result<Option<(Reply, usize)>, Garbled> {
    let garbled =
        |what: &[u8]| Garbled(String::from_utf8_lossy(&what[..what.len().min(80)]).into_owned());
    match expect {
        Expect::Line | Expect::Number => {
            let Some((line, used)) = take_line(buf) else {
                return Ok(None);
            };
            let text = std::str::from_utf8(line).map_err(|_| garbled(line))?;
            if let Some(e) = error_reply(text) {
                return Ok(Some((e, used)));
            }
            if expect == Expect::Number && text != "NOT_FOUND" {
                let n = text.trim().parse().map_err(|_| garbled(line))?;
                return Ok(Some((Reply::Number(n), used)));
            }
            Ok(Some((Reply::Line(text.to_owned()), used)))
        }
        Expect::Values => {
            let mut items = Vec::new();
            let mut at = 0;
            loop {
                let Some((line, used)) = take_line(&buf[at..]) else {
                    return Ok(None);
                };
                let text = std::str::from_utf8(line).map_err(|_| garbled(line))?;
                if text == "END" {
                    return Ok(Some((Reply::Values(items), at + used)));
                }
                if items.is_empty() {
                    if let Some(e) = error_reply(text) {
                        return Ok(Some((e, at + used)));
                    }
                }
                // VALUE <key> <flags> <bytes> [<cas unique>]
                let mut words = text.split(' ');
                let (Some("VALUE"), Some(key), Some(flags), Some(len)) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    return Err(garbled(line));
                };
                let flags: u32 = flags.parse().map_err(|_| garbled(line))?;
                let len: usize = len.parse().map_err(|_| garbled(line))?;
                let cas = match words.next() {
                    Some(c) => Some(c.parse().map_err(|_| garbled(line))?),
                    None => None,
                };
                let start = at + used;
                let end = start.checked_add(len).ok_or_else(|| garbled(line))?;
                if buf.len() < end.saturating_add(2) {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(garbled(line));
                }
                items.push(Item {
                    key: key.to_owned(),
                    flags,
                    data: buf[start..end].to_vec(),
                    cas,
                });
                at = end + 2;
            }
        }
        Expect::Stats => {
            let mut stats = Vec::new();
            let mut at = 0;
            loop {
                let Some((line, used)) = take_line(&buf[at..]) else {
                    return Ok(None);
                };
                let text = std::str::from_utf8(line).map_err(|_| garbled(line))?;
                at += used;
                if text == "END" {
                    return Ok(Some((Reply::Stats(stats), at)));
                }
                if stats.is_empty() {
                    if let Some(e) = error_reply(text) {
                        return Ok(Some((e, at)));
                    }
                }
                let mut words = text.splitn(3, ' ');
                let (Some("STAT"), Some(name), Some(value)) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(garbled(line));
                };
                stats.push((name.to_owned(), value.to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_memcached_text() {
        assert_eq!(
            storage("set", "k", 16, 60, b"hi", None),
            b"set k 16 60 2\r\nhi\r\n"
        );
        assert_eq!(
            storage("cas", "k", 0, 0, b"", Some(7)),
            b"cas k 0 0 0 7\r\n\r\n"
        );
        assert_eq!(retrieval("gets", &["a", "b"]), b"gets a b\r\n");
        assert_eq!(line(&["incr", "c", "5"]), b"incr c 5\r\n");
    }

    #[test]
    fn values_parse_incrementally() {
        let full = b"VALUE a 16 2 9\r\nhi\r\nVALUE b 0 3\r\n\r\nx\r\nEND\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse(&full[..cut], Expect::Values),
                Ok(None),
                "cut at {cut}"
            );
        }
        let (reply, used) = parse(full, Expect::Values).unwrap().unwrap();
        assert_eq!(used, full.len());
        assert_eq!(
            reply,
            Reply::Values(vec![
                Item {
                    key: "a".into(),
                    flags: 16,
                    data: b"hi".to_vec(),
                    cas: Some(9)
                },
                Item {
                    key: "b".into(),
                    flags: 0,
                    data: b"\r\nx".to_vec(),
                    cas: None
                },
            ])
        );
        // A reply followed by the next one's bytes takes only its own.
        let two = b"END\r\nSTORED\r\n";
        assert_eq!(
            parse(two, Expect::Values),
            Ok(Some((Reply::Values(vec![]), 5)))
        );
    }

    #[test]
    fn lines_numbers_errors_and_stats() {
        assert_eq!(
            parse(b"STORED\r\n", Expect::Line),
            Ok(Some((Reply::Line("STORED".into()), 8)))
        );
        assert_eq!(
            parse(b"42\r\n", Expect::Number),
            Ok(Some((Reply::Number(42), 4)))
        );
        assert_eq!(
            parse(b"NOT_FOUND\r\n", Expect::Number),
            Ok(Some((Reply::Line("NOT_FOUND".into()), 11)))
        );
        assert_eq!(
            parse(b"SERVER_ERROR object too large for cache\r\n", Expect::Line),
            Ok(Some((
                Reply::Error("SERVER_ERROR object too large for cache".into()),
                41
            )))
        );
        assert_eq!(
            parse(b"CLIENT_ERROR bad\r\n", Expect::Values),
            Ok(Some((Reply::Error("CLIENT_ERROR bad".into()), 18)))
        );
        assert_eq!(
            parse(
                b"STAT pid 12\r\nSTAT version 1.6 x\r\nEND\r\n",
                Expect::Stats
            ),
            Ok(Some((
                Reply::Stats(vec![
                    ("pid".into(), "12".into()),
                    ("version".into(), "1.6 x".into())
                ]),
                38
            )))
        );
        assert!(parse(b"what\r\n", Expect::Values).is_err());
        // A length that overflows is garbage, not a panic.
        assert!(parse(b"VALUE k 0 18446744073709551615\r\n", Expect::Values).is_err());
        assert!(parse(b"x1\r\n", Expect::Number).is_err());
    }

    /// Whatever a server (or something posing as one) sends, the parser answers without
    /// panicking, and a complete reply never claims more bytes than it was given.
    #[test]
    fn fuzz_replies() {
        let seeds: [&[u8]; 5] = [
            b"VALUE a 16 2 9\r\nhi\r\nVALUE b 0 3\r\n\r\nx\r\nEND\r\n",
            b"STORED\r\n",
            b"42\r\n",
            b"SERVER_ERROR object too large for cache\r\n",
            b"STAT pid 12\r\nSTAT version 1.6 x\r\nEND\r\n",
        ];
        celeriac_test::fuzz::fuzz(
            "memcached_replies",
            &seeds,
            &[
                b"VALUE ",
                b"END\r\n",
                b"\r\n",
                b"STAT ",
                b"18446744073709551615",
            ],
            |input| {
                for expect in [Expect::Values, Expect::Line, Expect::Number, Expect::Stats] {
                    if let Ok(Some((_, used))) = parse(input, expect) {
                        assert!(used <= input.len());
                    }
                }
            },
        );
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("celery-task-meta-1").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a b").is_err());
        assert!(check_key("a\nb").is_err());
        assert!(check_key(&"k".repeat(250)).is_ok());
        assert!(check_key(&"k".repeat(251)).is_err());
    }
}
