"""``merge.json``: the full recipe and provenance of a merged folder, enough to redo the merge."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ckptmerge.merging.plan import MergePlan

MANIFEST_NAME = "merge.json"


def build_manifest(plan: MergePlan, *, fingerprints: list[str | None], recipe: dict, stats: dict,
                   tied: dict[str, str], differing_buffers: list[str], world_size: int = 1) -> dict:
    """Assemble the manifest. ``recipe`` is the user-level description (schedule, params, selection)."""
    from ckptmerge import __version__

    inputs = [{"path": str(ref.path.resolve()), "step": ref.step, "tokens_seen": ref.tokens_seen, "lr": ref.lr,
               "layout": ref.layout, "coefficient": coeff, "content_hash": fp}
              for ref, coeff, fp in zip(plan.refs, plan.coeffs, fingerprints)]
    merged = [t for t in plan.tasks if t.merged]
    return {
        "ckptmerge_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "recipe": recipe,
        "world_size": world_size,  # ranks that wrote the shards (torchrun / srun); 1 for one process
        "inputs": inputs,
        "dtype_policy": {
            "accumulate": str(plan.accum_dtype).removeprefix("torch."),
            "output": sorted({str(t.out_dtype).removeprefix("torch.") for t in merged}),
            "non_float_tensors": "copied from the newest input",
        },
        "tensors": {"merged": len(merged), "copied": [t.name for t in plan.tasks if not t.merged],
                    "copied_but_differing": differing_buffers, "tied": tied},
        "stats": stats,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
