"""
MGD3, mode-guided diffusion (Chan-Santiago et al., "Mode-Guided Dataset Distillation using Diffusion Models",
ICML 2025): the paper's strongest baseline, on the same sampler as LGD (guidance.sample). No gradient: each image is
pulled toward one mode of its class's real training latents while the noise is still high.

  modes     m_1 .. m_k of class c: k-means (k = the images per class the increment makes, random_state 0) of the
            class's training images through the prior's encoder (the VAE's posterior mean times its scaling factor;
            pixels in pixel space); image i of the class is tied to m_i
  the step  for respaced index i > t_stop (t_stop 25 of 50: the first 24 steps), with z0_hat the CFG-guided
            predicted clean latent (as the step uses it: clipped in pixel space) and sigma_t the standard deviation
            of the DDPM step's noise (DiT's learned one):
              z_{t-1} = mu_theta(z_t) - lambda sigma_t (z0_hat - m_i) + sigma_t noise             lambda 0.1
            with DDIM (no noise), sigma_t is replaced by sqrt(1 - abar_t); below t_stop the plain CFG step

The official code is not public; the step, the constants and the k-means follow the paper and the sampler as it is
copied in derived public repositories (ManifoldGD's `p_sample_with_mode_guidance`). A large lambda is reported to
ruin samples, t_stop 20-30 to work best.

Run: `python distill.py --method mgd3` (digits), or `--seed-set mgd3` for LGD on MGD3's T_1.
"""
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from curriculum import generate_increment
from model import predicted_clean

SCALE = 0.1         # lambda, the mode guidance scale [MGD3]
STOP = 25           # t_stop: the pull acts at respaced index i > t_stop, of 50 steps [MGD3: 25]
KMEANS_SEED = 0     # MGD3's k-means random_state: the modes are the same for every run seed


@dataclass
class MGD3:
    """MGD3's constants (the modes are computed per dataset: reference.real_modes)."""
    scale: float = SCALE
    stop: int = STOP


def uses_mgd3(method, seed_set):
    """Whether a run samples with the mode pull: --method mgd3, or LGD with T_1 from MGD3."""
    return method == "mgd3" or (method == "lgd" and seed_set == "mgd3")


def class_modes(latents, k):
    """The k modes of one class: k-means centroids of its training latents (n, C, h, w) -> (k, C, h, w), in the
    order k-means numbers them (image i of the class is pulled toward mode i)."""
    flat = latents.flatten(1).double().numpy()
    kmeans = KMeans(n_clusters=k, random_state=KMEANS_SEED, n_init="auto").fit(flat)
    return torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)).view(k, *latents.shape[1:])


def mode_pull(prior, modes, mgd3):
    """The sampler's pull for images tied to `modes` (N, C, h, w): at respaced index i > t_stop, the term
    -lambda sigma_t (z0_hat - m) added to z_{t-1} after the plain CFG step; below t_stop nothing (None)."""
    channels, deterministic = prior.channels, prior.deterministic
    config = prior.scheduler.config
    clip = config.clip_sample_range if config.clip_sample else None
    modes = modes.to(prior.device)

    def pull(i, t, z, out):
        if i <= mgd3.stop:
            return None
        alpha_bar_t = prior.scheduler.alphas_cumprod[t].to(z.device, torch.float32)
        z0_hat = predicted_clean(z.float(), out[:, :channels].float(), alpha_bar_t)  # (N, C, h, w)
        if clip is not None:  # pixel space: z0_hat as the step uses it, clipped to the images' range (DiT's
            z0_hat = z0_hat.clamp(-clip, clip)  # clip_denoised); unclipped, 1 / sqrt(abar_t) blows it up early on
        sigma = (1 - alpha_bar_t).sqrt() if deterministic else prior.step_std(out, t)
        return (-mgd3.scale * sigma * (z0_hat - modes)).to(z.dtype)

    return pull


def mgd3_increment(run, inc, prior, plan, sampler, mgd3, modes):
    """MGD3's sampler on an increment: slot j of class c is pulled toward modes[c][j] (modes: {c: (k, C, h, w)},
    k = the increment's images per class)."""
    first = inc.indices[0]

    def pulls(classes, index):  # the images of `classes` at slot `index`, each tied to its own mode
        return mode_pull(prior, torch.stack([modes[c][index - first] for c in classes]), mgd3)

    generate_increment(run, inc, prior, plan, sampler, pull=pulls, desc="MGD3 sampling")
