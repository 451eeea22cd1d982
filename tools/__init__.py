"""
lab: the machinery that keeps a many-hour lgd run safe, behind one seam. None of it is the method (guidance.py,
curriculum.py); the stage loop reaches it through the run object of ground/run.py, and the command lines through
the functions below. Nothing here runs at import.

  common.py    errors as one line, the CLI wrapper, device and torchrun, seeds, atomic writes (disk full named)
  locks.py     flock locks: one run per folder, one builder per shared-cache entry
  folder.py    the run folder: its layout (the only file that builds its paths), settings, the set a run holds
  run.py       the seam: increments, batches (resume byte for byte, out-of-memory), stages finished, the set
  records.py   what guidance did to every image, and each stage's log
  checks.py    every distill.py flag in range, before anything is written
  start.py     a run started safely: inputs checked, the folder claimed, the preflight, the settings recorded
  preflight.py the first minutes of a real run: labels, guidance direction, the batch that fits, the price
  dry_run.py   --dry-run: the plan of a command before it runs
  export.py    copies of a set for RDED and DD-Ranking
  results.py   every digits table of docs/results.md (`python -m tools.results <table>`)
"""
