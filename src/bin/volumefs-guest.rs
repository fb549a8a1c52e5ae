//! `volumefs-guest`: the agent and FUSE daemon that runs inside a sandbox VM (or on an ordinary
//! Linux host, over a unix socket, for tests).

const USAGE: &str = "volumefs-guest agent --server ENDPOINT [--control ENDPOINT]

  --server is unix:PATH (the sandbox's guest socket on an ordinary host) or
  vsock:2:1024 (inside a VM: the host, port 1024).
  --control is where the agent takes the host's commands: by default vsock port 1025
  in a VM, or unix:agent.sock beside the guest socket.

Mounts every volume attached to the sandbox at its path and serves them until SIGTERM,
then flushes and unmounts them.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |s: &str| volumefs::transport::Endpoint::parse(s);
    let code = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["agent", "--server", ep, rest @ ..] => {
            let control = match rest {
                [] => Ok(None),
                ["--control", c] => parse(c).map(Some),
                _ => Err(USAGE.to_string()),
            };
            match parse(ep).and_then(|ep| control.map(|c| (ep, c))) {
                Ok((ep, control)) => match volumefs::guest::agent::run(ep, control) {
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
            }
        }
        ["--help"] | ["help"] => {
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
