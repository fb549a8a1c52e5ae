//! File contents: write and read back, overwrite in place, sparse files, truncate, O_APPEND and
//! a large file. Reads that must prove the data reached the server drop the file's page cache
//! first ([`drop_cache`]), so they are served by the agent, not by the kernel.

use crate::harness::*;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

#[test]
fn write_and_read_back() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("hello.txt");
    write(&p, b"hello, volume\n");
    assert_eq!(read(&p), b"hello, volume\n");
    let md = fs::metadata(&p).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 14);
    assert_eq!(md.uid(), 0);
    assert_eq!(md.gid(), 0);
    drop_cache(&p);
    assert_eq!(read(&p), b"hello, volume\n", "after dropping the page cache");
    // An empty file is a file too.
    write(&s.p("empty"), b"");
    assert_eq!(fs::metadata(s.p("empty")).unwrap().len(), 0);
    assert_eq!(read(&s.p("empty")), b"");
    // Create with an explicit mode (umask 022 is pinned by the harness).
    let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(s.p("private")).unwrap();
    drop(f);
    assert_eq!(fs::metadata(s.p("private")).unwrap().mode() & 0o7777, 0o600);
    // O_EXCL on an existing name.
    assert_errno("create_new over an existing file", OpenOptions::new().write(true).create_new(true).open(&p), libc::EEXIST);
}

#[test]
fn overwrite_in_the_middle() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("f");
    write(&p, &[b'a'; 1000]);
    let mut f = OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(400)).unwrap();
    f.write_all(b"MIDDLE").unwrap();
    // Positional write across the 4 KiB page boundary of a larger file too.
    drop(f);
    let mut want = vec![b'a'; 1000];
    want[400..406].copy_from_slice(b"MIDDLE");
    assert_bytes_eq("after overwrite", &read(&p), &want);
    assert_eq!(fs::metadata(&p).unwrap().len(), 1000, "overwrite must not change the size");
    drop_cache(&p);
    assert_bytes_eq("after overwrite, cache dropped", &read(&p), &want);

    let big = s.p("g");
    let mut want = pattern(3 * 4096, 7);
    write(&big, &want);
    let f = OpenOptions::new().write(true).open(&big).unwrap();
    f.write_all_at(b"ACROSS-THE-PAGE-BOUNDARY", 4096 - 6).unwrap();
    drop(f);
    want[4096 - 6..4096 - 6 + 24].copy_from_slice(b"ACROSS-THE-PAGE-BOUNDARY");
    drop_cache(&big);
    assert_bytes_eq("pwrite across a page boundary", &read(&big), &want);
}

#[test]
fn sparse_file_hole_reads_zeros() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("sparse");
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(&p).unwrap();
    f.write_all_at(b"tail", MIB).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), MIB + 4);
    drop_cache(&p);
    let data = read(&p);
    assert_eq!(data.len() as u64, MIB + 4);
    assert!(data[..MIB as usize].iter().all(|b| *b == 0), "the hole must read as zeros");
    assert_eq!(&data[MIB as usize..], b"tail");
    // A read inside the hole, at an odd offset.
    let mut buf = [0xffu8; 100];
    fs::File::open(&p).unwrap().read_exact_at(&mut buf, 12345).unwrap();
    assert_eq!(buf, [0u8; 100]);
    // Reading past the end returns 0 bytes.
    let n = fs::File::open(&p).unwrap().read_at(&mut buf, MIB + 4).unwrap();
    assert_eq!(n, 0, "read at EOF");
}

#[test]
fn truncate_shrink_and_extend() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("t");
    write(&p, &[b'a'; 100]);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(10).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10);
    drop(f);
    assert_eq!(read(&p), vec![b'a'; 10]);
    drop_cache(&p);
    assert_eq!(read(&p), vec![b'a'; 10], "shrunk, cache dropped");

    // Extending after a shrink must expose zeros, never the old bytes.
    fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(5000).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 5000);
    let mut want = vec![b'a'; 10];
    want.resize(5000, 0);
    assert_bytes_eq("extended", &read(&p), &want);
    drop_cache(&p);
    assert_bytes_eq("extended, cache dropped", &read(&p), &want);

    // truncate(2) by path, and O_TRUNC.
    let c = cpath(&p);
    cvt(unsafe { libc::truncate(c.as_ptr(), 3) }).unwrap();
    assert_eq!(read(&p), b"aaa");
    drop(OpenOptions::new().write(true).truncate(true).open(&p).unwrap());
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    drop_cache(&p);
    assert_eq!(read(&p), b"");
}

#[test]
fn o_append_writes_at_end() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("log");
    write(&p, b"hello");
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b" world").unwrap();
    // A second appender, interleaved: each write lands at the current end.
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    b.write_all(b"B").unwrap();
    a.write_all(b"A").unwrap();
    // Even after seeking to the start, O_APPEND writes go to the end.
    a.seek(SeekFrom::Start(0)).unwrap();
    a.write_all(b"!").unwrap();
    drop((a, b));
    assert_eq!(read(&p), b"hello worldBA!");
    drop_cache(&p);
    assert_eq!(read(&p), b"hello worldBA!");
}

#[test]
fn large_file_20mib_pattern() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("large.bin");
    let want = pattern(20 * MIB as usize, 42);
    let mut f = fs::File::create(&p).unwrap();
    for chunk in want.chunks(MIB as usize) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), 20 * MIB);
    drop_cache(&p);
    let mut got = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    assert_bytes_eq("20 MiB read back", &got, &want);
    // Random-ish positional reads, not aligned.
    let f = fs::File::open(&p).unwrap();
    for (i, off) in [0u64, 1, 4095, 131_071, 1_048_575, 7_777_777, 20 * MIB - 3000].iter().enumerate() {
        let mut buf = vec![0u8; 3000];
        f.read_exact_at(&mut buf, *off).unwrap();
        let o = *off as usize;
        assert_bytes_eq(&format!("pread #{i} at {off}"), &buf, &want[o..o + 3000]);
    }
    let used = s.used();
    assert!(used >= 20 * MIB, "volume used {used} after writing 20 MiB");
}

#[test]
fn mmap_shared_write_read_back() {
    require_fuse!();
    use std::os::unix::io::AsRawFd;
    let s = Single::new();
    let p = s.p("mapped");
    let len = 3 * 4096 + 100;
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).unwrap();
    f.set_len(len as u64).unwrap();
    let want = pattern(len, 5);
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        std::ptr::copy_nonoverlapping(want.as_ptr(), addr as *mut u8, len);
        assert_eq!(libc::msync(addr, len, libc::MS_SYNC), 0, "msync: {}", std::io::Error::last_os_error());
        assert_eq!(libc::munmap(addr, len), 0);
    }
    drop(f);
    drop_cache(&p);
    assert_bytes_eq("written through a shared mapping", &read(&p), &want);
}

#[test]
fn parallel_writers_and_readers() {
    require_fuse!();
    let s = Single::new();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let dir = s.p(&format!("t{t}"));
            std::thread::spawn(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..40u64 {
                    let data = pattern((i as usize * 3001) % 150_000, t * 1000 + i);
                    let p = dir.join(format!("f{i}"));
                    write(&p, &data);
                    assert_bytes_eq(&format!("{} right after writing", p.display()), &read(&p), &data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a writer thread failed");
    }
    for t in 0..6u64 {
        let dir = s.p(&format!("t{t}"));
        assert_eq!(list(&dir).len(), 40);
        for i in 0..40u64 {
            let p = dir.join(format!("f{i}"));
            drop_cache(&p);
            let want = pattern((i as usize * 3001) % 150_000, t * 1000 + i);
            assert_bytes_eq(&p.display().to_string(), &read(&p), &want);
        }
    }
}

/// A small file opened for reading comes whole with its open, and the kernel's reads are
/// answered from that copy; a write through another descriptor of the same mount must retire
/// it, so a read that reaches FUSE afterwards (its pages evicted) sees the new bytes.
#[test]
fn reads_after_a_write_do_not_come_from_the_copy_sent_with_the_open() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("f");
    // Made, not opened, here: the first open finds no pages it knows current, so it asks for
    // the whole file.
    write(&p, b"old old old");
    let mut reader = fs::File::open(&p).unwrap();
    let mut w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_all(b"new").unwrap();
    drop(w);
    drop_cache(&p);
    let mut got = Vec::new();
    reader.read_to_end(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "new old old", "read after a write through another descriptor");
}
