"""merge(): validate, stream, and publish one merged checkpoint folder atomically."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptmerge.console import progress_bar
from ckptmerge.errors import CkptMergeError, OutputExistsError
from ckptmerge.io.fingerprint import pin_checkpoint
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.io.publish import atomic_folder, check_destination
from ckptmerge.io.safetensors_writer import StreamingSafetensorsWriter
from ckptmerge.io.sidecars import copy_sidecars
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.device import resolve_device
from ckptmerge.merging.discover import META_FILE, describe_path
from ckptmerge.merging.handback import check_write_back, write_back
from ckptmerge.merging.engine import DEFAULT_CHUNK_BYTES, run_engine
from ckptmerge.merging.manifest import build_manifest, write_manifest
from ckptmerge.merging.plan import MergePlan, build_plan
from ckptmerge.merging.schedules import check_coeffs

DEFAULT_SHARD_BYTES = 5 * 1000**3


@dataclass
class MergeResult:
    output: Path
    plan: MergePlan
    manifest: dict


def merge(checkpoints: Sequence[CheckpointRef | str | Path], coeffs: Sequence[float], output: str | Path, *,
          dtype: torch.dtype | None = None, accum_dtype: torch.dtype = torch.float32,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
          force: bool = False, allow_nonfinite: bool = False, allow_unnormalized: bool = False,
          allow_negative: bool = False, hash_mode: str = "sampled", progress: bool = True,
          recipe: dict | None = None, as_checkpoint: bool = False,
          device: str | torch.device = "cpu", direct_io: bool = False) -> MergeResult:
    """Merge ``checkpoints`` (oldest first) with ``coeffs`` into an HF-style folder at ``output``.

    Args:
        checkpoints: CheckpointRefs (from ``discover`` / ``select_*``) or paths.
        coeffs: one coefficient per checkpoint (see ``ckptmerge.merging.schedules``).
        output: destination folder; written atomically.
        dtype: output dtype for float tensors; default: the inputs' dtype.
        accum_dtype: float32 (default) or float64.
        as_checkpoint: also write the merge as the newest input's trainer checkpoint (merging/handback.py).
        device: where float tensors are accumulated: ``"cpu"`` (every core) or an accelerator such as
            ``"cuda"`` (inputs stream in through page-locked buffers; results come back to be written).
        direct_io: write the output's large chunks past the page cache (``ckptmerge.io.output_file``).

    Raises:
        CkptMergeError subclasses, always before anything appears at ``output``.

    Example:
        >>> refs = select_last(discover("runs/demo").checkpoints, 5, every_steps=200)
        >>> merge(refs, compute_coeffs("ema", refs, alpha=0.2), "out/ema")
    """
    from ckptmerge.parallel.world import is_distributed

    if is_distributed():  # launched by torchrun / srun: this rank merges its share (merging/distributed.py)
        from ckptmerge.merging.distributed import merge_distributed

        return merge_distributed(checkpoints, coeffs, output, dtype=dtype, accum_dtype=accum_dtype,
                                 max_shard_bytes=max_shard_bytes, chunk_bytes=chunk_bytes, force=force,
                                 allow_nonfinite=allow_nonfinite, allow_unnormalized=allow_unnormalized,
                                 allow_negative=allow_negative, hash_mode=hash_mode, progress=progress, recipe=recipe,
                                 device=device, direct_io=direct_io)
    started = time.monotonic()
    device = resolve_device(device)
    refs, coeffs, output = check_arguments(checkpoints, coeffs, output, accum_dtype=accum_dtype, force=force,
                                           allow_unnormalized=allow_unnormalized, allow_negative=allow_negative)
    if as_checkpoint:
        check_write_back(refs[-1])
    pins = [pin_checkpoint(r.path, hash_mode) for r in refs]  # hashed before the readers open the same files
    with ExitStack() as stack:
        readers = [open_checkpoint(r.path) for r in refs]
        for reader in readers:
            stack.callback(reader.close)
        plan = build_plan(readers, refs, coeffs, out_dtype=dtype, accum_dtype=accum_dtype)
        planned_s = time.monotonic() - started
        with atomic_folder(output, force=force) as tmp:
            manifest = _merge_into(tmp, plan, readers, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                   chunk_bytes=chunk_bytes, allow_nonfinite=allow_nonfinite, pins=pins,
                                   progress=progress, recipe=recipe or {}, started=started, planned_s=planned_s,
                                   device=device, direct_io=direct_io)
            if as_checkpoint:
                write_back(refs[-1], tmp)
    return MergeResult(output, plan, manifest)


def check_arguments(checkpoints, coeffs, output, *, accum_dtype, force, allow_unnormalized, allow_negative):
    """Refs, checked coefficients and the output path; raises before anything is opened or written."""
    refs = [c if isinstance(c, CheckpointRef) else describe_path(c) for c in checkpoints]
    coeffs = check_coeffs(coeffs, allow_unnormalized=allow_unnormalized, allow_negative=allow_negative)
    if len(coeffs) != len(refs):
        raise CkptMergeError(f"{len(coeffs)} coefficients for {len(refs)} checkpoints")
    if accum_dtype not in (torch.float32, torch.float64):
        raise CkptMergeError(f"accumulation dtype must be float32 or float64, got {accum_dtype}")
    output = Path(output)
    _check_not_an_input(output, refs)
    check_destination(output, force)
    return refs, coeffs, output


def _merge_into(tmp: Path, plan: MergePlan, readers, *, dtype, max_shard_bytes, chunk_bytes, allow_nonfinite,
                pins, progress, recipe, started, planned_s, device, direct_io) -> dict:
    entries = [(t.name, t.info) for t in plan.tasks]
    total = sum(t.info.numel * r.info(t.name).dtype.itemsize for t in plan.tasks for r in
                ([readers[i] for i in plan.active] if t.merged else readers))
    with StreamingSafetensorsWriter(tmp, entries, max_shard_bytes=max_shard_bytes, direct_io=direct_io) as writer:
        bar = progress_bar(total, "merge", unit="B", enabled=progress)
        stats = run_engine(plan, readers, writer, chunk_bytes=chunk_bytes, allow_nonfinite=allow_nonfinite,
                           on_bytes=bar.update, device=device, write_behind=True)
        bar.close()
        writer.close()
    merged_s = time.monotonic() - started - planned_s
    return finish_output(tmp, plan, dtype=dtype, pins=pins, recipe=recipe,
                         differing_buffers=stats.differing_buffers,
                         stats={"bytes_read": stats.bytes_read, "bytes_written": writer.bytes_written,
                                "plan_seconds": round(planned_s, 4), "merge_seconds": round(merged_s, 4),
                                "shards": len(writer.files)}, started=started)


def finish_output(tmp: Path, plan: MergePlan, *, dtype, pins: list, recipe: dict, differing_buffers: list[str],
                  stats: dict, started: float, world_size: int = 1) -> dict:
    """Sidecars, the step metadata and ``merge.json`` beside the written shards; returns the manifest.

    ``pins`` (io/fingerprint.py) hashed the inputs before they were read; they are verified here, so the
    manifest's hashes describe the bytes that were merged."""
    sidecars = copy_sidecars(plan.refs[-1].path, tmp, dtype)
    for pin in pins:  # every file read is still the one hashed: same inode, size and mtime
        pin.verify()
    fingerprints = [pin.fingerprint for pin in pins]
    newest = plan.refs[-1]
    (tmp / META_FILE).write_text(json.dumps({"step": newest.step, "tokens_seen": newest.tokens_seen,
                                             "lr": newest.lr, "merged": True}, indent=2) + "\n")
    manifest = build_manifest(plan, fingerprints=fingerprints, recipe=recipe, tied=plan.aliases,
                              differing_buffers=differing_buffers, world_size=world_size,
                              stats={**stats, "total_seconds": round(time.monotonic() - started, 4),
                                     "sidecars_copied": sidecars})
    write_manifest(tmp, manifest)
    return manifest


def _check_not_an_input(output: Path, refs: Sequence[CheckpointRef]) -> None:
    out = output.resolve()
    for ref in refs:
        src = ref.path.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise OutputExistsError(f"{output}: overlaps input checkpoint {ref.path}; inputs are never modified. "
                                    f"Choose an output folder outside the inputs.")
