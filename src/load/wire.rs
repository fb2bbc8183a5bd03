//! The client side of the wire protocol: building messages, and pulling the few fields the
//! load tester needs out of server frames without a JSON parser.
//!
//! Server frames are scanned, not parsed: at several hundred thousand frames a second a full
//! JSON parse would make the client the bottleneck. We only need `type`, `code` and
//! `clientMessageId`, whose values never contain escapes (ours are `[A-Za-z0-9-]`). Anything
//! that does not scan cleanly is treated as "not ours" and counted, never trusted.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem;

use super::workload::{Msg, TEXTS};

/// What a server frame is, judged by its `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    Ack,
    Message,
    Error,
    Other,
}

/// The frame openings ChatFlow writes; checked before the general scan because nearly every
/// frame starts this way.
const ACK_OPENING: &str = "{\"type\":\"ack\"";
const MESSAGE_OPENING: &str = "{\"type\":\"message\"";
const ERROR_OPENING: &str = "{\"type\":\"error\"";

pub(crate) fn frame_kind(json: &str) -> FrameKind {
    if json.starts_with(ACK_OPENING) {
        return FrameKind::Ack;
    }
    if json.starts_with(MESSAGE_OPENING) {
        return FrameKind::Message;
    }
    if json.starts_with(ERROR_OPENING) {
        return FrameKind::Error;
    }
    // Another server may order or space its fields differently.
    match str_field(json, &TYPE_KEY) {
        Some("ack") => FrameKind::Ack,
        Some("message") => FrameKind::Message,
        Some("error") => FrameKind::Error,
        _ => FrameKind::Other,
    }
}

/// A quoted key and a searcher for it, built once: setting up a substring search per frame
/// would cost more than the search.
pub(crate) struct Key(memmem::Finder<'static>);

impl Key {
    fn new(quoted: &'static str) -> Key {
        Key(memmem::Finder::new(quoted.as_bytes()))
    }
}

pub(crate) static TYPE_KEY: LazyLock<Key> = LazyLock::new(|| Key::new("\"type\""));
pub(crate) static CODE_KEY: LazyLock<Key> = LazyLock::new(|| Key::new("\"code\""));
pub(crate) static CLIENT_MESSAGE_ID_KEY: LazyLock<Key> =
    LazyLock::new(|| Key::new("\"clientMessageId\""));

/// The value of a string field; None if the key is absent or its value is not a plain string.
/// Tolerates whitespace around the colon.
pub(crate) fn str_field<'a>(json: &'a str, key: &Key) -> Option<&'a str> {
    let needle = key.0.needle();
    let at = key.0.find(json.as_bytes())? + needle.len();
    // `at` follows an ASCII quote, so it is a char boundary.
    let rest = json.get(at..)?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = memchr::memchr(b'"', rest.as_bytes())?;
    rest.get(..end)
}

/// Our `clientMessageId`: `L{run}-{thread}-{seq}-{sentNanos}`.
///
/// - `run` is random per run, so a second run against the same server (whose store dedupes by
///   the id derived from userId + clientMessageId) never has its messages taken for repeats;
/// - `thread` lets a fan-out receiver tell which load thread's window a delivery closes;
/// - `seq` is the message's number, matched against the connection's oldest unanswered one;
/// - `sentNanos` is the intended send time on the run's clock, so a receiver anywhere in this
///   process computes the delivery latency. A retry keeps the id, so the server's idempotency
///   turns a resend of an already stored message into the same `messageId`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientMessageId {
    pub run: u32,
    pub thread: u32,
    pub seq: u64,
    pub nanos: u64,
}

impl ClientMessageId {
    pub(crate) fn write(&self, out: &mut String) {
        let mut b = itoa::Buffer::new();
        out.push('L');
        out.push_str(b.format(self.run));
        out.push('-');
        out.push_str(b.format(self.thread));
        out.push('-');
        out.push_str(b.format(self.seq));
        out.push('-');
        out.push_str(b.format(self.nanos));
    }

    pub(crate) fn parse(s: &str) -> Option<ClientMessageId> {
        let b = s.as_bytes().strip_prefix(b"L")?;
        let (run, b) = parse_u64(b)?;
        let b = b.strip_prefix(b"-")?;
        let (thread, b) = parse_u64(b)?;
        let b = b.strip_prefix(b"-")?;
        let (seq, b) = parse_u64(b)?;
        let b = b.strip_prefix(b"-")?;
        let (nanos, b) = parse_u64(b)?;
        if !b.is_empty() {
            return None;
        }
        Some(ClientMessageId {
            run: u32::try_from(run).ok()?,
            thread: u32::try_from(thread).ok()?,
            seq,
            nanos,
        })
    }
}

/// The `clientMessageId` of a server frame, if it carries one of ours.
pub(crate) fn frame_client_message_id(json: &str) -> Option<ClientMessageId> {
    str_field(json, &CLIENT_MESSAGE_ID_KEY).and_then(ClientMessageId::parse)
}

/// Leading decimal digits as u64 and the rest; None if there are none or they overflow.
fn parse_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &b[..n] {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((v, &b[n..]))
}

/// Writes one client message as it goes on the wire (PROTOCOL.md §2). Every string we put in
/// is plain ASCII without quotes or backslashes, so nothing needs escaping.
pub(crate) fn write_message(
    out: &mut String,
    msg: &Msg,
    room: &str,
    timestamp: &str,
    id: &ClientMessageId,
) {
    let mut b = itoa::Buffer::new();
    let user = b.format(msg.user);
    out.push_str("{\"userId\":");
    out.push_str(user);
    out.push_str(",\"username\":\"user");
    out.push_str(user);
    out.push_str("\",\"message\":\"");
    out.push_str(TEXTS[usize::from(msg.text) % TEXTS.len()]);
    out.push_str("\",\"timestamp\":\"");
    out.push_str(timestamp);
    out.push_str("\",\"messageType\":\"");
    out.push_str(msg.kind.as_str());
    out.push_str("\",\"roomId\":\"");
    out.push_str(room);
    out.push_str("\",\"clientMessageId\":\"");
    id.write(out);
    out.push_str("\"}");
}

/// Caches the RFC 3339 wall-clock timestamp messages carry: it changes once a millisecond,
/// so formatting it once per event-loop turn is enough.
pub(crate) struct Clock {
    last_ms: u64,
    text: String,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let mut c = Clock {
            last_ms: u64::MAX,
            text: String::new(),
        };
        c.refresh();
        c
    }

    pub(crate) fn refresh(&mut self) {
        let ms = unix_ms_now();
        if ms != self.last_ms {
            self.last_ms = ms;
            self.text.clear();
            format_rfc3339_millis(ms, &mut self.text);
        }
    }

    pub(crate) fn now(&self) -> &str {
        &self.text
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from milliseconds since the Unix epoch.
pub(crate) fn format_rfc3339_millis(unix_ms: u64, out: &mut String) {
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

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm).
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

/// Whether `code` is an error after which the same message may succeed later
/// (PROTOCOL.md §3: "the client may retry"). Anything else is the message's own fault and
/// fails at once: resending it would be rejected again.
pub(crate) fn is_retryable(code: &str) -> bool {
    matches!(code, "RATE_LIMITED" | "UNAVAILABLE" | "OVERLOADED")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::workload::MessageType;

    #[test]
    fn frame_kinds_by_opening_and_by_scan() {
        assert_eq!(
            frame_kind(r#"{"type":"ack","status":"OK"}"#),
            FrameKind::Ack
        );
        assert_eq!(
            frame_kind(r#"{ "type" : "message", "messageType":"TEXT"}"#),
            FrameKind::Message
        );
        assert_eq!(
            frame_kind(r#"{"code":"X","type":"error"}"#),
            FrameKind::Error
        );
        assert_eq!(frame_kind(r#"{"messageType":"TEXT"}"#), FrameKind::Other);
        assert_eq!(frame_kind("not json"), FrameKind::Other);
        assert_eq!(frame_kind(r#"{"type":5}"#), FrameKind::Other);
        assert_eq!(frame_kind(r#"{"type":"#), FrameKind::Other);
    }

    #[test]
    fn client_message_ids_round_trip_and_fit_the_protocol() {
        let id = ClientMessageId {
            run: u32::MAX,
            thread: 999,
            seq: 12_345_678_901,
            nanos: u64::MAX,
        };
        let mut s = String::new();
        id.write(&mut s);
        assert!(s.len() <= 64, "{s}");
        assert!(crate::protocol::is_valid_id(&s), "{s}");
        assert_eq!(ClientMessageId::parse(&s), Some(id));
        for bad in [
            "x1-2-3-4",
            "L1-2-3",
            "L1-2-3-4x",
            "L1-2-3-99999999999999999999999",
            "L99999999999-0-1-1",
            "",
        ] {
            assert_eq!(ClientMessageId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn fields_are_found_with_or_without_spaces_and_never_panic() {
        assert_eq!(str_field(r#"{"code" : "X_Y"}"#, &CODE_KEY), Some("X_Y"));
        assert_eq!(str_field(r#"{"code":5}"#, &CODE_KEY), None);
        assert_eq!(str_field(r#"{"code":"unterminated"#, &CODE_KEY), None);
        assert_eq!(str_field(r#"{"code""#, &CODE_KEY), None);
        assert_eq!(str_field("{\"code\":\"é\"}", &CODE_KEY), Some("é"));
    }

    #[test]
    fn a_built_message_passes_the_servers_validation() {
        let msg = Msg {
            seq: 3,
            index: 3,
            user: 100_000,
            room: 6,
            text: 49,
            kind: MessageType::Join,
        };
        let id = ClientMessageId {
            run: 7,
            thread: 0,
            seq: 3,
            nanos: 99,
        };
        let mut s = String::new();
        write_message(&mut s, &msg, "7", "2026-11-21T22:41:01.123Z", &id);
        let parsed = crate::protocol::parse_message(&s, "7").expect("valid");
        assert_eq!(parsed.user_id, 100_000);
        assert_eq!(parsed.client_message_id.as_deref(), Some("L7-0-3-99"));
        assert_eq!(frame_client_message_id(&s), Some(id));
    }

    #[test]
    fn every_pooled_text_is_valid() {
        for (i, _) in TEXTS.iter().enumerate() {
            let msg = Msg {
                seq: 0,
                index: 0,
                user: 1,
                room: 0,
                text: i as u8,
                kind: MessageType::Text,
            };
            let id = ClientMessageId {
                run: 1,
                thread: 0,
                seq: 0,
                nanos: 0,
            };
            let mut s = String::new();
            write_message(&mut s, &msg, "1", "2026-11-21T22:41:01.123Z", &id);
            assert!(crate::protocol::parse_message(&s, "1").is_ok(), "{s}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let mut s = String::new();
        format_rfc3339_millis(0, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        format_rfc3339_millis(1_795_300_861_123, &mut s);
        assert_eq!(s, "2026-11-21T22:41:01.123Z");
        s.clear();
        format_rfc3339_millis(951_782_400_000, &mut s);
        assert_eq!(s, "2000-02-29T00:00:00.000Z");
    }
}
