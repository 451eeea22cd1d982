"""The code paths a first GPU run takes, proven where no GPU is: torchrun's one-rank waits (gloo, a short timeout, a
slow rank 0), how class blocks are dealt to ranks, devices under torchrun, out-of-memory errors in every form CUDA
raises them, TF32 recorded."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import distill
from conftest import LGD, REPO, cli
from ground import common
from ground.common import UserError, out_of_memory, rank_device
from ground.run import sampler_batches

SLOW_RANK_0 = """
import sys, time
import torch
from ground.common import setup_distributed, wait_for_rank0
rank, world = setup_distributed(torch.device("cpu"), timeout_s=float(sys.argv[2]))
if rank == 0:
    time.sleep(3 * float(sys.argv[2]))  # one-rank work (theta*, a download) longer than the collectives' timeout
    open(sys.argv[1], "w").close()
wait_for_rank0(sys.argv[1], "the entry", poll_s=0.05)
open(f"{sys.argv[1]}.through{rank}", "w").close()  # a file per rank: two ranks' prints can interleave on one pipe
"""


@pytest.mark.slow
def test_a_rank_waits_out_long_one_rank_work_without_a_collective_timing_out(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RANK_0)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                        str(script), str(tmp_path / "entry"), "1"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("entry.through*")) == ["entry.through0", "entry.through1"]
    assert "waiting for rank 0 to make the entry" in r.stdout


@pytest.mark.parametrize("classes,batch,kappa", [(10, 24, 3), (10, 24, 1), (10, 128, 2), (1000, 24, 3),
                                                 (1000, 5000, 1)])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_no_rank_is_idle_while_another_has_two_blocks_and_every_class_is_dealt_once(classes, batch, kappa, world):
    dealt = [sampler_batches(classes, batch, kappa, rank, world) for rank in range(world)]
    counts = [len(blocks) for blocks in dealt]
    assert not (min(counts) == 0 and max(counts) >= 2)
    assert max(counts) - min(counts) <= 1  # round robin: balanced to one block
    assert sorted(c for blocks in dealt for block in blocks for c in block) == list(range(classes))
    assert all(len(block) * kappa <= max(batch, kappa) for blocks in dealt for block in blocks)  # never over the batch
    if world <= classes:
        assert min(counts) >= 1  # every rank has work when there are classes enough
    single = sampler_batches(classes, batch, kappa)
    if len(single) >= world:  # as many blocks as ranks: the same batches as one process (the same bytes)
        assert sorted(map(tuple, (b for blocks in dealt for b in blocks))) == sorted(map(tuple, single))


def test_ten_classes_on_eight_gpus_keep_eight_busy():
    """ImageWoof's batch 24 with kappa 3 made 2 blocks of 8 and 2 classes: 6 of 8 GPUs idle; now 8 blocks."""
    assert sum(1 for rank in range(8) if sampler_batches(10, 24, 3, rank, 8)) == 8


def test_devices_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda", cuda=True) == "cuda:3"
    assert rank_device("cpu", cuda=True) == "cpu"
    with pytest.raises(UserError, match="would put every rank on one GPU; pass --device cuda"):
        rank_device("cuda:0", cuda=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device("cuda:1", cuda=True) == "cuda:1"  # a single process may pick its GPU


@pytest.mark.parametrize("error,oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
    (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), False),
])
def test_out_of_memory_in_every_form_cuda_raises_it(error, oom, capsys):
    assert out_of_memory(error) == oom
    def fails():
        raise error
    if oom:  # the CLI's line says what to do
        with pytest.raises(SystemExit):
            common.run_cli(fails)
        assert "lower --batch-size" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: out of memory"),
                                   RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")])
def test_a_runtime_out_of_memory_halves_the_batch_like_any_other(pixel_prior, tmp_path, monkeypatch, capsys, error):
    import curriculum
    monkeypatch.chdir(tmp_path)
    original = curriculum.sample_images

    def small_device(prior, spec, classes, *args, **kwargs):
        if len(classes) > 5:  # "the GPU" holds 5 classes
            raise error
        return original(prior, spec, classes, *args, **kwargs)
    monkeypatch.setattr(curriculum, "sample_images", small_device)
    out = []
    assert cli(distill.main, [*LGD, "--prior", pixel_prior, "--batch-size", 20, "--out-dir", tmp_path / "r"], capsys,
               out)[0] == 0
    assert "sampler batch halved to 10" in out[0]

    def broken(*args, **kwargs):  # not memory: raised as it is
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(curriculum, "sample_images", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        distill.main([str(a) for a in [*LGD, "--prior", pixel_prior, "--out-dir", tmp_path / "s"]])


@pytest.mark.parametrize("keep", [False, True])
def test_a_resumed_batch_keeps_the_disks_files_on_a_nondeterministic_device_and_checks_them_elsewhere(tmp_path, keep):
    """A recomputation that differs from the files on disk (in the last bits, or a candidate tie tipped the other way:
    simulated by another latent, image and record): on CUDA (keep) the disk's files stay as they are and only a
    missing one is written; on the CPU, whose recomputation is exact, any difference is damage."""
    from data import get_spec
    from ground.common import Mismatch
    from ground.run import Increment
    spec = get_spec("digits")
    inc = Increment(spec, str(tmp_path / "images"), str(tmp_path / "latents"), str(tmp_path / "records"), range(1))
    latent, image = torch.randn(1, 8, 8), torch.rand(1, 8, 8)
    record = dict(kept_candidate=1, candidates={"S": [0.25, 1.5, -0.75]})
    inc.write(3, 0, latent, image, record)
    os.remove(tmp_path / "images" / "3" / "00000.png")  # killed before its PNG
    other = dict(kept_candidate=0, candidates={"S": [1.5, 1.5 * (1 - 1e-7), -0.75]})
    if keep:
        inc.write(3, 0, latent * (1 + 1e-6), image, other, keep=True)
        assert torch.equal(torch.load(tmp_path / "latents" / "3" / "00000.pt"), latent)  # the disk's kept
        assert json.loads((tmp_path / "records" / "3" / "00000.json").read_text()) == record
        assert (tmp_path / "images" / "3" / "00000.png").exists()  # the missing one written
    else:
        with pytest.raises(Mismatch):
            inc.write(3, 0, latent * (1 + 1e-6), image, other)


@pytest.mark.parametrize("stream", [False, True])
def test_each_rank_reads_only_its_slice_and_a_large_set_keeps_one_loader(stream, monkeypatch):
    """Under DDP every rank takes its slice of each global batch: the ranks' slices are the global batch, and a set
    streamed from disk (over the in-memory cap) decodes on each rank only its own images, through one DataLoader
    kept for every epoch (its workers persist)."""
    import train_student as ts
    from data import ImageSet, get_spec, load_real
    real = load_real(get_spec("digits"), None, "train").subset(range(40))
    if stream:  # over both caps: streamed from its files every epoch
        monkeypatch.setattr(ts, "MAX_IN_MEMORY", 0)
        monkeypatch.setattr(ts, "MAX_DECODED", 0)
    loads = []
    load = real.load
    real.load = lambda i: loads.append(i) or load(i)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    whole = [(x, y) for x, y in ts.batches(real, 8, order, 16, 0)]
    loads.clear()
    parts = [[(x, y) for x, y in ts.batches(real, 8, order, 16, 0, rank=r, world=2)] for r in range(2)]
    for n, (x, y) in enumerate(whole):  # rank r holds rows r, r + 2, ... of each global batch
        assert torch.equal(x[0::2], parts[0][n][0]) and torch.equal(x[1::2], parts[1][n][0])
        assert torch.equal(y[1::2], parts[1][n][1])
    if stream:
        # each image decoded once over both ranks, not once per rank (image 0 is also opened to learn the channels)
        assert all(loads.count(i) == 1 for i in range(1, 40)) and set(loads) == set(range(40))
        loaders = {id(ts._stream(real, 8, 1.0, 0)[1]) for _ in range(3)}
        assert len(loaders) == 1  # one loader for every epoch
    assert isinstance(real, ImageSet)


@pytest.mark.slow
def test_the_gpu_check_runs_its_checks_on_tiny_shapes(tmp_path, capsys):
    """`python -m tools.gpu_check` is what a first GPU user runs; here on the CPU with tiny shapes: the preflight of
    the paper's pipeline, a run from IGD's seed killed with SIGKILL in its guided stage, resumed and evaluated, the
    bench, an MGD3 run through the VAE encoder; torchrun skipped without two GPUs; the line to paste last. A second
    start reuses its folder (and the prior in it), and it never clears a folder it did not make."""
    from tools import gpu_check
    work = tmp_path / "work"
    checks = ["preflight", "run", "bench", "mgd3", "torchrun"]
    gpu_check.main(["--size", "tiny", "--device", "cpu", "--work", str(work), "--checks", *checks])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gpu_check (tiny shapes on cpu) will check: preflight, run, bench, mgd3, torchrun")
    verdicts = {line.split()[1]: line.split()[0] for line in lines if line[:4] in ("PASS", "FAIL", "SKIP")}
    assert verdicts == {"preflight": "PASS", "run": "PASS", "bench": "PASS", "mgd3": "PASS", "torchrun": "SKIP"}, lines
    assert lines[-1].startswith("gpu_check: cpu, torch ") and "run PASS" in lines[-1] and "fp32 guided x" in lines[-1]
    prior = os.stat(work / "prior-tiny" / "transformer" / "config.json").st_mtime_ns
    gpu_check.main(["--size", "tiny", "--device", "cpu", "--work", str(work), "--checks", "torchrun"])
    assert os.stat(work / "prior-tiny" / "transformer" / "config.json").st_mtime_ns == prior
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("")
    with pytest.raises(UserError, match="not a folder this check made"):
        gpu_check.main(["--size", "tiny", "--device", "cpu", "--work", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_the_gpu_check_refuses_at_once_where_there_is_no_cuda(tmp_path, capsys):
    from tools import gpu_check
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA runs the check")
    with pytest.raises(UserError, match="CUDA is not available on this machine: .* --size tiny --device cpu"):
        gpu_check.main(["--work", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_the_environment_check_says_what_will_fail_and_how_to_fix_it(tmp_path, monkeypatch):
    """tools/env.py on this machine (no CUDA, no network): one line each; a small /dev/shm under CUDA is a warning
    with its remedy; no hub and no cached weights is a FAIL naming --prior and --vae."""
    from tools import env
    lines = dict((line.split(":")[0], (status, line)) for status, line in env.environment(str(tmp_path)))
    assert set(lines) == {"gpu", "/dev/shm", "disk", "hub"}
    assert {line.split(":")[0] for _, line in env.environment(str(tmp_path), hub=False)} == {"gpu", "/dev/shm", "disk"}
    monkeypatch.setattr(env, "hub_reachable", lambda: False)
    monkeypatch.setattr(env.os.path, "isdir", lambda path: False)  # no hub cache either
    assert env.hub_line()[0] == "FAIL" and "--prior DIR / --vae DIR" in env.hub_line()[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    usage = type("Usage", (), dict(total=64 * 2**20))
    monkeypatch.setattr(env.os.path, "isdir", lambda path: True)
    monkeypatch.setattr(env.shutil, "disk_usage", lambda path: usage)
    status, line = env.shm_line()
    assert status == "warn" and "64 MB" in line and "--shm-size=8g" in line


def test_a_large_set_of_files_is_decoded_once_into_a_memmap_every_run_shares(tmp_path, monkeypatch):
    """Over the in-memory cap, a set of image files is decoded once into a uint8 memmap on disk: the same tensor as
    the in-memory decode, and a second reader of the same files (another run, another epoch) decodes nothing."""
    import train_student as ts
    from data import ImageSet
    from ground.common import save_png
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(12):
        save_png(torch.rand(3, 20, 20, generator=g), str(tmp_path / "set" / f"{i}.png"))
        paths.append(str(tmp_path / "set" / f"{i}.png"))
    labels = [i % 3 for i in range(12)]
    in_memory = ts.prepared(ImageSet(paths, labels, channels=3), 16)
    monkeypatch.setattr(ts, "MAX_IN_MEMORY", 0)
    monkeypatch.setattr(ts, "DECODED_DIR", str(tmp_path / "decoded"))
    first = ts.prepared(ImageSet(paths, labels, channels=3), 16)
    assert torch.equal(first, in_memory) and len(os.listdir(tmp_path / "decoded")) == 1
    again, loads = ImageSet(paths, labels, channels=3), []
    load = again.load
    again.load = lambda i: loads.append(i) or load(i)
    assert torch.equal(ts.prepared(again, 16), in_memory) and loads == []  # decoded once, read back


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    """The README's `--nproc_per_node=8` copied onto a 2-GPU machine: rank 3 refuses in one line, naming the count."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(UserError, match=r"torchrun started 8 processes on this machine, which has 2 GPU\(s\): use "
                                        r"torchrun --nproc_per_node=2"):
        common.get_device("auto")


def test_a_small_dev_shm_turns_the_dataloader_workers_off_with_its_remedy(tmp_path, monkeypatch, capsys):
    """Docker's 64 MB /dev/shm would kill 8 workers with a bus error minutes into theta*'s training: no workers, said
    once with the flag that fixes it; with room, 8 (at most the cores); on a CPU none."""
    usage = type("Usage", (), {})
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: setattr(usage, "total", 64 * 2**20) or usage)
    cuda = torch.device("cuda", 0)
    assert common.default_workers(cuda, shm=str(tmp_path)) == 0
    assert "--shm-size=8g" in capsys.readouterr().out
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: setattr(usage, "total", 8 * 2**30) or usage)
    assert common.default_workers(cuda, shm=str(tmp_path)) == min(8, os.cpu_count())
    assert common.default_workers(torch.device("cpu")) == 0


def test_the_data_tree_is_opened_once_and_a_dry_run_reads_none_of_it(tmp_path, monkeypatch, capsys):
    """Every image header of a tree is read once (ImageNet's 1.33M take minutes): a marker keyed by its class folders
    spares the next start, resume and rank; a file added makes it read again; a dry run reads no data at all."""
    import data
    from conftest import make_fake_imagewoof
    monkeypatch.chdir(tmp_path)
    tree = make_fake_imagewoof(str(tmp_path / "woof"))
    spec = data.get_spec("imagewoof")
    opened, original = [], data.Image.open
    monkeypatch.setattr(data.Image, "open", lambda path, *a, **k: opened.append(path) or original(path, *a, **k))
    data.check_images(spec, tree)
    assert len(opened) == 60  # 10 classes x (4 train + 2 val)
    data.check_images(spec, tree)
    assert len(opened) == 60  # the marker: not opened again
    data.Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(f"{tree}/train/{spec.wnids[0]}/new.JPEG")
    data.check_images(spec, tree)
    assert len(opened) == 121  # a class folder changed: opened again
    opened.clear()
    assert cli(distill.main, ["--dataset", "imagewoof", "--method", "mgd3", "--data-dir", tree, "--dry-run"],
               capsys)[0] == 0
    assert opened == []


DDP_STUDENT = """
import sys, torch
from ground.common import setup_distributed
from train_student import Trainer
from data import ImageSet, get_spec, with_view
from model import make_student
rank, world = setup_distributed(torch.device("cpu"))
view = with_view(get_spec("digits"), res=16)
images = ImageSet([torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(40)],
                  [i % 10 for i in range(40)])
model = Trainer("cpu", 0, rank, world).train(make_student("resnet18_bn", view, seed=0), images, view, "minimax", 2, 0)
torch.save(model.state_dict(), f"{sys.argv[1]}.rank{rank}")
"""


@pytest.mark.slow
def test_after_a_ddp_training_every_rank_holds_rank_0s_batch_norm_statistics(tmp_path):
    """DDP averages gradients, not BatchNorm's running statistics: each rank saw its own slice of every batch, so
    each would guide with its own statistics, and only rank 0's are saved. The trainer broadcasts rank 0's."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_STUDENT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        str(script), str(tmp_path / "student")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / f"student.rank{rank}") for rank in (0, 1))
    assert any("running_mean" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
