"""Parity against golden vectors produced by the official Show-o2 code (format "showo2-golden/1").

`run_parity(dir)` loads `dir/checkpoint` through the normal loaders, runs every case of `dir/cases.json` with the
settings it lists, and compares each output tensor with `dir/cases.safetensors` under the case's tolerance
(allclose: |actual - expected| <= atol + rtol * |expected|; exact: bit-identical). Nothing depends on a particular
set's sizes: dimensions, token ids and settings all come from the set.
"""

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from flashu_batch.showo2.layouts import Sequences, t2i_sequences, vqa_sequence
from flashu_batch.showo2.loading import VAE_FILE, load_showo2
from flashu_batch.showo2.modeling import omni_attention_mask
from flashu_batch.showo2.prefix_cache import PrefixCachedVelocity
from flashu_batch.showo2.t2i import generate_latents
from flashu_batch.showo2.tokenizer import SpecialTokens
from flashu_batch.showo2.vae import load_vae
from flashu_batch.showo2.vqa import greedy_answers, prompt_logits


@dataclass
class TensorResult:
    name: str
    passed: bool
    max_abs: float  # largest |actual - expected|
    max_rel: float  # largest |actual - expected| / |expected| (0 where expected == 0)
    ratio: float  # largest |actual - expected| / (atol + rtol * |expected|); <= 1 passes
    tolerance: str


@dataclass
class CaseResult:
    case: str
    tensors: list[TensorResult]

    @property
    def passed(self) -> bool:
        return bool(self.tensors) and all(t.passed for t in self.tensors)

    def line(self) -> str:
        parts = []
        for t in self.tensors:
            parts.append(f"{t.name} max_abs={t.max_abs:.2e} max_rel={t.max_rel:.2e} ratio={t.ratio:.3f} "
                         f"({t.tolerance}){'' if t.passed else ' FAIL'}")
        return f"{'PASS' if self.passed else 'FAIL'} {self.case}: " + "; ".join(parts or ["no outputs checked"])


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, spec: dict) -> TensorResult:
    if tuple(actual.shape) != tuple(expected.shape):
        return TensorResult(name, False, float("inf"), float("inf"), float("inf"),
                            f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if spec.get("compare") == "exact":
        equal = torch.equal(actual.to(expected.dtype), expected)
        diff = 0.0 if equal else float((actual.double() - expected.double()).abs().max())
        return TensorResult(name, equal, diff, diff, 0.0 if equal else float("inf"), "exact")
    atol, rtol = spec["atol"], spec["rtol"]
    err = (actual.double() - expected.double()).abs()
    ref = expected.double().abs()
    ratio = float((err / (atol + rtol * ref)).max())
    rel = float((err / ref.where(ref > 0, torch.ones_like(ref)) * (ref > 0)).max())
    return TensorResult(name, ratio <= 1.0, float(err.max()), rel, ratio, f"atol={atol:g} rtol={rtol:g}")


def _special_tokens(meta: dict) -> SpecialTokens:
    ids = meta["tokenizer"]["showo_token_ids"]
    return SpecialTokens(bos=ids["bos_id"], eos=ids["eos_id"], boi=ids["boi_id"], eoi=ids["eoi_id"],
                         img_pad=ids["img_pad_id"], vid_pad=ids["vid_pad_id"], img=ids["img_id"],
                         bov=ids["bov_id"], eov=ids["eov_id"], pad=meta["tokenizer"]["pad_id"])


class _Case:
    """What one case computes: `outputs()` maps tensor names (without the case prefix) to actual values."""

    def __init__(self, name, spec, data, meta, model, vae):
        self.name, self.spec, self.meta, self.model, self.vae = name, spec, meta, model, vae
        self.settings = {**meta.get("settings", {}), **spec.get("settings", {})}
        self.data = {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")}
        self.tokens = _special_tokens(meta)

    def t2i_sequences(self):
        """Rebuild the CFG rows from the raw prompt ids (the layout is checked as an output too)."""
        n = sum(1 for k in self.data if k.startswith("prompt_ids."))
        prompts = [self.data[f"prompt_ids.{i}"].tolist() for i in range(n)]
        if not prompts:  # no raw prompts stored: use the rows as given
            mp = self.data["modality_positions"]
            return Sequences(self.data["input_ids"], mp[:, 0, 0], mp)
        return t2i_sequences(prompts, self.tokens, self.model.config.num_image_slots,
                             self.data["input_ids"].shape[1])

    def outputs(self) -> dict[str, torch.Tensor]:
        return getattr(self, "case_" + self.name)()

    def case_masks(self):
        out = {}
        for key in ("t2i", "mmu"):
            if key in self.data:
                L = self.data[key].shape[-1]
                out[key] = omni_attention_mask(self.data[f"{key}_modality_positions"], L)
        return out

    def case_t2i_velocity(self):
        # The production step (cached prefix, image span only); tests compare it with the full-sequence step.
        seqs = self.t2i_sequences()
        B = seqs.input_ids.shape[0] // 2
        v = PrefixCachedVelocity(self.model, seqs, use_cfg=True)(self.data["x_t"][:B], self.data["t"][:B]).float()
        v_cond, v_uncond = v.chunk(2)
        g = self.settings["guidance_scale"]
        return {"input_ids": seqs.input_ids, "modality_positions": seqs.modality_positions, "v_cond": v_cond,
                "v_uncond": v_uncond, "v_guided": v_uncond + g * (v_cond - v_uncond)}

    def case_t2i_sample(self):
        seqs = self.t2i_sequences()
        latent = generate_latents(PrefixCachedVelocity(self.model, seqs, use_cfg=True), self.data["noise"],
                                  num_inference_steps=self.settings["num_inference_steps"],
                                  guidance_scale=self.settings["guidance_scale"],
                                  time_shift=self.settings["time_shifting_factor"])
        return {"latent": latent, "image": self.vae.decode(latent)}

    def case_vae(self):
        latent = self.vae.encode(self.data["image"])
        return {"latent": latent, "decoded": self.vae.decode(self.data["latent"])}

    def case_mmu(self):
        ids = self.data["input_ids"][0].tolist()
        question = self.data["question_ids"].tolist()
        text_a_len = self.settings["text_a_length"]
        role_len = len(ids) - text_a_len - self.model.config.num_image_slots - 2 - len(question)
        seqs = vqa_sequence(question, ids[:text_a_len], ids[len(ids) - role_len:], self.tokens,
                            self.model.config.num_image_slots, layout="demo")
        latent = self.vae.encode(self.data["image"])
        logits = prompt_logits(self.model, seqs, latent)
        generated, step_logits = greedy_answers(self.model, [seqs], latent,
                                                max_new_tokens=self.settings["max_new_tokens"],
                                                eos_id=self.settings.get("stop_token_id", self.tokens.eos),
                                                pad_id=self.tokens.pad, return_logits=True)
        return {"input_ids": seqs.input_ids, "modality_positions": seqs.modality_positions, "logits": logits,
                "logits_last": logits[:, -1], "generated_ids": torch.tensor(generated),
                "step_logits": step_logits[0]}


@torch.no_grad()
def run_parity(golden_dir: str) -> list[CaseResult]:
    with open(os.path.join(golden_dir, "cases.json")) as f:
        meta = json.load(f)
    data = load_file(os.path.join(golden_dir, "cases.safetensors"))
    checkpoint = os.path.join(golden_dir, meta.get("model", {}).get("checkpoint", "checkpoint"))
    model = load_showo2(checkpoint, dtype=torch.float32)
    vae = load_vae(os.path.join(checkpoint, VAE_FILE))
    cases = meta["cases"].items() if isinstance(meta["cases"], dict) else meta["cases"]
    results = []
    for name, spec in cases:
        case = _Case(name, spec, data, meta, model, vae)
        if not hasattr(case, "case_" + name):
            results.append(CaseResult(name, [TensorResult("case", False, 0, 0, float("inf"), "unknown case")]))
            continue
        actual = case.outputs()
        checked = []
        for full_name, tensor_spec in spec["tensors"].items():
            short = full_name[len(name) + 1:]
            if tensor_spec["role"] != "output":
                continue
            if short in actual:
                checked.append(compare(short, actual[short], data[full_name], tensor_spec))
            elif short not in ("input_ids", "modality_positions"):
                checked.append(TensorResult(short, False, 0, 0, float("inf"), "not computed"))
        # Inputs that the builders must reproduce (sequence layouts) are checked exactly as well.
        for short in ("input_ids", "modality_positions"):
            full_name = f"{name}.{short}"
            if short in actual and full_name in data and spec["tensors"].get(full_name, {}).get("role") == "input":
                checked.append(compare(f"layout.{short}", actual[short], data[full_name], {"compare": "exact"}))
        results.append(CaseResult(name, checked))
    return results
