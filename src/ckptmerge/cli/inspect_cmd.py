"""``ckptmerge inspect RUN_DIR``: the checkpoints of a run as a table."""

from __future__ import annotations

import argparse
from collections import Counter

from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.console import format_bytes, print_table
from ckptmerge.io.remote import is_url


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list the checkpoints of a run (step, tokens, lr, framework, format, dtype, size)")
    p.add_argument("run_dir")
    p.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step, when no metadata gives tokens")
    p.add_argument("--skip-unparsable", action="store_true", help="leave out checkpoints whose step is unknown")
    add_storage_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts; a safetensors run is inspected without torch
    from ckptmerge.io.fingerprint import checkpoint_files
    from ckptmerge.merging.discover import discover

    if is_url(args.run_dir):  # s3://, gs://: one listing, headers by range reads
        from ckptmerge.merging.remote_discover import checkpoint_bytes, discover_remote as discover
    found = discover(args.run_dir, tokens_per_step=args.tokens_per_step, skip_unparsable=args.skip_unparsable)
    rows = []
    for ref in found.checkpoints:
        dtypes = _stored_dtypes(ref)
        size = (checkpoint_bytes(ref.path) if is_url(args.run_dir)
                else sum(f.stat().st_size for f in checkpoint_files(ref.path)))
        rows.append([ref.name, ref.step, _or_dash(ref.tokens_seen), _or_dash(ref.lr, ".3g"), ref.framework or "-",
                     ref.layout,
                     "/".join(d for d, _ in dtypes.most_common()), format_bytes(size)])
    print_table(["checkpoint", "step", "tokens", "lr", "framework", "format", "dtype", "size"], rows)
    for path, why in found.skipped:
        print(f"skipped {path.name}: {why}")
    print(f"{len(found.checkpoints)} checkpoints")
    return 0


def _stored_dtypes(ref) -> Counter:
    """How many tensors of each dtype: from the safetensors headers alone (no torch), else from a reader."""
    from ckptmerge.io.layout import detect_layout
    from ckptmerge.io.safetensors_header import stored_dtypes

    found = detect_layout(ref.path) if ref.layout == "safetensors" and not is_url(ref.path) else None
    if found is not None and found[0] == "safetensors":
        return Counter(dtype for file in found[1] for dtype in stored_dtypes(file).values())
    from ckptmerge.io.dispatch import open_checkpoint

    reader = open_checkpoint(ref.path)
    try:
        return Counter(str(reader.info(k).dtype).removeprefix("torch.") for k in reader.keys())
    finally:
        reader.close()


def _or_dash(value: object, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
