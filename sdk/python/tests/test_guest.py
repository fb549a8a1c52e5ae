"""A guest on this host: the real ``volumefs-guest agent`` mounts a sandbox's attachments through
FUSE (root and /dev/fuse needed, else SKIPPED; ``VOLUMEFS_REQUIRE_FUSE=1`` makes that a
failure). The SDK watches what the guest writes, runs commands through the agent, attaches and
detaches live, hibernates and resumes; SIGTERM to the agent takes the mounts away."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import threading
from typing import Iterator, List

import pytest

import volumefs
from volumefs import Event, Volume

from .conftest import eventually, fuse_available, guest_bin, mounted, skip_or_fail, unique


class Agent:
    """``volumefs-guest agent --server unix:SOCKET``, stopped with SIGTERM by its PID."""

    def __init__(self, socket: str, log: pathlib.Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(guest_bin()), "agent", "--server", f"unix:{socket}"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int:
        """SIGTERM, then waits (the agent unmounts first); SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def mounts(tmp_path: pathlib.Path) -> Iterator[List[pathlib.Path]]:
    """Mount points under tmp_path; whatever is still mounted at the end is lazily unmounted, so
    that removing tmp_path never walks into a live volume."""
    why = fuse_available()
    if why:
        skip_or_fail(f"SKIPPED: FUSE guest tests need root, /dev/fuse and volumefs-guest ({why})", "VOLUMEFS_REQUIRE_FUSE")
    paths = [tmp_path / "mnt" / "data", tmp_path / "mnt" / "ro"]
    yield paths
    for p in paths:
        if mounted(p):
            subprocess.run(["umount", "-l", str(p)], check=False)


def collect(w: volumefs.Watch, want, timeout: float = 20.0) -> List[Event]:  # type: ignore[no-untyped-def]
    """Events until ``want(events)`` holds (or the time is up)."""
    out: List[Event] = []
    timer = threading.Timer(timeout, w.close)
    timer.start()
    try:
        for ev in w:
            out.append(ev)
            if want(out):
                break
    finally:
        timer.cancel()
    return out


def test_a_guest_through_fuse(client: volumefs.Client, vol: Volume, mounts: List[pathlib.Path], tmp_path: pathlib.Path) -> None:
    mnt, ro = mounts
    vol.files.write("/from-sdk.txt", "written by the SDK\n")
    sb = client.sandboxes.create(unique("sb"), volumes={str(mnt): vol})
    agent = Agent(sb.guest_socket, tmp_path / "agent.log")
    try:
        assert eventually(lambda: mounted(mnt)), agent.log.read_text()
        assert eventually(lambda: [a.state for a in sb.volumes.list()] == ["mounted"])
        assert (mnt / "from-sdk.txt").read_text() == "written by the SDK\n"

        # What the guest writes through FUSE, the SDK's watch sees and the SDK reads back.
        with vol.files.watch("/") as w:
            (mnt / "guest.txt").write_bytes(b"from the guest\n")
            events = collect(w, lambda evs: {("create", "/guest.txt"), ("modify", "/guest.txt")} <= {(e.kind, e.path) for e in evs})
        kinds = {(e.kind, e.path) for e in events}
        assert {("create", "/guest.txt"), ("modify", "/guest.txt")} <= kinds, events
        assert vol.files.read("/guest.txt") == b"from the guest\n"

        # Commands through the agent (on this host, it runs them here).
        r = sb.exec(["cat", str(mnt / "guest.txt")])
        assert (r.code, r.stdout, r.stderr, r.ok) == (0, "from the guest\n", "", True)
        r = sb.exec("echo out; echo err >&2; exit 3")
        assert (r.code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
        assert sb.exec(["cat"], stdin="piped in").stdout == "piped in"

        # Attached while the agent runs: mounted at once, read-only; detached: unmounted.
        a = sb.volumes.attach(vol, str(ro), read_only=True)
        assert (a.state, a.reason) == ("mounted", "") and mounted(ro)
        assert (ro / "guest.txt").read_bytes() == b"from the guest\n"
        with pytest.raises(OSError):
            (ro / "nope").write_text("read-only")
        sb.volumes.detach(str(ro))
        assert eventually(lambda: not mounted(ro))

        # Hibernate releases the leases, resume takes them again; the data stays.
        assert {x.state for x in sb.hibernate()} == {"released"}
        assert {x.state for x in sb.resume()} == {"mounted"}
        assert (mnt / "guest.txt").read_bytes() == b"from the guest\n"

        # A detach with a file open is refused unless forced.
        with open(mnt / "guest.txt", "rb") as f:
            with pytest.raises(volumefs.Conflict) as e:
                sb.volumes.detach(str(mnt))
            assert "open" in e.value.message
            assert f.read() == b"from the guest\n"
    finally:
        code = agent.stop()
    assert code == 0, agent.log.read_text()
    assert not mounted(mnt), "SIGTERM to the agent unmounts"
    assert eventually(lambda: all(x.state != "mounted" for x in sb.volumes.list()))
    sb.delete()
