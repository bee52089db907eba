"""Weights in other formats than our own run checkpoints (those are :mod:`src.checkpoints`)
-> our model, with strict key and shape checks.

Formats handled (each through exactly one mapping function):

* Meta DINOv2 ``.pth`` (``dinov2_vitb14_reg4_pretrain.pth``): ``cls_token``, ``pos_embed`` with
  the CLS entry (1 + M*M), ``register_tokens``, ``mask_token``, ``blocks.{i}.*``
  -> :func:`meta_dinov2_to_timm` (timm's own DINOv2 conversion, plus what it lacks).
* timm DINOv2 weights (``model.safetensors`` / ``pytorch_model.bin``): used as they are.
* The original AnomalyMoE state dict (``model_final.pth``; SPEC section 9), with or without a
  ``module.`` prefix -> :func:`original_to_ours`; :func:`ours_to_original` goes back.

Nothing is ever loaded with ``strict=False``: a missing, unexpected or mis-shaped key raises
:class:`CheckpointError` listing the keys.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import _convert_dinov2
from torch import Tensor, nn

ORIGINAL_GROUPS = ("patch_experts", "global_experts", "component_experts")


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into."""


def load_file(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, never code.

    A file that holds other objects (whose unpickling could run code) is refused, and so is a
    file that is not a complete PyTorch file; both raise :class:`CheckpointError` naming ``what``
    (e.g. ``ckpt_path``) and the file. ``mmap``: tensors stay in the file until used.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{what}={path} is not a complete PyTorch file ({path.stat().st_size} bytes): it is truncated (e.g. "
            "a crash while it was written), not a checkpoint, or in the legacy pre-1.6 format (re-save it with "
            "torch.save in a current PyTorch)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(
            f"refusing to load {what}={path}: it holds Python objects other than tensors and plain values, and "
            f"unpickling them could run code ({detail or 'unsupported object'}). Checkpoints written by this "
            "project never hold such objects; only load files you trust, and re-save them as a state dict of "
            "tensors (torch.save(model.state_dict(), path))"
        ) from None
    except (EOFError, OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {what}={path}: {type(err).__name__}: {err}; the file is damaged "
                              "or not a PyTorch checkpoint") from None


def read_state_file(path: Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            obj = load_safetensors(str(path))
        except Exception as err:
            raise CheckpointError(f"could not read {what}={path}: {type(err).__name__}: {err}") from err
    else:
        obj = load_file(path, what)
    return state_dict_of(obj, path, what)


def state_dict_of(obj: Any, path: Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside a loaded file (Lightning's ``state_dict``, some scripts' ``model``)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{what}={path} does not hold a state dict of tensors")
    return dict(obj)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that has it (DDP's ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def check_and_load(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` after checking key sets and shapes; raise otherwise."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"  {title} keys: {shown}")
        parts.append("Check the architecture settings (model.backbone.*, expert counts, embed dim).")
        raise CheckpointError("\n".join(parts))
    # Values are cast to the module's dtype (e.g. fp16 checkpoints into fp32 models).
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)


# --------------------------------------------------------------------------- DINOv2 formats
def is_meta_dinov2(state_dict: Mapping[str, Tensor]) -> bool:
    return "register_tokens" in state_dict or "mask_token" in state_dict


def meta_dinov2_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Meta DINOv2 (registers) keys -> timm ``no_embed_class`` keys (SPEC 2.7), by timm's own conversion.

    timm's ``_convert_dinov2`` (what its ``checkpoint_filter_fn`` runs on Meta checkpoints) drops the
    unused ``mask_token``, renames ``register_tokens``, folds the CLS entry of the position table into
    ``cls_token`` (timm adds no position to prefix tokens) and renames SwiGLU layers. Its
    ``checkpoint_filter_fn`` is not called: it would silently resample a position table or patch
    embedding of another size, which the strict checks of :func:`check_and_load` report instead.
    Added here: Meta's chunked ``blocks.c.i.`` keys are flattened, and the CLS fold is summed in fp32
    (an fp16 checkpoint would otherwise round the folded CLS token).
    """
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state_dict.items()}
    for key in ("cls_token", "pos_embed"):
        if key in state:
            state[key] = state[key].float()
    return _convert_dinov2(state, None)  # pops from the dict it is given: ``state`` is our copy


def timm_to_meta_dinov2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`meta_dinov2_to_timm` up to where the CLS position lives.

    The CLS position is kept inside ``cls_token`` and a zero CLS entry is written in
    ``pos_embed``; the Meta code adds them, so tokens are unchanged.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif key == "pos_embed":
            out["pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        else:
            out[key] = value
    out["mask_token"] = torch.zeros(1, state_dict["cls_token"].shape[-1], dtype=state_dict["cls_token"].dtype)
    return out


def load_backbone_file(vit: nn.Module, path: Path) -> None:
    """Load DINOv2 weights from a Meta ``.pth``, a timm file or a full AnomalyMoE checkpoint."""
    state = strip_prefix(read_state_file(path, "model.backbone.weights"), "module.")
    if any(k.startswith("encoder.") for k in state):  # a whole AnomalyMoE checkpoint
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        state = strip_prefix(state, "vit.")
    if is_meta_dinov2(state):
        state = meta_dinov2_to_timm(state)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_and_load(vit, state, f"backbone checkpoint {path}")


# --------------------------------------------------------------------------- AnomalyMoE formats
def count_experts(state_dict: Mapping[str, Tensor], group: str) -> int:
    idx = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{group}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def original_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original AnomalyMoE key names (SPEC 9) -> our key names (timm encoder under ``encoder.vit.``)."""
    state = strip_prefix(state_dict, "module.")
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    out = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    if encoder:
        out.update({f"encoder.vit.{k}": v for k, v in meta_dinov2_to_timm(encoder).items()})
    return out


def ours_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the original's key names, loadable by the original code."""
    encoder = {k[len("encoder.vit."):]: v for k, v in state_dict.items() if k.startswith("encoder.vit.")}
    out = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    out.update({f"encoder.{k}": v for k, v in timm_to_meta_dinov2(encoder).items()})
    return out


# The original's MIEstimator (not in its released checkpoints) -> our CLUBEstimator.
_CLUB_PREFIXES = {"normalizer.": "norm.", "patch_estimator.": "nets.patch.", "global_estimator.": "nets.global."}


def original_club_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The original ``MIEstimator``'s keys (``normalizer``, ``patch_estimator``, ``global_estimator``)
    -> :class:`src.losses.CLUBEstimator`'s; load the result with :func:`check_and_load`."""
    out = {}
    for key, value in strip_prefix(state_dict, "module.").items():
        prefix = next((p for p in _CLUB_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"{key!r} is not a key of the original's CLUB estimator "
                                  f"(expected one under {sorted(_CLUB_PREFIXES)})")
        out[_CLUB_PREFIXES[prefix] + key[len(prefix):]] = value
    return out


def check_expert_counts(state_dict: Mapping[str, Tensor], counts: Mapping[str, int], source: str) -> None:
    """Expert counts are not stored in the checkpoint; a wrong split would load silently (SPEC 9)."""
    problems = []
    for group, expected in counts.items():
        found = count_experts(state_dict, group)
        if found != expected:
            field = {"patch_experts": "num_patch_experts", "global_experts": "num_global_experts",
                     "component_experts": "num_component_experts"}[group]
            problems.append(f"{source} has {found} {group} but model.{field}={expected}; set model.{field}={found}")
    if problems:
        raise CheckpointError("\n".join(problems))
