"""volumefs: durable volumes for microVM sandboxes, from Python.

The SDK speaks the server's HTTP API, as the ``volumefs`` CLI does, and is configured the same
way: ``VOLUMEFS_SERVER`` (default ``http://127.0.0.1:7070``) and ``VOLUMEFS_TOKEN``, or
arguments::

    import volumefs
    from volumefs import Volume, Sandbox

    vol = Volume.create("data", cap="1GiB")              # volumefs volume create data --cap 1GiB
    vol.files.write("/hello.txt", "hello\\n")             # echo hello | volumefs file write data /hello.txt
    sb = Sandbox.create("sb1", volumes={"/mnt/data": vol})  # volumefs sandbox create sb1; volumefs attach …
    print(vol.files.read("/hello.txt", text=True))       # volumefs file read data /hello.txt

:class:`Client` and :class:`AsyncClient` are the explicit forms (``client.volumes.create(…)``);
the class methods above use a default client made from the environment. Errors are
:class:`VolumefsError` subclasses named by the server's stable codes (:class:`NotFound`,
:class:`VolumeFull`, …).
"""

from .aio import (
    AsyncClient,
    AsyncFiles,
    AsyncReadStream,
    AsyncResumableUpload,
    AsyncSandbox,
    AsyncSandboxVolumes,
    AsyncVolume,
    AsyncWatch,
)
from .client import (
    Client,
    Files,
    ReadStream,
    ResumableUpload,
    Sandbox,
    SandboxVolumes,
    Volume,
    Watch,
    configure,
    default_client,
)
from .errors import (
    AlreadyExists,
    Busy,
    Conflict,
    Forbidden,
    Internal,
    InvalidArgument,
    InvalidRange,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ReadOnly,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    NotSupported,
    VolumeFull,
    VolumefsError,
)
from .models import (
    VOLUME_FIELDS,
    Attachment,
    BatchResult,
    Event,
    ExecResult,
    FileEntry,
    FsckReport,
    GcReport,
    Mount,
    ResultList,
    SandboxInfo,
    SearchHit,
    Tenant,
    UploadResult,
    VolumeInfo,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "Volume",
    "AsyncVolume",
    "Files",
    "AsyncFiles",
    "ReadStream",
    "AsyncReadStream",
    "Watch",
    "AsyncWatch",
    "ResumableUpload",
    "AsyncResumableUpload",
    "Sandbox",
    "AsyncSandbox",
    "SandboxVolumes",
    "AsyncSandboxVolumes",
    "Mount",
    "configure",
    "default_client",
    "VOLUME_FIELDS",
    "Attachment",
    "BatchResult",
    "Event",
    "ExecResult",
    "FileEntry",
    "FsckReport",
    "GcReport",
    "ResultList",
    "SandboxInfo",
    "SearchHit",
    "Tenant",
    "UploadResult",
    "VolumeInfo",
    "VolumefsError",
    "AlreadyExists",
    "Busy",
    "Conflict",
    "Forbidden",
    "Internal",
    "InvalidArgument",
    "InvalidRange",
    "IsADirectory",
    "NameTooLong",
    "NotADirectory",
    "NotEmpty",
    "NotFound",
    "PermissionDenied",
    "ProtocolError",
    "ReadOnly",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "NotSupported",
    "VolumeFull",
]
