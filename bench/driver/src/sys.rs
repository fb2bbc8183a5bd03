//! Thin wrappers over the OS: file limits, CPU accounting, steal, sockets.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the new soft
/// limit. The hard limit here is 20,000 and cannot be raised, so this is the
/// most connections one driver process can ever hold.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// user + system CPU seconds of this whole process (all threads).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: zeroed rusage is a valid value; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pointer to a live, owned struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime of another process in seconds, from /proc/PID/stat.
/// None if the process is gone or the file is unreadable.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces,
    // so count fields from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11, 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_sec())
}

/// Per CPU line of /proc/stat ("cpu", "cpu0", ...): busy and steal seconds.
#[derive(Debug, Clone)]
pub struct CpuTimes {
    pub name: String,
    /// user + nice + system + irq + softirq: time spent running anything,
    /// which shows how much else ran on the server's and driver's cores.
    pub busy: f64,
    pub steal: f64,
}

pub fn cpu_times() -> Vec<CpuTimes> {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    let hz = clock_ticks_per_sec();
    text.lines()
        .filter(|l| l.starts_with("cpu"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            // user nice system idle iowait irq softirq steal ...
            let v: Vec<f64> = it.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
            if v.len() < 8 {
                return None;
            }
            Some(CpuTimes {
                name,
                busy: (v[0] + v[1] + v[2] + v[5] + v[6]) / hz,
                steal: v[7] / hz,
            })
        })
        .collect()
}

/// Starts a non-blocking TCP connect, optionally from a given local address.
/// The caller waits for writability and then checks the outcome.
pub fn start_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<mio::net::TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    // Messages are small and latency is what we measure: never let Nagle hold
    // a frame back waiting for the previous one's ack.
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            // Without this, bind(port 0) reserves a local port for the source
            // IP alone, which caps us at ~28k sockets over all destinations;
            // with it the port is picked at connect() time per 4-tuple.
            let one: libc::c_int = 1;
            // SAFETY: valid fd, option value points to a live c_int.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std_stream: std::net::TcpStream = sock.into();
    Ok(mio::net::TcpStream::from_std(std_stream))
}

/// A one-shot timerfd. epoll's own timeout only has millisecond resolution;
/// open-loop sends need to leave on time to the microsecond, without spinning.
pub struct Timer {
    fd: std::os::fd::OwnedFd,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: plain syscall; we take ownership of the returned fd.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Fires once, `after` from now (a zero duration would disarm it, so
    /// round up to a nanosecond).
    pub fn arm(&self, after: std::time::Duration) -> io::Result<()> {
        let after = after.max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid fd and pointers to live structs.
        let rc = unsafe { libc::timerfd_settime(self.raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes the expiration count so the fd stops being readable.
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading into a buffer we own; EAGAIN is fine.
        unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}
