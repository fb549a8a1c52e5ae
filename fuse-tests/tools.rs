//! Ordinary shell tools over a tree of ~200 files: `cp -r`, `diff -r`, `ls -la`, `cat`, `mv`,
//! `ln -s`, `rm -rf`, checked against a local copy in the test's temporary directory.

use crate::harness::*;
use std::fs;
use std::path::Path;
use std::time::Duration;

/// 10 directories x 20 files of assorted sizes, a nested directory, an empty file, an empty
/// directory and a relative symlink.
fn make_tree(root: &Path) -> usize {
    let mut files = 0;
    for d in 0..10 {
        let dir = root.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..20 {
            let n = d * 20 + f;
            let len = (n * 7919) % 70_000;
            fs::write(dir.join(format!("f{f:03}.dat")), pattern(len, n as u64)).unwrap();
            files += 1;
        }
    }
    fs::create_dir_all(root.join("d00/deep/deeper")).unwrap();
    fs::write(root.join("d00/deep/deeper/leaf"), b"leaf\n").unwrap();
    fs::write(root.join("d01/empty"), b"").unwrap();
    fs::create_dir(root.join("emptydir")).unwrap();
    std::os::unix::fs::symlink("../d01/f001.dat", root.join("d02/link")).unwrap();
    files + 3
}

#[test]
fn shell_tools_over_a_tree() {
    require_fuse!();
    let s = Single::new();
    let local = s.c.path("local");
    let n = make_tree(&local);
    assert!(n >= 200);
    let (l, m) = (local.display().to_string(), s.mnt.display().to_string());

    sh(&format!("cp -r {l} {m}/tree"));
    sh(&format!("diff -r {l} {m}/tree"));
    assert_eq!(fs::read_link(s.p("tree/d02/link")).unwrap(), Path::new("../d01/f001.dat"), "cp -r copies the symlink as a symlink");

    let ls = sh(&format!("ls -la {m}/tree/d03"));
    let lines: Vec<&str> = ls.lines().collect();
    // "total N", ".", "..", then the 20 files.
    assert_eq!(lines.len(), 23, "ls -la output:\n{ls}");
    for f in 0..20 {
        assert!(ls.contains(&format!("f{f:03}.dat")), "ls -la lacks f{f:03}.dat:\n{ls}");
    }
    assert!(lines[1].starts_with('d') && lines[1].ends_with(" ."), "ls -la line: {}", lines[1]);
    let ls_link = sh(&format!("ls -la {m}/tree/d02/link"));
    assert!(ls_link.starts_with('l') && ls_link.trim_end().ends_with("-> ../d01/f001.dat"), "{ls_link}");

    let cat = sh(&format!("cat {m}/tree/d00/deep/deeper/leaf {m}/tree/d02/link | od -An -tx1 | tr -d ' \\n'"));
    let mut want = b"leaf\n".to_vec();
    want.extend_from_slice(&fs::read(local.join("d01/f001.dat")).unwrap());
    let want_hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
    assert!(cat == want_hex, "cat through the mount differs from the local files");

    // mv inside the mount (rename of a populated directory, and of a file across dirs), the
    // same moves locally, then compare again.
    sh(&format!("mv {m}/tree {m}/moved && mv {m}/moved/d00/f000.dat {m}/moved/d05/renamed.dat"));
    sh(&format!("mv {l}/d00/f000.dat {l}/d05/renamed.dat"));
    sh(&format!("diff -r {l} {m}/moved"));
    assert_errno("the old tree name after mv", fs::metadata(s.p("tree")), libc::ENOENT);

    // ln -s, and mv of a file from the local disk onto the mount (a copy + unlink).
    sh(&format!("ln -s moved/d05/renamed.dat {m}/top-link && cmp {m}/top-link {l}/d05/renamed.dat"));
    sh(&format!("cp {l}/d09/f019.dat {}/scratch && mv {}/scratch {m}/moved/from-local", s.c.dir.display(), s.c.dir.display()));
    sh(&format!("cp {l}/d09/f019.dat {l}/from-local"));
    sh(&format!("diff -r {l} {m}/moved"));

    // Copy back out and compare with the original.
    let back = s.c.path("back");
    sh(&format!("cp -r {m}/moved {}", back.display()));
    sh(&format!("diff -r {l} {}", back.display()));

    sh(&format!("rm -rf {m}/moved {m}/top-link"));
    assert_eq!(list(&s.mnt), Vec::<String>::new(), "rm -rf left entries");
    let freed = eventually(Duration::from_secs(5), || s.used() < 64 * KIB);
    assert!(freed.is_some(), "after rm -rf of everything the volume still uses {}", s.used());
}
