"""Merge benchmark: ckptmerge against the read+write floor, cold and warm, as medians of alternating rounds.

Generates N fp32 checkpoints of a Llama-shaped model (HF folders, one safetensors file each; by
default 5 layers: 130M parameters, 0.52 GB per checkpoint, largest tensor 131 MB). Each round runs
every method once, one after the other, so that the machine's load hits them alike: cold (page
cache dropped before every run; needs root) or warm (after one untimed priming run, the inputs are
read into the page cache again right before every run, since idle pages may be evicted within
seconds). Every method's output is deleted before its run, outside the timing.

Each process times itself after its start-up (interpreter and imports, which are reported apart):
the merge's seconds run from ``main()`` being called to the published, fsynced folder. The floor
reads every input once and writes one output-sized file with ``fsync``. The table gives medians
over rounds: seconds, the ratio to the floor's seconds in the same round, CPU use over the timed
part ((user + system) / seconds; 200% is both cores of a 2-core machine), and peak ``RssAnon``
(memory-mapped and page-cache pages do not count). The last round's outputs are compared bit for bit.

    .venv/bin/python benchmarks/bench_merge.py --n 4 --rounds 3                   # ~2 GB in benchmarks/_work
    .venv/bin/python benchmarks/bench_merge.py --n 2 4 8 --cache warm             # memory flat in N
    .venv/bin/python benchmarks/bench_merge.py --compare-src /path/to/other/src  # an older engine, side by side
    .venv/bin/python benchmarks/bench_merge.py --work /dev/shm/ckptmerge-bench --cache warm  # tmpfs: compute only
    .venv/bin/python benchmarks/bench_merge.py --others                           # + naive, mergekit

mergekit (LGPL, ~430 MB of dependencies) is never a dependency: install it in a separate venv,
e.g. ``python3 -m venv benchmarks/_work/mk-venv && benchmarks/_work/mk-venv/bin/pip install
torch==2.13.0 mergekit``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent / "_work"
LAYERS, HIDDEN, FFN, VOCAB = 5, 1024, 2816, 32000
SRC = Path(__file__).resolve().parent.parent / "src"
# On a VM that hands freed memory back to its host, writing into memory freed seconds ago costs far
# more than into memory freed just now (compare --settle 0 with the default). A method that starts fast
# (the floor) would get the cheap case and one that imports torch first the dear one, so by default
# every method waits this long after its old output is deleted.
SETTLE_S = 3.0


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


def write_checkpoints(work: Path, n: int, layers: int) -> list[Path]:
    from safetensors.torch import save_file

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    paths = []
    for i in range(n):
        folder = work / f"run-L{layers}" / f"step-{(i + 1) * 1000:06d}"
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
    """Samples RssAnon of a process every few ms; keeps the peak (bytes)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"cold runs need root (writing /proc/sys/vm/drop_caches: {exc}); pass --cache warm") from exc


# Each script prints one JSON line on stderr: start-up seconds, timed seconds, CPU seconds in the timed part.
# With BENCH_CLEAR set, a script deletes its old output itself, after its start-up, just before the timing.
REPORT = """
def clear_late():
    import os, shutil
    path = os.environ.get("BENCH_CLEAR")
    if path and os.path.isdir(path):
        shutil.rmtree(path)
    elif path and os.path.exists(path):
        os.unlink(path)

def report(t0, t1, c1):
    import json, os, sys, time
    t2, c2 = time.monotonic(), os.times()
    print(json.dumps({"startup_s": t1 - t0, "seconds": t2 - t1,
                      "cpu_s": c2.user - c1.user + c2.system - c1.system}), file=sys.stderr)
"""

FLOOR = """
import os, sys, time
t0 = time.monotonic()
*inputs, out = sys.argv[1:]
clear_late()
t1, c1 = time.monotonic(), os.times()
buf = bytearray(16 << 20)
view = memoryview(buf)
with open(out, "wb", buffering=0) as dst:  # read every input once; write the newest's bytes out once
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if path == inputs[-1]:
                    dst.write(view[:n])
    os.fsync(dst.fileno())
report(t0, t1, c1)
"""

CKPTMERGE = """
import os, sys, time
t0 = time.monotonic()
from ckptmerge.cli.main import main
clear_late()
t1, c1 = time.monotonic(), os.times()
if main(sys.argv[1:]) != 0:
    sys.exit(1)
report(t0, t1, c1)
"""

NAIVE = """
import os, sys, time
t0 = time.monotonic()
import torch
from safetensors.torch import load_file, save_file
clear_late()
t1, c1 = time.monotonic(), os.times()
*inputs, out = sys.argv[1:]
states = [load_file(p) for p in inputs]
w = 1.0 / len(states)
save_file({k: sum(s[k].float() * w for s in states) for k in states[0]}, out)
report(t0, t1, c1)
"""


def commands(paths: list[Path], out: Path, args: argparse.Namespace) -> dict[str, tuple[list[str], dict, Path]]:
    """method -> (command, environment, output path)."""
    files = [str(p / "model.safetensors") for p in paths]
    py = [sys.executable, "-c"]
    merge_args = ["merge", *map(str, paths), "--schedule", "sma", "--quiet", "--hash", "none", "--device", args.device]
    cmds = {"read+write floor": (py + [REPORT + FLOOR, *files, str(out / "floor.bin")], {}, out / "floor.bin"),
            "ckptmerge": (py + [REPORT + CKPTMERGE, *merge_args, "-o", str(out / "ckptmerge")],
                          {"PYTHONPATH": str(SRC)}, out / "ckptmerge")}
    if args.also_direct_io:
        cmds["ckptmerge --direct-io"] = (py + [REPORT + CKPTMERGE, *merge_args, "--direct-io", "-o", str(out / "direct")],
                                         {"PYTHONPATH": str(SRC)}, out / "direct")
    for i, src in enumerate(args.compare_src):
        cmds[f"ckptmerge ({src})"] = (py + [REPORT + CKPTMERGE, *merge_args[:-2], "-o", str(out / f"compare-{i}")],
                                      {"PYTHONPATH": str(src)}, out / f"compare-{i}")
    if args.others:
        cmds["naive load-all"] = (py + [REPORT + NAIVE, *files, str(out / "naive.safetensors")], {}, out / "naive.safetensors")
        mk = Path(args.mergekit_python)
        if mk.exists():
            config = {"merge_method": "linear", "dtype": "float32",
                      "models": [{"model": str(p), "parameters": {"weight": 1.0 / len(paths)}} for p in paths]}
            (out / "mergekit.yml").write_text(json.dumps(config))
            cli = str(mk.parent / "mergekit-yaml")
            cmds["mergekit linear"] = ([cli, str(out / "mergekit.yml"), str(out / "mergekit"), "--allow-crimes"], {},
                                       out / "mergekit")
    return cmds


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_once(cmd: list[str], env: dict, cold: bool) -> dict:
    """One timed run: the process's own report, plus wall seconds and peak RssAnon. ``env`` may name
    the output in BENCH_CLEAR for the script to delete after its start-up."""
    if cold:
        drop_caches()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **env})
    sampler = PeakAnon(proc.pid)
    _, err = proc.communicate()
    peak, wall = sampler.stop(), time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err.decode()[-2000:]}")
    lines = [line for line in err.decode().splitlines() if line.startswith("{")]
    timing = json.loads(lines[-1]) if lines else {"startup_s": 0.0, "seconds": wall, "cpu_s": float("nan")}
    return {**timing, "wall_s": wall, "peak_anon": peak}


def read_into_cache(files: list[Path]) -> None:
    """Read every file once, so its pages are in the page cache (a machine may evict idle pages within
    seconds: this one runs proactive reclaim, so a cache primed once does not stay warm)."""
    buf = bytearray(16 << 20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_rounds(cmds: dict, rounds: int, cache: str, inputs: list[Path], settle_s: float) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in cmds}
    if cache == "warm":
        for cmd, env, path in cmds.values():  # prime the filesystem and the interpreter's files
            clear(path)
            run_once(cmd, env, cold=False)
    for r in range(rounds):
        for name, (cmd, env, path) in cmds.items():
            if settle_s >= 0:
                clear(path)
                time.sleep(settle_s)  # every method starts as long after its old output was freed
            else:  # each script deletes its old output itself, after its start-up: memory freed just now
                env = {**env, "BENCH_CLEAR": str(path)}
            if cache == "warm":
                read_into_cache(inputs)
            results[name].append(run_once(cmd, env, cold=cache == "cold"))
        floor = results["read+write floor"][-1]["seconds"]
        print(f"  round {r + 1} ({cache}, load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{name} {res[-1]['seconds']:.2f} s" for name, res in results.items()) + f"; floor {floor:.2f} s",
            file=sys.stderr, flush=True)
    return results


def table_rows(n: int, cache: str, results: dict[str, list[dict]]) -> list[str]:
    floors = [r["seconds"] for r in results["read+write floor"]]
    rows = []
    for name, runs in results.items():
        ratios = [r["seconds"] / f for r, f in zip(runs, floors)]
        cpu = statistics.median(100 * r["cpu_s"] / r["seconds"] for r in runs)
        rows.append(f"| {n} | {cache} | {name} | {statistics.median(r['seconds'] for r in runs):.2f} | "
                    f"{statistics.median(r['startup_s'] for r in runs):.2f} | {statistics.median(ratios):.2f} "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) | {cpu:.0f}% | "
                    f"{max(r['peak_anon'] for r in runs) / 1e6:.0f} |")
    return rows


def compare_outputs(cmds: dict) -> str:
    ours = cmds["ckptmerge"][2] / "model.safetensors"
    notes = []
    for name, (_, _, path) in cmds.items():
        if name.startswith("ckptmerge (") or name == "ckptmerge --direct-io":
            same = (path / "model.safetensors").read_bytes() == ours.read_bytes()
            notes.append(f"{name}: {'byte-identical' if same else 'DIFFERENT'} model.safetensors")
        elif name in ("naive load-all", "mergekit linear"):
            notes.append(f"{name}: max |difference| {max_abs_diff(ours, path):.3g}")
    return "; ".join(notes)


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    files = sorted(b.glob("*.safetensors")) if b.is_dir() else [b]
    worst = 0.0
    with safe_open(a, "pt") as fa:
        for file in files:
            with safe_open(file, "pt") as fb:
                for key in fb.keys():
                    worst = max(worst, float((fa.get_tensor(key) - fb.get_tensor(key)).abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4])
    p.add_argument("--layers", type=int, default=LAYERS, help=f"transformer layers (default {LAYERS}: 130M params)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    p.add_argument("--device", default="cpu", help="ckptmerge --device (cpu, cuda)")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help=f"seconds between deleting a method's old output and running it (default {SETTLE_S:g}); "
                        "negative: each method deletes it itself after its start-up, just before its timing")
    p.add_argument("--work", type=Path, default=WORK, help="where checkpoints and outputs go (a tmpfs: compute only)")
    p.add_argument("--compare-src", type=Path, nargs="*", default=[], help="other ckptmerge source trees to time")
    p.add_argument("--also-direct-io", action="store_true", help="also time ckptmerge merge --direct-io")
    p.add_argument("--others", action="store_true", help="also time a naive load-all average and mergekit")
    p.add_argument("--mergekit-python", default=str(WORK / "mk-venv" / "bin" / "python"))
    p.add_argument("--keep", action="store_true", help="keep the outputs (default: delete them at the end)")
    args = p.parse_args()
    paths = write_checkpoints(args.work, max(args.n), args.layers)
    shapes = llama_shapes(args.layers)
    largest = max(torch.Size(s).numel() * 4 for s in shapes.values())
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"model: {params / 1e6:.0f}M fp32 parameters, {params * 4 / 1e9:.2f} GB per checkpoint, largest tensor "
          f"{largest / 1e6:.0f} MB; memory target 3x largest + 500 MB = {(3 * largest + 500e6) / 1e6:.0f} MB; "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds; work dir {args.work}\n")
    print("| N | cache | method | seconds (median) | start-up s | x floor (median, range) | CPU | peak RssAnon (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n:
        out = args.work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmds = commands(paths[-n:], out, args)
        for cache in args.cache:
            inputs = [p / "model.safetensors" for p in paths[-n:]]
            print("\n".join(table_rows(n, cache, run_rounds(cmds, args.rounds, cache, inputs, args.settle))), flush=True)
        print(f"\nN={n}: {compare_outputs(cmds)}\n", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
