//! The namespace: directories, unlink of open files, rename in all its flavours, hard links,
//! symlinks and fifos.

use crate::harness::*;
use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::thread;
use std::time::Duration;

#[test]
fn mkdir_and_exact_listing() {
    require_fuse!();
    let s = Single::new();
    let d = s.p("d");
    fs::create_dir(&d).unwrap();
    assert!(fs::metadata(&d).unwrap().is_dir());
    assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, 0o755);
    write(&d.join("x"), b"1");
    write(&d.join("y"), b"22");
    fs::create_dir(d.join("z")).unwrap();
    assert_eq!(list(&d), ["x", "y", "z"]);
    assert_eq!(list(&s.mnt), ["d"]);
    // The kinds come through readdir too (d_type).
    let kinds: Vec<(String, bool)> = fs::read_dir(&d)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.file_type().unwrap().is_dir())
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(kinds, [("x".into(), false), ("y".into(), false), ("z".into(), true)]);
    assert_errno("mkdir over an existing dir", fs::create_dir(&d), libc::EEXIST);
    assert_errno("mkdir over an existing file", fs::create_dir(d.join("x")), libc::EEXIST);
    assert_errno("mkdir under a file", fs::create_dir(d.join("x/sub")), libc::ENOTDIR);
    assert_errno("mkdir under a missing dir", fs::create_dir(s.p("nope/sub")), libc::ENOENT);
}

#[test]
fn rmdir_nonempty_then_empty() {
    require_fuse!();
    let s = Single::new();
    let d = s.p("d");
    fs::create_dir(&d).unwrap();
    write(&d.join("f"), b"x");
    assert_errno("rmdir of a non-empty dir", fs::remove_dir(&d), libc::ENOTEMPTY);
    assert_errno("rmdir of a file", fs::remove_dir(d.join("f")), libc::ENOTDIR);
    assert_errno("unlink of a dir", fs::remove_file(&d), libc::EISDIR);
    fs::remove_file(d.join("f")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert_errno("stat after rmdir", fs::metadata(&d), libc::ENOENT);
    assert_eq!(list(&s.mnt), Vec::<String>::new());
    assert_errno("rmdir of a missing dir", fs::remove_dir(&d), libc::ENOENT);
}

#[test]
fn five_hundred_files_listed() {
    require_fuse!();
    let s = Single::new();
    let d = s.p("many");
    fs::create_dir(&d).unwrap();
    let want: Vec<String> = (0..500).map(|i| format!("file-{i:04}")).collect();
    for name in &want {
        write(&d.join(name), name.as_bytes());
    }
    let got = list(&d);
    assert_eq!(got.len(), 500, "listing count");
    assert_eq!(got, want);
    // A second listing (readdir with cookies resuming) is identical.
    assert_eq!(list(&d), want);
    for name in ["file-0000", "file-0250", "file-0499"] {
        assert_eq!(read(&d.join(name)), name.as_bytes());
    }
    for name in want.iter().step_by(2) {
        fs::remove_file(d.join(name)).unwrap();
    }
    let rest: Vec<String> = want.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(list(&d), rest, "after deleting every other file");
}

#[test]
fn nested_directories() {
    require_fuse!();
    let s = Single::new();
    let deep = s.p("a/b/c/d/e/f/g/h");
    fs::create_dir_all(&deep).unwrap();
    write(&deep.join("leaf.txt"), b"deep");
    assert_eq!(read(&s.p("a/b/c/d/e/f/g/h/leaf.txt")), b"deep");
    assert_eq!(list(&s.p("a/b/c")), ["d"]);
    fs::create_dir(s.p("a/b/side")).unwrap();
    write(&s.p("a/b/side/s.txt"), b"side");
    assert_eq!(list(&s.p("a/b")), ["c", "side"]);
    // Relative lookups through `..` inside the volume.
    assert_eq!(read(&s.p("a/b/c/../side/s.txt")), b"side");
    fs::remove_dir_all(s.p("a")).unwrap();
    assert_errno("stat after rm -r", fs::metadata(s.p("a")), libc::ENOENT);
    assert_eq!(list(&s.mnt), Vec::<String>::new());
}

#[test]
fn unlink_open_file_keeps_data_until_close() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("doomed");
    let baseline = s.used();
    let data = pattern(4 * MIB as usize, 3);
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let with_file = s.used();
    assert!(with_file >= baseline + 4 * MIB, "used {with_file} after writing 4 MiB (baseline {baseline})");

    fs::remove_file(&p).unwrap();
    assert_errno("stat of the unlinked name", fs::metadata(&p), libc::ENOENT);
    assert!(!list(&s.mnt).contains(&"doomed".to_string()), "name still listed");
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat nlink of an unlinked open file");

    // Still readable (from the server, not only the page cache) ...
    let fd = {
        use std::os::unix::io::AsRawFd;
        f.as_raw_fd()
    };
    assert_eq!(unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let mut got = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).unwrap();
    assert_bytes_eq("read through the fd after unlink", &got, &data);
    // ... and writable.
    f.write_all_at(b"still alive", 4 * MIB).unwrap();
    f.sync_all().unwrap();
    assert_eq!(unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let mut tail = [0u8; 11];
    f.read_exact_at(&mut tail, 4 * MIB).unwrap();
    assert_eq!(&tail, b"still alive");
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB + 11);
    // A new file may take the old name meanwhile.
    write(&p, b"new");
    assert_eq!(read(&p), b"new");
    fs::remove_file(&p).unwrap();

    drop(f);
    let freed = eventually(Duration::from_secs(5), || s.used() <= baseline + 64 * KIB);
    assert!(freed.is_some(), "after the last close of an unlinked 4 MiB file, used stays {} (baseline {baseline})", s.used());
}

#[test]
fn rename_in_same_dir() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("a"), b"content-a");
    let ino = fs::metadata(s.p("a")).unwrap().ino();
    fs::rename(s.p("a"), s.p("b")).unwrap();
    assert_errno("old name after rename", fs::metadata(s.p("a")), libc::ENOENT);
    assert_eq!(read(&s.p("b")), b"content-a");
    assert_eq!(fs::metadata(s.p("b")).unwrap().ino(), ino, "rename keeps the inode");
    assert_eq!(list(&s.mnt), ["b"]);
    // Renaming onto itself is a no-op.
    fs::rename(s.p("b"), s.p("b")).unwrap();
    assert_eq!(read(&s.p("b")), b"content-a");
    assert_errno("rename of a missing name", fs::rename(s.p("a"), s.p("c")), libc::ENOENT);
}

#[test]
fn rename_across_dirs() {
    require_fuse!();
    let s = Single::new();
    fs::create_dir_all(s.p("src/inner")).unwrap();
    fs::create_dir(s.p("dst")).unwrap();
    write(&s.p("src/f"), b"file");
    write(&s.p("src/inner/g"), b"nested");
    fs::rename(s.p("src/f"), s.p("dst/f2")).unwrap();
    assert_eq!(read(&s.p("dst/f2")), b"file");
    assert_eq!(list(&s.p("src")), ["inner"]);
    // A directory moves with its contents.
    fs::rename(s.p("src/inner"), s.p("dst/moved")).unwrap();
    assert_eq!(read(&s.p("dst/moved/g")), b"nested");
    assert_eq!(list(&s.p("dst")), ["f2", "moved"]);
    assert_eq!(list(&s.p("src")), Vec::<String>::new());
    // A directory cannot move into its own subtree.
    assert_errno("rename of a dir into its own child", fs::rename(s.p("dst"), s.p("dst/moved/loop")), libc::EINVAL);
}

#[test]
fn rename_over_existing_file_replaces_it() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("a"), b"new contents");
    write(&s.p("b"), b"old contents that are longer");
    let ino_a = fs::metadata(s.p("a")).unwrap().ino();
    fs::rename(s.p("a"), s.p("b")).unwrap();
    assert_eq!(read(&s.p("b")), b"new contents");
    assert_eq!(fs::metadata(s.p("b")).unwrap().ino(), ino_a);
    assert_eq!(list(&s.mnt), ["b"]);
    drop_cache(&s.p("b"));
    assert_eq!(read(&s.p("b")), b"new contents");
    // Directory over an empty directory is allowed too.
    fs::create_dir(s.p("d1")).unwrap();
    write(&s.p("d1/inside"), b"i");
    fs::create_dir(s.p("d2")).unwrap();
    fs::rename(s.p("d1"), s.p("d2")).unwrap();
    assert_eq!(read(&s.p("d2/inside")), b"i");
    assert_eq!(list(&s.mnt), ["b", "d2"]);
}

#[test]
fn rename_noreplace_onto_existing_is_eexist() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("a"), b"A");
    write(&s.p("b"), b"B");
    assert_errno("RENAME_NOREPLACE onto existing", renameat2(&s.p("a"), &s.p("b"), RENAME_NOREPLACE), libc::EEXIST);
    assert_eq!(read(&s.p("a")), b"A");
    assert_eq!(read(&s.p("b")), b"B");
    renameat2(&s.p("a"), &s.p("c"), RENAME_NOREPLACE).unwrap();
    assert_eq!(list(&s.mnt), ["b", "c"]);
    assert_eq!(read(&s.p("c")), b"A");
}

#[test]
fn rename_exchange_swaps() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("a"), b"AAA");
    write(&s.p("b"), b"BBBBBB");
    let (ia, ib) = (fs::metadata(s.p("a")).unwrap().ino(), fs::metadata(s.p("b")).unwrap().ino());
    renameat2(&s.p("a"), &s.p("b"), RENAME_EXCHANGE).unwrap();
    assert_eq!(read(&s.p("a")), b"BBBBBB");
    assert_eq!(read(&s.p("b")), b"AAA");
    assert_eq!(fs::metadata(s.p("a")).unwrap().ino(), ib);
    assert_eq!(fs::metadata(s.p("b")).unwrap().ino(), ia);
    // Exchange a file with a directory, across directories.
    fs::create_dir(s.p("d")).unwrap();
    fs::create_dir(s.p("sub")).unwrap();
    write(&s.p("d/inside"), b"in d");
    renameat2(&s.p("a"), &s.p("sub"), RENAME_EXCHANGE).unwrap();
    assert!(fs::metadata(s.p("a")).unwrap().is_dir());
    assert_eq!(read(&s.p("sub")), b"BBBBBB");
    renameat2(&s.p("b"), &s.p("d/inside"), RENAME_EXCHANGE).unwrap();
    assert_eq!(read(&s.p("b")), b"in d");
    assert_eq!(read(&s.p("d/inside")), b"AAA");
    assert_errno("RENAME_EXCHANGE with a missing target", renameat2(&s.p("b"), &s.p("missing"), RENAME_EXCHANGE), libc::ENOENT);
}

#[test]
fn rename_dir_over_nonempty_dir_fails() {
    require_fuse!();
    let s = Single::new();
    fs::create_dir(s.p("a")).unwrap();
    write(&s.p("a/fa"), b"a");
    fs::create_dir(s.p("b")).unwrap();
    write(&s.p("b/fb"), b"b");
    let e = errno_of("rename dir over non-empty dir", fs::rename(s.p("a"), s.p("b")));
    assert!(
        e == libc::ENOTEMPTY || e == libc::EEXIST,
        "rename dir over non-empty dir: errno {}, expected ENOTEMPTY or EEXIST",
        errno_name(e)
    );
    assert_eq!(list(&s.p("a")), ["fa"]);
    assert_eq!(list(&s.p("b")), ["fb"]);
    // A dir over a file is ENOTDIR.
    write(&s.p("file"), b"f");
    assert_errno("rename dir over a file", fs::rename(s.p("a"), s.p("file")), libc::ENOTDIR);
}

#[test]
fn rename_file_over_dir_is_eisdir() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("f"), b"f");
    fs::create_dir(s.p("d")).unwrap();
    assert_errno("rename file over an (empty) dir", fs::rename(s.p("f"), s.p("d")), libc::EISDIR);
    assert_eq!(read(&s.p("f")), b"f");
    assert!(fs::metadata(s.p("d")).unwrap().is_dir());
}

#[test]
fn hard_links_share_the_inode() {
    require_fuse!();
    let s = Single::new();
    let (a, b) = (s.p("a"), s.p("dir/b"));
    fs::create_dir(s.p("dir")).unwrap();
    write(&a, b"shared");
    fs::hard_link(&a, &b).unwrap();
    let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    assert_eq!(ma.nlink(), 2);
    assert_eq!(mb.nlink(), 2);
    assert_eq!(ma.ino(), mb.ino());
    assert_eq!(read(&b), b"shared");
    // A write through one name is seen through the other.
    fs::OpenOptions::new().write(true).open(&b).unwrap().write_all_at(b"SH", 0).unwrap();
    assert_eq!(read(&a), b"SHared");
    drop_cache(&a);
    assert_eq!(read(&a), b"SHared");
    assert_errno("link onto an existing name", fs::hard_link(&a, &b), libc::EEXIST);
    assert_errno("link of a directory", fs::hard_link(s.p("dir"), s.p("dir2")), libc::EPERM);
    fs::remove_file(&a).unwrap();
    let mb = fs::metadata(&b).unwrap();
    assert_eq!(mb.nlink(), 1);
    assert_eq!(read(&b), b"SHared");
    assert_errno("stat of the removed link", fs::metadata(&a), libc::ENOENT);
}

#[test]
fn symlink_readlink_and_follow() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("target.txt"), b"through the link");
    std::os::unix::fs::symlink("target.txt", s.p("link")).unwrap();
    assert_eq!(fs::read_link(s.p("link")).unwrap(), Path::new("target.txt"));
    assert_eq!(read(&s.p("link")), b"through the link");
    let lmd = fs::symlink_metadata(s.p("link")).unwrap();
    assert!(lmd.file_type().is_symlink());
    assert_eq!(lmd.len(), "target.txt".len() as u64, "a symlink's size is its target's length");
    assert!(fs::metadata(s.p("link")).unwrap().is_file());
    // Relative through a directory, and a link to a directory.
    fs::create_dir(s.p("d")).unwrap();
    std::os::unix::fs::symlink("../target.txt", s.p("d/up")).unwrap();
    assert_eq!(read(&s.p("d/up")), b"through the link");
    std::os::unix::fs::symlink("d", s.p("dlink")).unwrap();
    assert_eq!(read(&s.p("dlink/up")), b"through the link");
    // A long target survives exactly.
    let long = "x/".repeat(500) + "end";
    std::os::unix::fs::symlink(&long, s.p("long")).unwrap();
    assert_eq!(fs::read_link(s.p("long")).unwrap(), Path::new(&long));
    assert_errno("symlink onto an existing name", std::os::unix::fs::symlink("t", s.p("link")), libc::EEXIST);
    assert_errno("readlink of a file", fs::read_link(s.p("target.txt")), libc::EINVAL);
}

#[test]
fn dangling_symlink() {
    require_fuse!();
    let s = Single::new();
    std::os::unix::fs::symlink("does/not/exist", s.p("dangling")).unwrap();
    std::os::unix::fs::symlink("/absolute/nowhere", s.p("abs")).unwrap();
    let md = fs::symlink_metadata(s.p("dangling")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(fs::read_link(s.p("dangling")).unwrap(), Path::new("does/not/exist"));
    assert_eq!(fs::read_link(s.p("abs")).unwrap(), Path::new("/absolute/nowhere"));
    assert_errno("stat of a dangling link", fs::metadata(s.p("dangling")), libc::ENOENT);
    assert_eq!(list(&s.mnt), ["abs", "dangling"]);
    fs::remove_file(s.p("dangling")).unwrap();
    assert_eq!(list(&s.mnt), ["abs"]);
}

#[test]
fn fifo_passes_bytes() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("pipe");
    mkfifo(&p, 0o644).unwrap();
    let md = fs::symlink_metadata(&p).unwrap();
    assert!(md.file_type().is_fifo(), "mkfifo made {:?}", md.file_type());
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(list(&s.mnt), ["pipe"]);
    let payload = pattern(200_000, 9); // more than a pipe buffer
    let writer = {
        let (p, payload) = (p.clone(), payload.clone());
        thread::spawn(move || {
            let mut w = OpenOptions::new().write(true).open(&p).unwrap();
            w.write_all(&payload).unwrap();
        })
    };
    let mut got = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_bytes_eq("bytes through the fifo", &got, &payload);
    // mknod(S_IFIFO) is the same thing.
    mknod(&s.p("pipe2"), libc::S_IFIFO | 0o600).unwrap();
    assert!(fs::symlink_metadata(s.p("pipe2")).unwrap().file_type().is_fifo());
    fs::remove_file(&p).unwrap();
    assert_eq!(list(&s.mnt), ["pipe2"]);
}

#[test]
fn rename_over_open_file_keeps_old_data_for_reader() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("target"), b"old target contents");
    write(&s.p("source"), b"new");
    let mut reader = fs::File::open(s.p("target")).unwrap();
    fs::rename(s.p("source"), s.p("target")).unwrap();
    assert_eq!(read(&s.p("target")), b"new");
    let mut got = Vec::new();
    reader.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"old target contents", "the replaced file's open handle");
    drop(reader);
    assert_eq!(list(&s.mnt), ["target"]);
}

#[test]
fn readdir_while_deleting_sees_every_entry_once() {
    // POSIX: entries neither added nor removed during the iteration are returned exactly once;
    // deleting the entries already returned must not make the cookies skip or repeat others.
    require_fuse!();
    let s = Single::new();
    let d = s.p("d");
    fs::create_dir(&d).unwrap();
    let want: BTreeSet<String> = (0..300).map(|i| format!("entry-{i:03}")).collect();
    for name in &want {
        write(&d.join(name), b"");
    }
    let mut seen = Vec::new();
    for e in fs::read_dir(&d).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        fs::remove_file(d.join(&name)).unwrap_or_else(|err| panic!("unlink {name} during readdir: {err}"));
        seen.push(name);
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "readdir returned some entries twice");
    let missed: Vec<&String> = want.difference(&unique).collect();
    assert!(missed.is_empty(), "readdir skipped {} entries while deleting, e.g. {:?}", missed.len(), &missed[..missed.len().min(5)]);
    assert_eq!(list(&d), Vec::<String>::new());
}
