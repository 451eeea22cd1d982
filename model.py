"""
The networks: the diffusion prior (DiT + VAE + scheduler, via diffusers) and the students.

Prior (METHOD.md section 5). A class-conditional DiT that predicts noise eps (and, for DiT-XL/2,
a learned variance: 8 output channels = 4 eps + 4 variance), a VAE that maps latents z to images
x = VAE.decode(z / scaling_factor), and a DDPM scheduler holding alpha_bar_t. Everything is loaded
through diffusers' `from_pretrained`, from a hub id (default facebook/DiT-XL-2-256) or a local
directory with the same layout (`transformer/`, `scheduler/`, optional `vae/`), so the offline
test priors and the digits prior go through the very code path of the full run.
For digits the prior is a small DiT in pixel space (no VAE: decode = identity), trained here once
on the digits train split and cached under out/cache/digits_prior (EMA weights, resumable).

Students / classifiers (METHOD.md section 6), chosen with `--arch`:
  convnet      the DD field's ConvNet: depth x [conv3x3(128) -> instance norm -> ReLU -> avgpool2],
               linear head; depth set by resolution (6 at 224-256 px, "ConvNet-6")
  resnetap10   ResNet-10 whose stride-2 convs are replaced by average pooling (IDC/Minimax/IGD)
  resnet18     torchvision's ResNet-18 (CIFAR-style stem below 64 px)

Run: `python model.py` trains (or loads) the digits prior and prints how many of its samples a
reference classifier recognises.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, remove_path, remove_stale_temporaries, save_torch, temporary_path

DEFAULT_PRIOR = "facebook/DiT-XL-2-256"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # IGD/MGD3 decode DiT latents with ft-mse (the hub repo ships ft-ema)
ARCHS = ("convnet", "resnetap10", "resnet18")


# ----------------------------------------------------------------------------- the prior

class Prior:
    """DiT + (VAE or identity) + scheduler, with the few derived constants the sampler needs."""

    def __init__(self, transformer, scheduler, vae=None):
        self.transformer, self.scheduler, self.vae = transformer.eval(), scheduler, vae
        cfg = transformer.config
        self.channels, self.latent_size = cfg.in_channels, cfg.sample_size
        self.null_label = cfg.num_embeds_ada_norm  # the CFG "no class" embedding index (1000 for ImageNet)
        self.learned_variance = (cfg.out_channels or cfg.in_channels) == 2 * cfg.in_channels
        if vae is not None:
            vae.eval()
            self.scaling_factor = vae.config.scaling_factor  # never a magic 0.18215
            self.image_size = cfg.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        else:
            self.scaling_factor, self.image_size = 1.0, cfg.sample_size
        for module in (transformer, vae):
            if module is not None:
                module.requires_grad_(False)  # important! guidance differentiates w.r.t. inputs only
        self.autocast = False  # bf16 autocast of DiT and VAE (`--precision bf16` turns it on for CUDA)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def dit(self, z, timestep, labels):
        """The DiT's raw output (N, C or 2C, h, w), at least float32: eps (and the learned variance)."""
        with self._autocast():
            return _at_least_fp32(self.transformer(z, timestep=timestep, class_labels=labels).sample)

    @property
    def device(self):
        return self.transformer.device

    def decode(self, z):
        """Latent z (N, 4, h, w) -> image in ~[-1, 1] (N, 3, H, W); identity in pixel space."""
        if self.vae is None:
            return z
        with self._autocast():
            return _at_least_fp32(self.vae.decode((z / self.scaling_factor).to(self.vae.dtype)).sample)

    @torch.no_grad()
    def encode(self, x):
        """Image in [-1, 1] -> latent (the posterior mean: deterministic, so memories are reproducible)."""
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.scaling_factor

    def enable_gradient_checkpointing(self):
        """Trade compute for memory in the guided step (backward through DiT and VAE decoder)."""
        self.transformer.enable_gradient_checkpointing()
        if self.vae is not None:
            self.vae.enable_gradient_checkpointing()


def _at_least_fp32(x):
    """bf16/fp16 outputs -> float32 (the scheduler maths and the guidance gradient want full precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def make_scheduler(config, sampler="ddpm", pixel_space=False, learned_variance=True):
    """A diffusers scheduler from a saved scheduler config.

    ddpm: ancestral sampling with the DiT's learned variance (`variance_type="learned_range"`, the
          setting that matches DiT/IGD's p_sample with learn_sigma), "linspace" spacing = DiT's
          space_timesteps(1000, "50") (0, 20, 41, ..., 999).
    ddim: deterministic (eta = 0), for the exact comparison with diffusers' DiTPipeline in tests.
    Latents are not clipped (DiT: clip_denoised=False); pixel-space priors clip x0 to [-1, 1].
    """
    from diffusers import DDIMScheduler, DDPMScheduler
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    common = dict(clip_sample=pixel_space, timestep_spacing="linspace")
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, **common)
    return DDPMScheduler.from_config(config, variance_type="learned_range" if learned_variance else "fixed_small", **common)


def load_prior(prior=DEFAULT_PRIOR, vae="auto", device="cpu", dtype=torch.float32, sampler="ddpm", steps=None):
    """Load DiT (+VAE) + scheduler from a hub id or local diffusers directory.

    vae: "auto" = sd-vae-ft-mse for the hub DiT, else the directory's own `vae/` (none = pixel space);
    "none" = pixel space; anything else = a hub id or directory of an AutoencoderKL.
    steps: the sampling steps the caller will ask for, checked against the schedule before the weights load.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
    local = os.path.isdir(prior)
    if not local and (prior.startswith((".", "/", "out")) or prior.count("/") != 1):
        raise UserError(f"prior {prior} is neither a local directory nor a hub id like {DEFAULT_PRIOR}")
    try:
        sched_config = DDPMScheduler.load_config(prior, subfolder="scheduler")  # small: checked first
        train_steps = int(sched_config.get("num_train_timesteps", 1000))
        if steps is not None and not 1 <= steps <= train_steps:
            raise UserError(f"--steps {steps} is outside 1..{train_steps} (the prior's training schedule)")
        transformer = DiTTransformer2DModel.from_pretrained(prior, subfolder="transformer", torch_dtype=dtype,
                                                            low_cpu_mem_usage=False)  # no accelerate needed
        if vae == "auto":
            vae = DEFAULT_VAE if prior == DEFAULT_PRIOR else (os.path.join(prior, "vae") if local and os.path.isdir(os.path.join(prior, "vae")) else "none")
        vae_model = None if vae == "none" else AutoencoderKL.from_pretrained(vae, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, KeyError) as e:  # missing files, offline hub, a damaged config
        raise UserError(f"could not load prior {prior}: {e.__class__.__name__}: {(str(e).splitlines() or [''])[0]} "
                        f"(offline? pass --prior DIR)") from None
    scheduler = make_scheduler(sched_config, sampler, pixel_space=vae_model is None,
                               learned_variance=transformer.config.out_channels == 2 * transformer.config.in_channels)
    return Prior(transformer.to(device), scheduler, vae_model.to(device) if vae_model is not None else None)


# ----------------------------------------------------------------------------- digits prior

DIGITS_PRIOR = dict(num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=10)
DIGITS_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)  # DDPM's linear betas


def train_digits_prior(out_dir, images, labels, steps=4000, batch_size=128, lr=1e-3, ema_decay=0.999, seed=0,
                       save_every=500):
    """Train the small pixel-space DiT on digits (once; cached; resumable) and save it in diffusers format.

    images: (N, 1, 8, 8) in [0, 1]. Standard DDPM eps-MSE training (Ho et al. Eq. 14) with 10% label
    dropout, which diffusers' DiT label embedding applies in train mode: that is what makes CFG work.
    """
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    if os.path.isdir(out_dir):  # only ever renamed into place whole: its existence means "trained"
        return
    # the resumable training state lives in a side folder; the finished prior is written to a temporary
    # folder and renamed into place, so a kill at any moment never leaves a half-written cache behind
    partial = out_dir + ".partial"
    os.makedirs(partial, exist_ok=True)
    remove_stale_temporaries([os.path.dirname(os.path.abspath(out_dir))])
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIGITS_PRIOR)
    ema = DiTTransformer2DModel(**DIGITS_PRIOR).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    scheduler = DDPMScheduler(**DIGITS_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state_path, start = os.path.join(partial, "train_state.pt"), 0
    if os.path.exists(state_path):  # resume an interrupted training
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    x_all, y_all = images * 2 - 1, torch.as_tensor(labels)  # pixels in [-1, 1] like the VAE latents' images
    model.train()
    for step in tqdm(range(start, steps), desc="digits prior", initial=start, total=steps, mininterval=2):
        idx = torch.randint(0, len(x_all), (batch_size,))
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noise = torch.randn_like(x0)
        xt = scheduler.add_noise(x0, noise, t)  # sqrt(abar) x0 + sqrt(1 - abar) eps
        eps_hat = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(eps_hat, noise)
        for g in opt.param_groups:  # short warm-up then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        if (step + 1) % save_every == 0 and step + 1 < steps:  # a killed run loses at most save_every steps
            save_torch(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            step=step + 1, rng=torch.get_rng_state()), state_path)
    tmp = temporary_path(out_dir)
    try:
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        ema.save_pretrained(os.path.join(tmp, "transformer"))
        os.rename(tmp, out_dir)  # atomic: the cache appears complete or not at all
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(partial)


def digits_prior(cache_dir="out/cache", steps=4000):
    """Path of the cached digits prior, training it on the digits train split on first use (~7 min on 2 CPU cores)."""
    from common import barrier, is_main
    from data import load_digits_split
    path = os.path.join(cache_dir, "digits_prior")
    # the prior is a cache, not a result: trained once per checkout and shared by every digits run
    if is_main():  # under torchrun rank 0 trains, the others wait at the barrier
        train = load_digits_split("train")
        train_digits_prior(path, torch.stack(train.items), train.labels, steps=steps)
    barrier()
    return path


# ----------------------------------------------------------------------------- students

def norm(channels):
    """Instance norm with affine parameters, as the DD field writes it (GroupNorm with one channel per group)."""
    return nn.GroupNorm(channels, channels, affine=True)


def convnet_depth(res):
    """ConvNet depth by resolution: 3 at 32 px (CIFAR), 4 at 64, ..., 6 at 224-256 px; at least 2."""
    return max(2, round(math.log2(res)) - 2)  # 224 px rounds up to 256: ConvNet-6


class ConvNet(nn.Module):
    """The DD benchmark ConvNet: depth x [conv3x3 -> instance norm -> ReLU -> avgpool 2], linear head."""

    def __init__(self, channels, num_classes, res, width=128, depth=None):
        super().__init__()
        depth = depth or convnet_depth(res)
        layers, c = [], channels
        for _ in range(depth):  # each block halves the resolution: 224 -> 3 after six blocks
            layers += [nn.Conv2d(c, width, 3, padding=1), norm(width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, res = width, res // 2
        self.features = nn.Sequential(*layers)
        # a linear head on the flattened map (no global pooling), as in the DD field's ConvNet
        self.classifier = nn.Linear(width * res * res, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))  # (N, num_classes)


class BasicBlockAP(nn.Module):
    """ResNet basic block whose downsampling is avgpool(2) after conv1 instead of a stride-2 conv."""

    def __init__(self, c_in, c_out, downsample):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), norm(c_out)
        self.shortcut = nn.Identity()
        if downsample or c_in != c_out:
            self.shortcut = nn.Sequential(nn.AvgPool2d(2) if downsample else nn.Identity(),
                                          nn.Conv2d(c_in, c_out, 1, bias=False), norm(c_out))

    def forward(self, x):
        # pooling after the first conv: the stride-2 conv it replaces would skip 3 of 4 positions
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetAP10(nn.Module):
    """ResNet-10 (one basic block per stage) with average-pool downsampling and instance norm (IDC)."""

    def __init__(self, channels, num_classes, res):
        super().__init__()
        if res >= 64:  # ImageNet stem: /4 before the stages
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(inplace=True),
                                      nn.AvgPool2d(3, 2, 1))
        else:  # small images: keep resolution
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), norm(64), nn.ReLU(inplace=True))
        widths, blocks, c = (64, 128, 256, 512), [], 64
        for i, w in enumerate(widths):
            blocks.append(BasicBlockAP(c, w, downsample=i > 0 and res // 2 ** i >= 1))
            c = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        # global average pool: the head does not depend on the input resolution
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def resnet18(channels, num_classes, res):
    """torchvision ResNet-18; below 64 px a 3x3 stride-1 stem without max-pool (CIFAR convention)."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=num_classes)
    if res < 64 or channels != 3:
        stride, kernel = (1, 3) if res < 64 else (2, 7)
        model.conv1 = nn.Conv2d(channels, 64, kernel, stride, kernel // 2, bias=False)
        if res < 64:
            model.maxpool = nn.Identity()
    return model


def make_student(arch, spec, seed=None):
    """A freshly initialised classifier for a dataset spec (channels, classes, resolution).

    seed: seeds the initialisation, so a student does not depend on what ran before in the process.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if arch == "convnet":
        return ConvNet(spec.channels, spec.num_classes, spec.res)
    if arch == "resnetap10":
        return ResNetAP10(spec.channels, spec.num_classes, spec.res)
    if arch == "resnet18":
        return resnet18(spec.channels, spec.num_classes, spec.res)
    raise UserError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")


def main():
    """Train (or load) the digits prior and check it: the share of its unguided samples that a reference
    classifier trained on the real digits recognises (the foundation target is >= 90%)."""
    import argparse
    from common import derive_seed, get_device
    from data import classifier_input, get_spec
    from guidance import decode_images, sample
    from train_student import reference_model
    parser = argparse.ArgumentParser(description="Train/load the digits prior and measure its sample quality.")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class to classify")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale")
    args = parser.parse_args()
    device, spec = get_device(), get_spec("digits")
    prior = load_prior(digits_prior(), device=device)
    reference = reference_model(spec, "convnet", None, device)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    generators = [torch.Generator().manual_seed(derive_seed(123, int(c), i)) for i, c in enumerate(labels)]
    images = decode_images(prior, sample(prior, labels, generators, cfg_scale=args.cfg_scale))
    with torch.no_grad():
        predicted = reference(classifier_input(images.to(device) * 2 - 1, spec)).argmax(dim=1).cpu()
    print(f"reference classifier recognises {(predicted == labels).float().mean():.1%} of {len(labels)} samples "
          f"(CFG {args.cfg_scale})")


if __name__ == "__main__":
    main()
