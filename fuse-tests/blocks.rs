//! File data as blocks in an object store: volume clone, garbage collection and `volume fsck`.
//!
//! These run on a local block directory (`--blocks file://...`) in the default tier, and on
//! SeaweedFS's S3 in the PostgreSQL + S3 tier (`VOLUMEFS_TEST_BLOCKS`).

use crate::harness::*;
use std::fs;
use std::path::Path;

fn s3() -> bool {
    std::env::var("VOLUMEFS_TEST_BLOCKS").is_ok_and(|b| b.starts_with("s3://"))
}

/// A server whose file data is blocks: in the test's directory, or in the S3 tier's bucket.
fn block_cluster() -> Cluster {
    if s3() {
        Cluster::new()
    } else {
        Cluster::with_server_args(&["--blocks", "file://{dir}/blocks"])
    }
}

fn json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let out = c.cli(args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn a_clone_is_an_independent_copy_that_shares_blocks() {
    require_fuse!();
    let c = block_cluster();
    c.create_volume("src", Some("64MiB"));
    let (sa, sb) = (c.sandbox("sa"), c.sandbox("sb"));
    let (ma, mb) = (c.path("ma"), c.path("mb"));
    c.attach("sa", "src", &ma, &[]);
    let agent_a = c.start_agent(&sa, &[&ma]);
    let big = pattern(9 << 20, 7);
    fs::write(ma.join("big.bin"), &big).unwrap();
    fs::create_dir(ma.join("dir")).unwrap();
    fs::write(ma.join("dir/note"), b"first\n").unwrap();
    std::os::unix::fs::symlink("dir/note", ma.join("link")).unwrap();
    // A file with a hole in the middle and an overwritten range.
    let f = fs::OpenOptions::new().create(true).write(true).truncate(true).open(ma.join("sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", 1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"EA", 1).unwrap();
    drop(f);
    let used = c.volume_used("src");

    let copy = json(&c, &["volume", "clone", "src", "copy", "--json"]);
    assert_eq!(copy["name"], "copy");
    assert_eq!(copy["used_bytes"].as_u64(), Some(used), "a copy starts with the source's usage: {copy}");
    assert_eq!(copy["cap_bytes"].as_u64(), Some(64 << 20), "and its cap: {copy}");
    c.attach("sb", "copy", &mb, &[]);
    let agent_b = c.start_agent(&sb, &[&mb]);
    assert_bytes_eq("big.bin in the copy", &fs::read(mb.join("big.bin")).unwrap(), &big);
    assert_eq!(fs::read(mb.join("dir/note")).unwrap(), b"first\n");
    assert_eq!(fs::read_link(mb.join("link")).unwrap(), Path::new("dir/note"));
    let sparse = fs::read(mb.join("sparse")).unwrap();
    assert_eq!(sparse.len(), (1 << 20) + 4);
    assert_eq!(&sparse[..4], b"hEAd");
    assert!(sparse[4..1 << 20].iter().all(|b| *b == 0), "the hole is a hole in the copy");

    // The copies diverge: changes to one never show in the other.
    fs::write(mb.join("dir/note"), b"changed in the copy\n").unwrap();
    fs::remove_file(mb.join("big.bin")).unwrap();
    fs::write(ma.join("dir/note2"), b"new in the source\n").unwrap();
    assert_eq!(fs::read(ma.join("dir/note")).unwrap(), b"first\n");
    assert_bytes_eq("big.bin in the source", &fs::read(ma.join("big.bin")).unwrap(), &big);
    assert!(!mb.join("dir/note2").exists());
    assert!(c.volume_used("copy") < used - (8 << 20), "the copy's usage fell by big.bin");
    assert!(c.volume_used("src") > used, "the source's grew by note2");

    // big.bin's blocks are still the source's: garbage collection keeps them.
    let gc = json(&c, &["gc", "--grace", "0", "--json"]);
    assert_eq!(gc["young"].as_u64(), Some(0), "{gc}");
    assert_bytes_eq("big.bin after gc", &fs::read(ma.join("big.bin")).unwrap(), &big);
    drop(agent_a);
    c.cli(&["volume", "delete", "src", "--force"]);
    let gc = json(&c, &["gc", "--grace", "0", "--json"]);
    assert!(gc["deleted_bytes"].as_u64().unwrap() >= 9 << 20, "the source's blocks went with it: {gc}");
    assert_eq!(fs::read(mb.join("dir/note")).unwrap(), b"changed in the copy\n");
    assert_eq!(&fs::read(mb.join("sparse")).unwrap()[..4], b"hEAd");
    drop(agent_b);
    assert!(c.fsck_problems().is_empty(), "{:?}", c.fsck_problems());
}

#[test]
fn clone_needs_a_block_store_and_a_free_name() {
    let c = Cluster::with_server_args(&[]);
    c.create_volume("a", None);
    c.create_volume("b", None);
    if std::env::var_os("VOLUMEFS_TEST_BLOCKS").is_none() {
        let err = c.cli_fail(&["volume", "clone", "a", "c"]);
        assert!(err.contains("needs file data in a block store"), "{err}");
        return;
    }
    let err = c.cli_fail(&["volume", "clone", "a", "b"]);
    assert!(err.contains("already exists"), "{err}");
    let err = c.cli_fail(&["volume", "clone", "nope", "c"]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn fsck_reports_a_missing_block_and_gc_keeps_young_garbage() {
    require_fuse!();
    if s3() {
        eprintln!("SKIPPED here: removes a block file by hand (runs on the local block store in the default tier)");
        return;
    }
    let s = Single::with_server_args(&["--blocks", "file://{dir}/blocks"]);
    fs::write(s.p("f"), b"some bytes").unwrap();
    let clean = json(&s.c, &["volume", "fsck", "vol", "--json"]);
    assert_eq!(clean["problems"], serde_json::json!([]), "{clean}");
    assert_eq!(clean["blocks"].as_u64(), Some(1), "{clean}");
    // Garbage younger than the grace period stays.
    fs::write(s.p("f"), b"other bytes").unwrap();
    let gc = json(&s.c, &["gc", "--json"]);
    assert_eq!((gc["young"].as_u64(), gc["deleted"].as_u64()), (Some(1), Some(0)), "{gc}");
    // A block lost from the store is a problem fsck names (and exits 1).
    let blocks = s.c.dir.join("blocks").join("blocks");
    let mut files = Vec::new();
    for d in fs::read_dir(&blocks).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            files.push(f.unwrap().path());
        }
    }
    let gc = json(&s.c, &["gc", "--grace", "0", "--json"]);
    assert_eq!(gc["deleted"].as_u64(), Some(1), "the overwritten block goes: {gc}");
    let live: Vec<_> = files.iter().filter(|f| f.exists()).collect();
    assert_eq!(live.len(), 1, "{files:?}");
    fs::remove_file(live[0]).unwrap();
    let out = s.c.cli_output(&["volume", "fsck", "vol"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("is missing from"), "{text}");
    assert!(text.contains(": 1 problem"), "{text}");
    // Put it back so the harness's own fsck at the end is clean.
    fs::write(live[0], b"other bytes").unwrap();
}

/// A guest's small writes are held back on the server and go up as whole blocks: a file
/// written 4 KiB at a time is a block or two, not one per write. What a killed server held
/// back (acknowledged to the guest, not yet sent up) comes back from its journal when it
/// starts again.
#[test]
fn small_writes_go_up_as_whole_blocks_and_survive_a_killed_server() {
    require_fuse!();
    let mut c = block_cluster();
    c.create_volume("vol", Some("64MiB"));
    let sb = c.sandbox("sb");
    let m = c.path("m");
    c.attach("sb", "vol", &m, &[]);
    let _agent = c.start_agent(&sb, &[&m]);
    let blocks = |c: &Cluster| json(c, &["volume", "fsck", "vol", "--json"])["blocks"].as_u64().unwrap();
    let before = blocks(&c);
    let mut want = pattern(1 << 20, 5);
    let f = fs::OpenOptions::new().create(true).read(true).write(true).truncate(true).open(m.join("small")).unwrap();
    for (i, chunk) in want.chunks(4096).enumerate() {
        std::os::unix::fs::FileExt::write_all_at(&f, chunk, (i * 4096) as u64).unwrap();
    }
    // The close sends them up (the flush of the age of a second may have cut them once or twice).
    drop(f);
    let added = blocks(&c) - before;
    assert!((1..=4).contains(&added), "256 writes of 4 KiB went up as {added} blocks");
    assert_bytes_eq("the file written in small pieces", &fs::read(m.join("small")).unwrap(), &want);

    // Writes held back when the server is killed: the server is frozen while its journal is
    // looked at (so that the flush of a second old writes cannot come between), then killed.
    let g = fs::OpenOptions::new().read(true).write(true).open(m.join("small")).unwrap();
    let journals = c.data.join("write-behind");
    let mut held = false;
    for attempt in 0..5u8 {
        let piece = pattern(64 << 10, 10 + attempt);
        for (i, chunk) in piece.chunks(4096).enumerate() {
            std::os::unix::fs::FileExt::write_all_at(&g, chunk, (i * 4096) as u64).unwrap();
        }
        want[..piece.len()].copy_from_slice(&piece);
        unsafe { libc::kill(c.server_pid() as i32, libc::SIGSTOP) };
        held = fs::read_dir(&journals).map(|d| d.count() > 0).unwrap_or(false);
        if held {
            break;
        }
        unsafe { libc::kill(c.server_pid() as i32, libc::SIGCONT) };
    }
    assert!(held, "no write was held back at any of 5 tries");
    c.kill_server();
    c.start_server();
    let api = c.cli_output(&["volume", "read", "vol", "/small"]);
    assert_bytes_eq("the file through the API after the restart", &api.stdout, &want);
    let mut got = vec![0u8; want.len()];
    std::os::unix::fs::FileExt::read_exact_at(&g, &mut got, 0).expect("read through the descriptor after the restart");
    assert_bytes_eq("the file through the guest's descriptor", &got, &want);
    drop(g);
    assert!(c.fsck_problems().is_empty(), "{:?}", c.fsck_problems());
}
