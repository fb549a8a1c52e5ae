"""Typed records of what the API returns. Times are Unix seconds, sizes bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Generic, List, Mapping, Optional, TypeVar, Union

__all__ = [
    "VolumeInfo",
    "Attachment",
    "SandboxInfo",
    "FileEntry",
    "Event",
    "SearchHit",
    "ExecResult",
    "Tenant",
    "BatchResult",
    "UploadResult",
    "Mount",
    "ResultList",
    "VOLUME_FIELDS",
]

#: The fields of a volume, in the API's order (what ``fields=`` may name).
VOLUME_FIELDS = ("id", "name", "cap_bytes", "used_bytes", "free_bytes", "files", "created_at", "attachments")

T = TypeVar("T")


class ResultList(List[T], Generic[T]):
    """A list of results that also says whether the server cut it short (``truncated``)."""

    truncated: bool = False

    def __init__(self, items: Any = (), truncated: bool = False) -> None:
        super().__init__(items)
        self.truncated = truncated


@dataclass(frozen=True)
class Attachment:
    """A volume attached to a sandbox at a mount path.

    ``state`` is ``attached`` (recorded, not mounted yet), ``mounted`` (its agent has it
    mounted), ``released`` (hibernated, stopped, detached or forked) or ``failed`` (``reason``
    says why).
    """

    id: int
    sandbox: str
    volume: str
    path: str
    read_only: bool
    subpath: str
    state: str
    reason: str = ""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Attachment":
        """Builds one from the API's JSON object."""
        return cls(
            id=int(d.get("id", 0)),
            sandbox=str(d.get("sandbox", "")),
            volume=str(d.get("volume", "")),
            path=str(d.get("path", "")),
            read_only=bool(d.get("read_only", False)),
            subpath=str(d.get("subpath", "/")),
            state=str(d.get("state", "")),
            reason=str(d.get("reason") or ""),
        )


@dataclass(frozen=True)
class VolumeInfo:
    """A volume as the server describes it. With ``fields=`` only the fields asked for are set;
    the others are ``None``. ``files`` counts the volume's inodes (the root included)."""

    id: Optional[int] = None
    name: Optional[str] = None
    cap_bytes: Optional[int] = None
    used_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    files: Optional[int] = None
    created_at: Optional[int] = None
    attachments: Optional[List[Attachment]] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "VolumeInfo":
        """Builds one from the API's JSON object."""
        att = d.get("attachments")
        return cls(
            id=d.get("id"),
            name=d.get("name"),
            cap_bytes=d.get("cap_bytes"),
            used_bytes=d.get("used_bytes"),
            free_bytes=d.get("free_bytes"),
            files=d.get("files"),
            created_at=d.get("created_at"),
            attachments=[Attachment.from_json(a) for a in att] if isinstance(att, list) else None,
        )


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox: its name, the unix socket its guest agent connects to, its attachments."""

    name: str
    guest_socket: str = ""
    attachments: Optional[List[Attachment]] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SandboxInfo":
        """Builds one from the API's JSON object."""
        att = d.get("attachments")
        return cls(
            name=str(d.get("name", "")),
            guest_socket=str(d.get("guest_socket") or ""),
            attachments=[Attachment.from_json(a) for a in att] if isinstance(att, list) else None,
        )


@dataclass(frozen=True)
class FileEntry:
    """A file, directory or symlink of a volume (``stat``, ``list``).

    ``kind`` is ``file``, ``dir``, ``symlink``, ``fifo``, ``socket``, ``chardev`` or
    ``blockdev``; ``mode`` the permission bits; ``target`` a symlink's target.
    """

    path: str
    name: str
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    target: Optional[str] = None
    nlink: int = 1
    ino: int = 0
    atime: float = 0.0
    ctime: float = 0.0

    @property
    def is_dir(self) -> bool:
        """Whether it is a directory."""
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        """Whether it is a regular file."""
        return self.kind == "file"

    @property
    def is_symlink(self) -> bool:
        """Whether it is a symbolic link."""
        return self.kind == "symlink"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FileEntry":
        """Builds one from the API's JSON object."""
        return cls(
            path=str(d["path"]),
            name=str(d.get("name", "")),
            kind=str(d.get("kind", "")),
            size=int(d.get("size", 0)),
            mode=int(d.get("mode", 0)),
            uid=int(d.get("uid", 0)),
            gid=int(d.get("gid", 0)),
            mtime=float(d.get("mtime", 0.0)),
            target=d.get("target"),
            nlink=int(d.get("nlink", 1)),
            ino=int(d.get("ino", 0)),
            atime=float(d.get("atime", 0.0)),
            ctime=float(d.get("ctime", 0.0)),
        )


@dataclass(frozen=True)
class Event:
    """One change seen by ``watch``.

    ``kind`` is ``create``, ``modify``, ``delete`` or ``move`` for changes; then
    ``path`` is the path changed (a move's new path, with the old one in ``from_path``),
    ``node`` what it is (``file``, ``dir``, ``symlink``…), ``time`` when (Unix seconds), ``id``
    the event id (``VOLUMEID-CHANGEID``, what a resume starts after) and ``change_id`` the
    volume's change number. Two notices have no id: ``truncated`` (events were missed: rescan)
    and ``deleted`` (the volume is gone; the watch ends); ``message`` says more.
    """

    kind: str
    path: Optional[str] = None
    from_path: Optional[str] = None
    node: Optional[str] = None
    time: Optional[float] = None
    id: Optional[str] = None
    change_id: Optional[int] = None
    message: Optional[str] = None

    @classmethod
    def from_sse(cls, event_id: Optional[str], kind: str, data: Mapping[str, Any]) -> "Event":
        """Builds one from a Server-Sent Event's id, type and JSON data."""
        cid = data.get("id")
        return cls(
            kind=kind or str(data.get("kind", "")),
            path=data.get("path"),
            from_path=data.get("from"),
            node=data.get("node"),
            time=data.get("time"),
            id=event_id or None,
            change_id=int(cid) if isinstance(cid, int) else None,
            message=data.get("message"),
        )


@dataclass(frozen=True)
class SearchHit:
    """A search match: a path, and for content matches the 1-based line number and the line."""

    path: str
    line: Optional[int] = None
    text: Optional[str] = None


@dataclass(frozen=True)
class ExecResult:
    """What a command run in a sandbox returned."""

    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether it exited with 0."""
        return self.code == 0


@dataclass(frozen=True)
class Tenant:
    """A tenant: its own token (only when just created), namespace and default volume cap."""

    name: str
    default_cap_bytes: int
    token: Optional[str] = None
    created_at: Optional[int] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Tenant":
        """Builds one from the API's JSON object."""
        return cls(
            name=str(d["name"]),
            default_cap_bytes=int(d.get("default_cap_bytes", 0)),
            token=d.get("token"),
            created_at=d.get("created_at"),
        )


@dataclass(frozen=True)
class FsckReport:
    """What ``Volume.fsck()`` found: counts, and the problems (none when the volume is
    consistent). ``blocks`` is 0 unless the server keeps file data in a block store."""

    volume: str
    inodes: int
    names: int
    blocks: int
    orphans: int
    problems: List[str]

    @property
    def clean(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FsckReport":
        return cls(
            volume=str(d.get("volume", "")),
            inodes=int(d.get("inodes", 0)),
            names=int(d.get("names", 0)),
            blocks=int(d.get("blocks", 0)),
            orphans=int(d.get("orphans", 0)),
            problems=[str(p) for p in d.get("problems") or []],
        )


@dataclass(frozen=True)
class GcReport:
    """What ``Client.gc()`` found and did in the block store."""

    blocks: int
    bytes: int
    referenced: int
    deleted: int
    deleted_bytes: int
    young: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "GcReport":
        return cls(**{k: int(d.get(k, 0)) for k in ("blocks", "bytes", "referenced", "deleted", "deleted_bytes", "young")})


@dataclass(frozen=True)
class BatchResult:
    """What a batch write or a directory upload wrote."""

    files: int
    dirs: int
    symlinks: int
    bytes: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BatchResult":
        """Builds one from the API's JSON object."""
        return cls(
            files=int(d.get("files", 0)),
            dirs=int(d.get("dirs", 0)),
            symlinks=int(d.get("symlinks", 0)),
            bytes=int(d.get("bytes", 0)),
        )


@dataclass(frozen=True)
class UploadResult:
    """What ``upload`` did: the volume path, the bytes it holds now (for a directory: the bytes
    of its files), the bytes sent by this call (less than ``size`` when an upload was resumed),
    and for a directory what the batch wrote."""

    path: str
    size: int
    sent: int
    batch: Optional[BatchResult] = None


@dataclass(frozen=True)
class Mount:
    """How a volume is attached in ``Sandbox.create`` / ``Sandbox.run``:
    ``{"/mnt/docs": Mount(vol, read_only=True, subpath="/docs")}``. ``volume`` is a volume
    object or its name."""

    volume: Any
    read_only: bool = False
    subpath: str = "/"

    @property
    def volume_name(self) -> str:
        """The volume's name."""
        return volume_name(self.volume)


def volume_name(v: Any) -> str:
    """The name of a volume given as a volume object, a ``VolumeInfo`` or a string."""
    if isinstance(v, str):
        return v
    name = getattr(v, "name", None)
    if isinstance(name, str):
        return name
    raise TypeError(f"expected a volume or a volume name, not {type(v).__name__}")


MountSpec = Union[Mount, Any]


def mounts_of(volumes: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """``{"/mnt/x": vol | "name" | Mount(...)}`` → the API's list of boot attachments."""
    out: List[Dict[str, Any]] = []
    for path, spec in (volumes or {}).items():
        m = spec if isinstance(spec, Mount) else Mount(spec)
        out.append({"volume": m.volume_name, "path": path, "read_only": m.read_only, "subpath": m.subpath})
    return out


