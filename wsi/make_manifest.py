"""Build a site manifest from a folder of slides (and matching annotations), hashing every file.

Example (the MoNuSeg kidney/bladder site shipped in data_manifests/)::

    python -m wsi.make_manifest --data-root ../shared/data --site monuseg_kidney_bladder \\
        --slides monuseg-train/images --annotations monuseg-train/masks --annotation-suffix .png \\
        --ids TCGA-B0-5698-01Z-00-DX1,... --mpp 0.2527 --test 2 --val 1 --seed 0 \\
        -o data_manifests/monuseg_kidney_bladder.csv

Splits are drawn reproducibly: the sorted slide ids are shuffled with ``--seed``; the first ``--test`` go
to test, the next ``--val`` to val, the rest to train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from wsi.errors import WSIError
from wsi.manifest import ManifestRow, _stem, make_row, write_manifest

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".png", ".jpg", ".jpeg", ".bif", ".vms")


def assign_splits(ids: list[str], n_test: int, n_val: int, seed: int) -> dict[str, str]:
    """Reproducible split per slide id (see module docstring)."""
    if n_test + n_val > len(ids):
        raise WSIError(f"splits: {n_test} test + {n_val} val exceed the {len(ids)} slides")
    order = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    split = {}
    for rank, idx in enumerate(perm):
        split[order[idx]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return split


def build_manifest(
    data_root: Path,
    site: str,
    slides_dir: str,
    *,
    annotations_dir: str | None = None,
    annotation_suffix: str = ".png",
    ids: list[str] | None = None,
    mpp: float | None = None,
    n_test: int = 0,
    n_val: int = 0,
    seed: int = 0,
    split: str | None = None,
    id_prefix: str = "",
) -> list[ManifestRow]:
    """Rows for the slides in ``data_root/slides_dir`` (optionally only ``ids``), with annotations
    ``annotations_dir/<slide_id><annotation_suffix>`` when that file exists."""
    folder = data_root / slides_dir
    if not folder.is_dir():
        raise WSIError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    by_id = {_stem(p): p for p in files}
    if ids is not None:
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise WSIError(f"{folder}: no slide named {', '.join(unknown)}")
        by_id = {i: by_id[i] for i in ids}
    if not by_id:
        raise WSIError(f"{folder}: no slides found")
    splits = {i: split for i in by_id} if split else assign_splits(list(by_id), n_test, n_val, seed)
    rows = []
    for sid in sorted(by_id):
        ann = None
        if annotations_dir is not None:
            cand = data_root / annotations_dir / f"{sid}{annotation_suffix}"
            ann = cand if cand.is_file() else None
        rows.append(
            make_row(data_root, site, by_id[sid], ann, slide_id=id_prefix + sid, mpp=mpp, split=splits[sid])
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--site", required=True)
    ap.add_argument("--slides", required=True, help="folder of slides, relative to the data root")
    ap.add_argument("--annotations", help="folder of annotations, relative to the data root")
    ap.add_argument("--annotation-suffix", default=".png", help="annotation file = <slide_id><suffix>")
    ap.add_argument("--ids", help="comma-separated slide ids to include (default: all)")
    ap.add_argument("--mpp", type=float, help="MPP override written to every row")
    ap.add_argument("--test", type=int, default=0, help="number of test slides")
    ap.add_argument("--val", type=int, default=0, help="number of validation slides")
    ap.add_argument("--split", choices=["train", "val", "test"], help="put every slide in this split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--id-prefix", default="", help="prefix for slide ids (file stems), e.g. gbm40-")
    ap.add_argument("-o", "--output", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        rows = build_manifest(
            a.data_root,
            a.site,
            a.slides,
            annotations_dir=a.annotations,
            annotation_suffix=a.annotation_suffix,
            ids=[i.strip() for i in a.ids.split(",") if i.strip()] if a.ids else None,
            mpp=a.mpp,
            n_test=a.test,
            n_val=a.val,
            seed=a.seed,
            split=a.split,
            id_prefix=a.id_prefix,
        )
    except WSIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_manifest(rows, a.output)
    counts = {s: sum(r.split == s for r in rows) for s in ("train", "val", "test")}
    print(f"{a.output}: {len(rows)} slides for site {a.site} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
