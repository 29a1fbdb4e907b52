"""Merge benchmark: ckptmerge vs the I/O floor, a naive load-everything average, and mergekit linear.

Generates N fp32 checkpoints of a ~470M-parameter Llama-shaped model (HF folders, one
safetensors file each), then times each method side by side in one run, cold (page cache
dropped before every run; needs root) and warm, and samples each process's peak anonymous
memory (``RssAnon`` from /proc, so memory-mapped input pages do not count). Prints a markdown
table of seconds, ratios to the floor and to ckptmerge, and peak RssAnon, and checks that every
method wrote the same numbers.

    .venv/bin/python benchmarks/bench_merge.py --n 4 8              # ~15 GB of disk in benchmarks/_work
    .venv/bin/python benchmarks/bench_merge.py --mergekit-python PATH/TO/venv/bin/python

mergekit (LGPL, ~430 MB of dependencies) is never a dependency: install it in a separate venv,
e.g. ``python3 -m venv benchmarks/_work/mk-venv && benchmarks/_work/mk-venv/bin/pip install
torch==2.13.0 mergekit``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent / "_work"
LAYERS, HIDDEN, FFN, VOCAB = 28, 1024, 2816, 32000


def llama_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, FFN)})
    return shapes


def write_checkpoints(n: int, layers: int) -> list[Path]:
    from safetensors.torch import save_file

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    paths = []
    for i in range(n):
        folder = WORK / f"run-L{layers}" / f"step-{(i + 1) * 1000:06d}"
        paths.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in llama_shapes(layers).items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
        print(f"wrote {folder}", file=sys.stderr)
    return paths


class PeakAnon:
    """Samples RssAnon of a process and its children every few ms; keeps the peak (bytes)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        pids = [self.pid]
        try:
            for child in Path(f"/proc/{self.pid}/task").iterdir():
                kids = (child / "children").read_text().split()
                pids += [int(k) for k in kids]
        except OSError:
            pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._pids():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


OUTPUTS = {"read+write floor": "floor.safetensors", "ckptmerge": "ckptmerge", "naive load-all": "naive.safetensors",
           "mergekit linear": "mergekit"}


def clear_output(out: Path, method: str) -> None:
    """Remove a method's previous output (untimed), so no run pays for deleting or overwriting files."""
    path = out / OUTPUTS[method]
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed(cmd: list[str], cold: bool) -> tuple[float, int]:
    if cold and not drop_caches():
        raise SystemExit("cold runs need root (writing /proc/sys/vm/drop_caches); pass --warm-only")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = PeakAnon(proc.pid)
    _, err = proc.communicate()
    peak = sampler.stop()
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err.decode()[-2000:]}")
    return elapsed, peak


FLOOR = """
import os, sys
*inputs, out = sys.argv[1:]
buf = bytearray(16 << 20)
view = memoryview(buf)
with open(out, "wb", buffering=0) as dst:  # read every input once; write the newest's bytes out once
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if path == inputs[-1]:
                    dst.write(view[:n])
    os.fsync(dst.fileno())
"""

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
*inputs, out = sys.argv[1:]
states = [load_file(p) for p in inputs]
w = 1.0 / len(states)
save_file({k: sum(s[k].float() * w for s in states) for k in states[0]}, out)
"""


def commands(paths: list[Path], out: Path, mergekit_python: str | None) -> dict[str, list[str]]:
    files = [str(p / "model.safetensors") for p in paths]
    cmds = {
        "read+write floor": [sys.executable, "-c", FLOOR, *files, str(out / "floor.safetensors")],
        "ckptmerge": [sys.executable, "-m", "ckptmerge", "merge", *map(str, paths), "-o", str(out / "ckptmerge"),
                      "--schedule", "sma", "--quiet", "--hash", "none"],
        "naive load-all": [sys.executable, "-c", NAIVE, *files, str(out / "naive.safetensors")],
    }
    if mergekit_python:
        config = {"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": str(p), "parameters": {"weight": 1.0 / len(paths)}} for p in paths]}
        (out / "mergekit.yml").write_text(json.dumps(config))
        cli = str(Path(mergekit_python).parent / "mergekit-yaml")
        cmds["mergekit linear"] = [cli, str(out / "mergekit.yml"), str(out / "mergekit"), "--allow-crimes"]
    return cmds


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        for key in fa.keys():
            worst = max(worst, float((fa.get_tensor(key) - fb.get_tensor(key)).abs().max()))
    return worst


def mergekit_file(folder: Path) -> Path:
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return singles[0]
    from safetensors.torch import load_file, save_file

    merged = {}
    for f in singles:
        merged.update(load_file(f))
    save_file(merged, folder / "joined.safetensors.tmp")
    return folder / "joined.safetensors.tmp"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4, 8])
    p.add_argument("--mergekit-python", default=str(WORK / "mk-venv" / "bin" / "python"))
    p.add_argument("--warm-only", action="store_true")
    p.add_argument("--layers", type=int, default=LAYERS, help=f"transformer layers (default {LAYERS}: ~470M params)")
    args = p.parse_args()
    mk = args.mergekit_python if Path(args.mergekit_python).exists() else None
    paths = write_checkpoints(max(args.n), args.layers)
    shapes = llama_shapes(args.layers)
    largest = max(torch.Size(s).numel() * 4 for s in shapes.values())
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"model: {params / 1e6:.0f}M fp32 parameters, {params * 4 / 1e9:.2f} GB per checkpoint, "
          f"largest tensor {largest / 1e6:.0f} MB; memory target 3x largest + 500 MB = {(3 * largest + 500e6) / 1e6:.0f} MB\n")
    print("| N | cache | method | seconds | x floor | x ckptmerge | peak RssAnon (MB) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.n:
        out = WORK / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmds = commands(paths[-n:], out, mk)
        for cache in (["warm"] if args.warm_only else ["cold", "warm"]):
            results = {}
            for name, cmd in cmds.items():
                if cache == "warm":
                    clear_output(out, name)
                    timed(cmd, cold=False)  # prime the page cache and the filesystem
                clear_output(out, name)
                results[name] = timed(cmd, cold=(cache == "cold"))
            floor, ours = results["read+write floor"][0], results["ckptmerge"][0]
            for name, (seconds, peak) in results.items():
                print(f"| {n} | {cache} | {name} | {seconds:.1f} | {seconds / floor:.2f} | {seconds / ours:.2f} | "
                      f"{peak / 1e6:.0f} |", flush=True)
        ours_file = out / "ckptmerge" / "model.safetensors"
        print(f"\nN={n}: max |ckptmerge - naive| = {max_abs_diff(ours_file, out / 'naive.safetensors'):.3g}", end="")
        if mk:
            print(f", max |ckptmerge - mergekit| = {max_abs_diff(ours_file, mergekit_file(out / 'mergekit')):.3g}", end="")
        stats = json.loads((out / "ckptmerge" / "merge.json").read_text())["stats"]
        print(f"; ckptmerge's own timer (excluding interpreter + torch import): {stats['total_seconds']:.1f} s\n")


if __name__ == "__main__":
    main()
