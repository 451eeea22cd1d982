"""
tools: what drives the method from above, for the command lines. Nothing of the method (guidance.py, curriculum.py,
igd.py) imports it; it imports the method, the protocol and ground/. Nothing here runs at import.

  checks.py     every distill.py flag in range, before anything is written
  start.py      a run started safely: inputs checked, the folder claimed, the preflight, the settings recorded
  preflight.py  the first minutes of a real run: labels, guidance direction, the batch that fits, the price
  dry_run.py    --dry-run: the plan of a command before it runs
  export.py     copies of a set for RDED and DD-Ranking (`python -m tools.export`)
  results.py    every table of docs/results.md (`python -m tools.results <table>`)
  gpu_check.py  the first command on a GPU machine (`python -m tools.gpu_check`): PASS / FAIL per check
"""
