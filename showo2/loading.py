"""Loading an official-layout Show-o2 checkpoint folder (local, or `s3://` fetched once into a cache).

Folder layout (showlab/show-o2-*): `config.json` (Show-o2 `__init__` arguments) and the weights in one of
`model.safetensors`, `pytorch_model.safetensors` (the official code's own name), `pytorch_model.bin`, or a sharded
set with its index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`, or
`diffusion_pytorch_model.bin.index.json` as the official save_pretrained writes it). Loading is strict, unlike
upstream's sharded path which silently leaves missing weights uninitialised.
"""

import os

import torch

from showo2.checkpoint import CheckpointError, load_strict, read_sharded_state_dict, read_state_dict
from showo2.config import Showo2Config
from showo2.modeling import Showo2

# Checked in this order; the first one present is used.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.safetensors",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
VAE_FILE = "Wan2.1_VAE.pth"


def local_folder(path: str) -> str:
    """A local folder for `path`: itself, or the cache copy of an `s3://` prefix."""
    if path.startswith("s3://"):
        from showo2.remote import fetch_prefix

        return fetch_prefix(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint folder {path!r} does not exist.")
    return path


def read_model_weights(folder: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, file name used) of the Show-o2 weights in `folder`."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            state = read_sharded_state_dict(path) if name.endswith(".index.json") else read_state_dict(path)
            return state, path
    raise CheckpointError(f"No Show-o2 weights in {folder!r}: expected one of {list(WEIGHT_FILES)}.")


def load_showo2(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Showo2:
    """Build Show-o2 from a checkpoint folder (or s3:// prefix) and load its weights strictly, in eval mode."""
    folder = local_folder(path)
    try:
        config = Showo2Config.from_pretrained(folder)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = Showo2(config).to(dtype)
    state, source = read_model_weights(folder)
    tied = config.llm.get("tie_word_embeddings", False)
    if tied:
        # A tied head may be stored once (safetensors dedupes shared tensors) or twice (torch.save keeps both).
        if "showo.lm_head.weight" not in state and "showo.model.embed_tokens.weight" in state:
            state["showo.lm_head.weight"] = state["showo.model.embed_tokens.weight"]
    load_strict(model, state, source)
    if tied:
        model.showo.lm_head.weight = model.showo.model.embed_tokens.weight
    model.init_buffers(device)  # the non-persistent buffers are still meta tensors
    model.to(device)
    return model.eval().requires_grad_(False)
