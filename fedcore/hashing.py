"""The one sha256 helper for files (slides, masks, updates, checkpoints)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20, *, cache: bool = True) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks; cached per (path, size, mtime) in this process.

    ``cache=False`` for files an adversary may rewrite in place within the mtime granularity (uploads).
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if cache:
        with _sha_lock:
            hit = _sha_cache.get(key)
        if hit is not None:
            return hit
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if cache:
        with _sha_lock:
            _sha_cache[key] = digest
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
