//! The CLI's HTTP client, on ureq (sync). Bodies stream both ways: an upload is read from its
//! source as it is sent and a download is handed to its sink as it arrives, so neither is ever
//! whole in memory. The API is served on loopback or a private network, so plain HTTP with a
//! bearer token is what it speaks (ureq is built without TLS); put a TLS proxy in front for
//! anything else.
//!
//! Errors from the server are JSON `{code, message, errno}`; [`ApiError`] carries the code and
//! the message, which is what the CLI prints.

use serde_json::Value;
use std::io::{self, Read};
use std::time::Duration;
use ureq::http;

pub struct Client {
    /// `http://HOST:PORT`, without a trailing slash.
    base: String,
    auth: String,
    agent: ureq::Agent,
}

#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status, or 0 when the server was not reached or the exchange broke off.
    pub status: u16,
    /// The server's stable error code (`NotFound`, `VolumeFull`, …); empty without one.
    pub code: String,
    pub msg: String,
}

impl ApiError {
    fn local(msg: String) -> ApiError {
        ApiError { status: 0, code: String::new(), msg }
    }
}

/// A response whose body has not been read yet (a download).
pub struct Download {
    /// `Content-Length`, when the server sent one.
    pub len: Option<u64>,
    pub headers: http::HeaderMap,
    body: ureq::Body,
}

impl Download {
    /// The body as it arrives. A body cut short (the server failed halfway, the connection
    /// dropped) is a read error, never a silent end.
    pub fn reader(self) -> impl Read {
        self.body.into_reader()
    }
}

/// How long a request may wait for the server to say something (`sandbox exec` waits for its
/// command, up to the server's 600 s default).
const READ_TIMEOUT: Duration = Duration::from_secs(660);
/// Largest error or JSON answer read.
const MAX_ANSWER: u64 = 64 << 20;

impl Client {
    /// `url` is `http://HOST:PORT` (a trailing `/` is fine).
    pub fn new(url: &str, token: &str) -> Result<Client, String> {
        let host = url.strip_prefix("http://").ok_or_else(|| format!("server URL {url:?} must start with http://"))?.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!("server URL {url:?} must be http://HOST:PORT"));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(READ_TIMEOUT))
            .user_agent(concat!("volumefs/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client { base: format!("http://{host}"), auth: format!("Bearer {token}"), agent: config.new_agent() })
    }

    fn request(&self, method: &str, path: &str) -> http::request::Builder {
        http::Request::builder().method(method).uri(format!("{}{path}", self.base)).header(http::header::AUTHORIZATION, &self.auth)
    }

    /// What a failed exchange says: the server's message for an error status, or why the
    /// server was not reached.
    fn net(&self, e: ureq::Error) -> ApiError {
        let msg = match &e {
            ureq::Error::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
                format!("cannot reach the server at {}: {io}", self.base)
            }
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Timeout(ureq::Timeout::Connect) => {
                format!("cannot reach the server at {}: {e}", self.base)
            }
            ureq::Error::Timeout(t) => format!("the server at {} did not answer in time ({t:?})", self.base),
            _ => format!("talking to the server at {}: {e}", self.base),
        };
        ApiError::local(msg)
    }

    /// Sends a request; an error status becomes an [`ApiError`] with the server's message.
    fn send(&self, req: http::Request<impl ureq::AsSendBody>) -> Result<http::Response<ureq::Body>, ApiError> {
        let mut resp = self.agent.run(req).map_err(|e| self.net(e))?;
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(resp);
        }
        let raw = resp.body_mut().with_config().limit(MAX_ANSWER).read_to_vec().unwrap_or_default();
        Err(error_of(status, &raw))
    }

    /// A JSON request; the JSON answer.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let invalid = |e: http::Error| ApiError::local(format!("invalid request {method} {path}: {e}"));
        let req = self.request(method, path);
        let mut resp = match body {
            Some(b) => self.send(req.header(http::header::CONTENT_TYPE, "application/json").body(b.to_string()).map_err(invalid)?)?,
            None => self.send(req.body(()).map_err(invalid)?)?,
        };
        answer(&mut resp)
    }

    /// A request whose body is read from `body` as it is sent (`len` known: `Content-Length`,
    /// else chunked); the JSON answer.
    pub fn upload(&self, method: &str, path: &str, content_type: &str, len: Option<u64>, body: &mut dyn Read) -> Result<Value, ApiError> {
        let mut req = self.request(method, path).header(http::header::CONTENT_TYPE, content_type);
        if let Some(n) = len {
            req = req.header(http::header::CONTENT_LENGTH, n);
        }
        let req =
            req.body(ureq::SendBody::from_reader(body)).map_err(|e| ApiError::local(format!("invalid request {method} {path}: {e}")))?;
        let mut resp = self.send(req)?;
        answer(&mut resp)
    }

    /// A request with extra headers and an optional streamed body (`len` bytes); the response
    /// with its headers. An error status is an [`ApiError`] carrying the server's message.
    pub fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<(&mut dyn Read, u64)>,
    ) -> Result<http::Response<ureq::Body>, ApiError> {
        let mut req = self.request(method, path);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let invalid = |e: http::Error| ApiError::local(format!("invalid request {method} {path}: {e}"));
        match body {
            Some((r, n)) => self.send(req.header(http::header::CONTENT_LENGTH, n).body(ureq::SendBody::from_reader(r)).map_err(invalid)?),
            None => self.send(req.body(()).map_err(invalid)?),
        }
    }

    /// A GET whose body is left to the caller to stream.
    pub fn download(&self, path: &str, headers: &[(&str, &str)]) -> Result<Download, ApiError> {
        let mut req = self.request("GET", path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).map_err(|e| ApiError::local(format!("invalid request GET {path}: {e}")))?;
        let resp = self.send(req)?;
        let (parts, body) = resp.into_parts();
        let len = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        Ok(Download { len, headers: parts.headers, body })
    }
}

fn answer(resp: &mut http::Response<ureq::Body>) -> Result<Value, ApiError> {
    let raw =
        resp.body_mut().with_config().limit(MAX_ANSWER).read_to_vec().map_err(|e| ApiError::local(format!("reading the answer: {e}")))?;
    if raw.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&raw).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned())))
}

/// The error an error status carries: the server's JSON `{code, message}`, or its text.
fn error_of(status: u16, raw: &[u8]) -> ApiError {
    let v: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
    let code = v.get("code").and_then(Value::as_str).unwrap_or("").to_string();
    let msg = match v.get("message").or_else(|| v.get("error")).and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None if raw.is_empty() => format!("the server answered {status}"),
        None => String::from_utf8_lossy(raw).trim().to_string(),
    };
    ApiError { status, code, msg }
}

/// Encodes a path segment (a volume or sandbox name, one name of a path): everything but the
/// unreserved characters of RFC 3986 is percent-encoded, `/` included.
pub fn segment(s: &str) -> String {
    encode(s, b"")
}

/// Encodes a volume path for a URL path: each name as a [`segment`], joined by `/`, without the
/// leading `/` (`/a b/c` → `a%20b/c`); `.` names are left out, as the server would.
pub fn path(p: &str) -> String {
    p.split('/').filter(|s| !s.is_empty() && *s != ".").map(segment).collect::<Vec<_>>().join("/")
}

/// Encodes a query value (`/` may stay; `&`, `=`, `+`, `#`, `%` and the rest may not).
pub fn query(s: &str) -> String {
    encode(s, b"/")
}

fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_of_segments_paths_and_query_values() {
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(segment("ü"), "%C3%BC");
        assert_eq!(path("/a b/./c%d//e"), "a%20b/c%25d/e");
        assert_eq!(path("/"), "");
        assert_eq!(query("/x+y&z=1#?"), "/x%2By%26z%3D1%23%3F");
    }

    #[test]
    fn errors_carry_the_servers_message_and_code() {
        let e = error_of(507, br#"{"code":"VolumeFull","message":"volume `v` is full","errno":"EDQUOT"}"#);
        assert_eq!((e.status, e.code.as_str(), e.msg.as_str()), (507, "VolumeFull", "volume `v` is full"));
        let e = error_of(502, b"bad gateway\n");
        assert_eq!((e.code.as_str(), e.msg.as_str()), ("", "bad gateway"));
        assert_eq!(error_of(500, b"").msg, "the server answered 500");
    }

    #[test]
    fn only_plain_http_urls() {
        assert!(Client::new("https://h:1", "t").err().unwrap().contains("must start with http://"));
        assert!(Client::new("http://h:1/api", "t").err().unwrap().contains("http://HOST:PORT"));
        assert_eq!(Client::new("http://h:1/", "t").unwrap().base, "http://h:1");
    }
}
