"""
What candidate selection chose, image by image and stage by stage: the records behind every guided stage's log.json.

Each guided image gets a record beside it (stage_<k>/records/<class>/<index>.json), written before its PNG: its
kappa candidates' score parts (S, student CE, theta* CE) and the candidate kept. A stage's log.json is summed from
the records on disk, so it describes every image of the stage however many starts the stage took; log_line is the
one line a stage prints. (What a guided step does, push by push, is the preflight's to measure: tools/preflight.py.)
"""
import torch


def image_record(n, candidates):
    """The record of the n-th image of a batch from the sampler's candidates (kept index (n,), parts {name: (n,
    kappa)}): every candidate's score parts and which one was kept. Values are the float32 numbers of the run."""
    best, parts = candidates
    return dict(kept_candidate=int(best[n]), candidates={name: value[n].tolist() for name, value in parts.items()})


def summarise_records(records, batch):
    """A stage's log.json from its image records (in image order: index, then class): the means of the kept
    candidates' score parts and of the rejected ones', and how often each candidate was kept."""
    def mean(values):
        return float(torch.tensor(values).mean()) if values else None

    def merged(rows):  # [{part: value or values}] -> {part: mean of all values}
        out = {}
        for row in rows:
            for name, values in row.items():
                out.setdefault(name, []).extend(values if isinstance(values, list) else [values])
        return {name: mean(values) for name, values in out.items()}

    kept = [{name: v[r["kept_candidate"]] for name, v in r["candidates"].items()} for r in records]
    rejected = [{name: [x for j, x in enumerate(v) if j != r["kept_candidate"]] for name, v in r["candidates"].items()}
                for r in records]
    kept_candidate = [r["kept_candidate"] for r in records]
    kappa = max(kept_candidate) + 1 if kept_candidate else 0
    return dict(images_logged=len(records), kept=merged(kept), rejected=merged(rejected),
                kept_candidate_counts=[kept_candidate.count(k) for k in range(kappa)], sampler_batch=batch)


def log_line(k, summary):
    """The one line a stage prints: the score of the kept images against the candidates not kept."""
    def fmt(table):
        return " ".join(f"{name} {value:.3f}" for name, value in table.items() if value is not None) or "-"
    return (f"stage {k}: kept [{fmt(summary['kept'])}] | rejected [{fmt(summary['rejected'])}] | kept candidate "
            f"{summary['kept_candidate_counts']}")
