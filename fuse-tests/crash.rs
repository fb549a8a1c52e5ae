//! Crash and restart: a workload runs through a FUSE mount while the server is killed with
//! SIGKILL (or stopped with SIGTERM) at random moments and started again on the same data
//! directory. The guest must carry on without an error (its descriptors are reopened on a fresh
//! session), and afterwards every byte the server acknowledged reads back — through the mount
//! and through the HTTP API — and the volume's usage equals the sum of its files' sizes.

use crate::harness::*;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const FILES: usize = 4;

/// Writes random runs at random offsets of `FILES` files (fsync now and then) until `stop`;
/// returns what each file must hold, or the first error.
fn workload(mnt: std::path::PathBuf, seed: u64, stop: Arc<AtomicBool>) -> Result<(Vec<Vec<u8>>, usize), String> {
    let mut rng = Rng(seed);
    let files: Vec<std::fs::File> = (0..FILES)
        .map(|i| std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(mnt.join(format!("f{i}"))))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("open: {e}"))?;
    let mut model = vec![Vec::new(); FILES];
    let mut writes = 0;
    while !stop.load(Ordering::SeqCst) {
        let i = rng.below(FILES as u64) as usize;
        let off = rng.below(256 << 10) as usize;
        let len = 1 + rng.below(64 << 10) as usize;
        let data = pattern(len, rng.next());
        files[i].write_all_at(&data, off as u64).map_err(|e| format!("write {len} bytes at {off} of f{i} (write #{writes}): {e}"))?;
        if model[i].len() < off + len {
            model[i].resize(off + len, 0);
        }
        model[i][off..off + len].copy_from_slice(&data);
        writes += 1;
        if rng.below(4) == 0 {
            files[i].sync_data().map_err(|e| format!("fsync f{i}: {e}"))?;
        }
    }
    Ok((model, writes))
}

#[test]
fn server_kills_and_restarts_lose_no_acknowledged_byte() {
    require_fuse!();
    let mut s = Single::new();
    let mut rng = Rng(0x5eed_cafe);
    let (mut kills, mut terms, mut total_writes) = (0, 0, 0);
    for round in 0..12u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mnt, stop) = (s.mnt.clone(), stop.clone());
            std::thread::spawn(move || workload(mnt, 1 + round, stop))
        };
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        if round % 2 == 0 {
            s.c.kill_server();
            kills += 1;
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            s.c.start_server();
        } else {
            // SIGTERM: the server must exit within 5 s (asserted by the harness).
            s.c.restart_server();
            terms += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
        stop.store(true, Ordering::SeqCst);
        let (model, writes) = writer.join().unwrap().unwrap_or_else(|e| panic!("round {round}: the guest saw an error: {e}"));
        total_writes += writes;
        let mut sum = 0;
        for (i, want) in model.iter().enumerate() {
            let name = format!("f{i}");
            assert_bytes_eq(&format!("round {round}: {name} through the mount"), &read(&s.p(&name)), want);
            let api = s.c.cli_output(&["file", "read", "vol", &format!("/{name}")]);
            assert_bytes_eq(&format!("round {round}: {name} through the API"), &api.stdout, want);
            sum += stored_bytes(&s.p(&name));
        }
        assert_eq!(s.used(), sum, "round {round}: usage equals the bytes the files store");
    }
    eprintln!("crash: {kills} SIGKILLs and {terms} SIGTERMs survived; {total_writes} writes, every acknowledged byte read back");
}

/// A file unlinked while open survives a server crash and a clean restart: the guest reopens
/// its handle on the new server, reads and writes it, and its last close frees it.
#[test]
fn an_unlinked_open_file_survives_server_restarts() {
    require_fuse!();
    let mut s = Single::new();
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(s.p("tmp")).unwrap();
    f.write_all_at(b"kept while open", 0).unwrap();
    std::fs::remove_file(s.p("tmp")).unwrap();
    s.c.kill_server();
    s.c.start_server();
    let mut buf = [0u8; 15];
    f.read_exact_at(&mut buf, 0).expect("read through the descriptor after a SIGKILL restart");
    assert_eq!(&buf, b"kept while open");
    f.write_all_at(b"!", 15).unwrap();
    s.c.restart_server();
    let mut buf = [0u8; 16];
    f.read_exact_at(&mut buf, 0).expect("read through the descriptor after a SIGTERM restart");
    assert_eq!(&buf, b"kept while open!");
    assert_eq!(s.used(), 16, "the orphan still counts while open");
    drop(f);
    assert!(eventually(Duration::from_secs(10), || s.used() == 0).is_some(), "the last close frees the orphan (used {})", s.used());
}
