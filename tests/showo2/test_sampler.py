"""Tests for showo2.sampler.FlowEulerSampler and the CFG loop showo2.t2i.generate_latents (synthetic velocity
functions whose exact Euler trajectories are computed independently here)."""

import math

import pytest
import torch

from flashu_batch.showo2.sampler import FlowEulerSampler
from flashu_batch.showo2.t2i import generate_latents


def test_grid_against_golden(golden_data, golden_meta, golden_specs):
    settings = golden_meta["cases"]["t2i_sample"]["settings"]
    sampler = FlowEulerSampler(settings["num_inference_steps"], settings["time_shifting_factor"])
    spec = golden_specs["t2i_sample.debug.t_grid"]
    expected = golden_data["t2i_sample.debug.t_grid"]
    assert sampler.timesteps.dtype == torch.float32
    torch.testing.assert_close(sampler.timesteps, expected, atol=spec["atol"], rtol=spec["rtol"])
    assert sampler.num_model_calls == settings["model_evaluations"] == settings["num_inference_steps"] - 1


@pytest.mark.parametrize("S", [2, 3, 4, 10, 50])
def test_grid_closed_form(S):
    sampler = FlowEulerSampler(S)  # default shift 3
    t = torch.linspace(0, 1, S, dtype=torch.float64)
    expected = t / (3 - 2 * t)
    assert sampler.timesteps.shape == (S,)
    torch.testing.assert_close(sampler.timesteps.double(), expected, atol=1e-6, rtol=1e-6)
    assert sampler.timesteps[0] == 0 and sampler.timesteps[-1] == 1
    assert (sampler.timesteps.diff() > 0).all()
    assert sampler.num_model_calls == S - 1


def test_grid_shift_one_is_uniform():
    torch.testing.assert_close(FlowEulerSampler(7, time_shift=1.0).timesteps, torch.linspace(0, 1, 7))
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(FlowEulerSampler(5, time_shift=6.0).timesteps.double(), t / (6 - 5 * t),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_too_few_steps(bad):
    with pytest.raises(ValueError, match=r"num_inference_steps"):
        FlowEulerSampler(bad)
    with pytest.raises(ValueError, match=r"num_inference_steps"):
        generate_latents(lambda x, t, step: x, torch.zeros(1, 2, 2, 2), num_inference_steps=bad, guidance_scale=1.0)


@pytest.mark.parametrize("shift", [0.0, -2.0])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match=r"time_shift"):
        FlowEulerSampler(4, time_shift=shift)


@pytest.mark.parametrize("shift", [math.nan, math.inf])
def test_non_finite_shift(shift):
    with pytest.raises(ValueError, match=r"time_shift"):
        FlowEulerSampler(4, time_shift=shift)


def test_step_is_float32_euler():
    sampler = FlowEulerSampler(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g).bfloat16()
    v = torch.randn(2, 3, 4, 4, generator=g).bfloat16()
    for i in range(4):
        out = sampler.step(x, v, i)
        assert out.dtype == torch.float32
        dt = float(sampler.timesteps[i + 1] - sampler.timesteps[i])
        torch.testing.assert_close(out.double(), x.double() + dt * v.double(), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------- generate_latents


class Recorder:
    """velocity_fn that records its inputs (the B image latents and their times) and returns the velocities of all
    sequence rows: the cond rows get a, the uncond rows b (constants); without CFG only the B cond rows."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None):
        self.a, self.b, self.calls = a, b, []

    def __call__(self, x, t, step):
        assert step == len(self.calls)  # the 0-based model-call index
        self.calls.append((x.clone(), t.clone()))
        return self.a.clone() if self.b is None else torch.cat([self.a, self.b])


@pytest.mark.parametrize("S", [2, 4, 9])
def test_cfg_constant_velocity_exact(S):
    g = torch.Generator().manual_seed(1)
    B, shape = 3, (4, 2, 2)
    noise = torch.randn(B, *shape, generator=g)
    a, b = torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
    gs = 4.5
    rec = Recorder(a, b)
    out = generate_latents(rec, noise, num_inference_steps=S, guidance_scale=gs)
    # Euler integrates a constant velocity exactly over t in [0, 1].
    guided = b + gs * (a - b)
    torch.testing.assert_close(out, noise + guided, atol=1e-5, rtol=1e-5)
    assert out.dtype == torch.float32 and out.shape == noise.shape

    grid = FlowEulerSampler(S).timesteps
    assert len(rec.calls) == S - 1
    for i, (x, t) in enumerate(rec.calls):
        # The function gets the B image latents (the uncond rows share them) and returns 2B rows, cond first.
        assert x.shape == (B, *shape) and x.dtype == torch.float32
        assert t.shape == (B,) and torch.equal(t, grid[i].expand(B))  # t at grid point i, never t = 1
        # The states between calls are the Euler iterates.
        torch.testing.assert_close(x, noise + float(grid[i]) * guided, atol=1e-5, rtol=1e-5)


def test_no_cfg_sees_b_rows():
    g = torch.Generator().manual_seed(2)
    noise, a = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    rec = Recorder(a, None)
    out = generate_latents(rec, noise, num_inference_steps=5, guidance_scale=0.0)
    assert len(rec.calls) == 4 and all(x.shape[0] == 2 and t.shape == (2,) for x, t in rec.calls)
    torch.testing.assert_close(out, noise + a, atol=1e-6, rtol=1e-6)


def test_cfg_linear_ode_against_slow_euler():
    """State-dependent velocities: cond v = -x + c, uncond v = 0.5 x (per half); guided Euler in float64 here."""
    g = torch.Generator().manual_seed(3)
    B, S, gs = 2, 6, 3.0
    noise = torch.randn(B, 5, 3, 3, generator=g)
    c = torch.randn(B, 5, 3, 3, generator=g)

    def velocity_fn(x, t, step):
        assert x.shape[0] == B and t.shape == (B,)
        return torch.cat([-x + c * (1 + t[:, None, None, None]), 0.5 * x])  # cond rows, then uncond rows

    out = generate_latents(velocity_fn, noise, num_inference_steps=S, guidance_scale=gs, time_shift=2.0)
    t = torch.linspace(0, 1, S, dtype=torch.float64)
    grid = t / (t + 2.0 - 2.0 * t)
    x = noise.double()
    for i in range(S - 1):
        v_c, v_u = -x + c.double() * (1 + grid[i]), 0.5 * x
        x = x + (grid[i + 1] - grid[i]) * (v_u + gs * (v_c - v_u))
    torch.testing.assert_close(out.double(), x, atol=1e-5, rtol=1e-5)
    # Swapping the halves (uncond first) would give a different answer: the layout matters.
    x_swapped = noise.double()
    for i in range(S - 1):
        v_c, v_u = -x_swapped + c.double() * (1 + grid[i]), 0.5 * x_swapped
        x_swapped = x_swapped + (grid[i + 1] - grid[i]) * (v_c + gs * (v_u - v_c))
    assert (out.double() - x_swapped).abs().max() > 1e-2


def test_noise_rounded_to_model_dtype():
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    zero = lambda x, t, step: torch.zeros_like(torch.cat([x, x]))  # noqa: E731
    out = generate_latents(zero, noise, num_inference_steps=3, guidance_scale=2.0, model_dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and torch.equal(out, noise.bfloat16().float())
    out32 = generate_latents(lambda x, t, step: torch.zeros_like(x), noise, num_inference_steps=3, guidance_scale=0.0)
    assert torch.equal(out32, noise)
