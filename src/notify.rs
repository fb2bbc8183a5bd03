//! systemd readiness notification (`Type=notify`): `READY=1` once listening, `STOPPING=1` when
//! the drain begins. Does nothing when `NOTIFY_SOCKET` is not set.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1\nSTATUS=listening"`) to the socket named by `NOTIFY_SOCKET`.
/// Returns `Ok(false)` when the variable is not set (not started by systemd).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL byte.
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// Like [`notify`], logging instead of failing: a missed notification must not stop a server.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("cannot notify systemd ({state:?}): {e}");
    }
}
