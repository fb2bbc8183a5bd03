//! The `chatflow` command: `serve` runs a node, `check-config` validates a config file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use chatflow::config::{AckAfter, Config};
use chatflow::server::Server;

/// A real-time chat server: WebSocket rooms, acks, fan-out, metrics.
#[derive(Parser)]
#[command(name = "chatflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server node (WebSocket /chat/{roomId} and HTTP on one port).
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML file (see chatflow.example.toml).
        file: PathBuf,
    },
    /// Mint an access token for ws://HOST/chat/{roomId}?token=... (needs the server's secret).
    Token(TokenArgs),
    /// Load-test a server speaking the ChatFlow protocol and report msg/s and latency.
    Load(chatflow::load::LoadArgs),
    /// Create or upgrade the store's schema and exit (serve also does this at start).
    Migrate {
        /// sqlite:PATH or postgres://USER@HOST:PORT/DATABASE [default: the config's store].
        #[arg(long)]
        store: Option<String>,
        /// TOML config file to take the store from.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Config file with auth_secret or auth_secret_file (CHATFLOW_AUTH_SECRET works too).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read the secret from the first line of this file instead.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// The user id (1..=100000) every message on the connection must carry.
    #[arg(long)]
    user: u32,
    /// Rooms the token opens, comma-separated, or * for every room.
    #[arg(long, default_value = "*")]
    rooms: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
}

/// Flags override CHATFLOW_* environment variables, which override the file.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; every key is documented in chatflow.example.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address and port to listen on [default: 0.0.0.0:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Reactor threads; 0 = one per core [default: 0].
    #[arg(long)]
    reactors: Option<usize>,
    /// Message bus: local [default: local].
    #[arg(long)]
    bus: Option<String>,
    /// When to ack: received, published or persisted [default: published].
    #[arg(long, value_parser = parse_ack_after)]
    ack_after: Option<AckAfter>,
    /// Where messages are stored: sqlite:PATH, postgres://USER@HOST:PORT/DB or memory
    /// [default: sqlite:./chatflow-data/chatflow.db].
    #[arg(long)]
    store: Option<String>,
    /// Node name for /health and metrics [default: host name].
    #[arg(long)]
    node_id: Option<String>,
}

fn parse_ack_after(s: &str) -> Result<AckAfter, String> {
    match s {
        "received" => Ok(AckAfter::Received),
        "published" => Ok(AckAfter::Published),
        "persisted" => Ok(AckAfter::Persisted),
        _ => Err("expected received, published or persisted".into()),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Token(args) => token(args),
        Command::Load(args) => chatflow::load::run(args),
        Command::Migrate { store, config } => migrate(store, config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(file: Option<&std::path::Path>, args: Option<&ServeArgs>) -> anyhow::Result<Config> {
    let mut config = Config::load(file, std::env::vars())?;
    if let Some(a) = args {
        if let Some(v) = a.listen {
            config.listen = v;
        }
        if let Some(v) = a.reactors {
            config.reactors = v;
        }
        if let Some(v) = &a.bus {
            config.bus = v.clone();
        }
        if let Some(v) = a.ack_after {
            config.ack_after = v;
        }
        if let Some(v) = &a.store {
            config.store = v.clone();
        }
        if let Some(v) = &a.node_id {
            config.node_id = v.clone();
        }
        config.validate()?;
    }
    Ok(config)
}

fn migrate(store: Option<String>, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut config = load(file, None)?;
    if let Some(s) = store {
        config.store = s;
    }
    config.validate()?;
    let shown = chatflow::store::redact(&config.store);
    let opened = chatflow::store::open(&config.store, &config.store_options())
        .with_context(|| format!("migrating {shown}"))?;
    println!("{shown}: schema is at version {}", opened.schema_version());
    drop(opened);
    Ok(())
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = load(Some(file), None)?;
    println!("# {} is valid; effective configuration:", file.display());
    print!("{}", config.to_toml());
    Ok(())
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let mut config = load(args.config.as_deref(), None)?;
    if let Some(file) = &args.secret_file {
        config.auth_secret_file = file.display().to_string();
    }
    let secret = config
        .auth_key()?
        .context("no secret: set auth_secret_file or auth_secret (or CHATFLOW_AUTH_SECRET), or pass --secret-file")?;
    anyhow::ensure!(
        (1..=chatflow::protocol::MAX_USER_ID).contains(&args.user),
        "--user must be between 1 and 100000"
    );
    let rooms: Vec<String> = args
        .rooms
        .split(',')
        .map(|r| r.trim().to_string())
        .collect();
    for room in &rooms {
        anyhow::ensure!(
            room == "*" || chatflow::protocol::is_valid_id(room),
            "room {room:?} is not a valid room id (or *)"
        );
    }
    anyhow::ensure!(args.ttl_secs >= 1, "--ttl-secs must be at least 1");
    let exp = chatflow::auth::unix_now()
        .checked_add(args.ttl_secs)
        .context("--ttl-secs is too large")?;
    let claims = chatflow::auth::Claims {
        sub: args.user,
        rooms,
        exp,
    };
    println!("{}", chatflow::auth::mint(&secret, &claims));
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load(args.config.as_deref(), Some(&args))?;
    log::debug!("configuration:\n{}", config.to_toml());
    // Signals first: once listeners are open, a connection storm can use up every descriptor.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    let server = Server::start(config).context("starting the server")?;
    // Scripts and tests wait for this line on stdout.
    println!("listening on {}", server.local_addr());
    chatflow::notify::notify_or_log(&format!(
        "READY=1\nSTATUS=listening on {}",
        server.local_addr()
    ));
    let handle = server.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!("signal {signal}: draining connections");
                    chatflow::notify::notify_or_log("STOPPING=1\nSTATUS=draining connections");
                    handle.shutdown();
                } else {
                    log::warn!("second signal: exiting now");
                    std::process::exit(130);
                }
            }
        })
        .context("starting the signal thread")?;
    server.join();
    log::info!("stopped");
    Ok(())
}
