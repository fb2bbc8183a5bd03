//! The envelope: how chat messages travel through RabbitMQ, several to one AMQP message.
//!
//! # Format, version 1
//!
//! One AMQP message carries 1 to `amqp_batch_max` chat messages of **one room**, published
//! to the topic exchange with routing key `room.{roomId}`:
//!
//! ```json
//! {"v":1,"node":"node-a","room":"7","messages":[
//!   {"type":"message","messageId":"0193a1f0-...","roomId":"7","userId":12345,
//!    "username":"user12345","message":"hello room","messageType":"TEXT",
//!    "timestamp":"2026-11-21T22:41:01.123Z","serverTimestamp":"2026-11-21T22:41:01.125431Z"}
//! ]}
//! ```
//!
//! - `v`: the format version, `1`. It is also in the AMQP `type` property
//!   ([`ENVELOPE_TYPE`]) so an operator can tell envelopes apart without parsing them.
//! - `node`: the id of the node that accepted the messages. A node's fan-out consumer skips
//!   its own envelopes (its reactors had them in process); the store records it as `node_id`.
//! - `room`: the room of every message in `messages`.
//! - `messages`: each one exactly the `"type":"message"` broadcast frame members receive
//!   (PROTOCOL.md §3), byte for byte, so the fan-out consumer frames it without re-encoding
//!   and the persist consumer reads the stored fields from it.
//! - `waiting` (optional, only when some sender waits for the commit, `ack_after =
//!   persisted`): `[index, reactor, token, conn, seq]` for each such message, `index` into
//!   `messages`, the other four opaque to everyone but the node named in `node`. A node that
//!   does not know the field ignores it; its senders then time out (`UNAVAILABLE`) instead of
//!   getting their acks, which is safe.
//! - `epoch` (with `waiting`): a number the accepting process drew at start. Connection
//!   numbers start over when a node restarts under the same id, so a notice for the previous
//!   process's senders could name a new connection; the epoch tells them apart.
//!
//! Properties: `content_type` [`CONTENT_TYPE`], `delivery_mode` 2 (persistent), `type`
//! [`ENVELOPE_TYPE`], `app_id` `chatflow`.
//!
//! # Commit notices, version 1
//!
//! When the persist consumer (on any node) has committed an envelope that lists `waiting`
//! senders, it sends the accepting node one notice through the default exchange, routing key
//! that node's queue name, AMQP `type` [`NOTICE_TYPE`], not persistent:
//!
//! ```json
//! {"v":1,"epoch":8410625917,"stored":[[0,17,4242,9]],"failed":[{"at":[1,3,77,2],"why":"the store refused this message (...)"}]}
//! ```
//!
//! Each entry is the `[reactor, token, conn, seq]` of a waiting sender; `epoch` is the
//! envelope's, and a node drops a notice whose epoch is not its own. The node's fan-out
//! consumer hands them to its reactors, which then write the acks (or `UNAVAILABLE` errors).
//! A notice that is lost (the node queue's length limit, a node restart) leaves the sender to
//! its `persist_timeout_ms`: it gets `UNAVAILABLE`, never an ack for an uncommitted message.
//!
//! A consumer rejects (nack without requeue) an envelope that does not parse, has another
//! version, or holds no messages or a message that is not a broadcast frame: on the persist
//! queue it goes to the dead-letter queue `chat.dlq` for an operator to look at; on a node
//! queue it is dropped (the persist queue's copy is the one kept). A later version must
//! change `v`; nodes of different versions then refuse each other's envelopes rather than
//! misread them, so upgrade a deployment's nodes together or teach the new version to read
//! both.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::mailbox::Origin;
use crate::protocol::{self, MessageType};
use crate::store::Record;

/// The envelope format version this build writes and reads.
pub const VERSION: u64 = 1;
/// The AMQP `content_type` of an envelope.
pub const CONTENT_TYPE: &str = "application/json";
/// The AMQP `type` of an envelope: names the format and its version.
pub const ENVELOPE_TYPE: &str = "chatflow.envelope.v1";
/// The AMQP `type` of a commit notice.
pub const NOTICE_TYPE: &str = "chatflow.stored.v1";

/// Starts an envelope for `room` from `node` in `out`; then [`push`] messages and [`finish`].
pub fn begin(out: &mut Vec<u8>, node: &str, room: &str) {
    out.extend_from_slice(b"{\"v\":1,\"node\":");
    json_str(out, node);
    out.extend_from_slice(b",\"room\":");
    json_str(out, room);
    out.extend_from_slice(b",\"messages\":[");
}

/// Appends one broadcast JSON object (verbatim); `first` for the envelope's first message.
pub fn push(out: &mut Vec<u8>, payload: &[u8], first: bool) {
    if !first {
        out.push(b',');
    }
    out.extend_from_slice(payload);
}

/// Closes the envelope.
pub fn finish(out: &mut Vec<u8>) {
    finish_waiting(out, 0, &[]);
}

/// Closes the envelope, listing the senders who wait for the commit: `(index in messages,
/// sender)`, and the accepting process's `epoch`.
pub fn finish_waiting(out: &mut Vec<u8>, epoch: u64, waiting: &[(usize, Origin)]) {
    out.push(b']');
    if !waiting.is_empty() {
        let _ = write!(out, ",\"epoch\":{epoch}");
        out.extend_from_slice(b",\"waiting\":[");
        for (i, (index, o)) in waiting.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = write!(
                out,
                "[{index},{},{},{},{}]",
                o.reactor, o.token, o.conn, o.seq
            );
        }
        out.push(b']');
    }
    out.push(b'}');
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Why an envelope was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, or not the shape of any known version.
    #[error("not an envelope: {0}")]
    Malformed(String),
    /// A version this build does not read.
    #[error("envelope version {0} is not supported (this build reads version 1)")]
    Version(u64),
    /// No messages.
    #[error("the envelope holds no messages")]
    Empty,
    /// A message that is not a broadcast frame or lacks a stored field.
    #[error("message {index} of the envelope: {why}")]
    Message {
        /// Its position in `messages`.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
}

/// A parsed envelope, borrowing the delivery's body.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// The node that accepted the messages.
    pub node: Cow<'a, str>,
    /// Their room.
    pub room: Cow<'a, str>,
    /// The broadcast frames' JSON, verbatim.
    pub messages: Vec<&'a RawValue>,
    /// Senders on `node` waiting for the commit: (index into `messages`, sender), by index.
    pub waiting: Vec<(usize, Origin)>,
    /// The accepting process's epoch (0 when nobody waits).
    pub epoch: u64,
}

#[derive(Deserialize)]
struct Wire<'a> {
    v: u64,
    #[serde(borrow)]
    node: Cow<'a, str>,
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
    #[serde(default)]
    waiting: Vec<[u64; 5]>,
    #[serde(default)]
    epoch: u64,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u64,
}

/// Parses an envelope and checks what every consumer relies on: the version, a valid room id,
/// and at least one message, each a broadcast frame (so nothing else is ever written to a
/// client).
pub fn decode(body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let wire: Wire<'_> = match serde_json::from_slice(body) {
        Ok(w) => w,
        // A later version may have another shape: say so rather than "missing field".
        Err(e) => {
            return Err(match serde_json::from_slice::<VersionOnly>(body) {
                Ok(v) if v.v != VERSION => EnvelopeError::Version(v.v),
                _ => EnvelopeError::Malformed(e.to_string()),
            });
        }
    };
    if wire.v != VERSION {
        return Err(EnvelopeError::Version(wire.v));
    }
    if !protocol::is_valid_id(&wire.room) {
        return Err(EnvelopeError::Malformed(format!(
            "room {:?} is not a room id",
            wire.room
        )));
    }
    if wire.messages.is_empty() {
        return Err(EnvelopeError::Empty);
    }
    for (index, m) in wire.messages.iter().enumerate() {
        if !m.get().as_bytes().starts_with(protocol::BROADCAST_PREFIX) {
            return Err(EnvelopeError::Message {
                index,
                why: "not a broadcast frame (must start with {\"type\":\"message\"".into(),
            });
        }
    }
    let mut waiting = Vec::with_capacity(wire.waiting.len());
    for [index, reactor, token, conn, seq] in wire.waiting {
        let index = usize::try_from(index)
            .ok()
            .filter(|&i| i < wire.messages.len())
            .ok_or_else(|| {
                EnvelopeError::Malformed(format!(
                    "waiting names message {index} of {}",
                    wire.messages.len()
                ))
            })?;
        waiting.push((index, origin([reactor, token, conn, seq])?));
    }
    waiting.sort_unstable_by_key(|(i, _)| *i);
    Ok(Envelope {
        node: wire.node,
        room: wire.room,
        messages: wire.messages,
        waiting,
        epoch: wire.epoch,
    })
}

fn origin([reactor, token, conn, seq]: [u64; 4]) -> Result<Origin, EnvelopeError> {
    let small = |v: u64| {
        usize::try_from(v)
            .map_err(|_| EnvelopeError::Malformed(format!("sender field {v} is out of range")))
    };
    Ok(Origin {
        reactor: small(reactor)?,
        token: small(token)?,
        conn,
        seq,
    })
}

/// A waiting sender's fate after the commit: `Ok` stored, `Err` why not.
pub type Settled = (Origin, Result<(), String>);

#[derive(serde::Serialize, Deserialize)]
struct WireNotice {
    v: u64,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    stored: Vec<[u64; 4]>,
    #[serde(default)]
    failed: Vec<WireFailed>,
}

#[derive(serde::Serialize, Deserialize)]
struct WireFailed {
    at: [u64; 4],
    why: String,
}

fn wire_origin(o: &Origin) -> [u64; 4] {
    [o.reactor as u64, o.token as u64, o.conn, o.seq]
}

/// A commit notice for the senders in `settled`, of the process with `epoch`.
pub fn encode_notice(epoch: u64, settled: &[Settled]) -> Vec<u8> {
    let mut notice = WireNotice {
        v: VERSION,
        epoch,
        stored: Vec::new(),
        failed: Vec::new(),
    };
    for (o, result) in settled {
        match result {
            Ok(()) => notice.stored.push(wire_origin(o)),
            Err(why) => notice.failed.push(WireFailed {
                at: wire_origin(o),
                why: why.clone(),
            }),
        }
    }
    // Serializing plain numbers and strings into a Vec cannot fail.
    serde_json::to_vec(&notice).unwrap_or_default()
}

/// The epoch and the senders a commit notice settles.
pub fn decode_notice(body: &[u8]) -> Result<(u64, Vec<Settled>), EnvelopeError> {
    let wire: WireNotice =
        serde_json::from_slice(body).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if wire.v != VERSION {
        return Err(EnvelopeError::Version(wire.v));
    }
    let mut out = Vec::with_capacity(wire.stored.len() + wire.failed.len());
    for at in wire.stored {
        out.push((origin(at)?, Ok(())));
    }
    for f in wire.failed {
        out.push((origin(f.at)?, Err(f.why)));
    }
    Ok((wire.epoch, out))
}

/// The stored fields of a broadcast frame.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMessage<'a> {
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    #[serde(borrow)]
    room_id: Cow<'a, str>,
    user_id: i64,
    #[serde(borrow)]
    username: Cow<'a, str>,
    #[serde(borrow)]
    message: Cow<'a, str>,
    #[serde(borrow)]
    message_type: Cow<'a, str>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    server_timestamp: Cow<'a, str>,
}

/// The records of every message of `env`, all or nothing: one message that cannot be stored
/// as it is rejects the whole envelope, so a delivery is never half stored.
pub fn records(env: &Envelope<'_>) -> Result<Vec<Record>, EnvelopeError> {
    let node: Arc<str> = Arc::from(env.node.as_ref());
    let room: Arc<str> = Arc::from(env.room.as_ref());
    env.messages
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            record(raw, &node, &room).map_err(|why| EnvelopeError::Message { index, why })
        })
        .collect()
}

fn record(raw: &RawValue, node: &Arc<str>, room: &Arc<str>) -> Result<Record, String> {
    let m: WireMessage<'_> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
    let message_id =
        Uuid::parse_str(&m.message_id).map_err(|e| format!("messageId is not a UUID: {e}"))?;
    if m.room_id != **room {
        return Err(format!(
            "roomId {:?} differs from the envelope's room {:?}",
            m.room_id, room
        ));
    }
    let user_id =
        i32::try_from(m.user_id).map_err(|_| format!("userId {} is out of range", m.user_id))?;
    let message_type = MessageType::ALL
        .into_iter()
        .find(|t| t.as_str() == m.message_type)
        .ok_or_else(|| {
            format!(
                "messageType {:?} is not TEXT, JOIN or LEAVE",
                m.message_type
            )
        })?;
    let time = |field: &str, s: &str| {
        OffsetDateTime::parse(s, &Rfc3339)
            .map(protocol::utc_clamped)
            .map_err(|e| format!("{field} {s:?} is not an RFC 3339 time: {e}"))
    };
    Ok(Record {
        message_id,
        room_id: room.clone(),
        user_id,
        username: m.username.into_owned(),
        message: m.message.into_owned(),
        message_type,
        client_ts: time("timestamp", &m.timestamp)?,
        server_ts: time("serverTimestamp", &m.server_timestamp)?,
        node_id: node.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &str = r#"{"type":"message","messageId":"0193a1f0-5c2e-7c4e-9a51-2b1c3d4e5f60","clientMessageId":"c42-000017","roomId":"7","userId":12345,"username":"user12345","message":"hello \"room\" ✓","messageType":"TEXT","timestamp":"2026-11-21T22:41:01.123+01:00","serverTimestamp":"2026-11-21T22:41:01.125431Z"}"#;

    fn envelope(node: &str, room: &str, messages: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        begin(&mut out, node, room);
        for (i, m) in messages.iter().enumerate() {
            push(&mut out, m.as_bytes(), i == 0);
        }
        finish(&mut out);
        out
    }

    #[test]
    fn waiting_senders_and_commit_notices_round_trip() {
        let o = |seq| Origin {
            reactor: 1,
            token: 7,
            conn: 99,
            seq,
        };
        let mut out = Vec::new();
        begin(&mut out, "n1", "7");
        push(&mut out, MSG.as_bytes(), true);
        push(&mut out, MSG.as_bytes(), false);
        finish_waiting(&mut out, 77, &[(1, o(5))]);
        let env = decode(&out).expect("decodes");
        assert_eq!(env.messages.len(), 2);
        assert_eq!(env.waiting, vec![(1, o(5))]);
        assert_eq!(env.epoch, 77);
        // Without waiting senders the field is left out.
        assert!(!String::from_utf8_lossy(&envelope("n1", "7", &[MSG])).contains("waiting"));

        let notice = encode_notice(77, &[(o(5), Ok(())), (o(6), Err("refused".into()))]);
        let back = decode_notice(&notice).expect("notice");
        assert_eq!(
            back,
            (77, vec![(o(5), Ok(())), (o(6), Err("refused".into()))])
        );
        assert!(matches!(
            decode_notice(br#"{"v":2,"stored":[]}"#),
            Err(EnvelopeError::Version(2))
        ));
        assert!(decode_notice(b"nope").is_err());
    }

    #[test]
    fn a_waiting_entry_must_name_a_message_of_the_envelope() {
        let body = format!(
            r#"{{"v":1,"node":"n","room":"7","messages":[{MSG}],"waiting":[[1,0,0,0,1]]}}"#
        );
        assert!(matches!(
            decode(body.as_bytes()),
            Err(EnvelopeError::Malformed(_))
        ));
        let body =
            format!(r#"{{"v":1,"node":"n","room":"7","messages":[{MSG}],"waiting":[[0,0,0,0]]}}"#);
        assert!(
            decode(body.as_bytes()).is_err(),
            "four numbers are not a waiting entry"
        );
    }

    #[test]
    fn messages_pass_through_byte_for_byte() {
        let body = envelope("node \"a\"", "7", &[MSG, MSG]);
        let env = decode(&body).expect("decodes");
        assert_eq!(env.node, "node \"a\"");
        assert_eq!(env.room, "7");
        assert_eq!(env.messages.len(), 2);
        assert_eq!(env.messages[0].get(), MSG);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["v"], 1);
    }

    #[test]
    fn records_carry_every_stored_field() {
        let body = envelope("n1", "7", &[MSG]);
        let env = decode(&body).expect("decodes");
        let r = records(&env).expect("records");
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(
            r.message_id.to_string(),
            "0193a1f0-5c2e-7c4e-9a51-2b1c3d4e5f60"
        );
        assert_eq!(&*r.room_id, "7");
        assert_eq!(r.user_id, 12345);
        assert_eq!(r.username, "user12345");
        assert_eq!(r.message, "hello \"room\" ✓");
        assert_eq!(r.message_type, MessageType::Text);
        assert_eq!(
            r.client_ts,
            time::macros::datetime!(2026-11-21 21:41:01.123 UTC)
        );
        assert_eq!(r.client_ts.offset(), time::UtcOffset::UTC);
        assert_eq!(r.server_ts.microsecond(), 125_431);
        assert_eq!(&*r.node_id, "n1");
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        assert_eq!(
            decode(br#"{"v":2,"payload":"x"}"#).unwrap_err(),
            EnvelopeError::Version(2)
        );
        assert_eq!(
            decode(br#"{"v":2,"node":"a","room":"1","messages":[]}"#).unwrap_err(),
            EnvelopeError::Version(2)
        );
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"v":1,"node":"a","room":"1"}"#,
            br#"{"v":1,"node":"a","room":"../x","messages":[{"type":"message"}]}"#,
            br#"[1,2]"#,
        ] {
            assert!(
                matches!(decode(bad), Err(EnvelopeError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode(br#"{"v":1,"node":"a","room":"1","messages":[]}"#).unwrap_err(),
            EnvelopeError::Empty
        );
        assert!(matches!(
            decode(br#"{"v":1,"node":"a","room":"1","messages":[{"type":"ack"}]}"#),
            Err(EnvelopeError::Message { index: 0, .. })
        ));
    }

    #[test]
    fn one_bad_message_refuses_the_whole_envelope() {
        let bad_id = MSG.replace("0193a1f0-5c2e", "nope");
        let bad_type = MSG.replace("\"TEXT\"", "\"SHOUT\"");
        let bad_time = MSG.replace("2026-11-21T22:41:01.125431Z", "yesterday");
        let other_room = MSG.replace("\"roomId\":\"7\"", "\"roomId\":\"8\"");
        let big_user = MSG.replace("12345,", "99999999999,");
        for (i, bad) in [bad_id, bad_type, bad_time, other_room, big_user]
            .iter()
            .enumerate()
        {
            let body = envelope("n1", "7", &[MSG, bad]);
            let env = decode(&body).expect("the envelope itself parses");
            match records(&env) {
                Err(EnvelopeError::Message { index: 1, .. }) => {}
                other => panic!("case {i}: {other:?}"),
            }
        }
    }
}
