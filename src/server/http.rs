//! The HTTP API: JSON over HTTP/1.1, every request authenticated with `Authorization: Bearer
//! <token>` (the token is `DATA/api-token`). Handlers are thin: they parse, call the server or
//! engine, and turn an [`FsError`] into a status code in one place ([`status_of`]).
//!
//! Routes (all under `/v1`):
//! - `GET /volumes`, `POST /volumes {name, cap?}`, `GET /volumes/{name}`,
//!   `DELETE /volumes/{name}?force=true`
//! - `GET /sandboxes`, `POST /sandboxes {name}`, `GET /sandboxes/{name}`,
//!   `DELETE /sandboxes/{name}`
//! - `GET /sandboxes/{name}/attachments`,
//!   `POST /sandboxes/{name}/attachments {volume, path, read_only?, subpath?}`,
//!   `DELETE /sandboxes/{name}/attachments?path=/mnt/x`
//! - `GET /volumes/{name}/files/{path}` (raw bytes), `PUT /volumes/{name}/files/{path}` (raw
//!   bytes; atomic replace, parents created), `POST /volumes/{name}/files/{path}?append` (raw
//!   bytes added at the end of file in one transaction; the file is created if missing)
//! - `POST /sandboxes/{name}/reset-connections`, `POST /sandboxes/{name}/hibernate`,
//!   `POST /sandboxes/{name}/resume`, `POST /sandboxes/{name}/fork {name}`,
//!   `POST /sandboxes/{name}/exec {argv, stdin?, timeout_ms?}`

use super::{AttachmentInfo, Server};
use crate::engine::{VolumeInfo, DEFAULT_CAP};
use crate::fs::FsError;
use serde_json::{json, Value};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest JSON request body accepted.
const MAX_BODY: u64 = 1 << 20;
/// Largest file body of the simple whole-file API.
const MAX_FILE_BODY: u64 = 256 << 20;

pub struct HttpError {
    pub status: u16,
    pub msg: String,
    pub errno: &'static str,
}

impl From<FsError> for HttpError {
    fn from(e: FsError) -> HttpError {
        HttpError { status: status_of(e.errno), errno: e.errno_name(), msg: e.msg }
    }
}

fn bad_request(msg: impl Into<String>) -> HttpError {
    HttpError { status: 400, msg: msg.into(), errno: "EINVAL" }
}

/// The one place an errno becomes an HTTP status.
pub fn status_of(errno: i32) -> u16 {
    match errno {
        libc::ENOENT => 404,
        libc::EEXIST | libc::EBUSY | libc::ENOTEMPTY => 409,
        libc::EINVAL | libc::ENAMETOOLONG | libc::ENOTDIR | libc::EISDIR | libc::ELOOP => 400,
        libc::EACCES | libc::EPERM | libc::EROFS => 403,
        libc::EDQUOT | libc::ENOSPC | libc::EFBIG => 507,
        libc::EHOSTUNREACH | libc::ETIMEDOUT => 502,
        _ => 500,
    }
}

pub fn volume_json(v: &VolumeInfo) -> Value {
    json!({
        "name": v.name,
        "cap": v.cap,
        "used": v.used,
        "free": v.cap.saturating_sub(v.used),
        "inodes": v.inodes,
        "created": v.created.sec,
    })
}

pub fn attachment_json(a: &AttachmentInfo) -> Value {
    json!({
        "id": a.row.id,
        "sandbox": a.row.sandbox,
        "volume": a.volume_name,
        "path": a.row.path,
        "read_only": a.row.read_only,
        "subpath": a.row.subpath,
        "state": a.row.state.name(),
        "reason": a.row.reason,
    })
}

/// Serves the API on `listener` with a few threads; returns the bound address.
pub fn serve(server: Arc<Server>, addr: &str) -> Result<(SocketAddr, Vec<std::thread::JoinHandle<()>>), String> {
    let http = tiny_http::Server::http(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = http.server_addr().to_ip().ok_or_else(|| format!("{addr} is not an IP address"))?;
    let http = Arc::new(http);
    let mut threads = Vec::new();
    for i in 0..4 {
        let (http, server) = (http.clone(), server.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(req) = http.recv() {
                        handle(&server, req);
                    }
                })
                .map_err(|e| e.to_string())?,
        );
    }
    Ok((bound, threads))
}

fn respond(req: tiny_http::Request, status: u16, body: &Value) {
    let header = tiny_http::Header::from_bytes("Content-Type", "application/json").expect("static header");
    let text = format!("{body}\n");
    let _ = req.respond(tiny_http::Response::from_string(text).with_status_code(status).with_header(header));
}

fn authorized(server: &Server, req: &tiny_http::Request) -> bool {
    let expected = format!("Bearer {}", server.token);
    req.headers().iter().any(|h| {
        h.field.equiv("Authorization") && {
            let got = h.value.as_bytes();
            // Constant-time comparison: the token must not leak through timing.
            got.len() == expected.len() && got.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        }
    })
}

fn handle(server: &Arc<Server>, mut req: tiny_http::Request) {
    if !authorized(server, &req) {
        return respond(
            req,
            401,
            &json!({"error": "missing or wrong API token (Authorization: Bearer <DATA/api-token>)", "errno": "EACCES"}),
        );
    }
    let method = req.method().as_str().to_string();
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let segs: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let is_file = segs.len() >= 5 && segs[..2] == ["v1", "volumes"] && segs[3] == "files";
    let limit = if is_file { MAX_FILE_BODY } else { MAX_BODY };
    let mut body = Vec::new();
    if let Err(e) = req.as_reader().take(limit + 1).read_to_end(&mut body) {
        return respond(req, 400, &json!({"error": format!("cannot read request body: {e}"), "errno": "EIO"}));
    }
    if is_file {
        let path = segs[4..].join("/");
        let result = match method.as_str() {
            "GET" => server.read_file(segs[2], &path).map(Some),
            "PUT" | "POST" if body.len() as u64 > limit => {
                Err(FsError::new(libc::EFBIG, format!("file bodies are limited to {limit} bytes")))
            }
            "PUT" => server.write_file(segs[2], &path, &body).map(|_| None),
            "POST" if query_param(query, "append").is_some() => server.append_file(segs[2], &path, &body).map(|_| None),
            _ => Err(FsError::new(libc::EINVAL, format!("{method} is not supported on files (GET, PUT, POST ?append)"))),
        };
        return match result {
            Ok(Some(bytes)) => {
                let header = tiny_http::Header::from_bytes("Content-Type", "application/octet-stream").expect("static header");
                let _ = req.respond(tiny_http::Response::from_data(bytes).with_header(header));
            }
            Ok(None) => respond(req, 200, &json!({"written": path, "size": body.len()})),
            Err(e) => {
                let e = HttpError::from(e);
                respond(req, e.status, &json!({"error": e.msg, "errno": e.errno}))
            }
        };
    }
    let result =
        if body.len() as u64 > MAX_BODY { Err(bad_request("request body too large")) } else { route(server, &method, &segs, query, &body) };
    match result {
        Ok((status, v)) => respond(req, status, &v),
        Err(e) => respond(req, e.status, &json!({"error": e.msg, "errno": e.errno})),
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| *k == key).map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_body(body: &[u8]) -> Result<Value, HttpError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, HttpError> {
    v.get(key).and_then(Value::as_str).ok_or_else(|| bad_request(format!("missing string field `{key}`")))
}

fn truthy(v: Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "yes" | ""))
}

type Routed = Result<(u16, Value), HttpError>;

fn route(server: &Arc<Server>, method: &str, segs: &[&str], query: &str, body: &[u8]) -> Routed {
    let e = &server.engine;
    match (method, segs) {
        ("GET", ["v1", "volumes"]) => Ok((200, Value::Array(e.list_volumes()?.iter().map(volume_json).collect()))),
        ("POST", ["v1", "volumes"]) => {
            let b = json_body(body)?;
            let name = str_field(&b, "name")?;
            let cap = match b.get("cap") {
                None | Some(Value::Null) => DEFAULT_CAP,
                Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad_request("`cap` must be a positive number of bytes"))?,
                Some(Value::String(s)) => crate::engine::parse_size(s).map_err(bad_request)?,
                Some(_) => return Err(bad_request("`cap` must be a number of bytes or a size like \"2GiB\"")),
            };
            Ok((201, volume_json(&e.create_volume(name, cap)?)))
        }
        ("GET", ["v1", "volumes", name]) => Ok((200, volume_json(&e.volume(name)?))),
        ("DELETE", ["v1", "volumes", name]) => {
            server.delete_volume(name, truthy(query_param(query, "force")))?;
            Ok((200, json!({"deleted": name})))
        }
        ("GET", ["v1", "sandboxes"]) => {
            let list = server.list_sandboxes()?;
            Ok((200, Value::Array(list.into_iter().map(|(n, s)| json!({"name": n, "guest_socket": s})).collect())))
        }
        ("POST", ["v1", "sandboxes"]) => {
            let b = json_body(body)?;
            let rt = server.create_sandbox(str_field(&b, "name")?)?;
            Ok((201, json!({"name": rt.name, "guest_socket": rt.socket})))
        }
        ("GET", ["v1", "sandboxes", name]) => {
            let rt = server.sandbox_rt(name)?;
            let attachments: Vec<Value> = server.attachments(Some(name))?.iter().map(attachment_json).collect();
            Ok((200, json!({"name": rt.name, "guest_socket": rt.socket, "attachments": attachments})))
        }
        ("DELETE", ["v1", "sandboxes", name]) => {
            server.delete_sandbox(name)?;
            Ok((200, json!({"deleted": name})))
        }
        ("GET", ["v1", "sandboxes", name, "attachments"]) => {
            Ok((200, Value::Array(server.attachments(Some(name))?.iter().map(attachment_json).collect())))
        }
        ("POST", ["v1", "sandboxes", name, "attachments"]) => {
            let b = json_body(body)?;
            let volume = str_field(&b, "volume")?;
            let path = str_field(&b, "path")?;
            let read_only = b.get("read_only").and_then(Value::as_bool).unwrap_or(false);
            let subpath = b.get("subpath").and_then(Value::as_str).unwrap_or("/");
            Ok((201, attachment_json(&server.attach(name, volume, path, read_only, subpath)?)))
        }
        ("DELETE", ["v1", "sandboxes", name, "attachments"]) => {
            let path = query_param(query, "path").ok_or_else(|| bad_request("missing `path` query parameter"))?;
            server.detach(name, &path, truthy(query_param(query, "force")))?;
            Ok((200, json!({"detached": path})))
        }
        ("POST", ["v1", "sandboxes", name, "run"]) => {
            let b = json_body(body)?;
            let mut volumes = Vec::new();
            for v in b.get("volumes").and_then(Value::as_array).into_iter().flatten() {
                volumes.push((
                    str_field(v, "volume")?.to_string(),
                    str_field(v, "path")?.to_string(),
                    v.get("read_only").and_then(Value::as_bool).unwrap_or(false),
                    v.get("subpath").and_then(Value::as_str).unwrap_or("/").to_string(),
                ));
            }
            let memory = b.get("memory").and_then(Value::as_str).unwrap_or("256M");
            let attachments = server.run_sandbox(name, &volumes, memory)?;
            Ok((200, Value::Array(attachments.iter().map(attachment_json).collect())))
        }
        ("POST", ["v1", "sandboxes", name, "stop"]) => {
            server.stop_sandbox(name)?;
            Ok((200, json!({"stopped": name})))
        }
        ("POST", ["v1", "sandboxes", name, "hibernate"]) => {
            server.hibernate(name)?;
            Ok((200, Value::Array(server.attachments(Some(name))?.iter().map(attachment_json).collect())))
        }
        ("POST", ["v1", "sandboxes", name, "resume"]) => {
            server.resume(name)?;
            Ok((200, Value::Array(server.attachments(Some(name))?.iter().map(attachment_json).collect())))
        }
        ("POST", ["v1", "sandboxes", name, "fork"]) => {
            let b = json_body(body)?;
            let rt = server.fork_sandbox(name, str_field(&b, "name")?)?;
            let attachments: Vec<Value> = server.attachments(Some(&rt.name))?.iter().map(attachment_json).collect();
            Ok((201, json!({"name": rt.name, "guest_socket": rt.socket, "attachments": attachments})))
        }
        ("POST", ["v1", "sandboxes", name, "exec"]) => {
            let b = json_body(body)?;
            let argv: Vec<String> = b
                .get("argv")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .filter(|a: &Vec<String>| !a.is_empty())
                .ok_or_else(|| bad_request("`argv` must be a non-empty array of strings"))?;
            let stdin = b.get("stdin").and_then(Value::as_str).unwrap_or("").as_bytes().to_vec();
            let timeout_ms = b.get("timeout_ms").and_then(Value::as_u64).unwrap_or(600_000);
            let cmd = crate::proto::AgentCommand::Exec { argv, stdin, timeout_ms };
            match server.agent_command(name, cmd, std::time::Duration::from_millis(timeout_ms + 10_000))? {
                crate::proto::AgentReply::Exec { code, stdout, stderr } => {
                    Ok((200, json!({"code": code, "stdout": String::from_utf8_lossy(&stdout), "stderr": String::from_utf8_lossy(&stderr)})))
                }
                other => Err(HttpError { status: 502, msg: format!("unexpected answer from the agent: {other:?}"), errno: "EIO" }),
            }
        }
        ("POST", ["v1", "sandboxes", name, "reset-connections"]) => {
            let n = server.sandbox_rt(name)?.reset_connections();
            Ok((200, json!({"closed": n})))
        }
        _ => Err(HttpError { status: 404, msg: format!("no route for {method} /{}", segs.join("/")), errno: "ENOENT" }),
    }
}
