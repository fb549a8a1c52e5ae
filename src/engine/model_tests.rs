//! The engine against a reference model: proptest drives random sequences of operations
//! (create, write at offsets, append, truncate, rename with flags, link, unlink with handles
//! open, mkdir, rmdir, xattrs, compaction, restart) through the real engine (SQLite + local blobs) and
//! through a plain in-memory model of POSIX, and after every step compares the outcome (the
//! errno, or success) and the whole visible state: the tree, each inode's kind, link count,
//! size, bytes and xattrs, held orphans, and the volume's usage. A failure shrinks to a short
//! sequence; pin it below as a named regression test.

use super::*;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeMap;

const CAP: u64 = 48 << 10;
const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
const XATTRS: [&[u8]; 2] = [b"user.x", b"user.y"];

#[derive(Debug, Clone)]
enum Step {
    Create(Index, usize),
    Mkdir(Index, usize),
    Write(Index, u64, usize, u8),
    Append(Index, usize, u8),
    Truncate(Index, u64),
    /// offset, length, mode (an index into FALLOC_MODES).
    Fallocate(Index, u64, u64, usize),
    /// source, its offset, destination, its offset, length.
    Copy(Index, u64, Index, u64, u64),
    Rename(Index, usize, Index, usize, u32),
    Link(Index, Index, usize),
    Unlink(Index, usize),
    Rmdir(Index, usize),
    SetXattr(Index, usize, usize),
    RemoveXattr(Index, usize),
    Hold(Index),
    Release(Index),
    /// A compaction of a file (a block store's background rewrite; nothing visible changes),
    /// whatever its number of slices.
    Compact(Index),
    Restart,
}

const FALLOC_MODES: [i32; 6] = [
    0,
    libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_ZERO_RANGE,
    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    // Refused (EOPNOTSUPP): punching must keep the size.
    libc::FALLOC_FL_PUNCH_HOLE,
];

fn step() -> impl Strategy<Value = Step> {
    let name = 0..NAMES.len();
    prop_oneof![
        3 => (any::<Index>(), name.clone()).prop_map(|(d, n)| Step::Create(d, n)),
        2 => (any::<Index>(), name.clone()).prop_map(|(d, n)| Step::Mkdir(d, n)),
        4 => (any::<Index>(), 0..9000u64, 0..4000usize, any::<u8>()).prop_map(|(f, o, l, b)| Step::Write(f, o, l, b)),
        2 => (any::<Index>(), 0..3000usize, any::<u8>()).prop_map(|(f, l, b)| Step::Append(f, l, b)),
        2 => (any::<Index>(), 0..12000u64).prop_map(|(f, s)| Step::Truncate(f, s)),
        2 => (any::<Index>(), 0..12000u64, 0..5000u64, 0..FALLOC_MODES.len()).prop_map(|(f, o, l, m)| Step::Fallocate(f, o, l, m)),
        2 => (any::<Index>(), 0..12000u64, any::<Index>(), 0..12000u64, 0..6000u64).prop_map(|(a, o, b, p, l)| Step::Copy(a, o, b, p, l)),
        3 => (any::<Index>(), name.clone(), any::<Index>(), name.clone(), prop_oneof![Just(0), Just(RENAME_NOREPLACE), Just(RENAME_EXCHANGE)])
            .prop_map(|(a, n, b, m, f)| Step::Rename(a, n, b, m, f)),
        2 => (any::<Index>(), any::<Index>(), name.clone()).prop_map(|(f, d, n)| Step::Link(f, d, n)),
        3 => (any::<Index>(), name.clone()).prop_map(|(d, n)| Step::Unlink(d, n)),
        1 => (any::<Index>(), name.clone()).prop_map(|(d, n)| Step::Rmdir(d, n)),
        2 => (any::<Index>(), 0..XATTRS.len(), 0..6000usize).prop_map(|(f, x, l)| Step::SetXattr(f, x, l)),
        1 => (any::<Index>(), 0..XATTRS.len()).prop_map(|(f, x)| Step::RemoveXattr(f, x)),
        2 => any::<Index>().prop_map(Step::Hold),
        2 => any::<Index>().prop_map(Step::Release),
        1 => any::<Index>().prop_map(Step::Compact),
        1 => Just(Step::Restart),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Ino>),
}

#[derive(Debug, Clone)]
struct Node {
    body: Body,
    nlink: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For a file, which bytes are stored (charged): may be shorter than the data (holes at the
    /// end) or longer (preallocated past the end).
    stored: Vec<bool>,
    /// Handles the test holds on it (open files keep unlinked inodes alive).
    handles: u32,
}

/// POSIX as a map of inodes, keyed by the engine's inode numbers (they are stable).
struct Model {
    nodes: BTreeMap<Ino, Node>,
}

type Outcome = Result<(), i32>;

impl Model {
    fn new() -> Model {
        let root = Node { body: Body::Dir(BTreeMap::new()), nlink: 2, xattrs: BTreeMap::new(), stored: Vec::new(), handles: 0 };
        Model { nodes: BTreeMap::from([(ROOT_INO, root)]) }
    }

    fn used(&self) -> u64 {
        let xattrs: usize = self.nodes.values().flat_map(|n| n.xattrs.iter()).map(|(k, v)| k.len() + v.len()).sum();
        let data: usize = self.nodes.values().map(|n| n.stored.iter().filter(|b| **b).count()).sum();
        (data + xattrs) as u64
    }

    fn fits(&self, grow: i64) -> Outcome {
        if grow > 0 && self.used() + grow as u64 > CAP {
            Err(libc::EDQUOT)
        } else {
            Ok(())
        }
    }

    /// How many bytes of `[start, end)` of `ino` are not stored yet.
    fn unstored(&self, ino: Ino, start: u64, end: u64) -> i64 {
        let st = &self.nodes[&ino].stored;
        (start..end).filter(|i| !st.get(*i as usize).copied().unwrap_or(false)).count() as i64
    }

    /// Marks `[start, end)` of `ino` stored (`true`) or a hole.
    fn store(&mut self, ino: Ino, start: u64, end: u64, on: bool) {
        let st = &mut self.nodes.get_mut(&ino).unwrap().stored;
        if on && st.len() < end as usize {
            st.resize(end as usize, false);
        }
        for i in start as usize..(end as usize).min(st.len()) {
            st[i] = on;
        }
    }

    fn data_mut(&mut self, ino: Ino) -> &mut Vec<u8> {
        match &mut self.nodes.get_mut(&ino).unwrap().body {
            Body::File(d) => d,
            Body::Dir(_) => unreachable!("not a file"),
        }
    }

    fn children(&self, dir: Ino) -> &BTreeMap<Vec<u8>, Ino> {
        match &self.nodes[&dir].body {
            Body::Dir(c) => c,
            Body::File(_) => unreachable!("not a directory"),
        }
    }

    fn children_mut(&mut self, dir: Ino) -> &mut BTreeMap<Vec<u8>, Ino> {
        match &mut self.nodes.get_mut(&dir).unwrap().body {
            Body::Dir(c) => c,
            Body::File(_) => unreachable!("not a directory"),
        }
    }

    fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.nodes[&ino].body, Body::Dir(_))
    }

    /// Directories reachable from the root, and files anywhere (named or held), in a stable order.
    fn dirs(&self) -> Vec<Ino> {
        let mut out = vec![ROOT_INO];
        let mut i = 0;
        while i < out.len() {
            let d = out[i];
            out.extend(self.children(d).values().filter(|c| self.is_dir(**c)));
            i += 1;
        }
        out
    }

    fn files(&self) -> Vec<Ino> {
        self.nodes.iter().filter(|(_, n)| matches!(n.body, Body::File(_))).map(|(i, _)| *i).collect()
    }

    /// Whether directory `a` is `b` or lies below it.
    fn under(&self, mut a: Ino, b: Ino) -> bool {
        loop {
            if a == b {
                return true;
            }
            if a == ROOT_INO {
                return false;
            }
            a = self.parent_of(a);
        }
    }

    fn parent_of(&self, dir: Ino) -> Ino {
        *self.nodes.iter().find(|(_, n)| matches!(&n.body, Body::Dir(c) if c.values().any(|v| *v == dir))).unwrap().0
    }

    /// Drops one name of `ino`; frees it when no name and no handle is left.
    fn unname(&mut self, ino: Ino) {
        let n = self.nodes.get_mut(&ino).unwrap();
        n.nlink = if matches!(n.body, Body::Dir(_)) { 0 } else { n.nlink - 1 };
        if n.nlink == 0 && n.handles == 0 {
            self.nodes.remove(&ino);
        }
    }

    /// Every directory's entries: the namespace.
    fn names(&self) -> Vec<(Ino, BTreeMap<Vec<u8>, Ino>)> {
        self.nodes.iter().filter_map(|(i, n)| if let Body::Dir(c) = &n.body { Some((*i, c.clone())) } else { None }).collect()
    }

    fn set_dir_links(&mut self, dir: Ino) {
        let subdirs = self.children(dir).values().filter(|c| self.is_dir(**c)).count() as u32;
        self.nodes.get_mut(&dir).unwrap().nlink = 2 + subdirs;
    }

    fn rename(&mut self, sp: Ino, name: &[u8], dp: Ino, new: &[u8], flags: u32) -> Outcome {
        let src = *self.children(sp).get(name).ok_or(libc::ENOENT)?;
        let dst = self.children(dp).get(new).copied();
        if self.is_dir(src) && sp != dp && self.under(dp, src) {
            return Err(libc::EINVAL);
        }
        if flags == RENAME_EXCHANGE {
            let dst = dst.ok_or(libc::ENOENT)?;
            if dst == src {
                return Ok(());
            }
            if self.is_dir(dst) && sp != dp && self.under(sp, dst) {
                return Err(libc::EINVAL);
            }
            self.children_mut(sp).insert(name.to_vec(), dst);
            self.children_mut(dp).insert(new.to_vec(), src);
        } else {
            if let Some(dst) = dst {
                if flags == RENAME_NOREPLACE {
                    return Err(libc::EEXIST);
                }
                if dst == src {
                    return Ok(());
                }
                match (self.is_dir(src), self.is_dir(dst)) {
                    (true, false) => return Err(libc::ENOTDIR),
                    (false, true) => return Err(libc::EISDIR),
                    (true, true) if !self.children(dst).is_empty() => return Err(libc::ENOTEMPTY),
                    _ => {}
                }
                self.children_mut(dp).remove(new);
                self.unname(dst);
            }
            self.children_mut(sp).remove(name);
            self.children_mut(dp).insert(new.to_vec(), src);
        }
        self.set_dir_links(sp);
        self.set_dir_links(dp);
        Ok(())
    }
}

struct Real {
    engine: Option<Engine>,
    vol: VolId,
    dir: std::path::PathBuf,
    /// The last request number of the guest whose writes these are.
    seq: u64,
}

impl Real {
    /// A write as a guest makes it: on a block store, held back while the file is open (see
    /// `engine::buffer`), so the steps after it (reads, truncates, copies, compaction, a
    /// restart that replays the journal) meet held-back bytes.
    fn guest_write(&mut self, ino: Ino, off: u64, data: &[u8], append: bool) -> FsResult<(u64, Attr)> {
        self.seq += 1;
        let (e, v) = (self.engine.as_ref().unwrap(), self.vol);
        e.recording(1, self.seq, || e.write_behind(v, ino, off, data, append, &Caller::root()))
    }
}

impl Drop for Real {
    fn drop(&mut self) {
        self.engine = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn errno_of<T>(r: FsResult<T>) -> Result<T, i32> {
    r.map_err(|e| e.errno)
}

fn pick(list: &[Ino], i: &Index) -> Option<Ino> {
    (!list.is_empty()).then(|| list[i.index(list.len())])
}

/// Runs one step on both sides; returns the two outcomes.
fn apply(m: &mut Model, r: &mut Real, s: &Step) -> (Outcome, Outcome) {
    let c = Caller::root();
    let v = r.vol;
    let dirs = m.dirs();
    let files = m.files();
    let e = r.engine.as_ref().unwrap();
    let skip = (Ok(()), Ok(()));
    match s {
        Step::Create(d, n) | Step::Mkdir(d, n) => {
            let (d, name) = (pick(&dirs, d).unwrap(), NAMES[*n]);
            let dir = matches!(s, Step::Mkdir(..));
            let got = if dir { e.mkdir(v, d, name, 0o755, 0, &c) } else { e.create(v, d, name, 0o644, 0, &c) };
            let want = if m.children(d).contains_key(name) { Err(libc::EEXIST) } else { Ok(()) };
            let got = match got {
                Ok(a) => {
                    if !dir {
                        e.release(v, a.ino).unwrap();
                    }
                    let body = if dir { Body::Dir(BTreeMap::new()) } else { Body::File(Vec::new()) };
                    let node = Node { body, nlink: if dir { 2 } else { 1 }, xattrs: BTreeMap::new(), stored: Vec::new(), handles: 0 };
                    m.nodes.insert(a.ino, node);
                    m.children_mut(d).insert(name.to_vec(), a.ino);
                    m.set_dir_links(d);
                    Ok(())
                }
                Err(err) => Err(err.errno),
            };
            (want, got)
        }
        Step::Write(f, off, len, byte) => {
            let Some(f) = pick(&files, f) else { return skip };
            let data = vec![*byte; *len];
            let Body::File(cur) = &m.nodes[&f].body else { unreachable!() };
            let end = (*off as usize + len).max(cur.len());
            let want = m.fits(m.unstored(f, *off, *off + *len as u64));
            let got = errno_of(r.guest_write(f, *off, &data, false)).map(|_| ());
            if want.is_ok() && got.is_ok() {
                m.store(f, *off, *off + *len as u64, true);
                let cur = m.data_mut(f);
                cur.resize(end, 0);
                cur[*off as usize..*off as usize + len].copy_from_slice(&data);
            }
            (want, got)
        }
        Step::Append(f, len, byte) => {
            let Some(f) = pick(&files, f) else { return skip };
            let at = m.data_mut(f).len() as u64;
            let want = m.fits(m.unstored(f, at, at + *len as u64));
            let got = errno_of(r.guest_write(f, 0, &vec![*byte; *len], true)).map(|_| ());
            if want.is_ok() && got.is_ok() {
                m.store(f, at, at + *len as u64, true);
                m.data_mut(f).extend(std::iter::repeat_n(*byte, *len));
            }
            (want, got)
        }
        Step::Truncate(f, size) => {
            let Some(f) = pick(&files, f) else { return skip };
            // Growing makes a hole (free); cutting frees everything past the new end.
            let got = errno_of(e.setattr(v, f, &SetAttr { size: Some(*size), ..Default::default() }, &c)).map(|_| ());
            if got.is_ok() {
                if (*size as usize) < m.data_mut(f).len() {
                    m.nodes.get_mut(&f).unwrap().stored.truncate(*size as usize);
                }
                m.data_mut(f).resize(*size as usize, 0);
            }
            (Ok(()), got)
        }
        Step::Fallocate(f, off, len, mode) => {
            let Some(f) = pick(&files, f) else { return skip };
            let mode = FALLOC_MODES[*mode];
            let (off, end) = (*off, *off + *len);
            let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            let want = if *len == 0 {
                Err(libc::EINVAL)
            } else if mode == libc::FALLOC_FL_PUNCH_HOLE {
                Err(libc::EOPNOTSUPP)
            } else if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                Ok(())
            } else {
                m.fits(m.unstored(f, off, end))
            };
            let got = errno_of(e.fallocate(v, f, off, *len, mode, &c)).map(|_| ());
            if want.is_ok() && got.is_ok() {
                let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
                m.store(f, off, end, !punch);
                let cur = m.data_mut(f);
                if punch || mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                    let stop = (end as usize).min(cur.len());
                    if (off as usize) < stop {
                        cur[off as usize..stop].fill(0);
                    }
                }
                if !keep && end as usize > cur.len() {
                    cur.resize(end as usize, 0);
                }
            }
            (want, got)
        }
        Step::Copy(a, off, b, doff, len) => {
            let (Some(src), Some(dst)) = (pick(&files, a), pick(&files, b)) else { return skip };
            let src_data = m.data_mut(src).clone();
            let n = (*len).min((src_data.len() as u64).saturating_sub(*off));
            let want = if n > 0 && src == dst && *off < doff + n && *doff < off + n {
                Err(libc::EINVAL)
            } else {
                // The destination range becomes the source range, holes included.
                let src_stored = &m.nodes[&src].stored;
                let held = |i: u64| src_stored.get(i as usize).copied().unwrap_or(false);
                let need: i64 = (0..n).filter(|i| held(off + i)).count() as i64 - (n as i64 - m.unstored(dst, *doff, doff + n));
                m.fits(need)
            };
            let got = errno_of(e.copy_range(v, src, *off, dst, *doff, *len, &c)).and_then(|(k, _)| if k == n { Ok(()) } else { Err(-1) });
            if want.is_ok() && got.is_ok() && n > 0 {
                let src_stored = m.nodes[&src].stored.clone();
                for i in 0..n {
                    let on = src_stored.get((off + i) as usize).copied().unwrap_or(false);
                    m.store(dst, doff + i, doff + i + 1, on);
                }
                let cur = m.data_mut(dst);
                let end = (doff + n) as usize;
                if cur.len() < end {
                    cur.resize(end, 0);
                }
                cur[*doff as usize..end].copy_from_slice(&src_data[*off as usize..(off + n) as usize]);
            }
            (want, got)
        }
        Step::Rename(a, n, b, k, flags) => {
            let (sp, dp) = (pick(&dirs, a).unwrap(), pick(&dirs, b).unwrap());
            let got = errno_of(e.rename(v, sp, NAMES[*n], dp, NAMES[*k], *flags, &c));
            let mut trial = Model { nodes: m.nodes.clone() };
            let want = trial.rename(sp, NAMES[*n], dp, NAMES[*k], *flags);
            if want.is_ok() {
                *m = trial;
            }
            (want, got)
        }
        Step::Link(f, d, n) => {
            let named: Vec<Ino> = files.iter().copied().filter(|f| m.nodes[f].nlink > 0).collect();
            let Some(f) = pick(&named, f) else { return skip };
            let (d, name) = (pick(&dirs, d).unwrap(), NAMES[*n]);
            let want = if m.children(d).contains_key(name) { Err(libc::EEXIST) } else { Ok(()) };
            let got = errno_of(e.link(v, f, d, name, &c)).map(|_| ());
            if want.is_ok() {
                m.children_mut(d).insert(name.to_vec(), f);
                m.nodes.get_mut(&f).unwrap().nlink += 1;
            }
            (want, got)
        }
        Step::Unlink(d, n) | Step::Rmdir(d, n) => {
            let (d, name) = (pick(&dirs, d).unwrap(), NAMES[*n]);
            let rmdir = matches!(s, Step::Rmdir(..));
            let got = errno_of(if rmdir { e.rmdir(v, d, name, &c) } else { e.unlink(v, d, name, &c) });
            let want = match m.children(d).get(name).copied() {
                None => Err(libc::ENOENT),
                Some(t) if rmdir && !m.is_dir(t) => Err(libc::ENOTDIR),
                Some(t) if !rmdir && m.is_dir(t) => Err(libc::EISDIR),
                Some(t) if rmdir && !m.children(t).is_empty() => Err(libc::ENOTEMPTY),
                Some(t) => {
                    m.children_mut(d).remove(name);
                    m.unname(t);
                    m.set_dir_links(d);
                    Ok(())
                }
            };
            (want, got)
        }
        Step::SetXattr(f, x, len) => {
            let Some(f) = pick(&files, f) else { return skip };
            let (name, value) = (XATTRS[*x], vec![7u8; *len]);
            let old = m.nodes[&f].xattrs.get(name).map_or(0, |v| name.len() + v.len());
            let want = m.fits((name.len() + len) as i64 - old as i64);
            let got = errno_of(e.setxattr(v, f, name, &value, 0, &c));
            if want.is_ok() && got.is_ok() {
                m.nodes.get_mut(&f).unwrap().xattrs.insert(name.to_vec(), value);
            }
            (want, got)
        }
        Step::RemoveXattr(f, x) => {
            let Some(f) = pick(&files, f) else { return skip };
            let want = match m.nodes.get_mut(&f).unwrap().xattrs.remove(XATTRS[*x]) {
                Some(_) => Ok(()),
                None => Err(libc::ENODATA),
            };
            (want, errno_of(e.removexattr(v, f, XATTRS[*x], &c)))
        }
        Step::Hold(f) => {
            let Some(f) = pick(&files, f) else { return skip };
            let got = errno_of(e.open(v, f, libc::O_RDWR, &c)).map(|_| ());
            m.nodes.get_mut(&f).unwrap().handles += 1;
            (Ok(()), got)
        }
        Step::Release(f) => {
            let held: Vec<Ino> = files.iter().copied().filter(|f| m.nodes[f].handles > 0).collect();
            let Some(f) = pick(&held, f) else { return skip };
            let got = errno_of(e.release(v, f));
            let n = m.nodes.get_mut(&f).unwrap();
            n.handles -= 1;
            if n.handles == 0 && n.nlink == 0 {
                m.nodes.remove(&f);
            }
            (Ok(()), got)
        }
        Step::Compact(f) => {
            let Some(f) = pick(&files, f) else { return skip };
            (Ok(()), errno_of(e.compact_over(v, f, 0)).map(|_| ()))
        }
        Step::Restart => {
            // Handles do not outlive the engine; orphans are reclaimed at the next start.
            r.engine = None;
            r.engine = Some(super::test_engine(&r.dir));
            // No guest reconnects here: the grace period passes and the orphans go.
            r.engine.as_ref().unwrap().reclaim_orphans().unwrap();
            m.nodes.retain(|_, n| n.nlink > 0);
            for n in m.nodes.values_mut() {
                n.handles = 0;
            }
            skip
        }
    }
}

/// Compares everything visible: the tree from the root, every inode's attributes, bytes and
/// xattrs, held orphans, and the volume's usage.
fn compare(m: &Model, r: &Real) -> Result<(), String> {
    let e = r.engine.as_ref().unwrap();
    let v = r.vol;
    let c = Caller::root();
    let mut stack = vec![ROOT_INO];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(d) = stack.pop() {
        let listed: BTreeMap<Vec<u8>, Ino> = e
            .readdir(v, d, 0, 4096, false)
            .map_err(|x| x.to_string())?
            .into_iter()
            .filter(|x| x.name != b"." && x.name != b"..")
            .map(|x| (x.name, x.ino))
            .collect();
        if &listed != m.children(d) {
            return Err(format!("directory {d}: engine lists {listed:?}, model {:?}", m.children(d)));
        }
        for ino in listed.values() {
            if seen.insert(*ino) && m.is_dir(*ino) {
                stack.push(*ino);
            }
        }
    }
    for (ino, n) in &m.nodes {
        let a = e.getattr(v, *ino).map_err(|x| format!("inode {ino}: {x}"))?;
        if a.nlink != n.nlink {
            return Err(format!("inode {ino}: nlink {} in the engine, {} in the model", a.nlink, n.nlink));
        }
        if let Body::File(data) = &n.body {
            let got = if data.is_empty() { Vec::new() } else { e.read(v, *ino, 0, data.len() as u32 + 1).map_err(|x| x.to_string())? };
            if a.size != data.len() as u64 || &got != data {
                return Err(format!("inode {ino}: size {} and {} bytes read, model has {} bytes", a.size, got.len(), data.len()));
            }
            let stored = n.stored.iter().filter(|b| **b).count() as u64;
            if a.alloc != stored {
                return Err(format!("inode {ino}: {} bytes stored in the engine, {stored} in the model", a.alloc));
            }
            // SEEK_DATA / SEEK_HOLE walk the file: the data runs they find are the model's.
            let mut found = vec![false; data.len()];
            let mut pos = 0;
            while let Ok(start) = e.lseek(v, *ino, pos, libc::SEEK_DATA) {
                let stop = e.lseek(v, *ino, start, libc::SEEK_HOLE).map_err(|x| x.to_string())?;
                found[start as usize..stop as usize].fill(true);
                pos = stop;
                if pos >= a.size {
                    break;
                }
            }
            let want: Vec<bool> = (0..data.len()).map(|i| n.stored.get(i).copied().unwrap_or(false)).collect();
            if found != want {
                return Err(format!("inode {ino}: SEEK_DATA/SEEK_HOLE disagree with the model's stored bytes"));
            }
        }
        if a.xattrs == n.xattrs.is_empty() {
            return Err(format!("inode {ino}: xattr flag {} in the engine, {} xattrs in the model", a.xattrs, n.xattrs.len()));
        }
        let names = e.listxattr(v, *ino, &c).map_err(|x| x.to_string())?;
        let want: Vec<u8> = n.xattrs.keys().flat_map(|k| k.iter().copied().chain([0])).collect();
        let mut got_names: Vec<&[u8]> = names.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
        got_names.sort();
        let want_names: Vec<&[u8]> = want.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
        if got_names != want_names {
            return Err(format!("inode {ino}: xattrs {got_names:?}, model {want_names:?}"));
        }
        for (k, val) in &n.xattrs {
            if &e.getxattr(v, *ino, k, &c).map_err(|x| x.to_string())? != val {
                return Err(format!("inode {ino}: xattr {k:?} differs"));
            }
        }
    }
    let used = e.volume_by_id(v).map_err(|x| x.to_string())?.used;
    if used != m.used() {
        return Err(format!("usage {used} in the engine, {} in the model", m.used()));
    }
    Ok(())
}

fn run(steps: &[Step]) -> Result<(), String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir =
        std::env::temp_dir().join(format!("volumefs-model-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = super::test_engine(&dir);
    let vol = engine.create_volume("v", CAP).unwrap().id;
    let mut r = Real { engine: Some(engine), vol, dir, seq: 0 };
    let mut m = Model::new();
    let mut last = 0;
    for (i, s) in steps.iter().enumerate() {
        let names = m.names();
        let (want, got) = apply(&mut m, &mut r, s);
        if want != got {
            return Err(format!("step {i} {s:?}: model says {want:?}, engine says {got:?}"));
        }
        compare(&m, &r).map_err(|e| format!("after step {i} {s:?}: {e}"))?;
        last = check_log(&r, last, m.names() != names).map_err(|e| format!("after step {i} {s:?}: {e}"))?;
    }
    Ok(())
}

/// The change log's ids strictly increase and never go back, across restarts too; a step that
/// changed the namespace logged something. Returns the newest id.
fn check_log(r: &Real, last: u64, logged: bool) -> Result<u64, String> {
    let e = r.engine.as_ref().unwrap();
    let page = e.changes(r.vol, 0, changelog::MAX_CHANGES_PAGE).map_err(|x| x.to_string())?;
    if page.events.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(format!("change ids do not increase: {:?}", page.events.iter().map(|c| c.id).collect::<Vec<_>>()));
    }
    let newest = e.last_change_id(r.vol).map_err(|x| x.to_string())?;
    if page.events.last().map_or(0, |c| c.id) != newest || newest < last || (logged && newest == last) {
        return Err(format!("newest change id {newest} after {last} (a change was logged: {logged})"));
    }
    Ok(newest)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_model(steps in prop::collection::vec(step(), 1..48)) {
        run(&steps).map_err(TestCaseError::fail)?;
    }
}
