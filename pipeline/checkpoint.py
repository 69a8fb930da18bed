"""Model files: safetensors weights plus the metadata needed to rebuild and apply the model.

The metadata lives in the safetensors header (string to string), so one file is self-describing and is
never unpickled: the model config, the tile size and MPP it was trained at, and where it came from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from fedcore.io import atomic_write_bytes, fsync_path  # noqa: F401  (fsync_path re-exported for callers)
from pipeline.config import ModelConfig
from pipeline.errors import FedpathError


@dataclass
class ModelMeta:
    """What a consumer of a model file needs besides the weights."""

    model: ModelConfig
    tile_size: int
    target_mpp: float
    source: str = "local"  # local | global | pretrained | personal
    round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_header(self) -> dict[str, str]:
        d = asdict(self)
        d["model"] = self.model.model_dump()
        return {"fedpath": json.dumps(d)}

    @classmethod
    def from_header(cls, header: dict[str, str] | None, path: Path | str) -> ModelMeta:
        if not header or "fedpath" not in header:
            raise FedpathError(f"{path}: not a fedpath model file (no 'fedpath' metadata in the safetensors header)")
        d = json.loads(header["fedpath"])
        d["model"] = ModelConfig.model_validate(d["model"])
        return cls(**d)


def state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop Opacus' ``_module.`` prefix so a private model's weights load into a plain one."""
    return {k.removeprefix("_module."): v for k, v in state.items()}


def save_model(path: Path | str, state: dict[str, torch.Tensor], meta: ModelMeta) -> Path:
    """Write weights and metadata atomically and durably: tmp file, fsync, rename, fsync the directory.

    Without both fsyncs a power loss after the rename can leave an empty or truncated file under the
    final name (the aggregator then publishes a global model that is not on disk).
    """
    data = st_save(state_to_cpu(strip_wrappers(state)), metadata=meta.to_header())
    return atomic_write_bytes(path, data)


def read_model_file(path: Path | str) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    path = Path(path)
    if not path.is_file():
        raise FedpathError(f"{path}: model file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FedpathError(f"{path}: not a readable safetensors file ({exc})") from None
    return state, ModelMeta.from_header(header, path)


def load_model(path: Path | str) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the network from the file's metadata and load its weights (strict)."""
    from pipeline.models import build_model

    state, meta = read_model_file(path)
    net = build_model(meta.model)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise FedpathError(f"{path}: weights do not fit the model in its metadata ({first})") from None
    return net, meta
