"""``ckptmerge data prepare`` (the pinned corpora) and ``ckptmerge data tokenize`` (nanoGPT-style token files)."""

from __future__ import annotations

import argparse

from ckptmerge.console import print_table
from ckptmerge.data.corpora import DOMAINS, cache_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare corpora; tokenize your text into a token .bin")
    p.add_argument("action", choices=["prepare", "tokenize"])
    p.add_argument("sources", nargs="*", help=f"prepare: domains (default: all of {', '.join(DOMAINS)}); "
                                              "tokenize: one text / .jsonl / .parquet file or saved dataset")
    p.add_argument("--tokenizer", help="tokenize: tokenizer folder or tokenizer.json")
    p.add_argument("--text-field", default="text", help="tokenize: JSONL / Parquet / datasets column (default text)")
    p.add_argument("-o", "--output", help="tokenize: the .bin to write (raw uint16, uint32 for vocabularies "
                                          "over 65,536; a FILE.bin.json sidecar says which)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.data.tokens import prepare, tokenize_file

    if args.action == "tokenize":
        if len(args.sources) != 1 or not args.tokenizer or not args.output:
            raise SystemExit("usage: ckptmerge data tokenize FILE --tokenizer DIR -o tokens.bin")
        count, dtype = tokenize_file(args.sources[0], args.tokenizer, args.output, text_field=args.text_field,
                                     progress=not args.quiet)
        print(f"{args.output}: {count:,} tokens ({dtype})")
        return 0
    print_table(["domain", "tokens"], [[name, f"{count:,}"] for name, count in prepare(args.sources or None).items()])
    print(f"cache: {cache_dir()}")
    return 0
