//! Resumable uploads: the tus 1.0 protocol (core, and the creation, termination and expiration
//! extensions), so that stock tus clients work and an interrupted upload of a large file resumes
//! from the server's offset instead of starting over.
//!
//! - `POST /v1/volumes/{v}/uploads` with `Upload-Length` and `Upload-Metadata: path <base64>`
//!   (optionally `parents <base64 of "true">`) creates an upload: `201` and its `Location`.
//! - `HEAD …/uploads/{id}` says how far it got (`Upload-Offset`); `PATCH …/uploads/{id}` with
//!   `Content-Type: application/offset+octet-stream` and the current `Upload-Offset` adds bytes;
//!   when the offset reaches the length, the file takes its place in the volume (atomically, as
//!   every whole-file write does). `DELETE …/uploads/{id}` gives it up.
//! - An upload untouched for the expiry (`volumefs server --upload-expiry SECS`, default a day)
//!   is removed; `Upload-Expires` says when.
//!
//! The bytes live in a hidden file next to the target (`.NAME.volumefs-up-ID`), so they count
//! against the volume's cap from the first byte and survive a server restart; the offset is that
//! file's size, the engine's own truth, so a PATCH cut off mid-way keeps every byte it wrote.
//! A small JSON record per upload in `DATA/uploads/` remembers where it goes.

use super::http::{with_body, ApiError, ApiResult};
use super::Server;
use crate::fs::{Caller, FsError, FsResult, Ino, Kind, Timespec};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{options, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str = "creation,termination,expiration";

/// Where an upload goes and how long it is.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Record {
    volume: String,
    path: String,
    length: u64,
    parent: Ino,
    tmp: String,
    name: String,
    ino: Ino,
    /// Unix seconds of the last PATCH (or the creation).
    touched: i64,
}

/// The uploads in progress.
pub struct Uploads {
    dir: PathBuf,
    pub expiry: Duration,
    /// One PATCH at a time per upload.
    busy: Mutex<HashMap<String, ()>>,
}

impl Uploads {
    pub fn open(data: &std::path::Path, expiry: Duration) -> FsResult<Uploads> {
        let dir = data.join("uploads");
        std::fs::create_dir_all(&dir)?;
        Ok(Uploads { dir, expiry, busy: Mutex::default() })
    }

    fn file(&self, id: &str) -> Option<PathBuf> {
        // Ids are ours: 32 hex digits. Anything else names nothing (and no path outside).
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| self.dir.join(format!("{id}.json")))
    }

    fn load(&self, id: &str) -> FsResult<Record> {
        let gone = || FsError::new(libc::ENOENT, format!("upload {id} not found (finished, terminated or expired)"));
        let f = self.file(id).ok_or_else(gone)?;
        let text = std::fs::read(&f).map_err(|_| gone())?;
        serde_json::from_slice(&text).map_err(|e| FsError::new(libc::EIO, format!("upload record {}: {e}", f.display())))
    }

    fn save(&self, id: &str, r: &Record) -> FsResult<()> {
        use std::io::Write;
        let f = self.file(id).ok_or_else(|| FsError::new(libc::EINVAL, "bad upload id"))?;
        let tmp = f.with_extension("tmp");
        let mut out = std::fs::File::create(&tmp)?;
        out.write_all(&serde_json::to_vec(r).map_err(|e| FsError::new(libc::EIO, e.to_string()))?)?;
        out.sync_all()?;
        std::fs::rename(&tmp, &f)?;
        Ok(())
    }

    fn forget(&self, id: &str) {
        if let Some(f) = self.file(id) {
            let _ = std::fs::remove_file(f);
        }
    }

    fn expires(&self, r: &Record) -> i64 {
        r.touched + self.expiry.as_secs() as i64
    }
}

/// RFC 7231 date, as `Upload-Expires` wants it.
fn http_date(unix: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, m, d, h, mi, s) = crate::fs::utc_parts(unix);
    format!("{}, {d:02} {} {y} {h:02}:{mi:02}:{s:02} GMT", DAYS[unix.div_euclid(86_400).rem_euclid(7) as usize], MONTHS[m as usize - 1])
}

/// `Upload-Metadata`: `key base64,key base64,key`.
fn metadata(h: &HeaderMap) -> Result<HashMap<String, String>, ApiError> {
    use base64::Engine as _;
    let mut out = HashMap::new();
    let Some(raw) = h.get("upload-metadata").and_then(|v| v.to_str().ok()) else { return Ok(out) };
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once(' ').unwrap_or((pair, ""));
        let v = base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad(format!("Upload-Metadata value of `{k}` is not base64 of UTF-8")))?;
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::from(FsError::new(libc::EINVAL, msg.into()))
}

fn tus_headers(r: &mut Response) {
    r.headers_mut().insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn with_tus(e: ApiError) -> Response {
    let mut r = e.into_response();
    tus_headers(&mut r);
    r
}

fn check_version(h: &HeaderMap) -> ApiResult<()> {
    match h.get("tus-resumable").and_then(|v| v.to_str().ok()) {
        Some(TUS_VERSION) => Ok(()),
        other => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "InvalidArgument",
            format!("Tus-Resumable must be {TUS_VERSION} (got {other:?})"),
        )),
    }
}

type Srv = State<Arc<Server>>;

/// The tus routes, merged into the authenticated API.
pub fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route("/v1/volumes/{v}/uploads", post(create).options(capabilities))
        .route("/v1/volumes/{v}/uploads/{id}", options(capabilities).head(status).patch(append).delete(terminate))
}

/// Removes uploads nobody touched within the expiry; runs for the server's life.
pub fn start_expiry(server: &Arc<Server>) {
    let weak = Arc::downgrade(server);
    let every = (server.uploads.expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    super::runtime().spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(server) = weak.upgrade() else { return };
            let _ = tokio::task::spawn_blocking(move || expire(&server)).await;
        }
    });
}

fn expire(server: &Server) {
    let now = Timespec::now().sec;
    let Ok(dir) = std::fs::read_dir(&server.uploads.dir) else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else { continue };
        let Ok(r) = server.uploads.load(id) else { continue };
        if server.uploads.expires(&r) < now && !server.uploads.busy.lock().unwrap().contains_key(id) {
            discard(server, id, &r);
            tracing::info!(upload = id, volume = %r.volume, path = %r.path, "upload expired");
        }
    }
}

fn discard(server: &Server, id: &str, r: &Record) {
    if let Ok(vol) = server.vol_id(&r.volume) {
        let _ = server.engine.unlink(vol, r.parent, r.tmp.as_bytes(), &Caller::root());
    }
    server.uploads.forget(id);
}

async fn capabilities() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    tus_headers(&mut r);
    let h = r.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(EXTENSIONS));
    r
}

async fn create(State(s): Srv, Path(v): Path<String>, headers: HeaderMap) -> Response {
    create_inner(s, v, headers).await.unwrap_or_else(with_tus)
}

async fn create_inner(s: Arc<Server>, v: String, headers: HeaderMap) -> ApiResult {
    check_version(&headers)?;
    if headers.contains_key("upload-defer-length") {
        return Err(bad("Upload-Defer-Length is not supported: send Upload-Length"));
    }
    let length: u64 = headers
        .get("upload-length")
        .and_then(|l| l.to_str().ok())
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| bad("Upload-Length (a number of bytes) is required"))?;
    let meta = metadata(&headers)?;
    let path = meta.get("path").cloned().ok_or_else(|| bad("Upload-Metadata must name the target: path <base64 of /volume/path>"))?;
    let parents = meta.get("parents").is_some_and(|p| p == "true" || p == "1");
    let id = super::random_token()?[..32].to_string();
    let (s2, id2) = (s.clone(), id.clone());
    let r = super::http::blocking(move || {
        let info = s2.engine.volume(&v)?;
        if length > info.cap.saturating_sub(info.used) {
            return Err(FsError::new(
                libc::EDQUOT,
                format!(
                    "volume `{v}` is full for this upload: {} bytes free, the upload needs {length}",
                    info.cap.saturating_sub(info.used)
                ),
            ));
        }
        let parts = super::files::split_path(&path)?;
        let (parent, name) = s2.parent_of(info.id, &parts, parents)?;
        if let Ok(a) = s2.engine.lookup(info.id, parent, name.as_bytes(), &Caller::root()) {
            if a.kind == Kind::Dir {
                return Err(FsError::new(libc::EISDIR, format!("{path} is a directory")));
            }
        }
        let tmp = super::files::temp_name(name, &format!("up-{id2}"));
        let a = s2.engine.create(info.id, parent, tmp.as_bytes(), 0o644, 0, &Caller::root())?;
        s2.close_file(info.id, a.ino);
        let r = Record {
            volume: v,
            path: super::files::join(&parts),
            length,
            parent,
            tmp,
            name: name.to_string(),
            ino: a.ino,
            touched: Timespec::now().sec,
        };
        s2.uploads.save(&id2, &r)?;
        if length == 0 {
            finish(&s2, &id2, &r)?;
        }
        tracing::info!(upload = %id2, volume = %r.volume, path = %r.path, length, "upload created");
        Ok(r)
    })
    .await?;
    let mut resp = StatusCode::CREATED.into_response();
    tus_headers(&mut resp);
    let loc = format!("/v1/volumes/{}/uploads/{id}", super::http::encode_query(&r.volume));
    resp.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&loc).map_err(|e| bad(e.to_string()))?);
    resp.headers_mut().insert("upload-expires", HeaderValue::from_str(&http_date(s.uploads.expires(&r))).expect("ascii"));
    Ok(resp)
}

/// The bytes so far: the hidden file's size (it must still be the upload's own file).
fn offset(s: &Server, r: &Record) -> FsResult<u64> {
    let vol = s.vol_id(&r.volume)?;
    let a = s.engine.lookup(vol, r.parent, r.tmp.as_bytes(), &Caller::root())?;
    if a.ino != r.ino {
        return Err(FsError::new(libc::ENOENT, "the upload's data is gone"));
    }
    Ok(a.size)
}

/// Renames the finished upload over its target.
fn finish(s: &Server, id: &str, r: &Record) -> FsResult<()> {
    let vol = s.vol_id(&r.volume)?;
    s.engine.rename(vol, r.parent, r.tmp.as_bytes(), r.parent, r.name.as_bytes(), 0, &Caller::root())?;
    s.invalidate(vol, &[(r.parent, r.name.as_bytes().to_vec())]);
    s.uploads.forget(id);
    tracing::info!(upload = id, volume = %r.volume, path = %r.path, bytes = r.length, "upload finished");
    Ok(())
}

/// The upload `id` of volume `volume` (an id is only good with the volume it was made for: a
/// tenant holding another tenant's id reaches nothing).
fn load_live(s: &Server, volume: &str, id: &str) -> FsResult<Record> {
    let r = s.uploads.load(id)?;
    if r.volume != volume {
        return Err(FsError::new(libc::ENOENT, format!("upload {id} not found")));
    }
    if s.uploads.expires(&r) < Timespec::now().sec {
        return Err(FsError::new(libc::ENOENT, format!("upload {id} expired")));
    }
    Ok(r)
}

async fn status(State(s): Srv, Path((v, id)): Path<(String, String)>) -> Response {
    let s2 = s.clone();
    let found = super::http::blocking(move || {
        let r = load_live(&s2, &v, &id)?;
        Ok((offset(&s2, &r)?, r))
    })
    .await;
    match found {
        Ok((off, r)) => {
            let mut resp = StatusCode::OK.into_response();
            tus_headers(&mut resp);
            let h = resp.headers_mut();
            h.insert("upload-offset", HeaderValue::from(off));
            h.insert("upload-length", HeaderValue::from(r.length));
            h.insert("upload-expires", HeaderValue::from_str(&http_date(s.uploads.expires(&r))).expect("ascii"));
            resp
        }
        // HEAD answers carry no body: the status says it.
        Err(e) => {
            let mut resp = e.status.into_response();
            tus_headers(&mut resp);
            resp
        }
    }
}

/// Releases an upload's PATCH slot when the request ends, however it ends.
struct Busy<'a>(&'a Server, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.uploads.busy.lock().unwrap().remove(&self.1);
    }
}

async fn append(State(s): Srv, Path((v, id)): Path<(String, String)>, headers: HeaderMap, body: Body) -> Response {
    append_inner(s, v, id, headers, body).await.unwrap_or_else(with_tus)
}

async fn append_inner(s: Arc<Server>, v: String, id: String, headers: HeaderMap, body: Body) -> ApiResult {
    check_version(&headers)?;
    if headers.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()) != Some("application/offset+octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "InvalidArgument",
            "PATCH bodies are Content-Type: application/offset+octet-stream",
        ));
    }
    let claimed: u64 = headers
        .get("upload-offset")
        .and_then(|o| o.to_str().ok())
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| bad("Upload-Offset (a number of bytes) is required"))?;
    if s.uploads.busy.lock().unwrap().insert(id.clone(), ()).is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, "Conflict", format!("upload {id} is being written by another request")));
    }
    let _busy = Busy(&s, id.clone());
    let (s2, id2) = (s.clone(), id.clone());
    let (r, start) = super::http::blocking(move || {
        let r = load_live(&s2, &v, &id2)?;
        Ok((offset(&s2, &r)?, r))
    })
    .await
    .map(|(o, r)| (r, o))?;
    if claimed != start {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Upload-Offset is {claimed} but the upload has {start} bytes: resume from there"),
        ));
    }
    let (s2, r2) = (s.clone(), r.clone());
    // Every byte written stays, even when the body breaks off: the client resumes from it.
    let written = with_body(body, move |mut input| {
        let vol = s2.vol_id(&r2.volume)?;
        s2.engine.open(vol, r2.ino, libc::O_WRONLY, &Caller::root())?;
        let mut off = start;
        let mut buf = vec![0u8; super::files::CHUNK];
        let result = loop {
            let n = match std::io::Read::read(&mut input, &mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(FsError::new(libc::EIO, e.to_string())),
            };
            if off + n as u64 > r2.length {
                break Err(FsError::new(libc::EINVAL, format!("more bytes than Upload-Length ({})", r2.length)));
            }
            if let Err(e) = s2.engine.write(vol, r2.ino, off, &buf[..n], false, &Caller::root()) {
                break Err(e);
            }
            off += n as u64;
        };
        s2.close_file(vol, r2.ino);
        result.map(|_| off)
    })
    .await;
    let (s2, r2, id2) = (s.clone(), r.clone(), id.clone());
    let done = super::http::blocking(move || {
        let mut r = r2;
        r.touched = Timespec::now().sec;
        let off = offset(&s2, &r)?;
        if off == r.length {
            finish(&s2, &id2, &r)?;
        } else {
            s2.uploads.save(&id2, &r)?;
        }
        Ok(off)
    })
    .await?;
    written?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    tus_headers(&mut resp);
    resp.headers_mut().insert("upload-offset", HeaderValue::from(done));
    resp.headers_mut().insert(
        "upload-expires",
        HeaderValue::from_str(&http_date(Timespec::now().sec + s.uploads.expiry.as_secs() as i64)).expect("ascii"),
    );
    Ok(resp)
}

async fn terminate(State(s): Srv, Path((v, id)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let result = async {
        check_version(&headers)?;
        super::http::blocking(move || {
            let r = load_live(&s, &v, &id)?;
            discard(&s, &id, &r);
            tracing::info!(upload = %id, volume = %r.volume, path = %r.path, "upload terminated");
            Ok(())
        })
        .await
    }
    .await;
    match result {
        Ok(()) => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            tus_headers(&mut resp);
            resp
        }
        Err(e) => with_tus(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates() {
        assert_eq!(super::http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(super::http_date(1_403_712_000), "Wed, 25 Jun 2014 16:00:00 GMT");
    }
}
