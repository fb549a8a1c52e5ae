//! Differential test: the same random sequence of file operations runs on a volumefs mount and
//! on a local directory (ext4 on these machines), and after every step the outcome (success or
//! the errno) and the whole tree (names, kinds, sizes, bytes, link counts, modes, symlink
//! targets, user xattrs) must be the same. The local kernel filesystem is the reference model.

use crate::harness::*;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const NAMES: [&str; 5] = ["a", "b", "c", "d/e", "d/f"];

/// One step, applied the same way under `root`; the errno if it failed.
fn apply(root: &Path, op: u64, x: &str, y: &str, n: u64) -> Result<(), i32> {
    let (px, py) = (root.join(x), root.join(y));
    let r: std::io::Result<()> = match op {
        0 => std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&px).map(|_| ()),
        1 => std::fs::create_dir(&px),
        2 => std::fs::OpenOptions::new().write(true).open(&px).and_then(|f| f.write_all_at(&pattern((n % 9000) as usize, n), n % 20000)),
        3 => std::fs::OpenOptions::new()
            .append(true)
            .open(&px)
            .and_then(|f| std::io::Write::write_all(&mut &f, &pattern((n % 3000) as usize, n))),
        4 => std::fs::OpenOptions::new().write(true).open(&px).and_then(|f| f.set_len(n % 30000)),
        5 => std::fs::rename(&px, &py),
        6 => renameat2(&px, &py, [libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][(n % 2) as usize]),
        7 => std::fs::hard_link(&px, &py),
        8 => std::fs::remove_file(&px),
        9 => std::fs::remove_dir(&px),
        10 => std::os::unix::fs::symlink(y, &px),
        11 => std::fs::set_permissions(&px, std::fs::Permissions::from_mode(0o600 | (n as u32 & 0o77))),
        12 => setxattr(&px, "user.k", &pattern((n % 500) as usize, n), 0),
        _ => removexattr(&px, "user.k"),
    };
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Everything visible under `root`, as comparable text, in name order.
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(&rel)).unwrap().map(|e| e.unwrap().file_name()).collect();
        entries.sort();
        for name in entries {
            let rel = rel.join(&name);
            let p = root.join(&rel);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(rel.clone());
                format!("dir nlink={}", m.nlink())
            } else if ft.is_symlink() {
                format!("symlink -> {}", std::fs::read_link(&p).unwrap().display())
            } else {
                let data = std::fs::read(&p).unwrap();
                let sum = data.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64));
                let x = getxattr(&p, "user.k").map(|v| v.len() as i64).unwrap_or(-1);
                format!("file size={} sum={sum:x} nlink={} xattr={x}", m.len(), m.nlink())
            };
            let mode = if ft.is_symlink() { 0 } else { m.mode() & 0o7777 };
            out.push(format!("{} mode={mode:o} {what}", rel.display()));
        }
    }
    out
}

#[test]
fn a_mount_behaves_like_a_local_directory() {
    require_fuse!();
    let s = Single::new();
    let local = s.c.path("local");
    std::fs::create_dir(&local).unwrap();
    for r in [&local, &s.mnt] {
        std::fs::create_dir(r.join("d")).unwrap();
    }
    let mut rng = Rng(0xd1ff_0001);
    let mut failures = 0;
    for step in 0..1500 {
        let op = rng.below(14);
        let (x, y, n) = (NAMES[rng.below(5) as usize], NAMES[rng.below(5) as usize], rng.next());
        let want = apply(&local, op, x, y, n);
        let got = apply(&s.mnt, op, x, y, n);
        assert_eq!(got, want, "step {step}: op {op} on {x:?}, {y:?}: volumefs vs local (errno)");
        failures += want.is_err() as usize;
        let (a, b) = (snapshot(&s.mnt), snapshot(&local));
        assert_eq!(a, b, "step {step}: op {op} on {x:?}, {y:?}: trees differ");
    }
    eprintln!("differential: 1500 steps identical to the local directory ({failures} of them failing the same way)");
}
