"""Loading an official-layout Show-o2 checkpoint folder (a local folder; `s3://` prefixes are fetched into a local
cache by flashu_batch/jobs/fetch.py, outside the model package).

Folder layout (showlab/show-o2-*): `config.json` (Show-o2 `__init__` arguments) and the weights in one of
`model.safetensors`, `pytorch_model.safetensors` (the official code's own name), `pytorch_model.bin`, or a sharded
set with its index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`, or
`diffusion_pytorch_model.bin.index.json` as the official save_pretrained writes it). Loading is strict, unlike
upstream's sharded path which silently leaves missing weights uninitialised.
"""

import dataclasses
import os

import torch

from flashu_batch.showo2.checkpoint import CheckpointError, load_strict, read_sharded_state_dict, read_state_dict
from flashu_batch.showo2.config import Showo2Config
from flashu_batch.showo2.modeling import Showo2

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
    """`path` itself, once it is known to be a folder."""
    if "://" in path:
        raise CheckpointError(f"Checkpoint {path!r} is not a local folder; fetch it first "
                              f"(flashu_batch.jobs.fetch.model_folder takes s3:// prefixes).")
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint folder {path!r} does not exist.")
    return path


def weight_files(folder: str) -> list[str]:
    """The files holding the Show-o2 weights in `folder`: one file, or an index and the shards it lists."""
    import json

    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"Could not read shard index {path!r}: {e}") from e
        return [path] + [os.path.join(folder, shard) for shard in shards]
    raise CheckpointError(f"No Show-o2 weights in {folder!r}: expected one of {list(WEIGHT_FILES)}.")


def read_model_weights(folder: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, file name used) of the Show-o2 weights in `folder`."""
    path = weight_files(folder)[0]
    state = read_sharded_state_dict(path) if path.endswith(".index.json") else read_state_dict(path)
    return state, path


def load_showo2(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Showo2:
    """Build Show-o2 from a local checkpoint folder and load its weights strictly, in eval mode."""
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
        head, embed = state.get("showo.lm_head.weight"), state.get("showo.model.embed_tokens.weight")
        if head is None and embed is not None:
            state["showo.lm_head.weight"] = embed
        elif head is not None and embed is not None and not torch.equal(head, embed):
            raise CheckpointError(f"Weights in {source}: showo.lm_head.weight differs from "
                                  f"showo.model.embed_tokens.weight, but the LLM config ties them "
                                  f"(tie_word_embeddings: true). Untie the config or fix the checkpoint.")
    load_strict(model, state, source)
    if tied:
        model.showo.lm_head.weight = model.showo.model.embed_tokens.weight
    model.init_buffers(device)  # the non-persistent buffers are still meta tensors
    model.to(device)
    return model.eval().requires_grad_(False)


def save_showo2(model: Showo2, folder: str, *, weights_format: str = "safetensors",
                max_shard_bytes: int | None = None) -> None:
    """Write `model` in the official layout `load_showo2` reads: config.json (official keys, plus the
    `diffusion_head_config` extension), llm/config.json, siglip/config.json and the weights
    (`model.safetensors`, or `pytorch_model.bin` with weights_format="bin"; sharded with an index when the
    weights exceed max_shard_bytes)."""
    import json

    from safetensors.torch import save_file

    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}.")
    c = model.config
    os.makedirs(os.path.join(folder, "llm"), exist_ok=True)
    os.makedirs(os.path.join(folder, "siglip"), exist_ok=True)
    showo2_config = dict(
        _class_name="Showo2Qwen2_5", llm_vocab_size=c.llm_vocab_size, llm_model_path="llm", load_from_showo=True,
        image_latent_dim=c.image_latent_dim, image_latent_height=c.image_latent_height,
        image_latent_width=c.image_latent_width, video_latent_height=c.image_latent_height,
        video_latent_width=c.image_latent_width, patch_size=c.patch_size, hidden_size=c.hidden_size,
        clip_latent_dim=c.clip_latent_dim, num_diffusion_layers=c.num_diffusion_layers,
        add_time_embeds=c.add_time_embeds, add_qk_norm=True, clip_pretrained_model_path="siglip",
        diffusion_head_config=dataclasses.asdict(c.head))
    for name, content in (("config.json", showo2_config),
                          ("llm/config.json", {"model_type": "qwen2", **c.llm, "vocab_size": c.llm_vocab_size}),
                          ("siglip/config.json", {"model_type": "siglip", "vision_config": c.siglip})):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    # clone: safetensors refuses tensors that share memory (the tied head), and the files must be self-contained
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    ext = "safetensors" if weights_format == "safetensors" else "bin"
    write = (lambda s, p: save_file(s, p, metadata={"format": "pt"})) if ext == "safetensors" else torch.save
    base = "model" if ext == "safetensors" else "pytorch_model"
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and max_shard_bytes and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write(shards[0], os.path.join(folder, f"{base}.{ext}"))
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{base}-{i:05d}-of-{len(shards):05d}.{ext}"
        write(shard, os.path.join(folder, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, f"{base}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                   "weight_map": weight_map}, f, indent=2)
