"""``vol.files.*`` against the real server: contents, file operations, search, signed URLs."""

from __future__ import annotations

import datetime
import io
import os
import tarfile

import httpx
import pytest

import volumefs
from volumefs import Volume

from .conftest import unique


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that differ at every offset (so a misplaced byte shows)."""
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(n))


def paths(vol: Volume, path: str = "/") -> list:
    return sorted(e.path for e in vol.files.list(path, recursive=True))


def test_write_and_read_bytes_text_and_ranges(vol: Volume) -> None:
    data = pattern(300_000)
    assert vol.files.write("/d/e/blob.bin", data) == len(data)  # parents made, as the CLI does
    assert vol.files.read("/d/e/blob.bin") == data
    assert vol.files.read("/d/e/blob.bin", range=(100, 200)) == data[100:200]
    assert vol.files.read("/d/e/blob.bin", range=(299_990, None)) == data[299_990:]
    assert vol.files.read("/d/e/blob.bin", range=(-10, None)) == data[-10:]
    assert vol.files.read("/d/e/blob.bin", range=(0, 1)) == data[:1]
    with pytest.raises(volumefs.InvalidRange) as e:
        vol.files.read("/d/e/blob.bin", range=(400_000, 400_010))
    assert (e.value.code, e.value.status) == ("InvalidRange", 416)
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.read("/d/e/blob.bin", range=(5, 5))

    assert vol.files.write("/t.txt", "héllo\nwörld\n") == len("héllo\nwörld\n".encode())
    assert vol.files.read("/t.txt", text=True) == "héllo\nwörld\n"
    assert vol.files.read("/t.txt") == "héllo\nwörld\n".encode()
    vol.files.write("/t.txt", "replaced")
    assert vol.files.read("/t.txt", text=True) == "replaced"
    assert vol.files.write("/empty", b"") == 0
    assert vol.files.read("/empty") == b""


def test_streamed_reads(vol: Volume) -> None:
    data = pattern(3 << 20, 5)
    vol.files.write("/big", data)
    with vol.files.read("/big", stream=True, chunk_size=1 << 20) as s:
        assert s.size == len(data) and s.length == len(data)
        chunks = list(s)
    assert len(chunks) >= 3 and b"".join(chunks) == data
    s = vol.files.read("/big", stream=True, range=(1000, 2000))
    assert (s.size, s.length) == (len(data), 1000)
    assert s.read() == data[1000:2000]
    # Text streams decode across chunk boundaries (a 2-byte character split by a 1-byte chunk).
    vol.files.write("/u.txt", "äöü" * 1000)
    s = vol.files.read("/u.txt", stream=True, text=True, chunk_size=1)
    assert "".join(s) == "äöü" * 1000
    # Stopping early and closing is fine; the server lets go of the file.
    with vol.files.read("/big", stream=True) as s:
        first = next(iter(s))
        assert data.startswith(first)
    with pytest.raises(volumefs.NotFound):
        vol.files.read("/nope", stream=True)


def test_write_file_objects_iterables_and_appends(vol: Volume, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = pattern(1_500_000, 9)
    assert vol.files.write("/from-bytesio", io.BytesIO(data)) == len(data)
    assert vol.files.read("/from-bytesio") == data
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    with open(local, "rb") as f:
        assert vol.files.write("/from-file", f) == len(data)
    assert vol.files.read("/from-file") == data
    assert vol.files.write("/from-iter", (data[i : i + 1000] for i in range(0, 5000, 1000))) == 5000
    assert vol.files.read("/from-iter") == data[:5000]
    # A pipe (what stdin is), streamed.
    r, w = os.pipe()
    os.write(w, b"through a pipe\n")
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        assert vol.files.write("/from-pipe", pipe) == 15
    assert vol.files.read("/from-pipe") == b"through a pipe\n"

    assert vol.files.write("/log", "one\n", append=True) == 4
    assert vol.files.write("/log", b"two\n", append=True) == 8
    assert vol.files.write("/log", io.BytesIO(b"three\n"), append=True) == 14
    assert vol.files.read("/log", text=True) == "one\ntwo\nthree\n"

    with pytest.raises(volumefs.NotFound):
        vol.files.write("/no/such/dir/f", b"x", parents=False)
    with pytest.raises(volumefs.IsADirectory) as e:
        vol.files.write("/", b"x")
    assert isinstance(e.value, volumefs.InvalidArgument)
    vol.files.mkdir("/adir")
    with pytest.raises(volumefs.IsADirectory):
        vol.files.write("/adir", b"x")
    with pytest.raises(volumefs.IsADirectory):
        vol.files.read("/adir")
    with pytest.raises(TypeError):
        vol.files.write("/x", 42)


def test_volume_full_leaves_nothing(client: volumefs.Client) -> None:
    v = client.volumes.create(unique("small"), cap="1MiB")
    try:
        v.files.write("/keep", b"old")
        with pytest.raises(volumefs.VolumeFull) as e:
            v.files.write("/big", pattern(2 << 20))
        assert (e.value.code, e.value.status, e.value.errno) == ("VolumeFull", 507, "EDQUOT")
        assert paths(v) == ["/keep"]
        with pytest.raises(volumefs.VolumeFull):
            v.files.write_many({"/a": "A", "/b/c": "C", "/z": "x" * (1 << 20)})
        assert paths(v) == ["/keep"] and v.info().used_bytes == 3
    finally:
        v.delete()


def test_write_many_is_all_or_nothing(vol: Volume) -> None:
    res = vol.files.write_many({"/a.txt": "A", "b/c.txt": b"C\n", "/b/d/e.txt": "E"})
    assert (res.files, res.bytes) == (3, 4) and res.dirs >= 2
    assert vol.files.read("/b/c.txt") == b"C\n"
    assert vol.files.stat("/b/d/e.txt").mode == 0o644
    res = vol.files.write_many({"x.txt": "X"}, dest="/under/here")
    assert res.files == 1 and vol.files.read("/under/here/x.txt") == b"X"
    before = paths(vol)
    # A bad name anywhere refuses the whole batch, even what came before it.
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.write_many({"/ok1": "1", "/ok2": "2", "/bad/../../escape": "no"})
    assert paths(vol) == before
    with pytest.raises(TypeError):
        vol.files.write_many({"/n": 5})  # type: ignore[dict-item]


def test_move_remove_mkdir(vol: Volume) -> None:
    vol.files.mkdir("/a/b/c", parents=True)
    vol.files.mkdir("/a/b/c", parents=True)  # exists: fine with parents
    with pytest.raises(volumefs.NotFound):
        vol.files.mkdir("/x/y")
    with pytest.raises(volumefs.AlreadyExists):
        vol.files.mkdir("/a")
    vol.files.write("/README.md", "say hello\n")
    vol.files.move("/README.md", "/a/b/README.md")
    assert not vol.files.exists("/README.md") and vol.files.read("/a/b/README.md") == b"say hello\n"
    with pytest.raises(volumefs.NotFound):
        vol.files.move("/README.md", "/elsewhere")
    with pytest.raises(volumefs.NotEmpty) as e:
        vol.files.remove("/a")
    assert isinstance(e.value, volumefs.Conflict) and e.value.status == 409
    assert vol.files.remove("/a/b/README.md") == 1
    assert vol.files.remove("/a", recursive=True) == 3
    assert paths(vol) == []
    with pytest.raises(volumefs.NotFound):
        vol.files.remove("/a")


def test_edit_list_stat_exists(vol: Volume) -> None:
    vol.files.write("/src/lib.rs", "pub fn hello() -> &'static str {\n    \"hello\"\n}\n")
    with pytest.raises(volumefs.InvalidArgument) as e:
        vol.files.edit("/src/lib.rs", "hello", "bye")
    assert "found 2" in e.value.message
    size = vol.files.edit("/src/lib.rs", "fn hello", "fn greet")
    assert vol.files.read("/src/lib.rs", text=True).startswith("pub fn greet()")
    assert size == len(vol.files.read("/src/lib.rs"))

    st = vol.files.stat("/src/lib.rs")
    assert (st.path, st.name, st.kind, st.size, st.mode, st.uid, st.gid) == ("/src/lib.rs", "lib.rs", "file", size, 0o644, 0, 0)
    assert st.is_file and not st.is_dir and st.mtime > 1_600_000_000 and st.nlink == 1 and st.target is None
    d = vol.files.stat("/src")
    assert d.is_dir and d.kind == "dir" and d.mode == 0o755
    root = vol.files.stat("/")
    assert root.path == "/" and root.is_dir

    for i in range(5):
        vol.files.write(f"/src/m{i}.rs", "x")
    top = vol.files.list("/")
    assert [e.path for e in top] == ["/src"] and not top.truncated
    assert len(vol.files.list("/src")) == 6
    everything = vol.files.list("/", recursive=True)
    assert len(everything) == 7
    short = vol.files.list("/", recursive=True, limit=3)
    assert len(short) == 3 and short.truncated
    with pytest.raises(volumefs.NotADirectory):
        vol.files.list("/src/lib.rs/x")

    assert vol.files.exists("/src") and vol.files.exists("/src/lib.rs")
    assert not vol.files.exists("/src/nope") and not vol.files.exists("/nope/deeper")
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.stat("/a/../../etc/passwd")


def test_search_and_replace(vol: Volume) -> None:
    vol.files.write("/src/main.rs", 'fn main() {\n    println!("hello");\n}\n')
    vol.files.write("/src/lib.rs", "pub fn hello() -> &'static str {\n    \"hello\"\n}\n")
    vol.files.write("/README.md", "say hello\n")
    by_name = vol.files.search("/", name="*.rs")
    assert sorted(h.path for h in by_name) == ["/src/lib.rs", "/src/main.rs"]
    assert all(h.line is None for h in by_name) and not by_name.truncated
    hits = vol.files.search(content="print.*hello")
    assert [(h.path, h.line, h.text) for h in hits] == [("/src/main.rs", 2, '    println!("hello");')]
    both = vol.files.search("/src", name="lib.rs", content="hello")
    assert {(h.path, h.line) for h in both} == {("/src/lib.rs", 1), ("/src/lib.rs", 2)}
    limited = vol.files.search(content="hello", limit=2)
    assert len(limited) == 2 and limited.truncated
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.search(content="(unclosed")

    changed = vol.files.replace("/", "hel+o", "howdy", name="*.rs")
    assert changed == {"/src/lib.rs": 2, "/src/main.rs": 1}
    assert vol.files.read("/README.md") == b"say hello\n"
    assert vol.files.read("/src/main.rs", text=True) == 'fn main() {\n    println!("howdy");\n}\n'
    assert vol.files.replace("/", "nothing-matches", "x") == {}


def test_signed_urls(vol: Volume) -> None:
    data = pattern(100_000, 3)
    vol.files.write("/docs/report.bin", data)
    url = vol.files.signed_url("/docs/report.bin", expires=600)
    assert "/v1/signed/" in url and "sig=" in url
    # No token needed.
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data
    r = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert r.content == data[10:20]
    r = httpx.get(url.replace("report.bin", "report.bim"))
    assert r.status_code == 403 and r.json()["code"] == "Forbidden"
    url2 = vol.files.signed_url("/docs/report.bin", expires=datetime.timedelta(minutes=5))
    assert httpx.get(url2).content == data
    # A directory only as an archive.
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.signed_url("/docs")
    tar_url = vol.files.signed_url("/docs", archive="tar", expires=60)
    with tarfile.open(fileobj=io.BytesIO(httpx.get(tar_url).content)) as tf:
        assert tf.getnames() == ["docs", "docs/report.bin"]
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.signed_url("/docs/report.bin", expires=8 * 86400)
    with pytest.raises(volumefs.NotFound):
        vol.files.signed_url("/nope")
    # It expires.
    short = vol.files.signed_url("/docs/report.bin", expires=1)
    import time

    time.sleep(2.1)
    r = httpx.get(short)
    assert r.status_code == 403 and "expired" in r.json()["message"]
