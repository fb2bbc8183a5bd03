//! `chatflow serve` as a child process, started the same way by every test that needs a real
//! process (a kill -9, a node of a cluster).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Spawns `chatflow serve ARGS` with `envs`, stderr into `log`, and waits (at most `wait`)
/// for its `listening on ADDR` line. Panics naming `what`, with the log's tail, when the
/// server does not start.
pub fn spawn(
    args: &[&str],
    envs: &[(&str, &str)],
    log: &Path,
    wait: Duration,
    what: &str,
) -> (Child, SocketAddr) {
    let stderr = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatflow"));
    cmd.arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn chatflow");
    let stdout = child.stdout.take().expect("stdout");
    // The first line comes through a channel so the wait is bounded; the rest of stdout is
    // drained so the server never writes into a closed pipe.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        for _ in lines {}
    });
    let first = rx.recv_timeout(wait);
    let addr = match &first {
        Ok(Some(Ok(line))) => line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok()),
        _ => None,
    };
    let Some(addr) = addr else {
        let _ = child.kill();
        let status = child.wait();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let _ = std::fs::remove_file(log);
        panic!(
            "{what} did not start: first stdout line {first:?}, exit {status:?}; log:\n{}",
            last_lines(&text, 60)
        );
    };
    (child, addr)
}
