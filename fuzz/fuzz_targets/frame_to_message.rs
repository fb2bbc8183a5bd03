//! Fuzzes the frame-to-message path of a ChatFlow connection:
//!
//! raw client bytes -> tungstenite frame decoding -> `protocol::parse_message` -> the ack or
//! error frame the server writes back (and the pongs / close replies tungstenite writes itself).
//!
//! The input is what a client sends on an upgraded socket, right after the handshake. It is
//! handed to a server-side `WebSocketContext` configured like the reactor's, and the socket
//! reports EOF once those bytes are consumed.

#![no_main]

use std::io::{self, Cursor, Read, Write};

use chatflow::protocol::{self, ErrorCode, MAX_MESSAGE_CHARS, MAX_USER_ID, Rejection};
use chatflow::reactor::shared_text_frame;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tungstenite::Message;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

/// The room the fuzzed connection is bound to (the path's room).
const ROOM: &str = "7";
/// Upper bound on `read` calls per input, in case a state never reaches an error.
const MAX_READS: usize = 10_000;
/// Largest message and frame, as in the shipped configuration's default.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The client socket: nothing more to read once the input is consumed; writes are kept.
#[derive(Default)]
struct Socket {
    written: Vec<u8>,
}

impl Read for Socket {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The reactor's configuration (src/reactor/mod.rs), with the default limits.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(16 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let mut ctx = WebSocketContext::from_partially_read(data.to_vec(), Role::Server, Some(config));
    let mut socket = Socket::default();

    for _ in 0..MAX_READS {
        let message = match ctx.read(&mut socket) {
            Ok(m) => m,
            Err(_) => break,
        };
        match message {
            Message::Text(text) => on_text(text.as_str()),
            // The reactor answers a binary message with this error.
            Message::Binary(_) => check_error(&Rejection::whole(
                ErrorCode::UnsupportedFrame,
                "binary frames are not supported; send JSON in text frames",
            )),
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }

    check_server_frames(&socket.written);
});

/// What the reactor does with one text message (`Reactor::on_text`, rate limit aside).
fn on_text(text: &str) {
    match protocol::parse_message(text, ROOM) {
        Ok(msg) => {
            let chars = msg.message.chars().count();
            assert!(
                (1..=MAX_MESSAGE_CHARS).contains(&chars),
                "accepted a message of {chars} characters"
            );
            assert!(
                (1..=MAX_USER_ID).contains(&msg.user_id),
                "accepted userId {}",
                msg.user_id
            );

            let id = msg.message_id();
            if msg.client_message_id.is_some() {
                // Derived from (userId, clientMessageId): a retry must get the same id.
                assert_eq!(id.get_version_num(), 5, "keyed id version");
                assert_eq!(id, msg.message_id(), "keyed id is not stable");
            } else {
                assert_eq!(id.get_version_num(), 7, "unkeyed id version");
            }
            let mut out = protocol::ACK_PREFIX.to_vec();
            protocol::write_echo_fields(&mut out, &msg, id, ROOM, OffsetDateTime::now_utc());
            let v: Value = match serde_json::from_slice(&out) {
                Ok(v) => v,
                Err(e) => panic!("ack is not JSON ({e}): {}", String::from_utf8_lossy(&out)),
            };
            assert_eq!(v["type"], "ack");
            assert_eq!(v["status"], "OK");
            assert_eq!(v["message"].as_str(), Some(&*msg.message), "message echo");
            assert_eq!(
                v["username"].as_str(),
                Some(&*msg.username),
                "username echo"
            );
            assert_eq!(
                v["timestamp"].as_str(),
                Some(&*msg.timestamp),
                "timestamp echo"
            );
            assert_eq!(v["userId"].as_u64(), Some(u64::from(msg.user_id)));
            assert_eq!(v["roomId"], ROOM);
            assert_eq!(v["messageId"].as_str(), Some(&*id.to_string()));
            assert_eq!(
                v["clientMessageId"].as_str(),
                msg.client_message_id.as_deref()
            );
            let server_time = v["serverTimestamp"].as_str().unwrap_or_default();
            assert!(
                server_time.len() == 27
                    && server_time.ends_with('Z')
                    && OffsetDateTime::parse(server_time, &Rfc3339).is_ok(),
                "serverTimestamp {server_time:?}"
            );
            check_frame(&out);
        }
        Err(rejection) => check_error(&rejection),
    }
}

/// The error frame for `rejection` is a JSON object of type `error` with the code and fields.
fn check_error(rejection: &Rejection) {
    let mut out = Vec::new();
    protocol::write_error(&mut out, rejection);
    let v: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!("error is not JSON ({e}): {}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], rejection.code.as_str());
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(rejection.errors.len())
    );
    check_frame(&out);
}

/// `payload` framed as the server frames it decodes back to one final, unmasked text frame.
fn check_frame(payload: &[u8]) {
    let frame = shared_text_frame(payload);
    let mut cursor = Cursor::new(&frame[..]);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(h)) => h,
        other => panic!("our frame header does not parse: {other:?}"),
    };
    assert!(header.is_final);
    assert!(header.mask.is_none());
    assert_eq!(header.opcode, OpCode::Data(Data::Text));
    assert_eq!(len, payload.len() as u64, "header length");
    assert_eq!(
        &frame[cursor.position() as usize..],
        payload,
        "frame payload"
    );
}

/// What tungstenite wrote back (pongs, close replies) is a sequence of whole, unmasked,
/// final control frames.
fn check_server_frames(mut written: &[u8]) {
    while !written.is_empty() {
        let mut cursor = Cursor::new(written);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            other => panic!("server wrote a bad frame header: {other:?}"),
        };
        assert!(header.mask.is_none(), "server frame is masked");
        assert!(
            matches!(header.opcode, OpCode::Control(_)),
            "server wrote a {:?} frame",
            header.opcode
        );
        assert!(
            header.is_final && len <= 125,
            "control frame of {len} bytes"
        );
        let start = cursor.position() as usize;
        let end = start + len as usize;
        assert!(end <= written.len(), "truncated server frame");
        written = &written[end..];
    }
}
