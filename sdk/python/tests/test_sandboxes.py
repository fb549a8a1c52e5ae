"""Sandboxes and attachments without a running agent (registration, attach/detach, fork, the
errors of verbs that need an agent or a VM), and tenants."""

from __future__ import annotations

import pytest

import volumefs
from volumefs import Mount, Sandbox, Volume

from .conftest import Server, unique


def test_create_with_volumes_get_list_fork_delete(client: volumefs.Client, vol: Volume) -> None:
    vol.files.mkdir("/docs")
    name = unique("sb")
    sb = Sandbox.create(
        name,
        volumes={"/mnt/data": vol, "/mnt/docs": Mount(vol, read_only=True, subpath="/docs"), "/mnt/byname": vol.name},
        client=client,
    )
    assert sb.name == name and sb.guest_socket.endswith(f"/sandboxes/{name}/vsock_1024")
    att = {a.path: a for a in sb.volumes.list()}
    assert set(att) == {"/mnt/data", "/mnt/docs", "/mnt/byname"}
    docs = att["/mnt/docs"]
    assert (docs.sandbox, docs.volume, docs.read_only, docs.subpath, docs.state, docs.reason) == (name, vol.name, True, "/docs", "attached", "")
    assert (att["/mnt/data"].read_only, att["/mnt/data"].subpath) == (False, "/")
    assert sb.last_info is not None and len(sb.last_info.attachments or []) == 3

    # The volume lists its attachments too.
    assert {a.path for a in vol.info().attachments or []} == set(att)
    assert sorted(a.path for a in vol.info(fields="attachments").attachments or []) == sorted(att)

    assert Sandbox.get(name, client=client) == sb
    assert name in [s.name for s in Sandbox.list(client=client)]
    assert client.sandboxes.get(name).info().attachments == sb.info().attachments

    child = sb.fork(unique("fork"))
    kids = child.volumes.list()
    assert {a.path for a in kids} == set(att) and all(a.state == "released" for a in kids)
    assert all("forked from" in a.reason for a in kids)
    with pytest.raises(volumefs.AlreadyExists):
        sb.fork(child.name)

    child.delete()
    sb.delete()
    with pytest.raises(volumefs.NotFound):
        sb.info()
    assert name not in [s.name for s in client.sandboxes.list()]
    assert vol.info().attachments == []


def test_attach_and_detach(client: volumefs.Client, vol: Volume) -> None:
    sb = client.sandboxes.create(unique("sb"))
    try:
        assert sb.volumes.list() == []
        a = sb.volumes.attach(vol, "/mnt/x")
        assert (a.sandbox, a.volume, a.path, a.read_only, a.subpath, a.state) == (sb.name, vol.name, "/mnt/x", False, "/", "attached")
        ro = sb.volumes.attach(vol.name, "/mnt//ro/", read_only=True)
        assert ro.path == "/mnt/ro" and ro.read_only
        # The same attachment again (nothing is mounted there yet) is the same record;
        # anything else at a taken path is a conflict.
        again = sb.volumes.attach(vol, "/mnt/x")
        assert (again.path, again.read_only, again.state) == ("/mnt/x", False, "attached")
        assert len(sb.volumes.list()) == 2
        with pytest.raises(volumefs.Conflict) as dup:
            sb.volumes.attach(vol, "/mnt/x", read_only=True)
        assert "already has a volume at /mnt/x" in dup.value.message
        with pytest.raises(volumefs.NotFound):
            sb.volumes.attach(vol, "/mnt/sub", subpath="/missing")
        vol.files.write("/file", "x")
        with pytest.raises(volumefs.NotADirectory):
            sb.volumes.attach(vol, "/mnt/sub", subpath="/file")
        with pytest.raises(volumefs.InvalidArgument):
            sb.volumes.attach(vol, "relative/path")
        with pytest.raises(volumefs.NotFound):
            sb.volumes.attach(unique("novol"), "/mnt/y")
        assert sorted(x.path for x in sb.volumes.list()) == ["/mnt/ro", "/mnt/x"]
        sb.volumes.detach("/mnt/x")
        sb.volumes.detach("/mnt/ro", force=True)
        assert sb.volumes.list() == []
        with pytest.raises(volumefs.NotFound):
            sb.volumes.detach("/mnt/x")
    finally:
        sb.delete()


def test_create_rolls_back_when_an_attachment_is_refused(client: volumefs.Client, vol: Volume) -> None:
    name = unique("sb")
    with pytest.raises(volumefs.NotFound):
        client.sandboxes.create(name, volumes={"/mnt/a": vol, "/mnt/b": Mount(vol, subpath="/missing")})
    with pytest.raises(volumefs.NotFound):
        client.sandboxes.get(name)
    assert vol.info().attachments == []
    with pytest.raises(volumefs.AlreadyExists):
        sb = client.sandboxes.create(name)
        client.sandboxes.create(name)
    sb.delete()


def test_verbs_that_need_an_agent_or_a_vm(client: volumefs.Client, vol: Volume) -> None:
    sb = client.sandboxes.create(unique("sb"), volumes={"/mnt/v": vol})
    try:
        for call in (lambda: sb.exec(["true"]), sb.hibernate, sb.resume):
            with pytest.raises(volumefs.Unavailable) as e:
                call()
            assert e.value.status == 502 and "no running agent" in e.value.message
            assert e.value.errno == "EHOSTUNREACH"
        with pytest.raises(volumefs.InvalidArgument) as e2:
            sb.stop()
        assert "no running VM" in e2.value.message
        assert sb.reset_connections() == 0
        with pytest.raises(volumefs.NotFound):
            client.sandbox(unique("none")).exec("true")
        with pytest.raises(volumefs.InvalidArgument):
            sb.exec([])
    finally:
        sb.delete()


def test_tenants_are_isolated(server: Server, client: volumefs.Client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    acme_name, globex_name = unique("acme"), unique("globex")
    acme_t = client.tenants.create(acme_name, default_cap="64MiB")
    globex_t = client.tenants.create(globex_name, default_cap=32 << 20)
    assert acme_t.token and globex_t.token and acme_t.token != globex_t.token
    assert (acme_t.name, acme_t.default_cap_bytes) == (acme_name, 64 << 20)
    listed = {t.name: t for t in client.tenants.list()}
    assert listed[globex_name].default_cap_bytes == 32 << 20 and listed[globex_name].token is None
    assert listed[acme_name].created_at
    with pytest.raises(volumefs.AlreadyExists):
        client.tenants.create(acme_name)

    with volumefs.Client(server.url, acme_t.token) as acme, volumefs.Client(server.url, globex_t.token) as globex:
        # Both make a volume called `data`: separate namespaces, each with its default cap.
        a = acme.volumes.create("data")
        g = globex.volumes.create("data")
        assert (a.name, a.last_info.cap_bytes) == ("data", 64 << 20)  # type: ignore[union-attr]
        assert g.last_info.cap_bytes == 32 << 20  # type: ignore[union-attr]
        with pytest.raises(volumefs.PermissionDenied) as e:
            acme.volumes.create("big", cap="1GiB")
        assert (e.value.code, e.value.status) == ("PermissionDenied", 403)
        a.files.write("/secret.txt", "acme's")
        assert a.files.read("/secret.txt") == b"acme's"
        with pytest.raises(volumefs.NotFound):
            g.files.read("/secret.txt")
        # Spelling the other tenant's namespace does not reach it.
        with pytest.raises(volumefs.NotFound):
            globex.volume(f"{acme_name}~data").files.read("/secret.txt")
        with pytest.raises(volumefs.InvalidArgument):
            globex.volumes.create(f"{acme_name}~data")
        assert [v.name for v in acme.volumes.list()] == ["data"]
        with pytest.raises(volumefs.NotFound) as e2:
            acme.volumes.get("nope")
        assert "`nope`" in e2.value.message and acme_name not in e2.value.message
        # Sandboxes too.
        sb = acme.sandboxes.create("sb", volumes={"/mnt/data": a})
        assert [(x.volume, x.sandbox) for x in sb.volumes.list()] == [("data", "sb")]
        assert globex.sandboxes.list() == []
        with pytest.raises(volumefs.NotFound):
            globex.sandbox("sb").volumes.attach(g, "/mnt/x")
        # Uploads (streamed and tus) and watches work in the tenant's namespace.
        assert a.files.upload(b"via stream", "/s").size == 10
        local = tmp_path / "f.bin"
        local.write_bytes(b"t" * 3_000_000)
        assert a.files.upload(local, "/tus.bin", chunk_size=1 << 20).sent == 3_000_000
        assert a.files.read("/tus.bin") == b"t" * 3_000_000
        (tmp_path / "big.bin").write_bytes(b"b" * (33 << 20))
        with pytest.raises(volumefs.VolumeFull):
            g.files.upload(tmp_path / "big.bin", "/too-big")  # globex's default cap is 32 MiB
        with a.files.watch("/") as w:
            a.files.mkdir("/seen")
            ev = next(iter(w))
        assert (ev.kind, ev.path) == ("create", "/seen")
        # Only the operator manages tenants, and sees everyone's volumes by their full names.
        with pytest.raises(volumefs.PermissionDenied):
            acme.tenants.create("evil")
        with pytest.raises(volumefs.PermissionDenied):
            acme.tenants.list()
        names = {v.name for v in client.volumes.list()}
        assert {f"{acme_name}~data", f"{globex_name}~data"} <= names
        sb.delete()
        a.delete()
        g.delete()
