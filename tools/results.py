"""
Every number of the README's tables and docs/results.md, printed from run folders this script makes (or reuses): the
tables are regenerated from the current commit by running it, not typed in.

  python -m tools.results quickstart    # the README's CPU quick start, run as a fresh clone runs it: time and result
  python -m tools.results main          # digits, IPC 10: DiT, IGD, MGD3, LGD on each seed, random real (3 x 3)
  python -m tools.results ablation      # the same with the paper's ablation rows (candidates, deviation, omega 0)
  python -m tools.results ablation-ipc5 # the ablation at IPC 5 (5 stages of 1)
  python -m tools.results mnist         # the latent tier: DiT .. LGD .. random real, four evaluators, 3 x 3
  python -m tools.results ablation --jobs 2   # two cells at a time, one CPU thread each

The sweeps that picked the embedded tiers' constants, and the tables of what did not work (guidance views,
ensembles, the robustness of S's gain, the regime candidates), are in docs/results.md and docs/regime.md with the
commit that reproduces each.

A cell is one distillation (distill.py) plus what the tables show about it, each a file in its folder: eval.json (3
students of the guiding architecture, ConvNet), eval_mlp.json (3 students of an architecture no stage student or
theta* used: the cross-architecture column), redundancy.json (the set cut into increments in generation order) and
validity.json (the share theta* recognises). Cells live in out/results/<name>_seed<S>/; a cell whose files exist is
not recomputed, so an interrupted run of this script resumes. Student seeds are the same for every cell (paired),
and every cell runs on one CPU thread (--threads 1), so the numbers do not depend on --jobs or the machine's cores.
"""
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data import ImageSet, get_spec, load_real, sample_real_ipc
from evaluate import logistic_regression
from ground.common import ArgumentParser, UserError, git_commit, load_json, require, run_cli, save_json
from ground.folder import distilled_dir, eval_path, redundancy_path, set_files, validity_path

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: distill.py, evaluate.py
ROOT = os.path.join("out", "results")
# the cross-architecture evaluator: no stage student or theta* is one. ResNetAP-10 (the paper's) costs ~5 CPU
# minutes per cell at 8 px; an MLP is another family and takes seconds.
CROSS = "mlp"
SEEDS = (0, 1, 2)

# name -> extra distill.py flags (on top of the digits preset); "real" cells are random real images
ABLATION = {
    "DiT": ["--method", "dit"],
    "DiT + candidates (kappa 3, lambda 0)": ["--guidance-scale", "0", "--deviation-scale", "0"],
    "DiT + deviation (lambda 0, kappa 1)": ["--guidance-scale", "0", "--candidates", "1"],
    "IGD": ["--method", "igd"],
    "MGD3": ["--method", "mgd3"],
    "LGD (dit seed)": [],
    "LGD (igd seed)": ["--seed-set", "igd"],
    "LGD (mgd3 seed)": ["--seed-set", "mgd3"],
    "LGD, omega 0 (DiT+Loss)": ["--omega", "0"],
    "random real": "real",
}
# the headline table: the paper's four generators on one sampler (DiT, IGD, MGD3, LGD), LGD on each seed, random real
MAIN = {name: ABLATION[name] for name in ("DiT", "IGD", "MGD3", "LGD (dit seed)", "LGD (igd seed)", "LGD (mgd3 seed)",
                                          "random real")}
IPC5 = ["--ipc", "5", "--stage-ipc", "1"]
ABLATION_IPC5 = {f"{name}, IPC 5": (flags + IPC5 if flags != "real" else "real5") for name, flags in ABLATION.items()}
# The latent tier (`--dataset mnist`: the decoder inside the guidance gradient). Four evaluators score every set: the
# ConvNet that guided, and three that took no part in any guidance: an MLP, logistic regression on the pixels, and
# ResNetAP-10 at 32 px (the field's network, IDC's small stem).
MNIST = ["--dataset", "mnist"]
MNIST_EVALUATORS = ("mlp", "resnetap10")  # trained students besides the guiding ConvNet (+ logistic regression)
# students per set of each evaluator (3 by default): ResNetAP-10 at 32 px costs ~5 CPU minutes a student here, so one
# per distillation seed (n = 3 a row); the others three per seed (n = 9)
RUNS = {"resnetap10": 1}
MNIST_TABLE = {
    "mnist: DiT": MNIST + ["--method", "dit"],
    "mnist: DiT + candidates (kappa 3, lambda 0)": MNIST + ["--guidance-scale", "0", "--deviation-scale", "0"],
    "mnist: IGD": MNIST + ["--method", "igd"],
    "mnist: MGD3": MNIST + ["--method", "mgd3"],
    "mnist: LGD (dit seed)": MNIST,
    "mnist: LGD (igd seed)": MNIST + ["--seed-set", "igd"],
    "mnist: LGD (mgd3 seed)": MNIST + ["--seed-set", "mgd3"],
    "mnist: random real": "real-mnist",
}
TABLES = {"ablation": (ABLATION, SEEDS), "ablation-ipc5": (ABLATION_IPC5, SEEDS), "main": (MAIN, SEEDS),
          "mnist": (MNIST_TABLE, SEEDS)}
JUDGE = "convnet"  # validity is judged by the ConvNet theta* in every row, whichever architecture guided


def guiding_arch(flags):
    """The run's own architecture (--arch: theta* and the first per-stage student)."""
    return flags[flags.index("--arch") + 1] if isinstance(flags, list) and "--arch" in flags else "convnet"


def folder(name, seed):
    return os.path.join(ROOT, f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_seed{seed}")


def dataset_of(flags):
    """The dataset a cell distils: digits unless its flags say --dataset (or it is mnist's random real cell)."""
    if flags == "real-mnist":
        return "mnist"
    return flags[flags.index("--dataset") + 1] if isinstance(flags, list) and "--dataset" in flags else "digits"


def commands(name, flags, seed):
    """The commands that fill one cell, each with the file it produces (skipped when that exists)."""
    out, py = folder(name, seed), [sys.executable]
    dataset = dataset_of(flags)
    others = (CROSS,) if dataset == "digits" else MNIST_EVALUATORS  # the evaluators that did not guide
    if flags in ("real", "real5", "real-mnist"):  # random real images: K per class drawn with the cell's seed
        ipc = "5" if flags == "real5" else "10"
        base = [os.path.join(HERE, "evaluate.py"), "--dataset", dataset, "--real-ipc", ipc, "--seed", str(seed)]
        if flags == "real5":  # cut like the 5-stages-of-1 sets
            base += ["--stage-ipc", "1"]
        return [(eval_path(out), py + base + ["--out", out])] + \
            [(eval_path(out, arch), py + base + ["--out", out, "--arch", arch, "--runs", str(RUNS.get(arch, 3))])
             for arch in others] + \
            [(redundancy_path(out), py + base + ["--out", out, "--redundancy", "real"])]
    evaluate = [os.path.join(HERE, "evaluate.py")]
    guided_by = guiding_arch(flags)
    crosses = [CROSS if guided_by == "convnet" else "convnet"] if dataset == "digits" else list(others)
    judge = None if guided_by == JUDGE else JUDGE
    return [(eval_path(out), py + [os.path.join(HERE, "distill.py"), *flags, "--seed", str(seed), "--out-dir", out,
                                   "--eval"])] + \
        [(eval_path(out, cross), py + evaluate + ["--distilled", out, "--arch", cross, "--runs",
                                                  str(RUNS.get(cross, 3))]) for cross in crosses] + \
        [(redundancy_path(out), py + evaluate + ["--redundancy", out]),
         (validity_path(out, judge), py + evaluate + ["--validity", out] + (["--arch", judge] if judge else []))]


def failed_path(out):
    """A cell whose sampler diverged (distill.py refused non-finite images): a result of its setting, kept."""
    return os.path.join(out, "failed.json")


def fill(cell, threads):
    """Run a cell's missing commands in order; returns the cell's name."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # distill.py: --threads too
    out = folder(cell[0], cell[2])
    for target, command in commands(*cell):
        if os.path.exists(failed_path(out)):
            break
        if not os.path.exists(target):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                line = (done.stderr.strip().splitlines() or ['?'])[-1]
                if "not finite" in line:  # the setting's samples diverged: its row says so, the others go on
                    save_json(dict(error=line, command=command), failed_path(out))
                    break
                raise UserError(f"{' '.join(command)} failed: {line}")
    return f"{cell[0]} seed {cell[2]}"


def pct(values):
    """Accuracies pooled over seeds x students: mean +- std (n), in percent; "-" where a column has none."""
    return f"{100 * np.mean(values):.1f} +- {100 * np.std(values):.1f} (n={len(values)})" if values else "-"


def per_seed(values):
    """A per-seed measure (redundancy, validity): the mean, then each seed's value; "-" where there is none."""
    if not values:
        return "-"
    return f"{100 * np.mean(values):.1f}" + (f" ({' / '.join(f'{100 * v:.1f}' for v in values)})"
                                             if len(values) > 1 else "")


def summary(name, flags, seeds):
    """One table row: accuracies pooled over seeds x students (n), redundancy and validity per seed."""
    if any(os.path.exists(failed_path(folder(name, seed))) for seed in seeds):
        return [name, "diverged: non-finite samples", "-", "-", "-"]
    accs, cross, red, valid = [], [], [], []
    for seed in seeds:
        out = folder(name, seed)
        accs += load_json(eval_path(out))["accs"]
        if os.path.exists(eval_path(out, CROSS)):
            cross += load_json(eval_path(out, CROSS))["accs"]
        red.append(load_json(redundancy_path(out))["off_diagonal_mean"])
        if os.path.exists(validity_path(out)):  # random real cells have no theta* validity
            valid.append(load_json(validity_path(out))["validity"])
    return [name, pct(accs), pct(cross), per_seed(red), per_seed(valid)]


def logreg(out, seed, dataset="digits"):
    """Accuracy of scikit-learn's multinomial logistic regression (lbfgs, C = 1) on a set's pixels (digits 64, mnist
    1024), tested on the held-out split: a family that took no part in any guidance, deterministic (one number per
    set). Cached as eval_logreg.json in the cell."""
    path = eval_path(out, "logreg")
    if not os.path.exists(path):
        spec = get_spec(dataset)
        train = ImageSet(*set_files(out, spec)[:2], channels=1) if os.path.isdir(distilled_dir(out)) else \
            sample_real_ipc(load_real(spec, None, "train"), int(load_json(eval_path(out))["ipc"]), seed)
        acc = logistic_regression(train, load_real(spec, None, "test"))
        save_json(dict(arch="logreg", runs=1, accs=[acc], acc_mean=acc, acc_std=0.0, train_images=len(train)), path)
    return load_json(path)["accs"]


def mnist_summary(name, flags, seeds):
    """One row of the mnist table: the guiding ConvNet (*), then the three evaluators that took no part in any
    guidance (MLP, logistic regression on the pixels, ResNetAP-10), redundancy, validity judged by theta*."""
    accs = {arch: [] for arch in ("convnet", "mlp", "logreg", "resnetap10")}
    red, valid = [], []
    for seed in seeds:
        out = folder(name, seed)
        for arch in ("convnet", *MNIST_EVALUATORS):
            accs[arch] += load_json(eval_path(out, None if arch == "convnet" else arch))["accs"]
        accs["logreg"] += logreg(out, seed, "mnist")
        red.append(load_json(redundancy_path(out))["off_diagonal_mean"])
        if os.path.exists(validity_path(out)):  # random real cells have no theta* validity
            valid.append(load_json(validity_path(out))["validity"])
    # the ConvNet family steered every set but DiT's, MGD3's (no classifier) and the real images (IGD's surrogate is a
    # ConvNet too)
    method = flags[flags.index("--method") + 1] if isinstance(flags, list) and "--method" in flags else "lgd"
    guided = isinstance(flags, list) and method not in ("dit", "mgd3")
    return [name] + [pct(accs[a]) + (" *" if a == "convnet" and guided else "") for a in accs] + \
        [per_seed(red), per_seed(valid)]


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def readme_block(heading):
    """The commands of the first ```bash block under a README heading, as argument lists."""
    with open(os.path.join(HERE, "README.md")) as f:
        block = re.search(rf"## {heading}.*?```bash\n(.*?)```", f.read(), re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.split("#")[0].strip()]


def quickstart(workdir=None):
    """The README's CPU quick start as a fresh clone runs it: every command of its block, in order, in an empty folder
    (nothing cached: the digits prior and theta* are trained by the first command), at the machine's default threads
    (what a newcomer gets), each timed. Rows: each command, its wall time, and what it wrote (accuracy, redundancy)."""
    workdir = workdir or tempfile.mkdtemp(prefix="quickstart_")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    rows = []
    for command in readme_block("CPU quick start"):
        start = time.time()
        done = subprocess.run([sys.executable, os.path.join(HERE, command[1]), *command[2:]], cwd=workdir, env=env,
                              capture_output=True, text=True)
        seconds = time.time() - start
        if done.returncode:
            raise UserError(f"`{shlex.join(command)}` failed in {workdir}: "
                            f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
        said = [line for line in done.stdout.splitlines() if line.startswith(("-> ", "wrote "))]
        result = "; ".join(line for line in (summarised(workdir, path) for path in written(said)) if line) or "-"
        rows.append([f"`{shlex.join(command)}`", f"{int(seconds // 60)} min {int(seconds % 60):02d} s", result])
    return rows, workdir


def written(lines):
    """The JSON results a command says it wrote (eval.json, eval_<arch>.json, redundancy.json, validity.json)."""
    return [path.rstrip(",") for line in lines for path in line.split() if path.rstrip(",").endswith(".json")]


def summarised(workdir, path):
    """One result file as the README states it."""
    result = load_json(os.path.join(workdir, path))
    if "acc_mean" in result:
        return f"{100 * result['acc_mean']:.1f} +- {100 * result['acc_std']:.1f} % (n = {result['runs']})"
    if "off_diagonal_mean" in result:
        return f"redundancy {100 * result['off_diagonal_mean']:.1f} %"
    return None


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.results",
                       description="Make (or reuse) the runs behind the README's tables and print them.")
    p.add_argument("table", choices=["quickstart", *TABLES], help="which table")
    p.add_argument("--jobs", type=int, default=1, help="cells run at a time (each with one CPU thread)")
    args = p.parse_args(argv)
    require(args.jobs >= 1, f"--jobs must be at least 1, got {args.jobs}")
    if args.table == "quickstart":
        rows, workdir = quickstart()
        print(table(rows, ["command", "wall time", "result"]))
        print(f"\n(commit {git_commit()[:7]}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; in {workdir})")
        return
    if args.jobs > (os.cpu_count() or 1):  # more single-threaded cells than cores only queue for the same cores
        print(f"--jobs {args.jobs} is more than the {os.cpu_count()} cores: running {os.cpu_count()} at a time")
        args.jobs = os.cpu_count() or 1
    cells, seeds = TABLES[args.table]
    # every cell runs single-threaded, whatever --jobs: multi-threaded convolutions round differently, and
    # the tables must not depend on how many cells ran at once. The first cell runs alone, so the digits
    # prior and theta* are trained once before cells run in parallel and would race for them.
    first = next(iter(cells.items()))
    fill((first[0], first[1], seeds[0]), 1)
    todo = [(name, flags, seed) for name, flags in cells.items() for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        for done in pool.map(lambda cell: fill(cell, 1), todo):
            print(f"done: {done}", flush=True)
    if args.table == "mnist":
        header = ["mnist, IPC 10", "acc % ConvNet", "acc % MLP", "acc % logistic regression", "acc % ResNetAP-10",
                  "redundancy % (5 increments)", "theta* recognises %"]
        print(table([mnist_summary(name, flags, seeds) for name, flags in cells.items()], header))
        print("\n(* = the family that steered the sampling: theta*, the stage students, IGD's surrogate)")
    else:
        header = [f"digits: {args.table}", "acc % ConvNet (guiding arch)", f"acc % {CROSS} (cross-arch)",
                  "redundancy % (5 increments)", "theta* recognises %"]
        print(table([summary(name, flags, seeds) for name, flags in cells.items()], header))
    print(f"\n(commit {git_commit()[:7]}; accuracies: final epoch, mean +- std over {len(seeds)} distillation "
          f"seed(s) x 3 students; redundancy and validity: mean (per seed); one CPU thread a cell)")


if __name__ == "__main__":
    run_cli(main)
