"""Manifests: the shipped ones verify against the data root; validation and checksum errors name the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wsi.annotations import load_annotation
from wsi.errors import AnnotationError, ChecksumMismatch, SlideOpenError
from wsi.make_manifest import assign_splits, build_manifest
from wsi.make_manifest import main as make_manifest_main
from wsi.manifest import (
    COLUMNS,
    ManifestError,
    ManifestRow,
    make_row,
    read_manifest,
    resolve_data_root,
    sha256_file,
    verify_row,
    write_manifest,
)
from wsi.readers import open_slide

SHIPPED = ["monuseg_breast_gi", "monuseg_kidney_bladder", "monuseg_lung_prostate", "gbm40", "slides"]
HEADER = ",".join(COLUMNS)
SHA = "a" * 64


def test_shipped_manifests_verify_against_data_root(repo_root: Path, data_root: Path) -> None:
    sums = {}
    for line in (data_root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.removeprefix("./")] = digest
    sites = {}
    for name in SHIPPED:
        rows = read_manifest(repo_root / "data_manifests" / f"{name}.csv")
        assert rows and len({r.site for r in rows}) == 1
        sites[rows[0].site] = rows
        for r in rows:
            slide, ann = verify_row(r, data_root)  # streams and hashes every file
            assert sums[r.path] == r.sha256
            if r.annotation_path:
                assert sums[r.annotation_path] == r.annotation_sha256
    assert set(sites) == {
        "monuseg_breast_gi",
        "monuseg_kidney_bladder",
        "monuseg_lung_prostate",
        "gbm40_emory",
        "real_slides",
    }
    monuseg = [r for s, rows in sites.items() if s.startswith("monuseg") for r in rows]
    assert len(monuseg) == 30 and len({r.slide_id for r in monuseg}) == 30
    for s in ("monuseg_breast_gi", "monuseg_kidney_bladder", "monuseg_lung_prostate"):
        splits = [r.split for r in sites[s]]
        assert splits.count("test") >= 2 and 1 <= splits.count("val") <= 2
        assert all(r.mpp == 0.2527 and r.annotation_path for r in sites[s])
    assert len(sites["gbm40_emory"]) == 40 and all(
        r.annotation_path.endswith("_contour.xml.gz") for r in sites["gbm40_emory"]
    )
    assert [r.split for r in sites["real_slides"]] == ["test", "test"]


def test_shipped_rows_open_and_annotations_parse(repo_root: Path, data_root: Path) -> None:
    """One row per manifest goes through the real reader and annotation loader."""
    for name in SHIPPED:
        row = read_manifest(repo_root / "data_manifests" / f"{name}.csv")[0]
        with open_slide(row.slide_path(data_root), mpp_override=row.mpp, default_mpp=0.5) as r:
            assert r.mpp_source == ("manifest" if row.mpp else r.mpp_source)
            if row.annotation_path:
                ann = load_annotation(row.annotation_file(data_root), slide_dimensions=r.dimensions)
                W, H = r.dimensions
                assert ann.rasterize(0, 0, W, H, 64, 64).any()


def test_round_trip_and_site_filter(tmp_path: Path) -> None:
    rows = [
        ManifestRow("a", "s1", "x/s1.tif", "x/s1.png", 0.25, "train", SHA, "b" * 64),
        ManifestRow("a", "s2", "x/s2.svs", None, None, "test", "c" * 64, None),
        ManifestRow("b", "s1", "y/s1.tif", None, 0.5, "val", "d" * 64, None),
    ]
    p = write_manifest(rows, tmp_path / "m.csv")
    assert p.read_text().splitlines()[0] == HEADER
    assert read_manifest(p) == rows
    assert read_manifest(p, site="b") == rows[2:]


def test_sha256_file_streams_and_caches(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 10_000
    p.write_bytes(data)
    assert sha256_file(p, chunk=4096) == hashlib.sha256(data).hexdigest()
    p.write_bytes(data + b"!")  # size changes: the cache must not answer
    assert sha256_file(p) == hashlib.sha256(data + b"!").hexdigest()


def test_checksum_mismatch_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "s.tif").write_bytes(b"slide bytes")
    (tmp_path / "a.png").write_bytes(b"mask bytes")
    good = make_row(tmp_path, "a", "s.tif", "a.png", split="test")
    assert verify_row(good, tmp_path) == (tmp_path / "s.tif", tmp_path / "a.png")
    (tmp_path / "s.tif").write_bytes(b"slide bytes, modified")
    with pytest.raises(ChecksumMismatch) as e:
        verify_row(good, tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 's.tif'}: sha256 mismatch") and "\n" not in str(e.value)
    good = make_row(tmp_path, "a", "s.tif", "a.png")
    (tmp_path / "a.png").write_bytes(b"other mask")
    with pytest.raises(ChecksumMismatch, match="a.png: sha256 mismatch"):
        verify_row(good, tmp_path)
    (tmp_path / "a.png").unlink()
    with pytest.raises(AnnotationError, match="a.png: no such file"):
        verify_row(good, tmp_path)
    with pytest.raises(SlideOpenError, match="s.tif: no such file"):
        verify_row(good, tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("site,slide_id,path,mpp,split,sha256,annotation_sha256\n", "missing column.*annotation_path"),
        (HEADER + ",extra\n", "unknown column.*extra"),
        (HEADER + f"\na,s1,p.tif,,,holdout,{SHA},\n", "row 2: split 'holdout'"),
        (HEADER + f"\na,s1,p.tif,,-1,train,{SHA},\n", "row 2: mpp must be a positive"),
        (HEADER + f"\na,s1,p.tif,,abc,train,{SHA},\n", "row 2: mpp 'abc' is not a number"),
        (HEADER + "\na,s1,p.tif,,,train,1234,\n", "row 2: sha256 '1234' is not 64 hex"),
        (HEADER + "\na,s1,p.tif,,,train,,\n", "row 2: empty sha256"),
        (
            HEADER + f"\na,s1,p.tif,m.png,,train,{SHA},\n",
            "row 2: annotation_path given without annotation_sha256",
        ),
        (
            HEADER + f"\na,s1,p.tif,,,train,{SHA},\na,s1,q.tif,,,test,{SHA},\n",
            "row 3: duplicate slide_id 's1'",
        ),
        (HEADER + f"\na,s 1,p.tif,,,train,{SHA},\n", "row 2: slide_id 's 1'"),
        (HEADER + f"\na,s1,p.tif,,,train,{SHA},,surplus\n", "row 2: more fields than columns"),
        ("", "empty manifest"),
    ],
)
def test_invalid_manifests_name_file_and_row(tmp_path: Path, body: str, reason: str) -> None:
    p = tmp_path / "site.csv"
    p.write_text(body)
    with pytest.raises(ManifestError, match=reason) as e:
        read_manifest(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_missing_manifest_and_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "nope.csv")
    monkeypatch.delenv("FEDPATH_DATA_ROOT", raising=False)
    with pytest.raises(ManifestError, match="data root: not given"):
        resolve_data_root(None)
    monkeypatch.setenv("FEDPATH_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    with pytest.raises(ManifestError, match="not a directory"):
        resolve_data_root(tmp_path / "missing")


def test_make_manifest_from_folder(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    for i in range(7):
        (tmp_path / "img" / f"t{i}.tif").write_bytes(f"slide {i}".encode())
        if i != 3:
            (tmp_path / "ann" / f"t{i}.xml.gz").write_bytes(f"ann {i}".encode())
    (tmp_path / "img" / "notes.txt").write_text("ignored")
    rows = build_manifest(
        tmp_path,
        "site1",
        "img",
        annotations_dir="ann",
        annotation_suffix=".xml.gz",
        n_test=2,
        n_val=1,
        mpp=0.5,
    )
    assert [r.slide_id for r in rows] == [f"t{i}" for i in range(7)]
    assert sorted(r.split for r in rows) == ["test", "test", "train", "train", "train", "train", "val"]
    assert rows[3].annotation_path is None and rows[0].annotation_path == "ann/t0.xml.gz"
    for r in rows:
        verify_row(r, tmp_path)
    # reproducible splits; the CLI writes a manifest that reads back identically
    assert assign_splits([r.slide_id for r in rows], 2, 1, 0) == {r.slide_id: r.split for r in rows}
    out = tmp_path / "m.csv"
    rc = make_manifest_main(
        ["--data-root", str(tmp_path), "--site", "site1", "--slides", "img", "--annotations", "ann",
         "--annotation-suffix", ".xml.gz", "--test", "2", "--val", "1", "--mpp", "0.5", "-o", str(out)]
    )  # fmt: skip
    assert rc == 0 and read_manifest(out) == rows
    assert (
        make_manifest_main(["--data-root", str(tmp_path), "--site", "s", "--slides", "nope", "-o", str(out)])
        == 2
    )
