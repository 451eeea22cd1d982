"""
Plumbing every script shares: clear errors, the CLI wrapper, device and torchrun, seeds, atomic writes.

None of this is the method; it is what makes a many-hour run safe to interrupt:
  - every file is written to a temporary name and renamed (an interrupted run never leaves a
    half-written PNG, JSON or checkpoint that a rerun would read back), and a write that runs out of
    room is one line, `error: disk full: <path>`, however the OS or torch reports it;
  - `torchrun` is detected from its environment variables, single process is the default;
  - `UserError` is the one exception type the CLIs turn into a single line and exit code 1;
  - every random stream of a run derives from (run seed, what it is for, n), so nothing depends on
    what ran before it in the process.
"""
import argparse
import datetime
import errno
import gc
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, PngImagePlugin
from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user (unknown dataset, missing folder, impossible IPC, corrupt file)."""


def require(ok, message):
    """A CLI check: bad input becomes one UserError line (see run_cli)."""
    if not ok:
        raise UserError(message)


def os_error_line(e):
    """An OSError as `<reason>: <path>`; a full disk says so in words (ENOSPC's text is easy to miss)."""
    reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or e.__class__.__name__)
    path = e.filename or ""
    return f"{reason}: {path}" if path else reason


def run_cli(main):
    """Run a CLI `main()`: a user's mistake, a disk problem or Ctrl-C is one line on stderr, never a traceback.

    exit 1: UserError (bad input), OSError (unwritable/full disk), GPU out of memory; exit 130: Ctrl-C.
    Set LGD_TRACEBACK=1 to see the full traceback of any of them.
    """
    try:
        main()
    except Exception as e:  # sorted below; anything else is a bug and keeps its traceback
        if os.environ.get("LGD_TRACEBACK"):
            raise
        if isinstance(e, UserError):
            # DataLoader workers re-raise with the worker's traceback in the message: keep the last line.
            line = str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        elif isinstance(e, OSError):
            line = os_error_line(e)
        elif out_of_memory(e):
            line = "out of GPU memory; lower --batch-size (and/or pass --grad-checkpoint)"
        else:
            raise
        _end_progress_line()
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("LGD_TRACEBACK"):
            raise
        # everything finished is on disk (atomic writes); a rerun of the same command resumes
        _end_progress_line()
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _end_progress_line():
    """Close open progress bars first, so the message is the last line and starts on a line of its own."""
    bars = list(getattr(tqdm, "_instances", []))
    for bar in bars:
        bar.leave = False  # cleared, not redrawn after the message when the process exits
        bar.close()
    if bars:
        print(file=sys.stderr)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except 'None' (= taken from the dataset preset or the data)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, a bad choice, a non-number) are UserErrors: one `error:` line and
    exit code 1 through run_cli, like every other refused input (plain argparse prints its usage and exits 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- device & torchrun

DIST_TIMEOUT_S = 24 * 3600  # a collective's patience under torchrun (setup_distributed; NCCL's own is 10 minutes)


def get_device(name="auto"):
    """cuda > mps > cpu, or the device the user named. Nothing touches CUDA unless it exists.

    Under torchrun each rank takes its own GPU, cuda:LOCAL_RANK: `--device cuda` means that; an explicit index would
    put every rank on one GPU, so it is refused."""
    name = rank_device(name, torch.cuda.is_available())
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: nothing to compute on
            raise UserError(f"unknown --device '{name}' (auto, cpu, cuda, cuda:N, mps)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available on this machine (use --device auto or cpu)")
        try:  # tried, not only parsed: cuda:7 on a 2-GPU machine fails here, before anything is written
            (torch.ones(2, device=device) * 2).sum().item()
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"--device {name} does not run on this machine ({(str(e).splitlines() or [''])[0]})") \
                from None
        return device
    if torch.cuda.is_available():
        local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= count:  # torchrun --nproc_per_node=8 copied onto a machine with fewer GPUs
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on this "
                            f"machine, which has {count} GPU(s): use torchrun --nproc_per_node={count}")
        return torch.device(f"cuda:{local}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


SHM_NEEDED = 2**30  # bytes of /dev/shm below which DataLoader workers are turned off (8 of them need ~1 GiB)


def shm_bytes(shm="/dev/shm"):
    return shutil.disk_usage(shm).total if os.path.isdir(shm) else 0


def existing_folder(path):
    """The nearest folder at or above `path` that exists (where a path not made yet would be written)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def default_workers(device, shm="/dev/shm"):
    """DataLoader workers decoding images: 8 (at most the cores) with CUDA, whose students train faster than one
    process decodes JPEGs; none on a CPU, whose cores the training itself needs; none where /dev/shm, through which
    workers pass their batches, is smaller than 1 GiB (Docker's default is 64 MB: 8 workers would die of a bus error
    minutes into a training), said once."""
    if device.type != "cuda":
        return 0
    size = shm_bytes(shm)
    if size < SHM_NEEDED:
        print0(f"note: DataLoader workers off: {shm} holds {size / 2**20:.0f} MB (8 workers need ~1 GiB); start the "
               f"container with --shm-size=8g to use them, or pass --num-workers")
        return 0
    return min(8, os.cpu_count() or 1)


def rank_device(name, cuda):
    """--device as this rank reads it: under torchrun `cuda` is cuda:LOCAL_RANK, and an explicit index is refused
    (it would put every rank on one GPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and name.startswith("cuda:"):
        raise UserError(f"--device {name} under torchrun would put every rank on one GPU; pass --device cuda (each "
                        f"rank takes cuda:LOCAL_RANK)")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if name == "cuda" and cuda else name


def setup_distributed(device, timeout_s=DIST_TIMEOUT_S):
    """Join the process group if launched by torchrun; return (rank, world_size).

    timeout_s: how long a collective may wait. NCCL's default (10 minutes) is shorter than the one-rank work a run
    does while the others wait (rank 0 trains theta* or IGD's surrogate, downloads a dataset, samples a class block
    more than another rank): the other ranks wait for such work by polling for its file (wait_for_rank0) and every
    collective gets this timeout (`--dist-timeout`)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"  # gloo = the CPU test path
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


OUT_OF_MEMORY = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")  # how allocation failures read when they surface as RuntimeError


def out_of_memory(e):
    """Whether an exception is the device running out of memory: torch.OutOfMemoryError, or a RuntimeError from CUDA,
    cuBLAS or cuDNN that says so."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and
                                                      any(text in str(e) for text in OUT_OF_MEMORY))


def free_memory():
    """Give the device's cached memory back (call outside an `except`: its traceback keeps the failed tensors)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def wait_for_rank0(path, what, poll_s=1.0):
    """Ranks other than 0 wait until rank 0 has made `path` (a cache entry, a download) by looking for it, not in a
    collective that would time out during hours of one-rank work; then all ranks meet. Rank 0 returns at once."""
    if dist.is_initialized() and not is_main():
        shown = False
        while not os.path.exists(path):
            if not shown:
                print(f"rank {dist.get_rank()}: waiting for rank 0 to make {what} ({path})", flush=True)
                shown = True
            time.sleep(poll_s)
    barrier()


def all_reduce_sum(value):
    """Sum an int over ranks (e.g. per-rank counters); the value itself in a single process."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.long, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(tensor)
    return int(tensor.item())


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] (pickled over the process group); [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_state(model):
    """Under torchrun: rank 0's parameters and buffers (batch-norm running statistics too) on every rank, in place."""
    if dist.is_initialized():
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
    return model


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def seconds_per_call(fn, device, repeats=2, median=False):
    """Wall seconds per call of fn() after one warm-up call (first-call allocations and kernel selection are not
    its cost), waiting for the GPU where there is one (bench.py, preflight.py). median: of the repeats, so one
    hiccup of a busy machine does not price the call (millisecond calls on a CPU); else the mean."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) if median else sum(times) / repeats


# ----------------------------------------------------------------------------- seeds

def derive_seed(*parts):
    """A 63-bit seed from a tuple like (run seed, class, image index, candidate) or (run seed, what, n).

    Hashing (instead of arithmetic) keeps the seeds of different images unrelated and makes image i
    of class c independent of batch size, world size and of how many images came before it.
    """
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# What each random stream of a run is for: derive_seed(run seed, SALT, n). An image's noise is
# derive_seed(run seed, class, index, candidate) (four parts), so no salted stream can collide with it.
SALT_STAGE_INIT = 7        # the init of the stage-k student (n = k)
SALT_STAGE_TRAIN = 8       # its batches and augmentations
SALT_EVAL_INIT = 11        # evaluation run n: init
SALT_EVAL_TRAIN = 12       # evaluation run n: batches and augmentations
SALT_REDUNDANCY_INIT = 13  # the redundancy model trained on increment n: init
SALT_REDUNDANCY_TRAIN = 14
SALT_PREFLIGHT = 16        # the preflight's student (n = 0: init, 1: batches) and its guided batch's noise (n = 2)


def stream_seed(seed, salt, n=0):
    """A seed for torch.Generator / manual_seed (< 2**31 so every API accepts it)."""
    return derive_seed(seed, salt, n) % 2**31


# ----------------------------------------------------------------------------- atomic writes

# A temporary has one reserved, unmistakable name: `.<name>.lgd-tmp-<pid>` beside its target. Only
# names of this form are ever removed as stale, and only inside folders the run owns.
TEMPORARY = re.compile(r"^\..+\.lgd-tmp-\d+$")


def temporary_path(path):
    """The reserved temporary name of `path` for this process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.lgd-tmp-{os.getpid()}")


# How a write that ran out of room shows itself: ENOSPC (a full disk), EFBIG (a file-size limit, `ulimit -f`),
# EDQUOT (a quota); torch.save's zip writer turns them into a RuntimeError that names no errno at all.
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left")


def is_disk_full(e):
    """Whether an exception raised while writing means "no room for the file" (see DISK_ERRNOS)."""
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    return isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILURES)


def disk_full(path):
    """The one exception every out-of-room write becomes: run_cli prints it as `error: disk full: <path>`."""
    return OSError(errno.ENOSPC, "disk full", os.path.abspath(path))


def atomic_write(path, write, verify=False):
    """Write via `write(tmp_path)` then rename: readers see the old file or the whole new one.

    On any failure (disk full, Ctrl-C) the temporary is removed before the error goes on; a write that ran out of
    room (however the OS or torch reports it) becomes `disk full: <path>`. verify: if `path` exists already, the new
    bytes must equal it (a resumed run recomputing a file it wrote before); they are compared and the old file is
    kept, and a difference is a UserError naming the file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        try:
            write(tmp)
        except Exception as e:  # sorted: out of room -> one line; anything else goes on as it is
            if is_disk_full(e):
                raise disk_full(path) from None
            raise
        if verify and os.path.exists(path):
            same = _same_bytes(tmp, path)
            remove_path(tmp)
            if not same:
                raise Mismatch(path)
            return
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


class Mismatch(UserError):
    """A file a resumed run recomputed differs from the one on disk (a damaged or foreign file)."""

    def __init__(self, path):
        self.path = path
        super().__init__(f"{path} is not what this run computes for it (damaged, edited, or written on another "
                         f"machine or thread count)")


def file_stamps(paths):
    """[(path, size, modification time)] of files: what a cache keyed on files changes with (cheaper than hashing
    them; a file rewritten in place gets a new time)."""
    return [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]


def file_sha256(path):
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def remove_path(path):
    """Remove a file or a folder tree if it exists (a temporary left by a failed write)."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_writable(folder):
    """Create `folder` and write (then remove) a reserved temporary in it: an unwritable output (read-only,
    a file in the way, a full disk) fails here, before hours of work, as one line naming the path."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is a file, not a folder")
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, ".write-check"), lambda tmp: open(tmp, "w").close())
    remove_path(os.path.join(folder, ".write-check"))


def check_output_file(path, flag):
    """An output file's path, checked before the work that fills it: not a folder, and its folder (made if need be)
    writable. One line naming the path otherwise."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file path")
    parent, probe = os.path.dirname(os.path.abspath(path)), existing_folder(path)
    if probe != os.path.abspath(path) and not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder")
    try:
        check_writable(parent)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None


def copy_file(source, path):
    """Copy a finished file (e.g. a stage's PNG into distilled/), atomically."""
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


STAMP = "written_by"  # what made an output file a user named (ground.folder.check_output reads it back)


def stamp_of(path):
    """Which lgd command wrote a file a flag names (its stamp: a JSON key, a Markdown comment, an image's text
    field), or None for a file lgd did not write that way."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                obj = json.load(f)
            return obj.get(STAMP) if isinstance(obj, dict) else None
        if path.endswith(".md"):
            with open(path) as f:
                first = f.readline()
            return first[len("<!-- written_by: "):-len(" -->\n")] if first.startswith("<!-- written_by: ") else None
        with Image.open(path) as im:
            value = im.info.get(STAMP, im.info.get("comment"))
        return value.decode() if isinstance(value, bytes) else value
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def save_json(obj, path, verify=False, stamp=None):
    """Strict JSON (a NaN or inf is an error here, not a bare `NaN` no JSON reader accepts), atomically. stamp: the
    command that wrote it, recorded in it (an output a user named: see stamp_of)."""
    text = json.dumps(obj if stamp is None else dict(obj, **{STAMP: stamp}), indent=2, allow_nan=False)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write, verify)


def load_json(path, what="file", remedy=None):
    """A JSON file, or one clear line naming it if it is damaged (with `remedy`: what to do about it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.__class__.__name__}); " +
                        (remedy or "it was damaged or not written by lgd")) from None


def save_torch(obj, path, verify=False):
    atomic_write(path, lambda tmp: torch.save(obj, tmp), verify)


def png_image(image):
    """(C, H, W) float tensor in [0, 1] (C = 1 or 3) -> the 8-bit PIL image a PNG of it holds (grey or RGB)."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")


def save_png(image, path, verify=False):
    """image: (C, H, W) float tensor in [0, 1] (C = 1 or 3) -> 8-bit PNG, atomically.

    A non-finite image (NaN from a bad scale) is refused: clamping would silently write solid black.
    """
    if not torch.isfinite(image).all():
        raise UserError(f"refusing to write {path}: the image is not finite (NaN/inf); check the guidance and CFG "
                        f"scales")
    pil = png_image(image)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"), verify)


def save_grid(images, path, row_names, col_names, title="", cell=None, stamp=None):
    """A labelled sample grid people can look at instead of reading numbers.

    images: (rows * cols, C, H, W) in [0, 1], row-major; row_names / col_names label them (e.g. class
    names and image indices marked "guided"). Small images (8 px digits) are enlarged (nearest) to `cell`.
    stamp: the command that wrote it, in the image's text (a PNG text chunk, a JPEG comment; see stamp_of).
    """
    rows, cols = len(row_names), len(col_names)
    h, w = images.shape[-2:]
    cell = cell or max(h, 64 if h < 32 else h)
    scale = max(1, cell // h)
    big = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest") if scale > 1 else images.float().cpu()
    ch, cw = big.shape[-2:]
    left = max(40, 7 * max(len(str(n)) for n in row_names) + 8)
    top = 34 if title else 18
    canvas = Image.new("RGB", (max(left + cols * (cw + 2), 6 * len(title) + 8), top + rows * (ch + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for j, name in enumerate(col_names):
        draw.text((left + j * (cw + 2) + 2, top - 14), str(name), fill="black")
    for r, name in enumerate(row_names):
        draw.text((4, top + r * (ch + 2) + ch // 2 - 5), str(name), fill="black")
        for j in range(cols):
            x = big[r * cols + j].clamp(0, 1)
            array = (x.expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(array, "RGB"), (left + j * (cw + 2), top + r * (ch + 2)))
    fmt, extra = image_format(path), {}
    if stamp is not None and fmt == "PNG":
        extra["pnginfo"] = PngImagePlugin.PngInfo()
        extra["pnginfo"].add_text(STAMP, stamp)
    elif stamp is not None:
        extra["comment"] = stamp.encode()
    atomic_write(path, lambda tmp: canvas.save(tmp, format=fmt, **extra))


def image_format(path):
    """The image format a file name asks for (.png, .jpg, ...), as PIL names it; an unknown extension is refused."""
    extension = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(extension)
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{path}: cannot write an image with extension '{extension}' (use .png or .jpg)")
    return fmt


def load_saved(path, remedy):
    """A file a run saved with torch.save, or one line naming it as damaged and what to do (`remedy`)."""
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # truncated / foreign file: one line, not the unpickler's traceback
        raise UserError(f"{path} is damaged ({e.__class__.__name__}); {remedy}") from None


def load_or_none(path, what):
    """A file a rerun can regenerate (a stage's student): its contents, or None (and a notice) if it is damaged."""
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:
        print0(f"{what} {path} is damaged ({e.__class__.__name__}); regenerating it")
        return None


def quoted(path):
    """A path as a shell reads it back: a printed command works as printed, spaces and quotes in names included."""
    return shlex.quote(str(path))


def git_commit():
    """The commit this run came from (written into every output folder), or 'unknown'."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
