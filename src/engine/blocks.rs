//! File data as immutable blocks in an object store: the store that servers share.
//!
//! The layout follows JuiceFS's: a write becomes one or more new blocks (at most [`BLOCK_MAX`]
//! bytes, each an object under `blocks/` with a random name, written once and never changed)
//! and, in the metadata transaction of the write, a slice row per block saying which bytes of
//! the file it holds ([`SliceRow`]). A later write lies over earlier ones (a read paints the
//! slices oldest first); a truncate cuts slices short; a punched or zeroed range is a slice of
//! zeros. So a block is written **before** the metadata that refers to it commits, and nothing
//! but metadata changes inside a transaction (no data I/O there): a crash leaves at most blocks
//! nothing refers to, which [`BlockStore::gc`] deletes once they are older than a grace period
//! (a block written by a transaction still running is young).
//!
//! Blocks are shared freely: a volume clone copies slice rows, not blocks. A block goes only
//! when no slice of any volume refers to it.
//!
//! Reads come from a memory cache of whole blocks (blocks never change, so it is never stale),
//! then (for a remote store) a bounded cache of blocks on local disk ([`DiskCache`]), and then
//! the object store. The store is reached through the `object_store` crate: a local
//! directory (`file:///path`, each block synced to disk before its slice commits) or any S3
//! server (`s3://bucket?endpoint=...`).

use super::meta::SliceRow;
use crate::fs::{FsError, FsResult};
use bytes::Bytes;
use futures_util::StreamExt;
use lru::LruCache;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest block: a longer write is cut into blocks of this size.
pub const BLOCK_MAX: usize = 4 << 20;

/// How many bytes of blocks the memory cache holds at most by default.
pub const CACHE_DEFAULT: u64 = 64 << 20;

/// Blocks up to this size are cached as they are written (a small file is often read back
/// soon); larger ones, streams mostly, only when read.
const CACHE_ON_WRITE: usize = 256 << 10;

/// Idle connections to an S3 server are closed after this long.
const IDLE_CONNECTION: Duration = Duration::from_secs(10);

/// The default size of the on-disk block cache of a remote store.
pub const DISK_CACHE_DEFAULT: u64 = 1 << 30;

/// Blocks fetched from a remote store, kept as files in a local directory up to a size the
/// operator sets, least recently used out first. Each file is synced before it is renamed into
/// place, so after a crash a cached block is whole or absent; what the directory holds at start
/// is taken up again (oldest first in the LRU order).
pub struct DiskCache {
    dir: std::path::PathBuf,
    limit: u64,
    state: Mutex<DiskState>,
    /// Numbers each fill's temporary file (two threads may fill one block at once).
    fills: std::sync::atomic::AtomicU64,
}

struct DiskState {
    /// Block name → its size.
    lru: LruCache<String, u64>,
    bytes: u64,
    hits: u64,
    misses: u64,
}

impl DiskCache {
    pub fn open(dir: &std::path::Path, limit: u64) -> FsResult<DiskCache> {
        std::fs::create_dir_all(dir).map_err(|e| store_err(&format!("create the block cache {}", dir.display()), e))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| store_err(&format!("read the block cache {}", dir.display()), e))?.flatten() {
            let (path, name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
            match entry.metadata() {
                // A leftover of a fill that did not finish.
                Ok(_) if name.ends_with(".tmp") => drop(std::fs::remove_file(&path)),
                Ok(m) if m.is_file() => found.push((m.modified().ok(), name, m.len())),
                _ => {}
            }
        }
        found.sort();
        let mut state = DiskState { lru: LruCache::unbounded(), bytes: 0, hits: 0, misses: 0 };
        for (_, name, len) in found {
            state.bytes += len;
            state.lru.put(name, len);
        }
        let cache = DiskCache { dir: dir.to_path_buf(), limit, state: Mutex::new(state), fills: Default::default() };
        cache.trim(&mut cache.state.lock().unwrap());
        Ok(cache)
    }

    fn trim(&self, st: &mut DiskState) {
        while st.bytes > self.limit {
            let Some((key, len)) = st.lru.pop_lru() else { break };
            st.bytes -= len;
            let _ = std::fs::remove_file(self.dir.join(&key));
        }
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        let want = {
            let mut st = self.state.lock().unwrap();
            match st.lru.get(key).copied() {
                Some(len) => len,
                None => {
                    st.misses += 1;
                    return None;
                }
            }
        };
        // Read outside the lock (hits do not wait for each other); whole or not at all.
        let got = std::fs::read(self.dir.join(key)).ok().filter(|b| b.len() as u64 == want);
        let mut st = self.state.lock().unwrap();
        match got {
            Some(b) => {
                st.hits += 1;
                Some(Bytes::from(b))
            }
            None => {
                // Removed or damaged behind our back: forget it.
                if st.lru.peek(key) == Some(&want) {
                    st.lru.pop(key);
                    st.bytes -= want;
                }
                st.misses += 1;
                None
            }
        }
    }

    /// Keeps a copy of block `key`; a failure (a full disk) only means it is not cached.
    fn put(&self, key: &str, bytes: &[u8]) {
        use std::io::Write;
        if bytes.len() as u64 > self.limit || self.state.lock().unwrap().lru.contains(key) {
            return;
        }
        let n = self.fills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tmp, path) = (self.dir.join(format!("{key}.{n}.tmp")), self.dir.join(key));
        let written = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if written.and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut st = self.state.lock().unwrap();
        st.bytes += bytes.len() as u64;
        if let Some(old) = st.lru.put(key.to_string(), bytes.len() as u64) {
            st.bytes -= old;
        }
        self.trim(&mut st);
    }

    fn forget(&self, key: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(len) = st.lru.pop(key) {
            st.bytes -= len;
            let _ = std::fs::remove_file(self.dir.join(key));
        }
    }
}

pub struct BlockStore {
    store: Arc<dyn ObjectStore>,
    /// Blocks of a remote store on local disk (`None` for a local directory: it is one).
    disk: Option<DiskCache>,
    /// Where blocks live on this machine when the store is a local directory (synced there).
    local: Option<std::path::PathBuf>,
    rt: tokio::runtime::Runtime,
    cache: Mutex<Cache>,
    /// What this store is, for messages (`file:///...`, `s3://bucket`).
    pub url: String,
}

struct Cache {
    blocks: LruCache<String, Bytes>,
    bytes: u64,
    limit: u64,
    hits: u64,
    misses: u64,
}

/// What [`BlockStore::gc`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Blocks in the store.
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks some slice refers to.
    pub referenced: u64,
    /// Unreferenced blocks deleted, and their bytes.
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Unreferenced blocks kept because they are younger than the grace period (a write may be
    /// about to refer to them).
    pub young: u64,
}

/// Counters of the block cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    /// The on-disk cache's (zeros without one): what the memory cache missed.
    pub disk_hits: u64,
    pub disk_misses: u64,
    pub disk_bytes: u64,
}

fn store_err(what: &str, e: impl std::fmt::Display) -> FsError {
    FsError::new(libc::EIO, format!("block store: {what}: {e}"))
}

fn block_path(key: &str) -> ObjPath {
    ObjPath::from(format!("blocks/{}/{key}", &key[..2.min(key.len())]))
}

/// A fresh block name: 128 random bits in hex.
fn new_key() -> FsResult<String> {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(store_err("random block name", std::io::Error::last_os_error()));
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A block the write put in the store, for the transaction to refer to.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Where in the written bytes the block starts, and its length.
    pub at: u64,
    pub len: u64,
    pub key: String,
}

impl BlockStore {
    /// Opens the store at `url`: `file:///abs/dir`, or `s3://bucket` with `endpoint=URL`,
    /// `region=NAME`, `access_key_id=...`, `secret_access_key=...`, `prefix=PATH` (several stores
    /// in one bucket) as query parameters (the
    /// standard `AWS_*` variables fill what the URL leaves out).
    /// Blocks fetched are kept in `disk` (directory and size; `None` or size 0: no disk cache;
    /// worth it for a remote store only).
    pub fn open(url: &str, cache_bytes: u64, disk: Option<(&std::path::Path, u64)>) -> FsResult<BlockStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("block-store")
            .enable_all()
            .build()
            .map_err(|e| store_err("start its runtime", e))?;
        let (store, local, shown): (Arc<dyn ObjectStore>, _, _) = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(FsError::new(libc::EINVAL, format!("invalid block store {url:?}: expected file:///absolute/path")));
            }
            std::fs::create_dir_all(dir).map_err(|e| store_err(&format!("create {dir}"), e))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| store_err(dir, e))?;
            (Arc::new(fs), Some(std::path::PathBuf::from(dir)), url.to_string())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
            let bucket = bucket.trim_end_matches('/');
            if bucket.is_empty() {
                return Err(FsError::new(libc::EINVAL, format!("invalid block store {url:?}: no bucket (s3://BUCKET?endpoint=...)")));
            }
            let _guard = rt.enter();
            let client = object_store::ClientOptions::new().with_pool_idle_timeout(IDLE_CONNECTION).with_pool_max_idle_per_host(8);
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_client_options(client);
            let mut prefix = None;
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                b = match k {
                    "prefix" => {
                        prefix = Some(v.trim_matches('/').to_string());
                        b
                    }
                    "endpoint" => b.with_endpoint(v).with_allow_http(v.starts_with("http://")),
                    "region" => b.with_region(v),
                    "access_key_id" => b.with_access_key_id(v),
                    "secret_access_key" => b.with_secret_access_key(v),
                    other => {
                        return Err(FsError::new(
                            libc::EINVAL,
                            format!(
                                "invalid block store {url:?}: unknown parameter {other:?} (endpoint, region, access_key_id, secret_access_key, prefix)"
                            ),
                        ))
                    }
                };
            }
            if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() && !query.contains("region=") {
                b = b.with_region("us-east-1");
            }
            let s3 = b.build().map_err(|e| FsError::new(libc::EINVAL, format!("invalid block store {url:?}: {e}")))?;
            match prefix.filter(|p| !p.is_empty()) {
                // Several stores in one bucket, each under its own prefix.
                Some(p) => (Arc::new(object_store::prefix::PrefixStore::new(s3, p.as_str())), None, format!("s3://{bucket}/{p}")),
                None => (Arc::new(s3), None, format!("s3://{bucket}")),
            }
        } else {
            return Err(FsError::new(
                libc::EINVAL,
                format!("unknown block store {url:?}: expected file:///dir or s3://bucket?endpoint=..."),
            ));
        };
        let cache = Cache { blocks: LruCache::unbounded(), bytes: 0, limit: cache_bytes, hits: 0, misses: 0 };
        let disk = match disk {
            Some((dir, size)) if size > 0 => Some(DiskCache::open(dir, size)?),
            _ => None,
        };
        Ok(BlockStore { store, disk, local, rt, cache: Mutex::new(cache), url: shown })
    }

    /// Writes `data` as new blocks; returns them for the write's transaction to refer to.
    pub fn stage(&self, data: &[u8]) -> FsResult<Vec<Staged>> {
        let mut out = Vec::new();
        for (i, chunk) in data.chunks(BLOCK_MAX).enumerate() {
            let key = new_key()?;
            let bytes = Bytes::copy_from_slice(chunk);
            let path = block_path(&key);
            self.rt.block_on(self.store.put(&path, PutPayload::from(bytes.clone()))).map_err(|e| store_err(&format!("write {path}"), e))?;
            if let Some(dir) = &self.local {
                // object_store writes and renames without a sync: a block must be on disk before
                // the metadata that refers to it commits.
                let file = dir.join(path.as_ref());
                std::fs::File::open(&file).and_then(|f| f.sync_all()).map_err(|e| store_err(&format!("sync {}", file.display()), e))?;
                if let Some(parent) = file.parent() {
                    std::fs::File::open(parent).and_then(|f| f.sync_all()).map_err(|e| store_err("sync its directory", e))?;
                }
            }
            if bytes.len() <= CACHE_ON_WRITE {
                self.remember(&key, bytes);
            }
            out.push(Staged { at: (i * BLOCK_MAX) as u64, len: chunk.len() as u64, key });
        }
        Ok(out)
    }

    fn remember(&self, key: &str, bytes: Bytes) {
        let mut c = self.cache.lock().unwrap();
        if bytes.len() as u64 > c.limit {
            return;
        }
        c.bytes += bytes.len() as u64;
        if let Some(old) = c.blocks.put(key.to_string(), bytes) {
            c.bytes -= old.len() as u64;
        }
        while c.bytes > c.limit {
            match c.blocks.pop_lru() {
                Some((_, b)) => c.bytes -= b.len() as u64,
                None => break,
            }
        }
    }

    fn block(&self, key: &str) -> FsResult<Bytes> {
        {
            let mut c = self.cache.lock().unwrap();
            if let Some(b) = c.blocks.get(key).cloned() {
                c.hits += 1;
                return Ok(b);
            }
            c.misses += 1;
        }
        if let Some(b) = self.disk.as_ref().and_then(|d| d.get(key)) {
            self.remember(key, b.clone());
            return Ok(b);
        }
        let path = block_path(key);
        let bytes = self
            .rt
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| store_err(&format!("read block {key} (is the store the one this metadata was written with?)"), e))?;
        if let Some(d) = &self.disk {
            d.put(key, &bytes);
        }
        self.remember(key, bytes.clone());
        Ok(bytes)
    }

    /// Fills `buf` with the file's bytes from `offset`, painting `slices` (oldest first, as
    /// [`super::meta::MetaTxn::slices`] returns them) over zeros.
    pub fn read(&self, slices: &[SliceRow], offset: u64, buf: &mut [u8]) -> FsResult<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for s in slices {
            let from = s.off.max(offset);
            let to = (s.off + s.len).min(end);
            if from >= to {
                continue;
            }
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let Some(key) = &s.block else {
                dst.fill(0);
                continue;
            };
            let block = self.block(key)?;
            let at = (s.block_off + (from - s.off)) as usize;
            let have = block.len().saturating_sub(at).min(dst.len());
            dst[..have].copy_from_slice(&block[at..at + have]);
            dst[have..].fill(0);
        }
        Ok(())
    }

    /// Whether block `key` is in the store.
    pub fn exists(&self, key: &str) -> FsResult<bool> {
        match self.rt.block_on(self.store.head(&block_path(key))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(&format!("look up block {key}"), e)),
        }
    }

    /// Deletes the blocks older than `grace` that are in neither `referenced` nor what `again`
    /// returns (the references read again after the listing).
    pub fn gc(&self, referenced: &HashSet<String>, grace: Duration, again: &dyn Fn() -> FsResult<HashSet<String>>) -> FsResult<GcReport> {
        let prefix = ObjPath::from("blocks");
        let cutoff = unix_now() - grace.as_secs_f64();
        let mut report = GcReport::default();
        let mut doomed = Vec::new();
        self.rt.block_on(async {
            let mut list = self.store.list(Some(&prefix));
            while let Some(meta) = list.next().await {
                let meta = meta.map_err(|e| store_err("list blocks", e))?;
                let key = meta.location.filename().unwrap_or_default().to_string();
                report.blocks += 1;
                report.bytes += meta.size;
                if referenced.contains(&key) {
                    report.referenced += 1;
                } else if (meta.last_modified.timestamp_millis() as f64 / 1000.0) > cutoff {
                    report.young += 1;
                } else {
                    doomed.push((key, meta.location, meta.size));
                }
            }
            Ok::<_, FsError>(())
        })?;
        // Outside the runtime: the metadata store may run one of its own.
        let after = again()?;
        for (key, path, size) in doomed {
            if after.contains(&key) {
                report.referenced += 1;
                continue;
            }
            match self.rt.block_on(self.store.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    self.cache.lock().unwrap().blocks.pop(&key);
                    if let Some(d) = &self.disk {
                        d.forget(&key);
                    }
                    report.deleted += 1;
                    report.deleted_bytes += size;
                }
                Err(e) => return Err(store_err(&format!("delete {path}"), e)),
            }
        }
        Ok(report)
    }

    pub fn cache_stats(&self) -> CacheStats {
        let c = self.cache.lock().unwrap();
        let mut s = CacheStats { hits: c.hits, misses: c.misses, bytes: c.bytes, ..CacheStats::default() };
        if let Some(d) = &self.disk {
            let st = d.state.lock().unwrap();
            (s.disk_hits, s.disk_misses, s.disk_bytes) = (st.hits, st.misses, st.bytes);
        }
        s
    }

    /// A small object of the store's own (`store-id`), or `None`.
    pub fn get_meta(&self, name: &str) -> FsResult<Option<String>> {
        let path = ObjPath::from(name);
        match self.rt.block_on(async { self.store.get(&path).await?.bytes().await }) {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).trim().to_string())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(&format!("read {name}"), e)),
        }
    }

    pub fn put_meta(&self, name: &str, value: &str) -> FsResult<()> {
        let path = ObjPath::from(name);
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(Bytes::from(format!("{value}\n")))))
            .map(|_| ())
            .map_err(|e| store_err(&format!("write {name}"), e))
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The slices that a write of `len` bytes at `offset`, staged as `staged`, adds to its file.
pub fn slices_of(offset: u64, staged: &[Staged]) -> Vec<SliceRow> {
    staged.iter().map(|s| SliceRow { id: 0, off: offset + s.at, len: s.len, block: Some(s.key.clone()), block_off: 0 }).collect()
}

/// The slice that makes `[offset, offset+len)` read as zeros.
pub fn zeros(offset: u64, len: u64) -> SliceRow {
    SliceRow { id: 0, off: offset, len, block: None, block_off: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block store in a fresh directory, removed when the guard drops.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store(cache: u64) -> (Dir, BlockStore) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = Dir(std::env::temp_dir().join(format!("volumefs-blocks-{}-{n}", std::process::id())));
        let s = BlockStore::open(&format!("file://{}", d.0.display()), cache, None).unwrap();
        (d, s)
    }

    fn read(s: &BlockStore, slices: &[SliceRow], off: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0xEEu8; n];
        s.read(slices, off, &mut buf).unwrap();
        buf
    }

    #[test]
    fn later_slices_lie_over_earlier_ones_and_zero_slices_clear() {
        let (d, s) = store(CACHE_DEFAULT);
        let a = s.stage(b"aaaaaaaa").unwrap();
        let b = s.stage(b"bb").unwrap();
        let mut slices = slices_of(0, &a);
        slices.extend(slices_of(3, &b));
        slices.push(zeros(6, 1));
        assert_eq!(read(&s, &slices, 0, 10), b"aaabba\0a\0\0");
        assert_eq!(read(&s, &slices, 4, 3), b"ba\0");
        // Every block is a file of its own on disk, written once.
        assert!(d.0.join("blocks").join(&a[0].key[..2]).join(&a[0].key).exists());
        assert!(s.exists(&b[0].key).unwrap());
        assert!(!s.exists("00000000000000000000000000000000").unwrap());
    }

    #[test]
    fn a_long_write_is_cut_into_blocks_and_reads_back_from_the_store() {
        let (_d, s) = store(0);
        let data: Vec<u8> = (0..BLOCK_MAX + 1000).map(|i| (i % 251) as u8).collect();
        let staged = s.stage(&data).unwrap();
        assert_eq!(staged.len(), 2);
        assert_eq!((staged[1].at, staged[1].len), (BLOCK_MAX as u64, 1000));
        // No cache: every read goes to the store.
        assert_eq!(read(&s, &slices_of(0, &staged), BLOCK_MAX as u64 - 10, 20), data[BLOCK_MAX - 10..BLOCK_MAX + 10].to_vec());
        assert_eq!(s.cache_stats().bytes, 0);
        assert_eq!(s.cache_stats().misses, 2);
    }

    /// Blocks read are kept on local disk up to its size, least recently used out first, and
    /// served from there (the test removes a block from the store: it still reads); what the
    /// cache directory holds survives a restart, and a fill cut short is cleaned up.
    #[test]
    fn the_disk_cache_serves_what_was_read_within_its_size() {
        let (d, s0) = store(0);
        let cache_dir = d.0.join("cache");
        let s = BlockStore::open(&format!("file://{}", d.0.display()), 0, Some((&cache_dir, 250 << 10))).unwrap();
        drop(s0);
        let data = |c: u8| vec![c; 100 << 10];
        let keys: Vec<Vec<SliceRow>> = [b'a', b'b', b'c'].iter().map(|c| slices_of(0, &s.stage(&data(*c)).unwrap())).collect();
        let remove = |sl: &[SliceRow]| {
            let key = sl[0].block.clone().unwrap();
            std::fs::remove_file(d.0.join("blocks").join(&key[..2]).join(&key)).unwrap();
        };
        assert_eq!(read(&s, &keys[0], 0, 10), vec![b'a'; 10]);
        remove(&keys[0]);
        assert_eq!(read(&s, &keys[0], 0, 10), vec![b'a'; 10], "served from the disk cache");
        let st = s.cache_stats();
        assert_eq!((st.disk_hits, st.disk_misses, st.disk_bytes), (1, 1, 100 << 10));
        assert_eq!(read(&s, &keys[1], 0, 10), vec![b'b'; 10]);
        assert_eq!(read(&s, &keys[2], 0, 10), vec![b'c'; 10]);
        assert_eq!(s.cache_stats().disk_bytes, 200 << 10, "within its size: the least recently used went");
        let mut buf = vec![0u8; 10];
        assert_eq!(s.read(&keys[0], 0, &mut buf).unwrap_err().errno, libc::EIO, "a is gone from both");
        drop(s);
        std::fs::write(cache_dir.join("0123.tmp"), b"half").unwrap();
        let s = BlockStore::open(&format!("file://{}", d.0.display()), 0, Some((&cache_dir, 250 << 10))).unwrap();
        assert!(!cache_dir.join("0123.tmp").exists(), "an unfinished fill is removed");
        remove(&keys[1]);
        assert_eq!(read(&s, &keys[1], 0, 10), vec![b'b'; 10], "the cache outlives a restart");
    }

    /// Threads that miss the same block at once each fill the disk cache with it: every read
    /// still gets the whole block (fills do not share a temporary file).
    #[test]
    fn concurrent_fills_of_one_block_read_whole() {
        let (d, _s) = store(0);
        let cache_dir = d.0.join("cache");
        let s = Arc::new(BlockStore::open(&format!("file://{}", d.0.display()), 0, Some((&cache_dir, 64 << 20))).unwrap());
        for round in 0..10u8 {
            let data: Vec<u8> = (0..(1 << 20)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(round)).collect();
            let sl = Arc::new(slices_of(0, &s.stage(&data).unwrap()));
            let data = Arc::new(data);
            let readers: Vec<_> = (0..6)
                .map(|_| {
                    let (s, sl, data) = (s.clone(), sl.clone(), data.clone());
                    std::thread::spawn(move || {
                        for _ in 0..5 {
                            assert!(read(&s, &sl, 0, data.len()) == *data, "a short or mixed block was read");
                        }
                    })
                })
                .collect();
            readers.into_iter().for_each(|r| r.join().unwrap());
        }
        assert!(std::fs::read_dir(&cache_dir).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn gc_deletes_only_old_unreferenced_blocks() {
        let (_d, s) = store(CACHE_DEFAULT);
        let keep = s.stage(b"keep").unwrap().remove(0).key;
        let drop = s.stage(b"garbage").unwrap().remove(0).key;
        let referenced: HashSet<String> = [keep.clone()].into();
        let same = || Ok(referenced.clone());
        let r = s.gc(&referenced, Duration::from_secs(3600), &same).unwrap();
        assert_eq!((r.blocks, r.referenced, r.young, r.deleted), (2, 1, 1, 0));
        // A block referenced by the time the listing is done stays.
        let now_both = || Ok([keep.clone(), drop.clone()].into());
        let r = s.gc(&referenced, Duration::ZERO, &now_both).unwrap();
        assert_eq!((r.referenced, r.deleted), (2, 0));
        let r = s.gc(&referenced, Duration::ZERO, &same).unwrap();
        assert_eq!((r.blocks, r.referenced, r.young, r.deleted, r.deleted_bytes), (2, 1, 0, 1, 7));
        assert!(s.exists(&keep).unwrap());
        assert!(!s.exists(&drop).unwrap());
    }
}
