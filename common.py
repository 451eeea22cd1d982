"""
Plumbing shared by every script: device, torchrun, seeds, atomic writes, clear errors.

None of this is the method; it is what makes a many-hour run safe to interrupt:
  - every file is written to a temporary name and renamed (an interrupted run never leaves a
    half-written PNG, JSON or checkpoint that a rerun would read back);
  - `torchrun` is detected from its environment variables, single process is the default;
  - `UserError` is the one exception type the CLIs turn into a single line and exit code 1.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


class UserError(Exception):
    """Bad input from the user (unknown dataset, missing folder, impossible IPC, corrupt file)."""


def run_cli(main):
    """Run a CLI `main()`, turning UserError into one line on stderr and exit code 1 (no traceback)."""
    try:
        main()
    except UserError as e:
        # DataLoader workers re-raise with the worker's traceback in the message: keep the last line.
        last = str(e).strip().splitlines()[-1]
        print(f"error: {last.split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; lower --batch-size (and/or pass --grad-checkpoint)", file=sys.stderr)
        sys.exit(1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except 'None' (= taken from the dataset preset or the data)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ----------------------------------------------------------------------------- device & torchrun

def get_device(name="auto"):
    """cuda > mps > cpu, or the device the user named. Nothing touches CUDA unless it exists."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(device):
    """Join the process group if launched by torchrun; return (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"  # gloo = the CPU test path
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value):
    """Sum an int over ranks (e.g. per-rank counters); the value itself in a single process."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.long, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(tensor)
    return int(tensor.item())


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- seeds

def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def derive_seed(*parts):
    """A 63-bit seed from a tuple like (run_seed, stage, class, slot, candidate).

    Hashing (instead of arithmetic) keeps the seeds of different images unrelated and makes image i
    of class c independent of batch size, world size and of how many images came before it.
    """
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- atomic writes

def atomic_write(path, write):
    """Write via `write(tmp_path)` then rename: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def remove_stale_temporaries(folder):
    """Delete `*.tmp<pid>` files a killed run left behind (readers never look at them; this only tidies)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if re.search(r"\.tmp\d+$", name):
                os.remove(os.path.join(root, name))


def copy_file(source, path):
    """Copy a finished file (e.g. a stage's PNG into distilled/), atomically."""
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_png(image, path):
    """image: (C, H, W) float tensor in [0, 1] (C = 1 or 3) -> 8-bit PNG, atomically."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_grid(images, path, nrow):
    """A sample grid (rows = classes) people can look at instead of reading numbers."""
    from torchvision.utils import make_grid
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
    save_png(grid, path)


def git_commit():
    """The commit this run came from (written into every output folder), or 'unknown'."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
