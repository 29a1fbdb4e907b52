"""Memory of online averages per rank under FSDP2: the averagers' tensors against the model's, measured in bytes.

    torchrun --nproc-per-node 2 benchmarks/bench_sharded_memory.py --preset small

Each decoder layer and the root are sharded with ``fully_shard``; one AdamW step, then EMA and LAWA (k=3)
updates. Per rank it counts the bytes of the local parameter shards, of the Adam moments, of each averager's
state (``state_dict`` tensors), of the swap backup that ``swapped`` / ``save`` hold while writing, and of the
full state dict that ``save(format="hf")`` gathers on rank 0. Byte counts, not timings: they do not vary between runs.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from ckptmerge.console import print_table
from ckptmerge.online import EMA, LAWA
from ckptmerge.online.tensors import float_tensors
from ckptmerge.train.presets import build_model, preset_context


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts / lists (DTensors count their local shard)."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.preset, seed=0)
    full_param_bytes = tensor_bytes(dict(model.named_parameters()))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, preset_context(args.preset)))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    ema, lawa = EMA(0.999), LAWA(k=3, every=1)
    for step in range(1, 4):
        ema.update(model, step)
        lawa.update(model, step)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    row = [rank, tensor_bytes(dict(model.named_parameters())), tensor_bytes(opt.state_dict()["state"]),
           tensor_bytes(ema.state_dict()), tensor_bytes(lawa.state_dict()), tensor_bytes(float_tensors(model)),
           tensor_bytes(gathered)]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(f"preset {args.preset}: {full_param_bytes / 2**20:.2f} MiB of parameters unsharded, {world} ranks")
        print_table(["rank", "param shard MiB", "Adam moments MiB", "EMA MiB", "LAWA k=3 MiB", "swap backup MiB",
                     "gathered for hf save MiB"],
                    [[r[0], *(round(b / 2**20, 2) for b in r[1:])] for r in rows],
                    note="EMA = 1x the rank's shard in fp32, LAWA = k x; the gathered full model exists on rank 0 only "
                         "during save(format='hf'); format='dcp' gathers nothing")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
