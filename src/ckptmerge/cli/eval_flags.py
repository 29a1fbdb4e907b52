"""The evaluation flags shared by ``eval``, ``search``, ``sweep`` and ``recover``: model, tokenizer, data, device."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ckptmerge.evaluation.device_names import DEVICES, DTYPE_NAMES as DTYPES  # torch-free names
from ckptmerge.io.remote import refuse_urls

if TYPE_CHECKING:
    from ckptmerge.evaluation.settings import EvalSettings


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, tokenizer and device (docs/your-model.md)")
    g.add_argument("--device", default="auto", help=f"{' | '.join(DEVICES)} (default auto: a GPU when there is one)")
    g.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="what the model computes in (merges are accumulated in fp32 either way)")
    g.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the checkpoint folder, "
                                       "else the run directory)")
    g.add_argument("--text-field", default="text", help="JSONL / Parquet / datasets column with the text (default text)")
    g.add_argument("--token-dtype", choices=("uint16", "uint32"),
                   help=".bin token files: id width (default: the FILE.bin.json sidecar; without one, uint16 "
                        "only for vocabularies of at most 65,536)")
    g.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="score even when the tokenizer's size does not fit the model's embedding (a warning)")
    g.add_argument("--model-config", help="HF config folder for raw .pt / DCP checkpoints")
    g.add_argument("--model-factory", help="package.module:function returning an nn.Module (forward -> logits)")
    g.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                   help="rename checkpoint keys by regex before loading, repeatable")
    g.add_argument("--batch-size", type=int, default=16, help="rows per eval batch (default 16)")
    g.add_argument("--max-batch-tokens", type=int, help="tokens per eval batch (caps rows at this // context)")
    g.add_argument("--device-map", choices=("auto",), help="auto: spread an HF model larger than one device over "
                   "all visible devices (accelerate); replaces --device")


def settings_from_args(args: argparse.Namespace, *, progress: bool = True) -> EvalSettings:
    from ckptmerge.evaluation.settings import EvalSettings  # torch: not at the CLI's start-up

    refuse_urls(getattr(args, "command", "eval"), "give a local HF config folder (a checkpoint's own config.json at a URL is read "
                "without this flag)", **{"--model-config": args.model_config})

    return EvalSettings(device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, text_field=args.text_field,
                        token_dtype=args.token_dtype, allow_vocab_mismatch=args.allow_vocab_mismatch,
                        model_config=args.model_config,
                        model_factory=args.model_factory, key_map=list(args.key_map), batch_size=args.batch_size,
                        max_batch_tokens=args.max_batch_tokens, device_map=args.device_map, progress=progress)
