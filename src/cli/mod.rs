//! The `volumefs` command line: the server itself (`volumefs server`) and a client of its HTTP
//! API for everything else. Output is for people by default and JSON with `--json`; errors go to
//! stderr with a non-zero exit code.

pub mod client;

use crate::engine::parse_size;
use client::{encode, Client};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;

const USAGE: &str = "volumefs: durable volumes for microVM sandboxes

Server:
  volumefs server [--data DIR] [--http ADDR] [--lease-ttl SECS] [--images DIR] [--log-format text|json]
      Runs the storage server in the foreground (default --data ./volumefs-data,
      --http 127.0.0.1:7070). The API token is created in DIR/api-token. Logs go to
      stderr, filtered by RUST_LOG (default info).

Client (server from --server URL or VOLUMEFS_SERVER, default http://127.0.0.1:7070;
token from --token or VOLUMEFS_TOKEN):
  volumefs volume create NAME [--cap SIZE] [--json]     SIZE like 2GiB (default), 512MiB
  volumefs volume list [--json]
  volumefs volume inspect NAME [--json]
  volumefs volume delete NAME [--force]
  volumefs file read VOLUME PATH                        file contents to stdout
  volumefs file write VOLUME PATH [--append]            stdin replaces the file (atomically), or
                                                        with --append is added at its end as one write
  volumefs sandbox create SB [--json]                   prints the sandbox's guest socket
  volumefs sandbox list [--json]
  volumefs sandbox delete SB
  volumefs sandbox attachments SB [--json]
  volumefs sandbox reset-connections SB                 closes them as a snapshot restore does
  volumefs sandbox hibernate SB [--json]                flush, release leases, accesses wait
  volumefs sandbox resume SB [--json]
  volumefs sandbox fork SB NEW [--json]
  volumefs sandbox run SB [--volume VOL:/mnt/path[:ro][:subpath=/dir]]... [--memory 256M]
                                                        boots a microVM (QEMU) with volumes attached
  volumefs sandbox stop SB
  volumefs sandbox exec SB -- CMD [ARGS...]             runs CMD in the sandbox through its agent
  volumefs attach SB VOLUME --at PATH [--read-only] [--subpath DIR] [--json]
  volumefs detach SB --at PATH [--force]
";

/// Parsed arguments: positionals in order, `--flag value` and bare `--switch`es.
struct Args {
    pos: Vec<String>,
    flags: HashMap<String, Vec<String>>,
    switches: Vec<String>,
}

const VALUED: &[&str] = &[
    "--data",
    "--http",
    "--lease-ttl",
    "--server",
    "--token",
    "--cap",
    "--at",
    "--subpath",
    "--images",
    "--volume",
    "--memory",
    "--timeout",
    "--log-format",
];

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args { pos: Vec::new(), flags: HashMap::new(), switches: Vec::new() };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        if let Some((k, v)) = arg.split_once('=').filter(|(k, _)| k.starts_with("--")) {
            a.flags.entry(k.to_string()).or_default().push(v.to_string());
        } else if VALUED.contains(&arg.as_str()) {
            let v = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
            a.flags.entry(arg.clone()).or_default().push(v.clone());
        } else if arg.starts_with("--") {
            a.switches.push(arg.clone());
        } else {
            a.pos.push(arg.clone());
        }
    }
    Ok(a)
}

impl Args {
    fn flag(&self, k: &str) -> Option<&str> {
        self.flags.get(k).and_then(|v| v.last()).map(String::as_str)
    }

    fn flag_all(&self, k: &str) -> Vec<&str> {
        self.flags.get(k).map(|v| v.iter().map(String::as_str).collect()).unwrap_or_default()
    }

    fn has(&self, k: &str) -> bool {
        self.switches.iter().any(|s| s == k)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        for s in self.switches.iter().chain(self.flags.keys()) {
            if !allowed.contains(&s.as_str()) && s != "--server" && s != "--token" {
                return Err(format!("unknown option {s}"));
            }
        }
        Ok(())
    }
}

/// Runs the CLI; returns the process exit code.
pub fn main(argv: Vec<String>) -> i32 {
    if let Some(dash) = argv.iter().position(|a| a == "--") {
        return match exec(&argv[..dash], &argv[dash + 1..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("volumefs: {e}");
                1
            }
        };
    }
    match run(&argv) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("volumefs: {e}");
            1
        }
    }
}

fn client(a: &Args) -> Result<Client, String> {
    let url = a
        .flag("--server")
        .map(str::to_string)
        .or_else(|| std::env::var("VOLUMEFS_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    let token = a
        .flag("--token")
        .map(str::to_string)
        .or_else(|| std::env::var("VOLUMEFS_TOKEN").ok())
        .ok_or("no API token: pass --token or set VOLUMEFS_TOKEN (the server writes it to DATA/api-token)")?;
    Client::new(&url, token.trim())
}

fn call(a: &Args, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    client(a)?.call(method, path, body.as_ref()).map_err(|e| e.msg)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn run(argv: &[String]) -> Result<(), String> {
    let a = parse_args(argv)?;
    let cmd: Vec<&str> = a.pos.iter().map(String::as_str).collect();
    match cmd.as_slice() {
        [] => Err(USAGE.to_string()),
        ["help"] | ["--help"] => {
            print!("{USAGE}");
            Ok(())
        }
        ["server", ..] => serve(&a),
        ["volume", "create", name] => {
            a.only(&["--cap", "--json"])?;
            let cap = match a.flag("--cap") {
                Some(s) => parse_size(s)?,
                None => crate::engine::DEFAULT_CAP,
            };
            let v = call(&a, "POST", "/v1/volumes", Some(json!({"name": name, "cap": cap})))?;
            if a.has("--json") {
                print_json(&v);
            } else {
                println!("created volume {name} ({})", human(cap));
            }
            Ok(())
        }
        ["volume", "list"] => {
            a.only(&["--json"])?;
            let v = call(&a, "GET", "/v1/volumes", None)?;
            if a.has("--json") {
                print_json(&v);
            } else {
                println!("{:<24} {:>12} {:>12} {:>8}", "NAME", "CAP", "USED", "INODES");
                for vol in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:>12} {:>12} {:>8}",
                        vol["name"].as_str().unwrap_or(""),
                        human(vol["cap"].as_u64().unwrap_or(0)),
                        human(vol["used"].as_u64().unwrap_or(0)),
                        vol["inodes"].as_u64().unwrap_or(0)
                    );
                }
            }
            Ok(())
        }
        ["volume", "inspect", name] => {
            a.only(&["--json"])?;
            let v = call(&a, "GET", &format!("/v1/volumes/{}", encode(name)), None)?;
            print_json(&v);
            Ok(())
        }
        ["volume", "delete", name] => {
            a.only(&["--force"])?;
            let q = if a.has("--force") { "?force=true" } else { "" };
            call(&a, "DELETE", &format!("/v1/volumes/{}{q}", encode(name)), None)?;
            println!("deleted volume {name}");
            Ok(())
        }
        ["file", "read", volume, path] => {
            a.only(&[])?;
            use std::io::Write;
            let bytes = client(&a)?
                .call_bytes("GET", &format!("/v1/volumes/{}/files/{}", encode(volume), encode(path.trim_start_matches('/'))), &[])
                .map_err(|e| e.msg)?;
            std::io::stdout().write_all(&bytes).map_err(|e| e.to_string())
        }
        ["file", "write", volume, path] => {
            a.only(&["--append"])?;
            use std::io::Read;
            let mut data = Vec::new();
            std::io::stdin().read_to_end(&mut data).map_err(|e| format!("cannot read stdin: {e}"))?;
            let (method, q) = if a.has("--append") { ("POST", "?append") } else { ("PUT", "") };
            client(&a)?
                .call_bytes(method, &format!("/v1/volumes/{}/files/{}{q}", encode(volume), encode(path.trim_start_matches('/'))), &data)
                .map_err(|e| e.msg)?;
            Ok(())
        }
        ["sandbox", "create", name] => {
            a.only(&["--json"])?;
            let v = call(&a, "POST", "/v1/sandboxes", Some(json!({"name": name})))?;
            if a.has("--json") {
                print_json(&v);
            } else {
                println!("{}", v["guest_socket"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        ["sandbox", "list"] => {
            a.only(&["--json"])?;
            let v = call(&a, "GET", "/v1/sandboxes", None)?;
            if a.has("--json") {
                print_json(&v);
            } else {
                for sb in v.as_array().into_iter().flatten() {
                    println!("{:<24} {}", sb["name"].as_str().unwrap_or(""), sb["guest_socket"].as_str().unwrap_or(""));
                }
            }
            Ok(())
        }
        ["sandbox", "delete", name] => {
            a.only(&[])?;
            call(&a, "DELETE", &format!("/v1/sandboxes/{}", encode(name)), None)?;
            println!("deleted sandbox {name}");
            Ok(())
        }
        ["sandbox", "attachments", name] => {
            a.only(&["--json"])?;
            let v = call(&a, "GET", &format!("/v1/sandboxes/{}/attachments", encode(name)), None)?;
            print_attachments(&a, &v);
            Ok(())
        }
        ["sandbox", "reset-connections", name] => {
            a.only(&[])?;
            let v = call(&a, "POST", &format!("/v1/sandboxes/{}/reset-connections", encode(name)), None)?;
            println!("closed {} connection(s) of sandbox {name}", v["closed"].as_u64().unwrap_or(0));
            Ok(())
        }
        ["attach", sb, volume] => {
            a.only(&["--at", "--read-only", "--subpath", "--json"])?;
            let at = a.flag("--at").ok_or("attach needs --at /mount/path")?;
            let body =
                json!({"volume": volume, "path": at, "read_only": a.has("--read-only"), "subpath": a.flag("--subpath").unwrap_or("/")});
            let v = call(&a, "POST", &format!("/v1/sandboxes/{}/attachments", encode(sb)), Some(body))?;
            if v["state"] == "failed" {
                if a.has("--json") {
                    print_json(&v);
                }
                return Err(format!("attached {volume} at {at} in {sb}, but mounting it failed: {}", v["reason"].as_str().unwrap_or("")));
            }
            if a.has("--json") {
                print_json(&v);
            } else {
                println!(
                    "attached {volume}{} at {at} in {sb} ({}, {})",
                    if v["subpath"] == "/" { String::new() } else { format!(":{}", v["subpath"].as_str().unwrap_or("")) },
                    if a.has("--read-only") { "read-only" } else { "read-write" },
                    v["state"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        ["detach", sb] => {
            a.only(&["--at", "--force"])?;
            let at = a.flag("--at").ok_or("detach needs --at /mount/path")?;
            let force = if a.has("--force") { "&force=true" } else { "" };
            call(&a, "DELETE", &format!("/v1/sandboxes/{}/attachments?path={}{force}", encode(sb), encode(at)), None)?;
            println!("detached {at} from {sb}");
            Ok(())
        }
        ["sandbox", verb @ ("hibernate" | "resume"), sb] => {
            a.only(&["--json"])?;
            let v = call(&a, "POST", &format!("/v1/sandboxes/{}/{verb}", encode(sb)), None)?;
            print_attachments(&a, &v);
            Ok(())
        }
        ["sandbox", "run", sb] => {
            a.only(&["--volume", "--memory", "--json"])?;
            let mut volumes = Vec::new();
            for spec in a.flag_all("--volume") {
                volumes.push(parse_volume_spec(spec)?);
            }
            let body = json!({"volumes": volumes, "memory": a.flag("--memory").unwrap_or("256M")});
            let v = call(&a, "POST", &format!("/v1/sandboxes/{}/run", encode(sb)), Some(body))?;
            print_attachments(&a, &v);
            let failed: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter(|at| at["state"] == "failed")
                .map(|at| format!("{}: {}", at["path"].as_str().unwrap_or(""), at["reason"].as_str().unwrap_or("")))
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(format!("sandbox {sb} is running, but some volumes are not mounted: {}", failed.join("; ")))
            }
        }
        ["sandbox", "stop", sb] => {
            a.only(&[])?;
            call(&a, "POST", &format!("/v1/sandboxes/{}/stop", encode(sb)), None)?;
            println!("stopped sandbox {sb}");
            Ok(())
        }
        ["sandbox", "fork", sb, new] => {
            a.only(&["--json"])?;
            let v = call(&a, "POST", &format!("/v1/sandboxes/{}/fork", encode(sb)), Some(json!({"name": new})))?;
            if a.has("--json") {
                print_json(&v);
            } else {
                println!("{}", v["guest_socket"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        _ => Err(format!("unknown command: {}\n\n{USAGE}", cmd.join(" "))),
    }
}

/// `VOLUME:/mnt/path[:ro][:subpath=/dir]` → the JSON of one boot attachment.
fn parse_volume_spec(spec: &str) -> Result<Value, String> {
    let mut parts = spec.split(':');
    let volume = parts.next().filter(|v| !v.is_empty());
    let path = parts.next().filter(|p| p.starts_with('/'));
    let (Some(volume), Some(path)) = (volume, path) else {
        return Err(format!("invalid --volume {spec:?}: expected VOLUME:/mnt/path[:ro][:subpath=/dir]"));
    };
    let mut read_only = false;
    let mut subpath = "/".to_string();
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ if opt.starts_with("subpath=") => subpath = opt["subpath=".len()..].to_string(),
            _ => return Err(format!("invalid --volume {spec:?}: unknown option {opt:?} (ro, rw, subpath=/dir)")),
        }
    }
    Ok(json!({"volume": volume, "path": path, "read_only": read_only, "subpath": subpath}))
}

/// `volumefs sandbox exec SB -- CMD ARGS…`: the command's output, and its exit code as ours.
fn exec(head: &[String], cmd: &[String]) -> Result<i32, String> {
    use std::io::{Read, Write};
    let a = parse_args(head)?;
    a.only(&["--timeout", "--stdin"])?;
    let sb = match a.pos.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["sandbox", "exec", sb] => sb.to_string(),
        _ => return Err(format!("expected: volumefs sandbox exec SB -- CMD [ARGS...]\n\n{USAGE}")),
    };
    if cmd.is_empty() {
        return Err("sandbox exec needs a command after --".into());
    }
    let mut stdin = String::new();
    if a.has("--stdin") {
        std::io::stdin().read_to_string(&mut stdin).map_err(|e| format!("cannot read stdin: {e}"))?;
    }
    let v = call(&a, "POST", &format!("/v1/sandboxes/{}/exec", encode(&sb)), Some(json!({"argv": cmd, "stdin": stdin})))?;
    print!("{}", v["stdout"].as_str().unwrap_or(""));
    eprint!("{}", v["stderr"].as_str().unwrap_or(""));
    let _ = std::io::stdout().flush();
    Ok(v["code"].as_i64().unwrap_or(1) as i32)
}

fn print_attachments(a: &Args, v: &Value) {
    if a.has("--json") {
        return print_json(v);
    }
    println!("{:<20} {:<16} {:<4} {:<16} {:<9} REASON", "PATH", "VOLUME", "MODE", "SUBPATH", "STATE");
    for at in v.as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<16} {:<4} {:<16} {:<9} {}",
            at["path"].as_str().unwrap_or(""),
            at["volume"].as_str().unwrap_or(""),
            if at["read_only"].as_bool().unwrap_or(false) { "ro" } else { "rw" },
            at["subpath"].as_str().unwrap_or(""),
            at["state"].as_str().unwrap_or(""),
            at["reason"].as_str().unwrap_or("")
        );
    }
}

fn serve(a: &Args) -> Result<(), String> {
    a.only(&["--data", "--http", "--lease-ttl", "--images", "--log-format"])?;
    let format: crate::logging::Format = a.flag("--log-format").unwrap_or("text").parse()?;
    crate::logging::init(format, None)?;
    let data = PathBuf::from(a.flag("--data").unwrap_or("volumefs-data"));
    let http = a.flag("--http").unwrap_or("127.0.0.1:7070");
    let ttl: u64 = a.flag("--lease-ttl").unwrap_or("30").parse().map_err(|_| "--lease-ttl takes whole seconds")?;
    let server = crate::server::Server::open(crate::server::Config {
        data: data.clone(),
        lease_ttl: std::time::Duration::from_secs(ttl),
        images: a.flag("--images").map(PathBuf::from),
    })
    .map_err(|e| e.to_string())?;
    let rt = crate::server::runtime();
    let listener = rt.block_on(tokio::net::TcpListener::bind(http)).map_err(|e| format!("cannot listen on {http}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Written after binding, so a script can wait for this file and then talk to the server.
    std::fs::write(data.join("http-addr"), addr.to_string())
        .map_err(|e| format!("cannot write {}: {e}", data.join("http-addr").display()))?;
    tracing::info!(api = %format!("http://{addr}"), token = %data.join("api-token").display(), "HTTP API listening");
    rt.block_on(crate::server::http::run(server, listener)).map_err(|e| format!("HTTP API: {e}"))?;
    Ok(())
}
