"""merge(): validate, stream, and publish one merged checkpoint folder atomically."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from ckptmerge.console import progress_bar
from ckptmerge.io.fingerprint import pin_checkpoint
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.io.publish import atomic_folder
from ckptmerge.io.remote import Url
from ckptmerge.io.remote_publish import remote_folder
from ckptmerge.io.remote_tree import shared_listings
from ckptmerge.io.safetensors_writer import StreamingSafetensorsWriter
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.device import resolve_device
from ckptmerge.merging.engine import run_engine
from ckptmerge.merging.options import DEFAULT_SHARD_BYTES, MergeOptions, merge_options
from ckptmerge.merging.output import MergeResult, check_arguments, finish_output
from ckptmerge.merging.plan import MergePlan, build_plan
from ckptmerge.merging.read_order import announce_reads

__all__ = ["DEFAULT_SHARD_BYTES", "MergeOptions", "MergeResult", "merge"]


def merge(checkpoints: Sequence[CheckpointRef | str | Path], coeffs: Sequence[float], output: str | Path,
          options: MergeOptions | None = None, *, recipe: dict | None = None, **overrides) -> MergeResult:
    """Merge ``checkpoints`` (oldest first) with ``coeffs`` into an HF-style folder at ``output``.

    Args:
        checkpoints: CheckpointRefs (from ``discover`` / ``select_*``) or paths.
        coeffs: one coefficient per checkpoint (see ``ckptmerge.merging.schedules``).
        output: destination folder; written atomically.
        options: how to accumulate, write and publish (``MergeOptions``; default: all defaults).
        recipe: the user-level description recorded in ``merge.json`` (schedule, window, ...).
        **overrides: MergeOptions fields set on top of ``options``, e.g. ``force=True, progress=False``.

    Under torchrun / srun every rank merges its share (merging/distributed.py) with the same options.

    Raises:
        CkptMergeError subclasses, always before anything appears at ``output``.

    Example:
        >>> refs = select_last(discover("runs/demo").checkpoints, 5, every_steps=200)
        >>> merge(refs, compute_coeffs("ema", refs, alpha=0.2), "out/ema", MergeOptions(out_dtype="bfloat16"))
    """
    from ckptmerge.parallel.world import is_distributed

    options = merge_options(options, **overrides)
    if is_distributed():  # launched by torchrun / srun: this rank merges its share
        from ckptmerge.merging.distributed import merge_distributed

        return merge_distributed(checkpoints, coeffs, output, options, recipe=recipe)
    started = time.monotonic()
    device = resolve_device(options.device)
    refs, coeffs, output = check_arguments(checkpoints, coeffs, output, options)
    with shared_listings():  # at URLs: one listing serves pinning, opening and the sidecars
        return _merge(refs, coeffs, output, options, device=device, recipe=recipe, started=started)


def _merge(refs, coeffs, output, options: MergeOptions, *, device, recipe, started) -> MergeResult:
    pins = [pin_checkpoint(r.path, options.hash) for r in refs]  # hashed before the readers open the same files
    out_dtype, accum_dtype = options.torch_dtypes()
    with ExitStack() as stack:
        from ckptmerge.io.remote_layout import open_remote_checkpoints

        urls = [r.path for r in refs if isinstance(r.path, Url)]
        readers = (open_remote_checkpoints(urls) if len(urls) == len(refs)  # headers fetched side by side
                   else [open_checkpoint(r.path) for r in refs])
        for reader in readers:
            stack.callback(reader.close)
        plan = build_plan(readers, refs, coeffs, out_dtype=out_dtype, accum_dtype=accum_dtype)
        planned_s = time.monotonic() - started
        publish = remote_folder if isinstance(output, Url) else atomic_folder  # a URL: uploaded, then committed
        announce_reads(plan, readers, options.chunk_bytes)  # remote readers fetch these rows ahead
        with publish(output, force=options.force) as tmp:
            manifest = _merge_into(tmp, plan, readers, options, device=device, pins=pins, recipe=recipe or {},
                                   started=started, planned_s=planned_s)
    return MergeResult(output, plan, manifest)


def _merge_into(tmp: Path, plan: MergePlan, readers, options: MergeOptions, *, device, pins, recipe, started,
                planned_s) -> dict:
    entries = [(t.name, t.info) for t in plan.tasks]
    total = sum(t.info.numel * r.info(t.name).dtype.itemsize for t in plan.tasks for r in
                ([readers[i] for i in plan.active] if t.merged else readers))
    with StreamingSafetensorsWriter(tmp, entries, max_shard_bytes=options.max_shard_bytes,
                                    direct_io=options.direct_io) as writer:
        bar = progress_bar(total, "merge", unit="B", enabled=options.progress)
        stats = run_engine(plan, readers, writer, chunk_bytes=options.chunk_bytes,
                           allow_nonfinite=options.allow_nonfinite, on_bytes=bar.update, device=device,
                           write_behind=True)
        bar.close()
        writer.close()
    merged_s = time.monotonic() - started - planned_s
    return finish_output(tmp, plan, options, pins=pins, recipe=recipe, differing_buffers=stats.differing_buffers,
                         stats={"bytes_read": stats.bytes_read, "bytes_written": writer.bytes_written,
                                "plan_seconds": round(planned_s, 4), "merge_seconds": round(merged_s, 4),
                                "shards": len(writer.files)}, started=started)
