"""
MGD3, mode-guided diffusion (Chan-Santiago et al., "Mode-Guided Dataset Distillation using Diffusion Models",
ICML 2025): the paper's strongest baseline, on the same sampler as LGD (guidance.sample). No gradient: each image is
pulled toward one mode of its class's real training latents while the noise is still high.

  modes     m_1 .. m_n of class c: k-means with n clusters (n = the images per class the increment makes, random
            state 0) of the class's training images through the prior's encoder (the VAE's posterior mean times its
            scaling factor; the pixels in pixel space); the j-th image of the class is tied to m_j
  the step  at respaced step i > t_stop (t_stop 25 of 50: the first 24 steps), with z0_hat the CFG-guided predicted
            clean latent (as the step uses it: clipped in pixel space) and sigma_t the standard deviation of the
            DDPM step's noise (DiT's learned one):
              z_{t-1} = mu_theta(z_t) - lambda sigma_t (z0_hat - m_j) + sigma_t noise             lambda 0.1
            with DDIM (no noise) sigma_t is replaced by sqrt(1 - abar_t); at i <= t_stop the plain CFG step

The official code is not public; the step, the constants and the k-means follow the paper and the sampler as it is
copied in derived public repositories (ManifoldGD's `p_sample_with_mode_guidance`). A large lambda is reported to
ruin samples, t_stop 20-30 to work best. NOTE(deviation): MGD3 flips its feature images at random; here each image's
coin is fixed (seeded by its class), so the modes are too, and the embedded digits are not flipped (a flipped digit
is another digit).

Run: `python distill.py --method mgd3` (digits), or `--seed-set mgd3` for LGD on MGD3's T_1.
"""
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from config import PAPER
from model import predicted_clean

KMEANS_SEED = 0     # MGD3's k-means random_state: the modes are the same for every run seed


@dataclass
class MGD3:
    """MGD3's constants."""
    scale: float = PAPER["mode_scale"]   # lambda
    stop: int = PAPER["mode_stop"]       # t_stop


def uses_mgd3(method, seed_set):
    """Whether a run samples with the mode pull: --method mgd3, or LGD with T_1 from MGD3."""
    return method == "mgd3" or (method == "lgd" and seed_set == "mgd3")


def class_modes(latents, n):
    """The n modes of one class: k-means centroids of its training latents (m, C, h, w) -> (n, C, h, w), in the order
    k-means numbers them (the j-th image of the class is pulled toward mode j)."""
    flat = latents.flatten(1).double().numpy()
    kmeans = KMeans(n_clusters=n, random_state=KMEANS_SEED, n_init="auto").fit(flat)
    return torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)).view(n, *latents.shape[1:])


@torch.no_grad()
def encode_class(prior, images, coins):
    """A class's training images (m, C, H, W) in [0, 1], at the size the prior generates, flipped where coins (m,) say,
    through the prior's encoder -> latents (m, C, h, w) (the posterior mean times the scaling factor)."""
    images = torch.where(coins.view(-1, 1, 1, 1), images.flip(-1), images)
    return prior.encode(images.to(prior.device) * 2 - 1).float().cpu()


@dataclass
class ModePull:
    """The pull on one sampler batch: modes (N, C, h, w) on the prior's device, one per image, and MGD3's constants."""
    modes: torch.Tensor
    mgd3: MGD3

    def active(self, i):
        return i > self.mgd3.stop

    def term(self, prior, t, z, out):
        """-lambda sigma_t (z0_hat - m), added to z_{t-1} after the plain CFG step at z_t with DiT output `out`."""
        alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)
        z0_hat = predicted_clean(z.float(), out[:, :prior.channels].float(), alpha_bar_t)  # (N, C, h, w)
        config = prior.scheduler.config
        if config.clip_sample:  # pixel space: z0_hat as the step uses it, clipped to the images' range (DiT's
            z0_hat = z0_hat.clamp(-config.clip_sample_range, config.clip_sample_range)  # clip_denoised); unclipped,
            # 1 / sqrt(abar_t) blows it up early on
        sigma = (1 - alpha_bar_t).sqrt() if prior.deterministic else prior.step_std(out, t)
        return (-self.mgd3.scale * sigma * (z0_hat - self.modes)).to(z.dtype)
