"""Specialization artifacts: calibrate once, then any worker loads base checkpoint + artifact with no calibration.

An artifact folder holds, per task, `flashu_<task>.json` (format, task, config, kept widths, calibration
metadata, the base checkpoint's fingerprint) and `flashu_<task>.safetensors` (each LLM layer's FFN neuron order,
most important first). Loading refuses an artifact made for another checkpoint: neuron orders only make sense
for the weights they were computed on.
"""

import hashlib
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

from flashu_batch.flashu.config import FlashUGenerationConfig, FlashUUnderstandingConfig
from flashu_batch.flashu.ffn_prune import reorder_ffn_
from flashu_batch.flashu.generation import GenerationSpecialist, pruned_widths
from flashu_batch.flashu.understanding import UnderstandingSpecialist, understanding_widths
from flashu_batch.showo2.checkpoint import CheckpointError
from flashu_batch.showo2.loading import load_showo2, local_folder, weight_files

FORMAT = "flashu-specialization/1"
_CONFIG_FILES = ("config.json", "llm/config.json", "siglip/config.json")


def checkpoint_fingerprint(folder: str) -> str:
    """sha256 over the checkpoint's configs and weight files (names and bytes)."""
    digest = hashlib.sha256()
    paths = [os.path.join(folder, name) for name in _CONFIG_FILES] + weight_files(folder)
    for path in paths:
        if not os.path.isfile(path):
            continue
        digest.update(os.path.relpath(path, folder).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_file_sizes(folder: str) -> dict[str, int]:
    """{file: bytes} of what checkpoint_fingerprint hashes: a cheap first check that an artifact belongs to a
    checkpoint (the driver's, before any worker starts), with no weight read."""
    paths = [os.path.join(folder, name) for name in _CONFIG_FILES] + weight_files(folder)
    return {os.path.relpath(p, folder): os.path.getsize(p) for p in paths if os.path.isfile(p)}


def save_artifact(out_dir: str, task: str, orders: list[torch.Tensor], config, ffn_widths, fingerprint: str,
                  calibration: dict, file_sizes: dict[str, int] | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    save_file({f"layers.{i}.ffn_order": o.to(torch.int64).contiguous().cpu() for i, o in enumerate(orders)},
              os.path.join(out_dir, f"flashu_{task}.safetensors"))
    meta = dict(format=FORMAT, task=task, checkpoint_sha256=fingerprint, checkpoint_files=file_sizes,
                config=config.to_dict(),
                ffn_widths=list(ffn_widths), calibration={**calibration, "created_unix": int(time.time())})
    with open(os.path.join(out_dir, f"flashu_{task}.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_artifact(artifact_dir: str, task: str) -> tuple[dict, list[torch.Tensor]]:
    meta_path = os.path.join(artifact_dir, f"flashu_{task}.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read the FlashU artifact {meta_path!r}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("task") != task:
        raise CheckpointError(f"{meta_path!r} is not a {FORMAT} {task!r} artifact (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r}, task "
                              f"{meta.get('task') if isinstance(meta, dict) else None!r}).")
    if not isinstance(meta.get("checkpoint_sha256"), str) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path!r} lacks checkpoint_sha256 or config.")
    orders_path = os.path.join(artifact_dir, f"flashu_{task}.safetensors")
    try:
        tensors = load_file(orders_path)
        orders = [tensors[f"layers.{i}.ffn_order"] for i in range(len(tensors))]
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # missing, truncated, or keys out of sequence
        raise CheckpointError(f"Cannot read the neuron orders {orders_path!r}: {e}") from e
    return meta, orders


def load_reordered_model(checkpoint: str, artifact_dir: str, task: str, dtype, device):
    """Base weights with the artifact's neuron orders applied, after checking the artifact belongs to them."""
    folder = local_folder(checkpoint)
    meta, orders = read_artifact(artifact_dir, task)
    fingerprint = checkpoint_fingerprint(folder)
    if meta["checkpoint_sha256"] != fingerprint:
        raise CheckpointError(f"The FlashU artifact in {artifact_dir!r} was made for checkpoint "
                              f"{meta['checkpoint_sha256'][:12]}..., not for {checkpoint!r} "
                              f"({fingerprint[:12]}...). Run `flashu-batch specialize` on this checkpoint.")
    model = load_showo2(folder, dtype=dtype, device=device)
    layers = model.showo.model.layers
    if len(orders) != len(layers) or any(len(o) != layer.mlp.down_proj.in_features
                                         for o, layer in zip(orders, layers)):
        raise CheckpointError(f"The FlashU artifact in {artifact_dir!r} does not fit the model's FFN shapes.")
    for i, order in enumerate(orders):
        if not torch.equal(order.sort().values, torch.arange(len(order))):
            raise CheckpointError(f"The FlashU artifact in {artifact_dir!r}: layers.{i}.ffn_order is not a "
                                  f"permutation of the neurons.")
    reorder_ffn_(model, orders)
    return model, meta


def load_generation_specialist(checkpoint: str, artifact_dir: str, dtype=torch.float32, device="cpu",
                               config: FlashUGenerationConfig | None = None) -> GenerationSpecialist:
    """Base weights + artifact -> the T2I specialist (no calibration). `config` overrides the saved knobs (pruning
    ratio and width multiple may change freely: the neuron order serves any width)."""
    model, meta = load_reordered_model(checkpoint, artifact_dir, "t2i", dtype, device)
    config = config or FlashUGenerationConfig.from_dict(meta["config"])
    return GenerationSpecialist(model, pruned_widths(model, config), config)


def load_understanding_specialist(checkpoint: str, artifact_dir: str, dtype=torch.float32, device="cpu",
                                  config: FlashUUnderstandingConfig | None = None) -> UnderstandingSpecialist:
    """Base weights + artifact -> the VQA specialist (no calibration); `config` overrides the saved knobs."""
    model, meta = load_reordered_model(checkpoint, artifact_dir, "vqa", dtype, device)
    config = config or FlashUUnderstandingConfig.from_dict(meta["config"])
    return UnderstandingSpecialist(model, understanding_widths(model, config), config)
