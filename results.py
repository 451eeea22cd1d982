"""
Every digits number in the README, printed from run folders this script makes (or reuses): the
tables are regenerated from the current commit by running it, not typed in.

  python results.py sweep         # LGD's digits constants (seed 0 only; seeds 1-2 stay held out)
  python results.py igd-sweep     # IGD's digits constants (seed 0 only)
  python results.py ablation      # the paper's ablation, IPC 10: DiT .. LGD .. random real, 3 seeds x 3 students
  python results.py ablation-ipc5 # the same at IPC 5 (5 stages of 1)
  python results.py main          # the LGD / DiT / random real rows of `ablation` (the headline table)
  python results.py ablation --jobs 2   # two runs at a time, one CPU thread each

A cell is one distillation (distill.py) plus what the tables show about it, each a file in its folder:
eval.json (3 students of the guiding architecture, ConvNet), eval_mlp.json (3 students of an
architecture no stage student or theta* used: the cross-architecture column), redundancy.json (the
set cut into increments in generation order) and validity.json (the share theta* recognises).
Cells live in out/results/<name>_seed<S>/; a cell whose files exist is not recomputed, so an
interrupted run of this script resumes. Student seeds are the same for every cell (paired), and every
cell runs on one CPU thread, so the numbers do not depend on --jobs.
"""
import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import load_json
from run_folder import eval_path, redundancy_path, validity_path

HERE = os.path.dirname(os.path.abspath(__file__))
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
    "LGD (dit seed)": [],
    "LGD (igd seed)": ["--seed-set", "igd"],
    "LGD, omega 0 (DiT+Loss)": ["--omega", "0"],
    "random real": "real",
}
MAIN = {name: ABLATION[name] for name in ("LGD (dit seed)", "DiT", "random real")}
IPC5 = ["--ipc", "5", "--stage-ipc", "1"]
ABLATION_IPC5 = {f"{name}, IPC 5": (flags + IPC5 if flags != "real" else "real5") for name, flags in ABLATION.items()}
IGD_SWEEP = {f"IGD k {k:g}, gamma {gamma:g}": ["--method", "igd", "--igd-scale", str(k), "--igd-deviation", str(gamma)]
             for k, gamma in [(k, g) for k in (5, 25, 125) for g in (0, 1, 5)] + [(500, 5), (2000, 5)]}
SWEEP = {  # seed 0 only; (lambda, gamma) pairs around the preset, plus the two structural variants
    f"lambda {scale:g}, gamma {gamma:g}": ["--guidance-scale", str(scale), "--deviation-scale", str(gamma)]
    for scale in (15, 60, 125, 250, 500) for gamma in (0, 1, 5)
}
SWEEP.update({"lambda 125, gamma 5, omega 0": ["--guidance-scale", "125", "--deviation-scale", "5", "--omega", "0"],
              "lambda 125, gamma 5, eps form": ["--guidance-scale", "125", "--deviation-scale", "5",
                                                "--guidance-form", "eps"]})
TABLES = {"sweep": (SWEEP, (0,)), "igd-sweep": (IGD_SWEEP, (0,)), "ablation": (ABLATION, SEEDS),
          "ablation-ipc5": (ABLATION_IPC5, SEEDS), "main": (MAIN, SEEDS)}  # (cells, seeds)


def folder(name, seed):
    return os.path.join(ROOT, f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_seed{seed}")


def commands(name, flags, seed):
    """The commands that fill one cell, each with the file it produces (skipped when that exists)."""
    out, py = folder(name, seed), [sys.executable]
    if flags in ("real", "real5"):  # random real images: K per class drawn with the cell's seed
        ipc = "10" if flags == "real" else "5"
        base = [os.path.join(HERE, "evaluate.py"), "--dataset", "digits", "--real-ipc", ipc, "--seed", str(seed)]
        if flags == "real5":  # cut like the 5-stages-of-1 sets
            base += ["--stage-ipc", "1"]
        return [(eval_path(out), py + base + ["--out", out]),
                (eval_path(out, CROSS), py + base + ["--out", out, "--arch", CROSS]),
                (redundancy_path(out), py + base + ["--out", out, "--redundancy", "real"])]
    evaluate = [os.path.join(HERE, "evaluate.py")]
    return [(eval_path(out), py + [os.path.join(HERE, "distill.py"), *flags, "--seed", str(seed), "--out-dir", out,
                                   "--eval"]),
            (eval_path(out, CROSS), py + evaluate + ["--distilled", out, "--arch", CROSS]),
            (redundancy_path(out), py + evaluate + ["--redundancy", out]),
            (validity_path(out), py + evaluate + ["--validity", out])]


def fill(cell, threads):
    """Run a cell's missing commands in order; returns the cell's name."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for target, command in commands(*cell):
        if not os.path.exists(target):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return f"{cell[0]} seed {cell[2]}"


def summary(name, flags, seeds):
    """One table row: accuracies pooled over seeds x students (n), redundancy and validity per seed."""
    accs, cross, red, valid = [], [], [], []
    for seed in seeds:
        out = folder(name, seed)
        accs += load_json(eval_path(out))["accs"]
        if os.path.exists(eval_path(out, CROSS)):
            cross += load_json(eval_path(out, CROSS))["accs"]
        red.append(load_json(redundancy_path(out))["off_diagonal_mean"])
        if os.path.exists(validity_path(out)):  # random real cells have no theta* validity
            valid.append(load_json(validity_path(out))["validity"])
    pct = lambda values: f"{100 * np.mean(values):.1f} +- {100 * np.std(values):.1f} (n={len(values)})" \
        if values else "-"  # noqa: E731
    per_seed = lambda values: (f"{100 * np.mean(values):.1f}" + (  # noqa: E731
        f" ({' / '.join(f'{100 * v:.1f}' for v in values)})" if len(values) > 1 else "")) if values else "-"
    return [name, pct(accs), pct(cross), per_seed(red), per_seed(valid)]


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main():
    p = argparse.ArgumentParser(description="Make (or reuse) the digits runs behind the README's tables and print them.")
    p.add_argument("table", choices=list(TABLES), help="which table")
    p.add_argument("--jobs", type=int, default=1, help="cells run at a time (each with one CPU thread when > 1)")
    args = p.parse_args()
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
    header = [f"digits: {args.table}", "acc % ConvNet (guiding arch)", f"acc % {CROSS} (cross-arch)",
              "redundancy % (5 increments)", "theta* recognises %"]
    print(table([summary(name, flags, seeds) for name, flags in cells.items()], header))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    print(f"\n(commit {commit.strip()}; accuracies: final epoch, mean +- std over {len(seeds)} distillation seed(s) x 3 "
          f"students; redundancy and validity: mean (per seed))")


if __name__ == "__main__":
    main()
