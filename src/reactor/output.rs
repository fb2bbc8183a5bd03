//! A connection's output: one ordered queue of byte chunks, written with `writev`.
//!
//! Everything a client receives goes through this queue: HTTP responses, acks and errors
//! (owned bytes), broadcasts (bytes shared with every other recipient) and the pongs and close
//! frames tungstenite produces (through [`WsIo`]). One queue keeps frames whole and in order.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// Owned chunks grow up to this size before a new one starts.
const OWNED_CHUNK: usize = 16 * 1024;
/// Most chunks handed to one `writev`.
const MAX_IOV: usize = 64;

enum Chunk {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(a) => a,
        }
    }
}

/// Spare buffers a reactor reuses for owned chunks, so a steady flow of acks does not allocate.
/// Bounded: at most `max` buffers of at most [`OWNED_CHUNK`] bytes are kept; others are freed.
pub struct BufPool {
    free: Vec<Vec<u8>>,
    max: usize,
}

impl BufPool {
    /// A pool keeping at most `max` buffers.
    pub fn new(max: usize) -> Self {
        BufPool {
            free: Vec::new(),
            max,
        }
    }

    fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_else(|| Vec::with_capacity(1024))
    }

    fn give(&mut self, mut v: Vec<u8>) {
        if self.free.len() < self.max && v.capacity() <= OWNED_CHUNK {
            v.clear();
            self.free.push(v);
        }
    }
}

/// The bytes waiting to be written to one client.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    head_written: usize,
    /// Bytes queued and not yet written.
    len: usize,
}

impl OutQueue {
    /// Bytes queued and not yet written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when everything has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues bytes shared with other connections.
    pub fn push_shared(&mut self, bytes: Arc<[u8]>) {
        self.len += bytes.len();
        self.chunks.push_back(Chunk::Shared(bytes));
    }

    /// Queues a copy of `bytes`, appended to the last owned chunk when it has room.
    pub fn push_owned(&mut self, bytes: &[u8], pool: &mut BufPool) {
        self.len += bytes.len();
        if let Some(Chunk::Owned(v)) = self.chunks.back_mut() {
            // Appending to the front chunk is fine too: `head_written` counts from its start.
            if v.len() + bytes.len() <= OWNED_CHUNK.max(v.capacity()) {
                v.extend_from_slice(bytes);
                return;
            }
        }
        let mut v = pool.take();
        v.extend_from_slice(bytes);
        self.chunks.push_back(Chunk::Owned(v));
    }

    /// Queues one text frame carrying `payload`.
    pub fn push_text_frame(&mut self, payload: &[u8], pool: &mut BufPool) {
        let mut header = [0u8; 10];
        let n = write_text_header(payload.len(), &mut header);
        self.push_owned(&header[..n], pool);
        self.push_owned(payload, pool);
    }

    /// Writes as much as the socket takes. Returns the bytes written; `Ok` also when the socket
    /// would block (the rest stays queued). Errors are the socket's.
    pub fn write_to(&mut self, sock: &mut impl Write, pool: &mut BufPool) -> io::Result<usize> {
        let mut total = 0;
        while !self.chunks.is_empty() {
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOV).enumerate() {
                let bytes = chunk.bytes();
                iov[i] = IoSlice::new(if i == 0 {
                    &bytes[self.head_written..]
                } else {
                    bytes
                });
                n += 1;
            }
            let written = match sock.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += written;
            self.consume(written, pool);
        }
        Ok(total)
    }

    fn consume(&mut self, mut written: usize, pool: &mut BufPool) {
        self.len -= written;
        while written > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.bytes().len() - self.head_written;
            if written < left {
                self.head_written += written;
                return;
            }
            written -= left;
            self.head_written = 0;
            if let Some(Chunk::Owned(v)) = self.chunks.pop_front() {
                pool.give(v);
            }
        }
    }

    /// Drops everything queued (the connection is going away).
    pub fn clear(&mut self, pool: &mut BufPool) {
        for chunk in self.chunks.drain(..) {
            if let Chunk::Owned(v) = chunk {
                pool.give(v);
            }
        }
        self.head_written = 0;
        self.len = 0;
    }
}

/// Writes the header of an unmasked, final text frame of `len` bytes; returns its length.
pub fn write_text_header(len: usize, out: &mut [u8; 10]) -> usize {
    let header = FrameHeader {
        is_final: true,
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let mut cursor = io::Cursor::new(&mut out[..]);
    // Ten bytes always hold an unmasked header.
    let _ = header.format(len as u64, &mut cursor);
    cursor.position() as usize
}

/// A complete text frame in one shared buffer: what every recipient of a broadcast writes.
pub fn shared_text_frame(payload: &[u8]) -> Arc<[u8]> {
    let mut header = [0u8; 10];
    let n = write_text_header(payload.len(), &mut header);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&header[..n]);
    v.extend_from_slice(payload);
    Arc::from(v)
}

/// The stream tungstenite sees: reads come from the socket, writes go to the output queue.
///
/// tungstenite writes pongs and close replies during `read`; sending them through the queue
/// instead of the socket keeps them from landing inside a partly written broadcast.
pub struct WsIo<'a> {
    /// The socket.
    pub sock: &'a mut TcpStream,
    /// The connection's output.
    pub out: &'a mut OutQueue,
    /// The reactor's spare buffers.
    pub pool: &'a mut BufPool,
    /// Bytes read, for metrics.
    pub read_bytes: u64,
}

impl Read for WsIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.read_bytes += n as u64;
        Ok(n)
    }
}

impl Write for WsIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push_owned(buf, self.pool);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call and then blocks after `budget`.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.step).min(self.budget);
            self.got.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_length() {
        let mut pool = BufPool::new(4);
        let mut q = OutQueue::default();
        q.push_owned(b"ab", &mut pool);
        q.push_shared(Arc::from(&b"cdef"[..]));
        q.push_owned(b"gh", &mut pool);
        q.push_owned(b"ij", &mut pool);
        assert_eq!(q.len(), 10);
        let mut w = Trickle {
            got: vec![],
            step: 3,
            budget: 5,
        };
        assert_eq!(q.write_to(&mut w, &mut pool).ok(), Some(5));
        assert_eq!(q.len(), 5);
        w.budget = 100;
        assert_eq!(q.write_to(&mut w, &mut pool).ok(), Some(5));
        assert_eq!(w.got, b"abcdefghij");
        assert!(q.is_empty());
    }

    #[test]
    fn frames_decode_with_tungstenite() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let frame = shared_text_frame(&payload);
            let mut cursor = io::Cursor::new(&frame[..]);
            let (header, n) = FrameHeader::parse(&mut cursor)
                .ok()
                .flatten()
                .expect("header");
            assert_eq!(n as usize, len);
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(frame.len() - cursor.position() as usize, len);
        }
    }
}
