"""``vol.files.watch``: events caused by the API itself, path filtering, resuming after a dropped
connection (a proxy cuts it) and from an event id, the end of a deleted volume; the SSE parser."""

from __future__ import annotations

import threading
from typing import List

import volumefs
from volumefs import Event, Volume, _core

from .conftest import Proxy, Server, unique


def take(w: volumefs.Watch, n: int, timeout: float = 20.0) -> List[Event]:
    """The next ``n`` events (the watch is closed if they do not come in time)."""
    out: List[Event] = []
    timer = threading.Timer(timeout, w.close)
    timer.start()
    try:
        for ev in w:
            out.append(ev)
            if len(out) >= n:
                break
    finally:
        timer.cancel()
    return out


def test_watch_sees_the_apis_changes_under_a_path(vol: Volume) -> None:
    vol.files.mkdir("/w")
    vol.files.mkdir("/elsewhere")
    with vol.files.watch("/w") as w:
        vol.files.write("/w/a.txt", "one")  # an atomic write: a hidden file renamed into place
        vol.files.write("/elsewhere/x", "not watched")
        vol.files.move("/w/a.txt", "/w/b.txt")
        vol.files.mkdir("/w/d")
        vol.files.remove("/w/b.txt")
        events = take(w, 4)
    got = [(e.kind, e.path, e.from_path) for e in events]
    assert got[0] == ("create", "/w/a.txt", None), "an atomic write reads as one create"
    assert got[1:] == [("move", "/w/b.txt", "/w/a.txt"), ("create", "/w/d", None), ("delete", "/w/b.txt", None)]
    assert all(e.id and e.change_id and e.time and e.node for e in events)
    assert events[2].node == "dir" and events[1].node == "file"
    ids = [e.change_id for e in events]
    assert ids == sorted(ids)
    assert events[-1].id == w.last_id and w.last_id.endswith(f"-{events[-1].change_id}")  # type: ignore[union-attr]

    # include_internal shows the hidden file's own events too.
    with vol.files.watch("/w", include_internal=True) as w:
        vol.files.write("/w/c.txt", "two")
        raw = take(w, 3)
    assert [e.kind for e in raw] == ["create", "modify", "move"] and _core.is_internal_path(raw[0].path)


def test_watch_resumes_after_a_dropped_connection_and_from_an_id(server: Server, vol: Volume, proxy: Proxy) -> None:
    with volumefs.Client(proxy.url, server.token) as c:
        w = c.volume(vol.name).files.watch("/")
        try:
            vol.files.mkdir("/before")
            first = take(w, 1)
            assert [(e.kind, e.path) for e in first] == [("create", "/before")]
            proxy.cut()
            # Changes while the stream is down are not lost: the watch reconnects with the last
            # id it saw and gets exactly what it missed.
            vol.files.mkdir("/during-1")
            vol.files.mkdir("/during-2")
            later = take(w, 2)
            assert [(e.kind, e.path) for e in later] == [("create", "/during-1"), ("create", "/during-2")]
            assert w.reconnects >= 1 and proxy.cuts == 1
        finally:
            w.close()
    # A new watch started after an id gets what came after it, and nothing before.
    vol.files.mkdir("/after")
    with vol.files.watch("/", after=first[0].id) as w2:
        again = take(w2, 3)
    assert [e.path for e in again] == ["/during-1", "/during-2", "/after"]
    # An id of another volume: a `truncated` notice (rescan), then live events.
    with vol.files.watch("/", after="999999-1") as w3:
        vol.files.mkdir("/live")
        notice = take(w3, 2)
    assert notice[0].kind == "truncated" and notice[0].id is None and "rescan" in (notice[0].message or "")
    assert (notice[1].kind, notice[1].path) == ("create", "/live")


def test_watch_ends_when_the_volume_is_deleted(client: volumefs.Client) -> None:
    v = client.volumes.create(unique("w"), cap="1MiB")
    w = v.files.watch("/")
    v.files.write("/x", "x")
    v.delete()
    events = take(w, 10)
    assert [e.kind for e in events] == ["create", "deleted"]
    assert events[-1].message and "deleted" in events[-1].message
    assert list(w) == [], "the watch is over"


def test_watch_of_a_missing_volume_or_without_reconnect(client: volumefs.Client, server: Server, vol: Volume, proxy: Proxy) -> None:
    import pytest

    with pytest.raises(volumefs.NotFound):
        client.volume(unique("none")).files.watch("/")
    with pytest.raises(volumefs.InvalidArgument):
        vol.files.watch("/", after="x-notanumber")
    with volumefs.Client(proxy.url, server.token) as c:
        w = c.volume(vol.name).files.watch("/", reconnect=False)
        proxy.cut()
        with pytest.raises(volumefs.Unavailable):
            take(w, 1)


def test_sse_parser() -> None:
    p = _core.SSEParser()
    lines = [
        ": keep-alive",
        "",
        "id: 7-1042",
        "event: create",
        'data: {"id":1042,"kind":"create","path":"/a","from":null,"node":"file","time":1.5}',
        "",
        "retry: 3000",
        "event: truncated",
        "data: {\"message\": \"rescan\"}",
        "",
        "data: line one",
        "data: line two",
        "",
    ]
    out = [r for r in (p.feed(line) for line in lines) if r]
    assert out[0] == ("7-1042", "create", '{"id":1042,"kind":"create","path":"/a","from":null,"node":"file","time":1.5}')
    ev = _core.sse_event(out[0])
    assert (ev.kind, ev.path, ev.from_path, ev.node, ev.time, ev.id, ev.change_id) == ("create", "/a", None, "file", 1.5, "7-1042", 1042)
    assert out[1] == (None, "truncated", '{"message": "rescan"}') and p.retry_ms == 3000
    assert out[2] == (None, "message", "line one\nline two")
    assert p.last_id == "7-1042"
    assert _core.is_internal_path("/w/.a.txt.volumefs-26c2a0fd9124")
    assert _core.is_internal_path("/.big.volumefs-up-0123abcd")
    assert not _core.is_internal_path("/w/a.txt") and not _core.is_internal_path(None)


def test_closing_from_another_thread_ends_a_blocked_iteration(vol: Volume) -> None:
    import time

    w = vol.files.watch("/")
    started = time.monotonic()
    assert take(w, 1, timeout=1.0) == []
    assert time.monotonic() - started < 5, "close() did not wait for the 15 s keep-alive"
