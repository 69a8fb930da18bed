"""Pixel-side configuration (tiling, tissue detection, synthetic slides), shared with pipeline.config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TissueConfig(_Strict):
    """Tissue detection at low resolution (Otsu on saturation, then morphology)."""

    detect_mpp: float = Field(8.0, gt=0, description="resolution (µm/px) the tissue mask is computed at")
    min_saturation: float = Field(0.05, ge=0, le=1, description="floor under the Otsu threshold")
    opening_radius: int = Field(2, ge=0)
    closing_radius: int = Field(4, ge=0)
    min_object_area_um2: float = Field(5000.0, ge=0)
    fill_holes: bool = True


class TilingConfig(_Strict):
    """How slides become tiles in a site's zarr store."""

    target_mpp: float = Field(0.5, gt=0, description="µm per pixel of the stored tiles")
    mpp_tolerance: float = Field(
        0.1, ge=0, lt=1, description="relative tolerance to accept a pyramid level as is"
    )
    default_mpp: float | None = Field(
        None,
        gt=0,
        description="last fallback when neither manifest, vendor property nor TIFF tags give a plausible MPP",
    )
    tile_size: int = Field(256, ge=16, le=4096)
    overlap: int = Field(0, ge=0)
    min_tissue_fraction: float = Field(0.25, ge=0, le=1)
    mask_classes: Literal[2, 3] = Field(
        2, description="2: 0/1 masks; 3: 0 background, 1 nucleus inside, 2 nucleus boundary (instance targets)"
    )
    tissue: TissueConfig = TissueConfig()
    workers: int = Field(
        1, ge=1, description="threads of the local dask cluster's one in-process worker (--scheduler: a real cluster)"
    )
    scheduler: str | None = Field(None, description="address of an existing dask scheduler")
    compressor: Literal["none", "lz4", "zstd"] = Field(
        "none",
        description="blosc codec of the image tiles: lossless codecs gain ~4% (lz4) to ~14% (zstd) on "
        "decoded H&E at a CPU cost close to or above the JPEG decode; masks are always lz4",
    )
    compressor_level: int = Field(1, ge=0, le=9)
    batch_tiles: int = Field(64, ge=1, description="tiles per dask task (one slide's tiles per task)")

    @model_validator(mode="after")
    def _overlap_lt_tile(self) -> TilingConfig:
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        return self


class SynthConfig(_Strict):
    """The synthetic H&E default (``fedpath synth``): sites, slides and their size."""

    sites: list[str] = Field(default_factory=lambda: ["a", "b", "c"])
    slides_per_site: int = Field(2, ge=1, description="train/val slides per site")
    val_slides: int = Field(0, ge=0, description="of slides_per_site, how many get split=val")
    held_out_slides: int = Field(1, ge=0, description="extra test slides per site")
    width: int = Field(4096, ge=256)
    height: int = Field(4096, ge=256)
    mpp: float = Field(0.5, gt=0)
    seed: int = Field(0, ge=0)
    tissue_fraction: float = Field(0.5, gt=0, le=0.9, description="share of the slide covered by tissue")
    jpeg_quality: int = Field(85, ge=50, le=100)
    workers: int = Field(1, ge=1, description="processes rendering tiles (output identical for any value)")

    @model_validator(mode="after")
    def _val_lt_slides(self) -> SynthConfig:
        if self.val_slides >= self.slides_per_site:
            raise ValueError(
                f"val_slides ({self.val_slides}) must be smaller than slides_per_site ({self.slides_per_site})"
            )
        return self
