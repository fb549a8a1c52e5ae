"""The async client, mirroring the sync tests: volumes, files, transfers (an interrupted and
resumed upload, trees), watch (with a cut connection), sandboxes, tenants and errors."""

from __future__ import annotations

import asyncio
import io
import os
import pathlib
from typing import AsyncIterator, List, Optional

import pytest

import volumefs
from volumefs import AsyncClient, AsyncVolume, Event, Mount

from .conftest import Proxy, Server, unique
from .test_files import pattern


@pytest.fixture
async def aclient(server: Server) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.url, server.token) as c:
        yield c


@pytest.fixture
async def avol(aclient: AsyncClient) -> AsyncIterator[AsyncVolume]:
    v = await aclient.volumes.create(unique("avol"), cap="256MiB")
    yield v
    try:
        await v.delete(force=True)
    except volumefs.NotFound:
        pass


async def take(w: volumefs.AsyncWatch, n: int, timeout: float = 20.0) -> List[Event]:
    out: List[Event] = []

    async def run() -> None:
        async for ev in w:
            out.append(ev)
            if len(out) >= n:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        pass
    return out


async def test_volumes(aclient: AsyncClient) -> None:
    name = unique("av")
    v = await aclient.volumes.create(name, cap="64MiB")
    assert v.last_info is not None and (v.last_info.name, v.last_info.cap_bytes, v.last_info.used_bytes) == (name, 64 << 20, 0)
    assert await aclient.volumes.get(name) == v
    assert await AsyncVolume.get(name, client=aclient) == v
    await v.files.write("/f", b"x" * 10)
    assert (await v.info()).used_bytes == 10
    part = await v.info(fields=["used_bytes"])
    assert (part.used_bytes, part.cap_bytes) == (10, None)
    listed = [x for x in await AsyncVolume.list(fields="files", client=aclient) if x.name == name]
    assert listed and listed[0].last_info.files == 2  # type: ignore[union-attr]
    with pytest.raises(volumefs.AlreadyExists):
        await aclient.volumes.create(name)
    await v.delete()
    with pytest.raises(volumefs.NotFound) as e:
        await v.info()
    assert e.value.code == "NotFound"


async def test_files(avol: AsyncVolume) -> None:
    f = avol.files
    data = pattern(600_000, 3)
    assert await f.write("/d/blob", data) == len(data)
    assert await f.read("/d/blob") == data
    assert await f.read("/d/blob", range=(10, 20)) == data[10:20]
    assert await f.read("/d/blob", range=(-5, None)) == data[-5:]
    s = await f.read("/d/blob", stream=True, chunk_size=100_000)
    assert s.size == len(data)
    chunks = [c async for c in s]
    assert len(chunks) >= 6 and b"".join(chunks) == data
    async with await f.read("/d/blob", stream=True, range=(0, 100)) as s2:
        assert await s2.read() == data[:100]
    assert await f.write("/t.txt", "häh") == 4 and await f.read("/t.txt", text=True) == "häh"
    assert await f.write("/io", io.BytesIO(b"file object")) == 11

    async def gen() -> AsyncIterator[bytes]:
        for part in (b"as", b"ync"):
            yield part

    assert await f.write("/agen", gen()) == 5 and await f.read("/agen") == b"async"
    assert await f.write("/log", "a\n", append=True) == 2
    assert await f.write("/log", "b\n", append=True) == 4
    res = await f.write_many({"/m/1": "1", "/m/2": b"22"})
    assert (res.files, res.bytes) == (2, 3)
    await f.mkdir("/x/y", parents=True)
    await f.move("/m/1", "/x/y/1")
    assert await f.exists("/x/y/1") and not await f.exists("/m/1")
    with pytest.raises(volumefs.NotEmpty):
        await f.remove("/x")
    assert await f.remove("/x", recursive=True) == 3
    st = await f.stat("/d/blob")
    assert (st.kind, st.size, st.mode) == ("file", len(data), 0o644)
    listing = await f.list("/", recursive=True)
    assert sorted(e.path for e in listing) == ["/agen", "/d", "/d/blob", "/io", "/log", "/m", "/m/2", "/t.txt"]
    assert (await f.list("/", limit=1)).truncated
    await f.write("/code.py", "print('hello')\nx = 'hello'\n")
    assert await f.edit("/code.py", "print", "say") > 0
    hits = await f.search("/", name="*.py", content="hello")
    assert [(h.path, h.line) for h in hits] == [("/code.py", 1), ("/code.py", 2)]
    assert await f.replace("/", "hel+o", "bye", name="*.py") == {"/code.py": 2}
    assert await f.read("/code.py", text=True) == "say('bye')\nx = 'bye'\n"
    url = await f.signed_url("/d/blob", expires=60)
    import httpx

    async with httpx.AsyncClient() as anon:
        assert (await anon.get(url)).content == data
    with pytest.raises(volumefs.InvalidRange):
        await f.read("/d/blob", range=(10_000_000, None))
    with pytest.raises(volumefs.NotFound):
        await f.read("/nope")


async def test_interrupted_upload_resumes(server: Server, avol: AsyncVolume, tmp_path: pathlib.Path) -> None:
    size = 10 << 20
    data = pattern(size, 99)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    calls: List[int] = []

    def stop(done: int, total: Optional[int]) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyError("stop here")

    with pytest.raises(KeyError) as e:
        await avol.files.upload(local, "/big.bin", progress=stop, chunk_size=2 << 20)
    handle = e.value.upload  # type: ignore[attr-defined]
    assert isinstance(handle, volumefs.AsyncResumableUpload) and await handle.offset() == 4 << 20
    async with AsyncClient(server.url, server.token) as other:
        res = await other.volume(avol.name).files.upload(local, "/big.bin", resume=handle.url)
    assert res.sent == size - (4 << 20) and res.sent < size
    assert await avol.files.read("/big.bin") == data
    assert sorted(e.path for e in await avol.files.list("/")) == ["/big.bin"]
    # Resuming the same handle object works too (after a cancel, a fresh one is needed).
    up = avol.files.resumable(local, "/again.bin", chunk_size=4 << 20)
    await up.create()
    await up.cancel()
    with pytest.raises(volumefs.NotFound):
        await up.offset()


async def test_upload_through_a_cut_connection(server: Server, avol: AsyncVolume, proxy: Proxy, tmp_path: pathlib.Path) -> None:
    data = pattern(5 << 20, 5)
    local = tmp_path / "f.bin"
    local.write_bytes(data)
    async with AsyncClient(proxy.url, server.token) as c:
        up = c.volume(avol.name).files.resumable(local, "/cut.bin", chunk_size=4 << 20)
        await up.create()
        proxy.cut_after = proxy.upstream_bytes + (2 << 20)
        res = await up.upload()
    assert proxy.cuts == 1 and await avol.files.read("/cut.bin") == data
    assert 0 <= res.sent - len(data) < (4 << 20)


async def test_trees_and_streams(avol: AsyncVolume, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a").write_bytes(b"A" * 1000)
    (src / "x.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "x.sh", 0o750)
    os.symlink("sub/a", src / "l")
    res = await avol.files.upload(src, "/t")
    assert res.batch is not None and (res.batch.files, res.batch.symlinks) == (2, 1)
    assert (await avol.files.stat("/t/x.sh")).mode == 0o750
    out = await avol.files.download("/t", tmp_path / "back")
    assert (out / "sub" / "a").read_bytes() == b"A" * 1000
    assert os.readlink(out / "l") == "sub/a" and (out / "x.sh").stat().st_mode & 0o777 == 0o750
    got = await avol.files.download("/t/sub/a", tmp_path)
    assert got == tmp_path / "a" and got.read_bytes() == b"A" * 1000
    tgz = await avol.files.download("/t", tmp_path / "t.tgz", archive="tar.gz")
    import tarfile

    with tarfile.open(tgz) as tf:
        assert "t/sub/a" in tf.getnames()
    r, w = os.pipe()
    os.write(w, b"from a pipe")
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        assert (await avol.files.upload(pipe, "/pipe")).size == 11
    assert await avol.files.read("/pipe") == b"from a pipe"


async def test_watch(server: Server, avol: AsyncVolume, proxy: Proxy) -> None:
    async with avol.files.watch("/") as w:
        await avol.files.mkdir("/a")
        await avol.files.write("/a/f", "x")
        events = await take(w, 2)
    assert [(e.kind, e.path) for e in events] == [("create", "/a"), ("create", "/a/f")]
    # Through a proxy that drops the stream: reconnected, nothing lost.
    async with AsyncClient(proxy.url, server.token) as c:
        w = await c.volume(avol.name).files.watch("/a")
        try:
            await avol.files.mkdir("/a/one")
            assert [e.path for e in await take(w, 1)] == ["/a/one"]
            proxy.cut()
            await avol.files.mkdir("/a/two")
            assert [e.path for e in await take(w, 1)] == ["/a/two"]
            assert w.reconnects >= 1
        finally:
            await w.aclose()
    # A lazily opened watch (plain async for) and the end of a deleted volume.
    w2 = avol.files.watch("/", after=events[0].id)
    got = await take(w2, 1)
    assert [(e.kind, e.path) for e in got] == [("create", "/a/f")]
    await avol.delete(force=True)
    rest = await take(w2, 10)
    assert rest and rest[-1].kind == "deleted"
    await w2.aclose()


async def test_sandboxes_and_tenants(server: Server, aclient: AsyncClient, avol: AsyncVolume) -> None:
    await avol.files.mkdir("/docs")
    sb = await aclient.sandboxes.create(
        unique("asb"), volumes={"/mnt/data": avol, "/mnt/docs": Mount(avol, read_only=True, subpath="/docs")}
    )
    att = {a.path: a for a in await sb.volumes.list()}
    assert (att["/mnt/docs"].read_only, att["/mnt/docs"].subpath, att["/mnt/docs"].state) == (True, "/docs", "attached")
    a = await sb.volumes.attach(avol, "/mnt/more")
    assert a.state == "attached"
    await sb.volumes.detach("/mnt/more")
    child = await sb.fork(unique("afork"))
    assert {x.state for x in await child.volumes.list()} == {"released"}
    assert sb.name in [s.name for s in await aclient.sandboxes.list()]
    with pytest.raises(volumefs.Unavailable):
        await sb.exec("true")
    with pytest.raises(volumefs.InvalidArgument):
        await sb.stop()
    await child.delete()
    await sb.delete()
    with pytest.raises(volumefs.NotFound):
        await aclient.sandboxes.get(sb.name)

    t = await aclient.tenants.create(unique("aten"), default_cap="16MiB")
    assert t.token and t.name in [x.name for x in await aclient.tenants.list()]
    async with AsyncClient(server.url, t.token) as tenant:
        tv = await tenant.volumes.create("mine")
        assert tv.last_info.cap_bytes == 16 << 20  # type: ignore[union-attr]
        await tv.files.write("/x", "tenant data")
        with pytest.raises(volumefs.NotFound):
            await aclient.volume("mine").files.read("/x")
        assert await aclient.volume(f"{t.name}~mine").files.read("/x") == b"tenant data"
        with pytest.raises(volumefs.PermissionDenied):
            await tenant.tenants.list()
        await tv.delete()


async def test_errors(server: Server) -> None:
    async with AsyncClient(server.url, "wrong") as c:
        with pytest.raises(volumefs.Unauthorized):
            await c.volumes.list()
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    async with AsyncClient(f"http://127.0.0.1:{port}", "t") as c:
        with pytest.raises(volumefs.Unavailable):
            await c.volumes.create("x")
        with pytest.raises(volumefs.Unavailable):
            await c.volume("v").files.watch("/", retry_for=0.3)


async def test_class_methods_use_the_default_async_client(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from volumefs import AsyncSandbox, aio

    monkeypatch.setenv("VOLUMEFS_SERVER", server.url)
    monkeypatch.setenv("VOLUMEFS_TOKEN", server.token)
    monkeypatch.setattr(aio, "_default", None)  # made fresh on this test's event loop
    try:
        name = unique("adflt")
        v = await AsyncVolume.create(name, cap="1MiB")
        assert aio.default_async_client().server == server.url
        assert await AsyncVolume.get(name) == v and name in [x.name for x in await AsyncVolume.list()]
        sb = await AsyncSandbox.create(unique("adsb"), volumes={"/mnt/v": v})
        assert await AsyncSandbox.get(sb.name) == sb and sb.name in [s.name for s in await AsyncSandbox.list()]
        assert [a.volume for a in (await sb.info()).attachments or []] == [name]
        await sb.delete()
        await v.delete()
    finally:
        await aio.default_async_client().aclose()


async def test_async_clone_fsck_and_gc(block_server: Server) -> None:
    async with AsyncClient(block_server.url, block_server.token) as c:
        src = await c.volumes.create(unique("asrc"), cap="16MiB")
        await src.files.write("/f", b"one")
        copy = await src.clone(unique("acopy"))
        assert isinstance(copy, AsyncVolume) and await copy.files.read("/f") == b"one"
        await copy.files.write("/f", b"two")
        assert await src.files.read("/f") == b"one"
        assert (await copy.fsck()).clean and (await src.fsck()).clean
        await src.delete()
        assert (await c.gc(grace=0)).deleted >= 1
        assert await copy.files.read("/f") == b"two"
        await copy.delete()
