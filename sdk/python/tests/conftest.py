"""Fixtures: one real volumefs server for the whole session (the binary from ``VOLUMEFS_BIN``,
default ``../../target/debug/volumefs`` from sdk/python), clients, fresh volumes, and a TCP
proxy whose connections a test can cut."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, List, Optional

import pytest

import volumefs

SDK_DIR = pathlib.Path(__file__).resolve().parent.parent
REPO = SDK_DIR.parent.parent


def volumefs_bin() -> pathlib.Path:
    """The server binary under test."""
    return pathlib.Path(os.environ.get("VOLUMEFS_BIN") or (SDK_DIR / "../../target/debug/volumefs")).resolve()


def guest_bin() -> pathlib.Path:
    """The guest agent next to the server binary (or ``VOLUMEFS_GUEST_BIN``)."""
    return pathlib.Path(os.environ.get("VOLUMEFS_GUEST_BIN") or volumefs_bin().with_name("volumefs-guest")).resolve()


@dataclass
class Server:
    url: str
    addr: str
    token: str
    data: pathlib.Path
    log: pathlib.Path
    proc: subprocess.Popen

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-8000:]
        except OSError:
            return ""


def run_server(base: pathlib.Path, extra: List[str]) -> Iterator[Server]:
    """A real server on a fresh data directory under ``base`` and ``--http 127.0.0.1:0``
    (with ``extra`` arguments); killed by its PID when the generator closes."""
    binary = volumefs_bin()
    if not binary.exists():
        raise RuntimeError(f"no server binary at {binary}: build it (cargo build --bin volumefs) or set VOLUMEFS_BIN")
    data = base / "data"
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), "server", "--data", str(data), "--http", "127.0.0.1:0", *extra],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    addr_file = data / "http-addr"
    deadline = time.monotonic() + 60
    addr = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            addr = addr_file.read_text().strip()
        except OSError:
            addr = ""
        if ":" in addr and (data / "api-token").exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"the server did not write {addr_file}:\n{log.read_text(errors='replace')}")
    token = (data / "api-token").read_text().strip()
    srv = Server(url=f"http://{addr}", addr=addr, token=token, data=data, log=log, proc=proc)
    try:
        yield srv
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server on the embedded default store, for the whole session."""
    yield from run_server(tmp_path_factory.mktemp("volumefs"), [])


@pytest.fixture(scope="session")
def block_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second real server whose file data is blocks in a local directory (clone, gc)."""
    base = tmp_path_factory.mktemp("volumefs-blocks")
    yield from run_server(base, ["--blocks", f"file://{base / 'blocks'}"])


@pytest.fixture
def client(server: Server) -> Iterator[volumefs.Client]:
    """A client with the operator's token."""
    with volumefs.Client(server.url, server.token) as c:
        yield c


def unique(prefix: str = "t") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def vol(client: volumefs.Client) -> Iterator[volumefs.Volume]:
    """A fresh 256 MiB volume, deleted (forcibly) afterwards."""
    v = client.volumes.create(unique("vol"), cap="256MiB")
    yield v
    try:
        v.delete(force=True)
    except volumefs.NotFound:
        pass


class Proxy:
    """A TCP proxy to the server whose connections can be cut, all at once (:meth:`cut`) or when
    ``cut_after`` bytes have gone from the client to the server."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.url = f"http://{self.addr}"
        self.lock = threading.Lock()
        self.socks: List[socket.socket] = []
        self.upstream_bytes = 0
        self.cut_after: Optional[int] = None
        self.cuts = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    with self.lock:
                        self.upstream_bytes += len(data)
                        trip = self.cut_after is not None and self.upstream_bytes >= self.cut_after
                        if trip:
                            self.cut_after = None
                    if trip:
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drops every open connection (both sides see a reset or an early end)."""
        with self.lock:
            socks, self.socks = self.socks, []
            self.cuts += 1
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(server: Server) -> Iterator[Proxy]:
    """A cuttable TCP proxy in front of the server."""
    p = Proxy(server.addr)
    yield p
    p.close()


def fuse_available() -> Optional[str]:
    """Why FUSE tests cannot run here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not guest_bin().exists():
        return f"no guest agent at {guest_bin()}"
    return None


def skip_or_fail(reason: str, require_env: str) -> None:
    """Skips, unless the environment says this tier must run (then fails)."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{require_env}=1 but: {reason}")
    pytest.skip(reason)


def mounted(path: pathlib.Path) -> bool:
    """Whether ``path`` is a mount point (from /proc/self/mounts)."""
    want = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == want for line in f if len(line.split()) > 1)


def eventually(check, timeout: float = 20.0, every: float = 0.05):  # type: ignore[no-untyped-def]
    """Polls ``check`` until it returns something true (returned) or the time is up (``None``)."""
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            return None
        time.sleep(every)


def which(name: str) -> Optional[str]:
    """A program on PATH or in ~/.cargo/bin (where the server also looks)."""
    found = shutil.which(name)
    if found:
        return found
    cargo = pathlib.Path(os.environ.get("CARGO_HOME") or pathlib.Path.home() / ".cargo") / "bin" / name
    return str(cargo) if cargo.is_file() else None
