"""Weights of the official DiT and SiT code as a dumo Flow Matching model (a single v-head).

The official networks (facebookresearch/DiT, willisma/SiT: the same ``models.py``) are dumo's DiT
with other parameter names and three differences in convention, all absorbed into the weights
and two model keys, so dumo's architecture is unchanged:

* Time features. Both embed the raw time they are given with 256 [cos, sin] features. DiT is
  given DDPM step indices 0..999, so ``model.time_embedding_scale: 1000`` (dumo time t is step
  index 1000 t); SiT is given t in [0, 1], so the scale is 1.
* Position table. Their 2-D sin-cos table encodes the column before the row:
  ``model.position_order: columns_first``.
* Time direction and sign (SiT only). SiT puts data at t = 1 and noise at t = 0 and predicts
  data - noise; dumo puts data at t = 0 and predicts noise - data. So dumo's t is 1 - t_SiT and
  v_dumo = -v_SiT. The sign goes into the v-head's last linear layer. The time reversal goes into
  the first layer of the time MLP: for each frequency, cos(a (1 - t)) and sin(a (1 - t)) are fixed
  linear combinations of cos(a t) and sin(a t), so the folded layer reads dumo's features of t and
  computes exactly what the original read from the features of 1 - t.

With ``learn_sigma`` the final layer also predicts a variance: only the first C channels (the mean
prediction) are kept. The label table's last row is the null class of classifier-free guidance,
as in dumo (class-dropout > 0 at training, true of every released checkpoint).

SiT's weights (linear path, velocity prediction) are an exact Flow Matching model; a SiT training
checkpoint whose recorded ``args`` name another path or prediction is refused. DiT's predict DDPM
noise (epsilon) on a variance-preserving path, not a velocity: mapped into the v-head they are only
a starting point for fine-tuning.

Writing the converted weights as a folder that samples on its own is :mod:`dumo.runs.importing`'s.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from dumo.errors import CheckpointError, ConfigError
from dumo.models import ModelConfig
from dumo.models.dit import DIT_SIZES, sincos_position_embedding

OfficialKind = Literal["dit", "sit"]
OFFICIAL_KINDS: tuple[str, ...] = ("dit", "sit")
# The raw time each network was trained on, per unit of dumo time: DDPM step indices 0..999 for
# DiT (dumo t <-> index 1000 t), SiT's own t in [0, 1] (reversed, see above) for SiT.
TIME_SCALES = {"dit": 1000.0, "sit": 1.0}
FREQUENCY_DIM = 256  # the official TimestepEmbedder's sinusoidal features
MLP_RATIO = 4.0
PATCH_SIZES = (1, 2, 4)  # dumo's DiT names; the official DiT-*/8 has no dumo counterpart
NOTES = {
    "dit": "DiT predicts DDPM noise (epsilon), not a velocity: 'dumo sample' runs on it but draws noise-like "
    "images; it is a starting point for fine-tuning (dumo t = DDPM step index / 1000)",
    "sit": "SiT's velocity maps exactly (t -> 1 - t, v -> -v): 'dumo sample' draws from it as it is",
}
#: what the v-head of the written model holds
WRITTEN = {
    "dit": "a dumo model whose v-head is DiT's noise (epsilon) predictor, not a velocity",
    "sit": "a Flow Matching model",
}
PREDICTIONS = {"dit": "epsilon", "sit": "velocity"}
# The only SiT a velocity v-head computes exactly: train.py's --path-type and --prediction.
SIT_VELOCITY_ARGS = {"path_type": "Linear", "prediction": "velocity"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ImportedModel:
    """A converted official checkpoint: dumo state dict (one v-head) and what it needs."""

    kind: str
    config: ModelConfig  # name and size overrides, time_embedding_scale, position_order
    state: dict[str, Tensor]  # dumo FlowModel keys (``backbone.*``, ``heads.v.*``), fp32
    data_shape: tuple[int, int, int]  # (C, H, W) of the data (latents) the network takes
    num_classes: int  # classes of the checkpoint; 0 when converted for an unconditional model
    learn_sigma: bool  # the original also predicted a variance (dropped)

    @property
    def written(self) -> str:
        """What the written model is, in words."""
        return WRITTEN[self.kind]

    def describe(self) -> str:
        shape = "x".join(map(str, self.data_shape))
        size = self.config.dit_size()
        classes = f", {self.num_classes} classes" if self.num_classes else ", unconditional"
        return f"{self.config.name}, width {size.hidden_dim}, depth {size.depth}, {shape} data{classes}"

    @property
    def note(self) -> str:
        return NOTES[self.kind]


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an official checkpoint file, without running any code stored in it (see
    :func:`read_official_checkpoint_and_args`)."""
    return read_official_checkpoint_and_args(path)[0]


def read_official_checkpoint_and_args(path: str | Path) -> tuple[dict[str, Tensor], dict[str, object] | None]:
    """The tensors of an official checkpoint file and the training ``args`` it records (None when it
    records none, as the released files), without running any code stored in it.

    ``.pt`` / ``.pth``: ``torch.load(weights_only=True)``, which refuses pickles that would call
    anything but tensor and container constructors. Released DiT/SiT files are a plain state dict;
    a training checkpoint of their train.py is a dict with "model", "ema", "opt" and "args" (an
    argparse.Namespace, allowed as a plain attribute bag): its "ema" weights are used, as the
    official sample.py does, else its "model" weights. ``.safetensors``: read as is (no args).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises several types for torn or foreign files
            raise CheckpointError(f"{path} is not a readable safetensors file: {one_line(error)}") from None
    elif suffix in (".pt", ".pth"):
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError for refused globals; others for foreign files
            raise CheckpointError(
                f"{path} is not a plain PyTorch state dict (torch.load with weights_only=True refused it: "
                f"{one_line(error)})"
            ) from None
    else:
        raise CheckpointError(f"{path}: an official checkpoint must be a .pt, .pth or .safetensors file")
    args = None
    if isinstance(loaded, Mapping):
        recorded = loaded.get("args")
        if isinstance(recorded, argparse.Namespace):
            args = dict(vars(recorded))
        elif isinstance(recorded, Mapping):
            args = dict(recorded)
        for entry in ("ema", "model"):
            if isinstance(loaded.get(entry), Mapping):
                loaded = loaded[entry]
                break
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(loaded), args


def check_training_args(kind: OfficialKind, args: Mapping[str, object] | None, source: str) -> None:
    """Refuse a training checkpoint whose recorded ``args`` say it is not what ``kind`` imports: a
    SiT checkpoint given as DiT (or the reverse), or a SiT trained on another path (GVP, VP) or to
    predict another quantity (score, noise), which a velocity v-head would silently misread."""
    if not args:
        return
    model = str(args.get("model", ""))
    trained_by = "sit" if model.startswith("SiT") or "path_type" in args else "dit" if model.startswith("DiT") else None
    if trained_by is not None and trained_by != kind:
        named = f"args.model {model}" if model else "its args name a SiT transport"
        raise CheckpointError(
            f"{source} was trained by the official {trained_by.upper()} code ({named}); import it as '{trained_by}'"
        )
    if kind != "sit":
        return
    for key, wanted in SIT_VELOCITY_ARGS.items():
        found = args.get(key, wanted)
        if found != wanted:
            raise CheckpointError(
                f"{source} is a SiT trained with {key} {found} (its args); dumo imports only Linear-path "
                "velocity-prediction SiT (path_type Linear, prediction velocity)"
            )


def one_line(error: BaseException) -> str:
    """The telling line of a (possibly long, coloured) exception message."""
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    return next((line for line in lines if "unsupported" in line.lower()), lines[0])


def fold_time_reversal(weight: Tensor, frequencies: Tensor, scale: float) -> Tensor:
    """The weight W' of a layer reading [cos(s f t), sin(s f t)] such that W' phi(t) = W phi(1 - t).

    With a = s f: cos(a (1 - t)) = cos a cos(a t) + sin a sin(a t) and
    sin(a (1 - t)) = sin a cos(a t) - cos a sin(a t), so W' = [Wc cos a + Ws sin a, Wc sin a - Ws cos a]
    for W = [Wc, Ws] (columns of the cos and sin features). Computed in fp64.
    """
    half = frequencies.numel()
    if weight.shape[-1] != 2 * half:
        raise ValueError(f"weight has {weight.shape[-1]} inputs; the features have {2 * half}")
    angles = scale * frequencies.double()
    cos, sin = torch.cos(angles), torch.sin(angles)
    w_cos, w_sin = weight.double()[:, :half], weight.double()[:, half:]
    folded = torch.cat([w_cos * cos + w_sin * sin, w_cos * sin - w_sin * cos], dim=1)
    return folded.to(weight.dtype)


class _Tensors:
    """Takes official tensors by name with shape checks; remembers which were used."""

    def __init__(self, state: Mapping[str, Tensor], source: str):
        self.state, self.source, self.used = state, source, set()

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if name not in self.state:
            raise CheckpointError(f"{self.source} is not an official DiT/SiT state dict: tensor {name} is missing")
        tensor = self.state[name]
        if shape is not None and tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.source}: tensor {name} has shape {tuple(tensor.shape)}; expected {shape}")
        self.used.add(name)
        return tensor.detach().float()

    def check_all_used(self) -> None:
        unexpected = sorted(set(self.state) - self.used)
        if unexpected:
            raise CheckpointError(
                f"{self.source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for an official "
                "DiT/SiT network"
            )


def convert_official(
    kind: OfficialKind,
    state: Mapping[str, Tensor],
    *,
    num_heads: int | None = None,
    conditional: bool = True,
    source: str = "checkpoint",
) -> ImportedModel:
    """An official DiT (``kind="dit"``) or SiT (``"sit"``) state dict as a dumo Flow Matching model.

    Width, depth, patch size, channels, input size, classes and learn_sigma come from the tensor
    shapes. The number of attention heads does not show in them: it is the standard size's for the
    widths 384 / 768 / 1024 / 1152 (S, B, L, XL), else ``num_heads`` must be given. With
    ``conditional=False`` the null-class embedding becomes part of the time MLP's last bias (the
    official network always adds a label embedding), so the unconditional dumo model computes the
    official one's output for the null class. Any mismatch is a :class:`CheckpointError` naming the
    first offending tensor.
    """
    if kind not in OFFICIAL_KINDS:
        raise ConfigError(f"the official checkpoint kind must be one of {', '.join(OFFICIAL_KINDS)}; got {kind!r}")
    tensors = _Tensors(state, source)
    patch_weight = tensors.take("x_embedder.proj.weight")
    if patch_weight.dim() != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise CheckpointError(
            f"{source}: tensor x_embedder.proj.weight has shape {tuple(patch_weight.shape)}; "
            "expected (width, channels, patch, patch)"
        )
    dim, channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    if patch not in PATCH_SIZES:
        raise CheckpointError(f"{source}: patch size {patch}; dumo's DiT has patch sizes 1, 2 and 4")
    if dim % 4:
        raise CheckpointError(f"{source}: width {dim} is not divisible by 4 (the 2-D sin-cos position table)")

    position = tensors.take("pos_embed")
    tokens = position.shape[1] if position.dim() == 3 else 0
    grid = math.isqrt(tokens)
    if position.dim() != 3 or position.shape[0] != 1 or position.shape[2] != dim or grid * grid != tokens:
        raise CheckpointError(
            f"{source}: tensor pos_embed has shape {tuple(position.shape)}; expected (1, grid * grid, {dim})"
        )
    # dumo recomputes the table rather than storing it: refuse a checkpoint whose table is not that
    if not torch.allclose(position[0], sincos_position_embedding(dim, grid, "columns_first"), atol=1e-4):
        raise CheckpointError(f"{source}: tensor pos_embed is not the fixed sin-cos table of the official code")

    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in state:
        depth += 1
    if depth == 0:
        tensors.take("blocks.0.attn.qkv.weight")  # names the missing tensor
    standard = next((letter for letter, size in DIT_SIZES.items() if size.hidden_dim == dim), None)
    if num_heads is None:
        if standard is None:
            raise CheckpointError(
                f"{source}: width {dim} is not a standard DiT size, so its number of attention heads is unknown; "
                "give it (--num-heads)"
            )
        num_heads = DIT_SIZES[standard].num_heads
    if num_heads < 1 or dim % num_heads:
        raise CheckpointError(f"{source}: width {dim} is not divisible by {num_heads} attention heads")

    out: dict[str, Tensor] = {
        "backbone.patch_embedding.weight": patch_weight,
        "backbone.patch_embedding.bias": tensors.take("x_embedder.proj.bias", (dim,)),
    }
    time_in = tensors.take("t_embedder.mlp.0.weight", (dim, FREQUENCY_DIM))
    if kind == "sit":
        from dumo.models.embeddings import TimestepEmbedding

        frequencies = TimestepEmbedding(1, FREQUENCY_DIM).frequencies()  # the exact fp32 ones dumo computes
        time_in = fold_time_reversal(time_in, frequencies, TIME_SCALES[kind])
    out["backbone.conditioning.time.mlp.0.weight"] = time_in
    out["backbone.conditioning.time.mlp.0.bias"] = tensors.take("t_embedder.mlp.0.bias", (dim,))
    out["backbone.conditioning.time.mlp.2.weight"] = tensors.take("t_embedder.mlp.2.weight", (dim, dim))
    time_out_bias = tensors.take("t_embedder.mlp.2.bias", (dim,))
    table = tensors.take("y_embedder.embedding_table.weight")
    if table.dim() != 2 or table.shape[1] != dim or table.shape[0] < 2:
        raise CheckpointError(
            f"{source}: tensor y_embedder.embedding_table.weight has shape {tuple(table.shape)}; "
            f"expected (classes + 1, {dim}) with the null class last"
        )
    num_classes = table.shape[0] - 1
    if conditional:
        out["backbone.conditioning.label.table.weight"] = table
    else:  # the official network adds the null-class row to every conditioning: a constant
        time_out_bias = time_out_bias + table[num_classes]
    out["backbone.conditioning.time.mlp.2.bias"] = time_out_bias

    hidden = int(dim * MLP_RATIO)
    for i in range(depth):
        official, mine = f"blocks.{i}.", f"backbone.blocks.{i}."
        for source_name, name, shape in (
            ("attn.qkv", "attn.qkv", (3 * dim, dim)),
            ("attn.proj", "attn.proj", (dim, dim)),
            ("mlp.fc1", "mlp.0", (hidden, dim)),
            ("mlp.fc2", "mlp.2", (dim, hidden)),
            ("adaLN_modulation.1", "modulation.1", (6 * dim, dim)),
        ):
            out[f"{mine}{name}.weight"] = tensors.take(f"{official}{source_name}.weight", shape)
            out[f"{mine}{name}.bias"] = tensors.take(f"{official}{source_name}.bias", shape[:1])

    out["heads.v.modulation.1.weight"] = tensors.take("final_layer.adaLN_modulation.1.weight", (2 * dim, dim))
    out["heads.v.modulation.1.bias"] = tensors.take("final_layer.adaLN_modulation.1.bias", (2 * dim,))
    final = tensors.take("final_layer.linear.weight")
    rows = patch * patch * channels
    if final.dim() != 2 or final.shape[1] != dim or final.shape[0] not in (rows, 2 * rows):
        raise CheckpointError(
            f"{source}: tensor final_layer.linear.weight has shape {tuple(final.shape)}; expected ({rows}, {dim}) "
            f"or, with learn_sigma, ({2 * rows}, {dim})"
        )
    learn_sigma = final.shape[0] == 2 * rows
    out_channels = final.shape[0] // (patch * patch)
    final_bias = tensors.take("final_layer.linear.bias", (final.shape[0],))
    # rows are (p, q, channel) flattened, channel fastest: keep channels [0, C), the mean prediction
    final = final.reshape(patch * patch, out_channels, dim)[:, :channels].reshape(rows, dim)
    final_bias = final_bias.reshape(patch * patch, out_channels)[:, :channels].reshape(rows)
    sign = -1.0 if kind == "sit" else 1.0  # SiT predicts data - noise; dumo's v is noise - data
    out["heads.v.linear.weight"] = sign * final
    out["heads.v.linear.bias"] = sign * final_bias
    tensors.check_all_used()

    letter = standard or "S"
    size = DIT_SIZES[letter]
    config = ModelConfig(
        name=f"DiT-{letter}/{patch}",
        hidden_dim=None if dim == size.hidden_dim else dim,
        depth=None if depth == size.depth else depth,
        num_heads=None if num_heads == size.num_heads else num_heads,
        time_embedding_scale=TIME_SCALES[kind],
        position_order="columns_first",
    )
    config.validate("model")
    resolution = grid * patch
    return ImportedModel(
        kind,
        config,
        {k: v.contiguous() for k, v in out.items()},
        (channels, resolution, resolution),
        num_classes if conditional else 0,
        learn_sigma,
    )


__all__ = [
    "OFFICIAL_KINDS",
    "TIME_SCALES",
    "ImportedModel",
    "convert_official",
    "fold_time_reversal",
    "check_training_args",
    "read_official_checkpoint",
    "read_official_checkpoint_and_args",
]
