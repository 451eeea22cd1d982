"""
The checks every distill.py flag passes before anything is written, trained or downloaded, and the settings a
resumed run must keep. Each failure is one UserError line (ground.common.run_cli: `error: ...`, exit code 1).
"""
import math
import os
import re

from config import SETTABLE
from data import EMBEDDED
from ground.common import require
from model import DIGITS_SCHEDULE
from reference import surrogate_epochs

# The settings a rerun into the same folder must keep are all of them but these (they cannot change a byte of the set):
# args.json records every setting, and a new flag or a constant of config.py is kept by a resume without a word here.
NOT_RESULT = ("out_dir", "eval", "eval_arch", "num_workers", "device", "preflight", "dry_run")
# how a user names a setting whose flag is not --<name>
FLAGS = {"scale": "--guidance-scale", "deviation": "--deviation-scale", "form": "--guidance-form",
         "student_world": "ranks of a DDP student",
         "world_size": "ranks (torchrun --nproc_per_node: they cut the sampler's batches)",
         **{key: f"--set {key}" for key in SETTABLE}}


def result_args(record):
    """{setting: the flag a user recognises} of the settings in `record` (a run's args.json) a resume must keep."""
    return {key: FLAGS.get(key, "--" + key.replace("_", "-")) for key in record if key not in NOT_RESULT}


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
    require(args.ipc % args.stage_ipc == 0, f"--ipc {args.ipc} is not a multiple of --stage-ipc {args.stage_ipc} (the "
            f"increments of a set" + (", which evaluate.py --redundancy cuts," if args.method != "lgd" else "") +
            " are all of one size)")
    require(args.steps > 0, f"--steps must be positive, got {args.steps}")
    require(args.prior is not None or args.steps <= DIGITS_SCHEDULE["num_train_timesteps"],
           f"--steps {args.steps} is outside 1..{DIGITS_SCHEDULE['num_train_timesteps']} (the prior's schedule)")
    require(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    require(args.candidates >= 1, f"--candidates must be at least 1, got {args.candidates}")
    require(args.guide_from >= 0, f"--guide-from must be >= 0, got {args.guide_from}")
    require(args.guide_from <= args.guide_until, "--guide-from must not exceed --guide-until")
    require(args.memory_cap >= 1, f"--set memory_cap must be at least 1, got {args.memory_cap}")
    require(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    require(args.threads is None or args.threads >= 1, f"--threads must be at least 1, got {args.threads}")
    require(args.data_dir is None or args.dataset not in EMBEDDED, f"--data-dir is for the ImageFolder datasets; "
            f"{args.dataset} ships inside its package (drop --data-dir)")
    require(args.res is None or args.res >= 8, f"--res must be at least 8, got {args.res}")
    require(args.student_epochs is None or args.student_epochs >= 1,
           f"--student-epochs must be at least 1, got {args.student_epochs}")
    require(args.reference_epochs is None or args.reference_epochs >= 1,
           f"--reference-epochs must be at least 1, got {args.reference_epochs}")
    require(args.num_workers is None or args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")
    _finite("cfg-scale", args.cfg_scale, 1.0)  # 1 = the conditional model alone; below 1 leans unconditional
    _finite("guidance-scale", args.scale, 0.0)
    _finite("omega", args.omega, 0.0)
    _finite("deviation-scale", args.deviation, 0.0)
    _finite("set c0", args.c0, 0.0, inclusive=False)
    _finite("set igd_scale", args.igd_scale, 0.0)
    _finite("set igd_deviation", args.igd_deviation, 0.0)
    _finite("set igd_threshold", args.igd_threshold, -1.0)
    require(0 <= args.igd_from <= args.igd_until, "--set igd_from must be >= 0 and not exceed igd_until")
    require(args.grad_ipc >= 1, f"--set grad_ipc must be at least 1, got {args.grad_ipc}")
    require(args.igd_checkpoints == "auto" or all(re.fullmatch(r"[0-9]+", p.strip()) for p in
                                                  args.igd_checkpoints.split(",")),
            f"--set igd_checkpoints must be 'auto' or indices like 0,5,16,40, got {args.igd_checkpoints}")
    if args.igd_checkpoints != "auto":  # the surrogate's trajectory: the init and one snapshot per epoch
        chosen = [int(p) for p in args.igd_checkpoints.split(",")]
        require(all(a < b for a, b in zip(chosen, chosen[1:])), f"--set igd_checkpoints={args.igd_checkpoints} must "
                f"be strictly increasing (snapshots along the trajectory, each once), e.g. 0,5,16,40")
        last = surrogate_epochs(args.dataset, args.reference_epochs)
        require(max(chosen) <= last, f"--set igd_checkpoints={args.igd_checkpoints}: the surrogate's trajectory has "
                f"snapshots 0..{last} (--reference-epochs {last})")
    require(args.seed_set in ("dit", "igd", "mgd3") or os.path.isdir(args.seed_set),
           f"--seed-set {args.seed_set} is not a folder (or 'dit', 'igd', 'mgd3')")
    _finite("set mode_scale", args.mode_scale, 0.0)
    if uses_mgd3:  # a t_stop that leaves no step pulled would run "MGD3" as plain DiT
        require(0 <= args.mode_stop <= args.steps - 2,
                f"--set mode_stop={args.mode_stop} is outside the schedule: the pull acts at respaced indices i > "
                f"t_stop of {args.steps - 1} .. 0, so t_stop must be in 0 .. {args.steps - 2}")
    require(args.reference is None or os.path.isfile(args.reference), f"--reference {args.reference} is not a file")
    # a guided sampler whose window holds no sampling step would run "LGD" (or IGD) without one guided step
    windows = []
    if args.method == "lgd" and args.ipc > args.stage_ipc:
        windows.append(("--guide-from", "--guide-until", guide))
    if uses_igd:
        windows.append(("--set igd_from", "igd_until", igd_guide))
    for start, end, window in windows:
        require(window.guided_steps(args.steps) > 0,
                f"the guidance window {start} {window.guide_from} .. {end} {window.guide_until} holds none of the "
                f"{args.steps} sampling steps (respaced indices {args.steps - 1} .. 0): nothing would be guided; use "
                f"more --steps or a window inside 0 .. {args.steps - 1}")


def mode_count(args):
    """(n, the flag that sets it): MGD3's modes per class, one per image of the class it makes: the set's IPC, or
    T_1's images per class when MGD3 seeds LGD."""
    return (args.ipc, "--ipc") if args.method == "mgd3" else (args.stage_ipc, "--stage-ipc")
