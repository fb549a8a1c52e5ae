//! `volumefs-guest`: the agent and FUSE daemon that runs inside a sandbox VM (or on an ordinary
//! Linux host, over a unix socket, for tests).

const USAGE: &str = "volumefs-guest agent --server ENDPOINT

  ENDPOINT is unix:PATH (the sandbox's guest socket on an ordinary host) or
  vsock:2:1024 (inside a VM: the host, port 1024).

Mounts every volume attached to the sandbox at its path and serves them until SIGTERM,
then flushes and unmounts them.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["agent", "--server", ep] | ["agent", "--server=", ep] => match volumefs::transport::Endpoint::parse(ep) {
            Ok(ep) => match volumefs::guest::agent::run(ep) {
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
