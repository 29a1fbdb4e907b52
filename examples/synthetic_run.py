"""Write a synthetic checkpoint series of a tiny Llama, as HF folders, for the interim demo.

Until ckptmerge's trainer lands, the demo merges a *generated* series: iterates of a
constant-learning-rate run are modelled as an Ornstein-Uhlenbeck process around a known center
theta*, theta_t = theta* + e_t with e_t = rho e_{t-1} + noise. The distance to theta* is then an
honest stand-in for loss (the loss of a quadratic basin), and averaging should shrink it.

    python examples/synthetic_run.py runs/synthetic --checkpoints 20 --save-every 100
    python examples/synthetic_run.py --score runs/synthetic out/sma out/ema ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True)


def write_series(run_dir: Path, checkpoints: int, save_every: int, rho: float, noise: float, seed: int) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    center = {k: v.detach().clone() for k, v in model.state_dict().items()}
    error = {k: torch.zeros_like(v) for k, v in center.items() if v.is_floating_point()}
    for i in range(1, checkpoints + 1):
        step = i * save_every
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if name in error:
                    error[name].mul_(rho).add_(noise * torch.randn_like(param))
                    param.copy_(center[name] + error[name])
        folder = run_dir / f"step-{step:06d}"
        model.save_pretrained(folder)
        (folder / "ckptmerge.json").write_text(json.dumps({"step": step, "tokens_seen": step * 4096, "lr": 3e-3}))
    torch.save(center, center_path(run_dir))


def center_path(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-center.pt"  # beside the run, so discovery never sees it


def rms_distance(folder: Path, center: dict[str, torch.Tensor]) -> float:
    from ckptmerge import open_checkpoint

    reader = open_checkpoint(folder)
    total, count = 0.0, 0
    for name in reader.keys():
        t = reader.get(name)
        if t.is_floating_point():
            total += float(((t.double() - center[name].double()) ** 2).sum())
            count += t.numel()
    reader.close()
    return (total / count) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--score", action="store_true", help="print RMS distance to the center for each folder")
    p.add_argument("--checkpoints", type=int, default=20)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--rho", type=float, default=0.5, help="correlation of successive checkpoint errors")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.score:
        write_series(args.paths[0], args.checkpoints, args.save_every, args.rho, args.noise, args.seed)
        return
    run_dir, folders = args.paths[0], args.paths[1:]
    center = torch.load(center_path(run_dir), weights_only=True)
    print(f"{'model':<34} {'RMS distance to center':>24}")
    for folder in folders:
        print(f"{str(folder):<34} {rms_distance(folder, center):>24.6f}")


if __name__ == "__main__":
    main()
