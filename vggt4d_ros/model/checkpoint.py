"""Load VGGT checkpoints strictly: local .safetensors / .pt / .pth files or a Hugging Face id.

``load_vggt("facebook/VGGT-1B")`` downloads ``model.pt`` through huggingface_hub (its cache and
progress bar). Pickled files are read with ``torch.load(weights_only=True)`` only; nothing is
ever unpickled beyond tensors and plain containers. Every failure is a ``CheckpointError``
(a ValueError) that says what is wrong and what to do.

Key matching is strict: missing keys, unexpected keys and shape mismatches are all reported
(``CheckpointError`` lists them). The only exception is the explicit allow-list
``skip_track_head=True``: the model is built without its track head and exactly the
checkpoint keys under ``track_head.`` are dropped (for users who never pass query points;
saves 66 M parameters). Nothing else is ever skipped.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from .config import VGGTConfig
from .vggt import VGGT

DEFAULT_HUB_ID = "facebook/VGGT-1B"
DEFAULT_HUB_FILE = "model.pt"
SKIPPABLE_PREFIXES = ("track_head.",)     # the ONLY keys skip_track_head may drop
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_DOWNLOAD_HINT = (f"Download '{DEFAULT_HUB_FILE}' of the Hugging Face model '{DEFAULT_HUB_ID}' "
                  f"(https://huggingface.co/{DEFAULT_HUB_ID}) on a machine with internet access "
                  "and pass its local path instead.")


class CheckpointError(ValueError):
    """A checkpoint could not be found, read or matched to the model."""


# ---------------------------------------------------------------------------- resolving
def resolve_checkpoint(source: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None,
                       local_files_only: bool = False, filename: str = DEFAULT_HUB_FILE) -> Path:
    """Local path of a checkpoint: ``source`` itself, or the Hugging Face download of
    ``filename`` from the repo id ``source`` (e.g. ``facebook/VGGT-1B``)."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            for name in ("model.safetensors", filename):
                if (path / name).is_file():
                    return path / name
            raise CheckpointError(f"checkpoint directory {path} holds neither model.safetensors "
                                  f"nor {filename}")
        return path
    text = str(source)
    if path.suffix.lower() in _PICKLE_SUFFIXES + (".safetensors",) or not _HUB_ID.match(text):
        raise CheckpointError(f"checkpoint file not found: {path}. {_DOWNLOAD_HINT}")
    return _download(text, filename, cache_dir, local_files_only)


def _download(repo_id: str, filename: str, cache_dir: Optional[Union[str, Path]],
              local_files_only: bool) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - dependency is pinned
        raise CheckpointError(f"huggingface_hub is not installed, cannot fetch {repo_id}. "
                              f"{_DOWNLOAD_HINT}") from exc
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # offline, DNS, HTTP 401/404, disk full, ...: one clear message
        raise CheckpointError(
            f"could not get '{filename}' of '{repo_id}' from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
            f"If this machine is offline: {_DOWNLOAD_HINT}") from exc


# ---------------------------------------------------------------------------- reading
def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors or pickled (.pt/.pth) checkpoint, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}. {_DOWNLOAD_HINT}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): interrupted download? "
                              "Delete it and download again.")
    if path.suffix.lower() == ".safetensors":
        sd = _read_safetensors(path)
    else:
        sd = _read_pickle(path)
    return _normalise_keys(sd, path)


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc}); "
                              "it is probably truncated or corrupt: download it again") from exc


def _read_pickle(path: Path) -> object:
    kwargs = dict(map_location="cpu", weights_only=True)
    try:
        # mmap keeps a 5 GB checkpoint out of RAM until the tensors are used.
        return torch.load(str(path), mmap=zipfile.is_zipfile(path), **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors; refusing to unpickle it "
            f"(only weights_only loading is allowed): {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # the unpickler raises many kinds on garbage input
        raise CheckpointError(f"checkpoint {path} cannot be read as a torch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]}); it is "
                              "probably truncated, corrupt or not a checkpoint: download it "
                              "again") from exc


def _normalise_keys(obj: object, path: Path) -> Dict[str, torch.Tensor]:
    """Unwrap {'model': sd} / {'state_dict': sd} and strip a DDP 'module.' prefix."""
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} is not a VGGT checkpoint (expected a mapping of parameter "
                              f"names to tensors, got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a VGGT checkpoint: entries that are not tensors: "
                              f"{bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ---------------------------------------------------------------------------- matching
def compare_keys(model_sd: Mapping[str, torch.Tensor], ckpt: Mapping[str, torch.Tensor]
                 ) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shape mismatches as 'key: ckpt [..] vs model [..]'), sorted."""
    missing = sorted(set(model_sd) - set(ckpt))
    unexpected = sorted(set(ckpt) - set(model_sd))
    shapes = sorted(f"{k}: checkpoint {list(ckpt[k].shape)} vs model {list(model_sd[k].shape)}"
                    for k in set(model_sd) & set(ckpt) if ckpt[k].shape != model_sd[k].shape)
    return missing, unexpected, shapes


def _report(missing: List[str], unexpected: List[str], shapes: List[str], source: str,
            limit: int = 20) -> str:
    parts = [f"checkpoint {source} does not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"  {len(items)} {title}: " + ", ".join(items[:limit]) + more)
    if shapes:
        parts.append("  Shape mismatches mean a different model size: pass the matching "
                     "config= (VGGTConfig.vggt_1b() for facebook/VGGT-1B).")
    if unexpected and all(k.startswith("track_head.") for k in unexpected):
        parts.append("  (only track_head.* is unexpected: the model was built without a track "
                     "head; use skip_track_head=True to drop those keys on purpose)")
    return "\n".join(parts)


def load_vggt(source: Union[str, Path] = DEFAULT_HUB_ID, config: Optional[VGGTConfig] = None,
              device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
              skip_track_head: bool = False, cache_dir: Optional[Union[str, Path]] = None,
              local_files_only: bool = False) -> VGGT:
    """Build VGGT and fill it from a checkpoint, strictly.

    source: local .safetensors (preferred) / .pt / .pth file, a directory holding one, or a
        Hugging Face repo id (default ``facebook/VGGT-1B``; downloads ``model.pt`` into the HF
        cache with a progress bar; ``local_files_only=True`` never touches the network).
    config: model sizes (default VGGT-1B). dtype: optional parameter dtype after loading
        (keep float32 and use ``autocast_dtype`` in forward for the official bf16 recipe).
    skip_track_head: build without the track head and drop exactly the ``track_head.*`` keys.
    Returns the model in eval mode on ``device``. Raises CheckpointError (a ValueError).
    """
    cfg = config or VGGTConfig.vggt_1b()
    path = resolve_checkpoint(source, cache_dir=cache_dir, local_files_only=local_files_only)
    sd = read_state_dict(path)
    if skip_track_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(SKIPPABLE_PREFIXES)}
    with torch.device("meta"):          # no random init of 1.2 B parameters
        model = VGGT(cfg, enable_track=not skip_track_head)
    if not skip_track_head and model.track_head is None:
        raise CheckpointError("the track head module is not available in this build; pass "
                              "skip_track_head=True")
    missing, unexpected, shapes = compare_keys(model.state_dict(), sd)
    if missing or unexpected or shapes:
        raise CheckpointError(_report(missing, unexpected, shapes, str(path)))
    float_sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                for k, v in sd.items()}
    model.load_state_dict(float_sd, strict=True, assign=True)
    model.aggregator.reset_normalization_buffers()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:  # pragma: no cover - guards against new non-persistent buffers
        raise CheckpointError(f"internal error: tensors left uninitialised: {leftover[:5]}")
    return model.to(device).eval()
