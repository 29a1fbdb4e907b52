"""What one merge and the distributed merge share around the engine: checks before, the finished folder after.

``check_arguments`` runs before anything is opened or written; ``finish_output`` completes the temporary
folder (sidecars, step metadata, the hand-back, ``merge.json``) just before it is published. Both merges
import this module, neither imports the other's internals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import CkptMergeError, OutputExistsError
from ckptmerge.io.publish import check_destination
from ckptmerge.io.remote import Url, as_location
from ckptmerge.io.remote_publish import check_remote_destination
from ckptmerge.io.remote_sidecars import copy_remote_sidecars
from ckptmerge.io.sidecars import copy_sidecars
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import META_FILE, describe_path
from ckptmerge.merging.handback import discard_copy, prepare_write_back, write_back
from ckptmerge.merging.manifest import build_manifest, write_manifest
from ckptmerge.merging.options import MergeOptions
from ckptmerge.merging.plan import MergePlan
from ckptmerge.merging.remote_discover import describe_remote
from ckptmerge.merging.schedules import check_coeffs


@dataclass
class MergeResult:
    output: Path
    plan: MergePlan
    manifest: dict


def check_arguments(checkpoints, coeffs, output, options: MergeOptions
                    ) -> tuple[list[CheckpointRef], list[float], Path | Url]:
    """Refs, checked coefficients and the output path; raises before anything is opened or written."""
    refs = [c if isinstance(c, CheckpointRef) else describe_any(c) for c in checkpoints]
    coeffs = check_coeffs(coeffs, allow_unnormalized=options.allow_unnormalized,
                          allow_negative=options.allow_negative)
    if len(coeffs) != len(refs):
        raise CkptMergeError(f"{len(coeffs)} coefficients for {len(refs)} checkpoints")
    output = as_location(output)
    _check_not_an_input(output, refs)
    if isinstance(output, Url):  # s3://, gs://: uploaded, then committed (io/remote_publish.py)
        check_remote_destination(output, options.force)
    else:
        check_destination(output, options.force)
    if options.as_checkpoint:  # refused before any work; a newest checkpoint at a URL is copied here (handback.py)
        refs[-1] = prepare_write_back(refs[-1], options.out_dtype)
    return refs, coeffs, output


def finish_output(tmp: Path, plan: MergePlan, options: MergeOptions, *, pins: list, recipe: dict,
                  differing_buffers: list[str], stats: dict, started: float, world_size: int = 1) -> dict:
    """Sidecars, the step metadata, the hand-back and ``merge.json`` beside the written shards; returns the manifest.

    ``pins`` (io/fingerprint.py) hashed the inputs before they were read; they are verified here, so the
    manifest's hashes describe the bytes that were merged."""
    newest = plan.refs[-1]
    try:
        manifest = _finish(tmp, plan, options, pins=pins, recipe=recipe, differing_buffers=differing_buffers,
                           stats=stats, started=started, world_size=world_size)
        if options.as_checkpoint:  # every shard is written (by every rank): the trainer's checkpoint beside them
            write_back(newest, tmp, pins[-1])  # pins follow plan.refs: the newest's pin is the last
    finally:
        discard_copy(newest)  # a newest checkpoint at a URL: its local copy, on failure too
    return manifest


def _finish(tmp: Path, plan: MergePlan, options: MergeOptions, *, pins: list, recipe: dict,
            differing_buffers: list[str], stats: dict, started: float, world_size: int) -> dict:
    out_dtype, _ = options.torch_dtypes()
    copy = copy_remote_sidecars if isinstance(plan.refs[-1].path, Url) else copy_sidecars
    sidecars = copy(plan.refs[-1].path, tmp, out_dtype)
    newest = plan.refs[-1]
    for pin in pins:  # every file read is still the one hashed: same inode, size and mtime
        pin.verify()
    fingerprints = [pin.fingerprint for pin in pins]
    (tmp / META_FILE).write_text(json.dumps({"step": newest.step, "tokens_seen": newest.tokens_seen,
                                             "lr": newest.lr, "merged": True}, indent=2) + "\n")
    manifest = build_manifest(plan, fingerprints=fingerprints, recipe=recipe, tied=plan.aliases,
                              differing_buffers=differing_buffers, world_size=world_size,
                              stats={**stats, "total_seconds": round(time.monotonic() - started, 4),
                                     "sidecars_copied": sidecars.names})
    manifest["options"] = options.record()
    manifest["tokenizer_from"] = sidecars.tokenizer_from  # the checkpoint, the run directory, or None
    write_manifest(tmp, manifest)
    return manifest


def describe_any(path) -> CheckpointRef:
    """A CheckpointRef for one named checkpoint, local or at a URL."""
    location = as_location(path)
    return describe_remote(location) if isinstance(location, Url) else describe_path(location)


def _check_not_an_input(output: Path | Url, refs: Sequence[CheckpointRef]) -> None:
    out = output.resolve()
    for ref in refs:
        src = ref.path.resolve()
        if isinstance(src, Url) != isinstance(out, Url):
            continue  # one local, one remote: they cannot overlap
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise OutputExistsError(f"{output}: overlaps input checkpoint {ref.path}; inputs are never modified. "
                                    f"Choose an output folder outside the inputs.")
