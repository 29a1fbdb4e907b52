"""``ckptmerge merge RUN_DIR|CKPT... -o OUT --schedule NAME ...``."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ckptmerge.cli.deprecated import add_renamed
from ckptmerge.cli.merge_flags import add_output_flags
from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.console import format_bytes, print_table
from ckptmerge.io.remote import refuse_urls
from ckptmerge.merging.recipe import MergeRecipe, recipe_from_dict, recipe_from_yaml, with_method
from ckptmerge.merging.schedules import SCHEDULES


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(":", ",").split(",") if x.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a window of checkpoints into one HF folder",
                       description="Merge checkpoints. Flags override the keys of --config recipe.yaml.")
    p.add_argument("inputs", nargs="*", help="a run directory, or checkpoint folders/files (oldest first), or PATH:WEIGHT for each "
                                          "checkpoint (Megatron's weighted merge; docs/posthoc-ema.md)")
    p.add_argument("-o", "--output", help="destination folder (written atomically)")
    p.add_argument("--config", help="YAML recipe with the same options (snake_case keys)")
    p.add_argument("--schedule", metavar="METHOD",
                   help=f"coefficient schedule, with its parameters and window in the method language: NAME or "
                        f"NAME:key=value,... e.g. sma:n=5, ema:alpha=0.2, ema:half_life=2000, minus_sqrt:n=8, "
                        f"custom:weights=0.2/0.3/0.5 (NAME: {', '.join(SCHEDULES)}; default sma)")
    w = p.add_argument_group("window")
    w.add_argument("--last", type=int, help="merge the last N checkpoints")
    w.add_argument("--every", type=int, help="spacing between merged checkpoints, in steps")
    w.add_argument("--every-tokens", type=int, help="spacing between merged checkpoints, in tokens")
    w.add_argument("--end-step", type=int, help="window ends at this step (default: newest)")
    w.add_argument("--steps", type=_ints, help="explicit steps, e.g. 1000,2000,3000")
    w.add_argument("--step-range", type=_ints, help="all checkpoints with START <= step <= STOP, as START:STOP")
    w.add_argument("--tokens-per-step", type=int, help="tokens per step when no metadata gives tokens")
    w.add_argument("--skip-unparsable", action="store_true", default=None, help="skip checkpoints with no step")
    w.add_argument("--fp32-masters", action="store_true", default=None,
                   help="DeepSpeed ZeRO runs: merge the fp32 master weights kept in the optimizer files instead of "
                        "the module weights (bf16 in a bf16 run); refused for checkpoints without them")
    s = p.add_argument_group("schedule parameters")
    s.add_argument("--alpha", type=float, help="ema: weight of each newer checkpoint")
    s.add_argument("--half-life", type=float, help="ema: half-life in steps")
    s.add_argument("--half-life-tokens", type=float, help="ema: half-life in tokens")
    s.add_argument("--lambda", dest="lam", type=float, help="pair: weight on the newer checkpoint")
    s.add_argument("--weights", type=_floats, help="custom: w1,w2,... oldest first")
    s.add_argument("--start-step", type=int, help="swa: first step averaged")
    s.add_argument("--start-fraction", type=float, help="swa: first step as a fraction of the newest step")
    s.add_argument("--normalize", action="store_true", default=None, help="rescale coefficients to sum to 1")
    s.add_argument("--allow-unnormalized", action="store_true", default=None,
                   help="allow coefficients not summing to 1")
    s.add_argument("--allow-negative", action="store_true", default=None,
                   help="allow negative coefficients (extrapolation)")
    add_renamed(s, "--unnormalized", "--allow-unnormalized")
    add_renamed(s, "--extrapolate", "--allow-negative")
    o = p.add_argument_group("output")
    add_output_flags(o)
    o.add_argument("--dry-run", action="store_true", default=None, help="print the plan; read no tensors")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_flags(p)
    p.set_defaults(run=run)


def recipe_from_args(args: argparse.Namespace) -> MergeRecipe:
    """YAML recipe (if any) overridden by every flag given on the command line."""
    refuse_urls("merge", "give a local YAML recipe (its inputs and output may be URLs)", **{"--config": args.config})
    base = recipe_from_yaml(args.config) if args.config else MergeRecipe()
    data = {f.name: getattr(base, f.name) for f in fields(MergeRecipe)}
    if args.inputs:
        data["inputs"] = args.inputs
    for f in fields(MergeRecipe):
        value = getattr(args, f.name, None)
        if f.name != "inputs" and value is not None:
            data[f.name] = value
    return recipe_from_dict(data, source=args.config or "command line")


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.merging.window import resolve_window, run_recipe
    from ckptmerge.parallel.world import rank

    recipe = recipe_from_args(args)
    if recipe.dry_run:
        window = resolve_window(recipe)
        schedule = with_method(recipe).schedule
        print(f"plan: {schedule} over {len(window.refs)} checkpoints -> {recipe.output or '(no output)'}")
        print_table(["coefficient", "step", "tokens", "path"],
                    [[f"{c:.6f}", r.step, r.tokens_seen, r.path] for r, c in zip(window.refs, window.coeffs)])
        for path, why in window.skipped:
            print(f"  skipped {path}: {why}")
        return 0
    result = run_recipe(recipe, progress=not args.quiet)
    if rank() != 0:  # torchrun: rank 0 reports for the job
        return 0
    stats = result.manifest["stats"]
    print(f"wrote {result.output} ({len(result.plan.refs)} checkpoints, {format_bytes(stats['bytes_read'])} read, "
          f"{format_bytes(stats['bytes_written'])} written, {stats['total_seconds']:.1f} s)")
    if recipe.as_checkpoint:
        newest = result.plan.refs[-1]
        print(f"hand-back: the trainer resumes from the merged weights; the optimizer's moments (Adam exp_avg / "
              f"exp_avg_sq) and step counts are kept from the newest checkpoint, {newest.path} (step {newest.step})")
    return 0
