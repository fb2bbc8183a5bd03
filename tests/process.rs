//! The `chatflow` binary: graceful shutdown on signals, file-descriptor exhaustion, check-config.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::{Client, msg, raw_upgrade};

const BIN: &str = env!("CARGO_BIN_EXE_chatflow");

struct Proc {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Proc {
    /// Runs `sh -c "<prefix> exec chatflow serve ..."` and waits for its `listening on` line.
    fn spawn(prefix: &str, envs: &[(&str, &str)]) -> Proc {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("chatflow-proc-{}-{n}.log", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "{prefix} exec {BIN} serve --listen 127.0.0.1:0 --reactors 2 --node-id proc --store memory"
            ))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn chatflow");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Proc { child, addr, log }
    }

    /// What the server logged, for failure messages.
    fn stderr(&mut self) -> String {
        let status = self.child.try_wait().ok().flatten();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("exit status {status:?}; log:\n{log}")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Waits for exit; returns the status and how long it took.
    fn wait(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("stat");
        let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks: f64 =
            fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        ticks / 100.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn sigterm_flushes_every_ack_then_closes_with_1001_and_exits_0() {
    let mut p = Proc::spawn("", &[("CHATFLOW_SHUTDOWN_TIMEOUT_MS", "5000")]);
    let mut clients: Vec<Client> = (0..4).map(|_| Client::connect(p.addr, "drain")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..200 {
            let mut m = msg(i as u32 + 1, "drain", "before shutdown");
            m["clientMessageId"] = format!("d{i}-{n}").into();
            c.queue(&m);
        }
        c.flush();
    }
    std::thread::sleep(Duration::from_millis(200));
    p.signal(libc::SIGTERM);
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..200 {
            let ack = c.recv_type("ack");
            assert_eq!(ack["clientMessageId"], format!("d{i}-{n}"));
        }
        let close = c.expect_close().expect("a close frame with a code");
        assert_eq!(u16::from(close.code), 1001);
    }
    let (status, took) = p.wait(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5));
}

#[test]
fn shutdown_does_not_wait_past_its_deadline_for_a_silent_client() {
    let mut p = Proc::spawn("", &[("CHATFLOW_SHUTDOWN_TIMEOUT_MS", "700")]);
    // This client never answers the close frame nor closes its socket.
    let _mute = raw_upgrade(p.addr, "1");
    std::thread::sleep(Duration::from_millis(100));
    p.signal(libc::SIGINT);
    let (status, took) = p.wait(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

#[test]
fn out_of_file_descriptors_the_server_backs_off_and_recovers() {
    let mut p = Proc::spawn("ulimit -n 48;", &[]);
    let mut conns = Vec::new();
    for _ in 0..80 {
        if let Ok(s) = TcpStream::connect(p.addr) {
            conns.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = p.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let spent = p.cpu_seconds() - before;
    assert!(
        spent < 0.3,
        "the server spun for {spent}s of CPU while out of descriptors"
    );
    drop(conns);
    // Descriptors free again: it serves new clients.
    let start = Instant::now();
    let body = loop {
        let mut s =
            TcpStream::connect(p.addr).unwrap_or_else(|e| panic!("connect: {e}; {}", p.stderr()));
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.starts_with("HTTP/1.1 200") {
            break out;
        }
        assert!(start.elapsed() < util::WAIT, "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        util::metric_in(&body, "chatflow_accept_errors_total") > 0,
        "EMFILE was not hit"
    );
    let mut c = Client::connect(p.addr, "after");
    c.send(&msg(1, "after", "recovered"));
    assert_eq!(c.recv()["type"], "ack");
}

#[test]
fn check_config_accepts_the_sample_and_explains_a_bad_file() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/chatflow.example.toml");
    let ok = Command::new(BIN)
        .args(["check-config", sample])
        .output()
        .expect("run");
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("max_connections = 10000"));

    // Secrets are never printed back.
    let dir = std::env::temp_dir().join(format!("chatflow-cc-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let with_secret = dir.join("secret.toml");
    std::fs::write(&with_secret, "auth_secret = \"do-not-print-this-0123\"\n").expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&with_secret)
        .output()
        .expect("run");
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("do-not-print-this"), "{printed}");
    assert!(printed.contains("<redacted>"));
    let _ = std::fs::remove_dir_all(&dir);

    let dir = std::env::temp_dir().join(format!("chatflow-cc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    // Each bad file exits 1 and names its problem.
    for (text, complaint) in [
        (
            "max_connections = 0\n",
            "max_connections must be at least 1",
        ),
        ("max_conections = 5\n", "max_conections"),
        ("listen = 8080\n", "listen"),
    ] {
        std::fs::write(&bad, text).expect("write");
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&bad)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(complaint), "{text}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_taken_port_is_an_error_not_a_shared_port() {
    let p = Proc::spawn("", &[]);
    let out = Command::new(BIN)
        .args(["serve", "--listen", &p.addr.to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_client_that_keeps_sending_cannot_hold_up_the_drain() {
    let mut p = Proc::spawn("", &[("CHATFLOW_SHUTDOWN_TIMEOUT_MS", "1500")]);
    let raw = raw_upgrade(p.addr, "flood");
    let mut reader = raw.try_clone().expect("clone");
    let mut writer = raw;
    // Read and discard everything (so it is not a slow consumer) ...
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    // ... while sending invalid messages as fast as the socket takes them.
    let burst: Vec<u8> = (0..1000)
        .flat_map(|_| util::client_frame(0x1, b"{}", Some([1, 2, 3, 4])))
        .collect();
    std::thread::spawn(move || while writer.write_all(&burst).is_ok() {});
    std::thread::sleep(Duration::from_millis(300));
    p.signal(libc::SIGTERM);
    let (status, took) = p.wait(Duration::from_secs(6));
    assert!(status.success(), "{status}: {}", p.stderr());
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn systemd_is_told_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("chatflow-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("notify.sock");
    // A socket file left by an earlier run (same pid) would make bind fail.
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(util::WAIT)).expect("timeout");
    let mut p = Proc::spawn("", &[("NOTIFY_SOCKET", path.to_str().expect("utf-8 path"))]);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains(&p.addr.to_string()), "{ready}");
    p.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("STOPPING");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let (status, _) = p.wait(Duration::from_secs(5));
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
