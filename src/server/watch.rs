//! `watch`: a volume's changes under a path as Server-Sent Events, from the engine's change log,
//! so changes made by guests through FUSE are seen as well as the API's own.
//!
//! `GET /v1/volumes/{v}/watch?path=/dir` streams one event per change:
//!
//! ```text
//! id: 7-1042
//! event: create
//! data: {"id":1042,"kind":"create","path":"/dir/a.txt","from":null,"node":"file","time":1796200000.5}
//! ```
//!
//! The server's own temporary files are left out (`?internal=true` shows them): an API write
//! reads as one `create` or `modify` of the file, not as a hidden file made and renamed.
//!
//! Event ids are `VOLUMEID-CHANGEID`. A client that reconnects with `Last-Event-ID` (or
//! `?after=`) resumes right after that change; without one it gets changes from now on. When
//! the log no longer reaches back to where the client resumes (retention), or the id names
//! another volume (deleted and created again under the same name), a `truncated` event says that
//! events were missed and the client should rescan. A comment line is sent every 15 s to keep
//! proxies from closing an idle stream; the stream ends with a `deleted` event when the volume
//! goes.
//!
//! Waiting costs no thread per watcher: one thread waits on the engine's change notifier and
//! passes each new generation to the watchers through a tokio `watch` channel.

use super::http::{blocking, ApiError, ApiResult};
use super::Server;
use crate::engine::meta::{Change, ChangeKind, VolId};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// Between keep-alive comments on an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Changes read from the log at a time.
const PAGE: usize = 1000;

/// The engine's change generation, as an async channel (one bridging thread per server).
fn generations(server: &Server) -> watch::Receiver<u64> {
    static BRIDGE: OnceLock<watch::Receiver<u64>> = OnceLock::new();
    BRIDGE
        .get_or_init(|| {
            let notifier = server.engine.change_notifier();
            let (tx, rx) = watch::channel(notifier.generation());
            std::thread::Builder::new()
                .name("watch-bridge".into())
                .spawn(move || {
                    let mut g = notifier.generation();
                    loop {
                        g = notifier.wait_newer_than(g, Duration::from_secs(60));
                        tx.send_replace(g);
                    }
                })
                .expect("spawn the watch bridge");
            rx
        })
        .clone()
}

/// Whether a path is one of the server's own hidden files (an atomic write's or a resumable
/// upload's, see [`crate::server::files::temp_name`]).
fn is_internal(path: &str) -> bool {
    crate::server::files::is_temp_name(path.rsplit('/').next().unwrap_or(""))
}

/// Events as a watcher wants them (unless `?internal=true`): an atomic write's temporary file is
/// not shown; its final rename is the file's `create`, or its `modify` when it replaced a file
/// (the replaced name's `delete`, logged just before, is folded into it).
fn present(events: Vec<Change>, internal: bool) -> Vec<Change> {
    if internal {
        return events;
    }
    let mut out: Vec<Change> = Vec::with_capacity(events.len());
    for mut c in events {
        let from_internal = c.from.as_deref().is_some_and(is_internal);
        if c.kind == ChangeKind::Move && from_internal && !is_internal(&c.path) {
            let replaced = out.last().is_some_and(|d| d.kind == ChangeKind::Delete && d.path == c.path);
            if replaced {
                out.pop();
            }
            c.kind = if replaced { ChangeKind::Modify } else { ChangeKind::Create };
            c.from = None;
            out.push(c);
        } else if !is_internal(&c.path) && !from_internal {
            out.push(c);
        }
    }
    out
}

fn under(prefix: &str, path: &str) -> bool {
    prefix == "/" || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

fn event(vol: VolId, c: &Change) -> Bytes {
    let data = serde_json::json!({
        "id": c.id,
        "kind": c.kind.name(),
        "path": c.path,
        "from": c.from,
        "node": super::http::kind_name(c.node),
        "time": c.time.sec as f64 + f64::from(c.time.nsec) / 1e9,
    });
    Bytes::from(format!("id: {vol}-{}\nevent: {}\ndata: {data}\n\n", c.id, c.kind.name()))
}

fn notice(kind: &str, message: &str) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {}\n\n", serde_json::json!({ "message": message })))
}

pub async fn watch(
    State(s): State<Arc<Server>>,
    Path(v): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let prefix = crate::server::files::join(&crate::server::files::split_path(q.get("path").map(String::as_str).unwrap_or("/"))?);
    let resume = headers.get("last-event-id").and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| q.get("after").cloned());
    let (s2, v2) = (s.clone(), v.clone());
    let (vol, last) = blocking(move || {
        let vol = s2.vol_id(&v2)?;
        Ok((vol, s2.engine.last_change_id(vol)?))
    })
    .await?;
    let mut missed = false;
    let after = match resume.as_deref().map(str::trim) {
        None | Some("") => last,
        Some(id) => {
            let (vid, cid) = id.split_once('-').unwrap_or(("", id));
            let cid: u64 =
                cid.parse().map_err(|_| ApiError::from(crate::fs::FsError::new(libc::EINVAL, format!("bad event id {id:?}"))))?;
            if !vid.is_empty() && vid != vol.to_string() {
                missed = true; // an id of another volume that had this name
                last
            } else {
                cid
            }
        }
    };
    let internal = q.get("internal").is_some_and(|v| v == "true" || v == "1");
    let (tx, body) = super::http::channel_body();
    let mut gens = generations(&s);
    tokio::spawn(async move {
        let mut after = after;
        if missed && tx.send(Ok(notice("truncated", "the stream cannot resume from that id: rescan"))).await.is_err() {
            return;
        }
        loop {
            // Read the generation before the log: a change committed in between wakes us.
            gens.borrow_and_update();
            let s2 = s.clone();
            let page = tokio::task::spawn_blocking(move || s2.engine.changes(vol, after, PAGE)).await;
            let page = match page {
                Ok(Ok(p)) => p,
                Ok(Err(e)) if e.errno == libc::ENOENT => {
                    let _ = tx.send(Ok(notice("deleted", "the volume was deleted"))).await;
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(volume = vol, "watch: {e}");
                    return;
                }
                Err(_) => return,
            };
            if page.truncated
                && tx.send(Ok(notice("truncated", "events were pruned from the log before they were read: rescan"))).await.is_err()
            {
                return;
            }
            let full = page.events.len() >= PAGE;
            let last = page.events.last().map(|c| c.id);
            for c in present(page.events, internal) {
                let wanted = under(&prefix, &c.path) || c.from.as_deref().is_some_and(|f| under(&prefix, f));
                if wanted && tx.send(Ok(event(vol, &c))).await.is_err() {
                    return; // the client went away
                }
            }
            after = last.unwrap_or(after);
            if full {
                continue;
            }
            tokio::select! {
                r = gens.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(Ok(Bytes::from_static(b": keep-alive\n\n"))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}
