//! tokio-chat: the "idiomatic async" baseline for ChatFlow. One tokio task
//! reads each connection, one writes it; rooms are `broadcast` channels.

mod protocol;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use protocol::{ErrorFrame, room_from_path};

/// Messages a lagging receiver may fall behind before it skips ahead.
const ROOM_CAPACITY: usize = 4096;
/// Replies (acks, errors) queued for one connection's writer.
const REPLY_CAPACITY: usize = 1024;
/// Largest accepted message or frame (PROTOCOL.md §1).
const MAX_MESSAGE: usize = 64 * 1024;

/// A room message: who sent it (so the sender can skip it) and the JSON text.
#[derive(Clone)]
struct Broadcast {
    from: u64,
    text: Utf8Bytes,
}

#[derive(Default)]
struct Rooms(Mutex<HashMap<String, broadcast::Sender<Broadcast>>>);

impl Rooms {
    fn join(&self, room: &str) -> (broadcast::Sender<Broadcast>, broadcast::Receiver<Broadcast>) {
        let mut rooms = self.0.lock().unwrap();
        let tx = rooms
            .entry(room.to_owned())
            .or_insert_with(|| broadcast::channel(ROOM_CAPACITY).0);
        (tx.clone(), tx.subscribe())
    }

    /// Drops the room once its last receiver is gone.
    fn leave(&self, room: &str) {
        let mut rooms = self.0.lock().unwrap();
        if rooms.get(room).is_some_and(|tx| tx.receiver_count() == 0) {
            rooms.remove(room);
        }
    }
}

fn main() {
    let (listen, threads) = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    if let Err(e) = runtime.block_on(serve(listen)) {
        eprintln!("tokio-chat: {e}");
        std::process::exit(1);
    }
    // Open connections are simply dropped.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

fn parse_args() -> (String, usize) {
    let usage = "usage: tokio-chat [--listen ADDR:PORT] [--threads N]";
    let mut listen = "127.0.0.1:8090".to_owned();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| die(usage))
        };
        match flag.as_str() {
            "--listen" => listen = value(),
            "--threads" => {
                threads = value()
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| die(usage))
            }
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            _ => die(usage),
        }
    }
    (listen, threads)
}

fn die(usage: &str) -> ! {
    eprintln!("{usage}");
    std::process::exit(2)
}

async fn serve(listen: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;

    let rooms = Arc::new(Rooms::default());
    let next_id = AtomicU64::new(1);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(handle_connection(stream, peer, id, rooms.clone()));
                }
                // E.g. EMFILE: back off instead of spinning.
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn reject(status: u16, reason: &str) -> ErrorResponse {
    let body = format!("{{\"error\":\"{reason}\"}}");
    let mut resp = ErrorResponse::new(Some(body.clone()));
    *resp.status_mut() = StatusCode::from_u16(status).expect("valid status");
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    headers.insert(header::CONTENT_LENGTH, body.len().into());
    headers.insert(header::CONNECTION, "close".parse().unwrap());
    resp
}

async fn handle_connection(stream: TcpStream, peer: SocketAddr, id: u64, rooms: Arc<Rooms>) {
    let _ = stream.set_nodelay(true);
    let mut room = String::new();
    // The error type is fixed by tungstenite's handshake callback.
    #[allow(clippy::result_large_err)]
    let check_path = |req: &Request, resp: Response| match room_from_path(req.uri().path()) {
        Ok(r) => {
            room = r.to_owned();
            Ok(resp)
        }
        Err(400) => Err(reject(400, "roomId must be 1 to 64 of [A-Za-z0-9_-]")),
        Err(status) => Err(reject(status, "not found")),
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws = match tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config))
        .await
    {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("{peer}: handshake failed: {e}");
            return;
        }
    };

    let (sink, mut stream) = ws.split();
    let (room_tx, room_rx) = rooms.join(&room);
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_CAPACITY);
    let writer = tokio::spawn(write_loop(sink, reply_rx, room_rx, id));

    while let Some(frame) = stream.next().await {
        let reply = match frame {
            Ok(Message::Text(text)) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Object(obj)) => match protocol::validate(&room, &obj) {
                    Ok(chat) => {
                        let (ack, message) = chat.into_json_pair();
                        // Err only means nobody else is listening right now.
                        let _ = room_tx.send(Broadcast {
                            from: id,
                            text: message.into(),
                        });
                        ack
                    }
                    Err(error) => error.to_json(),
                },
                _ => ErrorFrame::invalid_json().to_json(),
            },
            Ok(Message::Binary(_)) => ErrorFrame::unsupported_frame().to_json(),
            // Ping/pong are answered by tungstenite; after a close the stream ends.
            Ok(_) => continue,
            Err(e) => {
                if let Some(code) = close_code(&e) {
                    let frame = CloseFrame {
                        code,
                        reason: Utf8Bytes::from(e.to_string()),
                    };
                    let _ = reply_tx.send(Message::Close(Some(frame))).await;
                }
                break;
            }
        };
        if reply_tx.send(Message::text(reply)).await.is_err() {
            break; // the writer is gone: the socket is dead
        }
    }

    drop(reply_tx);
    let _ = writer.await;
    rooms.leave(&room);
}

/// The close code for a protocol violation, None when the socket is just gone.
fn close_code(e: &WsError) -> Option<CloseCode> {
    match e {
        WsError::Capacity(_) => Some(CloseCode::Size),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        _ => None,
    }
}

async fn write_loop<S>(
    mut sink: S,
    mut replies: mpsc::Receiver<Message>,
    mut room: broadcast::Receiver<Broadcast>,
    me: u64,
) where
    S: futures_util::Sink<Message> + Unpin,
{
    loop {
        let msg = tokio::select! {
            reply = replies.recv() => match reply {
                Some(m) => m,
                None => break,
            },
            broadcast = room.recv() => match broadcast {
                Ok(b) if b.from == me => continue,
                Ok(b) => Message::Text(b.text),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        if sink.send(msg).await.is_err() {
            break;
        }
    }
}
