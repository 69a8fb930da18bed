"""The wire format: state dicts as safetensors bytes, never pickle, and durable file writes.

Everything a site or the aggregator receives goes through :func:`read_header` first: the safetensors
header is parsed and checked (JSON size, dtypes, shapes, offsets that tile the data exactly) before any
tensor is materialised, so a malformed or hostile file is refused with a reason instead of reaching a
parser in an unknown state. Tensors are then read with ``safetensors`` only.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcore.hashing import sha256_file  # noqa: F401  (re-exported)
from fedcore.io import atomic_write_bytes, atomic_write_json, fsync_path  # noqa: F401  (re-exported)
from pipeline.errors import FedpathError

#: safetensors dtype codes and their size in bytes (the subset a fedpath model may contain).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_TORCH_TO_CODE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: the key of the update metadata inside a safetensors header
UPDATE_META_KEY = "fedpath_update"
MAX_HEADER_BYTES = 16 * 1024 * 1024


class WireError(FedpathError):
    """A payload that is not an acceptable safetensors state dict; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """Name-independent description of one tensor: safetensors dtype code and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensor specs (in file order), string metadata, byte layout."""

    specs: dict[str, TensorSpec]
    metadata: dict[str, str]
    header_len: int
    data_len: int


def dtype_code(t: torch.Tensor) -> str:
    try:
        return _TORCH_TO_CODE[t.dtype]
    except KeyError:
        raise WireError(f"tensor dtype {t.dtype}: not allowed on the wire") from None


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The tensor specs of an in-memory state dict (what an upload must match)."""
    return {k: TensorSpec(dtype_code(v), tuple(v.shape)) for k, v in state.items()}


def parse_header(prefix: bytes, total_len: int, what: str) -> Header:
    """Parse and check a safetensors header from the first bytes of a payload of ``total_len`` bytes.

    ``prefix`` must hold at least the 8-byte length and the JSON header. Checks: the header fits, is a
    JSON object of tensor entries with known dtypes and non-negative integer shapes, each entry's byte
    range matches dtype size times element count, and the ranges tile the data section exactly.
    """
    if total_len < 8 or len(prefix) < 8:
        raise WireError(f"{what}: malformed safetensors (shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > total_len:
        raise WireError(f"{what}: malformed safetensors (header length {n} does not fit {total_len} bytes)")
    if len(prefix) < 8 + n:
        raise WireError(f"{what}: header truncated")
    try:
        raw = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError(f"{what}: malformed safetensors (header is not UTF-8 JSON)") from None
    if not isinstance(raw, dict):
        raise WireError(f"{what}: malformed safetensors (header is not a JSON object)")
    meta_raw = raw.pop("__metadata__", {}) or {}
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise WireError(f"{what}: malformed safetensors (__metadata__ must map strings to strings)")
    data_len = total_len - 8 - n
    specs: dict[str, TensorSpec] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"{what}: tensor {name!r}: malformed header entry")
        dt, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dt not in DTYPE_SIZES:
            raise WireError(f"{what}: tensor {name!r}: dtype {dt!r} not allowed")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireError(f"{what}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise WireError(f"{what}: tensor {name!r}: data offsets {offs!r} outside the data section")
        if offs[1] - offs[0] != DTYPE_SIZES[dt] * math.prod(shape):
            raise WireError(f"{what}: tensor {name!r}: byte range does not match dtype {dt} x shape {shape}")
        specs[name] = TensorSpec(dt, tuple(shape))
        ranges.append((offs[0], offs[1], name))
    ranges.sort()
    pos = 0
    for begin, end, name in ranges:
        if begin != pos:
            raise WireError(f"{what}: tensor {name!r}: data section has gaps or overlaps")
        pos = end
    if pos != data_len:
        raise WireError(f"{what}: data section is {data_len} bytes but tensors cover {pos}")
    return Header(specs=specs, metadata=dict(meta_raw), header_len=n, data_len=data_len)


def read_header(path: Path, what: str | None = None) -> Header:
    """Validated header of a safetensors file on disk (reads only the header bytes).

    ``what`` names the file in error messages (default: its path); a server passes a neutral name so
    that a reason sent to a client never carries a server path.
    """
    what = what or str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise WireError(f"{what}: malformed safetensors (shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", first)
        rest = f.read(min(n, MAX_HEADER_BYTES)) if n <= MAX_HEADER_BYTES else b""
    return parse_header(first + rest, size, what)


def check_specs(got: Mapping[str, TensorSpec], want: Mapping[str, TensorSpec], what: str) -> None:
    """Raise a :class:`WireError` naming the first tensor whose name, shape or dtype differs."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing:
        raise WireError(f"{what}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise WireError(f"{what}: unexpected tensor {extra[0]!r} ({len(extra)} not in the global model)")
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape:
            raise WireError(
                f"{what}: tensor {k!r} has shape {list(g.shape)}, the global model's is {list(w.shape)}"
            )
        if g.dtype != w.dtype:
            raise WireError(f"{what}: tensor {k!r} has dtype {g.dtype}, the global model's is {w.dtype}")


def iter_tensors(
    path: Path, names: list[str] | None = None, what: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield a file's tensors one at a time (bounded memory: one tensor resident)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names if names is not None else list(f.keys()):
                yield name, f.get_tensor(name)
    except SafetensorError as exc:
        raise WireError(f"{what or path}: unreadable safetensors ({exc})") from None


def check_finite_and_norm(
    path: Path, names: list[str], what: str | None = None, max_abs: float | None = None
) -> float:
    """Check every float tensor is finite (and within ``max_abs``); return the global L2 norm over them.

    One float32 dot product per tensor does both jobs: a sum of squares is finite exactly when every
    value is (up to float32 overflow, which is reported as such), at a fraction of an elementwise check.
    """
    what = what or path.name
    sq = 0.0
    for name, t in iter_tensors(path, names, what):
        if not t.is_floating_point() or t.numel() == 0:
            continue
        flat = t.reshape(-1).to(torch.float32)
        s = float(torch.dot(flat, flat))
        if not math.isfinite(s):
            if bool(torch.isnan(flat).any()):
                raise WireError(f"{what}: tensor {name!r} contains NaN values")
            if bool(torch.isinf(flat).any()):
                raise WireError(f"{what}: tensor {name!r} contains Inf values")
            raise WireError(f"{what}: tensor {name!r}: values too large (squared norm overflows float32)")
        if max_abs is not None and float(flat.abs().max()) > max_abs:
            raise WireError(f"{what}: tensor {name!r}: a value exceeds the payload's bound {max_abs:g}")
        sq += s
    return math.sqrt(sq)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes in sorted order: two sides agree on a version bit for bit."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_state(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise a state dict to safetensors bytes (contiguous CPU tensors)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return st_save(clean, metadata=dict(metadata) if metadata else None)


def decode_state(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes received from elsewhere: header checked first, never unpickled."""
    header = parse_header(data[: 8 + MAX_HEADER_BYTES], len(data), what)
    try:
        state = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise WireError(f"{what}: unreadable safetensors ({exc})") from None
    return state, header.metadata


def update_metadata(
    *,
    site: str,
    round: int,
    n_tiles: int,
    epsilon: float | None,
    update_id: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The safetensors header metadata an uploaded update carries (site, round, tiles, ε, id)."""
    d: dict[str, Any] = {
        "site": site,
        "round": int(round),
        "n_tiles": int(n_tiles),
        "epsilon": None if epsilon is None else float(epsilon),
        "update_id": update_id,
    }
    d.update(extra or {})
    return {UPDATE_META_KEY: json.dumps(d, sort_keys=True)}


#: one fsync helper for files and directories (fedcore.io.fsync_path)
fsync_dir = fsync_path
fsync_file = fsync_path
