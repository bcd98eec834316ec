"""A tiny Show-o2 checkpoint with seeded random weights, in the official layout.

Until a trained small model ships, this is what the demo and the tests run: the same code path as a real
release (config.json + llm/ + siglip/ + weights + Wan2.1_VAE.pth + tokenizer), at a size a laptop CPU runs in
seconds. Random weights draw noise and answer gibberish; they prove plumbing, not quality.
"""

import dataclasses
import json
import os

import torch

from flashu_batch.showo2.config import Showo2Config
from flashu_batch.showo2.loading import VAE_FILE, save_showo2
from flashu_batch.showo2.modeling import Showo2
from flashu_batch.showo2.tokenizer import build_tokenizer
from flashu_batch.showo2.vae import VAEConfig, WanVAE

# Trained checkpoints shipped with the package (showo2/checkpoints/; the training script is train/tiny_shapes.py).
CHECKPOINTS = {"tiny-shapes": os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny-shapes")}

# The tiny vocabulary: enough words for the demo prompts and questions to be single tokens.
TINY_WORDS = """a an the of in on at and with to is are what which how many color shape there this picture image
red green blue yellow purple orange white black circle square triangle star left right top bottom middle center
fox cat dog bird house tree lighthouse sunset snow sky sea mountain painting photo small large big two three one
shown show describe""".split()


def build_tiny_checkpoint(folder: str, seed: int = 0, n_regular: int = 1000) -> str:
    """Write a seeded random tiny Show-o2 (preset "tiny", vocabulary padded to `n_regular` regular tokens + the 26
    Show-o2 specials), a tiny Wan2.1 VAE (dim 8) and a matching tokenizer into `folder`; return the folder."""
    torch.manual_seed(seed)
    words = TINY_WORDS + [f"w{i}" for i in range(n_regular)]  # filler words reach the vocabulary size
    tokenizer = build_tokenizer(words[: n_regular - 256])  # 256 byte tokens come first (see build_tokenizer)
    config = dataclasses.replace(Showo2Config.from_name("tiny"), llm_vocab_size=len(tokenizer))
    config.llm = {**config.llm, "vocab_size": len(tokenizer)}
    model = Showo2(config).eval()
    save_showo2(model, folder)
    tokenizer.save_pretrained(folder)
    vae_config = VAEConfig(dim=8)
    torch.save(WanVAE(vae_config).state_dict(), os.path.join(folder, VAE_FILE))
    with open(os.path.join(folder, "vae_config.json"), "w") as f:
        json.dump(dataclasses.asdict(vae_config), f, indent=2)
    return folder
