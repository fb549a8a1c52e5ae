"""What the sync and async clients share: configuration, the requests of every call and how their
answers are read, the Server-Sent Events parser, and the tar plumbing of uploads and downloads.
Nothing here does I/O on the network; the clients send what these functions describe."""

from __future__ import annotations

import base64
import datetime as _dt
import json as _json
import os
import queue
import re
import stat as _stat
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote

from . import errors
from .models import (
    Attachment,
    BatchResult,
    ExecResult,
    FileEntry,
    FsckReport,
    GcReport,
    ResultList,
    SandboxInfo,
    SearchHit,
    Tenant,
    VolumeInfo,
    mounts_of,
    volume_name,
)

DEFAULT_SERVER = "http://127.0.0.1:7070"
#: Bytes per tus PATCH (and per streamed chunk).
DEFAULT_CHUNK = 8 << 20
#: Read and write granularity of streamed bodies.
IO_CHUNK = 256 << 10
TUS_VERSION = "1.0.0"

Cap = Union[int, str]
Fields = Union[str, Sequence[str], None]
Expires = Union[int, float, _dt.timedelta]
Progress = Callable[[int, Optional[int]], Any]


def resolve_config(server: Optional[str], token: Optional[str]) -> Tuple[str, Optional[str]]:
    """The server URL and token: the arguments, else ``VOLUMEFS_SERVER`` / ``VOLUMEFS_TOKEN``,
    else ``http://127.0.0.1:7070`` and no token (as the CLI)."""
    url = server or os.environ.get("VOLUMEFS_SERVER") or DEFAULT_SERVER
    if "://" not in url:
        url = "http://" + url
    tok = token if token is not None else os.environ.get("VOLUMEFS_TOKEN")
    return url.rstrip("/"), (tok.strip() if tok else None)


def seg(name: str) -> str:
    """One URL path segment (a volume or sandbox name)."""
    if not isinstance(name, str) or not name:
        raise errors.InvalidArgument("InvalidArgument", f"a name must be a non-empty string, not {name!r}")
    return quote(name, safe="")


def file_url(volume: str, path: str) -> str:
    """``/v1/volumes/V/files/PATH``."""
    rel = path.lstrip("/")
    if not rel:
        raise errors.IsADirectory("IsADirectory", "the volume root is a directory, not a file")
    return f"/v1/volumes/{seg(volume)}/files/{quote(rel, safe='/')}"


def fields_param(fields: Fields) -> Optional[str]:
    """``fields=`` as the comma-separated list the API takes."""
    if fields is None:
        return None
    if isinstance(fields, str):
        return fields
    return ",".join(fields)


def expires_secs(expires: Expires) -> int:
    """Seconds from an int, a float or a ``timedelta``."""
    if isinstance(expires, _dt.timedelta):
        return int(expires.total_seconds())
    return int(expires)


def range_header(rng: Optional[Tuple[Optional[int], Optional[int]]]) -> Optional[str]:
    """``(start, end)`` with slice semantics (``end`` excluded, ``None`` for the end of file, a
    negative start for the last bytes) → an HTTP ``Range`` header."""
    if rng is None:
        return None
    start, end = rng
    if start is not None and start < 0:
        if end is not None:
            raise errors.InvalidArgument("InvalidArgument", "a negative start (the last N bytes) takes no end")
        return f"bytes={start}"
    start = start or 0
    if end is None:
        return f"bytes={start}-"
    if end <= start:
        raise errors.InvalidArgument("InvalidArgument", f"empty range {rng!r}: end must be greater than start")
    return f"bytes={start}-{end - 1}"


# ----- requests ---------------------------------------------------------------------------------


def _json_body(r: Any) -> Any:
    try:
        return r.json()
    except ValueError as e:
        raise errors.ProtocolError("ProtocolError", f"the server's answer is not JSON: {e}", r.status_code) from e


@dataclass
class Req:
    """One API request and how to read its answer."""

    method: str
    url: str
    params: Optional[Dict[str, Any]] = None
    json: Any = None
    headers: Dict[str, str] = field(default_factory=dict)
    content: Any = None
    #: ``None``: the client's default timeout; else seconds (or ``-1`` for none).
    timeout: Optional[float] = None
    parse: Callable[[Any], Any] = _json_body


# Volumes


def volume_create(name: str, cap: Optional[Cap]) -> Req:
    body: Dict[str, Any] = {"name": name}
    if cap is not None:
        body["cap"] = cap
    return Req("POST", "/v1/volumes", json=body, parse=lambda r: VolumeInfo.from_json(_json_body(r)))


def volume_get(name: str, fields: Fields = None) -> Req:
    f = fields_param(fields)
    return Req(
        "GET",
        f"/v1/volumes/{seg(name)}",
        params={"fields": f} if f else None,
        parse=lambda r: VolumeInfo.from_json(_json_body(r)),
    )


def volume_list(fields: Fields = None) -> Req:
    f = fields_param(fields)
    return Req(
        "GET",
        "/v1/volumes",
        params={"fields": f} if f else None,
        parse=lambda r: [VolumeInfo.from_json(v) for v in _json_body(r)],
    )


def volume_clone(name: str, new: str, cap: Optional[Cap]) -> Req:
    body: Dict[str, Any] = {"name": new}
    if cap is not None:
        body["cap"] = cap
    return Req("POST", f"/v1/volumes/{seg(name)}/clone", json=body, parse=lambda r: VolumeInfo.from_json(_json_body(r)))


def volume_fsck(name: str) -> Req:
    return Req("GET", f"/v1/volumes/{seg(name)}/fsck", timeout=-1, parse=lambda r: FsckReport.from_json(_json_body(r)))


def gc(grace: float) -> Req:
    return Req("POST", "/v1/gc", params={"grace": str(int(grace))}, timeout=-1, parse=lambda r: GcReport.from_json(_json_body(r)))


def volume_delete(name: str, force: bool) -> Req:
    return Req("DELETE", f"/v1/volumes/{seg(name)}", params={"force": "true"} if force else None, parse=lambda r: None)


# Files


def file_read(volume: str, path: str, rng: Any) -> Req:
    h = range_header(rng)
    return Req("GET", file_url(volume, path), headers={"Range": h} if h else {}, parse=lambda r: r.content)


def file_put(volume: str, path: str, content: Any, parents: bool) -> Req:
    return Req(
        "PUT",
        file_url(volume, path),
        params={"parents": "true"} if parents else None,
        headers={"Content-Type": "application/octet-stream"},
        content=content,
        timeout=-1,
        parse=lambda r: int(_json_body(r).get("size", 0)),
    )


def file_append(volume: str, path: str, content: Any) -> Req:
    return Req(
        "POST",
        file_url(volume, path),
        params={"append": ""},
        headers={"Content-Type": "application/octet-stream"},
        content=content,
        timeout=-1,
        parse=lambda r: int(_json_body(r).get("size", 0)),
    )


def file_head(volume: str, path: str) -> Req:
    return Req("HEAD", file_url(volume, path), parse=lambda r: True)


def batch(volume: str, dest: str, content: Any) -> Req:
    return Req(
        "POST",
        f"/v1/volumes/{seg(volume)}/batch",
        params={"path": dest or "/"},
        headers={"Content-Type": "application/x-tar"},
        content=content,
        timeout=-1,
        parse=lambda r: BatchResult.from_json(_json_body(r)),
    )


def file_move(volume: str, src: str, dst: str) -> Req:
    return Req("POST", f"/v1/volumes/{seg(volume)}/move", json={"from": src, "to": dst}, parse=lambda r: None)


def file_remove(volume: str, path: str, recursive: bool) -> Req:
    return Req(
        "POST",
        f"/v1/volumes/{seg(volume)}/remove",
        json={"path": path, "recursive": bool(recursive)},
        parse=lambda r: int(_json_body(r).get("entries", 0)),
    )


def file_mkdir(volume: str, path: str, parents: bool) -> Req:
    return Req("POST", f"/v1/volumes/{seg(volume)}/mkdir", json={"path": path, "parents": bool(parents)}, parse=lambda r: None)


def file_edit(volume: str, path: str, find: str, replace: str) -> Req:
    return Req(
        "POST",
        f"/v1/volumes/{seg(volume)}/edit",
        json={"path": path, "find": find, "replace": replace},
        parse=lambda r: int(_json_body(r).get("size", 0)),
    )


def _entries(r: Any) -> "ResultList[FileEntry]":
    d = _json_body(r)
    return ResultList([FileEntry.from_json(e) for e in d.get("entries", [])], bool(d.get("truncated")))


def file_list(volume: str, path: str, recursive: bool, limit: Optional[int]) -> Req:
    params: Dict[str, Any] = {"path": path or "/"}
    if recursive:
        params["recursive"] = "true"
    if limit is not None:
        params["limit"] = str(int(limit))
    return Req("GET", f"/v1/volumes/{seg(volume)}/list", params=params, parse=_entries)


def file_stat(volume: str, path: str) -> Req:
    return Req(
        "GET", f"/v1/volumes/{seg(volume)}/stat", params={"path": path}, parse=lambda r: FileEntry.from_json(_json_body(r))
    )


def _hits(r: Any) -> "ResultList[SearchHit]":
    d = _json_body(r)
    hits = [SearchHit(path=str(m["path"]), line=m.get("line"), text=m.get("text")) for m in d.get("matches", [])]
    return ResultList(hits, bool(d.get("truncated")))


def file_search(volume: str, path: str, name: Optional[str], content: Optional[str], limit: Optional[int]) -> Req:
    params: Dict[str, Any] = {"path": path or "/"}
    if name:
        params["name"] = name
    if content:
        params["content"] = content
    if limit is not None:
        params["limit"] = str(int(limit))
    return Req("GET", f"/v1/volumes/{seg(volume)}/search", params=params, parse=_hits)


def file_replace(volume: str, path: str, find: str, replace: str, name: Optional[str]) -> Req:
    body: Dict[str, Any] = {"path": path or "/", "find": find, "replace": replace}
    if name:
        body["name"] = name
    return Req(
        "POST",
        f"/v1/volumes/{seg(volume)}/replace",
        json=body,
        parse=lambda r: {str(c["path"]): int(c["replacements"]) for c in _json_body(r).get("changed", [])},
    )


def signed_url(volume: str, path: str, expires: Expires, archive: Optional[str]) -> Req:
    body: Dict[str, Any] = {"path": path, "expires_secs": expires_secs(expires)}
    if archive:
        body["archive"] = archive
    return Req("POST", f"/v1/volumes/{seg(volume)}/signed-url", json=body, parse=lambda r: str(_json_body(r)["url"]))


def archive_get(volume: str, path: str, fmt: str) -> Req:
    return Req("GET", f"/v1/volumes/{seg(volume)}/archive", params={"path": path or "/", "format": fmt}, timeout=-1)


def watch_req(volume: str, path: str, last_id: Optional[str], internal: bool = False) -> Req:
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    params = {"path": path or "/"}
    if internal:
        # The server leaves its own temporary files out unless asked.
        params["internal"] = "true"
    return Req("GET", f"/v1/volumes/{seg(volume)}/watch", params=params, headers=headers)


# Sandboxes


def _attachments(r: Any) -> List[Attachment]:
    return [Attachment.from_json(a) for a in _json_body(r)]


def sandbox_create(name: str) -> Req:
    return Req("POST", "/v1/sandboxes", json={"name": name}, parse=lambda r: SandboxInfo.from_json(_json_body(r)))


def sandbox_get(name: str) -> Req:
    return Req("GET", f"/v1/sandboxes/{seg(name)}", parse=lambda r: SandboxInfo.from_json(_json_body(r)))


def sandbox_list() -> Req:
    return Req("GET", "/v1/sandboxes", parse=lambda r: [SandboxInfo.from_json(s) for s in _json_body(r)])


def sandbox_delete(name: str) -> Req:
    return Req("DELETE", f"/v1/sandboxes/{seg(name)}", parse=lambda r: None)


def sandbox_run(name: str, volumes: Optional[Mapping[str, Any]], memory: Optional[str]) -> Req:
    body: Dict[str, Any] = {"volumes": mounts_of(volumes)}
    if memory:
        body["memory"] = str(memory)
    return Req("POST", f"/v1/sandboxes/{seg(name)}/run", json=body, timeout=-1, parse=_attachments)


def sandbox_verb(name: str, verb: str, body: Optional[Dict[str, Any]] = None, timeout: Optional[float] = -1) -> Req:
    parse: Callable[[Any], Any] = _json_body
    if verb in ("hibernate", "resume"):
        parse = _attachments
    elif verb == "fork":
        parse = lambda r: SandboxInfo.from_json(_json_body(r))  # noqa: E731
    elif verb == "stop":
        parse = lambda r: None  # noqa: E731
    elif verb == "reset-connections":
        parse = lambda r: int(_json_body(r).get("closed", 0))  # noqa: E731
    return Req("POST", f"/v1/sandboxes/{seg(name)}/{verb}", json=body or {}, timeout=timeout, parse=parse)


def sandbox_exec(name: str, cmd: Union[str, Sequence[str]], stdin: Union[str, bytes, None], timeout: Optional[float]) -> Req:
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
    if not argv:
        raise errors.InvalidArgument("InvalidArgument", "exec needs a command")
    body: Dict[str, Any] = {"argv": argv}
    if stdin is not None:
        body["stdin"] = stdin.decode("utf-8") if isinstance(stdin, bytes) else stdin
    if timeout is not None:
        body["timeout_ms"] = int(timeout * 1000)
    http_timeout = (timeout + 30.0) if timeout is not None else -1
    return Req(
        "POST",
        f"/v1/sandboxes/{seg(name)}/exec",
        json=body,
        timeout=http_timeout,
        parse=lambda r: ExecResult(**{k: _json_body(r)[k] for k in ("code", "stdout", "stderr")}),
    )


def attachments_list(sandbox: str) -> Req:
    return Req("GET", f"/v1/sandboxes/{seg(sandbox)}/attachments", parse=_attachments)


def attach(sandbox: str, volume: Any, path: str, read_only: bool, subpath: str) -> Req:
    body = {"volume": volume_name(volume), "path": path, "read_only": bool(read_only), "subpath": subpath or "/"}
    return Req(
        "POST",
        f"/v1/sandboxes/{seg(sandbox)}/attachments",
        json=body,
        timeout=-1,
        parse=lambda r: Attachment.from_json(_json_body(r)),
    )


def detach(sandbox: str, path: str, force: bool) -> Req:
    params = {"path": path}
    if force:
        params["force"] = "true"
    return Req("DELETE", f"/v1/sandboxes/{seg(sandbox)}/attachments", params=params, timeout=-1, parse=lambda r: None)


# Tenants


def tenant_create(name: str, default_cap: Optional[Cap]) -> Req:
    body: Dict[str, Any] = {"name": name}
    if default_cap is not None:
        body["default_cap"] = default_cap
    return Req("POST", "/v1/tenants", json=body, parse=lambda r: Tenant.from_json(_json_body(r)))


def tenant_list() -> Req:
    return Req("GET", "/v1/tenants", parse=lambda r: [Tenant.from_json(t) for t in _json_body(r)])


# ----- tus ----------------------------------------------------------------------------------------


def tus_metadata(path: str, parents: bool) -> str:
    """``Upload-Metadata``: ``path <base64>[,parents <base64 of true>]``."""

    def enc(s: str) -> str:
        return base64.b64encode(s.encode("utf-8")).decode("ascii")

    meta = f"path {enc(path)}"
    if parents:
        meta += f",parents {enc('true')}"
    return meta


def tus_create(volume: str, path: str, length: int, parents: bool) -> Req:
    return Req(
        "POST",
        f"/v1/volumes/{seg(volume)}/uploads",
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Upload-Length": str(length),
            "Upload-Metadata": tus_metadata(path, parents),
        },
        parse=lambda r: r.headers.get("location") or "",
    )


def tus_offset(url: str) -> Req:
    def parse(r: Any) -> Tuple[int, int]:
        try:
            return int(r.headers["upload-offset"]), int(r.headers.get("upload-length", -1))
        except (KeyError, ValueError) as e:
            raise errors.ProtocolError("ProtocolError", f"no Upload-Offset in the answer to HEAD {url}", r.status_code) from e

    return Req("HEAD", url, headers={"Tus-Resumable": TUS_VERSION}, parse=parse)


def tus_patch(url: str, offset: int, content: Any) -> Req:
    return Req(
        "PATCH",
        url,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
        },
        content=content,
        timeout=-1,
        parse=lambda r: int(r.headers.get("upload-offset", offset)),
    )


def tus_delete(url: str) -> Req:
    return Req("DELETE", url, headers={"Tus-Resumable": TUS_VERSION}, parse=lambda r: None)


def shutdown_socket(resp: Any) -> None:
    """Shuts a streamed response's socket down, so that a read blocked on it (in another thread
    or task) returns at once; closing the response alone waits for the next bytes."""
    try:
        stream = resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            import socket as _socket

            sock.shutdown(_socket.SHUT_RDWR)
    except Exception:  # noqa: BLE001 - best effort: the close that follows still happens
        pass


# ----- Server-Sent Events -----------------------------------------------------------------------

_INTERNAL = re.compile(r"^\..+\.volumefs-(up-)?[0-9a-f]+$")


def is_internal_path(path: Optional[str]) -> bool:
    """Whether a path is one of the server's hidden temporary files (atomic writes, uploads)."""
    return bool(path) and bool(_INTERNAL.match(path.rsplit("/", 1)[-1]))  # type: ignore[union-attr]


class SSEParser:
    """Server-Sent Events, line by line (the WHATWG rules this API needs: ``id``, ``event``,
    ``data``, comments; ``retry`` is read and kept)."""

    def __init__(self) -> None:
        self.last_id: Optional[str] = None
        self.retry_ms: Optional[int] = None
        self._event = ""
        self._data: List[str] = []
        self._id: Optional[str] = None

    def feed(self, line: str) -> Optional[Tuple[Optional[str], str, str]]:
        """Feeds one line (without its end); returns ``(id, event, data)`` when an event ends."""
        if line.endswith("\r"):
            line = line[:-1]
        if line == "":
            if not self._data and not self._event:
                self._id = None
                return None
            out = (self._id, self._event or "message", "\n".join(self._data))
            if self._id is not None:
                self.last_id = self._id
            self._event, self._data, self._id = "", [], None
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


def sse_event(raw: Tuple[Optional[str], str, str]) -> Any:
    """A parsed SSE block → an :class:`~volumefs.models.Event`."""
    from .models import Event

    event_id, kind, data = raw
    try:
        obj = _json.loads(data) if data else {}
    except ValueError:
        obj = {"message": data}
    if not isinstance(obj, dict):
        obj = {"message": str(obj)}
    return Event.from_sse(event_id, kind, obj)


# ----- tar: uploads of directories and batches --------------------------------------------------


def tar_of_files(files: Mapping[str, Union[bytes, bytearray, memoryview, str]]) -> bytes:
    """A tar stream of ``{path: contents}`` (mode 0644, mtime now), for ``write_many``."""
    import io
    import time

    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, data in files.items():
            if isinstance(data, str):
                raw = data.encode("utf-8")
            elif isinstance(data, (bytes, bytearray, memoryview)):
                raw = bytes(data)
            else:
                raise TypeError(f"{path}: contents must be bytes or str, not {type(data).__name__}")
            name = path.lstrip("/")
            if not name:
                raise errors.InvalidArgument("InvalidArgument", "a batch entry needs a file path, not the root")
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime, ti.type = len(raw), 0o644, now, tarfile.REGTYPE
            tf.addfile(ti, io.BytesIO(raw))
    return buf.getvalue()


def walk_dir(root: str) -> Iterator[Tuple[str, str, os.stat_result]]:
    """Everything below ``root`` as ``(local path, archive name, lstat)``, parents first, without
    following symlinks; sockets, FIFOs and devices are left out (a volume's batch refuses them)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not (_stat.S_ISDIR(st.st_mode) or _stat.S_ISREG(st.st_mode) or _stat.S_ISLNK(st.st_mode)):
                continue
            arc = name if rel_dir == "." else os.path.join(rel_dir, name)
            yield full, arc.replace(os.sep, "/"), st


def tarinfo_for(full: str, arc: str, st: os.stat_result) -> tarfile.TarInfo:
    """A tar header keeping the mode, owner, mtime and (for a symlink) target; never a hard link."""
    ti = tarfile.TarInfo(arc)
    ti.mode = _stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.mtime = int(st.st_mtime)
    if _stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    elif _stat.S_ISLNK(st.st_mode):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(full)
    else:
        ti.type = tarfile.REGTYPE
        ti.size = st.st_size
    return ti


_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _QueueWriter:
    """A file object for ``tarfile`` that hands what it writes to a bounded queue in chunks."""

    def __init__(self, q: "queue.Queue[Any]", stop: threading.Event) -> None:
        self.q, self.stop, self.buf = q, stop, bytearray()

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise OSError("the upload was abandoned")

    def write(self, b: bytes) -> int:
        self.buf += b
        if len(self.buf) >= IO_CHUNK:
            self._put(bytes(self.buf))
            self.buf.clear()
        return len(b)

    def finish(self) -> None:
        if self.buf:
            self._put(bytes(self.buf))
            self.buf.clear()
        self._put(_END)

    def fail(self, exc: BaseException) -> None:
        try:
            self._put(_Failed(exc))
        except OSError:
            pass


class TarProducer:
    """Writes a tar stream of a local directory on a thread, into a bounded queue, so that a large
    tree streams with little memory. ``get()`` returns the next chunk, ``None`` at the end."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.q: "queue.Queue[Any]" = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.file_bytes = 0
        self.thread = threading.Thread(target=self._run, name="volumefs-tar", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        w = _QueueWriter(self.q, self.stop)
        try:
            with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                for full, arc, st in walk_dir(self.root):
                    ti = tarinfo_for(full, arc, st)
                    if ti.type == tarfile.REGTYPE:
                        with open(full, "rb") as f:
                            tf.addfile(ti, f)
                        self.file_bytes += ti.size
                    else:
                        tf.addfile(ti)
            w.finish()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            w.fail(e)

    def get(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The next chunk of the stream, or ``None`` at its end; an error of the producer is raised."""
        item = self.q.get(timeout=timeout)
        if item is _END:
            return None
        if isinstance(item, _Failed):
            raise item.exc
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stops the producer (when the request ended early)."""
        self.stop.set()


# ----- tar: downloads of directories ------------------------------------------------------------


class _ChunkReader:
    """A read-only file object over an iterator of byte chunks (a streamed HTTP body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.cur = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self.cur:
                try:
                    self.cur = memoryview(next(self.chunks))
                except StopIteration:
                    break
                continue
            take = len(self.cur) if n < 0 else min(n - len(out), len(self.cur))
            out += self.cur[:take]
            self.cur = self.cur[take:]
        return bytes(out)


def _inside(base: str, target: str) -> bool:
    base = os.path.realpath(base)
    return os.path.commonpath([base, os.path.realpath(target)]) == base


def extract_tar(fileobj: Union[BinaryIO, _ChunkReader], dest: str, strip_first: bool) -> int:
    """Unpacks a tar stream into ``dest`` safely: no absolute names, no ``..``, nothing written
    through a symlink (each file's directory must resolve inside ``dest``), no hard links or
    devices; modes (without set-id bits) and mtimes kept. Returns the number of entries."""
    os.makedirs(dest, exist_ok=True)
    dirs: List[Tuple[str, int, float]] = []
    count = 0
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:  # type: ignore[call-overload]
        for m in tf:
            name = m.name.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or ".." in parts:
                raise errors.ProtocolError("ProtocolError", f"unsafe name in the archive: {m.name!r}")
            if strip_first:
                parts = parts[1:]
            target = os.path.join(dest, *parts) if parts else dest
            parent = os.path.dirname(target) if parts else dest
            if parts:
                os.makedirs(parent, exist_ok=True)
                if not _inside(dest, parent):
                    raise errors.ProtocolError("ProtocolError", f"{m.name!r} would be written through a symlink")
            mode = m.mode & 0o777
            if m.isdir():
                if parts:
                    if os.path.islink(target):
                        raise errors.ProtocolError("ProtocolError", f"{m.name!r} is a symlink locally")
                    os.makedirs(target, exist_ok=True)
                dirs.append((target, mode, float(m.mtime)))
            elif m.isreg():
                if not parts:
                    raise errors.ProtocolError("ProtocolError", "a file where the directory was expected")
                if os.path.islink(target) or os.path.isdir(target):
                    _remove(target)
                src = tf.extractfile(m)
                with open(target, "wb") as out:
                    while src is not None:
                        chunk = src.read(IO_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                os.chmod(target, mode)
                os.utime(target, (m.mtime, m.mtime))
            elif m.issym():
                if not parts:
                    continue
                if os.path.lexists(target):
                    _remove(target)
                os.symlink(m.linkname, target)
                try:
                    os.utime(target, (m.mtime, m.mtime), follow_symlinks=False)
                except (NotImplementedError, OSError):
                    pass
            else:
                raise errors.ProtocolError("ProtocolError", f"{m.name!r}: hard links and devices are not unpacked")
            count += 1
    for path, mode, mtime in reversed(dirs):
        os.chmod(path, mode | 0o700 if path == dest else mode)
        os.utime(path, (mtime, mtime))
    return count


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def chunks_of(data: Union[bytes, bytearray, memoryview, str]) -> bytes:
    """Bytes of a ``write`` argument that is bytes-like or text (UTF-8)."""
    if isinstance(data, str):
        return data.encode("utf-8")
    return bytes(data)


def is_bytes_like(data: Any) -> bool:
    """Whether ``data`` is written whole (bytes-like or text) rather than streamed."""
    return isinstance(data, (bytes, bytearray, memoryview, str))


def iter_file(f: Any, chunk: int = IO_CHUNK, progress: Optional[Progress] = None, total: Optional[int] = None) -> Iterator[bytes]:
    """Chunks read from a binary file object (``bytes`` from ``read``; text is encoded)."""
    done = 0
    while True:
        b = f.read(chunk)
        if not b:
            break
        if isinstance(b, str):
            b = b.encode("utf-8")
        done += len(b)
        yield bytes(b)
        if progress is not None:
            progress(done, total)
