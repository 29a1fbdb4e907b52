"""From a MergeRecipe to the checkpoints and coefficients to merge, and the merge itself."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptmerge.errors import ConfigError
from ckptmerge.io.layouts.deepspeed import masters_entry
from ckptmerge.io.remote import is_url
from ckptmerge.io.remote_tree import shared_listings
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import describe_path, discover, is_run_dir
from ckptmerge.merging.distributed import refuse_url_ranks
from ckptmerge.merging.offline import merge
from ckptmerge.merging.output import MergeResult
from ckptmerge.merging.recipe import (
    MergeRecipe,
    split_input_weights,
    validate,
    with_method,
)
from ckptmerge.merging.remote_discover import remote_candidates
from ckptmerge.merging.schedules import compute_coeffs, is_signed, phema_fit
from ckptmerge.merging.select import select_last, select_range, select_steps
from ckptmerge.parallel.agree import phase
from ckptmerge.parallel.world import is_distributed


@dataclass
class Window:
    """The selected checkpoints (oldest first), their coefficients, and what discovery skipped."""

    refs: list[CheckpointRef]
    coeffs: list[float]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def resolve_window(recipe: MergeRecipe) -> Window:
    """Discover (or take the listed checkpoints), select the window, compute the coefficients."""
    problems = validate(recipe)
    if problems:
        raise ConfigError("invalid merge options:\n  " + "\n  ".join(problems))
    weighted = split_input_weights(recipe.inputs)[1] is not None  # ``merge a:0.3 b:0.7``: weights go with paths
    recipe = with_method(recipe)  # ``--schedule ema:alpha=0.2,n=5``: name, parameters and window
    refs, skipped = _candidates(recipe, keep_order=weighted)
    if weighted:
        refs, weights = _oldest_first(refs, recipe.weights)
        recipe = dataclasses.replace(recipe, weights=weights)
    _check_one_profile(recipe, refs)
    if recipe.last is not None:
        refs = select_last(refs, recipe.last, every_steps=recipe.every, every_tokens=recipe.every_tokens,
                           end_step=recipe.end_step)
    elif recipe.steps is not None:
        refs = select_steps(refs, recipe.steps)
    elif recipe.step_range is not None:
        refs = select_range(refs, *recipe.step_range)
    if recipe.fp32_masters:  # each DeepSpeed tag named by rank 0's optimizer file: it opens as the fp32 masters
        refs = [dataclasses.replace(r, path=masters_entry(r.path)) for r in refs]
    coeffs = compute_coeffs(recipe.schedule, refs, normalize=recipe.normalize,
                            allow_unnormalized=recipe.allow_unnormalized, allow_negative=recipe.allow_negative,
                            **recipe.schedule_params())
    return Window(refs, coeffs, skipped)


def _check_one_profile(recipe: MergeRecipe, refs: list[CheckpointRef]) -> None:
    """Snapshots of several power-EMA profiles (``RUN/phema``) are merged by ``phema`` only: any other schedule
    would treat two profiles of one step as two checkpoints of the run."""
    gammas = {r.ema_gamma for r in refs if r.ema_gamma is not None}
    if len(gammas) > 1 and recipe.schedule.replace("-", "_") != "phema":
        raise ConfigError(f"{', '.join(recipe.inputs)}: power-EMA snapshots of {len(gammas)} profiles (each step "
                          f"{len(gammas)} times); reconstruct an EMA with --schedule phema:sigma_rel=S, or give one "
                          f"profile's snapshots as paths")


def _candidates(recipe: MergeRecipe, *, keep_order: bool = False) -> tuple[list[CheckpointRef], list[tuple[Path, str]]]:
    """A run's checkpoints, or the named ones: oldest first when every step is known (as given with
    ``keep_order``, for weights that go with their paths)."""
    if any(is_url(p) for p in recipe.inputs):  # s3://, gs://, ...: merging/remote_discover.py
        return remote_candidates(recipe.inputs, tokens_per_step=recipe.tokens_per_step,
                                 skip_unparsable=recipe.skip_unparsable, keep_order=keep_order)
    paths = [Path(p) for p in recipe.inputs]
    runs = [p for p in paths if keep_order and is_run_dir(p)]
    if runs:
        raise ConfigError(f"{runs[0]}: a run directory, but a weight (PATH:WEIGHT) goes with one checkpoint; name "
                          f"its checkpoints, e.g. {runs[0] / 'checkpoint-1000'}:0.5")
    if len(paths) == 1 and is_run_dir(paths[0]):
        found = discover(paths[0], tokens_per_step=recipe.tokens_per_step, skip_unparsable=recipe.skip_unparsable)
        return found.checkpoints, found.skipped
    refs = [describe_path(p, tokens_per_step=recipe.tokens_per_step) for p in paths]
    if all(r.step is not None for r in refs) and not keep_order:
        refs.sort(key=lambda r: r.step)  # explicit paths with known steps are ordered oldest first
    return refs, []


def _oldest_first(refs: list[CheckpointRef], weights: list[float]) -> tuple[list[CheckpointRef], list[float]]:
    """The named checkpoints oldest first (when every step is known), each weight still with its checkpoint."""
    pairs = list(zip(refs, weights, strict=True))
    if all(r.step is not None for r in refs):
        pairs.sort(key=lambda pair: pair[0].step)
    return [r for r, _ in pairs], [w for _, w in pairs]


def run_recipe(recipe: MergeRecipe, *, progress: bool = True) -> MergeResult:
    """Resolve the window and merge it into ``recipe.output``."""
    if not recipe.output:
        raise ConfigError("output: give -o OUT (the merged folder to write)")
    if is_distributed():  # before discovery lists a bucket on every rank
        refuse_url_ranks(recipe.inputs, recipe.output)
    with shared_listings():  # at URLs: discovery's one listing serves the merge too
        return _run_window(recipe, progress)


def _run_window(recipe: MergeRecipe, progress: bool) -> MergeResult:
    window = None
    with phase():  # on many ranks: a bad window is reported once, by rank 0, and stops every rank
        window = resolve_window(recipe)
    options = recipe.options(progress=progress)
    recipe = with_method(recipe)
    if is_signed(recipe.schedule):  # phema: least-squares coefficients, as solved (or rescaled by --normalize)
        options = dataclasses.replace(options, allow_negative=True,
                                      allow_unnormalized=options.allow_unnormalized or not recipe.normalize)
    return merge(window.refs, window.coeffs, recipe.output, options, recipe=_recipe_record(recipe, window))


def _recipe_record(recipe: MergeRecipe, window: Window) -> dict:
    record = {k: v for k, v in asdict(recipe).items() if v not in (None, False, [])}
    record.pop("dry_run", None)
    record["skipped"] = [{"path": str(p), "why": why} for p, why in window.skipped]
    if recipe.schedule.replace("-", "_") == "phema":  # the post-hoc EMA: coefficients and the profile match
        record["posthoc_fit"] = phema_fit(window.refs, recipe.sigma_rel, recipe.gamma).record()
    return record
