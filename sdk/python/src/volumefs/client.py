"""The synchronous client: :class:`Client`, and the :class:`Volume` and :class:`Sandbox` objects
bound to it."""

from __future__ import annotations

import codecs
import contextlib
import os
import pathlib
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from . import _core as core
from . import errors
from .errors import Conflict, NotFound, Unavailable, VolumefsError
from .models import (
    FsckReport,
    GcReport,
    Attachment,
    BatchResult,
    Event,
    ExecResult,
    FileEntry,
    Mount,
    ResultList,
    SandboxInfo,
    SearchHit,
    Tenant,
    UploadResult,
    VolumeInfo,
)

__all__ = [
    "Client",
    "Volume",
    "Files",
    "ReadStream",
    "Watch",
    "ResumableUpload",
    "Sandbox",
    "SandboxVolumes",
    "Volumes",
    "Sandboxes",
    "Tenants",
    "default_client",
    "configure",
]

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def http_errors(server: str) -> Iterator[None]:
    """Turns httpx's transport errors into :class:`~volumefs.errors.Unavailable` (or
    :class:`~volumefs.errors.Timeout`)."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise errors.Timeout("Timeout", f"no answer from the server at {server} in time ({type(e).__name__})") from e
    except httpx.HTTPError as e:
        raise Unavailable("Unavailable", f"cannot reach the server at {server}: {e or type(e).__name__}") from e


def _timeout(default: httpx.Timeout, t: Optional[float]) -> httpx.Timeout:
    if t is None:
        return default
    if t < 0:
        return httpx.Timeout(None, connect=default.connect)
    return httpx.Timeout(t, connect=default.connect)


class Client:
    """A connection to a volumefs server, configured like the CLI.

    ``server`` defaults to ``$VOLUMEFS_SERVER`` (else ``http://127.0.0.1:7070``) and ``token`` to
    ``$VOLUMEFS_TOKEN`` (the server writes the operator's to ``DATA/api-token``; a tenant has its
    own). ``timeout`` is the default for quick calls, in seconds; transfers, boots and commands
    wait as long as they take. Use it as a context manager, or call :meth:`close`::

        with volumefs.Client() as c:
            vol = c.volumes.create("data", cap="1GiB")
            vol.files.write("/hello.txt", "hello\\n")
    """

    def __init__(
        self,
        server: Optional[str] = None,
        token: Optional[str] = None,
        *,
        timeout: float = 60.0,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self.server, self.token = core.resolve_config(server, token)
        headers = {"User-Agent": "volumefs-python/0.1"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=self._timeout, transport=transport)
        #: Volumes: ``create``, ``get``, ``list``.
        self.volumes = Volumes(self)
        #: Sandboxes: ``create``, ``run``, ``get``, ``list``.
        self.sandboxes = Sandboxes(self)
        #: Tenants (operator only): ``create``, ``list``.
        self.tenants = Tenants(self)

    def __repr__(self) -> str:
        return f"Client({self.server!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the client's connections."""
        self._http.close()

    def gc(self, grace: float = 3600) -> GcReport:
        """Deletes blocks no volume refers to that are older than ``grace`` seconds (operator
        only; the server also does it hourly). A server without a block store has nothing to
        collect and reports zeros."""
        report: GcReport = self._call(core.gc(grace))
        return report

    def volume(self, name: str) -> "Volume":
        """The volume called ``name``, without asking the server (see ``volumes.get``)."""
        return Volume(self, name)

    def sandbox(self, name: str) -> "Sandbox":
        """The sandbox called ``name``, without asking the server (see ``sandboxes.get``)."""
        return Sandbox(self, name)

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, req: core.Req, stream: bool = False, timeout: Optional[httpx.Timeout] = None) -> httpx.Response:
        with http_errors(self.server):
            request = self._http.build_request(
                req.method,
                req.url,
                params=req.params,
                json=req.json,
                headers=req.headers,
                content=req.content,
                timeout=timeout or _timeout(self._timeout, req.timeout),
            )
            r = self._http.send(request, stream=stream)
            if r.status_code >= 400:
                try:
                    body = r.read() if req.method != "HEAD" else b""
                finally:
                    r.close()
                raise errors.error_from_response(r.status_code, body, r.reason_phrase)
            return r

    def _call(self, req: core.Req) -> Any:
        r = self._send(req)
        return req.parse(r)


# ----- volumes ------------------------------------------------------------------------------------


class Volumes:
    """``client.volumes``: creating, finding and listing volumes."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, cap: Optional[core.Cap] = None) -> "Volume":
        """Creates a volume. ``cap`` is its fixed capacity: bytes, or a size like ``"2GiB"``
        (default 2 GiB; a tenant's volumes get the tenant's default and may not set it).
        Raises :class:`~volumefs.errors.AlreadyExists` for a name in use."""
        info = self._c._call(core.volume_create(name, cap))
        return Volume(self._c, info.name or name, info)

    def get(self, name: str) -> "Volume":
        """The volume called ``name`` (its info fetched); :class:`~volumefs.errors.NotFound` if none."""
        info = self._c._call(core.volume_get(name))
        return Volume(self._c, info.name or name, info)

    def list(self, fields: core.Fields = None) -> List["Volume"]:
        """Every volume the caller may see. ``fields`` (names from
        :data:`~volumefs.models.VOLUME_FIELDS`) limits what each ``last_info`` holds; the name
        is always fetched."""
        f = core.fields_param(fields)
        if f and "name" not in [x.strip() for x in f.split(",")]:
            f += ",name"
        return [Volume(self._c, str(i.name), i) for i in self._c._call(core.volume_list(f))]


class Volume:
    """A volume, bound to a client: ``vol.files.*`` reads and writes its files.

    Get one with :meth:`create`, :meth:`get` or :meth:`list` (class methods that use the
    default client unless given ``client=``), or ``client.volumes.*``. ``last_info`` is what the
    server said about it when the object was made; :meth:`info` asks again.
    """

    def __init__(self, client: Client, name: str, info: Optional[VolumeInfo] = None) -> None:
        self.client = client
        self.name = name
        self.last_info = info
        #: The volume's files.
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"Volume({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Volume) and (other.client.server, other.name) == (self.client.server, self.name)

    def __hash__(self) -> int:
        return hash((self.client.server, self.name))

    @classmethod
    def create(cls, name: str, cap: Optional[core.Cap] = None, *, client: Optional[Client] = None) -> "Volume":
        """Creates a volume (see :meth:`Volumes.create`)."""
        return (client or default_client()).volumes.create(name, cap)

    @classmethod
    def get(cls, name: str, *, client: Optional[Client] = None) -> "Volume":
        """The volume called ``name`` (see :meth:`Volumes.get`)."""
        return (client or default_client()).volumes.get(name)

    @classmethod
    def list(cls, fields: core.Fields = None, *, client: Optional[Client] = None) -> List["Volume"]:
        """Every volume the caller may see (see :meth:`Volumes.list`)."""
        return (client or default_client()).volumes.list(fields)

    def info(self, fields: core.Fields = None) -> VolumeInfo:
        """The volume as the server sees it now (with ``fields``, only those fields are set)."""
        info: VolumeInfo = self.client._call(core.volume_get(self.name, fields))
        if not fields:
            self.last_info = info
        return info

    def clone(self, name: str, cap: Optional[core.Cap] = None) -> "Volume":
        """A writable copy of this volume, made at once: every file as it is now, its blocks
        shared (copy-on-write); the copy has its own cap (this volume's unless ``cap``, which
        only the operator sets) and usage, and the two diverge from here. Needs a server that
        keeps file data in a block store (``--blocks``); else
        :class:`~volumefs.errors.NotSupported`."""
        info = self.client._call(core.volume_clone(self.name, name, cap))
        return Volume(self.client, info.name or name, info)

    def fsck(self) -> FsckReport:
        """Checks the volume's consistency (names, link counts, inode count, blocks); the
        report's ``problems`` is empty when all is well."""
        report: FsckReport = self.client._call(core.volume_fsck(self.name))
        return report

    def delete(self, force: bool = False) -> None:
        """Deletes the volume and everything in it. While it is attached this is a
        :class:`~volumefs.errors.Conflict`, unless ``force`` (which detaches it everywhere)."""
        self.client._call(core.volume_delete(self.name, force))


# ----- files --------------------------------------------------------------------------------------


class ReadStream:
    """A file's contents as they arrive: iterate over it for chunks (``bytes``, or ``str`` when
    read with ``text=True``). Close it (or use ``with``) if you stop early."""

    def __init__(self, resp: httpx.Response, server: str, text: bool, encoding: str, chunk_size: int) -> None:
        self._resp = resp
        self._server = server
        self._decoder = codecs.getincrementaldecoder(encoding)() if text else None
        self._chunk = chunk_size
        #: The whole file's size.
        self.size: Optional[int] = _int(resp.headers.get("x-volumefs-size"))
        #: The bytes this answer carries (the range's length for a range).
        self.length: Optional[int] = _int(resp.headers.get("content-length"))
        self._gen = self._chunks()

    def __iter__(self) -> Iterator[Any]:
        return self._gen

    def _chunks(self) -> Iterator[Any]:
        try:
            with http_errors(self._server):
                for chunk in self._resp.iter_bytes(self._chunk):
                    yield self._decoder.decode(chunk) if self._decoder else chunk
                if self._decoder:
                    tail = self._decoder.decode(b"", final=True)
                    if tail:
                        yield tail
        finally:
            self.close()

    def read(self) -> Any:
        """Everything that is left, at once."""
        parts = list(self)
        return ("" if self._decoder else b"").join(parts)

    def close(self) -> None:
        """Ends the download."""
        self._resp.close()

    def __enter__(self) -> "ReadStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _int(v: Optional[str]) -> Optional[int]:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


class Files:
    """``vol.files``: the volume's files through the server, as the CLI's ``file`` commands and
    the HTTP API have them. Paths are volume paths like ``/a/b.txt``."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self._c = volume.client

    @property
    def _v(self) -> str:
        return self.volume.name

    def read(
        self,
        path: str,
        *,
        text: bool = False,
        encoding: str = "utf-8",
        stream: bool = False,
        range: Optional[Tuple[Optional[int], Optional[int]]] = None,  # noqa: A002 - the API's word
        chunk_size: int = core.IO_CHUNK,
    ) -> Any:
        """A file's contents: ``bytes``, or ``str`` with ``text=True``; with ``stream=True`` a
        :class:`ReadStream` to iterate over chunk by chunk. ``range=(start, end)`` reads part of
        it, as ``data[start:end]`` would (``end`` excluded; ``None`` for the end of file;
        ``(-n, None)`` for the last ``n`` bytes); a range past the end is
        :class:`~volumefs.errors.InvalidRange`."""
        req = core.file_read(self._v, path, range)
        if stream:
            return ReadStream(self._c._send(req, stream=True, timeout=_timeout(self._c._timeout, -1)), self._c.server, text, encoding, chunk_size)
        data: bytes = self._c._call(req)
        return data.decode(encoding) if text else data

    def write(self, path: str, data: Any, *, parents: bool = True, append: bool = False) -> int:
        """Writes a file: ``data`` is bytes, text (UTF-8), a binary file object or an iterable
        of byte chunks; file objects and iterables are streamed. The file is replaced atomically
        (readers see the old or the new contents; a failed write leaves the old), its parent
        directories made unless ``parents=False``. With ``append=True`` the bytes are added at
        the end of the file as one write (at most 64 MiB), atomically against every other
        appender. Returns the file's size afterwards."""
        content = _content(data)
        if append:
            return int(self._c._call(core.file_append(self._v, path, content)))
        return int(self._c._call(core.file_put(self._v, path, content, parents)))

    def write_many(self, files: Mapping[str, Union[bytes, str]], *, dest: str = "/") -> BatchResult:
        """Writes many files in one request, all or nothing: ``{path: bytes or str}``, paths
        relative to ``dest`` (sent as a tar stream; parents made). If any cannot be written (the
        volume full, a bad name) none is."""
        return self._c._call(core.batch(self._v, dest, core.tar_of_files(files)))  # type: ignore[no-any-return]

    def move(self, src: str, dst: str) -> None:
        """Moves (renames) a file or directory; an existing file at ``dst`` is replaced."""
        self._c._call(core.file_move(self._v, src, dst))

    def remove(self, path: str, *, recursive: bool = False) -> int:
        """Removes a file, symlink or empty directory; a directory with everything in it with
        ``recursive=True``. Returns how many entries went."""
        return int(self._c._call(core.file_remove(self._v, path, recursive)))

    def mkdir(self, path: str, *, parents: bool = False) -> None:
        """Makes a directory (its parents too with ``parents=True``, and then an existing one is
        fine)."""
        self._c._call(core.file_mkdir(self._v, path, parents))

    def edit(self, path: str, find: str, replace: str) -> int:
        """Replaces the one occurrence of ``find`` in a text file with ``replace`` (none or
        several is :class:`~volumefs.errors.InvalidArgument`). Returns the new size."""
        return int(self._c._call(core.file_edit(self._v, path, find, replace)))

    def list(self, path: str = "/", *, recursive: bool = False, limit: Optional[int] = None) -> ResultList[FileEntry]:
        """The entries of a directory (everything below it with ``recursive=True``), in directory
        order; ``.truncated`` tells whether ``limit`` cut it short."""
        return self._c._call(core.file_list(self._v, path, recursive, limit))  # type: ignore[no-any-return]

    def stat(self, path: str) -> FileEntry:
        """A path's attributes (a symlink's own)."""
        return self._c._call(core.file_stat(self._v, path))  # type: ignore[no-any-return]

    def exists(self, path: str) -> bool:
        """Whether the path exists (any kind)."""
        try:
            return bool(self._c._call(core.file_head(self._v, path)))
        except NotFound:
            return False

    def search(
        self, path: str = "/", *, name: Optional[str] = None, content: Optional[str] = None, limit: Optional[int] = None
    ) -> ResultList[SearchHit]:
        """Finds files below ``path`` whose name matches the glob ``name`` and/or whose lines
        match the regular expression ``content`` (one hit per matching line, with its number).
        ``.truncated`` tells whether ``limit`` cut it short."""
        return self._c._call(core.file_search(self._v, path, name, content, limit))  # type: ignore[no-any-return]

    def replace(self, path: str, find: str, replace: str, *, name: Optional[str] = None) -> Dict[str, int]:
        """Replaces every match of the regular expression ``find`` with ``replace`` in the files
        below ``path`` (only those whose name matches the glob ``name``, if given). Returns
        ``{path: replacements}`` for the files changed."""
        return self._c._call(core.file_replace(self._v, path, find, replace, name))  # type: ignore[no-any-return]

    def signed_url(self, path: str, *, expires: core.Expires = 900, archive: Optional[str] = None) -> str:
        """A URL that downloads ``path`` without a token until it expires (seconds or a
        ``timedelta``, at most 7 days). A directory needs ``archive`` (``tar``, ``tar.gz`` or
        ``zip``)."""
        return str(self._c._call(core.signed_url(self._v, path, expires, archive)))

    def watch(
        self,
        path: str = "/",
        *,
        after: Optional[str] = None,
        include_internal: bool = False,
        reconnect: bool = True,
        retry_for: float = 60.0,
        read_timeout: float = 60.0,
    ) -> "Watch":
        """The changes under ``path`` as they happen, made by the API or by any sandbox: an
        iterator of :class:`~volumefs.models.Event` (use it in a ``with`` block or close it).
        The stream is open when this returns: changes from then on are seen. A dropped connection
        is reopened transparently from the last event seen (for up to ``retry_for`` seconds of
        failures); ``after`` (an event id) starts after that event instead of now. The server's
        hidden temporary files of atomic writes are left out unless ``include_internal``."""
        return Watch(self, path, after, include_internal, reconnect, retry_for, read_timeout)

    def resumable(
        self,
        local: PathLike,
        path: str,
        *,
        parents: bool = True,
        url: Optional[str] = None,
        chunk_size: int = core.DEFAULT_CHUNK,
    ) -> "ResumableUpload":
        """A resumable (tus) upload of the local file ``local`` to ``path``; nothing is sent
        until its :meth:`ResumableUpload.upload`. ``url`` continues an upload made before
        (``ResumableUpload.url``, which stays valid across processes until the upload expires)."""
        return ResumableUpload(self, os.fspath(local), path, parents, url, chunk_size)

    def upload(
        self,
        local: Any,
        path: str,
        *,
        progress: Optional[core.Progress] = None,
        parents: bool = True,
        resume: Union[str, "ResumableUpload", None] = None,
        chunk_size: int = core.DEFAULT_CHUNK,
        retries: int = 5,
    ) -> UploadResult:
        """Uploads ``local`` to ``path``:

        - a file (a path): resumably, through the tus endpoint in chunks of ``chunk_size``; a
          connection error is retried from the server's offset (``retries`` times without
          progress). An exception that escapes carries the upload as ``exc.upload`` (a
          :class:`ResumableUpload`): pass it, or its ``.url``, as ``resume=`` to go on from
          where the server got to, in this process or another.
        - a directory: its tree as one tar stream, all or nothing, with modes, symlinks and
          mtimes (``path`` becomes the directory; sockets and devices are left out).
        - a file object (stdin, a pipe) or bytes: streamed in one request.

        ``progress(done, total)`` is called as bytes go out (``total`` is ``None`` when not
        known in advance)."""
        if isinstance(local, (bytes, bytearray, memoryview)) or hasattr(local, "read"):
            sent = [0]

            def count(done: int, total: Optional[int]) -> None:
                sent[0] = done
                if progress:
                    progress(done, total)

            body = core.iter_file(local, core.IO_CHUNK, count) if hasattr(local, "read") else core.chunks_of(local)
            size = int(self._c._call(core.file_put(self._v, path, body, parents)))
            if not hasattr(local, "read"):
                sent[0] = size
                if progress:
                    progress(size, size)
            return UploadResult(path, size, sent[0])
        local = os.fspath(local)
        if os.path.isdir(local):
            return self._upload_dir(local, path, progress)
        if isinstance(resume, ResumableUpload):
            up = resume
        else:
            up = self.resumable(local, path, parents=parents, url=resume, chunk_size=chunk_size)
        try:
            return up.upload(progress=progress, retries=retries)
        except Exception as e:
            try:
                e.upload = up  # type: ignore[attr-defined]
            except AttributeError:
                pass
            raise

    def _upload_dir(self, local: str, path: str, progress: Optional[core.Progress]) -> UploadResult:
        producer = core.TarProducer(local)
        sent = [0]

        def body() -> Iterator[bytes]:
            while True:
                chunk = producer.get()
                if chunk is None:
                    return
                sent[0] += len(chunk)
                yield chunk
                if progress:
                    progress(sent[0], None)

        try:
            res: BatchResult = self._c._call(core.batch(self._v, path, body()))
        finally:
            producer.close()
        return UploadResult(path, res.bytes, sent[0], res)

    def download(self, path: str, local: PathLike, *, archive: Optional[str] = None) -> pathlib.Path:
        """Downloads ``path`` to ``local`` and returns where it went:

        - a file: to ``local`` (or into it, under the file's name, if ``local`` is a
          directory), through a temporary file renamed at the end;
        - a directory: its tree unpacked into ``local`` (made if missing), safely (nothing
          outside it, nothing through symlinks), with modes, symlinks and mtimes;
        - with ``archive`` (``tar``, ``tar.gz`` or ``zip``): the archive of ``path`` (file or
          directory) saved as the file ``local``.
        """
        dest = pathlib.Path(local)
        if archive:
            if dest.is_dir():
                base = path.rstrip("/").rsplit("/", 1)[-1] or self._v
                dest = dest / f"{base}.{archive}"
            resp = self._c._send(core.archive_get(self._v, path, archive), stream=True, timeout=_timeout(self._c._timeout, -1))
            self._save(resp, dest)
            return dest
        entry = self.stat(path)
        if entry.is_dir:
            resp = self._c._send(core.archive_get(self._v, path, "tar"), stream=True, timeout=_timeout(self._c._timeout, -1))
            try:
                with http_errors(self._c.server):
                    core.extract_tar(core._ChunkReader(resp.iter_bytes(core.IO_CHUNK)), str(dest), entry.path != "/")
            finally:
                resp.close()
            return dest
        if dest.is_dir():
            dest = dest / entry.name
        if entry.is_symlink:
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            os.symlink(entry.target or "", dest)
            return dest
        resp = self._c._send(core.file_read(self._v, path, None), stream=True, timeout=_timeout(self._c._timeout, -1))
        self._save(resp, dest)
        os.chmod(dest, entry.mode & 0o777)
        os.utime(dest, (entry.mtime, entry.mtime))
        return dest

    def _save(self, resp: httpx.Response, dest: pathlib.Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=str(dest.parent))
        try:
            with os.fdopen(fd, "wb") as out, http_errors(self._c.server):
                for chunk in resp.iter_bytes(core.IO_CHUNK):
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            resp.close()


def _content(data: Any) -> Any:
    if core.is_bytes_like(data):
        return core.chunks_of(data)
    if hasattr(data, "read"):
        return core.iter_file(data)
    if isinstance(data, Iterable):
        return (bytes(c) if not isinstance(c, str) else c.encode("utf-8") for c in data)
    raise TypeError(f"cannot write {type(data).__name__}: give bytes, str, a binary file object or an iterable of bytes")


class Watch:
    """An open ``watch`` of a volume path: iterate for :class:`~volumefs.models.Event`. It
    reconnects by itself after a dropped connection, resuming after ``last_id``; it ends after a
    ``deleted`` event (the volume went) or when closed."""

    def __init__(
        self,
        files: Files,
        path: str,
        after: Optional[str],
        include_internal: bool,
        reconnect: bool,
        retry_for: float,
        read_timeout: float,
    ) -> None:
        self._files = files
        self._c = files._c
        self.path = path
        #: The id of the last event received (what a reconnection resumes after).
        self.last_id: Optional[str] = after
        #: How many times the stream was reopened.
        self.reconnects = 0
        self._internal = include_internal
        self._reconnect = reconnect
        self._retry_for = retry_for
        self._timeout = httpx.Timeout(connect=10.0, read=read_timeout, write=10.0, pool=10.0)
        self._resp: Optional[httpx.Response] = None
        self._closed = False
        self._lock = threading.Lock()
        self._connect()
        self._it = self._events()

    def _connect(self) -> None:
        failing_since: Optional[float] = None
        delay = 0.1
        while True:
            try:
                self._resp = self._c._send(core.watch_req(self._files._v, self.path, self.last_id, self._internal), stream=True, timeout=self._timeout)
                return
            except Unavailable:
                now = time.monotonic()
                failing_since = failing_since or now
                if not self._reconnect or self._closed or now - failing_since > self._retry_for:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _events(self) -> Iterator[Event]:
        while not self._closed:
            resp = self._resp
            assert resp is not None
            parser = core.SSEParser()
            try:
                for line in resp.iter_lines():
                    raw = parser.feed(line)
                    if raw is None:
                        continue
                    ev = core.sse_event(raw)
                    if ev.id:
                        self.last_id = ev.id
                    if not self._internal and (core.is_internal_path(ev.path) and ev.kind != "move"):
                        continue
                    yield ev
                    if ev.kind == "deleted":
                        self.close()
                        return
            except (httpx.HTTPError, httpx.StreamError):
                pass  # dropped (or closed under us): reconnect below unless closed
            finally:
                resp.close()
            if self._closed:
                return
            if not self._reconnect:
                raise Unavailable("Unavailable", "the watch stream ended (reconnect=False)")
            self.reconnects += 1
            self._connect()

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        """Stops watching."""
        self._closed = True
        if self._resp is not None:
            core.shutdown_socket(self._resp)
            self._resp.close()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ResumableUpload:
    """A tus upload of a local file. :meth:`upload` sends what the server does not have yet, in
    chunks; after any interruption (a dropped connection, an exception from the progress
    callback, another process) calling it again, or making a new one with the same ``url``,
    resumes from the server's offset."""

    def __init__(self, files: Files, local: str, path: str, parents: bool, url: Optional[str], chunk_size: int) -> None:
        self._files = files
        self._c = files._c
        self.local = local
        self.path = path
        self.parents = parents
        #: The upload's URL once created; it names the upload across processes.
        self.url = url
        self.chunk_size = max(1, int(chunk_size))
        #: Bytes sent by this object, over all its calls.
        self.sent = 0
        self.size = os.path.getsize(local)

    def __repr__(self) -> str:
        return f"ResumableUpload({self.local!r} -> {self.path!r}, url={self.url!r})"

    def create(self) -> str:
        """Creates the upload on the server (once) and returns its URL."""
        if self.url is None:
            loc = self._c._call(core.tus_create(self._files._v, self.path, self.size, self.parents))
            if not loc:
                raise errors.ProtocolError("ProtocolError", "the server created the upload but gave no Location")
            self.url = str(self._c._http.base_url.join(loc))
        return self.url

    def offset(self) -> int:
        """How many bytes the server has (``HEAD``)."""
        off, _ = self._c._call(core.tus_offset(self.create()))
        return int(off)

    def cancel(self) -> None:
        """Gives the upload up; the server removes what it had."""
        if self.url is not None:
            self._c._call(core.tus_delete(self.url))

    def upload(self, progress: Optional[core.Progress] = None, retries: int = 5) -> UploadResult:
        """Sends the rest of the file and returns when the server has placed it at ``path``.
        ``progress(offset, size)`` is called after each chunk."""
        sent_before = self.sent
        if self.url is None:
            self.create()
            offset = 0
        else:
            offset = self._offset_retrying(retries)
        failures = 0
        with open(self.local, "rb") as f:
            while offset < self.size:
                n = min(self.chunk_size, self.size - offset)
                f.seek(offset)
                try:
                    new = self._c._call(core.tus_patch(str(self.url), offset, self._body(f, n)))
                except (Unavailable, Conflict) as e:
                    failures += 1
                    if failures > retries:
                        raise
                    if isinstance(e, Unavailable):
                        time.sleep(min(0.2 * 2**failures, 5.0))
                    offset = self._offset_retrying(retries)
                    continue
                if new > offset:
                    failures = 0
                offset = int(new)
                if progress:
                    progress(offset, self.size)
        if self.size == 0 and progress:
            progress(0, 0)
        return UploadResult(self.path, self.size, self.sent - sent_before)

    def _body(self, f: Any, n: int) -> Iterator[bytes]:
        left = n
        while left > 0:
            b = f.read(min(core.IO_CHUNK, left))
            if not b:
                break
            left -= len(b)
            self.sent += len(b)
            yield b

    def _offset_retrying(self, retries: int) -> int:
        failures = 0
        while True:
            try:
                return self.offset()
            except Unavailable:
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(0.2 * 2**failures, 5.0))


# ----- sandboxes ----------------------------------------------------------------------------------


class Sandboxes:
    """``client.sandboxes``: registering, booting, finding and listing sandboxes."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, volumes: Optional[Mapping[str, Any]] = None) -> "Sandbox":
        """Registers a sandbox (as ``volumefs sandbox create``: for a platform whose own VMM
        boots it against ``guest_socket``) and attaches ``volumes``:
        ``{"/mnt/data": vol, "/mnt/docs": Mount(vol, read_only=True, subpath="/docs")}``. If an
        attachment is refused, the sandbox is deleted again and the error raised."""
        info = self._c._call(core.sandbox_create(name))
        sb = Sandbox(self._c, info.name or name, info)
        try:
            for path, spec in (volumes or {}).items():
                m = spec if isinstance(spec, Mount) else Mount(spec)
                sb.volumes.attach(m.volume, path, read_only=m.read_only, subpath=m.subpath)
        except BaseException:
            with contextlib.suppress(VolumefsError):
                sb.delete()
            raise
        sb.last_info = sb.info()
        return sb

    def run(self, name: str, volumes: Optional[Mapping[str, Any]] = None, *, memory: Optional[str] = None) -> "Sandbox":
        """Boots a microVM for the sandbox (created if new) with ``volumes`` attached at boot (as
        ``volumefs sandbox run``), and returns once its agent is up and has mounted them.
        ``memory`` like ``"512M"`` (default 256M). Needs the guest image and QEMU on the
        server's machine."""
        self._c._call(core.sandbox_run(name, volumes, memory))
        sb = Sandbox(self._c, name)
        sb.last_info = sb.info()
        return sb

    def get(self, name: str) -> "Sandbox":
        """The sandbox called ``name`` (its info fetched); :class:`~volumefs.errors.NotFound` if none."""
        info = self._c._call(core.sandbox_get(name))
        return Sandbox(self._c, info.name or name, info)

    def list(self) -> List["Sandbox"]:
        """Every sandbox the caller may see."""
        return [Sandbox(self._c, i.name, i) for i in self._c._call(core.sandbox_list())]


class SandboxVolumes:
    """``sb.volumes``: the sandbox's attachments (``volumefs attach`` / ``detach`` /
    ``sandbox attachments``)."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox
        self._c = sandbox.client

    def attach(self, volume: Any, path: str, *, read_only: bool = False, subpath: str = "/") -> Attachment:
        """Attaches ``volume`` (an object or a name) at mount path ``path``; ``subpath`` attaches
        only that directory of it (it must exist). With the sandbox's agent running it is
        mounted at once (``state`` ``mounted``, or ``failed`` with the ``reason``); otherwise
        at its next boot (``attached``)."""
        return self._c._call(core.attach(self._sb.name, volume, path, read_only, subpath))  # type: ignore[no-any-return]

    def list(self) -> List[Attachment]:
        """The sandbox's attachments with their states."""
        return self._c._call(core.attachments_list(self._sb.name))  # type: ignore[no-any-return]

    def detach(self, path: str, *, force: bool = False) -> None:
        """Detaches the volume at mount path ``path`` (unmounted first if mounted). Refused
        (:class:`~volumefs.errors.Conflict`) while files are open on it, unless ``force``."""
        self._c._call(core.detach(self._sb.name, path, force))


class Sandbox:
    """A sandbox, bound to a client. Get one with :meth:`create`, :meth:`run`, :meth:`get` or
    :meth:`list` (class methods that use the default client unless given ``client=``), or
    ``client.sandboxes.*``. ``sb.volumes`` manages its attachments."""

    def __init__(self, client: Client, name: str, info: Optional[SandboxInfo] = None) -> None:
        self.client = client
        self.name = name
        self.last_info = info
        #: The sandbox's attachments.
        self.volumes = SandboxVolumes(self)

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and (other.client.server, other.name) == (self.client.server, self.name)

    def __hash__(self) -> int:
        return hash((self.client.server, self.name))

    @property
    def guest_socket(self) -> str:
        """The unix socket its guest agent connects to (``DATA/sandboxes/NAME/vsock_1024``)."""
        if self.last_info is None or not self.last_info.guest_socket:
            self.last_info = self.info()
        return self.last_info.guest_socket

    @classmethod
    def create(cls, name: str, volumes: Optional[Mapping[str, Any]] = None, *, client: Optional[Client] = None) -> "Sandbox":
        """Registers a sandbox with its attachments (see :meth:`Sandboxes.create`)."""
        return (client or default_client()).sandboxes.create(name, volumes)

    @classmethod
    def run(
        cls, name: str, volumes: Optional[Mapping[str, Any]] = None, *, memory: Optional[str] = None, client: Optional[Client] = None
    ) -> "Sandbox":
        """Boots a microVM for the sandbox (see :meth:`Sandboxes.run`)."""
        return (client or default_client()).sandboxes.run(name, volumes, memory=memory)

    @classmethod
    def get(cls, name: str, *, client: Optional[Client] = None) -> "Sandbox":
        """The sandbox called ``name`` (see :meth:`Sandboxes.get`)."""
        return (client or default_client()).sandboxes.get(name)

    @classmethod
    def list(cls, *, client: Optional[Client] = None) -> List["Sandbox"]:
        """Every sandbox the caller may see."""
        return (client or default_client()).sandboxes.list()

    def info(self) -> SandboxInfo:
        """The sandbox as the server sees it now, with its attachments."""
        info: SandboxInfo = self.client._call(core.sandbox_get(self.name))
        self.last_info = info
        return info

    def exec(self, cmd: Union[str, Sequence[str]], *, stdin: Union[str, bytes, None] = None, timeout: Optional[float] = None) -> ExecResult:
        """Runs a command in the sandbox through its agent and returns its exit code and output.
        ``cmd`` is an argument list, or a string run by ``sh -c``; ``timeout`` in seconds (the
        server's default is 600). :class:`~volumefs.errors.Unavailable` when no agent runs."""
        return self.client._call(core.sandbox_exec(self.name, cmd, stdin, timeout))  # type: ignore[no-any-return]

    def hibernate(self) -> List[Attachment]:
        """Flushes and releases the sandbox's leases (its VM is frozen, if the server runs it);
        accesses in it wait until :meth:`resume`. Returns the attachments (``released``)."""
        return self.client._call(core.sandbox_verb(self.name, "hibernate"))  # type: ignore[no-any-return]

    def resume(self) -> List[Attachment]:
        """Takes the leases of a hibernated sandbox again; waiting accesses continue. Returns the
        attachments (``mounted``)."""
        return self.client._call(core.sandbox_verb(self.name, "resume"))  # type: ignore[no-any-return]

    def fork(self, new_name: str) -> "Sandbox":
        """Registers ``new_name`` with this sandbox's attachments and its own identity (for a VM
        restored from this one's snapshot)."""
        info = self.client._call(core.sandbox_verb(self.name, "fork", {"name": new_name}))
        return Sandbox(self.client, info.name or new_name, info)

    def stop(self) -> None:
        """Shuts the sandbox's microVM down (the agent flushes and unmounts first)."""
        self.client._call(core.sandbox_verb(self.name, "stop"))

    def reset_connections(self) -> int:
        """Closes the sandbox's guest connections, as a snapshot restore does (nothing is lost);
        returns how many were closed."""
        return int(self.client._call(core.sandbox_verb(self.name, "reset-connections")))

    def delete(self) -> None:
        """Deletes the sandbox (stopping its VM, releasing its attachments)."""
        self.client._call(core.sandbox_delete(self.name))


# ----- tenants ------------------------------------------------------------------------------------


class Tenants:
    """``client.tenants``: the operator's tenants, each with its own token, namespace and default
    volume cap."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, default_cap: Optional[core.Cap] = None) -> Tenant:
        """Creates a tenant; the returned :class:`~volumefs.models.Tenant` carries its token
        (shown this once). ``default_cap``: the cap of its volumes (bytes or ``"1GiB"``)."""
        return self._c._call(core.tenant_create(name, default_cap))  # type: ignore[no-any-return]

    def list(self) -> List[Tenant]:
        """The tenants (without tokens)."""
        return self._c._call(core.tenant_list())  # type: ignore[no-any-return]


# ----- the default client -------------------------------------------------------------------------

_default: Optional[Client] = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client that ``Volume.create`` and friends use without ``client=``: made on first use
    from ``VOLUMEFS_SERVER`` and ``VOLUMEFS_TOKEN`` (or what :func:`configure` set)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def configure(server: Optional[str] = None, token: Optional[str] = None, **kwargs: Any) -> Client:
    """Replaces the default client with one for ``server`` and ``token`` and returns it."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = Client(server, token, **kwargs)
        return _default
