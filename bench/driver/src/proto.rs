//! The few bits of the ChatFlow wire protocol the driver needs: building a
//! client message and pulling a handful of fields out of server frames.
//!
//! Server frames are not parsed as full JSON on purpose: at hundreds of
//! thousands of frames per second a JSON parser would make the driver the
//! bottleneck, and we only need `type`, `code` and `clientMessageId`, whose
//! values never contain escapes.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem;

/// What a server frame is, judged by its `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Ack,
    Message,
    Error,
    Other,
}

pub fn frame_kind(json: &str) -> FrameKind {
    match str_field(json, &TYPE_KEY) {
        Some("ack") => FrameKind::Ack,
        Some("message") => FrameKind::Message,
        Some("error") => FrameKind::Error,
        _ => FrameKind::Other,
    }
}

/// A key to look up, with its quotes, and a searcher for it built once:
/// the driver scans about a million frames a second, and setting up a
/// substring search per frame would cost more than the search.
pub struct Key(memmem::Finder<'static>);

impl Key {
    fn new(quoted: &'static str) -> Key {
        Key(memmem::Finder::new(quoted.as_bytes()))
    }
}

pub static TYPE_KEY: LazyLock<Key> = LazyLock::new(|| Key::new("\"type\""));
pub static CODE_KEY: LazyLock<Key> = LazyLock::new(|| Key::new("\"code\""));
pub static CLIENT_MESSAGE_ID_KEY: LazyLock<Key> = LazyLock::new(|| Key::new("\"clientMessageId\""));

/// Value of a string field. Tolerates whitespace around the colon. Returns
/// None if the key is absent or its value is not a plain string.
pub fn str_field<'a>(json: &'a str, key: &Key) -> Option<&'a str> {
    // Servers usually put the key first: `{"type":"...`. Check that
    // before searching.
    let needle = key.0.needle();
    let at = if json.as_bytes().get(1..1 + needle.len()) == Some(needle) {
        1
    } else {
        key.0.find(json.as_bytes())?
    } + needle.len();
    // `at` follows an ASCII quote, so it is a char boundary.
    let rest = json[at..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = memchr::memchr(b'"', rest.as_bytes())?;
    Some(&rest[..end])
}

/// Our clientMessageId: `c{sender}-{seq}-{sendNanos}`. It is unique per
/// sender and message (so the server's idempotency never merges two of ours)
/// and carries the send time, so any receiver in this process can compute the
/// delivery latency against the shared clock base.
pub fn write_client_message_id(out: &mut String, sender: u64, seq: u64, nanos: u64) {
    let _ = write!(out, "c{sender}-{seq}-{nanos}");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientMessageId {
    pub sender: u64,
    pub seq: u64,
    pub nanos: u64,
}

pub fn parse_client_message_id(s: &str) -> Option<ClientMessageId> {
    let b = s.as_bytes().strip_prefix(b"c")?;
    let (sender, b) = parse_u64(b)?;
    let b = b.strip_prefix(b"-")?;
    let (seq, b) = parse_u64(b)?;
    let b = b.strip_prefix(b"-")?;
    let (nanos, b) = parse_u64(b)?;
    if !b.is_empty() {
        return None;
    }
    Some(ClientMessageId { sender, seq, nanos })
}

/// Leading decimal digits as u64 and the rest; None if there are none or
/// they overflow.
fn parse_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &b[..n] {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((v, &b[n..]))
}

/// Fixed per-connection parts of the messages a connection sends.
pub struct Sender {
    pub global_id: u64,
    pub user_id: u64,
    pub room: String,
}

impl Sender {
    pub fn new(global_id: u64, room: String) -> Self {
        // userId must be 1..=100000; spread connections over that range.
        let user_id = global_id % 100_000 + 1;
        Sender {
            global_id,
            user_id,
            room,
        }
    }

    /// Builds one TEXT message as the client sends it.
    pub fn build(&self, seq: u64, nanos: u64, timestamp: &str, text: &str) -> String {
        let mut s = String::with_capacity(160 + text.len());
        let _ = write!(
            s,
            "{{\"userId\":{uid},\"username\":\"user{uid}\",\"message\":\"{text}\",\
             \"timestamp\":\"{timestamp}\",\"messageType\":\"TEXT\",\"roomId\":\"{room}\",\
             \"clientMessageId\":\"",
            uid = self.user_id,
            room = self.room,
        );
        write_client_message_id(&mut s, self.global_id, seq, nanos);
        s.push_str("\"}");
        s
    }
}

/// The message body: `len` characters of plain ASCII so it needs no escaping.
pub fn message_text(len: usize) -> String {
    let len = len.clamp(1, 500);
    let base = "hello room this is a chatflow benchmark message ";
    base.chars().cycle().take(len).collect()
}

/// Caches the RFC 3339 wall-clock timestamp; it only changes once per
/// millisecond, so formatting it once per event-loop turn is enough.
pub struct Clock {
    last_ms: u64,
    text: String,
}

impl Clock {
    pub fn new() -> Self {
        let mut c = Clock {
            last_ms: u64::MAX,
            text: String::new(),
        };
        c.refresh();
        c
    }

    pub fn refresh(&mut self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if ms != self.last_ms {
            self.last_ms = ms;
            self.text.clear();
            format_rfc3339_millis(ms, &mut self.text);
        }
    }

    pub fn now(&self) -> &str {
        &self.text
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from milliseconds since the Unix epoch.
pub fn format_rfc3339_millis(unix_ms: u64, out: &mut String) {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(
            frame_kind(r#"{"type":"ack","status":"OK"}"#),
            FrameKind::Ack
        );
        assert_eq!(
            frame_kind(r#"{ "type" : "message", "messageType":"TEXT"}"#),
            FrameKind::Message
        );
        assert_eq!(frame_kind(r#"{"messageType":"TEXT"}"#), FrameKind::Other);
        assert_eq!(
            frame_kind(r#"{"type":"error","code":"X"}"#),
            FrameKind::Error
        );
        assert_eq!(frame_kind("not json"), FrameKind::Other);
        assert_eq!(frame_kind(r#"{"type":5}"#), FrameKind::Other);
    }

    #[test]
    fn client_message_id_roundtrip() {
        let mut s = String::new();
        write_client_message_id(&mut s, 17, 42, 123_456_789);
        assert!(s.len() <= 64);
        assert_eq!(
            parse_client_message_id(&s),
            Some(ClientMessageId {
                sender: 17,
                seq: 42,
                nanos: 123_456_789
            })
        );
        assert_eq!(parse_client_message_id("x1-2-3"), None);
        assert_eq!(parse_client_message_id("c1-2"), None);
        assert_eq!(parse_client_message_id("c1-2-3x"), None);
        assert_eq!(
            parse_client_message_id("c1-2-99999999999999999999999"),
            None
        );
    }

    #[test]
    fn message_is_valid_shape() {
        let s = Sender::new(122, "7".into());
        let m = s.build(3, 99, "2026-11-21T22:41:01.123Z", "hi");
        assert_eq!(
            m,
            r#"{"userId":123,"username":"user123","message":"hi","timestamp":"2026-11-21T22:41:01.123Z","messageType":"TEXT","roomId":"7","clientMessageId":"c122-3-99"}"#
        );
        assert_eq!(str_field(&m, &CLIENT_MESSAGE_ID_KEY), Some("c122-3-99"));
        assert_eq!(str_field(r#"{"code" : "X_Y"}"#, &CODE_KEY), Some("X_Y"));
        assert_eq!(str_field(r#"{"code":5}"#, &CODE_KEY), None);
    }

    #[test]
    fn timestamps() {
        let mut s = String::new();
        format_rfc3339_millis(0, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2026-11-21T22:41:01.123Z
        format_rfc3339_millis(1_795_300_861_123, &mut s);
        assert_eq!(s, "2026-11-21T22:41:01.123Z");
        s.clear();
        format_rfc3339_millis(951_782_400_000, &mut s); // leap day 2000
        assert_eq!(s, "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn text_len() {
        assert_eq!(message_text(0).len(), 1);
        assert_eq!(message_text(32).len(), 32);
        assert_eq!(message_text(10_000).len(), 500);
    }
}
