//! The `volumefs` command line: the server itself (`volumefs server`) and a client of its HTTP
//! API for everything else. The grammar and help text are in [`args`] (clap); output is for
//! people by default and JSON with `--json`; errors go to stderr with a non-zero exit code:
//! 2 for a command line that does not parse, 1 for a command that failed (`volume exists` has
//! its own: 0 present, 1 absent, 2 error). The file verbs of `volume` are in [`files`], the
//! HTTP client in [`client`], progress bars in [`progress`] and local trees as tar streams in
//! [`tree`].

pub mod args;
pub mod client;
pub mod fields;
pub mod files;
pub mod progress;
pub mod tree;
mod tus;

use args::{
    AttachArgs, Cli, Command, DetachArgs, ExecArgs, FileCommand, FileVerb, Quiet, RunArgs, SandboxCommand, ServerArgs, TenantCommand,
    VolumeCommand,
};
use clap::{CommandFactory, Parser};
use client::{query, segment as encode, Client};
use serde_json::{json, Value};

/// Runs the CLI on `argv` (without the program name); returns the process exit code.
pub fn main(argv: Vec<String>) -> i32 {
    let cli = match Cli::try_parse_from(std::iter::once("volumefs".to_string()).chain(argv)) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version (exit 0) as well as usage errors (exit 2).
            let _ = e.print();
            return e.exit_code();
        }
    };
    if !matches!(cli.command, Command::Server(_)) {
        // A client writing to a closed pipe (`volumefs volume ls v | head`) stops quietly, as
        // other command line tools do, instead of failing on its next print. (Sockets are
        // written with MSG_NOSIGNAL: a dropped connection is still an error, never a signal.)
        // SAFETY: setting a signal's disposition to its default has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("volumefs: {e}");
            1
        }
    }
}

/// Where the API is and the token for it; a client is made only by commands that call it.
struct Api {
    server: String,
    token: Option<String>,
}

impl Api {
    fn client(&self) -> Result<Client, String> {
        let token =
            self.token.as_deref().ok_or("no API token: pass --token or set VOLUMEFS_TOKEN (the server writes it to DATA/api-token)")?;
        Client::new(&self.server, token.trim())
    }

    fn server_url(&self) -> String {
        self.server.clone()
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.client()?.call(method, path, body.as_ref()).map_err(|e| e.msg)
    }
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

/// Runs a parsed command; the exit code on success (`sandbox exec` passes the command's on).
fn run(cli: Cli) -> Result<i32, String> {
    let api = Api { server: cli.server, token: cli.token };
    match cli.command {
        Command::Server(a) => serve(a)?,
        Command::Volume(c) => return volume(&api, c),
        Command::File(c) => return file(&api, c),
        Command::Sandbox(c) => return sandbox(&api, c),
        Command::Attach(a) => attach(&api, a)?,
        Command::Tenant(t) => tenant(&api, t)?,
        Command::Detach(a) => detach(&api, a)?,
        Command::Gc { grace, json } => {
            let r = api.call("POST", &format!("/v1/gc?grace={grace}"), None)?;
            if json {
                print_json(&r);
            } else {
                let n = |k: &str| r[k].as_u64().unwrap_or(0);
                println!(
                    "{} blocks ({}), {} referenced, {} too young to judge; deleted {} ({})",
                    n("blocks"),
                    human(n("bytes")),
                    n("referenced"),
                    n("young"),
                    n("deleted"),
                    human(n("deleted_bytes"))
                );
            }
        }
        Command::Completions { shell } => clap_complete::generate(shell, &mut Cli::command(), "volumefs", &mut std::io::stdout()),
    }
    Ok(0)
}

/// A `volume` command; its exit code.
fn volume(api: &Api, cmd: VolumeCommand) -> Result<i32, String> {
    match cmd {
        VolumeCommand::Create { name, cap, json } => {
            let mut body = json!({"name": name});
            if let Some(cap) = cap {
                body["cap"] = json!(cap);
            }
            let v = api.call("POST", "/v1/volumes", Some(body))?;
            if json {
                print_json(&v);
            } else {
                println!("created volume {name} ({})", human(v["cap_bytes"].as_u64().unwrap_or(0)));
            }
        }
        VolumeCommand::List { json, fields } => {
            let query = fields.fields.as_ref().map(|f| format!("?fields={}", f.query())).unwrap_or_default();
            let v = api.call("GET", &format!("/v1/volumes{query}"), None)?;
            let vols = v.as_array().map(Vec::as_slice).unwrap_or_default();
            match (&fields.fields, json) {
                (None, true) => print_json(&v),
                (Some(f), true) => println!("{}", fields::list_json(vols, &f.names())),
                (None, false) => print!("{}", fields::table(vols, &fields::LIST_DEFAULT)),
                (Some(f), false) => print!("{}", fields::table(vols, &f.names())),
            }
        }
        VolumeCommand::Inspect { name, json: _, fields } => {
            // Inspect prints JSON with or without --json.
            let query = fields.fields.as_ref().map(|f| format!("?fields={}", f.query())).unwrap_or_default();
            let v = api.call("GET", &format!("/v1/volumes/{}{query}", encode(&name)), None)?;
            match &fields.fields {
                None => print_json(&v),
                Some(f) => println!("{}", fields::object_json(&fields::select(&v, &f.names()), "")),
            }
        }
        VolumeCommand::Clone { source, name, cap, json } => {
            let mut body = json!({"name": name});
            if let Some(cap) = cap {
                body["cap"] = json!(cap);
            }
            let v = api.call("POST", &format!("/v1/volumes/{}/clone", encode(&source)), Some(body))?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "cloned volume {source} as {name} ({}, {} used)",
                    human(v["cap_bytes"].as_u64().unwrap_or(0)),
                    human(v["used_bytes"].as_u64().unwrap_or(0))
                );
            }
        }
        VolumeCommand::Fsck { name, json } => {
            let r = api.call("GET", &format!("/v1/volumes/{}/fsck", encode(&name)), None)?;
            let problems = r["problems"].as_array().map(Vec::len).unwrap_or(0);
            if json {
                print_json(&r);
            } else {
                let n = |k: &str| r[k].as_u64().unwrap_or(0);
                for p in r["problems"].as_array().into_iter().flatten() {
                    println!("problem: {}", p.as_str().unwrap_or_default());
                }
                println!(
                    "volume {name}: {} inodes, {} names, {} blocks, {} orphans: {}",
                    n("inodes"),
                    n("names"),
                    n("blocks"),
                    n("orphans"),
                    if problems == 0 { "clean".to_string() } else { format!("{problems} problem{}", if problems == 1 { "" } else { "s" }) }
                );
            }
            return Ok(if problems == 0 { 0 } else { 1 });
        }
        VolumeCommand::Delete { name, force } => {
            let q = if force { "?force=true" } else { "" };
            api.call("DELETE", &format!("/v1/volumes/{}{q}", encode(&name)), None)?;
            println!("deleted volume {name}");
        }
        VolumeCommand::Files(verb) => return files::run(api, verb),
    }
    Ok(0)
}

/// `file read|write`, the old names: `volume read`, and `volume write -p` without its report.
fn file(api: &Api, cmd: FileCommand) -> Result<i32, String> {
    match cmd {
        FileCommand::Read { volume, path } => files::run(api, FileVerb::Read { volume, path, range: None, quiet: Quiet { quiet: true } }),
        FileCommand::Write { volume, path, append } => {
            files::write_quietly(api, &volume, &path, append)?;
            Ok(0)
        }
    }
}

fn tenant(api: &Api, cmd: TenantCommand) -> Result<(), String> {
    match cmd {
        TenantCommand::Create { name, default_cap, json } => {
            let mut body = json!({"name": name});
            if let Some(cap) = default_cap {
                body["default_cap"] = json!(cap);
            }
            let v = api.call("POST", "/v1/tenants", Some(body))?;
            if json {
                print_json(&v);
            } else {
                // The token alone on stdout, so that `T=$(volumefs tenant create acme)` works.
                eprintln!(
                    "created tenant {name} (volumes get {}); its token, shown once:",
                    human(v["default_cap_bytes"].as_u64().unwrap_or(0))
                );
                println!("{}", v["token"].as_str().unwrap_or(""));
            }
        }
        TenantCommand::List { json } => {
            let v = api.call("GET", "/v1/tenants", None)?;
            if json {
                print_json(&v);
                return Ok(());
            }
            println!("{:<24} {:>12}", "NAME", "DEFAULT CAP");
            for t in v.as_array().into_iter().flatten() {
                println!("{:<24} {:>12}", t["name"].as_str().unwrap_or(""), human(t["default_cap_bytes"].as_u64().unwrap_or(0)));
            }
        }
    }
    Ok(())
}

/// A `sandbox` command; the exit code of `sandbox exec`'s command, or 0.
fn sandbox(api: &Api, cmd: SandboxCommand) -> Result<i32, String> {
    let at = |sb: &str, rest: &str| format!("/v1/sandboxes/{}{rest}", encode(sb));
    match cmd {
        SandboxCommand::Create { sb, json } => {
            let v = api.call("POST", "/v1/sandboxes", Some(json!({"name": sb})))?;
            print_socket(&v, json);
        }
        SandboxCommand::List { json } => {
            let v = api.call("GET", "/v1/sandboxes", None)?;
            if json {
                print_json(&v);
            } else {
                for sb in v.as_array().into_iter().flatten() {
                    println!("{:<24} {}", sb["name"].as_str().unwrap_or(""), sb["guest_socket"].as_str().unwrap_or(""));
                }
            }
        }
        SandboxCommand::Delete { sb } => {
            api.call("DELETE", &at(&sb, ""), None)?;
            println!("deleted sandbox {sb}");
        }
        SandboxCommand::Attachments { sb, json } => {
            let v = api.call("GET", &at(&sb, "/attachments"), None)?;
            print_attachments(&v, json);
        }
        SandboxCommand::ResetConnections { sb } => {
            let v = api.call("POST", &at(&sb, "/reset-connections"), None)?;
            println!("closed {} connection(s) of sandbox {sb}", v["closed"].as_u64().unwrap_or(0));
        }
        SandboxCommand::Hibernate { sb, json } => {
            let v = api.call("POST", &at(&sb, "/hibernate"), None)?;
            print_attachments(&v, json);
        }
        SandboxCommand::Resume { sb, json } => {
            let v = api.call("POST", &at(&sb, "/resume"), None)?;
            print_attachments(&v, json);
        }
        SandboxCommand::Fork { sb, new, json } => {
            let v = api.call("POST", &at(&sb, "/fork"), Some(json!({"name": new})))?;
            print_socket(&v, json);
        }
        SandboxCommand::Run(a) => run_sandbox(api, a)?,
        SandboxCommand::Stop { sb } => {
            api.call("POST", &at(&sb, "/stop"), None)?;
            println!("stopped sandbox {sb}");
        }
        SandboxCommand::Exec(a) => return exec(api, a),
    }
    Ok(0)
}

/// A new sandbox: its guest socket, or all of it with `--json`.
fn print_socket(v: &Value, json: bool) {
    if json {
        print_json(v);
    } else {
        println!("{}", v["guest_socket"].as_str().unwrap_or(""));
    }
}

fn run_sandbox(api: &Api, a: RunArgs) -> Result<(), String> {
    let volumes: Vec<Value> = a.volumes.into_iter().map(|s| s.0).collect();
    let body = json!({"volumes": volumes, "memory": a.memory});
    let v = api.call("POST", &format!("/v1/sandboxes/{}/run", encode(&a.sb)), Some(body))?;
    print_attachments(&v, a.json);
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
        Err(format!("sandbox {} is running, but some volumes are not mounted: {}", a.sb, failed.join("; ")))
    }
}

/// `volumefs sandbox exec SB -- CMD ARGS…`: the command's output, and its exit code as ours.
fn exec(api: &Api, a: ExecArgs) -> Result<i32, String> {
    use std::io::{Read, Write};
    let mut stdin = String::new();
    if a.stdin {
        std::io::stdin().read_to_string(&mut stdin).map_err(|e| format!("cannot read stdin: {e}"))?;
    }
    let v = api.call("POST", &format!("/v1/sandboxes/{}/exec", encode(&a.sb)), Some(json!({"argv": a.cmd, "stdin": stdin})))?;
    print!("{}", v["stdout"].as_str().unwrap_or(""));
    eprint!("{}", v["stderr"].as_str().unwrap_or(""));
    let _ = std::io::stdout().flush();
    Ok(v["code"].as_i64().unwrap_or(1) as i32)
}

fn attach(api: &Api, a: AttachArgs) -> Result<(), String> {
    let AttachArgs { sb, volume, at, read_only, subpath, json } = a;
    let body = json!({"volume": volume, "path": at, "read_only": read_only, "subpath": subpath});
    let v = api.call("POST", &format!("/v1/sandboxes/{}/attachments", encode(&sb)), Some(body))?;
    if v["state"] == "failed" {
        if json {
            print_json(&v);
        }
        return Err(format!("attached {volume} at {at} in {sb}, but mounting it failed: {}", v["reason"].as_str().unwrap_or("")));
    }
    if json {
        print_json(&v);
    } else {
        println!(
            "attached {volume}{} at {at} in {sb} ({}, {})",
            if v["subpath"] == "/" { String::new() } else { format!(":{}", v["subpath"].as_str().unwrap_or("")) },
            if read_only { "read-only" } else { "read-write" },
            v["state"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn detach(api: &Api, a: DetachArgs) -> Result<(), String> {
    let force = if a.force { "&force=true" } else { "" };
    api.call("DELETE", &format!("/v1/sandboxes/{}/attachments?path={}{force}", encode(&a.sb), query(&a.at)), None)?;
    println!("detached {} from {}", a.at, a.sb);
    Ok(())
}

fn print_attachments(v: &Value, json: bool) {
    if json {
        return print_json(v);
    }
    let rows: Vec<[&str; 6]> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|at| {
            [
                at["path"].as_str().unwrap_or(""),
                at["volume"].as_str().unwrap_or(""),
                if at["read_only"].as_bool().unwrap_or(false) { "ro" } else { "rw" },
                at["subpath"].as_str().unwrap_or(""),
                at["state"].as_str().unwrap_or(""),
                at["reason"].as_str().unwrap_or(""),
            ]
        })
        .collect();
    // Columns as wide as their widest cell, so long paths do not push the others out of line.
    let header = ["PATH", "VOLUME", "MODE", "SUBPATH", "STATE", "REASON"];
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r.iter().zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn serve(a: ServerArgs) -> Result<(), String> {
    crate::logging::init(a.log_format.into(), None)?;
    let data = a.data;
    let server = crate::server::Server::open(crate::server::Config {
        data: data.clone(),
        meta: a.meta,
        blocks: a.blocks,
        block_cache: a.block_cache,
        lease_ttl: std::time::Duration::from_secs(a.lease_ttl),
        images: a.images,
        upload_expiry: std::time::Duration::from_secs(a.upload_expiry),
    })
    .map_err(|e| e.to_string())?;
    let rt = crate::server::runtime();
    let listener = rt.block_on(tokio::net::TcpListener::bind(&a.http)).map_err(|e| format!("cannot listen on {}: {e}", a.http))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Written after binding, so a script can wait for this file and then talk to the server.
    std::fs::write(data.join("http-addr"), addr.to_string())
        .map_err(|e| format!("cannot write {}: {e}", data.join("http-addr").display()))?;
    tracing::info!(api = %format!("http://{addr}"), token = %data.join("api-token").display(), "HTTP API listening");
    let engine_of = server.clone();
    rt.block_on(crate::server::http::run(server, listener)).map_err(|e| format!("HTTP API: {e}"))?;
    // Writes held back for guests go up before the process ends.
    engine_of.engine.settle_all().map_err(|e| format!("flushing held-back writes: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests;
