"""One sandbox booted as a real microVM from the SDK (``Sandbox.run``): its guest ``cat``s a file
the SDK wrote, and the SDK reads what the guest wrote. Needs the guest image
(``vm-images/build.sh``, found above the server binary as the server finds it), QEMU and
vhost-device-vsock; SKIPPED without them (``VOLUMEFS_REQUIRE_VM=1`` makes that a failure)."""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import pytest

import volumefs
from volumefs import Mount, Sandbox, Volume

from .conftest import skip_or_fail, unique, volumefs_bin, which


def images() -> Optional[pathlib.Path]:
    """The guest image the server will boot, as ``vm::find_images`` looks for it."""
    candidates = [pathlib.Path(os.environ["VOLUMEFS_IMAGES"])] if os.environ.get("VOLUMEFS_IMAGES") else []
    candidates += [d / "vm-images" / "build" for d in volumefs_bin().parents]
    return next((c for c in candidates if (c / "initramfs.gz").exists()), None)


def vm_unavailable() -> Optional[str]:
    if images() is None:
        return f"no guest image above {volumefs_bin()} (run vm-images/build.sh)"
    if not (os.environ.get("VOLUMEFS_QEMU") or which("qemu-system-x86_64")):
        return "no qemu-system-x86_64"
    if not (os.environ.get("VOLUMEFS_VHOST_VSOCK") or which("vhost-device-vsock")):
        return "no vhost-device-vsock"
    return None


def test_a_microvm_guest_reads_what_the_sdk_wrote(client: volumefs.Client, vol: Volume) -> None:
    why = vm_unavailable()
    if why:
        skip_or_fail(f"SKIPPED: the microVM test needs the guest image, QEMU and vhost-device-vsock ({why})", "VOLUMEFS_REQUIRE_VM")
    vol.files.write("/hello.txt", "hello from the SDK\n")
    name = unique("vm")
    sb = Sandbox.run(name, volumes={"/mnt/data": vol, "/mnt/ro": Mount(vol, read_only=True)}, client=client)
    try:
        assert {a.path: a.state for a in sb.volumes.list()} == {"/mnt/data": "mounted", "/mnt/ro": "mounted"}
        r = sb.exec(["cat", "/mnt/data/hello.txt"])
        assert (r.code, r.stdout) == (0, "hello from the SDK\n"), r
        r = sb.exec("echo from the VM > /mnt/data/vm.txt && uname -s")
        assert (r.code, r.stdout) == (0, "Linux\n"), r
        assert vol.files.read("/vm.txt") == b"from the VM\n"
        r = sb.exec("echo no > /mnt/ro/denied")
        assert r.code != 0 and not vol.files.exists("/denied"), r
        with pytest.raises(volumefs.Conflict):
            client.sandboxes.run(name, volumes={"/mnt/data": vol})
    finally:
        sb.stop()
    assert all(a.state != "mounted" for a in sb.volumes.list())
    sb.delete()
