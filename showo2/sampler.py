"""Flow-matching Euler sampler on Show-o2's shifted time grid (upstream transport/integrators.py + torchdiffeq euler).

t = 0 is noise and t = 1 is data. The grid is `linspace(0, 1, S)` shifted by t / (t + s - s*t); fixed-grid Euler
then takes S - 1 steps x <- x + (t[i+1] - t[i]) * v(x, t[i]), with the state in float32. The sampler knows the
grid and the update, never the network (as diffusers' schedulers).
"""

import math

import torch


class FlowEulerSampler:
    def __init__(self, num_inference_steps: int, time_shift: float = 3.0):
        if num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be at least 2 (S grid points, S - 1 model calls), "
                             f"got {num_inference_steps}.")
        if not math.isfinite(time_shift) or time_shift <= 0:
            raise ValueError(f"time_shift must be positive, got {time_shift}.")
        t = torch.linspace(0, 1, num_inference_steps)  # float32, as upstream
        self.timesteps = t / (t + time_shift - time_shift * t)  # (S,)

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps) - 1

    def step(self, sample: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        """One Euler step from grid point i to i + 1, computed in float32."""
        dt = (self.timesteps[i + 1] - self.timesteps[i]).item()
        return sample.float() + dt * velocity.float()
