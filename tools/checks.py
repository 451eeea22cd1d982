"""
The checks every distill.py flag passes before anything is written, trained or downloaded, and the settings a
resumed run must keep. Each failure is one UserError line (ground.common.run_cli: `error: ...`, exit code 1).
"""
import math
import os
import re

from data import EMBEDDED
from ground.common import require
from mgd3 import uses_mgd3
from model import DIGITS_SCHEDULE
from reference import surrogate_epochs

# settings that change the images: a rerun into the same folder must use the same ones (the data tree,
# the precision, the sampler batch (float rounding) and the number of ranks a DDP student trains on
# included). {argparse dest: the flag a user recognises}
RESULT_ARGS = {"dataset": "--dataset", "method": "--method", "ipc": "--ipc", "stage_ipc": "--stage-ipc",
               "seed": "--seed", "prior": "--prior", "vae": "--vae", "sampler": "--sampler", "steps": "--steps",
               "cfg_scale": "--cfg-scale", "three_channels": "--cfg-three-channels", "arch": "--arch",
               "recipe": "--recipe", "student_epochs": "--student-epochs", "scale": "--guidance-scale",
               "omega": "--omega", "c0": "--c0", "deviation": "--deviation-scale", "candidates": "--candidates",
               "guide_from": "--guide-from", "guide_until": "--guide-until", "form": "--guidance-form",
               "through_dit": "--grad-through-dit", "memory_cap": "--memory-cap", "seed_set": "--seed-set",
               "res": "--res", "data_dir": "--data-dir", "precision": "--precision", "batch_size": "--batch-size",
               "student_ddp": "--student-ddp", "student_world": "ranks of a DDP student",
               "world_size": "ranks (torchrun --nproc_per_node: they cut the sampler's batches)",
               "reference": "--reference",
               "reference_epochs": "--reference-epochs", "igd_scale": "--igd-scale", "igd_deviation": "--igd-deviation",
               "igd_from": "--igd-from", "igd_until": "--igd-until", "grad_ipc": "--grad-ipc",
               "igd_checkpoints": "--igd-checkpoints", "igd_threshold": "--igd-threshold",
               "grad_decoder": "--grad-decoder"}
# MGD3's, for the runs that sample with it only: a run of another method (or of an lgd older than MGD3) does not
# depend on them, and its args.json need not say them
MGD3_ARGS = {"mode_scale": "--mode-scale", "mode_stop": "--mode-stop"}


def result_args(args):
    """The settings a rerun into the same folder must keep: RESULT_ARGS, and MGD3_ARGS where the run uses MGD3."""
    return {**RESULT_ARGS, **(MGD3_ARGS if uses_mgd3(args.method, args.seed_set) else {})}


def _finite(name, value, low, inclusive=True):
    """A float flag must be a finite number in range (NaN passes every comparison but this one)."""
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    require(ok, f"--{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")


def check_args(args, guide, igd_guide, uses_igd, uses_mgd3):
    """Every flag in range, after the presets filled the unset ones (args: distill.py's namespace; guide, igd_guide:
    the LGD and IGD guidance it resolves to; uses_igd, uses_mgd3: whether the run samples an IGD, an MGD3
    increment)."""
    require(args.ipc > 0, f"--ipc must be positive, got {args.ipc}")
    require(args.stage_ipc > 0, f"--stage-ipc must be positive, got {args.stage_ipc}")
    require(args.method in ("dit", "mgd3") or args.ipc % args.stage_ipc == 0,
           f"--ipc {args.ipc} is not a multiple of --stage-ipc {args.stage_ipc}")
    require(args.steps > 0, f"--steps must be positive, got {args.steps}")
    require(args.prior is not None or args.steps <= DIGITS_SCHEDULE["num_train_timesteps"],
           f"--steps {args.steps} is outside 1..{DIGITS_SCHEDULE['num_train_timesteps']} (the prior's schedule)")
    require(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    require(args.candidates >= 1, f"--candidates must be at least 1, got {args.candidates}")
    require(args.guide_from >= 0, f"--guide-from must be >= 0, got {args.guide_from}")
    require(args.guide_from <= args.guide_until, "--guide-from must not exceed --guide-until")
    require(args.memory_cap >= 1, f"--memory-cap must be at least 1, got {args.memory_cap}")
    require(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    _finite("dist-timeout", args.dist_timeout, 0.0, inclusive=False)
    require(args.data_dir is None or args.dataset not in EMBEDDED, f"--data-dir is for the ImageFolder datasets; "
            f"{args.dataset} ships inside its package (drop --data-dir)")
    require(args.res is None or args.res >= 8, f"--res must be at least 8, got {args.res}")
    require(args.student_epochs is None or args.student_epochs >= 1,
           f"--student-epochs must be at least 1, got {args.student_epochs}")
    require(args.reference_epochs is None or args.reference_epochs >= 1,
           f"--reference-epochs must be at least 1, got {args.reference_epochs}")
    require(args.eval_epochs is None or args.eval_epochs >= 1,
            f"--eval-epochs must be at least 1, got {args.eval_epochs}")
    require(args.eval_runs >= 1, f"--eval-runs must be at least 1, got {args.eval_runs}")
    require(args.num_workers is None or args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    require(args.preflight_classes is None or args.preflight_classes >= 2,
            f"--preflight-classes must be at least 2, got {args.preflight_classes}")
    _finite("cfg-scale", args.cfg_scale, 1.0)  # 1 = the conditional model alone; below 1 leans unconditional
    _finite("guidance-scale", args.scale, 0.0)
    _finite("omega", args.omega, 0.0)
    _finite("deviation-scale", args.deviation, 0.0)
    _finite("c0", args.c0, 0.0, inclusive=False)
    _finite("igd-scale", args.igd_scale, 0.0)
    _finite("igd-deviation", args.igd_deviation, 0.0)
    _finite("igd-threshold", args.igd_threshold, -1.0)
    require(0 <= args.igd_from <= args.igd_until, "--igd-from must be >= 0 and not exceed --igd-until")
    require(args.grad_ipc >= 1, f"--grad-ipc must be at least 1, got {args.grad_ipc}")
    require(args.igd_checkpoints == "auto" or all(re.fullmatch(r"[0-9]+", p.strip()) for p in
                                                  args.igd_checkpoints.split(",")),
            f"--igd-checkpoints must be 'auto' or indices like 0,5,16,40, got {args.igd_checkpoints}")
    if args.igd_checkpoints != "auto":  # the surrogate's trajectory: the init and one snapshot per epoch
        chosen = [int(p) for p in args.igd_checkpoints.split(",")]
        require(all(a < b for a, b in zip(chosen, chosen[1:])), f"--igd-checkpoints {args.igd_checkpoints} must be "
                f"strictly increasing (snapshots along the trajectory, each once), e.g. 0,5,16,40")
        last = surrogate_epochs(args.dataset, args.reference_epochs)
        require(max(int(p) for p in args.igd_checkpoints.split(",")) <= last,
                f"--igd-checkpoints {args.igd_checkpoints}: the surrogate's trajectory has snapshots 0..{last} "
                f"(--reference-epochs {last})")
    require(args.seed_set in ("dit", "igd", "mgd3") or os.path.isdir(args.seed_set),
           f"--seed-set {args.seed_set} is not a folder (or 'dit', 'igd', 'mgd3')")
    _finite("mode-scale", args.mode_scale, 0.0)
    if uses_mgd3:  # a t_stop that leaves no step pulled would run "MGD3" as plain DiT
        require(0 <= args.mode_stop <= args.steps - 2,
                f"--mode-stop {args.mode_stop} is outside the schedule: the pull acts at respaced indices i > t_stop "
                f"of {args.steps - 1} .. 0, so t_stop must be in 0 .. {args.steps - 2}")
    require(args.reference is None or os.path.isfile(args.reference), f"--reference {args.reference} is not a file")
    # a guided sampler whose window holds no sampling step would run "LGD" (or IGD) without one guided step
    windows = []
    if args.method == "lgd" and args.ipc > args.stage_ipc:
        windows.append(("--guide-from", "--guide-until", guide))
    if uses_igd:
        windows.append(("--igd-from", "--igd-until", igd_guide))
    for start, end, window in windows:
        require(window.guided_steps(args.steps) > 0,
                f"the guidance window {start} {window.guide_from} .. {end} {window.guide_until} holds none of the "
                f"{args.steps} sampling steps (respaced indices {args.steps - 1} .. 0): nothing would be guided; use "
                f"more --steps or a window inside 0 .. {args.steps - 1}")


def mode_count(args):
    """(k, the flag that sets it): MGD3's modes per class, one per image of the class it makes: the set's IPC, or
    T_1's images per class when MGD3 seeds LGD."""
    return (args.ipc, "--ipc") if args.method == "mgd3" else (args.stage_ipc, "--stage-ipc")
