//! The HTTP API, on axum over the server's tokio runtime. Every route but signed downloads needs
//! `Authorization: Bearer <token>` (the token is `DATA/api-token`). Bodies stream both ways: an
//! upload is written to the volume as it arrives and a download or archive is read from the
//! volume as the client takes it, through bounded channels, so neither ever sits in memory.
//! Engine calls block, so handlers run them on the blocking pool ([`blocking`]).
//!
//! Errors are JSON `{"code", "message", "errno"}` with a stable `code` and the status that goes
//! with it, decided in one place ([`ApiError::from`]).
//!
//! Routes (all under `/v1`; `{v}` is a volume name, paths are volume paths like `/a/b.txt`):
//! - volumes: `GET /volumes?fields=a,b`, `POST /volumes {name, cap?}`,
//!   `GET /volumes/{v}?fields=`, `PATCH /volumes/{v}` (refused: no resize),
//!   `DELETE /volumes/{v}?force=true`
//! - file contents: `GET /volumes/{v}/files/{path}` (bytes; `Range`; `?archive=tar|tar.gz|zip`
//!   for a file or a directory tree), `PUT …?parents=true` (streamed, atomic replace),
//!   `POST …?append` (added at the end of file in one write), `DELETE …?recursive=true`;
//!   `GET /volumes/{v}/archive?path=/&format=tar` for any path including the root
//! - file operations: `GET /volumes/{v}/stat?path=`, `GET /volumes/{v}/list?path=&recursive=`,
//!   `POST /volumes/{v}/mkdir {path, parents}`, `POST /volumes/{v}/move {from, to}`,
//!   `POST /volumes/{v}/remove {path, recursive}`, `POST /volumes/{v}/edit {path, find, replace}`,
//!   `GET /volumes/{v}/search?path=&name=&content=&limit=`,
//!   `POST /volumes/{v}/replace {path, find, replace, name?}`,
//!   `POST /volumes/{v}/batch?path=/dest` (a tar stream, or JSON `{files: [{path, content}]}`;
//!   all or nothing)
//! - `GET /volumes/{v}/watch?path=` streams changes as Server-Sent Events (see [`super::watch`])
//! - signed URLs: `POST /volumes/{v}/signed-url {path, archive?, expires_secs}` → `{url}`;
//!   `GET /signed/{v}?path=&archive=&expires=&sig=` needs no token until it expires
//! - sandboxes: `GET /sandboxes`, `POST /sandboxes {name}`, `GET|DELETE /sandboxes/{name}`,
//!   `GET|POST|DELETE /sandboxes/{name}/attachments`, `POST /sandboxes/{name}/{run, stop,
//!   hibernate, resume, fork, exec, reset-connections}`

use super::archive::{self, Format};
use super::files::Entry;
use super::{AttachmentInfo, Server};
use crate::engine::{VolumeInfo, DEFAULT_CAP};
use crate::fs::{FsError, Kind};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

type Srv = State<Arc<Server>>;
type Params = Query<HashMap<String, String>>;
pub(super) type ApiResult<T = Response> = Result<T, ApiError>;

/// Largest body an append may carry (appends are records; files go through PUT).
const MAX_APPEND: usize = 64 << 20;
/// Largest JSON body of a batch write.
const MAX_JSON_BATCH: usize = 64 << 20;
/// How long a quick JSON request may take.
const QUICK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a request body may go without a byte.
const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(120);
/// Chunks in flight between the volume and an HTTP body, each up to a [`super::files::CHUNK`].
const PIPE_DEPTH: usize = 4;

// ----- errors ---------------------------------------------------------------------------------

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub errno: &'static str,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), errno: "" }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, code: "InvalidArgument", message: message.into(), errno: "EINVAL" }
    }
}

/// The one place an errno becomes a status and a stable code.
impl From<FsError> for ApiError {
    fn from(e: FsError) -> ApiError {
        let (status, code) = match e.errno {
            libc::ENOENT => (StatusCode::NOT_FOUND, "NotFound"),
            libc::EEXIST => (StatusCode::CONFLICT, "AlreadyExists"),
            libc::ENOTEMPTY => (StatusCode::CONFLICT, "NotEmpty"),
            libc::EBUSY => (StatusCode::CONFLICT, "Conflict"),
            libc::EAGAIN => (StatusCode::SERVICE_UNAVAILABLE, "Busy"),
            libc::EINVAL | libc::ELOOP => (StatusCode::BAD_REQUEST, "InvalidArgument"),
            libc::ENAMETOOLONG => (StatusCode::BAD_REQUEST, "NameTooLong"),
            libc::ENOTDIR => (StatusCode::BAD_REQUEST, "NotADirectory"),
            libc::EISDIR => (StatusCode::BAD_REQUEST, "IsADirectory"),
            libc::EROFS => (StatusCode::FORBIDDEN, "ReadOnly"),
            libc::EACCES | libc::EPERM => (StatusCode::FORBIDDEN, "PermissionDenied"),
            libc::EDQUOT | libc::ENOSPC => (StatusCode::INSUFFICIENT_STORAGE, "VolumeFull"),
            libc::EFBIG => (StatusCode::PAYLOAD_TOO_LARGE, "TooLarge"),
            libc::EOPNOTSUPP => (StatusCode::NOT_IMPLEMENTED, "NotSupported"),
            libc::EHOSTUNREACH | libc::ETIMEDOUT | libc::ENOTCONN => (StatusCode::BAD_GATEWAY, "Unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        };
        ApiError { status, code, errno: e.errno_name(), message: e.msg }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code, "message": self.message, "errno": self.errno});
        (self.status, Json(body)).into_response()
    }
}

/// Runs an engine-bound closure on the blocking pool; a panic becomes an internal error.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FsError> + Send + 'static) -> ApiResult<T> {
    super::blocking(f).await.map_err(ApiError::from)
}

fn truthy(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| matches!(v.as_str(), "" | "1" | "true" | "yes"))
}

fn param<'a>(q: &'a HashMap<String, String>, key: &str) -> ApiResult<&'a str> {
    q.get(key).map(String::as_str).ok_or_else(|| ApiError::bad(format!("missing query parameter `{key}`")))
}

fn field<'a>(v: &'a Value, key: &str) -> ApiResult<&'a str> {
    v.get(key).and_then(Value::as_str).ok_or_else(|| ApiError::bad(format!("missing string field `{key}`")))
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn ok(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, Json(v)).into_response())
}

// ----- serving --------------------------------------------------------------------------------

/// Request ids for log spans: a counter is enough (they only need to tell requests apart).
#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

impl tower_http::request_id::MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        HeaderValue::from_str(&n.to_string()).ok().map(tower_http::request_id::RequestId::new)
    }
}

/// The whole API.
pub fn router(server: Arc<Server>) -> Router {
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    // Quick JSON requests: a whole-request timeout. Streams (files, archives, batches, uploads,
    // watch), tree walks (list, remove, search, replace, edit) and sandbox verbs that wait on a
    // VM or its agent are bounded by their own work instead.
    let quick = Router::new()
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{v}", get(inspect_volume).patch(patch_volume).delete(delete_volume))
        .route("/v1/volumes/{v}/stat", get(stat))
        .route("/v1/volumes/{v}/clone", post(clone_volume))
        .route("/v1/volumes/{v}/fsck", get(fsck_volume))
        .route("/v1/gc", post(gc))
        .route("/v1/volumes/{v}/mkdir", post(mkdir))
        .route("/v1/volumes/{v}/move", post(move_path))
        .route("/v1/volumes/{v}/signed-url", post(sign_url))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route("/v1/sandboxes/{s}", get(inspect_sandbox).delete(delete_sandbox))
        .route_layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, QUICK_TIMEOUT));
    let api = Router::new()
        .merge(quick)
        .route("/v1/volumes/{v}/files", get(get_root))
        .route("/v1/volumes/{v}/files/{*path}", get(get_file).head(head_file).put(put_file).post(post_file).delete(delete_file))
        .route("/v1/volumes/{v}/archive", get(get_archive))
        .route("/v1/volumes/{v}/list", get(list))
        .route("/v1/volumes/{v}/remove", post(remove))
        .route("/v1/volumes/{v}/edit", post(edit))
        .route("/v1/volumes/{v}/search", get(search))
        .route("/v1/volumes/{v}/replace", post(replace))
        .route("/v1/volumes/{v}/batch", post(batch))
        .route("/v1/volumes/{v}/watch", get(super::watch::watch))
        .route("/v1/sandboxes/{s}/attachments", get(list_attachments).post(attach).delete(detach))
        .route("/v1/sandboxes/{s}/{verb}", post(sandbox_verb))
        .merge(super::tus::routes())
        .route("/v1/signed/{v}", get(signed_download))
        .route(
            "/openapi.json",
            get(|| async {
                ([(header::CONTENT_TYPE, "application/json")], super::openapi::document().to_pretty_json().unwrap_or_default())
            }),
        )
        .fallback(|m: Method, uri: axum::http::Uri| async move {
            ApiError::new(StatusCode::NOT_FOUND, "NotFound", format!("no route for {m} {}", uri.path()))
        })
        .with_state(server.clone());
    // Authentication runs before routing (the API router is the outer router's fallback), so
    // that a tenant's names are put in its namespace before the path is matched.
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(server, authorize))
        // A request body that stalls (no bytes for this long) is cut off: a client cannot pin
        // an upload slot forever. A resumable (tus) upload simply resumes.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(BODY_STALL))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", "internal error (logged)").into_response()
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|r: &axum::http::Request<Body>| {
            let id = r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("http", id, method = %r.method(), path = %r.uri().path())
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(Counter::default()))
}

/// Who is calling: the operator (the token in `DATA/api-token`: everything) or a tenant (its own
/// token: only its own volumes and sandboxes, in its own namespace).
#[derive(Clone, Debug)]
pub enum Principal {
    Operator,
    Tenant(crate::engine::meta::TenantRow),
}

impl Principal {
    fn prefix(&self) -> Option<String> {
        match self {
            Principal::Operator => None,
            Principal::Tenant(t) => Some(format!("{}{}", t.name, crate::engine::TENANT_SEP)),
        }
    }

    /// The engine's name for a volume or sandbox name this caller gave: a tenant's names live
    /// behind its prefix (a name that already carries it stays as it is).
    pub fn internal(&self, name: &str) -> String {
        match self.prefix() {
            Some(p) if !name.starts_with(&p) => format!("{p}{name}"),
            _ => name.to_string(),
        }
    }

    /// How this caller sees an engine name; `None` when it is not theirs.
    pub fn show<'a>(&self, name: &'a str) -> Option<&'a str> {
        match self.prefix() {
            None => Some(name),
            Some(p) => name.strip_prefix(p.as_str()),
        }
    }

    fn shown(&self, name: &str) -> String {
        self.show(name).unwrap_or(name).to_string()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Authenticates a request and, for a tenant, puts the volume or sandbox named in its path into
/// the tenant's namespace (another tenant's objects are then simply not found: 404, not 403).
async fn authorize(State(server): Srv, mut req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/signed/") || req.uri().path() == "/openapi.json" {
        return next.run(req).await; // a signed URL's signature is its authority; the API's shape is public
    }
    let unauthorized = || {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", "missing or wrong API token (Authorization: Bearer <token>)")
            .into_response()
    };
    let Some(token) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
        return unauthorized();
    };
    let token = token.trim().to_string();
    // Constant-time comparison: the operator's token must not leak through timing; tenants'
    // tokens are looked up by their SHA-256, which says nothing about the token.
    let principal = if constant_time_eq(token.as_bytes(), server.token.as_bytes()) {
        Principal::Operator
    } else {
        let (s2, hash) = (server.clone(), sha256_hex(token.as_bytes()));
        match blocking(move || s2.engine.tenant_by_token(&hash)).await {
            Ok(Some(t)) => Principal::Tenant(t),
            Ok(None) => return unauthorized(),
            Err(e) => return e.into_response(),
        }
    };
    let Some(prefix) = principal.prefix() else {
        req.extensions_mut().insert(principal);
        return next.run(req).await;
    };
    if req.uri().path().starts_with("/v1/tenants") {
        return ApiError::new(StatusCode::FORBIDDEN, "PermissionDenied", "only the operator manages tenants").into_response();
    }
    if req.uri().path() == "/v1/gc" {
        return ApiError::new(StatusCode::FORBIDDEN, "PermissionDenied", "only the operator collects garbage").into_response();
    }
    // `/v1/volumes/NAME/…` and `/v1/sandboxes/NAME/…` name objects in the tenant's namespace.
    let mut segs: Vec<String> = req.uri().path().split('/').map(str::to_string).collect();
    if segs.len() > 3 && segs[1] == "v1" && (segs[2] == "volumes" || segs[2] == "sandboxes") && !segs[3].is_empty() {
        if !segs[3].starts_with(&prefix) {
            segs[3] = format!("{prefix}{}", segs[3]);
        }
        let path = segs.join("/");
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = pq.parse().ok();
        match axum::http::Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return ApiError::bad("invalid path").into_response(),
        }
    }
    req.extensions_mut().insert(principal);
    let resp = next.run(req).await;
    if !(resp.status().is_client_error() || resp.status().is_server_error()) {
        return resp;
    }
    // Error messages name objects as the tenant knows them.
    let (mut parts, body) = resp.into_parts();
    match axum::body::to_bytes(body, 1 << 16).await {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b).replace(&format!("`{prefix}"), "`");
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(text))
        }
        Err(_) => Response::from_parts(parts, Body::empty()),
    }
}

type Who = axum::Extension<Principal>;

async fn create_tenant(State(s): Srv, Json(b): Json<Value>) -> ApiResult {
    let name = field(&b, "name")?.to_string();
    let cap = cap_of(&b, "default_cap")?.unwrap_or(DEFAULT_CAP);
    let token = super::random_token()?;
    let hash = sha256_hex(token.as_bytes());
    let t = blocking(move || s.engine.create_tenant(&name, &hash, cap)).await?;
    ok(StatusCode::CREATED, json!({"name": t.name, "token": token, "default_cap_bytes": t.default_cap}))
}

async fn list_tenants(State(s): Srv) -> ApiResult {
    let list = blocking(move || s.engine.list_tenants()).await?;
    let out: Vec<Value> =
        list.iter().map(|t| json!({"name": t.name, "default_cap_bytes": t.default_cap, "created_at": t.created.sec})).collect();
    ok(StatusCode::OK, Value::Array(out))
}

/// A size field: bytes, or a string like "2GiB".
fn cap_of(b: &Value, key: &str) -> ApiResult<Option<u64>> {
    Ok(match b.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            Some(n.as_u64().filter(|c| *c > 0).ok_or_else(|| ApiError::bad(format!("`{key}` must be a positive number of bytes")))?)
        }
        Some(Value::String(t)) => Some(crate::engine::parse_size(t).map_err(ApiError::bad)?),
        Some(_) => return Err(ApiError::bad(format!("`{key}` must be a number of bytes or a size like \"2GiB\""))),
    })
}

/// How long requests still running at SIGTERM may take to finish.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the API on `listener` until SIGTERM or SIGINT, then lets running requests finish
/// (for at most [`DRAIN`]) and returns.
pub async fn run(server: Arc<Server>, listener: tokio::net::TcpListener) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    let serving = axum::serve(listener, router(server)).with_graceful_shutdown(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let mut serving = std::pin::pin!(std::future::IntoFuture::into_future(serving));
    tokio::select! {
        r = &mut serving => return r,
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    stop_tx.send_replace(true);
    if tokio::time::timeout(DRAIN, serving).await.is_err() {
        tracing::warn!("requests still running after {DRAIN:?} are cut off");
    }
    tracing::info!("server stopped");
    Ok(())
}

// ----- volumes --------------------------------------------------------------------------------

/// The fields a volume has in the API, in their display order.
pub const VOLUME_FIELDS: &[&str] = &["id", "name", "cap_bytes", "used_bytes", "free_bytes", "files", "created_at", "attachments"];

pub fn volume_json(p: &Principal, v: &VolumeInfo, attachments: Option<&[AttachmentInfo]>) -> Value {
    let mut o = json!({
        "id": v.id,
        "name": p.shown(&v.name),
        "cap_bytes": v.cap,
        "used_bytes": v.used,
        "free_bytes": v.cap.saturating_sub(v.used),
        "files": v.inodes,
        "created_at": v.created.sec,
    });
    if let Some(a) = attachments {
        o["attachments"] = a.iter().map(|a| attachment_json(p, a)).collect();
    }
    o
}

pub fn attachment_json(p: &Principal, a: &AttachmentInfo) -> Value {
    json!({
        "id": a.row.id,
        "sandbox": p.shown(&a.row.sandbox),
        "volume": p.shown(&a.volume_name),
        "path": a.row.path,
        "read_only": a.row.read_only,
        "subpath": a.row.subpath,
        "state": a.row.state.name(),
        "reason": a.row.reason,
    })
}

/// Keeps only the `?fields=` asked for, in the order asked; an unknown name is an error.
fn select(q: &HashMap<String, String>, v: Value) -> ApiResult<Value> {
    let Some(fields) = q.get("fields").filter(|f| !f.is_empty()) else { return Ok(v) };
    let names: Vec<&str> = fields.split(',').map(str::trim).filter(|f| !f.is_empty()).collect();
    if let Some(bad) = names.iter().find(|f| !VOLUME_FIELDS.contains(f)) {
        return Err(ApiError::bad(format!("unknown field `{bad}`; fields are {}", VOLUME_FIELDS.join(", "))));
    }
    let pick = |o: &Value| {
        let mut m = Map::new();
        for n in &names {
            m.insert(n.to_string(), o.get(*n).cloned().unwrap_or(Value::Null));
        }
        Value::Object(m)
    };
    Ok(match v {
        Value::Array(items) => Value::Array(items.iter().map(pick).collect()),
        o => pick(&o),
    })
}

async fn list_volumes(State(s): Srv, axum::Extension(p): Who, Query(q): Params) -> ApiResult {
    let with_attachments = q.get("fields").is_some_and(|f| f.split(',').any(|f| f.trim() == "attachments"));
    let v = blocking(move || {
        let all = s.attachments(None)?;
        Ok(s.engine
            .list_volumes()?
            .iter()
            .filter(|v| p.show(&v.name).is_some())
            .map(|v| {
                let mine: Vec<_> = all.iter().filter(|a| a.row.volume == v.id).cloned().collect();
                volume_json(&p, v, with_attachments.then_some(&mine[..]))
            })
            .collect())
    })
    .await?;
    ok(StatusCode::OK, select(&q, Value::Array(v))?)
}

async fn create_volume(State(s): Srv, axum::Extension(p): Who, Json(b): Json<Value>) -> ApiResult {
    let name = body_name(&p, &b, "name", "volume")?;
    let cap = match (cap_of(&b, "cap")?, &p) {
        (Some(c), Principal::Operator) => c,
        (None, Principal::Operator) => DEFAULT_CAP,
        (None, Principal::Tenant(t)) => t.default_cap,
        (Some(_), Principal::Tenant(t)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "PermissionDenied",
                format!("only the operator sets a volume's cap; tenant `{}` volumes get its default cap", t.name),
            ))
        }
    };
    let v = blocking(move || s.engine.create_volume(&name, cap)).await?;
    ok(StatusCode::CREATED, volume_json(&p, &v, Some(&[])))
}

async fn clone_volume(State(s): Srv, axum::Extension(p): Who, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let name = body_name(&p, &b, "name", "volume")?;
    let cap = cap_of(&b, "cap")?;
    if let (Some(_), Principal::Tenant(t)) = (cap, &p) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "PermissionDenied",
            format!("only the operator sets a volume's cap; a copy made by tenant `{}` gets the source's cap", t.name),
        ));
    }
    let c = blocking(move || s.engine.clone_volume(&v, &name, cap)).await?;
    ok(StatusCode::CREATED, volume_json(&p, &c, Some(&[])))
}

async fn fsck_volume(State(s): Srv, axum::Extension(p): Who, Path(v): Path<String>) -> ApiResult {
    let mut r = blocking(move || s.engine.fsck(&v)).await?;
    r.volume = p.shown(&r.volume).to_string();
    ok(StatusCode::OK, serde_json::to_value(r).unwrap_or_default())
}

async fn gc(State(s): Srv, Query(q): Params) -> ApiResult {
    let grace = match q.get("grace") {
        Some(g) => g.parse::<u64>().map_err(|_| ApiError::bad(format!("grace must be a number of seconds, not {g:?}")))?,
        None => 3600,
    };
    let r = blocking(move || s.engine.gc(std::time::Duration::from_secs(grace))).await?;
    ok(StatusCode::OK, serde_json::to_value(r).unwrap_or_default())
}

async fn inspect_volume(State(s): Srv, axum::Extension(p): Who, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let out = blocking(move || {
        let info = s.engine.volume(&v)?;
        let attachments: Vec<_> = s.attachments(None)?.into_iter().filter(|a| a.row.volume == info.id).collect();
        Ok(volume_json(&p, &info, Some(&attachments)))
    })
    .await?;
    ok(StatusCode::OK, select(&q, out)?)
}

async fn patch_volume(State(s): Srv, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    blocking(move || s.engine.volume(&v).map(|_| ())).await?;
    if b.get("cap").is_some() || b.get("cap_bytes").is_some() {
        return Err(ApiError::bad(
            "a volume's cap is fixed when it is created: volumes do not grow or shrink (create a new volume and copy)",
        ));
    }
    Err(ApiError::bad("nothing to change: a volume's name and cap are fixed"))
}

async fn delete_volume(State(s): Srv, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let force = truthy(&q, "force");
    let name = v.clone();
    blocking(move || s.delete_volume(&v, force)).await?;
    ok(StatusCode::OK, json!({"deleted": name}))
}

// ----- file contents --------------------------------------------------------------------------

/// A body fed by a producer (a blocking task, or an async one) through a bounded channel.
pub(super) fn channel_body() -> (mpsc::Sender<io::Result<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(PIPE_DEPTH);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (tx, Body::from_stream(stream))
}

/// A `Write` that hands what is written to an HTTP body in chunks (used on the blocking pool).
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 << 10 {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A `Read` over an HTTP request body (used on the blocking pool).
pub(super) struct BodyReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// How long the rest of a request body that a handler stopped reading (it failed early: the
/// volume is full, the path is wrong) is still read and thrown away, as nginx's lingering close
/// does. Most HTTP clients send the whole body before they read the answer; closing on them
/// mid-body resets the connection and they never see the error.
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `consume` on the blocking pool with the request body as a `Read`, feeding it as the
/// body arrives. A body that breaks off (the client went away) is a read error for `consume`.
/// What `consume` leaves unread is drained for at most [`LINGER`] while the answer goes out.
pub(super) async fn with_body<T: Send + 'static>(
    body: Body,
    consume: impl FnOnce(BodyReader) -> Result<T, FsError> + Send + 'static,
) -> ApiResult<T> {
    let (tx, rx) = mpsc::channel(PIPE_DEPTH);
    let job = tokio::task::spawn_blocking(move || consume(BodyReader { rx, cur: Bytes::new() }));
    let mut stream = body.into_data_stream();
    let mut unread = false;
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(|e| io::Error::new(io::ErrorKind::ConnectionAborted, format!("the request body broke off: {e}")));
        let failed = frame.is_err();
        if tx.send(frame).await.is_err() {
            unread = !failed; // the consumer stopped (with an error it will report, or done)
            break;
        }
        if failed {
            break; // the body broke off
        }
    }
    drop(tx);
    if unread {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(LINGER, async move { while let Some(Ok(_)) = stream.next().await {} }).await;
        });
    }
    match job.await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", format!("internal error: {e}"))),
    }
}

fn io_fs(e: io::Error) -> FsError {
    FsError::new(libc::EIO, e.to_string())
}

/// A parsed `Range: bytes=…` header: the first and last byte asked for, or `None` for the whole
/// file; `Err(())` when it cannot be satisfied. Only single ranges are served (a multi-range
/// request gets the whole file, which HTTP allows).
fn parse_range(h: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (a, b) => (a.parse().map_err(|_| ())?, b.parse::<u64>().map_err(|_| ())?.min(size.saturating_sub(1))),
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Streams a file (or the requested range of it).
async fn download(s: Arc<Server>, v: String, path: String, headers: HeaderMap) -> ApiResult {
    let s2 = s.clone();
    let (vol, a) = blocking(move || s2.open_file(&v, &path)).await?;
    let range = match parse_range(&headers, a.size) {
        Ok(r) => r,
        Err(()) => {
            let s3 = s.clone();
            blocking(move || {
                s3.close_file(vol, a.ino);
                Ok(())
            })
            .await?;
            let mut r =
                ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "InvalidRange", format!("the file has {} bytes", a.size)).into_response();
            r.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{}", a.size)).expect("ascii"));
            return Ok(r);
        }
    };
    let (start, len) = match range {
        Some((a, b)) => (a, b - a + 1),
        None => (0, a.size),
    };
    let (tx, body) = channel_body();
    tokio::task::spawn_blocking(move || {
        let mut off = start;
        let end = start + len;
        while off < end {
            let chunk = match s.read_at(vol, a.ino, off, (end - off).min(super::files::CHUNK as u64) as usize) {
                Ok(c) if c.is_empty() => break, // the file shrank: the body ends early
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                    break;
                }
            };
            off += chunk.len() as u64;
            if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                break; // the client went away
            }
        }
        s.close_file(vol, a.ino);
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert("x-volumefs-size", HeaderValue::from(a.size));
    if range.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        let cr = format!("bytes {start}-{}/{}", start + len - 1, a.size);
        r.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).expect("ascii"));
    }
    Ok(r)
}

/// Streams an archive of `path` as it is written.
async fn archive_response(s: Arc<Server>, v: String, path: String, format: Format) -> ApiResult {
    // Check the path first, so that a wrong one is a clean error and not a broken body.
    let (s2, v2, p2) = (s.clone(), v.clone(), path.clone());
    let top = blocking(move || s2.stat_path(&v2, &p2)).await?;
    let (tx, body) = channel_body();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter { tx: tx.clone(), buf: Vec::new() };
        let r = archive::write_archive(&s, &v, &path, format, &mut w).and_then(|_| io::Write::flush(&mut w).map_err(io_fs));
        if let Err(e) = r {
            tracing::warn!(volume = %v, path = %path, "archive cut short: {e}");
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    let base = top.path.rsplit('/').next().filter(|b| !b.is_empty()).unwrap_or("volume").to_string();
    let disposition = format!("attachment; filename=\"{}.{}\"", base.replace(['"', '\\'], "_"), format.name());
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    if let Ok(d) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, d);
    }
    Ok(r)
}

async fn get_file(State(s): Srv, Path((v, path)): Path<(String, String)>, Query(q): Params, headers: HeaderMap) -> ApiResult {
    match q.get("archive") {
        Some(f) => archive_response(s, v, path, Format::parse(f)?).await,
        None => download(s, v, path, headers).await,
    }
}

async fn get_root(State(s): Srv, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let f = q.get("archive").ok_or_else(|| ApiError::bad("the volume root is a directory: add ?archive=tar|tar.gz|zip"))?;
    archive_response(s, v, "/".into(), Format::parse(f)?).await
}

async fn get_archive(State(s): Srv, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let path = q.get("path").cloned().unwrap_or_else(|| "/".into());
    archive_response(s, v, path, Format::parse(q.get("format").map(String::as_str).unwrap_or("tar"))?).await
}

/// `HEAD`: 200 with the size when the path exists (any kind), 404 when it does not.
async fn head_file(State(s): Srv, Path((v, path)): Path<(String, String)>) -> ApiResult {
    let e = blocking(move || s.stat_path(&v, &path)).await?;
    let mut r = Response::new(Body::empty());
    r.headers_mut().insert("x-volumefs-size", HeaderValue::from(e.attr.size));
    r.headers_mut().insert("x-volumefs-kind", HeaderValue::from_static(kind_name(e.attr.kind)));
    Ok(r)
}

/// A path as the API echoes it: canonical, from the root.
fn shown_path(path: &str) -> String {
    super::files::split_path(path).map(|p| super::files::join(&p)).unwrap_or_else(|_| path.to_string())
}

async fn put_file(State(s): Srv, Path((v, path)): Path<(String, String)>, Query(q): Params, body: Body) -> ApiResult {
    let parents = truthy(&q, "parents");
    let shown = shown_path(&path);
    let a = with_body(body, move |mut r| {
        let mut up = s.begin_upload(&v, &path, parents)?;
        let mut buf = vec![0u8; super::files::CHUNK];
        loop {
            let n = read_full(&mut r, &mut buf).map_err(io_fs)?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n])?;
        }
        up.commit()
    })
    .await?;
    ok(StatusCode::OK, json!({"written": shown, "size": a.size}))
}

/// Reads until `buf` is full or the input ends: engine writes of whole chunks.
fn read_full(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

async fn post_file(State(s): Srv, Path((v, path)): Path<(String, String)>, Query(q): Params, body: Body) -> ApiResult {
    if !q.contains_key("append") {
        return Err(ApiError::bad("POST on a file appends: add ?append (PUT replaces)"));
    }
    let data = axum::body::to_bytes(body, MAX_APPEND).await.map_err(|e| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "TooLarge", format!("an append carries at most {MAX_APPEND} bytes: {e}"))
    })?;
    let shown = shown_path(&path);
    let n = data.len();
    let a = blocking(move || s.append_file(&v, &path, &data)).await?;
    ok(StatusCode::OK, json!({"written": shown, "appended": n, "size": a.size}))
}

async fn delete_file(State(s): Srv, Path((v, path)): Path<(String, String)>, Query(q): Params) -> ApiResult {
    let recursive = truthy(&q, "recursive");
    let shown = shown_path(&path);
    let n = blocking(move || s.remove(&v, &path, recursive)).await?;
    ok(StatusCode::OK, json!({"removed": shown, "entries": n}))
}

// ----- file operations ------------------------------------------------------------------------

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::CharDev => "chardev",
        Kind::BlockDev => "blockdev",
    }
}

pub fn entry_json(e: &Entry) -> Value {
    let a = &e.attr;
    let mut o = json!({
        "path": e.path,
        "name": e.path.rsplit('/').next().unwrap_or(""),
        "kind": kind_name(a.kind),
        "size": a.size,
        "mode": a.perm,
        "uid": a.uid,
        "gid": a.gid,
        "nlink": a.nlink,
        "ino": a.ino,
        "mtime": a.mtime.sec as f64 + f64::from(a.mtime.nsec) / 1e9,
        "atime": a.atime.sec as f64 + f64::from(a.atime.nsec) / 1e9,
        "ctime": a.ctime.sec as f64 + f64::from(a.ctime.nsec) / 1e9,
    });
    if let Some(t) = &e.target {
        o["target"] = json!(t);
    }
    o
}

async fn stat(State(s): Srv, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let path = param(&q, "path")?.to_string();
    let e = blocking(move || s.stat_path(&v, &path)).await?;
    ok(StatusCode::OK, entry_json(&e))
}

async fn list(State(s): Srv, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let path = q.get("path").cloned().unwrap_or_else(|| "/".into());
    let recursive = truthy(&q, "recursive");
    let limit = q.get("limit").map(|l| l.parse().map_err(|_| ApiError::bad("`limit` must be a number"))).transpose()?.unwrap_or(100_000);
    let (entries, truncated) = blocking(move || s.list(&v, &path, recursive, limit)).await?;
    ok(StatusCode::OK, json!({"entries": entries.iter().map(entry_json).collect::<Vec<_>>(), "truncated": truncated}))
}

async fn mkdir(State(s): Srv, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let path = field(&b, "path")?.to_string();
    let parents = flag(&b, "parents");
    let shown = path.clone();
    blocking(move || s.make_dir(&v, &path, parents)).await?;
    ok(StatusCode::OK, json!({"created": shown}))
}

async fn move_path(State(s): Srv, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let (from, to) = (field(&b, "from")?.to_string(), field(&b, "to")?.to_string());
    let out = json!({"from": from, "to": to});
    blocking(move || s.move_path(&v, &from, &to)).await?;
    ok(StatusCode::OK, out)
}

async fn remove(State(s): Srv, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let path = field(&b, "path")?.to_string();
    let recursive = flag(&b, "recursive");
    let shown = path.clone();
    let n = blocking(move || s.remove(&v, &path, recursive)).await?;
    ok(StatusCode::OK, json!({"removed": shown, "entries": n}))
}

async fn edit(State(s): Srv, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let path = field(&b, "path")?.to_string();
    let (find, with) = (field(&b, "find")?.to_string(), field(&b, "replace")?.to_string());
    let shown = path.clone();
    let a = blocking(move || s.edit(&v, &path, &find, &with)).await?;
    ok(StatusCode::OK, json!({"edited": shown, "size": a.size}))
}

fn glob(pattern: Option<&str>) -> ApiResult<Option<globset::GlobMatcher>> {
    pattern
        .filter(|p| !p.is_empty())
        .map(|p| globset::Glob::new(p).map(|g| g.compile_matcher()).map_err(|e| ApiError::bad(format!("invalid glob {p:?}: {e}"))))
        .transpose()
}

fn regex(pattern: &str) -> ApiResult<regex::Regex> {
    regex::RegexBuilder::new(pattern).size_limit(1 << 20).build().map_err(|e| ApiError::bad(format!("invalid regular expression: {e}")))
}

async fn search(State(s): Srv, Path(v): Path<String>, Query(q): Params) -> ApiResult {
    let path = q.get("path").cloned().unwrap_or_else(|| "/".into());
    let name = glob(q.get("name").map(String::as_str))?;
    let content = q.get("content").filter(|c| !c.is_empty()).map(|c| regex(c)).transpose()?;
    let limit = q.get("limit").map(|l| l.parse().map_err(|_| ApiError::bad("`limit` must be a number"))).transpose()?.unwrap_or(1000);
    let (hits, truncated) = blocking(move || s.search(&v, &path, name.as_ref(), content.as_ref(), limit)).await?;
    let hits: Vec<Value> = hits
        .into_iter()
        .map(|h| match h.line {
            Some((n, text)) => json!({"path": h.path, "line": n, "text": text}),
            None => json!({"path": h.path}),
        })
        .collect();
    ok(StatusCode::OK, json!({"matches": hits, "truncated": truncated}))
}

async fn replace(State(s): Srv, Path(v): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let path = b.get("path").and_then(Value::as_str).unwrap_or("/").to_string();
    let find = regex(field(&b, "find")?)?;
    let with = field(&b, "replace")?.to_string();
    let name = glob(b.get("name").and_then(Value::as_str))?;
    let changed = blocking(move || s.replace(&v, &path, &find, &with, name.as_ref())).await?;
    let files: Vec<Value> = changed.iter().map(|(p, n)| json!({"path": p, "replacements": n})).collect();
    ok(StatusCode::OK, json!({"changed": files}))
}

/// Many files in one request, all or nothing: a tar stream (modes, symlinks and times kept), or
/// JSON `{"files": [{"path", "content"}]}` for text.
async fn batch(State(s): Srv, Path(v): Path<String>, Query(q): Params, headers: HeaderMap, body: Body) -> ApiResult {
    let dest = q.get("path").cloned().unwrap_or_else(|| "/".into());
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()).is_some_and(|c| c.starts_with("application/json"));
    let done = if is_json {
        let raw = axum::body::to_bytes(body, MAX_JSON_BATCH).await.map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "TooLarge",
                format!("a JSON batch is at most {MAX_JSON_BATCH} bytes (send a tar stream for more): {e}"),
            )
        })?;
        let b: Value = serde_json::from_slice(&raw).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
        let files = b.get("files").and_then(Value::as_array).ok_or_else(|| ApiError::bad("`files` must be a list of {path, content}"))?;
        // The JSON form is turned into a tar stream, so both forms share one all-or-nothing path.
        let mut tar = tar::Builder::new(Vec::new());
        for f in files {
            let (p, content) = (field(f, "path")?, field(f, "content")?);
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(crate::fs::Timespec::now().sec as u64);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, p.trim_start_matches('/'), content.as_bytes()).map_err(|e| ApiError::bad(format!("{p}: {e}")))?;
        }
        let data = tar.into_inner().map_err(|e| ApiError::bad(e.to_string()))?;
        blocking(move || archive::import_tar(&s, &v, &dest, &data[..])).await?
    } else {
        with_body(body, move |r| archive::import_tar(&s, &v, &dest, r)).await?
    };
    ok(StatusCode::OK, json!({"files": done.files, "dirs": done.dirs, "symlinks": done.symlinks, "bytes": done.bytes}))
}

// ----- signed URLs ----------------------------------------------------------------------------

fn signature(key: &str, volume: &str, path: &str, archive: &str, expires: i64) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("volumefs-url-v1\n{volume}\n{path}\n{archive}\n{expires}").as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

async fn sign_url(State(s): Srv, Path(v): Path<String>, headers: HeaderMap, Json(b): Json<Value>) -> ApiResult {
    let path = field(&b, "path")?.to_string();
    let archive = b.get("archive").and_then(Value::as_str).unwrap_or("").to_string();
    if !archive.is_empty() {
        Format::parse(&archive)?;
    }
    let secs = b.get("expires_secs").and_then(Value::as_u64).unwrap_or(900);
    if secs == 0 || secs > 7 * 86_400 {
        return Err(ApiError::bad("`expires_secs` must be between 1 and 604800 (7 days)"));
    }
    // The URL names something that exists now (it may still be gone when it is used).
    let (s2, v2, p2) = (s.clone(), v.clone(), path.clone());
    let e = blocking(move || s2.stat_path(&v2, &p2)).await?;
    if e.attr.kind != Kind::File && archive.is_empty() {
        return Err(ApiError::bad(format!("{} is a directory: sign an archive of it (archive: tar, tar.gz or zip)", e.path)));
    }
    let expires = crate::fs::Timespec::now().sec + secs as i64;
    let sig = signature(&s.url_key, &v, &e.path, &archive, expires);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let mut url = format!("http://{host}/v1/signed/{}?path={}&expires={expires}&sig={sig}", encode_query(&v), encode_query(&e.path));
    if !archive.is_empty() {
        url.push_str(&format!("&archive={archive}"));
    }
    ok(StatusCode::OK, json!({"url": url, "expires_at": expires, "path": e.path}))
}

async fn signed_download(State(s): Srv, Path(v): Path<String>, Query(q): Params, headers: HeaderMap) -> ApiResult {
    let forbidden = |m: &str| ApiError::new(StatusCode::FORBIDDEN, "Forbidden", m.to_string());
    let path = q.get("path").ok_or_else(|| forbidden("not a valid signed URL"))?.clone();
    let archive = q.get("archive").cloned().unwrap_or_default();
    let expires: i64 = q.get("expires").and_then(|e| e.parse().ok()).ok_or_else(|| forbidden("not a valid signed URL"))?;
    let sig = q.get("sig").ok_or_else(|| forbidden("not a valid signed URL"))?;
    let want = signature(&s.url_key, &v, &path, &archive, expires);
    if !constant_time_eq(want.as_bytes(), sig.as_bytes()) {
        return Err(forbidden("the URL's signature does not match (was it changed?)"));
    }
    if crate::fs::Timespec::now().sec > expires {
        return Err(forbidden("the URL has expired"));
    }
    if archive.is_empty() {
        download(s, v, path, headers).await
    } else {
        archive_response(s, v, path, Format::parse(&archive)?).await
    }
}

// ----- sandboxes ------------------------------------------------------------------------------

fn sandbox_json(p: &Principal, s: &Server, name: &str) -> Result<Value, FsError> {
    let rt = s.sandbox_rt(name)?;
    let attachments = attachments_json(p, &s.attachments(Some(name))?);
    Ok(json!({"name": p.shown(&rt.name), "guest_socket": rt.socket, "attachments": attachments}))
}

fn attachments_json(p: &Principal, a: &[AttachmentInfo]) -> Value {
    a.iter().map(|a| attachment_json(p, a)).collect()
}

async fn list_sandboxes(State(s): Srv, axum::Extension(p): Who) -> ApiResult {
    let list = blocking(move || s.list_sandboxes()).await?;
    let out: Vec<Value> =
        list.into_iter().filter_map(|(n, sock)| p.show(&n).map(|shown| json!({"name": shown, "guest_socket": sock}))).collect();
    ok(StatusCode::OK, Value::Array(out))
}

/// A sandbox or volume name from a request body, checked and put in the caller's namespace.
fn body_name(p: &Principal, b: &Value, key: &str, what: &str) -> ApiResult<String> {
    let given = field(b, key)?;
    if matches!(p, Principal::Tenant(_)) {
        crate::engine::check_plain_name(what, given)?;
    }
    Ok(p.internal(given))
}

async fn create_sandbox(State(s): Srv, axum::Extension(p): Who, Json(b): Json<Value>) -> ApiResult {
    let name = body_name(&p, &b, "name", "sandbox")?;
    let v = blocking(move || {
        s.create_sandbox(&name)?;
        sandbox_json(&p, &s, &name)
    })
    .await?;
    ok(StatusCode::CREATED, v)
}

async fn inspect_sandbox(State(s): Srv, axum::Extension(p): Who, Path(name): Path<String>) -> ApiResult {
    ok(StatusCode::OK, blocking(move || sandbox_json(&p, &s, &name)).await?)
}

async fn delete_sandbox(State(s): Srv, axum::Extension(p): Who, Path(name): Path<String>) -> ApiResult {
    let shown = p.shown(&name);
    blocking(move || s.delete_sandbox(&name)).await?;
    ok(StatusCode::OK, json!({"deleted": shown}))
}

async fn list_attachments(State(s): Srv, axum::Extension(p): Who, Path(name): Path<String>) -> ApiResult {
    let a = blocking(move || s.attachments(Some(&name))).await?;
    ok(StatusCode::OK, attachments_json(&p, &a))
}

async fn attach(State(s): Srv, axum::Extension(p): Who, Path(name): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let volume = body_name(&p, &b, "volume", "volume")?;
    let path = field(&b, "path")?.to_string();
    let read_only = flag(&b, "read_only");
    let subpath = b.get("subpath").and_then(Value::as_str).unwrap_or("/").to_string();
    let a = blocking(move || s.attach(&name, &volume, &path, read_only, &subpath)).await?;
    ok(StatusCode::CREATED, attachment_json(&p, &a))
}

async fn detach(State(s): Srv, Path(name): Path<String>, Query(q): Params) -> ApiResult {
    let path = param(&q, "path")?.to_string();
    let force = truthy(&q, "force");
    let shown = path.clone();
    blocking(move || s.detach(&name, &path, force)).await?;
    ok(StatusCode::OK, json!({"detached": shown}))
}

async fn sandbox_verb(State(s): Srv, axum::Extension(p): Who, Path((name, verb)): Path<(String, String)>, body: Body) -> ApiResult {
    let raw = axum::body::to_bytes(body, 1 << 20).await.map_err(|e| ApiError::bad(format!("cannot read the body: {e}")))?;
    let b: Value = if raw.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&raw).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?
    };
    let p2 = p.clone();
    let attachments = move |s: &Server, name: &str| -> Result<Value, FsError> { Ok(attachments_json(&p2, &s.attachments(Some(name))?)) };
    match verb.as_str() {
        "run" => {
            let mut volumes = Vec::new();
            for v in b.get("volumes").and_then(Value::as_array).into_iter().flatten() {
                volumes.push((
                    body_name(&p, v, "volume", "volume")?,
                    field(v, "path")?.to_string(),
                    flag(v, "read_only"),
                    v.get("subpath").and_then(Value::as_str).unwrap_or("/").to_string(),
                ));
            }
            let memory = b.get("memory").and_then(Value::as_str).unwrap_or("256M").to_string();
            let a = blocking(move || s.run_sandbox(&name, &volumes, &memory)).await?;
            ok(StatusCode::OK, attachments_json(&p, &a))
        }
        "stop" => {
            let shown = p.shown(&name);
            blocking(move || s.stop_sandbox(&name)).await?;
            ok(StatusCode::OK, json!({"stopped": shown}))
        }
        "hibernate" => ok(StatusCode::OK, blocking(move || s.hibernate(&name).and_then(|_| attachments(&s, &name))).await?),
        "resume" => ok(StatusCode::OK, blocking(move || s.resume(&name).and_then(|_| attachments(&s, &name))).await?),
        "fork" => {
            let child = body_name(&p, &b, "name", "sandbox")?;
            let v = blocking(move || {
                s.fork_sandbox(&name, &child)?;
                sandbox_json(&p, &s, &child)
            })
            .await?;
            ok(StatusCode::CREATED, v)
        }
        "exec" => {
            let argv: Vec<String> = b
                .get("argv")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .filter(|a: &Vec<String>| !a.is_empty())
                .ok_or_else(|| ApiError::bad("`argv` must be a non-empty array of strings"))?;
            let stdin = b.get("stdin").and_then(Value::as_str).unwrap_or("").as_bytes().to_vec();
            let timeout_ms = b.get("timeout_ms").and_then(Value::as_u64).unwrap_or(600_000);
            let cmd = crate::proto::AgentCommand::Exec { argv, stdin, timeout_ms };
            let reply = blocking(move || s.agent_command(&name, cmd, std::time::Duration::from_millis(timeout_ms + 10_000))).await?;
            match reply {
                crate::proto::AgentReply::Exec { code, stdout, stderr } => ok(
                    StatusCode::OK,
                    json!({"code": code, "stdout": String::from_utf8_lossy(&stdout), "stderr": String::from_utf8_lossy(&stderr)}),
                ),
                other => Err(ApiError::new(StatusCode::BAD_GATEWAY, "Unavailable", format!("unexpected answer from the agent: {other:?}"))),
            }
        }
        "reset-connections" => {
            let n = blocking(move || s.sandbox_rt(&name).map(|rt| rt.reset_connections())).await?;
            ok(StatusCode::OK, json!({"closed": n}))
        }
        other => Err(ApiError::new(StatusCode::NOT_FOUND, "NotFound", format!("no sandbox action `{other}`"))),
    }
}
