"""Reading a local diffusers pipeline folder: ``model_index.json`` and the subfolders it names.

Only local folders and ``.safetensors`` weights are read (nothing downloaded, no pickle). A missing
or foreign folder is refused with one line naming what is missing, before diffusers sees it
(diffusers would take a missing path for a hub name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dumo.bridge.families import Family, family_of
from dumo.errors import CheckpointError

#: components a flow-matching text-to-image pipeline needs besides its text encoders
REQUIRED_COMPONENTS = ("transformer", "vae", "scheduler")


@dataclass(frozen=True)
class PipelineFolder:
    """What ``model_index.json`` says: the pipeline class and each component's (library, class)."""

    path: Path
    pipeline_class: str
    components: dict[str, tuple[str, str]]

    @property
    def transformer_class(self) -> str:
        return self.components["transformer"][1]

    @property
    def text_encoders(self) -> list[str]:
        return sorted(name for name in self.components if name.startswith("text_encoder"))


def read_pipeline_folder(path: str | Path) -> PipelineFolder:
    """Check that ``path`` is a diffusers flow text-to-image pipeline folder and read its index."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no diffusers pipeline folder at {path}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path} has no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index_file} is not valid JSON ({error})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_file} does not hold a pipeline index (a JSON object)")
    components = {
        name: (str(entry[0]), str(entry[1]))
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
    }
    for name in REQUIRED_COMPONENTS:
        if name not in components:
            hint = " (a UNet pipeline? dumo drives transformer pipelines)" if name == "transformer" else ""
            raise CheckpointError(f"{index_file} names no {name}{hint}")
    if not any(name.startswith("text_encoder") for name in components):
        raise CheckpointError(f"{index_file} names no text encoder")
    for name in components:
        if not (path / name).is_dir():
            raise CheckpointError(f"{path} lacks the {name}/ folder that model_index.json names")
    folder = PipelineFolder(path, str(index.get("_class_name", "")), components)
    family_of(folder.transformer_class)  # refuse a transformer dumo cannot call, by name
    return folder


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Family]:
    """The pipeline's transformer, loaded by diffusers' own class, and its family."""
    folder = read_pipeline_folder(path)
    family = family_of(folder.transformer_class)
    subfolder = folder.path / "transformer"
    if not any(subfolder.glob("*.safetensors")):
        raise CheckpointError(f"{subfolder} has no .safetensors weights (dumo reads no pickled weights)")
    import diffusers

    transformer_class = getattr(diffusers, family.transformer_class)
    transformer = transformer_class.from_pretrained(
        subfolder, torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return transformer, family
