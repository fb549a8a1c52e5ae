"""Uploads (tus for files, resumed after interruptions; tar for directories; streams) and
downloads (files, directory trees, archives), against the real server."""

from __future__ import annotations

import io
import os
import pathlib
import tarfile
import zipfile
from typing import List, Optional, Tuple

import httpx
import pytest

import volumefs
from volumefs import Volume

from .conftest import Proxy, Server
from .test_files import paths, pattern


class Stop(Exception):
    """Raised by a progress callback to interrupt an upload."""


def test_file_upload_goes_through_tus_in_chunks_with_progress(vol: Volume, tmp_path: pathlib.Path) -> None:
    data = pattern(5_000_000, 11)
    local = tmp_path / "data.bin"
    local.write_bytes(data)
    seen: List[Tuple[int, Optional[int]]] = []
    res = vol.files.upload(local, "/up/data.bin", progress=lambda d, t: seen.append((d, t)), chunk_size=1 << 20)
    assert (res.path, res.size, res.sent) == ("/up/data.bin", len(data), len(data))
    assert seen == [(min((i + 1) << 20, len(data)), len(data)) for i in range(5)]
    assert vol.files.read("/up/data.bin") == data
    assert paths(vol) == ["/up", "/up/data.bin"], "no hidden upload file left"
    # An empty file, and parents=False.
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert vol.files.upload(empty, "/up/empty").size == 0
    assert vol.files.read("/up/empty") == b""
    with pytest.raises(volumefs.NotFound):
        vol.files.upload(local, "/no/dir/x", parents=False)
    # Bigger than the volume: refused before a byte is sent.
    small = vol.client.volumes.create(vol.name + "-s", cap="1MiB")
    try:
        with pytest.raises(volumefs.VolumeFull):
            small.files.upload(local, "/x")
        assert paths(small) == []
    finally:
        small.delete()


def test_interrupted_upload_resumes_from_the_servers_offset(server: Server, vol: Volume, tmp_path: pathlib.Path) -> None:
    size = 12 << 20
    data = pattern(size, 42)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    chunks = []

    def stop_after_three(done: int, total: Optional[int]) -> None:
        chunks.append(done)
        if len(chunks) == 3:
            raise Stop("interrupted on purpose")

    with pytest.raises(Stop) as e:
        vol.files.upload(local, "/big/data.bin", progress=stop_after_three, chunk_size=2 << 20)
    handle = e.value.upload  # type: ignore[attr-defined]
    assert isinstance(handle, volumefs.ResumableUpload) and handle.url and "/uploads/" in handle.url
    assert handle.offset() == 6 << 20 and handle.sent == 6 << 20
    assert not vol.files.exists("/big/data.bin"), "not in place before it is whole"
    assert vol.info().used_bytes == 6 << 20, "the partial bytes count against the cap"

    # A new client (another process, say) resumes with the URL alone.
    with volumefs.Client(server.url, server.token) as other:
        progress: List[int] = []
        res = other.volume(vol.name).files.upload(
            local, "/big/data.bin", resume=handle.url, progress=lambda d, t: progress.append(d), chunk_size=2 << 20
        )
    assert res.sent == size - (6 << 20) and res.sent < size
    assert progress == [8 << 20, 10 << 20, 12 << 20], "from the server's offset on"
    assert vol.files.read("/big/data.bin") == data
    assert paths(vol) == ["/big", "/big/data.bin"]
    assert vol.info().used_bytes == size
    with pytest.raises(volumefs.NotFound):
        handle.offset()  # a finished upload is gone


def test_resumable_object_cancel_and_retry_on_a_cut_connection(server: Server, vol: Volume, proxy: Proxy, tmp_path: pathlib.Path) -> None:
    size = 6 << 20
    data = pattern(size, 7)
    local = tmp_path / "f.bin"
    local.write_bytes(data)
    # Given up: the partial bytes go.
    up = vol.files.resumable(local, "/gone.bin")
    assert up.url is None
    up.create()
    assert up.offset() == 0
    up.cancel()
    with pytest.raises(volumefs.NotFound):
        up.offset()
    assert paths(vol) == []
    # Through a proxy that cuts the connection in the middle of a PATCH: the upload goes on
    # from what the server kept, by itself.
    with volumefs.Client(proxy.url, server.token) as c:
        files = c.volume(vol.name).files
        up = files.resumable(local, "/cut.bin", chunk_size=4 << 20)
        up.create()
        proxy.cut_after = proxy.upstream_bytes + (3 << 20)
        res = up.upload()
    assert proxy.cuts == 1, "the connection was cut"
    assert vol.files.read("/cut.bin") == data
    resent = res.sent - size
    assert 0 <= resent < (4 << 20), f"only what the server did not keep is sent again ({resent} bytes)"


def test_directory_upload_and_download_keep_modes_symlinks_and_mtimes(vol: Volume, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "tree"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "sub" / "bin").write_bytes(pattern(300_000, 2))
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "sub" / "deep" / "x").write_bytes(b"x")
    (src / "empty-dir").mkdir()
    os.chmod(src / "run.sh", 0o755)
    os.chmod(src / "sub" / "bin", 0o600)
    os.symlink("sub/bin", src / "link")
    os.link(src / "a.txt", src / "hardlink.txt")  # sent as a second regular file
    os.mkfifo(src / "fifo")  # left out: a volume's batch refuses FIFOs
    old = 981_173_106  # 2001-02-03
    os.utime(src / "a.txt", (old, old))
    seen: List[int] = []
    res = vol.files.upload(src, "/up/tree", progress=lambda d, t: seen.append(d))
    assert res.batch is not None and (res.batch.files, res.batch.symlinks) == (5, 1)
    assert res.size == 6 + 300_000 + 18 + 1 + 6 and seen and seen[-1] == res.sent
    assert vol.files.read("/up/tree/sub/bin") == pattern(300_000, 2)
    assert vol.files.stat("/up/tree/run.sh").mode == 0o755
    assert vol.files.stat("/up/tree/sub/bin").mode == 0o600
    link = vol.files.stat("/up/tree/link")
    assert link.is_symlink and link.target == "sub/bin"
    assert int(vol.files.stat("/up/tree/a.txt").mtime) == old
    assert vol.files.stat("/up/tree/empty-dir").is_dir
    assert not vol.files.exists("/up/tree/fifo")

    out = tmp_path / "back"
    assert vol.files.download("/up/tree", out) == out
    for rel in ["a.txt", "sub/bin", "run.sh", "sub/deep/x", "hardlink.txt"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "sub" / "bin").stat().st_mode & 0o777 == 0o600
    assert os.readlink(out / "link") == "sub/bin"
    assert int((out / "a.txt").stat().st_mtime) == old
    assert (out / "empty-dir").is_dir()

    # The whole volume, and a file into a directory.
    whole = tmp_path / "whole"
    vol.files.download("/", whole)
    assert (whole / "up" / "tree" / "sub" / "bin").read_bytes() == pattern(300_000, 2)
    got = vol.files.download("/up/tree/run.sh", tmp_path)
    assert got == tmp_path / "run.sh" and got.read_text() == "#!/bin/sh\necho hi\n"
    assert got.stat().st_mode & 0o777 == 0o755
    named = vol.files.download("/up/tree/a.txt", tmp_path / "renamed.txt")
    assert named.read_bytes() == b"hello\n" and int(named.stat().st_mtime) == old
    with pytest.raises(volumefs.NotFound):
        vol.files.download("/nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_downloads_as_archives(vol: Volume, tmp_path: pathlib.Path) -> None:
    vol.files.write_many({"/docs/a.txt": "A", "/docs/sub/b.txt": "B"})
    t = vol.files.download("/docs", tmp_path / "docs.tar", archive="tar")
    with tarfile.open(t) as tf:
        assert sorted(tf.getnames()) == ["docs", "docs/a.txt", "docs/sub", "docs/sub/b.txt"]
    gz = vol.files.download("/docs", tmp_path, archive="tar.gz")
    assert gz == tmp_path / "docs.tar.gz"
    with tarfile.open(gz, "r:gz") as tf:
        assert tf.extractfile("docs/sub/b.txt").read() == b"B"  # type: ignore[union-attr]
    z = vol.files.download("/docs/a.txt", tmp_path / "a.zip", archive="zip")
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == ["a.txt"] and zf.read("a.txt") == b"A"
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.download("/docs", tmp_path / "x.rar", archive="rar")


def test_unsafe_archives_are_refused(tmp_path: pathlib.Path) -> None:
    from volumefs import _core

    def tar_of(*members: Tuple[str, bytes, Optional[str]]) -> io.BytesIO:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data, link in members:
                ti = tarfile.TarInfo(name)
                if link is not None:
                    ti.type, ti.linkname = tarfile.SYMTYPE, link
                    tf.addfile(ti)
                else:
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        buf.seek(0)
        return buf

    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in [
        tar_of(("../evil", b"x", None)),
        tar_of(("/abs", b"x", None)),
        tar_of(("ln", b"", str(outside)), ("ln/evil", b"x", None)),
    ]:
        with pytest.raises(volumefs.ProtocolError):
            _core.extract_tar(bad, str(tmp_path / "dest"), False)
    assert list(outside.iterdir()) == []
    assert _core.extract_tar(tar_of(("ok/f", b"fine", None)), str(tmp_path / "good"), True) == 1
    assert (tmp_path / "good" / "f").read_bytes() == b"fine"


def test_stream_uploads(vol: Volume) -> None:
    data = pattern(2_000_000, 4)
    seen: List[int] = []
    res = vol.files.upload(io.BytesIO(data), "/s/stdin.bin", progress=lambda d, t: seen.append(d))
    assert (res.size, res.sent) == (len(data), len(data)) and seen[-1] == len(data)
    assert vol.files.read("/s/stdin.bin") == data
    r, w = os.pipe()
    os.write(w, b"piped\n")
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        assert vol.files.upload(pipe, "/s/pipe").size == 6
    assert vol.files.upload(b"raw bytes", "/s/raw").size == 9
    assert vol.files.read("/s/raw") == b"raw bytes"


def test_tus_endpoint_speaks_plain_tus(server: Server, vol: Volume) -> None:
    # The SDK's own requests, checked against the protocol's capability answer.
    r = httpx.options(f"{server.url}/v1/volumes/{vol.name}/uploads", headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code == 204 and r.headers["tus-version"] == "1.0.0"
    assert "creation" in r.headers["tus-extension"]
