"""Sampling images from the digits model: DDIM with classifier-free guidance, from fixed noise.

Every LoRA and the base model sample the score prompts from the same starting noise
(:func:`fixed_noise`), so their images differ only by what the LoRA does; several LoRAs sample
at once through batched LoRA layers (``groups``).
"""

from __future__ import annotations

import torch

from loralens.zoo.digits.data import IMAGE


def fixed_noise(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 8, 8) starting noise for sampling: image i depends only on (seed, i)."""
    return torch.stack(
        [
            torch.randn(
                1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed * 100_003 + i)
            )
            for i in range(n)
        ]
    )


@torch.no_grad()
def sample(
    unet,
    train_scheduler,
    cond: torch.Tensor,
    noise: torch.Tensor,
    *,
    uncond: torch.Tensor,
    groups: int = 1,
    steps: int = 10,
    guidance: float = 2.0,
) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance; returns images in [-1, 1].

    ``noise`` (N, 1, 8, 8) and ``cond`` (N, L, D) are LoRA-major when ``groups`` LoRAs sample at
    once through batched LoRA layers (rows [k*N/groups, (k+1)*N/groups) belong to LoRA k);
    ``uncond`` (1, L, D) is the empty prompt's embedding.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(train_scheduler.config)
    ddim.set_timesteps(steps)
    n = noise.shape[0] // groups
    x = noise.clone()
    cond_g = cond.reshape(groups, n, *cond.shape[1:])
    unc_g = uncond.expand(n, *uncond.shape[1:]).unsqueeze(0).expand(groups, -1, -1, -1)
    ctx = torch.cat([unc_g, cond_g], 1).reshape(groups * 2 * n, *cond.shape[1:])
    for t in ddim.timesteps:
        xg = x.reshape(groups, n, *x.shape[1:])
        inp = torch.cat([xg, xg], 1).reshape(groups * 2 * n, *x.shape[1:])
        eps = unet(inp, t, encoder_hidden_states=ctx).sample
        eps = eps.reshape(groups, 2, n, *x.shape[1:])
        e = eps[:, 0] + guidance * (eps[:, 1] - eps[:, 0])
        x = ddim.step(e.reshape(x.shape), t, x).prev_sample
    return x.clamp(-1, 1)
