"""The dashboard's memory of recent frames: the list ``/api/frames`` shows (:class:`RecentFrames`,
each frame named by a key) and the rebuilt pictures of those whose sender asked for one
(:class:`PreviewStore`, served at :data:`PREVIEW_PATH`). Both are bounded, whatever clients send.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any

from palettelink.errors import PaletteLinkError

RECENT_FRAMES = 200  # entries of the recent-frames list
PREVIEW_FRAMES = 32  # the preview store's default bounds: pictures …
PREVIEW_BYTES = 16 << 20  # … and bytes (a 1080p JPEG at quality 85 is ~0.2-0.4 MB)
PREVIEW_PATH = "/api/frames/{key}/preview.jpg"  # where the HTTP app serves a stored preview


class PreviewGone(PaletteLinkError):
    """No stored preview for that frame: none was asked for, or the store's bound evicted it."""

    code = "NOT_FOUND"


class PreviewStore:
    """The rebuilt pictures (JPEG) of recent frames whose sender asked for one, for the dashboard.

    Frames are named by the key of the recent-frames list. Bounded twice, oldest out first: at most
    ``max_items`` pictures and ``max_bytes`` bytes (a picture larger than that is not kept). The
    newest picture of each open stream (its ``owner``) goes last, so the live view can still fetch the
    frame an event just named while other streams push faster than it polls. Thread-safe."""

    def __init__(self, max_items: int = PREVIEW_FRAMES, max_bytes: int = PREVIEW_BYTES) -> None:
        self.max_items = max(0, int(max_items))
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._newest: dict[Hashable, int] = {}  # owner (a stream) → key of its newest picture
        self._bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def n_bytes(self) -> int:
        return self._bytes

    def put(self, key: int, jpeg: bytes, owner: Hashable | None = None) -> bool:
        """Keep ``jpeg`` as frame ``key``'s picture, evicting the oldest over the bounds; True if kept."""
        if not jpeg or len(jpeg) > self.max_bytes or self.max_items == 0:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(jpeg) - (len(old) if old is not None else 0)
            self._items[key] = bytes(jpeg)
            if owner is not None:
                self._newest[owner] = key
            self._evict()
            return key in self._items

    def _evict(self) -> None:
        def over() -> bool:
            return len(self._items) > self.max_items or self._bytes > self.max_bytes

        newest = set(self._newest.values())
        for spare_newest in (True, False):  # a stream's newest only when the rest cannot make room
            for k in list(self._items):
                if not over():
                    return
                if spare_newest and k in newest:
                    continue
                self._bytes -= len(self._items.pop(k))
                self.evicted += 1

    def get(self, key: int) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def release(self, owner: Hashable) -> None:
        """``owner`` (a stream) closed: its newest picture ages like any other from now on."""
        with self._lock:
            self._newest.pop(owner, None)



class RecentFrames:
    """The recent frames (successes and errors) as the dashboard's JSON, oldest out first, and the
    pictures of those that asked for one. :meth:`next_key` names a frame in both. Thread-safe."""

    def __init__(self, max_frames: int = RECENT_FRAMES, preview_frames: int = PREVIEW_FRAMES,
                 preview_bytes: int = PREVIEW_BYTES) -> None:
        self.previews = PreviewStore(preview_frames, preview_bytes)
        self._lock = threading.Lock()
        self._items: deque[dict[str, Any]] = deque(maxlen=max_frames)
        self._keys = itertools.count(1)

    def next_key(self) -> int:
        return next(self._keys)

    def remember(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self._items.append(summary)

    def newest(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, each saying whether its preview is still stored (``preview``, ``preview_url``)."""
        with self._lock:
            items = list(self._items)
        return [self.with_preview(f) for f in items[::-1][: max(0, limit)]]

    def with_preview(self, frame: dict[str, Any] | None) -> dict[str, Any] | None:
        """A copy of a frame's JSON (a recent-frames entry, a stream's last frame) with ``preview``:
        whether the store still holds its picture, and then ``preview_url``, where it is served."""
        if frame is None:
            return None
        key = frame.get("key")
        out = {k: v for k, v in frame.items() if k not in ("preview", "preview_url")}
        out["preview"] = key is not None and key in self.previews
        if out["preview"]:
            out["preview_url"] = PREVIEW_PATH.format(key=key)
        return out

    def preview(self, key: int) -> bytes:
        """The stored preview JPEG of frame ``key``, else :class:`PreviewGone` (HTTP 404)."""
        jpeg = self.previews.get(key)
        if jpeg is None:
            raise PreviewGone(f"no preview of frame {key}: none was asked for (want_preview) or the "
                              f"store (the newest {self.previews.max_items} pictures, "
                              f"{self.previews.max_bytes >> 20} MiB) no longer holds it")
        return jpeg
