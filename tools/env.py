"""
The machine a run is about to use, in ten seconds: one line each for what will fail there and how to fix it, before a
GPU run spends anything. `python -m tools.env` prints it; the preflight and `python -m tools.gpu_check` print it
first. Each line is `ok`, `warn` (the run goes on, slower or with a caveat) or `FAIL` (the run will not work).

  gpu         nvidia-smi's view (name, memory, driver) and torch's (CUDA build, devices, free memory)
  /dev/shm    DataLoader workers pass decoded images through it (Docker gives 64 MB: too little for 8 workers)
  disk        free space where the run writes
  hub         whether the hub answers, and which weights the hub cache already holds (an offline machine needs them)
"""
import os
import shutil
import subprocess

import torch

from ground.common import SHM_NEEDED, ArgumentParser, existing_folder, run_cli, shm_bytes
from model import DEFAULT_PRIOR, DEFAULT_VAE, hub_reachable

DISK_NEEDED = 10 * 2**30  # a full-scale run folder with its stages, plus the hub's 3 GB of weights


def gpu_lines():
    """nvidia-smi's GPUs and torch's CUDA, as (status, line)."""
    smi = shutil.which("nvidia-smi")
    rows = []
    if smi is not None:
        try:
            query = subprocess.run([smi, "--query-gpu=name,memory.total,memory.used,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            rows = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            rows = []
    if not torch.cuda.is_available():
        said = f"nvidia-smi sees {len(rows)} GPU(s) but this torch cannot use them (its CUDA build: " \
               f"{torch.version.cuda}); install the torch wheel for the driver (pytorch.org)" if rows else \
               "no CUDA device: the embedded tiers run on the CPU; a full-scale run needs a GPU"
        return [("FAIL" if rows else "warn", f"gpu: {said}")]
    lines = [("ok", f"gpu: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} "
                    f"device(s); nvidia-smi: {'; '.join(rows) or 'not found'}")]
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        status = "ok" if free > 0.8 * total else "warn"
        lines.append((status, f"gpu {i}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free" +
                      ("" if status == "ok" else " (another process holds the rest: the preflight's batch will be "
                                                 "smaller)")))
    return lines


def shm_line(path="/dev/shm"):
    size = shm_bytes(path)
    if size >= SHM_NEEDED or not torch.cuda.is_available():  # CPU runs use no workers
        return "ok", f"/dev/shm: {size / 2**30:.1f} GiB"
    return "warn", (f"/dev/shm: {size / 2**20:.0f} MB, too little for DataLoader workers (8 of them pass ~200 MB of "
                    f"decoded images through it): they are turned off, the students train slower; start the "
                    f"container with --shm-size=8g (docker run) to use them")


def disk_line(out_dir="out"):
    where = existing_folder(out_dir)
    free = shutil.disk_usage(where).free
    status = "ok" if free >= DISK_NEEDED else "warn"
    return status, f"disk: {free / 2**30:.0f} GiB free at {where}" + (
        "" if status == "ok" else " (a full run folder and the hub's weights take ~10 GiB; the preflight prices it)")


def hub_line():
    from huggingface_hub.constants import HF_HUB_CACHE
    cached = [repo for repo in (DEFAULT_PRIOR, DEFAULT_VAE)
              if os.path.isdir(os.path.join(HF_HUB_CACHE, "models--" + repo.replace("/", "--")))]
    online = hub_reachable()
    missing = [repo for repo in (DEFAULT_PRIOR, DEFAULT_VAE) if repo not in cached]
    status = "ok" if online or not missing else "FAIL"
    return status, (f"hub: {'online' if online else 'offline'}; in {HF_HUB_CACHE}: {', '.join(cached) or 'nothing'}"
                    + ("" if status == "ok" else f"; a run needs {', '.join(missing)}: fetch them where there is "
                                                 f"internet and give --prior DIR / --vae DIR (docs/gpu.md)"))


def environment(out_dir="out", hub=True):
    """[(status, line)] of the machine: what will fail and how to fix it. hub=False: the weights are loaded already
    (the preflight runs after the prior is), so where they came from needs no line."""
    return [*gpu_lines(), shm_line(), disk_line(out_dir), *([hub_line()] if hub else [])]


def print_environment(out_dir="out", hub=True):
    lines = environment(out_dir, hub)
    for status, line in lines:
        print(f"{status:<4} {line}", flush=True)
    return lines


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.env", description="What will fail on this machine, and how to fix it.")
    p.add_argument("--out-dir", default="out", help="where runs will write (its free disk is checked)")
    args = p.parse_args(argv)
    print_environment(args.out_dir)


if __name__ == "__main__":
    run_cli(main)
