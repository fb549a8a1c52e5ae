"""The asynchronous client: :class:`AsyncClient`, and the :class:`AsyncVolume` and
:class:`AsyncSandbox` objects bound to it. Every call mirrors the synchronous one of the same
name (see :mod:`volumefs.client`) and is awaited; streams are async iterators."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import pathlib
import tempfile
import time
from typing import Any, AsyncIterator, Dict, Generator, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from . import _core as core
from . import errors
from .client import PathLike, _int, _timeout, http_errors
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
    "AsyncClient",
    "AsyncVolume",
    "AsyncFiles",
    "AsyncReadStream",
    "AsyncWatch",
    "AsyncResumableUpload",
    "AsyncSandbox",
    "AsyncSandboxVolumes",
    "AsyncVolumes",
    "AsyncSandboxes",
    "AsyncTenants",
    "default_async_client",
]


class AsyncClient:
    """The asynchronous twin of :class:`volumefs.Client`, configured the same way
    (``VOLUMEFS_SERVER``, ``VOLUMEFS_TOKEN`` or arguments)::

        async with volumefs.AsyncClient() as c:
            vol = await c.volumes.create("data", cap="1GiB")
            await vol.files.write("/hello.txt", "hello\\n")
    """

    def __init__(
        self,
        server: Optional[str] = None,
        token: Optional[str] = None,
        *,
        timeout: float = 60.0,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.server, self.token = core.resolve_config(server, token)
        headers = {"User-Agent": "volumefs-python/0.1"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._http = httpx.AsyncClient(base_url=self.server, headers=headers, timeout=self._timeout, transport=transport)
        #: Volumes: ``create``, ``get``, ``list``.
        self.volumes = AsyncVolumes(self)
        #: Sandboxes: ``create``, ``run``, ``get``, ``list``.
        self.sandboxes = AsyncSandboxes(self)
        #: Tenants (operator only): ``create``, ``list``.
        self.tenants = AsyncTenants(self)

    def __repr__(self) -> str:
        return f"AsyncClient({self.server!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the client's connections."""
        await self._http.aclose()

    async def gc(self, grace: float = 3600) -> GcReport:
        """Deletes blocks no volume refers to that are older than ``grace`` seconds (operator
        only; the server also does it hourly). A server without a block store has nothing to
        collect and reports zeros."""
        report: GcReport = await self._call(core.gc(grace))
        return report

    def volume(self, name: str) -> "AsyncVolume":
        """The volume called ``name``, without asking the server (see ``volumes.get``)."""
        return AsyncVolume(self, name)

    def sandbox(self, name: str) -> "AsyncSandbox":
        """The sandbox called ``name``, without asking the server (see ``sandboxes.get``)."""
        return AsyncSandbox(self, name)

    async def _send(self, req: core.Req, stream: bool = False, timeout: Optional[httpx.Timeout] = None) -> httpx.Response:
        with http_errors(self.server):
            request = self._http.build_request(
                req.method,
                req.url,
                params=req.params,
                json=req.json,
                headers=req.headers,
                content=_async_content(req.content),
                timeout=timeout or _timeout(self._timeout, req.timeout),
            )
            r = await self._http.send(request, stream=stream)
            if r.status_code >= 400:
                try:
                    body = await r.aread() if req.method != "HEAD" else b""
                finally:
                    await r.aclose()
                raise errors.error_from_response(r.status_code, body, r.reason_phrase)
            return r

    async def _call(self, req: core.Req) -> Any:
        r = await self._send(req)
        return req.parse(r)


def _async_content(content: Any) -> Any:
    """httpx's async client streams async iterables only: a sync iterator is wrapped."""
    if content is None or isinstance(content, (bytes, str)) or hasattr(content, "__aiter__"):
        return content

    async def gen() -> AsyncIterator[bytes]:
        for chunk in content:
            yield chunk

    return gen()


# ----- volumes ------------------------------------------------------------------------------------


class AsyncVolumes:
    """``client.volumes``: creating, finding and listing volumes."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, name: str, cap: Optional[core.Cap] = None) -> "AsyncVolume":
        """Creates a volume (see :meth:`volumefs.client.Volumes.create`)."""
        info = await self._c._call(core.volume_create(name, cap))
        return AsyncVolume(self._c, info.name or name, info)

    async def get(self, name: str) -> "AsyncVolume":
        """The volume called ``name``; :class:`~volumefs.errors.NotFound` if none."""
        info = await self._c._call(core.volume_get(name))
        return AsyncVolume(self._c, info.name or name, info)

    async def list(self, fields: core.Fields = None) -> List["AsyncVolume"]:
        """Every volume the caller may see (``fields`` limits each ``last_info``)."""
        f = core.fields_param(fields)
        if f and "name" not in [x.strip() for x in f.split(",")]:
            f += ",name"
        return [AsyncVolume(self._c, str(i.name), i) for i in await self._c._call(core.volume_list(f))]


class AsyncVolume:
    """A volume, bound to an :class:`AsyncClient`: ``vol.files.*`` reads and writes its files."""

    def __init__(self, client: AsyncClient, name: str, info: Optional[VolumeInfo] = None) -> None:
        self.client = client
        self.name = name
        self.last_info = info
        #: The volume's files.
        self.files = AsyncFiles(self)

    def __repr__(self) -> str:
        return f"AsyncVolume({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncVolume) and (other.client.server, other.name) == (self.client.server, self.name)

    def __hash__(self) -> int:
        return hash((self.client.server, self.name))

    @classmethod
    async def create(cls, name: str, cap: Optional[core.Cap] = None, *, client: Optional[AsyncClient] = None) -> "AsyncVolume":
        """Creates a volume (the default async client unless ``client``)."""
        return await (client or default_async_client()).volumes.create(name, cap)

    @classmethod
    async def get(cls, name: str, *, client: Optional[AsyncClient] = None) -> "AsyncVolume":
        """The volume called ``name``."""
        return await (client or default_async_client()).volumes.get(name)

    @classmethod
    async def list(cls, fields: core.Fields = None, *, client: Optional[AsyncClient] = None) -> List["AsyncVolume"]:
        """Every volume the caller may see."""
        return await (client or default_async_client()).volumes.list(fields)

    async def info(self, fields: core.Fields = None) -> VolumeInfo:
        """The volume as the server sees it now."""
        info: VolumeInfo = await self.client._call(core.volume_get(self.name, fields))
        if not fields:
            self.last_info = info
        return info

    async def clone(self, name: str, cap: Optional[core.Cap] = None) -> "AsyncVolume":
        """A writable copy of this volume, made at once: every file as it is now, its blocks
        shared (copy-on-write); the copy has its own cap (this volume's unless ``cap``, which
        only the operator sets) and usage, and the two diverge from here. Needs a server that
        keeps file data in a block store (``--blocks``); else
        :class:`~volumefs.errors.NotSupported`."""
        info = await self.client._call(core.volume_clone(self.name, name, cap))
        return AsyncVolume(self.client, info.name or name, info)

    async def fsck(self) -> FsckReport:
        """Checks the volume's consistency (names, link counts, inode count, blocks); the
        report's ``problems`` is empty when all is well."""
        report: FsckReport = await self.client._call(core.volume_fsck(self.name))
        return report

    async def delete(self, force: bool = False) -> None:
        """Deletes the volume (:class:`~volumefs.errors.Conflict` while attached, unless ``force``)."""
        await self.client._call(core.volume_delete(self.name, force))


# ----- files --------------------------------------------------------------------------------------


class AsyncReadStream:
    """A file's contents as they arrive: ``async for`` over it for chunks."""

    def __init__(self, resp: httpx.Response, server: str, text: bool, encoding: str, chunk_size: int) -> None:
        self._resp = resp
        self._server = server
        self._decoder = codecs.getincrementaldecoder(encoding)() if text else None
        self._chunk = chunk_size
        #: The whole file's size.
        self.size: Optional[int] = _int(resp.headers.get("x-volumefs-size"))
        #: The bytes this answer carries.
        self.length: Optional[int] = _int(resp.headers.get("content-length"))
        self._gen = self._chunks()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._gen

    async def _chunks(self) -> AsyncIterator[Any]:
        try:
            with http_errors(self._server):
                async for chunk in self._resp.aiter_bytes(self._chunk):
                    yield self._decoder.decode(chunk) if self._decoder else chunk
                if self._decoder:
                    tail = self._decoder.decode(b"", final=True)
                    if tail:
                        yield tail
        finally:
            await self.aclose()

    async def read(self) -> Any:
        """Everything that is left, at once."""
        parts = [c async for c in self]
        return ("" if self._decoder else b"").join(parts)

    async def aclose(self) -> None:
        """Ends the download."""
        await self._resp.aclose()

    async def __aenter__(self) -> "AsyncReadStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def _aiter_file(f: Any, progress: Optional[core.Progress] = None) -> AsyncIterator[bytes]:
    """Chunks of a (blocking) file object, read on a thread so the event loop keeps running."""
    done = 0
    while True:
        b = await asyncio.to_thread(f.read, core.IO_CHUNK)
        if not b:
            break
        if isinstance(b, str):
            b = b.encode("utf-8")
        done += len(b)
        yield bytes(b)
        if progress is not None:
            progress(done, None)


def _content(data: Any) -> Any:
    if core.is_bytes_like(data):
        return core.chunks_of(data)
    if hasattr(data, "read"):
        return _aiter_file(data)
    if hasattr(data, "__aiter__"):
        return data
    if isinstance(data, Iterable):
        return (bytes(c) if not isinstance(c, str) else c.encode("utf-8") for c in data)
    raise TypeError(f"cannot write {type(data).__name__}: give bytes, str, a binary file object or an iterable of bytes")


class AsyncFiles:
    """``vol.files`` of an :class:`AsyncVolume` (see :class:`volumefs.client.Files`)."""

    def __init__(self, volume: AsyncVolume) -> None:
        self.volume = volume
        self._c = volume.client

    @property
    def _v(self) -> str:
        return self.volume.name

    async def read(
        self,
        path: str,
        *,
        text: bool = False,
        encoding: str = "utf-8",
        stream: bool = False,
        range: Optional[Tuple[Optional[int], Optional[int]]] = None,  # noqa: A002
        chunk_size: int = core.IO_CHUNK,
    ) -> Any:
        """A file's contents: ``bytes``, ``str`` with ``text=True``, or with ``stream=True`` an
        :class:`AsyncReadStream`; ``range=(start, end)`` as ``data[start:end]``."""
        req = core.file_read(self._v, path, range)
        if stream:
            resp = await self._c._send(req, stream=True, timeout=_timeout(self._c._timeout, -1))
            return AsyncReadStream(resp, self._c.server, text, encoding, chunk_size)
        data: bytes = await self._c._call(req)
        return data.decode(encoding) if text else data

    async def write(self, path: str, data: Any, *, parents: bool = True, append: bool = False) -> int:
        """Writes a file (bytes, text, a file object or a sync/async iterable of chunks, streamed),
        atomically; ``append=True`` adds at the end. Returns the size afterwards."""
        content = _content(data)
        if append:
            return int(await self._c._call(core.file_append(self._v, path, content)))
        return int(await self._c._call(core.file_put(self._v, path, content, parents)))

    async def write_many(self, files: Mapping[str, Union[bytes, str]], *, dest: str = "/") -> BatchResult:
        """Writes many files in one request, all or nothing (a tar stream)."""
        return await self._c._call(core.batch(self._v, dest, core.tar_of_files(files)))  # type: ignore[no-any-return]

    async def move(self, src: str, dst: str) -> None:
        """Moves (renames) a file or directory."""
        await self._c._call(core.file_move(self._v, src, dst))

    async def remove(self, path: str, *, recursive: bool = False) -> int:
        """Removes a path (a whole tree with ``recursive=True``); returns how many entries went."""
        return int(await self._c._call(core.file_remove(self._v, path, recursive)))

    async def mkdir(self, path: str, *, parents: bool = False) -> None:
        """Makes a directory (and its parents with ``parents=True``)."""
        await self._c._call(core.file_mkdir(self._v, path, parents))

    async def edit(self, path: str, find: str, replace: str) -> int:
        """Replaces the one occurrence of ``find`` with ``replace``; returns the new size."""
        return int(await self._c._call(core.file_edit(self._v, path, find, replace)))

    async def list(self, path: str = "/", *, recursive: bool = False, limit: Optional[int] = None) -> ResultList[FileEntry]:
        """The entries of a directory (recursively with ``recursive=True``)."""
        return await self._c._call(core.file_list(self._v, path, recursive, limit))  # type: ignore[no-any-return]

    async def stat(self, path: str) -> FileEntry:
        """A path's attributes."""
        return await self._c._call(core.file_stat(self._v, path))  # type: ignore[no-any-return]

    async def exists(self, path: str) -> bool:
        """Whether the path exists."""
        try:
            return bool(await self._c._call(core.file_head(self._v, path)))
        except NotFound:
            return False

    async def search(
        self, path: str = "/", *, name: Optional[str] = None, content: Optional[str] = None, limit: Optional[int] = None
    ) -> ResultList[SearchHit]:
        """Files below ``path`` matching the glob ``name`` and/or lines matching ``content``."""
        return await self._c._call(core.file_search(self._v, path, name, content, limit))  # type: ignore[no-any-return]

    async def replace(self, path: str, find: str, replace: str, *, name: Optional[str] = None) -> Dict[str, int]:
        """Regex replace across the files below ``path``; returns ``{path: replacements}``."""
        return await self._c._call(core.file_replace(self._v, path, find, replace, name))  # type: ignore[no-any-return]

    async def signed_url(self, path: str, *, expires: core.Expires = 900, archive: Optional[str] = None) -> str:
        """A URL that downloads ``path`` without a token until it expires."""
        return str(await self._c._call(core.signed_url(self._v, path, expires, archive)))

    def watch(
        self,
        path: str = "/",
        *,
        after: Optional[str] = None,
        include_internal: bool = False,
        reconnect: bool = True,
        retry_for: float = 60.0,
        read_timeout: float = 60.0,
    ) -> "AsyncWatch":
        """The changes under ``path`` as an async iterator of :class:`~volumefs.models.Event`
        that reconnects after a dropped connection. The stream opens on ``async with``, on
        ``await``, or at the first event; changes from then on are seen::

            async with vol.files.watch("/logs") as w:
                async for ev in w:
                    ...
        """
        return AsyncWatch(self, path, after, include_internal, reconnect, retry_for, read_timeout)

    def resumable(
        self,
        local: PathLike,
        path: str,
        *,
        parents: bool = True,
        url: Optional[str] = None,
        chunk_size: int = core.DEFAULT_CHUNK,
    ) -> "AsyncResumableUpload":
        """A resumable (tus) upload of the local file ``local`` to ``path``."""
        return AsyncResumableUpload(self, os.fspath(local), path, parents, url, chunk_size)

    async def upload(
        self,
        local: Any,
        path: str,
        *,
        progress: Optional[core.Progress] = None,
        parents: bool = True,
        resume: Union[str, "AsyncResumableUpload", None] = None,
        chunk_size: int = core.DEFAULT_CHUNK,
        retries: int = 5,
    ) -> UploadResult:
        """Uploads a file (resumably, through tus), a directory (a tar stream) or a file object
        or bytes (streamed); see :meth:`volumefs.client.Files.upload`."""
        if isinstance(local, (bytes, bytearray, memoryview)) or hasattr(local, "read"):
            sent = [0]

            def count(done: int, total: Optional[int]) -> None:
                sent[0] = done
                if progress:
                    progress(done, total)

            body = _aiter_file(local, count) if hasattr(local, "read") else core.chunks_of(local)
            size = int(await self._c._call(core.file_put(self._v, path, body, parents)))
            if not hasattr(local, "read"):
                sent[0] = size
                if progress:
                    progress(size, size)
            return UploadResult(path, size, sent[0])
        local = os.fspath(local)
        if os.path.isdir(local):
            return await self._upload_dir(local, path, progress)
        if isinstance(resume, AsyncResumableUpload):
            up = resume
        else:
            up = self.resumable(local, path, parents=parents, url=resume, chunk_size=chunk_size)
        try:
            return await up.upload(progress=progress, retries=retries)
        except Exception as e:
            try:
                e.upload = up  # type: ignore[attr-defined]
            except AttributeError:
                pass
            raise

    async def _upload_dir(self, local: str, path: str, progress: Optional[core.Progress]) -> UploadResult:
        producer = core.TarProducer(local)
        sent = [0]

        async def body() -> AsyncIterator[bytes]:
            while True:
                chunk = await asyncio.to_thread(producer.get)
                if chunk is None:
                    return
                sent[0] += len(chunk)
                yield chunk
                if progress:
                    progress(sent[0], None)

        try:
            res: BatchResult = await self._c._call(core.batch(self._v, path, body()))
        finally:
            producer.close()
        return UploadResult(path, res.bytes, sent[0], res)

    async def download(self, path: str, local: PathLike, *, archive: Optional[str] = None) -> pathlib.Path:
        """Downloads a file, a directory (unpacked safely) or an archive of either; see
        :meth:`volumefs.client.Files.download`. A directory's tar is spooled to a temporary
        file and unpacked on a thread."""
        dest = pathlib.Path(local)
        if archive:
            if dest.is_dir():
                base = path.rstrip("/").rsplit("/", 1)[-1] or self._v
                dest = dest / f"{base}.{archive}"
            resp = await self._c._send(core.archive_get(self._v, path, archive), stream=True, timeout=_timeout(self._c._timeout, -1))
            await self._save(resp, dest)
            return dest
        entry = await self.stat(path)
        if entry.is_dir:
            resp = await self._c._send(core.archive_get(self._v, path, "tar"), stream=True, timeout=_timeout(self._c._timeout, -1))
            with tempfile.TemporaryFile() as spool:
                try:
                    with http_errors(self._c.server):
                        async for chunk in resp.aiter_bytes(core.IO_CHUNK):
                            spool.write(chunk)
                finally:
                    await resp.aclose()
                spool.seek(0)
                await asyncio.to_thread(core.extract_tar, spool, str(dest), entry.path != "/")
            return dest
        if dest.is_dir():
            dest = dest / entry.name
        if entry.is_symlink:
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            os.symlink(entry.target or "", dest)
            return dest
        resp = await self._c._send(core.file_read(self._v, path, None), stream=True, timeout=_timeout(self._c._timeout, -1))
        await self._save(resp, dest)
        os.chmod(dest, entry.mode & 0o777)
        os.utime(dest, (entry.mtime, entry.mtime))
        return dest

    async def _save(self, resp: httpx.Response, dest: pathlib.Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=str(dest.parent))
        try:
            with os.fdopen(fd, "wb") as out, http_errors(self._c.server):
                async for chunk in resp.aiter_bytes(core.IO_CHUNK):
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            await resp.aclose()


class AsyncWatch:
    """An open ``watch``: ``async for`` over it for :class:`~volumefs.models.Event`; it
    reconnects by itself after a dropped connection, resuming after ``last_id``."""

    def __init__(
        self,
        files: AsyncFiles,
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
        #: The id of the last event received.
        self.last_id: Optional[str] = after
        #: How many times the stream was reopened.
        self.reconnects = 0
        self._internal = include_internal
        self._reconnect = reconnect
        self._retry_for = retry_for
        self._timeout = httpx.Timeout(connect=10.0, read=read_timeout, write=10.0, pool=10.0)
        self._resp: Optional[httpx.Response] = None
        self._closed = False
        self._it: Optional[AsyncIterator[Event]] = None

    async def connect(self) -> "AsyncWatch":
        """Opens the stream (once); changes from then on are seen."""
        if self._resp is None and not self._closed:
            await self._open()
        return self

    def __await__(self) -> Generator[Any, None, "AsyncWatch"]:
        return self.connect().__await__()

    async def _open(self) -> None:
        failing_since: Optional[float] = None
        delay = 0.1
        while True:
            try:
                self._resp = await self._c._send(
                    core.watch_req(self._files._v, self.path, self.last_id, self._internal), stream=True, timeout=self._timeout
                )
                return
            except Unavailable:
                now = time.monotonic()
                failing_since = failing_since or now
                if not self._reconnect or self._closed or now - failing_since > self._retry_for:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _events(self) -> AsyncIterator[Event]:
        await self.connect()
        while not self._closed:
            resp = self._resp
            assert resp is not None
            parser = core.SSEParser()
            try:
                async for line in resp.aiter_lines():
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
                        await self.aclose()
                        return
            except (httpx.HTTPError, httpx.StreamError):
                pass  # dropped (or closed under us): reconnect below unless closed
            finally:
                await resp.aclose()
            if self._closed:
                return
            if not self._reconnect:
                raise Unavailable("Unavailable", "the watch stream ended (reconnect=False)")
            self.reconnects += 1
            await self._open()

    def __aiter__(self) -> "AsyncWatch":
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        if self._it is None:
            self._it = self._events()
        return await self._it.__anext__()

    async def aclose(self) -> None:
        """Stops watching."""
        self._closed = True
        if self._resp is not None:
            core.shutdown_socket(self._resp)
            await self._resp.aclose()

    async def __aenter__(self) -> "AsyncWatch":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncResumableUpload:
    """A tus upload of a local file (see :class:`volumefs.client.ResumableUpload`)."""

    def __init__(self, files: AsyncFiles, local: str, path: str, parents: bool, url: Optional[str], chunk_size: int) -> None:
        self._files = files
        self._c = files._c
        self.local = local
        self.path = path
        self.parents = parents
        #: The upload's URL once created.
        self.url = url
        self.chunk_size = max(1, int(chunk_size))
        #: Bytes sent by this object, over all its calls.
        self.sent = 0
        self.size = os.path.getsize(local)

    def __repr__(self) -> str:
        return f"AsyncResumableUpload({self.local!r} -> {self.path!r}, url={self.url!r})"

    async def create(self) -> str:
        """Creates the upload on the server (once) and returns its URL."""
        if self.url is None:
            loc = await self._c._call(core.tus_create(self._files._v, self.path, self.size, self.parents))
            if not loc:
                raise errors.ProtocolError("ProtocolError", "the server created the upload but gave no Location")
            self.url = str(self._c._http.base_url.join(loc))
        return self.url

    async def offset(self) -> int:
        """How many bytes the server has."""
        off, _ = await self._c._call(core.tus_offset(await self.create()))
        return int(off)

    async def cancel(self) -> None:
        """Gives the upload up."""
        if self.url is not None:
            await self._c._call(core.tus_delete(self.url))

    async def upload(self, progress: Optional[core.Progress] = None, retries: int = 5) -> UploadResult:
        """Sends the rest of the file; ``progress(offset, size)`` after each chunk."""
        sent_before = self.sent
        if self.url is None:
            await self.create()
            offset = 0
        else:
            offset = await self._offset_retrying(retries)
        failures = 0
        with open(self.local, "rb") as f:
            while offset < self.size:
                n = min(self.chunk_size, self.size - offset)
                f.seek(offset)
                try:
                    new = await self._c._call(core.tus_patch(str(self.url), offset, self._body(f, n)))
                except (Unavailable, Conflict) as e:
                    failures += 1
                    if failures > retries:
                        raise
                    if isinstance(e, Unavailable):
                        await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                    offset = await self._offset_retrying(retries)
                    continue
                if new > offset:
                    failures = 0
                offset = int(new)
                if progress:
                    progress(offset, self.size)
        if self.size == 0 and progress:
            progress(0, 0)
        return UploadResult(self.path, self.size, self.sent - sent_before)

    async def _body(self, f: Any, n: int) -> AsyncIterator[bytes]:
        left = n
        while left > 0:
            b = f.read(min(core.IO_CHUNK, left))
            if not b:
                break
            left -= len(b)
            self.sent += len(b)
            yield b

    async def _offset_retrying(self, retries: int) -> int:
        failures = 0
        while True:
            try:
                return await self.offset()
            except Unavailable:
                failures += 1
                if failures > retries:
                    raise
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))


# ----- sandboxes ----------------------------------------------------------------------------------


class AsyncSandboxes:
    """``client.sandboxes``: registering, booting, finding and listing sandboxes."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, name: str, volumes: Optional[Mapping[str, Any]] = None) -> "AsyncSandbox":
        """Registers a sandbox and attaches ``volumes`` (deleted again if one is refused)."""
        info = await self._c._call(core.sandbox_create(name))
        sb = AsyncSandbox(self._c, info.name or name, info)
        try:
            for path, spec in (volumes or {}).items():
                m = spec if isinstance(spec, Mount) else Mount(spec)
                await sb.volumes.attach(m.volume, path, read_only=m.read_only, subpath=m.subpath)
        except BaseException:
            with contextlib.suppress(VolumefsError):
                await sb.delete()
            raise
        await sb.info()
        return sb

    async def run(self, name: str, volumes: Optional[Mapping[str, Any]] = None, *, memory: Optional[str] = None) -> "AsyncSandbox":
        """Boots a microVM for the sandbox with ``volumes`` attached at boot."""
        await self._c._call(core.sandbox_run(name, volumes, memory))
        sb = AsyncSandbox(self._c, name)
        await sb.info()
        return sb

    async def get(self, name: str) -> "AsyncSandbox":
        """The sandbox called ``name``."""
        info = await self._c._call(core.sandbox_get(name))
        return AsyncSandbox(self._c, info.name or name, info)

    async def list(self) -> List["AsyncSandbox"]:
        """Every sandbox the caller may see."""
        return [AsyncSandbox(self._c, i.name, i) for i in await self._c._call(core.sandbox_list())]


class AsyncSandboxVolumes:
    """``sb.volumes``: the sandbox's attachments."""

    def __init__(self, sandbox: "AsyncSandbox") -> None:
        self._sb = sandbox
        self._c = sandbox.client

    async def attach(self, volume: Any, path: str, *, read_only: bool = False, subpath: str = "/") -> Attachment:
        """Attaches ``volume`` at mount path ``path``; returns the attachment with its state."""
        return await self._c._call(core.attach(self._sb.name, volume, path, read_only, subpath))  # type: ignore[no-any-return]

    async def list(self) -> List[Attachment]:
        """The sandbox's attachments."""
        return await self._c._call(core.attachments_list(self._sb.name))  # type: ignore[no-any-return]

    async def detach(self, path: str, *, force: bool = False) -> None:
        """Detaches the volume at ``path`` (refused while files are open, unless ``force``)."""
        await self._c._call(core.detach(self._sb.name, path, force))


class AsyncSandbox:
    """A sandbox, bound to an :class:`AsyncClient` (see :class:`volumefs.client.Sandbox`)."""

    def __init__(self, client: AsyncClient, name: str, info: Optional[SandboxInfo] = None) -> None:
        self.client = client
        self.name = name
        self.last_info = info
        #: The sandbox's attachments.
        self.volumes = AsyncSandboxVolumes(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncSandbox) and (other.client.server, other.name) == (self.client.server, self.name)

    def __hash__(self) -> int:
        return hash((self.client.server, self.name))

    @property
    def guest_socket(self) -> str:
        """The unix socket its guest agent connects to (as of ``last_info``)."""
        return self.last_info.guest_socket if self.last_info else ""

    @classmethod
    async def create(
        cls, name: str, volumes: Optional[Mapping[str, Any]] = None, *, client: Optional[AsyncClient] = None
    ) -> "AsyncSandbox":
        """Registers a sandbox with its attachments."""
        return await (client or default_async_client()).sandboxes.create(name, volumes)

    @classmethod
    async def run(
        cls,
        name: str,
        volumes: Optional[Mapping[str, Any]] = None,
        *,
        memory: Optional[str] = None,
        client: Optional[AsyncClient] = None,
    ) -> "AsyncSandbox":
        """Boots a microVM for the sandbox."""
        return await (client or default_async_client()).sandboxes.run(name, volumes, memory=memory)

    @classmethod
    async def get(cls, name: str, *, client: Optional[AsyncClient] = None) -> "AsyncSandbox":
        """The sandbox called ``name``."""
        return await (client or default_async_client()).sandboxes.get(name)

    @classmethod
    async def list(cls, *, client: Optional[AsyncClient] = None) -> List["AsyncSandbox"]:
        """Every sandbox the caller may see."""
        return await (client or default_async_client()).sandboxes.list()

    async def info(self) -> SandboxInfo:
        """The sandbox as the server sees it now."""
        info: SandboxInfo = await self.client._call(core.sandbox_get(self.name))
        self.last_info = info
        return info

    async def exec(
        self, cmd: Union[str, Sequence[str]], *, stdin: Union[str, bytes, None] = None, timeout: Optional[float] = None
    ) -> ExecResult:
        """Runs a command in the sandbox (a list, or a string for ``sh -c``)."""
        return await self.client._call(core.sandbox_exec(self.name, cmd, stdin, timeout))  # type: ignore[no-any-return]

    async def hibernate(self) -> List[Attachment]:
        """Flushes and releases the sandbox's leases; returns its attachments."""
        return await self.client._call(core.sandbox_verb(self.name, "hibernate"))  # type: ignore[no-any-return]

    async def resume(self) -> List[Attachment]:
        """Takes the leases again; returns its attachments."""
        return await self.client._call(core.sandbox_verb(self.name, "resume"))  # type: ignore[no-any-return]

    async def fork(self, new_name: str) -> "AsyncSandbox":
        """Registers ``new_name`` with this sandbox's attachments."""
        info = await self.client._call(core.sandbox_verb(self.name, "fork", {"name": new_name}))
        return AsyncSandbox(self.client, info.name or new_name, info)

    async def stop(self) -> None:
        """Shuts the sandbox's microVM down."""
        await self.client._call(core.sandbox_verb(self.name, "stop"))

    async def reset_connections(self) -> int:
        """Closes the sandbox's guest connections; returns how many."""
        return int(await self.client._call(core.sandbox_verb(self.name, "reset-connections")))

    async def delete(self) -> None:
        """Deletes the sandbox."""
        await self.client._call(core.sandbox_delete(self.name))


# ----- tenants ------------------------------------------------------------------------------------


class AsyncTenants:
    """``client.tenants``: the operator's tenants."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, name: str, default_cap: Optional[core.Cap] = None) -> Tenant:
        """Creates a tenant; the result carries its token."""
        return await self._c._call(core.tenant_create(name, default_cap))  # type: ignore[no-any-return]

    async def list(self) -> List[Tenant]:
        """The tenants (without tokens)."""
        return await self._c._call(core.tenant_list())  # type: ignore[no-any-return]


_default: Optional[AsyncClient] = None


def default_async_client() -> AsyncClient:
    """The async client that ``AsyncVolume.create`` and friends use without ``client=``, made on
    first use from the environment. httpx ties its connections to the event loop that used them:
    in programs with more than one loop, pass ``client=``."""
    global _default
    if _default is None:
        _default = AsyncClient()
    return _default
