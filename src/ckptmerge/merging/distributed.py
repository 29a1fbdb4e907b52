"""One merge on many ranks (torchrun / srun): each rank merges a contiguous share of the plan's tensors.

    torchrun --nproc-per-node 8 -m ckptmerge merge runs/big --last 10 --schedule ema --alpha 0.2 -o out/ema

1. Rank 0 checks the arguments and the output, opens every input and builds the plan (validation runs
   once); the plan, or the one error, goes to every rank.
2. Rank 0 creates the temporary output folder beside the destination (a shared filesystem).
3. The plan's tensors are split into one contiguous run per rank, balanced by the bytes read for them
   (``split_plan``). Each rank streams only its tensors through the same engine (fp32 accumulation,
   identical chunking, so identical values) and writes its own safetensors shard(s), named within one
   global ``model-0000k-of-0000N`` sequence that every rank computes from the plan alone.
4. After all ranks agree that their shards are written, rank 0 writes the index, sidecars, ``merge.json``
   (with ``world_size``) and, with ``as_checkpoint``, the hand-back (merging/handback.py), then publishes
   the folder atomically. Every rank is given the same ``MergeOptions``; ranks that differ stop the job.

Every step ends in ``parallel.agree.phase``: an error on any rank stops every rank there, the error is
printed once (rank 0), every rank exits non-zero, and rank 0 removes the temporary folder.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack, closing
from pathlib import Path

from ckptmerge.console import progress_bar
from ckptmerge.errors import ConfigError
from ckptmerge.io.fingerprint import pin_checkpoint
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.io.publish import atomic_folder
from ckptmerge.io.remote import refuse_urls
from ckptmerge.io.safetensors_writer import (
    StreamingSafetensorsWriter,
    shard_file_names,
    split_into_shards,
    write_index,
)
from ckptmerge.merging.device import resolve_device
from ckptmerge.merging.engine import run_engine
from ckptmerge.merging.options import MergeOptions
from ckptmerge.merging.output import MergeResult, check_arguments, finish_output
from ckptmerge.merging.plan import MergePlan, TensorTask, build_plan
from ckptmerge.parallel.agree import RankError, agree, phase
from ckptmerge.parallel.split import split_by_cost
from ckptmerge.parallel.world import all_gather, barrier, broadcast, init, rank, world_size


def task_read_bytes(plan: MergePlan, task: TensorTask) -> int:
    """Bytes the engine reads for ``task``: every active input for a merged tensor, every input for a copy."""
    inputs = len(plan.active) if task.merged else len(plan.refs)
    return task.info.nbytes * max(inputs, 1)


def split_plan(plan: MergePlan, ranks: int) -> list[list[TensorTask]]:
    """Each rank's tasks: contiguous runs of the plan order with about equal bytes read."""
    ranges = split_by_cost([task_read_bytes(plan, t) for t in plan.tasks], ranks)
    return [[plan.tasks[i] for i in r] for r in ranges]


def shard_layout(shares: list[list[TensorTask]], max_shard_bytes: int) -> list[list[str]]:
    """Global shard file names per rank: every rank's shards, numbered in rank order."""
    counts = [len(split_into_shards([(t.name, t.info) for t in share], max_shard_bytes)) if share else 0
              for share in shares]
    names = shard_file_names(sum(counts))
    starts = [sum(counts[:r]) for r in range(len(counts))]
    return [names[s:s + c] for s, c in zip(starts, counts)]


def merge_distributed(checkpoints, coeffs, output, options: MergeOptions, *, recipe: dict | None = None
                      ) -> MergeResult:
    """``merging.offline.merge`` on this rank of a torch.distributed job (same arguments and result).

    Every rank must be given the same ``options`` (torchrun starts one command): ranks that differ stop the job
    before anything is written, so no share is merged differently."""
    init()
    refuse_url_ranks([getattr(c, "path", c) for c in checkpoints], output)
    _check_same_options(options)
    with phase():  # a device missing on one rank stops every rank, with the error shown once
        device = resolve_device(options.device)  # ``cuda``: this rank's own GPU, cuda:LOCAL_RANK
    started = time.monotonic()
    plan, output = _plan_once(checkpoints, coeffs, output, options)
    pins = None
    with phase():  # rank 0 hashes the inputs before any rank reads them; it verifies them before publishing
        if rank() == 0:
            pins = [pin_checkpoint(r.path, options.hash) for r in plan.refs]
    planned_s = time.monotonic() - started
    publish_error = None
    manifest = None
    try:
        manifest = _write_and_publish(plan, output, options, device=device, pins=pins, recipe=recipe or {},
                                      started=started, planned_s=planned_s)
    except RankError:  # agreed by every rank; each has cleaned up (rank 0 removed the temporary folder)
        barrier()  # before any rank exits: torchrun stops the others when one exits, maybe mid-cleanup
        raise
    except Exception as exc:  # noqa: BLE001 - only rank 0's final rename can fail outside a phase
        publish_error = exc
    agree(publish_error)
    return MergeResult(output, plan, broadcast(manifest))


def refuse_url_ranks(inputs, output) -> None:
    """One line (shown once) when a torchrun merge is given a URL: the ranks read and write local files only."""
    with phase():  # every rank was given the same arguments
        refuse_urls("the distributed merge (torchrun)", "run `ckptmerge merge URL ... -o OUT` as one process; it "
                    "keeps several byte ranges in flight per checkpoint", checkpoint=list(inputs), output=output)


def _check_same_options(options: MergeOptions) -> None:
    every = all_gather(options)
    with phase():
        differing = sorted({k for other in every for k, v in other.record().items() if v != getattr(every[0], k)})
        if differing:
            raise ConfigError(f"the ranks were given different merge options ({', '.join(differing)}); start every "
                              f"rank with the same command")


def _plan_once(checkpoints, coeffs, output, options: MergeOptions) -> tuple[MergePlan, Path]:
    planned = None
    with phase():
        if rank() == 0:
            refs, coeffs, output = check_arguments(checkpoints, coeffs, output, options)
            out_dtype, accum_dtype = options.torch_dtypes()
            with ExitStack() as stack:
                readers = [stack.enter_context(closing(open_checkpoint(r.path))) for r in refs]
                planned = (build_plan(readers, refs, coeffs, out_dtype=out_dtype, accum_dtype=accum_dtype), output)
    return broadcast(planned)


def _write_and_publish(plan: MergePlan, output: Path, options: MergeOptions, *, device, pins, recipe, started,
                       planned_s) -> dict | None:
    shares = split_plan(plan, world_size())
    names = shard_layout(shares, options.max_shard_bytes)
    with ExitStack() as stack:
        tmp = None
        with phase():
            if rank() == 0:
                tmp = stack.enter_context(atomic_folder(output, force=options.force))
        tmp = broadcast(tmp)
        report = None
        with phase():
            report = _write_share(tmp, plan, shares[rank()], names[rank()], options, device=device)
        reports = all_gather(report)
        manifest = None
        with phase():  # the hand-back, if asked, is written here by rank 0, once every rank's shards exist
            if rank() == 0:
                manifest = _finish(tmp, plan, shares, names, reports, options, pins=pins, recipe=recipe,
                                   started=started, planned_s=planned_s)
    return manifest  # rank 0 published on leaving the ExitStack


def _write_share(tmp: Path, plan: MergePlan, tasks: list[TensorTask], names: list[str], options: MergeOptions, *,
                 device) -> dict:
    started = time.monotonic()
    share = dataclasses.replace(plan, tasks=tasks)
    with ExitStack() as stack:
        writer = stack.enter_context(StreamingSafetensorsWriter(Path(tmp), [(t.name, t.info) for t in tasks],
                                                                max_shard_bytes=options.max_shard_bytes,
                                                                shard_names=names, direct_io=options.direct_io))
        readers = [stack.enter_context(closing(open_checkpoint(r.path))) for r in plan.refs]
        bar = stack.enter_context(closing(progress_bar(sum(task_read_bytes(plan, t) for t in tasks),
                                                        f"merge (rank 0 of {world_size()})", unit="B",
                                                        enabled=options.progress and rank() == 0)))
        stats = run_engine(share, readers, writer, chunk_bytes=options.chunk_bytes,
                           allow_nonfinite=options.allow_nonfinite, on_bytes=bar.update, device=device,
                           write_behind=True)
        writer.close()
    return {"rank": rank(), "tensors": len(tasks), "bytes_read": stats.bytes_read,
            "bytes_written": writer.bytes_written, "seconds": round(time.monotonic() - started, 4),
            "differing_buffers": stats.differing_buffers}


def _finish(tmp: Path, plan: MergePlan, shares, names, reports: list[dict], options: MergeOptions, *,
            pins: list, recipe: dict, started: float, planned_s: float) -> dict:
    shards = [s for share in shares if share for s in split_into_shards([(t.name, t.info) for t in share],
                                                                        options.max_shard_bytes)]
    flat_names = [n for per_rank in names for n in per_rank]
    index_bytes = write_index(Path(tmp), shards, flat_names) if len(flat_names) > 1 else 0
    differing = [name for t in plan.tasks for r in reports for name in r["differing_buffers"] if name == t.name]
    stats = {"bytes_read": sum(r["bytes_read"] for r in reports),
             "bytes_written": sum(r["bytes_written"] for r in reports) + index_bytes,
             "plan_seconds": round(planned_s, 4), "merge_seconds": round(time.monotonic() - started - planned_s, 4),
             "shards": len(flat_names),
             "ranks": [{k: r[k] for k in ("rank", "tensors", "bytes_read", "seconds")} for r in reports]}
    return finish_output(Path(tmp), plan, options, pins=pins, recipe=recipe, differing_buffers=differing,
                         stats=stats, started=started, world_size=world_size())
