"""DDIM inversion as the noising of a noisy UNet backbone (`noise='ddim_inversion'`), as Meng et al. run it.

Their `feature/components/ddim_inversion.py` (generic-diffusion-feature): the schedule, the update and the cost:
docs/models.md#lora-controlnet-and-ddim-inversion; departures: docs/fidelity.md#lora-controlnet-and-ddim-inversion.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler

__all__ = ['NOISE_MODES', 'inversion_timesteps', 'ddim_invert']

NOISE_MODES = ('ddpm', 'ddim_inversion')


def inversion_timesteps(scheduler_cfg: dict, steps: int, stop_at: float) -> list[int]:
    """The timesteps the inversion steps to, ascending, up to and including the first one >= `stop_at`."""
    with torch.device('cpu'):
        sched = DDIMScheduler(**scheduler_cfg, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    out = []
    for t in sched.timesteps.flip(0)[1:].tolist():
        out.append(int(t))
        if t >= stop_at:
            break
    return out


@torch.no_grad()
def ddim_invert(eps: Callable[[torch.Tensor, int], torch.Tensor], z: torch.Tensor, alphas_cumprod: torch.Tensor,
                timesteps: list[int], steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Walk the clean latents `z` up the DDIM schedule (see the module docstring).

    Args:
        eps: the UNet's noise prediction for latents at a timestep.
        z: clean scaled latents.
        alphas_cumprod: the training schedule's cumulative alphas.
        timesteps: from `inversion_timesteps`.
        steps: the number of inference steps the timesteps were made for (the step is 1000 // steps).
    """
    ratio = num_train_timesteps // steps
    for t in timesteps:
        noise = eps(z, t)
        a_prev = alphas_cumprod[max(0, t - ratio)].item()
        a_t = alphas_cumprod[t].item()
        z = ((z - (1 - a_prev) ** 0.5 * noise) * (a_t ** 0.5 / a_prev ** 0.5) + (1 - a_t) ** 0.5 * noise).to(z.dtype)
    return z
