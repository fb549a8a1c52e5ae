//! A small HTTP/1.1 client for the CLI: one request per connection, JSON in and out. The API
//! is served on loopback or a private network, so plain HTTP with a bearer token is what it
//! speaks; put a TLS proxy in front for anything else.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct Client {
    host: String,
    token: String,
}

pub struct ApiError {
    pub status: u16,
    pub msg: String,
}

impl Client {
    /// `url` is `http://HOST:PORT` (a trailing `/` is fine).
    pub fn new(url: &str, token: &str) -> Result<Client, String> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("server URL {url:?} must start with http://"))?
            .trim_end_matches('/')
            .to_string();
        if host.is_empty() || host.contains('/') {
            return Err(format!("server URL {url:?} must be http://HOST:PORT"));
        }
        Ok(Client { host, token: token.to_string() })
    }

    /// A JSON request; the JSON answer, or the server's error message.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, raw) = self.call_raw(method, path, "application/json", body.as_bytes())?;
        let v: Value = serde_json::from_slice(&raw).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            let msg =
                v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| v.to_string());
            Err(ApiError { status, msg })
        }
    }

    /// Raw bytes both ways (file contents); an error status becomes the server's message.
    pub fn call_bytes(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let (status, raw) = self.call_raw(method, path, "application/octet-stream", body)?;
        if (200..300).contains(&status) {
            return Ok(raw);
        }
        let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        let msg = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&raw).into_owned());
        Err(ApiError { status, msg })
    }

    fn call_raw(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Result<(u16, Vec<u8>), ApiError> {
        let net = |e: std::io::Error| ApiError { status: 0, msg: format!("cannot reach the server at http://{}: {e}", self.host) };
        let mut s = TcpStream::connect(&self.host).map_err(net)?;
        s.set_read_timeout(Some(Duration::from_secs(600))).map_err(net)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.host,
            self.token,
            body.len()
        );
        s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).map_err(net)?;
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        r.read_line(&mut status_line).map_err(net)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ApiError { status: 0, msg: format!("malformed response from the server: {status_line:?}") })?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).map_err(net)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut raw = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).map_err(net)?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).map_err(net)?;
                raw.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            raw.resize(n, 0);
            r.read_exact(&mut raw).map_err(net)?;
        } else {
            r.read_to_end(&mut raw).map_err(net)?;
        }
        Ok((status, raw))
    }
}

/// Encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
