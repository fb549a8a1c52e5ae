//! `volumefs-guest`: the agent and FUSE daemon that runs inside a sandbox VM (or on an ordinary
//! Linux host, over a unix socket, for tests).

use std::time::Duration;

const USAGE: &str = "volumefs-guest agent --server ENDPOINT [--control ENDPOINT] [--host-timeout SECS] [--mount-root DIR] [--log-file PATH]

  --server is unix:PATH (the sandbox's guest socket on an ordinary host) or
  vsock:2:1024 (inside a VM: the host, port 1024).
  --control is where the agent takes the host's commands: by default vsock port 1025
  in a VM, or unix:agent.sock beside the guest socket.
  --host-timeout is how long a file operation waits for a host that cannot be reached
  before it fails with EIO (default 60). Reconnects shorter than that are invisible.
  --mount-root mounts each attachment at its path under DIR instead of at its path (DIR/mnt/data
  for /mnt/data): two agents on one host, such as a forked sandbox's beside its parent's.
  --log-file copies the log (stderr, the console in a VM; RUST_LOG filters it) to PATH.

Mounts every volume attached to the sandbox at its path and serves them until SIGTERM,
then flushes and unmounts them.";

struct Options {
    server: volumefs::transport::Endpoint,
    control: Option<volumefs::transport::Endpoint>,
    host_timeout: Duration,
    log_file: Option<std::path::PathBuf>,
    mount_root: Option<std::path::PathBuf>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let parse_ep = |s: &str| volumefs::transport::Endpoint::parse(s);
    let (mut server, mut control, mut host_timeout, mut log_file) = (None, None, Duration::from_secs(60), None);
    let mut mount_root = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "--server" => server = Some(parse_ep(value()?)?),
            "--control" => control = Some(parse_ep(value()?)?),
            "--log-file" => log_file = Some(std::path::PathBuf::from(value()?)),
            "--mount-root" => {
                let v = std::path::PathBuf::from(value()?);
                if !v.is_absolute() {
                    return Err(format!("--mount-root takes an absolute directory, not {v:?}"));
                }
                mount_root = Some(v);
            }
            "--host-timeout" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("--host-timeout takes a positive number of seconds, not {v:?}"))?;
                host_timeout = Duration::from_secs_f64(secs);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    let server = server.ok_or_else(|| format!("--server is required\n\n{USAGE}"))?;
    Ok(Options { server, control, host_timeout, log_file, mount_root })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.split_first() {
        Some((cmd, rest)) if cmd == "agent" => match parse(rest).and_then(|o| {
            volumefs::logging::init(volumefs::logging::Format::Text, o.log_file.as_deref())?;
            Ok(o)
        }) {
            Ok(o) => match volumefs::guest::agent::run(o.server, o.control, o.host_timeout, o.mount_root) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("volumefs-guest: {e}");
                    1
                }
            },
            Err(e) => {
                eprintln!("volumefs-guest: {e}");
                2
            }
        },
        Some((cmd, _)) if cmd == "--help" || cmd == "help" => {
            println!("{USAGE}");
            0
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
