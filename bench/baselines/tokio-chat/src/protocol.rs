//! ChatFlow wire protocol (shared/PROTOCOL.md §1-4): path parsing, validation
//! of client frames and the JSON frames the server sends back.

use std::sync::LazyLock;

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use uuid::Uuid;

/// Namespace of the deterministic (UUIDv5) message ids: v5 of this URN under
/// the standard URL namespace.
static MESSAGE_ID_NAMESPACE: LazyLock<Uuid> =
    LazyLock::new(|| Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:chatflow:message-id"));

/// `/chat/{roomId}` -> the room, or the HTTP status to reject the upgrade with.
pub fn room_from_path(path: &str) -> Result<&str, u16> {
    let room = path.strip_prefix("/chat/").ok_or(404u16)?;
    if is_id(room, 64) { Ok(room) } else { Err(400) }
}

/// 1..=max characters of `[A-Za-z0-9_-]`.
fn is_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Serialize)]
pub struct FieldError {
    field: &'static str,
    reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field,
        reason: reason.into(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    status: &'static str,
    code: &'static str,
    client_message_id: Option<&'a str>,
    errors: Vec<FieldError>,
}

impl<'a> ErrorFrame<'a> {
    pub fn new(
        code: &'static str,
        client_message_id: Option<&'a str>,
        errors: Vec<FieldError>,
    ) -> Self {
        ErrorFrame {
            kind: "error",
            status: "ERROR",
            code,
            client_message_id,
            errors,
        }
    }

    pub fn invalid_json() -> Self {
        Self::new(
            "INVALID_JSON",
            None,
            vec![err("body", "must be one JSON object")],
        )
    }

    pub fn unsupported_frame() -> Self {
        Self::new(
            "UNSUPPORTED_FRAME",
            None,
            vec![err("frame", "binary frames are not supported")],
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("error frame serializes")
    }
}

/// An accepted chat message, serialized as both the ack and the broadcast.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    message_id: Uuid,
    client_message_id: Option<&'a str>,
    room_id: &'a str,
    user_id: u32,
    username: &'a str,
    message: &'a str,
    message_type: &'static str,
    timestamp: &'a str,
    server_timestamp: String,
}

impl ChatFrame<'_> {
    /// `(ack for the sender, message for the rest of the room)`.
    pub fn into_json_pair(mut self) -> (String, String) {
        self.kind = "message";
        self.status = None;
        let message = serde_json::to_string(&self).expect("chat frame serializes");
        self.kind = "ack";
        self.status = Some("OK");
        let ack = serde_json::to_string(&self).expect("chat frame serializes");
        (ack, message)
    }
}

/// Validates one text frame from a connection in `room`.
/// `Ok` holds the accepted message, `Err` the error frame to send back.
pub fn validate<'a>(
    room: &'a str,
    obj: &'a Map<String, Value>,
) -> Result<ChatFrame<'a>, ErrorFrame<'a>> {
    let mut errors = Vec::new();
    let str_field = |name: &'static str, errors: &mut Vec<FieldError>| match obj.get(name) {
        None | Some(Value::Null) => {
            errors.push(err(name, "is required"));
            None
        }
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            errors.push(err(name, "must be a string"));
            None
        }
    };

    let user_id = match obj.get("userId") {
        None | Some(Value::Null) => {
            errors.push(err("userId", "is required"));
            None
        }
        Some(v) => {
            let n = match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    s.parse().ok()
                }
                _ => None,
            };
            match n {
                Some(n @ 1..=100_000) => Some(n as u32),
                _ => {
                    errors.push(err("userId", "must be an integer between 1 and 100000"));
                    None
                }
            }
        }
    };

    let username = str_field("username", &mut errors).filter(|s| {
        let ok = (3..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !ok {
            errors.push(err("username", "must be 3 to 20 letters or digits"));
        }
        ok
    });

    let message = str_field("message", &mut errors).filter(|s| {
        let ok = !s.is_empty() && s.chars().nth(500).is_none();
        if !ok {
            errors.push(err("message", "must be 1 to 500 characters"));
        }
        ok
    });

    let timestamp = str_field("timestamp", &mut errors).filter(|s| {
        let ok = OffsetDateTime::parse(s, &Rfc3339).is_ok();
        if !ok {
            errors.push(err(
                "timestamp",
                "must be an RFC 3339 date-time with a zone",
            ));
        }
        ok
    });

    let message_type = str_field("messageType", &mut errors).and_then(|s| {
        let t = ["TEXT", "JOIN", "LEAVE"]
            .into_iter()
            .find(|t| t.eq_ignore_ascii_case(s));
        if t.is_none() {
            errors.push(err("messageType", "must be TEXT, JOIN or LEAVE"));
        }
        t
    });

    let client_message_id = match obj.get("clientMessageId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if !is_id(s, 64) {
                errors.push(err("clientMessageId", "must be 1 to 64 of [A-Za-z0-9_-]"));
            }
            Some(s.as_str())
        }
        Some(_) => {
            errors.push(err("clientMessageId", "must be a string"));
            None
        }
    };

    let mut room_mismatch = false;
    match obj.get("roomId") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == room => {}
        Some(Value::String(_)) => {
            room_mismatch = true;
            errors.push(err(
                "roomId",
                format!("does not match the room of the connection ({room})"),
            ));
        }
        Some(_) => errors.push(err("roomId", "must be a string")),
    }

    match (user_id, username, message, timestamp, message_type) {
        (Some(user_id), Some(username), Some(message), Some(timestamp), Some(message_type))
            if errors.is_empty() =>
        {
            let message_id = match client_message_id {
                Some(c) => Uuid::new_v5(&MESSAGE_ID_NAMESPACE, format!("{user_id}:{c}").as_bytes()),
                None => Uuid::now_v7(),
            };
            Ok(ChatFrame {
                kind: "ack",
                status: Some("OK"),
                message_id,
                client_message_id,
                room_id: room,
                user_id,
                username,
                message,
                message_type,
                timestamp,
                server_timestamp: server_timestamp(),
            })
        }
        _ => {
            let code = if room_mismatch && errors.len() == 1 {
                "ROOM_MISMATCH"
            } else {
                "VALIDATION_FAILED"
            };
            Err(ErrorFrame::new(code, client_message_id, errors))
        }
    }
}

/// Now, as RFC 3339 UTC with microseconds: `2026-11-21T22:41:01.125431Z`.
fn server_timestamp() -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    OffsetDateTime::now_utc()
        .format(&fmt)
        .expect("UTC time formats")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(room_from_path("/chat/7"), Ok("7"));
        assert_eq!(room_from_path("/chat/a_B-9"), Ok("a_B-9"));
        assert_eq!(room_from_path("/chat/"), Err(400));
        assert_eq!(room_from_path("/chat/a.b"), Err(400));
        assert_eq!(
            room_from_path(&format!("/chat/{}", "a".repeat(65))),
            Err(400)
        );
        assert_eq!(room_from_path("/other"), Err(404));
    }

    #[test]
    fn server_timestamp_has_micros() {
        let t = server_timestamp();
        assert_eq!(t.len(), "2026-11-21T22:41:01.125431Z".len(), "{t}");
        assert!(OffsetDateTime::parse(&t, &Rfc3339).is_ok());
    }
}
