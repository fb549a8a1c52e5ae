"""Exceptions raised by the SDK.

Every error the server reports carries a stable ``code`` (``NotFound``, ``VolumeFull``, …), a
message and, for file-system errors, the errno name; each code has its own exception class, all
derived from :class:`VolumefsError`. Failures to reach the server at all (connection refused,
reset, timed out) are :class:`Unavailable` as well, so no ``httpx`` exception reaches the caller.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

__all__ = [
    "VolumefsError",
    "NotFound",
    "AlreadyExists",
    "Conflict",
    "NotEmpty",
    "Busy",
    "InvalidArgument",
    "NameTooLong",
    "NotADirectory",
    "IsADirectory",
    "InvalidRange",
    "ReadOnly",
    "PermissionDenied",
    "Forbidden",
    "Unauthorized",
    "VolumeFull",
    "TooLarge",
    "Unavailable",
    "Timeout",
    "Internal",
    "NotSupported",
    "ProtocolError",
    "error_from_response",
]


class VolumefsError(Exception):
    """An error of the volumefs API.

    Attributes:
        code: the server's stable error code (``"NotFound"``, ``"VolumeFull"``, …), or the SDK's
            own (``"Unavailable"`` for a server that cannot be reached).
        message: what went wrong, in words.
        status: the HTTP status, or ``None`` when no answer came.
        errno: the errno name behind a file-system error (``"ENOENT"``), or ``""``.
    """

    #: The code this class stands for (subclasses set it).
    default_code = "Error"

    def __init__(self, code: str, message: str, status: Optional[int] = None, errno: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.errno = errno

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status else ""
        return f"{self.message} ({where}{self.code})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, status={self.status!r})"


class NotFound(VolumefsError):
    """The volume, sandbox, file, attachment or upload does not exist (404)."""

    default_code = "NotFound"


class AlreadyExists(VolumefsError):
    """Something of that name exists already (409)."""

    default_code = "AlreadyExists"


class Conflict(VolumefsError):
    """The object is in use or in a state that forbids the call (409), e.g. deleting an attached
    volume without ``force``, detaching with open files, or a tus offset that does not match."""

    default_code = "Conflict"


class NotEmpty(Conflict):
    """A directory that is not empty was to be removed without ``recursive`` (409)."""

    default_code = "NotEmpty"


class Busy(VolumefsError):
    """The server is busy with the object; try again (503)."""

    default_code = "Busy"


class InvalidArgument(VolumefsError):
    """The request is not valid: a bad path, name, size, pattern or field (400)."""

    default_code = "InvalidArgument"


class NameTooLong(InvalidArgument):
    """A name or path is too long (400)."""

    default_code = "NameTooLong"


class NotADirectory(InvalidArgument):
    """A path component that must be a directory is not one (400)."""

    default_code = "NotADirectory"


class IsADirectory(InvalidArgument):
    """A file operation named a directory (400)."""

    default_code = "IsADirectory"


class InvalidRange(InvalidArgument):
    """A byte range that the file cannot satisfy (416)."""

    default_code = "InvalidRange"


class PermissionDenied(VolumefsError):
    """The caller may not do this, e.g. a tenant setting a cap or managing tenants (403)."""

    default_code = "PermissionDenied"


class ReadOnly(PermissionDenied):
    """The target is read-only (403)."""

    default_code = "ReadOnly"


class Forbidden(PermissionDenied):
    """A signed URL that is invalid or has expired (403)."""

    default_code = "Forbidden"


class Unauthorized(VolumefsError):
    """The API token is missing or wrong (401)."""

    default_code = "Unauthorized"


class VolumeFull(VolumefsError):
    """The volume's cap would be exceeded (507); nothing of the write was kept."""

    default_code = "VolumeFull"


class TooLarge(VolumefsError):
    """A body is larger than the server accepts for that call (413)."""

    default_code = "TooLarge"


class Unavailable(VolumefsError):
    """The server, or the sandbox's agent, cannot be reached (502, or no answer at all)."""

    default_code = "Unavailable"


class Timeout(Unavailable):
    """No answer came in time."""

    default_code = "Timeout"


class Internal(VolumefsError):
    """The server failed (500); its log says why."""

    default_code = "Internal"


class NotSupported(VolumefsError):
    """The server cannot do this in its configuration (501): e.g. cloning a volume needs a
    server that keeps file data in a block store."""

    default_code = "NotSupported"


class ProtocolError(VolumefsError):
    """The server answered something the SDK does not understand."""

    default_code = "ProtocolError"


_BY_CODE: Dict[str, Type[VolumefsError]] = {
    cls.default_code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        Conflict,
        NotEmpty,
        Busy,
        InvalidArgument,
        NameTooLong,
        NotADirectory,
        IsADirectory,
        NotSupported,
        InvalidRange,
        PermissionDenied,
        ReadOnly,
        Forbidden,
        Unauthorized,
        VolumeFull,
        TooLarge,
        Unavailable,
        Timeout,
        Internal,
        ProtocolError,
    )
}

# When a body has no code (a HEAD answer, a proxy's page), the status decides.
_BY_STATUS: Dict[int, Type[VolumefsError]] = {
    400: InvalidArgument,
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    412: InvalidArgument,
    413: TooLarge,
    415: InvalidArgument,
    416: InvalidRange,
    500: Internal,
    502: Unavailable,
    503: Busy,
    504: Timeout,
    507: VolumeFull,
}


def make_error(code: str, message: str, status: Optional[int] = None, errno: str = "") -> VolumefsError:
    """The exception for a server error code (``VolumefsError`` itself for a code it does not know)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = _BY_STATUS.get(status or 0, VolumefsError)
    return cls(code, message, status, errno)


def error_from_response(status: int, body: bytes, reason: str = "") -> VolumefsError:
    """The exception for an error answer: the JSON ``{code, message, errno}`` when there is one,
    else the status alone."""
    import json

    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    if isinstance(data, dict) and isinstance(data.get("code"), str):
        return make_error(data["code"], str(data.get("message") or data["code"]), status, str(data.get("errno") or ""))
    cls = _BY_STATUS.get(status, VolumefsError)
    text = body.decode("utf-8", "replace").strip() if body else ""
    message = text[:500] or reason or f"HTTP {status}"
    return cls(cls.default_code if cls is not VolumefsError else f"HTTP{status}", message, status, "")
