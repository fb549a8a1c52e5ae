"""Volumes, configuration and errors, against the real server."""

from __future__ import annotations

import pytest

import volumefs
from volumefs import Volume

from .conftest import Server, unique


def test_create_get_info_list_delete(client: volumefs.Client) -> None:
    name = unique("v")
    v = client.volumes.create(name, cap="64MiB")
    assert isinstance(v, Volume) and v.name == name
    info = v.last_info
    assert info is not None
    assert (info.name, info.cap_bytes, info.used_bytes, info.free_bytes, info.files) == (name, 64 << 20, 0, 64 << 20, 1)
    assert isinstance(info.id, int) and info.created_at and info.created_at > 1_600_000_000
    assert info.attachments == []

    got = client.volumes.get(name)
    assert got == v and got.last_info is not None and got.last_info.id == info.id

    v.files.write("/f", b"x" * 1000)
    now = v.info()
    assert (now.used_bytes, now.free_bytes, now.files) == (1000, (64 << 20) - 1000, 2)
    assert v.last_info == now

    # fields=: only these are set (in the server's answer too).
    part = v.info(fields=["used_bytes", "name"])
    assert (part.used_bytes, part.name, part.cap_bytes, part.id) == (1000, name, None, None)
    assert v.info(fields="cap_bytes").cap_bytes == 64 << 20

    listed = {x.name: x for x in client.volumes.list()}
    assert name in listed and listed[name].last_info.cap_bytes == 64 << 20  # type: ignore[union-attr]
    only = [x for x in client.volumes.list(fields=["used_bytes"]) if x.name == name]
    assert only and only[0].last_info.used_bytes == 1000 and only[0].last_info.cap_bytes is None  # type: ignore[union-attr]

    v.delete()
    with pytest.raises(volumefs.NotFound) as e:
        client.volumes.get(name)
    assert e.value.code == "NotFound" and e.value.status == 404 and e.value.errno == "ENOENT"
    assert name not in {x.name for x in client.volumes.list()}


def test_caps_as_bytes_strings_and_the_default(client: volumefs.Client) -> None:
    a = client.volumes.create(unique("cap"), cap=5_000_000)
    b = client.volumes.create(unique("cap"))
    try:
        assert a.last_info.cap_bytes == 5_000_000  # type: ignore[union-attr]
        assert b.last_info.cap_bytes == 2 << 30  # type: ignore[union-attr]
        with pytest.raises(volumefs.InvalidArgument) as e:
            client.volumes.create(unique("cap"), cap="lots")
        assert e.value.code == "InvalidArgument" and e.value.status == 400
        with pytest.raises(volumefs.InvalidArgument):
            client.volumes.create(unique("cap"), cap=0)
    finally:
        a.delete()
        b.delete()


def test_name_conflicts_unknown_fields_and_no_resize(client: volumefs.Client, vol: Volume) -> None:
    with pytest.raises(volumefs.AlreadyExists) as e:
        client.volumes.create(vol.name)
    assert (e.value.code, e.value.status) == ("AlreadyExists", 409)
    assert isinstance(e.value, volumefs.VolumefsError)
    with pytest.raises(volumefs.InvalidArgument) as e2:
        vol.info(fields="size")
    assert "cap_bytes" in e2.value.message
    with pytest.raises(volumefs.InvalidArgument):
        Volume.list(fields=["nope"], client=client)


def test_delete_attached_is_a_conflict_unless_forced(client: volumefs.Client) -> None:
    v = client.volumes.create(unique("att"), cap="8MiB")
    sb = client.sandboxes.create(unique("sb"), volumes={"/mnt/v": v})
    try:
        with pytest.raises(volumefs.Conflict) as e:
            v.delete()
        assert e.value.code == "Conflict" and "attached" in e.value.message
        v.delete(force=True)
        assert sb.volumes.list() == []
        with pytest.raises(volumefs.NotFound):
            v.delete()
    finally:
        sb.delete()


def test_class_methods_use_the_default_client_from_the_environment(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLUMEFS_SERVER", server.url)
    monkeypatch.setenv("VOLUMEFS_TOKEN", server.token)
    c = volumefs.configure()
    try:
        assert c.server == server.url and c.token == server.token
        assert volumefs.default_client() is c
        name = unique("dflt")
        v = Volume.create(name, cap="1MiB")
        assert Volume.get(name) == v
        assert name in [x.name for x in Volume.list()]
        v.delete()
    finally:
        c.close()
    # Without a scheme, http:// is assumed, as the address in DATA/http-addr is written.
    monkeypatch.setenv("VOLUMEFS_SERVER", server.addr)
    with volumefs.Client() as c2:
        assert c2.server == server.url
        c2.volumes.list()


def test_default_server_is_the_clis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLUMEFS_SERVER", raising=False)
    monkeypatch.delenv("VOLUMEFS_TOKEN", raising=False)
    with volumefs.Client() as c:
        assert (c.server, c.token) == ("http://127.0.0.1:7070", None)
    with volumefs.Client("http://example.invalid:1/", "tok") as c:
        assert (c.server, c.token) == ("http://example.invalid:1", "tok")


def test_wrong_token_is_unauthorized_and_a_dead_server_unavailable(server: Server) -> None:
    with volumefs.Client(server.url, "wrong") as c:
        with pytest.raises(volumefs.Unauthorized) as e:
            c.volumes.list()
        assert (e.value.code, e.value.status) == ("Unauthorized", 401)
    with volumefs.Client(server.url, "") as c:
        with pytest.raises(volumefs.Unauthorized):
            c.volumes.create(unique("x"))
    # A port nobody listens on: no httpx exception leaks, an Unavailable does.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with volumefs.Client(f"http://127.0.0.1:{port}", "t") as c:
        with pytest.raises(volumefs.Unavailable) as e2:
            c.volumes.list()
        assert e2.value.code == "Unavailable" and e2.value.status is None
        with pytest.raises(volumefs.Unavailable):
            c.volume("v").files.read("/x", stream=True)
        with pytest.raises(volumefs.Unavailable):
            c.volume("v").files.watch("/", retry_for=0.5)


def test_unknown_routes_and_names_are_not_found(client: volumefs.Client) -> None:
    with pytest.raises(volumefs.NotFound):
        client.volume(unique("none")).info()
    with pytest.raises(volumefs.NotFound):
        client.volume(unique("none")).files.stat("/")
    with pytest.raises(volumefs.InvalidArgument):
        client.volume("").info()


def test_clone_diverges_fsck_is_clean_and_gc_collects(block_server: Server) -> None:
    with volumefs.Client(block_server.url, block_server.token) as c:
        src = c.volumes.create(unique("src"), cap="64MiB")
        src.files.write("/a.txt", "first")
        src.files.write("/d/big.bin", b"\x07" * (3 << 20))
        used = src.info().used_bytes

        copy = src.clone(unique("copy"))
        assert isinstance(copy, Volume) and copy.last_info is not None
        assert (copy.last_info.used_bytes, copy.last_info.cap_bytes) == (used, 64 << 20)
        assert copy.files.read("/a.txt") == b"first"
        assert copy.files.read("/d/big.bin") == b"\x07" * (3 << 20)

        copy.files.write("/a.txt", "changed")
        copy.files.remove("/d/big.bin")
        assert src.files.read("/a.txt") == b"first"
        assert src.files.exists("/d/big.bin") and not copy.files.exists("/d/big.bin")
        assert copy.info().used_bytes < used

        with pytest.raises(volumefs.AlreadyExists):
            src.clone(copy.name)
        report = copy.fsck()
        assert isinstance(report, volumefs.FsckReport) and report.clean, report
        assert (report.volume, report.blocks) == (copy.name, 1)

        src.delete()
        gc = c.gc(grace=0)
        assert isinstance(gc, volumefs.GcReport)
        assert gc.deleted >= 2 and gc.deleted_bytes >= 3 << 20, gc
        assert copy.files.read("/a.txt") == b"changed" and copy.fsck().clean
        copy.delete()


def test_clone_needs_a_block_store(client: volumefs.Client, vol: Volume) -> None:
    with pytest.raises(volumefs.NotSupported) as e:
        vol.clone(unique("copy"))
    assert e.value.status == 501 and "block store" in str(e.value)
    assert vol.fsck().clean and vol.fsck().blocks == 0
    assert client.gc().deleted == 0
