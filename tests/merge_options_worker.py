"""Run a list of merges, each with its own MergeOptions, in one process or on every rank of a torchrun job.

    python merge_options_worker.py CASES.json RESULTS.json          # one process
    torchrun --nproc-per-node 2 merge_options_worker.py CASES.json RESULTS.json

CASES.json: [{"name", "inputs": [paths], "coeffs": [...], "output", "options": {...}, "precreate": bool}].
RESULTS.json (written by rank 0): {name: {"ok": bool, "error": str | None}}.
"""

import json
import sys
from pathlib import Path

from ckptmerge.errors import CkptMergeError
from ckptmerge.merging.offline import merge
from ckptmerge.merging.options import MergeOptions
from ckptmerge.parallel.agree import RankError
from ckptmerge.parallel.world import barrier, rank


def main(cases_path: str, results_path: str) -> None:
    results = {}
    for case in json.loads(Path(cases_path).read_text()):
        if case.get("precreate") and rank() == 0:  # an output that already exists (the force case)
            Path(case["output"]).mkdir(parents=True)
            (Path(case["output"]) / "old.txt").write_text("an earlier output\n")
        barrier()
        try:
            merge(case["inputs"], case["coeffs"], case["output"], MergeOptions(**case["options"], progress=False))
            results[case["name"]] = {"ok": True, "error": None}
        except (CkptMergeError, RankError) as exc:
            results[case["name"]] = {"ok": False, "error": str(exc)}
        barrier()
    if rank() == 0:
        Path(results_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
