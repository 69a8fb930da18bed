"""Per-site manifests: which slides (and annotations) belong to a site, with checksums.

CSV header (exactly): ``site,slide_id,path,annotation_path,mpp,split,sha256,annotation_sha256``. Paths are
relative to a data root (``--data-root``, config ``data_root`` or ``FEDPATH_DATA_ROOT``); ``mpp`` empty
means no override; ``split`` is train, val or test; checksums are lowercase hex sha256 of the files. A
file whose checksum differs is never used silently: :func:`verify_row` raises ``ChecksumMismatch``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedcore.hashing import sha256_file
from wsi.errors import AnnotationError, ChecksumMismatch, SlideOpenError, WSIError

COLUMNS: tuple[str, ...] = (
    "site",
    "slide_id",
    "path",
    "annotation_path",
    "mpp",
    "split",
    "sha256",
    "annotation_sha256",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ManifestError(WSIError):
    """A manifest that cannot be read or has an invalid row."""


@dataclass(frozen=True)
class ManifestRow:
    """One slide of a site (paths relative to the data root)."""

    site: str
    slide_id: str
    path: str
    annotation_path: str | None = None
    mpp: float | None = None
    split: str = "train"
    sha256: str = ""
    annotation_sha256: str | None = None

    def slide_path(self, data_root: str | os.PathLike[str]) -> Path:
        return resolve_path(data_root, self.path)

    def annotation_file(self, data_root: str | os.PathLike[str]) -> Path | None:
        return resolve_path(data_root, self.annotation_path) if self.annotation_path else None


def resolve_path(data_root: str | os.PathLike[str], rel: str) -> Path:
    """``rel`` under ``data_root`` (absolute paths are kept as they are)."""
    p = Path(rel)
    return p if p.is_absolute() else Path(data_root) / p


def resolve_data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``explicit`` (``--data-root``/config), else ``FEDPATH_DATA_ROOT``."""
    if explicit is not None:
        root = Path(explicit)
    elif os.environ.get("FEDPATH_DATA_ROOT"):
        root = Path(os.environ["FEDPATH_DATA_ROOT"])
    else:
        raise ManifestError(
            "data root: not given; pass --data-root, set data_root in the config or FEDPATH_DATA_ROOT"
        )
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a directory")
    return root


# ------------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------
# Reading and validation
# ------------------------------------------------------------------------------------------------------
def _parse_row(path: Path, lineno: int, raw: dict[str, str]) -> ManifestRow:
    where = f"{path}: row {lineno}"

    def req(col: str) -> str:
        v = (raw.get(col) or "").strip()
        if not v:
            raise ManifestError(f"{where}: empty {col}")
        return v

    site, slide_id = req("site"), req("slide_id")
    for col, v in (("site", site), ("slide_id", slide_id)):
        if not _ID_RE.match(v):
            raise ManifestError(f"{where}: {col} {v!r} must be letters, digits, '.', '_' or '-'")
    rel = req("path")
    ann = (raw.get("annotation_path") or "").strip() or None
    mpp_s = (raw.get("mpp") or "").strip()
    mpp: float | None = None
    if mpp_s:
        try:
            mpp = float(mpp_s)
        except ValueError:
            raise ManifestError(f"{where}: mpp {mpp_s!r} is not a number") from None
        if not (math.isfinite(mpp) and mpp > 0):
            raise ManifestError(f"{where}: mpp must be a positive number, got {mpp_s!r}")
    split = req("split").lower()
    if split not in SPLITS:
        raise ManifestError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    sha = req("sha256").lower()
    if not _SHA_RE.match(sha):
        raise ManifestError(f"{where}: sha256 {sha!r} is not 64 hex digits")
    asha = (raw.get("annotation_sha256") or "").strip().lower() or None
    if ann and not asha:
        raise ManifestError(f"{where}: annotation_path given without annotation_sha256")
    if asha and not ann:
        raise ManifestError(f"{where}: annotation_sha256 given without annotation_path")
    if asha and not _SHA_RE.match(asha):
        raise ManifestError(f"{where}: annotation_sha256 {asha!r} is not 64 hex digits")
    return ManifestRow(site, slide_id, rel, ann, mpp, split, sha, asha)


def read_manifest(path: str | os.PathLike[str], site: str | None = None) -> list[ManifestRow]:
    """Parse and validate a manifest CSV (optionally only the rows of ``site``).

    Errors name the file and row: unknown/missing columns, empty fields, bad split/mpp/sha256, and a
    slide id that appears twice for one site.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: cannot read manifest: {e}") from e
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ManifestError(f"{p}: empty manifest (expected header {','.join(COLUMNS)})")
    reader = csv.DictReader(lines)
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        raise ManifestError(f"{p}: {'; '.join(parts)} (expected {','.join(COLUMNS)})")
    reader.fieldnames = header
    rows: list[ManifestRow] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(reader, start=2):
        if None in raw:
            raise ManifestError(f"{p}: row {i}: more fields than columns")
        row = _parse_row(p, i, raw)
        if (row.site, row.slide_id) in seen:
            raise ManifestError(f"{p}: row {i}: duplicate slide_id {row.slide_id!r} for site {row.site!r}")
        seen.add((row.site, row.slide_id))
        if site is None or row.site == site:
            rows.append(row)
    return rows


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike[str]) -> Path:
    """Write rows as a manifest CSV (header in :data:`COLUMNS` order); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    names = [f.name for f in fields(ManifestRow)]
    assert tuple(names) == COLUMNS
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            d = asdict(r)
            w.writerow(["" if d[c] is None else (f"{d[c]:g}" if c == "mpp" else d[c]) for c in COLUMNS])
    os.replace(tmp, p)
    return p


def verify_row(row: ManifestRow, data_root: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """Check that the slide (and annotation) exist and match their sha256; return their paths.

    Missing slide: ``SlideOpenError``; missing annotation: ``AnnotationError``; checksum differs:
    ``ChecksumMismatch`` naming the file, both digests and the manifest row's slide.
    """
    slide = row.slide_path(data_root)
    if not slide.is_file():
        raise SlideOpenError(f"{slide}: no such file (site {row.site}, slide {row.slide_id})")
    got = sha256_file(slide)
    if got != row.sha256:
        raise ChecksumMismatch(
            f"{slide}: sha256 mismatch (manifest {row.sha256[:12]}..., file {got[:12]}...) "
            f"for site {row.site} slide {row.slide_id}"
        )
    ann = row.annotation_file(data_root)
    if ann is not None:
        if not ann.is_file():
            raise AnnotationError(f"{ann}: no such file (site {row.site}, slide {row.slide_id})")
        got = sha256_file(ann)
        if got != row.annotation_sha256:
            raise ChecksumMismatch(
                f"{ann}: sha256 mismatch (manifest {str(row.annotation_sha256)[:12]}..., file {got[:12]}...) "
                f"for site {row.site} slide {row.slide_id} annotation"
            )
    return slide, ann


def make_row(
    data_root: str | os.PathLike[str],
    site: str,
    slide_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str] | None = None,
    *,
    slide_id: str | None = None,
    mpp: float | None = None,
    split: str = "train",
) -> ManifestRow:
    """A row for files under ``data_root`` (given absolute or relative to it), hashing them now."""
    root = Path(data_root)

    def rel(p: str | os.PathLike[str]) -> tuple[str, Path]:
        q = Path(p)
        full = q if q.is_absolute() else root / q
        try:
            return full.relative_to(root).as_posix(), full
        except ValueError:
            return full.as_posix(), full  # outside the root: kept absolute

    rp, full = rel(slide_path)
    ap, afull = rel(annotation_path) if annotation_path is not None else (None, None)
    sid = slide_id or _stem(full)
    return ManifestRow(
        site=site,
        slide_id=sid,
        path=rp,
        annotation_path=ap,
        mpp=mpp,
        split=split,
        sha256=sha256_file(full),
        annotation_sha256=sha256_file(afull) if afull is not None else None,
    )


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".ome.tiff", ".ome.tif", ".xml.gz", ".geojson.gz"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def subset_manifest(src: Path, dst: Path, per_split: dict[str, int]) -> Path:
    """Write the first ``per_split[split]`` rows of each split of manifest ``src`` to ``dst`` (same files,
    same checksums): a small, valid site for tests and smoke benchmarks."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    keep, seen = [], dict.fromkeys(per_split, 0)
    for r in rows:
        if r["split"] in per_split and seen[r["split"]] < per_split[r["split"]]:
            keep.append(r)
            seen[r["split"]] += 1
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return dst
