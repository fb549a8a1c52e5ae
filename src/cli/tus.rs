//! Resumable uploads of large files through the server's tus 1.0 endpoint: the file goes up in
//! one PATCH; when the connection drops or the server restarts, the CLI asks the server how much
//! it has (HEAD) and sends only the rest, retrying with backoff for up to [`PATIENCE`]. The upload's
//! URL is also kept in a small state file, so running the same `volumefs volume upload` again
//! after the CLI itself was interrupted resumes instead of starting over.

use super::client::{self, ApiError, Client};
use super::progress::{Progress, ReadProgress};
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Files at least this large go up resumably (smaller ones are one PUT).
pub const THRESHOLD: u64 = 8 << 20;
/// How long to keep trying to reach the server after a connection loss.
const PATIENCE: Duration = Duration::from_secs(120);

fn tus_headers() -> Vec<(&'static str, String)> {
    vec![("Tus-Resumable", "1.0.0".to_string())]
}

/// Where the URL of an upload in progress is remembered: one file per (server, volume, path,
/// local file, size, mtime), under `$XDG_STATE_HOME/volumefs/uploads` (or `~/.local/state/…`).
fn state_file(server: &str, volume: &str, path: &str, local: &Path, size: u64, mtime: i64) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    let local = std::fs::canonicalize(local).ok()?;
    let key = format!("{server}\n{volume}\n{path}\n{}\n{size}\n{mtime}", local.display());
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(key.as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect();
    Some(base.join("volumefs/uploads").join(hash))
}

fn offset_of(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    resp.headers().get("upload-offset").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Whether an error is worth retrying: the server was not reached or the exchange broke off, or
/// it answered that it is busy or unavailable.
fn transient(e: &ApiError) -> bool {
    e.status == 0 || e.status == 502 || e.status == 503 || e.status == 504
}

/// Uploads `local` (a regular file) to `path` resumably; the server's JSON-ish summary.
pub fn upload(client: &Client, server: &str, volume: &str, path: &str, local: &Path, parents: bool, quiet: bool) -> Result<Value, String> {
    let md = std::fs::metadata(local).map_err(|e| format!("cannot read {}: {e}", local.display()))?;
    let size = md.len();
    let mtime = md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs() as i64);
    let state = state_file(server, volume, path, local, size, mtime);
    let remembered = state.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).map(|s| s.trim().to_string());
    let create = || -> Result<String, String> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut meta = format!("path {}", b64(path));
        if parents {
            meta.push_str(&format!(",parents {}", b64("true")));
        }
        let mut h = tus_headers();
        h.push(("Upload-Length", size.to_string()));
        h.push(("Upload-Metadata", meta));
        let resp = client.exchange("POST", &format!("/v1/volumes/{}/uploads", client::segment(volume)), &h, None).map_err(|e| e.msg)?;
        let loc = resp.headers().get("location").and_then(|v| v.to_str().ok()).ok_or("the server gave the upload no Location")?;
        Ok(loc.to_string())
    };
    // A remembered upload the server still has is resumed; otherwise a new one is made.
    let (url, mut offset) = match remembered.as_deref().map(|u| (u, client.exchange("HEAD", u, &tus_headers(), None))) {
        Some((u, Ok(resp))) if offset_of(&resp).is_some() => {
            let off = offset_of(&resp).unwrap_or(0);
            eprintln!("volumefs: resuming an earlier upload of {} at {} of {} bytes", local.display(), off, size);
            (u.to_string(), off)
        }
        _ => (create()?, 0),
    };
    if let Some(f) = &state {
        let _ = std::fs::create_dir_all(f.parent().unwrap_or(Path::new("/")));
        let _ = std::fs::write(f, &url);
    }
    let mut file = std::fs::File::open(local).map_err(|e| format!("cannot open {}: {e}", local.display()))?;
    let mut progress = Progress::new(&local.display().to_string(), Some(size), quiet);
    progress.add(offset);
    let mut lost_since: Option<Instant> = None;
    let mut pause = Duration::from_millis(200);
    while offset < size {
        file.seek(SeekFrom::Start(offset)).map_err(|e| format!("reading {}: {e}", local.display()))?;
        let mut h = tus_headers();
        h.push(("Upload-Offset", offset.to_string()));
        h.push(("Content-Type", "application/offset+octet-stream".to_string()));
        // No length check here: `take` bounds the body and the progress already counts the offset.
        let mut body = ReadProgress::new((&mut file).take(size - offset), progress, None);
        let sent = client.exchange("PATCH", &url, &h, Some((&mut body, size - offset)));
        progress = body.progress;
        match sent {
            Ok(resp) => {
                offset = offset_of(&resp).unwrap_or(size);
                lost_since = None;
                pause = Duration::from_millis(200);
            }
            Err(e) if transient(&e) || e.status == 409 => {
                // Ask the server how far it got, waiting for it to come back if need be.
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > PATIENCE {
                    return Err(format!("{} (gave up after {PATIENCE:?}; run the same command again to resume)", e.msg));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
                if let Ok(resp) = client.exchange("HEAD", &url, &tus_headers(), None) {
                    if let Some(now) = offset_of(&resp) {
                        eprintln!("volumefs: the upload broke off ({}); resuming at byte {now} of {size}", e.msg);
                        progress = Progress::new(&local.display().to_string(), Some(size), quiet);
                        progress.add(now);
                        offset = now;
                    }
                }
            }
            Err(e) => return Err(e.msg),
        }
    }
    progress.finish();
    if let Some(f) = &state {
        let _ = std::fs::remove_file(f);
    }
    Ok(json!({"written": path, "size": size, "resumable": true}))
}
