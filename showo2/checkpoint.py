"""Reading weight files and loading them strictly.

Only two formats are ever deserialised: safetensors, and `torch.load(weights_only=True)` for the official
`.bin` / `.pth` pickles (which then cannot run code). Every failure is a `CheckpointError` whose message names
the file and the problem, never a bare KeyError or a shape error from deep inside torch.
"""

import json
import os
import pickle
import zipfile

import torch
from torch import nn


class CheckpointError(ValueError):
    """A weight file or folder is missing, unreadable, truncated, or does not fit the model."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read one weight file (`.safetensors`, or a torch pickle such as `.bin` / `.pth`) into CPU tensors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Weight file {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError (header/truncation) or OSError
            raise CheckpointError(f"Could not read safetensors file {path!r} (truncated or corrupt?): {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"Could not read weight file {path!r} (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Weight file {path!r} does not hold a flat state dict of tensors.")
    return state


def read_sharded_state_dict(index_path: str) -> dict[str, torch.Tensor]:
    """Read the shards listed by a `*.index.json` (`{"weight_map": {key: shard_file}}`) into one state dict."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"Could not read shard index {index_path!r}: {e}") from e
    folder = os.path.dirname(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_state = read_state_dict(os.path.join(folder, shard))
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = sorted(expected - shard_state.keys())
        if missing:
            raise CheckpointError(f"Shard {shard!r} lacks {len(missing)} keys its index lists, e.g. {missing[:3]}.")
        state.update(shard_state)
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`, refusing missing keys, unexpected keys and wrong shapes.

    Tensors are cast to each parameter's dtype (a bf16 release loads into an fp32 or bf16 model alike).
    `source` names the file(s) in error messages.
    """
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[:3]})")
    if problems:
        raise CheckpointError(f"Weights in {source} do not fit the model: " + "; ".join(problems) + ".")
    # assign=True keeps meta-initialised models cheap to build; the cast keeps the module's chosen dtype.
    module.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()}, strict=True, assign=True)
