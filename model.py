"""
The networks: the diffusion prior (DiT + VAE + scheduler, via diffusers) and the students.

Prior (the paper's backbone: a pretrained DiT-XL/2 256 + the SD VAE). A class-conditional DiT that
predicts noise eps (and, for DiT-XL/2, a learned variance: 8 output channels = 4 eps + 4 variance),
a VAE that maps latents z to images x = VAE.decode(z / scaling_factor), and a DDPM scheduler holding
alpha_bar_t. Everything is loaded through diffusers' `from_pretrained`, from a hub id (default
facebook/DiT-XL-2-256) or a local directory with the same layout (`transformer/`, `scheduler/`,
optional `vae/`), so the offline test priors and the digits prior go through the very code path of
the full run. For digits the prior is a small DiT in pixel space (no VAE: decode = identity), trained
once by train_prior.py and cached under out/cache/digits_prior.

Students / classifiers (the field's evaluation networks), chosen with `--arch`:
  convnet      ConvNet-D: D x [conv3x3(128) -> instance norm -> ReLU -> avgpool2], linear head; D from
               the resolution (6 at 224-256 px: "ConvNet-6")
  resnetap10   ResNet-10 with average-pool downsampling and instance norm (IDC / Minimax)
  resnet18     ResNet-18 with instance norm (IDC / Minimax): the hard-label evaluation network
  resnet18_bn  torchvision's BatchNorm ResNet-18: the RDED soft-label protocol's student and teacher
  mlp          a 2-hidden-layer MLP: the cheap digits-scale cross-architecture evaluator

This file defines and loads networks only; it runs nothing (train_prior.py trains the digits prior).
"""
import contextlib
import math
import os
import socket

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from ground.common import UserError, file_stamps

DEFAULT_PRIOR = "facebook/DiT-XL-2-256"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # IGD/MGD3 decode DiT latents with ft-mse (the hub repo ships ft-ema)


# ----------------------------------------------------------------------------- the prior

class Prior:
    """DiT + (VAE or identity) + scheduler, with the few derived constants the sampler needs."""

    def __init__(self, transformer, scheduler, vae=None, encoder=None):
        self.transformer, self.scheduler, self.vae = transformer.eval(), scheduler, vae
        config = transformer.config  # the DiT's architecture (not classifier-free guidance: that is cfg_*)
        self.channels, self.latent_size = config.in_channels, config.sample_size
        self.null_label = config.num_embeds_ada_norm  # the CFG "no class" embedding index (1000 for ImageNet)
        self.learned_variance = learns_variance(config)
        if vae is not None:
            vae.eval()
            self.scaling_factor = vae.config.scaling_factor  # never a magic 0.18215
            self.image_size = config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
            self.image_channels = vae.config.out_channels
        else:
            self.scaling_factor, self.image_size, self.image_channels = 1.0, config.sample_size, config.in_channels
        for module in (transformer, vae):
            if module is not None:
                module.eval().requires_grad_(False)  # important! guidance differentiates w.r.t. inputs only
        self.bf16 = False  # bf16 autocast of DiT, decoder and classifiers (`--precision bf16`, CUDA)
        self.encoder = "pixels" if vae is None else encoder  # what identifies the encoder (load_prior: encoder_key)

    def autocast(self):
        """The precision the prior runs in (and the classifiers inside the guided step): bf16 autocast or fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def dit(self, z, timestep, labels):
        """The DiT's raw output (N, C or 2C, h, w), at least float32: eps (and the learned variance)."""
        with self.autocast():
            return _at_least_fp32(self.transformer(z, timestep=timestep, class_labels=labels).sample)

    @property
    def device(self):
        return self.transformer.device

    def decode(self, z):
        """Latent z (N, 4, h, w) -> image in ~[-1, 1] (N, 3, H, W), x = VAE.decode(z / scaling_factor); identity in
        pixel space."""
        if self.vae is None:
            return z
        with self.autocast():
            return _at_least_fp32(self.vae.decode((z / self.scaling_factor).to(self.vae.dtype)).sample)

    @property
    def deterministic(self):
        """DDIM (eta 0): a step adds no noise."""
        return isinstance(self.scheduler, DDIMScheduler)

    def step_std(self, out, t):
        """sigma_t of the DDPM step from z_t, the standard deviation of the noise `step` adds, read from the scheduler
        as its step reads it: (N, C, h, w) with DiT's learned variance (exp(log variance / 2) of its interpolated log
        variance), a scalar with the fixed one. MGD3 scales its pull by it."""
        if self.scheduler.config.variance_type == "learned_range":
            return torch.exp(0.5 * self.scheduler._get_variance(t, predicted_variance=out[:, self.channels:]))
        return self.scheduler._get_variance(t) ** 0.5

    def step(self, out, t, z, generators):
        """z_{t-1} from the DiT output at z_t: the scheduler's step, with each image's generator for its noise. DDPM
        takes eps and the learned variance; DDIM (deterministic) takes eps only."""
        if self.deterministic:
            out = out[:, :self.channels]  # (N, C, h, w)
        return self.scheduler.step(out, t, z, generator=generators).prev_sample

    @torch.no_grad()
    def encode(self, x):
        """Image in [-1, 1] -> latent (the posterior mean: deterministic, so memories are reproducible)."""
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.scaling_factor


def predicted_clean(z_t, eps, alpha_bar_t):
    """z0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the clean sample an eps prediction implies (Ho et al.
    2020, Eq. 15); the guidance scores it, the prior's training loss and bench.py time it."""
    return (z_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def learns_variance(config):
    """A DiT config with 2C output channels predicts eps and a learned variance (DiT-XL/2: 8 = 4 + 4)."""
    return (config.out_channels or config.in_channels) == 2 * config.in_channels


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
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    common = dict(clip_sample=pixel_space, timestep_spacing="linspace")
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, **common)
    variance = "learned_range" if learned_variance else "fixed_small"
    return DDPMScheduler.from_config(config, variance_type=variance, **common)


def load_prior(prior=DEFAULT_PRIOR, vae="auto", device="cpu", dtype=torch.float32, sampler="ddpm", steps=None):
    """Load DiT (+VAE) + scheduler from a hub id or local diffusers directory.

    vae: "auto" = sd-vae-ft-mse for the hub DiT, else the directory's own `vae/` (none = pixel space);
    "none" = pixel space; anything else = a hub id or directory of an AutoencoderKL.
    steps: the sampling steps the caller will ask for, checked against the schedule before the weights load.
    """
    local = os.path.isdir(prior)
    if not local and (prior.startswith((".", "/", "out")) or prior.count("/") != 1):
        raise UserError(f"prior {prior} is neither a local directory nor a hub id like {DEFAULT_PRIOR}")
    sched_config = _read("the scheduler of prior", prior, lambda: DDPMScheduler.load_config(prior,
                                                                                             subfolder="scheduler"))
    train_steps = int(sched_config.get("num_train_timesteps", 1000))
    if steps is not None and not 1 <= steps <= train_steps:
        raise UserError(f"--steps {steps} is outside 1..{train_steps} (the prior's training schedule)")
    transformer = _read("the DiT of prior", prior, lambda: DiTTransformer2DModel.from_pretrained(
        prior, subfolder="transformer", torch_dtype=dtype, low_cpu_mem_usage=False))  # no accelerate needed
    if vae == "auto":
        own = os.path.join(prior, "vae")  # a local prior's own decoder (the stand-ins, the latent tiers)
        vae = DEFAULT_VAE if prior == DEFAULT_PRIOR else (own if local and os.path.isdir(own) else "none")
    vae_model = None if vae == "none" else _read("the VAE", vae, lambda: AutoencoderKL.from_pretrained(
        vae, torch_dtype=dtype, low_cpu_mem_usage=False))
    latent = transformer.config.in_channels
    if vae_model is not None and vae_model.config.latent_channels != latent:
        raise UserError(f"the DiT of prior {prior} makes {latent}-channel latents, the VAE {vae} decodes "
                        f"{vae_model.config.latent_channels}-channel ones: they are not one prior")
    scheduler = make_scheduler(sched_config, sampler, pixel_space=vae_model is None,
                               learned_variance=learns_variance(transformer.config))
    return Prior(transformer.to(device), scheduler, vae_model.to(device) if vae_model is not None else None,
                 encoder_key(vae))


def encoder_key(vae):
    """What identifies a prior's encoder (MGD3's modes depend on nothing else of it): "pixels", a hub id, or a local
    folder with the sizes and times of its files (a retrained cache is another encoder)."""
    if vae == "none" or not os.path.isdir(vae):
        return "pixels" if vae == "none" else vae
    return repr(file_stamps(sorted(os.path.join(root, name) for root, _, names in os.walk(os.path.abspath(vae))
                                   for name in names)))


class PriorFiles(UserError):
    """A part of a prior whose files could not be read; `path` says which files."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


OFFLINE = ("offline? give --prior DIR (DiT-XL/2 in the hub layout), --vae DIR and --data-dir DIR: docs/gpu.md says "
           "how to fetch them on a machine with internet")


def _read(what, path, load):
    """load() of one part of a prior; missing or damaged files, or an offline hub, as one line naming the part. A hub id
    not in the local cache is fetched only when the hub answers at once (offline, the hub's client retries for half
    a minute before it says so)."""
    try:
        if not os.path.isdir(path) and not hub_reachable():
            with _hub_offline():  # the local cache only
                return load()
        return load()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PriorFiles(f"could not load {what} {path}: {e.__class__.__name__}: "
                         f"{(str(e).splitlines() or [''])[0]} ({OFFLINE})", path) from None


def hub_reachable(timeout=3.0):
    """Whether huggingface.co answers a TCP connection within `timeout` seconds."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode (HF_HUB_OFFLINE) for the block: cached files only, no retries."""
    import huggingface_hub.constants as hub
    saved, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


# ----------------------------------------------------------------------------- the digits prior's shape

# The embedded presets' priors, trained once by train_prior.py. Their shapes and schedule live here, beside the
# loader, because both sides need them.
# digits: a 0.8M-parameter pixel-space DiT (8x8, 1 channel, no VAE: decode = identity)
DIGITS_PRIOR = dict(num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=10)
DIGITS_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)  # DDPM's linear betas
# mnist, the whole pipeline in miniature: a VAE from 1 x 32 x 32 images to 4 x 8 x 8 latents (4x down, as the SD VAE
# goes 8x from 3 x 256 x 256 to 4 x 32 x 32), a DiT on the latents with the learned variance (8 = 2 x 4 outputs) and
# a null label for CFG, like DiT-XL/2
MNIST_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 layers_per_block=1, norm_num_groups=8, sample_size=32)
MNIST_DIT = dict(num_attention_heads=3, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=10)
MNIST_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)  # latents: no clipping


# ----------------------------------------------------------------------------- students

# The evaluation networks of the field, re-written from the public code the baselines use
# (MinimaxDiffusion `train_models/{convnet,resnet_ap,resnet}.py`, identical to IDC `models/`):
# instance norm is GroupNorm with one channel per group, convs are initialised Kaiming-normal (fan_out)
# and norms to (1, 0) in the ResNets, the ConvNet keeps PyTorch's default init. Parameter counts are
# checked in tests/test_networks.py against counts computed from those definitions.

def norm(channels):
    """Instance norm with affine parameters, as the DD field writes it (GroupNorm with one channel per group)."""
    return nn.GroupNorm(channels, channels, affine=True)


def convnet_depth(res):
    """ConvNet depth by resolution: 3 at 32 px (CIFAR), 4 at 64, ..., 6 at 224-256 px; at least 2.

    Minimax takes `--depth` from the command line (ConvNet-6 is asked for with `--depth 6` at 224/256 px);
    we derive it from the resolution so every dataset gets the conventional depth.
    """
    return max(2, round(math.log2(res)) - 2)  # 224 px rounds up to 256: ConvNet-6


class ConvNet(nn.Module):
    """The DD benchmark ConvNet (Minimax `train_models/convnet.py`): depth x [conv3x3(128, bias) ->
    instance norm -> ReLU -> avgpool 2x2], a linear head on the flattened map (no global pooling).
    At 224 px ConvNet-6 ends on 128 x 3 x 3 (Linear(1152, C)), at 256 px on 128 x 4 x 4 (Linear(2048, C))."""

    def __init__(self, channels, num_classes, res, width=128, depth=None):
        super().__init__()
        depth = depth or convnet_depth(res)
        layers, c = [], channels
        for _ in range(depth):  # each block halves the resolution (floor): 224 -> 112 -> ... -> 3
            layers += [nn.Conv2d(c, width, 3, padding=1), norm(width), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            c, res = width, res // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * res * res, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))  # (N, num_classes)


def _idc_init(model):
    """IDC/Minimax ResNet init: conv ~ N(0, sqrt(2 / (k*k*out))) (Kaiming fan_out), norms weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


class BasicBlockAP(nn.Module):
    """ResNetAP basic block (Minimax `resnet_ap.py`): conv3x3 -> norm -> ReLU -> avgpool(stride) -> conv3x3 ->
    norm, + shortcut (conv1x1 -> avgpool(stride) -> norm), ReLU. Average pooling replaces the stride-2 conv,
    which would look at only one of every four positions."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out)
        self.pool = nn.AvgPool2d(stride, stride) if stride != 1 else nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), norm(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                          nn.AvgPool2d(stride, stride) if stride != 1 else nn.Identity(), norm(c_out))

    def forward(self, x):
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    """The shape both ResNets share: stem -> four stages (64, 128, 256, 512 channels; strides 1, 2, 2, 2) ->
    global average pool (the head does not depend on the input resolution) -> Linear(512, C), IDC's init."""

    def __init__(self, stem, stage, num_classes):
        super().__init__()
        self.stem, blocks, c = stem, [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += stage(c, width, stride)
            c = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)
        _idc_init(self)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class ResNetAP10(_ResNet):
    """ResNetAP-10 (IDC / Minimax `resnet_ap.py`, depth 10 = one basic block per stage, widths 64..512).

    Stem by input size, as IDC: > 128 px 'large' = conv7x7 stride 1 -> norm -> ReLU -> avgpool 4x4
    (224 -> 56); 65..128 px 'mid' = conv3x3 -> norm -> ReLU -> avgpool 2x2; <= 64 px 'small' = conv3x3 -> norm
    -> ReLU.
    """

    def __init__(self, channels, num_classes, res):
        kernel, pool = (7, 4) if res > 128 else (3, 2) if res > 64 else (3, 1)
        stem = nn.Sequential(nn.Conv2d(channels, 64, kernel, 1, kernel // 2, bias=False), norm(64),
                             nn.ReLU(inplace=True), nn.AvgPool2d(pool, pool) if pool > 1 else nn.Identity())
        super().__init__(stem, lambda c, width, stride: [BasicBlockAP(c, width, stride)], num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block (Minimax `resnet.py`): stride in conv1, shortcut conv1x1(stride) -> norm."""

    def __init__(self, c_in, c_out, stride, make_norm):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), make_norm(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), make_norm(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), make_norm(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(_ResNet):
    """ResNet-18 with instance norm (IDC / Minimax `resnet.py`, `ResNet(depth=18, norm_type='instance')`), the
    hard-label evaluation network of the field. Two basic blocks per stage. Stem by input size, as IDC's
    `IntroBlock`: > 128 px 'large' = conv7x7/2 -> norm -> ReLU -> maxpool 3/2/1 (as torchvision); 65..128 px
    'mid' = conv3x3/1 -> norm -> ReLU -> the same maxpool (128 -> 64); <= 64 px 'small' = conv3x3/1, no pooling."""

    def __init__(self, channels, num_classes, res, make_norm=norm):
        large = res > 128
        stem = [nn.Conv2d(channels, 64, 7, 2, 3, bias=False) if large else nn.Conv2d(channels, 64, 3, 1, 1, bias=False),
                make_norm(64), nn.ReLU(inplace=True)]
        if res > 64:  # 'mid' and 'large' pool; without it a 128 px input costs 4x the activations
            stem.append(nn.MaxPool2d(3, 2, 1))
        stem = nn.Sequential(*stem)
        super().__init__(stem, lambda c, width, stride: [BasicBlock(c, width, stride, make_norm),
                                                         BasicBlock(width, width, 1, make_norm)], num_classes)


def resnet18_bn(channels, num_classes, res):
    """torchvision's BatchNorm ResNet-18: the student and teacher of the RDED soft-label protocol (ImageNet-1K).
    Below 64 px a 3x3 stride-1 stem without max-pool (the CIFAR convention)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if res < 64 or channels != 3:
        stride, kernel = (1, 3) if res < 64 else (2, 7)
        model.conv1 = nn.Conv2d(channels, 64, kernel, stride, kernel // 2, bias=False)
        if res < 64:
            model.maxpool = nn.Identity()
    return model


class MLP(nn.Module):
    """Flatten -> 256 -> ReLU -> 256 -> ReLU -> classes: not an evaluation network of the field, but a cheap
    one of another family for the digits-scale cross-architecture column (no stage student or theta* is one)."""

    def __init__(self, channels, num_classes, res, width=256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * res * res, width), nn.ReLU(inplace=True),
                                 nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


# --arch name -> constructor(channels, num_classes, res)
NETWORKS = {"convnet": ConvNet, "resnetap10": ResNetAP10, "resnet18": ResNet18, "resnet18_bn": resnet18_bn, "mlp": MLP}
ARCHS = tuple(NETWORKS)


def make_student(arch, view, seed=None):
    """A freshly initialised classifier for a dataset view (channels, classes, resolution view.res).

    seed: seeds the initialisation, so a student does not depend on what ran before in the process.
    """
    if arch not in NETWORKS:
        raise UserError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")
    if seed is not None:
        torch.manual_seed(seed)
    return NETWORKS[arch](view.channels, view.num_classes, view.res)
