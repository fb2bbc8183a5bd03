//! Thin wrappers over the OS: the open-file limit, CPU clocks, steal, connecting from a
//! chosen source address, and a microsecond timer.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it: the most sockets this
/// process can ever hold.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a struct we own.
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

fn clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a struct we own.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU seconds the calling thread has used (user + system).
pub(crate) fn thread_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU seconds this whole process has used, every thread together.
pub(crate) fn process_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of another process in seconds, from /proc/PID/stat; None if it is gone.
pub(crate) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_sec())
}

/// One `cpu` line of /proc/stat (`cpu` is all CPUs together, then `cpu0`, `cpu1`...): seconds
/// spent running anything (user + nice + system + irq + softirq) and seconds stolen by the
/// hypervisor, since boot.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CpuTimes {
    pub name: String,
    pub busy: f64,
    pub steal: f64,
}

/// Every `cpu` line of /proc/stat; empty if it is unreadable.
pub(crate) fn cpu_times() -> Vec<CpuTimes> {
    match std::fs::read_to_string("/proc/stat") {
        Ok(text) => parse_cpu_times(&text, clock_ticks_per_sec()),
        Err(_) => Vec::new(),
    }
}

fn parse_cpu_times(text: &str, hz: f64) -> Vec<CpuTimes> {
    text.lines()
        .filter(|l| l.starts_with("cpu"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            // user nice system idle iowait irq softirq steal ...
            let v: Vec<f64> = it.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
            (v.len() == 8).then(|| CpuTimes {
                name,
                busy: (v[0] + v[1] + v[2] + v[5] + v[6]) / hz,
                steal: v[7] / hz,
            })
        })
        .collect()
}

/// Busy and steal seconds per CPU line between two readings of [`cpu_times`].
pub(crate) fn cpu_deltas(before: &[CpuTimes], after: &[CpuTimes]) -> Vec<CpuTimes> {
    after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.name == a.name)?;
            Some(CpuTimes {
                name: a.name.clone(),
                busy: (a.busy - b.busy).max(0.0),
                steal: (a.steal - b.steal).max(0.0),
            })
        })
        .collect()
}

/// Starts a non-blocking TCP connect, optionally from a given local address. The caller waits
/// for writability, then checks the outcome with `take_error` / `peer_addr`.
pub(crate) fn start_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<mio::net::TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    // Messages are small and latency is what we measure: Nagle must never hold a frame back.
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            // Without this, bind(port 0) reserves a local port for the source address alone,
            // which caps one source at ~28k sockets over all destinations; with it the port is
            // picked at connect() time per 4-tuple. This is what lets 100,000 connections
            // spread over a few 127.x.y.z sources.
            let one: libc::c_int = 1;
            // SAFETY: valid fd; the option value points to a live c_int of the given size.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
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

/// A one-shot timerfd. epoll sleeps in whole milliseconds; an open-loop send must leave on
/// time to the microsecond without spinning, or the schedule's own error shows up as latency.
pub(crate) struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub(crate) fn new() -> io::Result<Timer> {
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
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fires once, `after` from now (zero would disarm it, so it is at least a nanosecond).
    pub(crate) fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
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
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads into a buffer we own; EAGAIN is fine and ignored.
        unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_clocks_advance_and_the_file_limit_is_known() {
        let a = thread_cpu_seconds();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_seconds() > a);
        assert!(process_cpu_seconds() > 0.0);
        assert!(raise_nofile_limit().expect("getrlimit") > 0);
        assert!(proc_cpu_seconds(std::process::id()).is_some());
    }

    #[test]
    fn proc_stat_lines_become_busy_and_steal_seconds() {
        let text = "cpu  100 5 50 1000 7 3 2 10 0 0\n\
                    cpu0 60 5 30 500 3 2 1 6 0 0\n\
                    cpu1 40 0 20 500 4 1 1 4 0 0\n\
                    intr 12345\n";
        let t = parse_cpu_times(text, 100.0);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].name, "cpu");
        assert!((t[0].busy - 1.6).abs() < 1e-9); // (100 + 5 + 50 + 3 + 2) / 100
        assert!((t[0].steal - 0.1).abs() < 1e-9);
        assert_eq!(t[1].name, "cpu0");
        let mut later = t.clone();
        later[1].busy += 2.5;
        later[1].steal += 0.25;
        let d = cpu_deltas(&t, &later);
        assert_eq!(d.len(), 3);
        assert!((d[1].busy - 2.5).abs() < 1e-9 && (d[1].steal - 0.25).abs() < 1e-9);
        assert_eq!(d[2].busy, 0.0);
        assert!(!cpu_times().is_empty());
    }
}
