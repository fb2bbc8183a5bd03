//! The ChatFlow wire protocol: validating client frames and writing server frames, with no I/O.
//!
//! Everything here works on plain values so it can be tested (and fuzzed) without sockets.
//! The rules are those of the protocol contract; `docs/protocol-notes.md` records the choices
//! made where the contract is silent.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Largest accepted `userId`.
pub const MAX_USER_ID: u32 = 100_000;
/// Longest accepted `message`, in Unicode scalar values.
pub const MAX_MESSAGE_CHARS: usize = 500;
/// Longest room id and longest `clientMessageId`.
pub const MAX_ID_LEN: usize = 64;

/// Namespace of the UUIDv5 ids derived from (`userId`, `clientMessageId`). Fixed forever:
/// changing it would give retried messages new ids and break idempotency across versions.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_4a3e_93d2_4b0e_8f57_2c6a_9e1d_0b44);

/// The three kinds of chat event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// An ordinary chat line.
    Text,
    /// The user joins the room's presence.
    Join,
    /// The user leaves the room's presence (the connection stays open).
    Leave,
}

impl MessageType {
    /// The canonical (upper-case) spelling used in every frame the server writes.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Text => "TEXT",
            MessageType::Join => "JOIN",
            MessageType::Leave => "LEAVE",
        }
    }

    /// All types, in the order metrics list them.
    pub const ALL: [MessageType; 3] = [MessageType::Text, MessageType::Join, MessageType::Leave];

    /// Position in [`MessageType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

/// The error codes of an `error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not one JSON object.
    InvalidJson,
    /// One or more field rules fail.
    ValidationFailed,
    /// The body's `roomId` differs from the path's room.
    RoomMismatch,
    /// A binary frame.
    UnsupportedFrame,
    /// The connection exceeded its configured message rate.
    RateLimited,
    /// The message could not be accepted durably.
    Unavailable,
    /// The server is shedding load.
    Overloaded,
    /// The message's `userId` is not the one the connection's access token was issued to.
    Unauthorized,
}

impl ErrorCode {
    /// Every code, in the order metrics list them.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::InvalidJson,
        ErrorCode::ValidationFailed,
        ErrorCode::RoomMismatch,
        ErrorCode::UnsupportedFrame,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Overloaded,
        ErrorCode::Unauthorized,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::ValidationFailed => "VALIDATION_FAILED",
            ErrorCode::RoomMismatch => "ROOM_MISMATCH",
            ErrorCode::UnsupportedFrame => "UNSUPPORTED_FRAME",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
        }
    }

    /// Position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One failing field of a rejected message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The JSON field name, as the client spelled it in the contract.
    pub field: &'static str,
    /// Why it failed, for a person to read.
    pub reason: String,
}

/// Why a text frame was not accepted. Every variant becomes one `error` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The code of the error frame.
    pub code: ErrorCode,
    /// A one-line explanation.
    pub message: String,
    /// The failing fields (empty for codes that are not about fields).
    pub errors: Vec<FieldError>,
    /// The client's `clientMessageId`, echoed when it was itself valid.
    pub client_message_id: Option<String>,
}

impl Rejection {
    /// A rejection that concerns the whole frame rather than fields.
    pub fn whole(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            errors: Vec::new(),
            client_message_id: None,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// A message that passed every rule. Borrows from the frame where it can.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    /// 1..=100000.
    pub user_id: u32,
    /// `^[A-Za-z0-9]{3,20}$`.
    pub username: Cow<'a, str>,
    /// 1..=500 characters.
    pub message: Cow<'a, str>,
    /// The client's RFC 3339 timestamp, echoed exactly as sent.
    pub timestamp: Cow<'a, str>,
    /// The same instant, parsed once by validation (for the store), in UTC.
    pub client_time: OffsetDateTime,
    /// TEXT, JOIN or LEAVE.
    pub message_type: MessageType,
    /// The idempotency key, if the client gave one.
    pub client_message_id: Option<Cow<'a, str>>,
}

impl ChatMessage<'_> {
    /// The server-assigned id: derived from (`userId`, `clientMessageId`) when the client
    /// gave a key, so a retry keeps its id on any node; otherwise a fresh time-ordered v7.
    pub fn message_id(&self) -> Uuid {
        match &self.client_message_id {
            Some(key) => derived_message_id(self.user_id, key),
            None => Uuid::now_v7(),
        }
    }
}

/// The UUIDv5 of (`userId`, `clientMessageId`).
pub fn derived_message_id(user_id: u32, client_message_id: &str) -> Uuid {
    // "{userId}:{key}": the separator cannot occur in either part. At most 6 + 1 + 64 bytes
    // for valid input; a longer key (only possible from a caller that skipped validation)
    // is hashed from the heap.
    let mut buf = [0u8; 80];
    let mut digits = itoa::Buffer::new();
    let user = digits.format(user_id).as_bytes();
    let len = user.len() + 1 + client_message_id.len();
    if len > buf.len() {
        let name = format!("{user_id}:{client_message_id}");
        return Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes());
    }
    buf[..user.len()].copy_from_slice(user);
    buf[user.len()] = b':';
    buf[user.len() + 1..len].copy_from_slice(client_message_id.as_bytes());
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &buf[..len])
}

/// True for 1..=64 characters of `[A-Za-z0-9_-]`: the rule for room ids and client keys.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The fields the server looks at. Each is kept raw so a wrong type becomes a field error
/// instead of failing the whole frame; unknown fields are skipped by serde.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFields<'a> {
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    username: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    room_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    client_message_id: Option<&'a RawValue>,
}

/// A JSON string value, borrowed when it has no escapes. `None` for any other JSON type.
fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    if let Ok(s) = serde_json::from_str::<&str>(text) {
        return Some(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

fn is_null(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|r| r.get() == "null")
}

fn user_id_rule(raw: Option<&RawValue>) -> Result<u32, String> {
    const RANGE: &str = "must be between 1 and 100000";
    let raw = match raw {
        Some(r) if r.get() != "null" => r,
        _ => return Err("is required".into()),
    };
    let text = raw.get();
    let digits: Cow<'_, str> = if text.starts_with('"') {
        match json_string(raw) {
            Some(s) => s,
            None => return Err("must be an integer or a decimal string".into()),
        }
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Cow::Borrowed(text)
    } else {
        return Err("must be an integer or a decimal string".into());
    };
    if let Some(rest) = digits.strip_prefix('-')
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(RANGE.into());
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be an integer or a decimal string".into());
    }
    // Anything longer than 7 significant digits is out of range; this also avoids overflow.
    let significant = digits.trim_start_matches('0');
    if significant.len() > 7 {
        return Err(RANGE.into());
    }
    let value: u32 = significant.parse().unwrap_or(0);
    if (1..=MAX_USER_ID).contains(&value) {
        Ok(value)
    } else {
        Err(RANGE.into())
    }
}

fn required_string<'a>(raw: Option<&'a RawValue>) -> Result<Cow<'a, str>, String> {
    match raw {
        Some(r) if r.get() != "null" => json_string(r).ok_or_else(|| "must be a string".into()),
        _ => Err("is required".into()),
    }
}

fn username_rule(raw: Option<&RawValue>) -> Result<Cow<'_, str>, String> {
    let s = required_string(raw)?;
    let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric());
    if (3..=20).contains(&s.len()) && ok_chars {
        Ok(s)
    } else {
        Err("must be 3 to 20 ASCII letters or digits".into())
    }
}

fn message_rule(raw: Option<&RawValue>) -> Result<Cow<'_, str>, String> {
    let s = required_string(raw)?;
    // Bytes bound characters from above, so most messages skip the count.
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_MESSAGE_CHARS && s.chars().count() > MAX_MESSAGE_CHARS {
        return Err("must be at most 500 characters".into());
    }
    Ok(s)
}

fn timestamp_rule(raw: Option<&RawValue>) -> Result<(Cow<'_, str>, OffsetDateTime), String> {
    let s = required_string(raw)?;
    match OffsetDateTime::parse(&s, &Rfc3339) {
        Ok(t) => Ok((s, utc_clamped(t))),
        Err(_) => {
            Err("must be an RFC 3339 date-time with a zone, e.g. 2026-11-21T22:41:01.123Z".into())
        }
    }
}

fn message_type_rule(raw: Option<&RawValue>) -> Result<MessageType, String> {
    let s = required_string(raw)?;
    MessageType::parse(&s).ok_or_else(|| "must be TEXT, JOIN or LEAVE".into())
}

fn client_message_id_rule(raw: Option<&RawValue>) -> Result<Option<Cow<'_, str>>, String> {
    if is_null(raw) {
        return Ok(None);
    }
    let s = required_string(raw)?;
    if is_valid_id(&s) {
        Ok(Some(s))
    } else {
        Err("must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'".into())
    }
}

fn note<T>(errors: &mut Vec<FieldError>, field: &'static str, result: &Result<T, String>) {
    if let Err(reason) = result {
        errors.push(FieldError {
            field,
            reason: reason.clone(),
        });
    }
}

/// Checks one text frame against every rule, for the connection bound to `path_room`.
///
/// On failure every failing field is listed. A `roomId` that differs from the path is reported
/// as `ROOM_MISMATCH` when it is the only problem, and as one more field of
/// `VALIDATION_FAILED` otherwise.
pub fn parse_message<'a>(text: &'a str, path_room: &str) -> Result<ChatMessage<'a>, Rejection> {
    // serde would also accept a JSON array as a struct; the contract wants an object.
    if !text.trim_start().starts_with('{') {
        return Err(Rejection::whole(
            ErrorCode::InvalidJson,
            "the frame must be one JSON object",
        ));
    }
    let raw: RawFields<'a> = serde_json::from_str(text).map_err(|e| {
        Rejection::whole(
            ErrorCode::InvalidJson,
            format!("the frame is not valid JSON: {e}"),
        )
    })?;

    let mut errors = Vec::new();
    let user_id = user_id_rule(raw.user_id);
    note(&mut errors, "userId", &user_id);
    let username = username_rule(raw.username);
    note(&mut errors, "username", &username);
    let message = message_rule(raw.message);
    note(&mut errors, "message", &message);
    let timestamp = timestamp_rule(raw.timestamp);
    note(&mut errors, "timestamp", &timestamp);
    let message_type = message_type_rule(raw.message_type);
    note(&mut errors, "messageType", &message_type);
    let client_message_id = client_message_id_rule(raw.client_message_id);
    note(&mut errors, "clientMessageId", &client_message_id);
    // The rule's outcome, and whether it failed as a mismatch of a well-formed room id.
    let (room_ok, mismatch) = if is_null(raw.room_id) {
        (Ok(()), false)
    } else {
        match required_string(raw.room_id) {
            Ok(room) if room == path_room => (Ok(()), false),
            Ok(_) => (
                Err(format!(
                    "must equal the room of the connection ({path_room:?})"
                )),
                true,
            ),
            Err(reason) => (Err(reason), false),
        }
    };
    let room_mismatch_only = errors.is_empty() && mismatch;
    note(&mut errors, "roomId", &room_ok);

    match (
        user_id,
        username,
        message,
        timestamp,
        message_type,
        client_message_id,
    ) {
        (
            Ok(user_id),
            Ok(username),
            Ok(message),
            Ok((timestamp, client_time)),
            Ok(message_type),
            Ok(cmid),
        ) if errors.is_empty() => Ok(ChatMessage {
            user_id,
            username,
            message,
            timestamp,
            client_time,
            message_type,
            client_message_id: cmid,
        }),
        (_, _, _, _, _, cmid) => {
            let code = if room_mismatch_only {
                ErrorCode::RoomMismatch
            } else {
                ErrorCode::ValidationFailed
            };
            let names: Vec<&str> = errors.iter().map(|e| e.field).collect();
            Err(Rejection {
                code,
                message: format!("invalid field(s): {}", names.join(", ")),
                errors,
                client_message_id: cmid.ok().flatten().map(Cow::into_owned),
            })
        }
    }
}

/// Writes `s` as a JSON string literal.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail, and serde_json escapes exactly as JSON requires.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `t` in UTC. A valid client time near the ends of the calendar can fall outside it in UTC
/// (`9999-12-31T23:59:59-05:00`); such a time is clamped to the first or last representable
/// instant instead of panicking.
pub fn utc_clamped(t: OffsetDateTime) -> OffsetDateTime {
    t.checked_to_offset(time::UtcOffset::UTC)
        .unwrap_or_else(|| {
            if t.year() > 0 {
                time::PrimitiveDateTime::MAX.assume_utc()
            } else {
                time::PrimitiveDateTime::MIN.assume_utc()
            }
        })
}

/// Formats a time in UTC as RFC 3339 with microseconds and `Z`, e.g.
/// `2026-11-21T22:41:01.125431Z` (see [`utc_clamped`] for the calendar's ends).
/// Written digit by digit: this runs for every message, and `write!` costs several times more.
pub fn write_rfc3339_micros(out: &mut Vec<u8>, t: OffsetDateTime) {
    let t = utc_clamped(t);
    fn digits(out: &mut Vec<u8>, value: u32, width: usize) {
        let mut buf = [b'0'; 10];
        let mut v = value;
        for i in (0..width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&buf[..width]);
    }
    let year = t.year();
    if (0..=9999).contains(&year) {
        digits(out, year as u32, 4);
    } else {
        // Outside RFC 3339's range; still unambiguous.
        out.extend_from_slice(year.to_string().as_bytes());
    }
    out.push(b'-');
    digits(out, u32::from(u8::from(t.month())), 2);
    out.push(b'-');
    digits(out, u32::from(t.day()), 2);
    out.push(b'T');
    digits(out, u32::from(t.hour()), 2);
    out.push(b':');
    digits(out, u32::from(t.minute()), 2);
    out.push(b':');
    digits(out, u32::from(t.second()), 2);
    out.push(b'.');
    digits(out, t.microsecond(), 6);
    out.push(b'Z');
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn times_past_the_calendar_in_utc_are_clamped_not_a_panic() {
        let fmt = &time::format_description::well_known::Rfc3339;
        for (input, want) in [
            ("9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59.999999Z"),
            ("0000-01-01T00:00:00+05:00", "-0001-01-01T00:00:00.000000Z"),
            ("2026-11-22T10:00:00+02:00", "2026-11-22T08:00:00.000000Z"),
        ] {
            let t = OffsetDateTime::parse(input, fmt).unwrap();
            let mut out = Vec::new();
            write_rfc3339_micros(&mut out, t);
            let got = String::from_utf8(out).unwrap();
            if input.starts_with("0000") {
                assert!(got.ends_with('Z'), "{input}: {got}");
            } else {
                assert_eq!(got, want, "{input}");
            }
        }
    }
}

/// The current time as an RFC 3339 string with microseconds.
pub fn now_rfc3339() -> String {
    let mut v = Vec::with_capacity(32);
    write_rfc3339_micros(&mut v, OffsetDateTime::now_utc());
    String::from_utf8(v).unwrap_or_default()
}

/// Writes the part shared by an ack and a broadcast: every field after `type`/`status`,
/// closing brace included. Written once per message and reused for both frames.
pub fn write_echo_fields(
    out: &mut Vec<u8>,
    msg: &ChatMessage<'_>,
    message_id: Uuid,
    room: &str,
    server_time: OffsetDateTime,
) {
    out.extend_from_slice(b",\"messageId\":\"");
    let mut uuid_buf = Uuid::encode_buffer();
    out.extend_from_slice(
        message_id
            .hyphenated()
            .encode_lower(&mut uuid_buf)
            .as_bytes(),
    );
    out.push(b'"');
    if let Some(key) = &msg.client_message_id {
        out.extend_from_slice(b",\"clientMessageId\":");
        json_str(out, key);
    }
    out.extend_from_slice(b",\"roomId\":");
    json_str(out, room);
    out.extend_from_slice(b",\"userId\":");
    out.extend_from_slice(itoa::Buffer::new().format(msg.user_id).as_bytes());
    out.extend_from_slice(b",\"username\":");
    json_str(out, &msg.username);
    out.extend_from_slice(b",\"message\":");
    json_str(out, &msg.message);
    out.extend_from_slice(b",\"messageType\":\"");
    out.extend_from_slice(msg.message_type.as_str().as_bytes());
    out.extend_from_slice(b"\",\"timestamp\":");
    json_str(out, &msg.timestamp);
    out.extend_from_slice(b",\"serverTimestamp\":\"");
    write_rfc3339_micros(out, server_time);
    out.extend_from_slice(b"\"}");
}

/// Opening of an ack frame; followed by [`write_echo_fields`].
pub const ACK_PREFIX: &[u8] = b"{\"type\":\"ack\",\"status\":\"OK\"";
/// Opening of a broadcast frame; followed by [`write_echo_fields`].
pub const BROADCAST_PREFIX: &[u8] = b"{\"type\":\"message\"";

/// Writes a complete `error` frame body for `r`.
pub fn write_error(out: &mut Vec<u8>, r: &Rejection) {
    out.extend_from_slice(b"{\"type\":\"error\",\"status\":\"ERROR\",\"code\":\"");
    out.extend_from_slice(r.code.as_str().as_bytes());
    out.push(b'"');
    if let Some(key) = &r.client_message_id {
        out.extend_from_slice(b",\"clientMessageId\":");
        json_str(out, key);
    }
    out.extend_from_slice(b",\"message\":");
    json_str(out, &r.message);
    out.extend_from_slice(b",\"errors\":[");
    for (i, e) in r.errors.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"field\":");
        json_str(out, e.field);
        out.extend_from_slice(b",\"reason\":");
        json_str(out, &e.reason);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: &str = "7";

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "userId": 12345,
            "username": "user12345",
            "message": "hello room",
            "timestamp": "2026-11-21T22:41:01.123Z",
            "messageType": "TEXT",
            "roomId": "7",
            "clientMessageId": "c42-000017"
        })
    }

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v = valid();
        v[field] = value;
        v.to_string()
    }

    fn without(field: &str) -> String {
        let mut v = valid();
        v.as_object_mut().map(|o| o.remove(field));
        v.to_string()
    }

    fn fields(text: &str) -> Vec<&'static str> {
        match parse_message(text, ROOM) {
            Ok(_) => vec![],
            Err(r) => r.errors.iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn a_valid_message_is_accepted_with_every_field() {
        let text = valid().to_string();
        let m = parse_message(&text, ROOM).expect("valid");
        assert_eq!(m.user_id, 12345);
        assert_eq!(m.username, "user12345");
        assert_eq!(m.message, "hello room");
        assert_eq!(m.message_type, MessageType::Text);
        assert_eq!(m.client_message_id.as_deref(), Some("c42-000017"));
        assert!(
            matches!(m.username, Cow::Borrowed(_)),
            "no copy without escapes"
        );
    }

    #[test]
    fn user_id_bounds_and_forms() {
        for ok in [
            serde_json::json!(1),
            serde_json::json!(100000),
            serde_json::json!("1"),
            serde_json::json!("100000"),
            serde_json::json!("00042"),
        ] {
            assert_eq!(
                fields(&with("userId", ok.clone())),
                Vec::<&str>::new(),
                "{ok}"
            );
        }
        for bad in [
            serde_json::json!(0),
            serde_json::json!(100001),
            serde_json::json!(-5),
            serde_json::json!("0"),
            serde_json::json!("100001"),
            serde_json::json!("-1"),
            serde_json::json!("12a"),
            serde_json::json!(""),
            serde_json::json!(" 12"),
            serde_json::json!(1.5),
            serde_json::json!(1e3),
            serde_json::json!(true),
            serde_json::json!([1]),
            serde_json::json!(null),
            serde_json::json!("99999999999999999999999"),
        ] {
            assert_eq!(
                fields(&with("userId", bad.clone())),
                vec!["userId"],
                "{bad}"
            );
        }
        assert_eq!(fields(&without("userId")), vec!["userId"]);
    }

    #[test]
    fn username_bounds() {
        assert!(fields(&with("username", "abc".into())).is_empty());
        assert!(fields(&with("username", "a".repeat(20).into())).is_empty());
        for bad in ["ab", &"a".repeat(21), "user_1", "usér", "user 1", ""] {
            assert_eq!(
                fields(&with("username", bad.into())),
                vec!["username"],
                "{bad}"
            );
        }
        assert_eq!(fields(&with("username", 123.into())), vec!["username"]);
    }

    #[test]
    fn message_counts_characters_not_bytes() {
        assert!(fields(&with("message", "x".into())).is_empty());
        assert!(fields(&with("message", "é".repeat(500).into())).is_empty());
        assert!(fields(&with("message", "😀".repeat(500).into())).is_empty());
        assert_eq!(
            fields(&with("message", "x".repeat(501).into())),
            vec!["message"]
        );
        assert_eq!(
            fields(&with("message", "😀".repeat(501).into())),
            vec!["message"]
        );
        assert_eq!(fields(&with("message", "".into())), vec!["message"]);
        assert_eq!(fields(&without("message")), vec!["message"]);
    }

    #[test]
    fn timestamp_needs_a_zone() {
        for ok in [
            "2026-11-21T22:41:01Z",
            "2026-11-21T22:41:01.123456789Z",
            "2026-11-21T22:41:01+05:30",
            "2026-11-21T22:41:01-08:00",
        ] {
            assert!(fields(&with("timestamp", ok.into())).is_empty(), "{ok}");
        }
        for bad in [
            "2026-11-21T22:41:01",
            "2026-11-21",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "",
        ] {
            assert_eq!(
                fields(&with("timestamp", bad.into())),
                vec!["timestamp"],
                "{bad}"
            );
        }
    }

    #[test]
    fn message_type_is_case_insensitive() {
        for (s, t) in [
            ("text", MessageType::Text),
            ("Join", MessageType::Join),
            ("LEAVE", MessageType::Leave),
        ] {
            let text = with("messageType", s.into());
            assert_eq!(parse_message(&text, ROOM).map(|m| m.message_type), Ok(t));
        }
        assert_eq!(
            fields(&with("messageType", "SHOUT".into())),
            vec!["messageType"]
        );
    }

    #[test]
    fn client_message_id_rules() {
        assert!(fields(&without("clientMessageId")).is_empty());
        assert!(fields(&with("clientMessageId", serde_json::Value::Null)).is_empty());
        assert!(fields(&with("clientMessageId", "a".repeat(64).into())).is_empty());
        for bad in ["", &"a".repeat(65), "has space", "a/b"] {
            assert_eq!(
                fields(&with("clientMessageId", bad.into())),
                vec!["clientMessageId"],
                "{bad}"
            );
        }
    }

    #[test]
    fn every_failing_field_is_listed() {
        let text = r#"{"userId":0,"username":"x","message":"","timestamp":"no","messageType":"?"}"#;
        let r = parse_message(text, ROOM).unwrap_err();
        assert_eq!(r.code, ErrorCode::ValidationFailed);
        let names: Vec<_> = r.errors.iter().map(|e| e.field).collect();
        assert_eq!(
            names,
            ["userId", "username", "message", "timestamp", "messageType"]
        );
    }

    #[test]
    fn room_mismatch_alone_has_its_own_code() {
        let r = parse_message(&with("roomId", "8".into()), ROOM).unwrap_err();
        assert_eq!(r.code, ErrorCode::RoomMismatch);
        assert_eq!(r.client_message_id.as_deref(), Some("c42-000017"));
        let mut v = valid();
        v["roomId"] = "8".into();
        v["userId"] = 0.into();
        let r = parse_message(&v.to_string(), ROOM).unwrap_err();
        assert_eq!(r.code, ErrorCode::ValidationFailed);
        assert_eq!(r.errors.len(), 2);
        assert!(fields(&without("roomId")).is_empty());
        let r = parse_message(&with("roomId", 7.into()), ROOM).unwrap_err();
        assert_eq!(
            r.code,
            ErrorCode::ValidationFailed,
            "a wrong type is not a mismatch"
        );
    }

    #[test]
    fn not_an_object_is_invalid_json() {
        let dup = r#"{"userId":1,"userId":2}"#;
        for text in [
            "",
            "[1,2]",
            "42",
            "\"hi\"",
            "{",
            "{\"userId\":1,}",
            "null",
            dup,
        ] {
            let r = parse_message(text, ROOM).unwrap_err();
            assert_eq!(r.code, ErrorCode::InvalidJson, "{text}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_escapes_decoded() {
        let mut v = valid();
        v["extra"] = serde_json::json!({"nested": [1, 2]});
        v["message"] = "line\nbreak \"quoted\"".into();
        let text = v.to_string();
        let m = parse_message(&text, ROOM).expect("valid");
        assert_eq!(m.message, "line\nbreak \"quoted\"");
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_message_id(1, "k");
        assert_eq!(a, derived_message_id(1, "k"));
        assert_ne!(a, derived_message_id(2, "k"));
        assert_ne!(a, derived_message_id(1, "k2"));
        assert_eq!(a.get_version_num(), 5);
        let long = "k".repeat(200);
        assert_eq!(derived_message_id(7, &long), derived_message_id(7, &long));
        let max_key = "k".repeat(MAX_ID_LEN);
        let name = format!("100000:{max_key}");
        assert_eq!(
            derived_message_id(100_000, &max_key),
            Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes())
        );
        let text = without("clientMessageId");
        let m = parse_message(&text, ROOM).expect("valid");
        assert_eq!(m.message_id().get_version_num(), 7);
    }

    #[test]
    fn frames_are_valid_json_with_the_echoed_fields() {
        let text = valid().to_string();
        let m = parse_message(&text, ROOM).expect("valid");
        let id = m.message_id();
        let mut out = ACK_PREFIX.to_vec();
        write_echo_fields(&mut out, &m, id, ROOM, OffsetDateTime::UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["type"], "ack");
        assert_eq!(v["status"], "OK");
        assert_eq!(v["messageId"], id.to_string());
        assert_eq!(v["userId"], 12345);
        assert_eq!(v["roomId"], "7");
        assert_eq!(v["serverTimestamp"], "1970-01-01T00:00:00.000000Z");
        let mut ts = Vec::new();
        let t = time::macros::datetime!(2026-11-21 22:41:01.125431 +02:00);
        write_rfc3339_micros(&mut ts, t);
        assert_eq!(ts, b"2026-11-21T20:41:01.125431Z");
        for key in ["username", "message", "timestamp", "clientMessageId"] {
            assert_eq!(v[key], valid()[key], "{key}");
        }

        let r = parse_message("[]", ROOM).unwrap_err();
        let mut out = Vec::new();
        write_error(&mut out, &r);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["code"], "INVALID_JSON");
        assert_eq!(v["errors"], serde_json::json!([]));
    }
}
