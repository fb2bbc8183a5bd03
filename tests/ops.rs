//! Operations files: scripts/install, the systemd unit, sysctl.conf with
//! scripts/apply-tuning, and the Grafana dashboard against the server's real /metrics.
//!
//! The unit test needs `systemd-analyze` (Debian package `systemd`). The tuning test only
//! ever runs `scripts/apply-tuning --dry-run`: no test changes a kernel setting. The
//! dashboard's "RabbitMQ bus" row is checked against a server on the machine's RabbitMQ, in a
//! namespace of its own, holding the shared broker lock of `tests/util/broker.rs`.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_chatflow");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("chatflow-ops-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn root() -> &'static Path {
    Path::new(ROOT)
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `scripts/install --prefix DIR` with the test binary; returns its output.
fn install_into(dir: &Path) -> Output {
    let out = run(Command::new(root().join("scripts/install"))
        .arg("--prefix")
        .arg(dir)
        .arg("--binary")
        .arg(BIN)
        .arg("--no-user"));
    assert!(
        out.status.success(),
        "scripts/install failed:\n{}",
        describe(&out)
    );
    out
}

/// `key = value` settings of a sysctl file, in order, each with the comment block above it.
struct Setting {
    key: String,
    value: String,
    line: usize,
    comments: Vec<String>,
}

fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_sysctl(text: &str) -> Vec<Setting> {
    let mut settings = Vec::new();
    let mut block: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(comment) = line.strip_prefix('#') {
            block.push(comment.trim().to_string());
            continue;
        }
        if line.is_empty() {
            block.clear();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("sysctl.conf:{}: not `key = value`: {raw}", i + 1));
        settings.push(Setting {
            key: key.trim().to_string(),
            value: normalize(value),
            line: i + 1,
            comments: std::mem::take(&mut block),
        });
    }
    settings
}

fn sysctl_settings() -> Vec<Setting> {
    parse_sysctl(&read(root().join("sysctl.conf")))
}

#[test]
fn install_puts_binary_config_unit_and_sysctl_in_place() {
    let dir = TempDir::new("install");
    install_into(dir.path());
    let p = dir.path();

    let bin = p.join("usr/local/bin/chatflow");
    let meta = std::fs::metadata(&bin).expect("installed binary");
    use std::os::unix::fs::PermissionsExt;
    assert!(
        meta.permissions().mode() & 0o111 != 0,
        "binary not executable"
    );
    assert_eq!(
        meta.len(),
        std::fs::metadata(BIN).expect("test binary").len()
    );

    let config = p.join("etc/chatflow/chatflow.toml");
    assert_eq!(read(&config), read(root().join("chatflow.example.toml")));
    assert_eq!(
        read(p.join("etc/sysctl.d/90-chatflow.conf")),
        read(root().join("sysctl.conf"))
    );
    let unit = read(p.join("etc/systemd/system/chatflow.service"));
    let exec_start = format!(
        "ExecStart={} serve --config {}",
        bin.display(),
        config.display()
    );
    assert!(
        unit.lines().any(|l| l == exec_start),
        "the installed unit should run the installed binary with the installed config \
         ({exec_start}):\n{unit}"
    );

    // The installed config passes the installed binary's own check.
    let out = run(Command::new(&bin).arg("check-config").arg(&config));
    assert!(
        out.status.success(),
        "check-config on the installed config:\n{}",
        describe(&out)
    );

    // Installing again keeps an edited config.
    let edited = format!("{}\nmax_connections = 500\n", read(&config));
    std::fs::write(&config, &edited).expect("edit config");
    install_into(p);
    assert_eq!(
        read(&config),
        edited,
        "a second install overwrote the config"
    );
}

/// Key-value pairs of the unit's [Service] section (repeated keys keep every value).
fn service_section(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = "";
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            map.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    map
}

/// Runs `systemd-analyze verify` on a unit file; returns (success, stderr lines about it).
fn systemd_verify(unit: &Path) -> (bool, Vec<String>) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed, so the systemd unit cannot be verified. \
             Install it with `apt-get install -y systemd` (Debian/Ubuntu) and run again."
        ),
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    };
    // verify exits 0 on unknown keys and unparsable values and only warns on stderr, so
    // any message naming the unit counts as a failure.
    let name = unit.file_name().unwrap().to_string_lossy().into_owned();
    let about_unit = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains(&name) || l.contains("chatflow"))
        .map(str::to_string)
        .collect();
    (out.status.success(), about_unit)
}

#[test]
fn systemd_analyze_verifies_the_installed_unit() {
    let dir = TempDir::new("unit");
    install_into(dir.path());
    let unit_path = dir.path().join("etc/systemd/system/chatflow.service");

    let (ok, complaints) = systemd_verify(&unit_path);
    assert!(
        ok && complaints.is_empty(),
        "systemd-analyze verify {}: ok={ok}\n{}",
        unit_path.display(),
        complaints.join("\n")
    );

    // The check is real: a typo in the same unit is reported.
    let broken = dir
        .path()
        .join("etc/systemd/system/broken-chatflow.service");
    let unit = read(&unit_path);
    std::fs::write(&broken, unit.replace("Type=notify", "Type=notiffy")).expect("write");
    let (ok, complaints) = systemd_verify(&broken);
    assert!(
        !ok || !complaints.is_empty(),
        "systemd-analyze did not notice Type=notiffy"
    );

    let service = service_section(&unit);
    let one = |k: &str| -> &str {
        let v = service
            .get(k)
            .unwrap_or_else(|| panic!("the unit has no {k}="));
        v.last().unwrap()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("User"), "chatflow");
    assert!(one("ExecStartPre").contains(" check-config "));
    let nofile: u64 = one("LimitNOFILE").parse().expect("numeric LimitNOFILE");
    assert!(nofile >= 65536, "LimitNOFILE={nofile} is too low");
    let nr_open = sysctl_settings()
        .into_iter()
        .find(|s| s.key == "fs.nr_open")
        .map_or(1 << 20, |s| s.value.parse::<u64>().expect("fs.nr_open"));
    assert!(nofile <= nr_open, "LimitNOFILE above fs.nr_open");

    // systemd must wait longer than the server's own drain before it kills it.
    let check = run(Command::new(BIN)
        .arg("check-config")
        .arg(dir.path().join("etc/chatflow/chatflow.toml")));
    assert!(check.status.success(), "{}", describe(&check));
    let effective = String::from_utf8_lossy(&check.stdout).into_owned();
    let drain_ms: u64 = effective
        .lines()
        .find_map(|l| l.strip_prefix("shutdown_timeout_ms = "))
        .expect("check-config prints shutdown_timeout_ms")
        .trim()
        .parse()
        .expect("shutdown_timeout_ms is a number");
    let stop = one("TimeoutStopSec");
    let stop_secs: u64 = stop.trim_end_matches('s').parse().expect("TimeoutStopSec");
    assert!(
        stop_secs * 1000 > drain_ms,
        "TimeoutStopSec={stop} does not exceed shutdown_timeout_ms={drain_ms}"
    );
}

#[test]
fn every_sysctl_setting_says_why_kernel_default_and_ours() {
    let settings = sysctl_settings();
    let mut seen = BTreeSet::new();
    for s in &settings {
        assert!(seen.insert(s.key.clone()), "{} is set twice", s.key);
        let field = |name: &str| -> String {
            s.comments
                .iter()
                .find_map(|c| c.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| {
                    panic!(
                        "sysctl.conf:{}: {} has no `# {name}` comment line above it",
                        s.line, s.key
                    )
                })
        };
        assert!(field("why:").len() >= 20, "{}: say why it is set", s.key);
        assert!(!field("default:").is_empty(), "{}: empty default", s.key);
        assert_eq!(
            normalize(&field("ours:")),
            s.value,
            "{}: the `ours:` comment disagrees with the value set",
            s.key
        );
    }
    for key in [
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.core.netdev_max_backlog",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.core.rmem_max",
        "net.core.wmem_max",
        "fs.file-max",
        "fs.nr_open",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_tw_reuse",
    ] {
        assert!(seen.contains(key), "sysctl.conf does not set {key}");
    }
    let number = |key: &str| -> u64 {
        let s = settings.iter().find(|s| s.key == key).expect("key is set");
        s.value.parse().expect("a number")
    };
    assert!(
        number("fs.file-max") > number("fs.nr_open"),
        "fs.file-max must exceed fs.nr_open, or one process could take every file"
    );
}

fn proc_sys(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .ok()
        .map(|v| normalize(&v))
}

#[test]
fn apply_tuning_dry_run_lists_every_key_and_changes_nothing() {
    let settings = sysctl_settings();
    let before: Vec<_> = settings.iter().map(|s| proc_sys(&s.key)).collect();

    let out = run(Command::new(root().join("scripts/apply-tuning")).arg("--dry-run"));
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for s in &settings {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(s.key.as_str()))
            .unwrap_or_else(|| panic!("dry run does not list {}:\n{stdout}", s.key));
        if let Some(running) = proc_sys(&s.key) {
            let expect = if running == s.value {
                format!("{} {running}", s.key)
            } else {
                format!("{} {running} -> {}", s.key, s.value)
            };
            assert!(
                normalize(line).ends_with(&expect),
                "dry run line {line:?} should show `{expect}`"
            );
        }
    }

    let after: Vec<_> = settings.iter().map(|s| proc_sys(&s.key)).collect();
    assert_eq!(before, after, "a dry run changed kernel settings");

    // --file reads another file; a key this kernel lacks is reported, not fatal.
    let dir = TempDir::new("tuning");
    let file = dir.path().join("other.conf");
    std::fs::write(
        &file,
        "# a comment\nnet.core.somaxconn = 1234\nchatflow.no.such.key = 1\n",
    )
    .expect("write");
    let out = run(Command::new(root().join("scripts/apply-tuning"))
        .arg("--dry-run")
        .arg("--file")
        .arg(&file));
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("net.core.somaxconn"), "{stdout}");
    assert!(stdout.contains("-> 1234"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("chatflow.no.such.key") && l.contains("not on this kernel")),
        "{stdout}"
    );

    for script in ["scripts/apply-tuning", "scripts/install", "scripts/profile"] {
        let out = run(Command::new(root().join(script)).arg("--help"));
        assert!(
            out.status.success() && out.stdout.starts_with(b"Usage: "),
            "{script} --help:\n{}",
            describe(&out)
        );
    }
}

/// `chatflow serve` on a free port, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--reactors",
                "2",
                "--node-id",
                "ops",
                "--store",
                "memory",
            ])
            .env_remove("CHATFLOW_ADMIN_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chatflow serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Server { child, addr }
    }

    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        assert!(body.starts_with("HTTP/1.1 200"), "GET {path}: {body}");
        body
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `"expr"` string anywhere in the dashboard.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// Names of the form chatflow_[a-z0-9_]+ in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("chatflow_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The metric families `queries` use: a histogram family `x` is queried through its
/// `x_bucket`, `x_sum` and `x_count` series.
fn families_queried(queries: &[String]) -> BTreeSet<String> {
    queries
        .iter()
        .flat_map(|q| metric_names(q))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| n.strip_suffix(suffix))
                .map_or(n.clone(), str::to_string)
        })
        .collect()
}

/// The families of a `/metrics` body (its `# TYPE` lines).
fn families_in(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The title of the dashboard's row for the RabbitMQ bus.
const BUS_ROW: &str = "RabbitMQ bus";

/// The dashboard without the panels of the [`BUS_ROW`] row, and those panels: the ones below
/// that row and above the next (or nested in it, when it is collapsed).
fn split_bus_row(dashboard: &serde_json::Value) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut rest = dashboard.clone();
    let panels = rest["panels"].as_array_mut().expect("panels");
    let y = |p: &serde_json::Value| p["gridPos"]["y"].as_u64().expect("gridPos.y");
    let Some(row) = panels
        .iter()
        .find(|p| p["type"] == "row" && p["title"] == BUS_ROW)
        .cloned()
    else {
        return (rest, Vec::new());
    };
    let top = y(&row);
    let bottom = panels
        .iter()
        .filter(|p| p["type"] == "row" && y(p) > top)
        .map(y)
        .min()
        .unwrap_or(u64::MAX);
    let mut bus: Vec<serde_json::Value> = row["panels"].as_array().cloned().unwrap_or_default();
    panels.retain(|p| {
        let inside = p["type"] != "row" && y(p) > top && y(p) < bottom;
        if inside {
            bus.push(p.clone());
        }
        let is_bus_row = p["type"] == "row" && p["title"] == BUS_ROW;
        !(inside || is_bus_row)
    });
    (rest, bus)
}

#[test]
fn dashboard_queries_only_metrics_the_server_exports() {
    let text = read(root().join("tuning/grafana-dashboard.json"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("tuning/grafana-dashboard.json is valid JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    // The bus row's panels are checked against a server on RabbitMQ (the next test).
    let (rest, _bus) = split_bus_row(&dashboard);
    let mut queries = Vec::new();
    exprs(&rest, &mut queries);
    let used = families_queried(&queries);
    assert!(
        !used.is_empty(),
        "the dashboard queries no chatflow_ metric"
    );

    let server = Server::start();
    let started = Instant::now();
    let body = server.get("/metrics");
    let families = families_in(&body);
    assert!(families.len() > 10, "too few families in /metrics:\n{body}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let unknown: Vec<_> = used.difference(&families).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the server does not export: {unknown:?}\n\
         exported: {families:?}"
    );
    // A family may be graphed in any row (a counter that only a broker bus moves, in the bus
    // row).
    let mut all_queries = Vec::new();
    exprs(&dashboard, &mut all_queries);
    let graphed = families_queried(&all_queries);
    let ungraphed: Vec<_> = families.difference(&graphed).collect();
    assert!(
        ungraphed.is_empty(),
        "metric families with no panel in tuning/grafana-dashboard.json: {ungraphed:?}"
    );
}

#[test]
fn dashboard_bus_row_queries_only_metrics_a_server_on_rabbitmq_exports() {
    let text = read(root().join("tuning/grafana-dashboard.json"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("tuning/grafana-dashboard.json is valid JSON");
    let (_rest, bus) = split_bus_row(&dashboard);
    assert!(
        bus.len() >= 2,
        "the dashboard has no \"{BUS_ROW}\" row with panels"
    );
    let mut queries = Vec::new();
    bus.iter().for_each(|p| exprs(p, &mut queries));
    let used = families_queried(&queries);

    // The namespace is declared before the server, so the server is gone before its exchanges
    // and queues are deleted (and the shared broker lock released).
    util::broker::require_broker();
    let ns = util::broker::Namespace::locked("ops");
    let url = util::broker::amqp_url();
    let log =
        std::env::temp_dir().join(format!("chatflow-ops-{}.log", util::broker::unique("amqp")));
    let (child, addr) = util::serve::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--reactors",
            "1",
            "--node-id",
            "ops-amqp",
            "--store",
            "memory",
            "--bus",
            &url,
        ],
        &[("CHATFLOW_AMQP_NAMESPACE", ns.prefix.as_str())],
        &log,
        Duration::from_secs(60),
        "chatflow serve --bus amqp://",
    );
    let server = Server { child, addr };
    let body = server.get("/metrics");
    drop(server);
    let _ = std::fs::remove_file(&log);
    let families = families_in(&body);
    let amqp: BTreeSet<String> = families
        .iter()
        .filter(|f| f.starts_with("chatflow_amqp_"))
        .cloned()
        .collect();
    assert!(
        !amqp.is_empty(),
        "a server on --bus amqp:// exports no chatflow_amqp_ family:\n{body}"
    );

    let unknown: Vec<_> = used.difference(&families).collect();
    assert!(
        unknown.is_empty(),
        "the \"{BUS_ROW}\" row queries metrics a server on RabbitMQ does not export: \
         {unknown:?}\nexported: {families:?}"
    );
    let ungraphed: Vec<_> = amqp.difference(&used).collect();
    assert!(
        ungraphed.is_empty(),
        "chatflow_amqp_ families with no panel in the \"{BUS_ROW}\" row: {ungraphed:?}"
    );
}
