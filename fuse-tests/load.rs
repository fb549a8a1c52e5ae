//! Load: 64 sandboxes, each with its own agent and mount of one volume, do mixed work at once
//! on one server. No operation may fail, usage must equal the sum of the files, every record
//! appended to a shared log must be there once, and when the sandboxes are gone the server's
//! connections and threads are back to where they started (its memory is reported).

use crate::appends::Fleet;
use crate::harness::*;
use std::path::Path;
use std::time::Duration;

/// (sockets, threads, RSS in KiB) of a process.
fn usage_of(pid: u32) -> (usize, usize, u64) {
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
    };
    (sockets, field("Threads:") as usize, field("VmRSS:"))
}

/// One sandbox's share of the work, in its own directory of the shared volume.
fn work(mnt: &Path, i: usize) -> u64 {
    let dir = mnt.join(format!("w{i:02}"));
    std::fs::create_dir(&dir).unwrap();
    let mut sizes = Vec::new();
    for k in 0..12 {
        let data = pattern(1 + (i * 7919 + k * 104_729) % 60_000, (i * 100 + k) as u64);
        let p = dir.join(format!("f{k}"));
        write(&p, &data);
        assert_bytes_eq(&format!("sandbox {i} file {k}"), &read(&p), &data);
        sizes.push(data.len() as u64);
    }
    std::fs::rename(dir.join("f0"), dir.join("renamed")).unwrap();
    std::fs::remove_file(dir.join("f1")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    write(&dir.join("sub/x"), b"x");
    let mut names = list(&dir);
    names.sort();
    assert_eq!(names.len(), 12, "sandbox {i}: {names:?}");
    let rec = crate::appends::record(i, 0, crate::appends::Locking::NoLock);
    std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(mnt.join("log")).unwrap(), &rec).unwrap();
    sizes.iter().sum::<u64>() - sizes[1] + 1
}

#[test]
fn sixty_four_sandboxes_on_one_server() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("1GiB"));
    let pid = c.server_pid();
    let mut sockets = Vec::new();
    let mut mounts = Vec::new();
    for i in 0..64 {
        let sb = format!("sb{i:02}");
        sockets.push(c.sandbox(&sb));
        mounts.push(c.path(&format!("m{i:02}")));
        c.attach(&sb, "vol", &mounts[i], &[]);
    }
    // Sandboxes and attachments exist, no agent yet: the level to come back to.
    let idle = usage_of(pid);
    let agents: Vec<Agent> = sockets.iter().zip(&mounts).map(|(s, m)| c.start_agent(s, &[m])).collect();
    let mut fleet = Fleet { agents, mounts, c };
    write(&fleet.mounts[0].join("log"), b"");
    let before = usage_of(pid);
    let mounts = fleet.mounts.clone();
    let workers: Vec<_> = mounts.iter().cloned().enumerate().map(|(i, m)| std::thread::spawn(move || work(&m, i))).collect();
    let total: u64 = workers.into_iter().map(|w| w.join().expect("a sandbox's work failed")).sum();
    let during = usage_of(pid);
    let log = read(&mounts[63].join("log"));
    let n = crate::appends::check_records("shared log", &log, 64, 1, crate::appends::Locking::NoLock);
    assert_eq!(fleet.c.volume_used("vol"), total + log.len() as u64, "usage is the sum of the files");

    // Every sandbox goes away: connections and threads return to where they were before the
    // work (the sandboxes' listeners stay; their agents' connections go).
    for a in fleet.agents.drain(..) {
        a.stop();
    }
    let settled = eventually(Duration::from_secs(20), || {
        let now = usage_of(pid);
        now.0 <= idle.0 && now.1 <= idle.1
    });
    let after = usage_of(pid);
    eprintln!(
        "load: 64 sandboxes, {n} shared appends, {total} bytes of files; server sockets/threads/RSS: no agents {}/{}/{} KiB, \
         64 mounts idle {}/{}/{} KiB, after the work {}/{}/{} KiB, after the agents left {}/{}/{} KiB",
        idle.0, idle.1, idle.2, before.0, before.1, before.2, during.0, during.1, during.2, after.0, after.1, after.2
    );
    assert!(settled.is_some(), "the server kept connections or threads after every agent left: no agents {idle:?}, after {after:?}");
    assert!(after.2 < before.2 + 128 * 1024, "RSS grew by more than 128 MiB: before {before:?}, after {after:?}");
}
