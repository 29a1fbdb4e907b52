"""A user's model, built with the field's libraries only: a BPE tokenizer trained by ``tokenizers``, a tiny
GPT-2 trained a few steps with plain PyTorch and saved the way HF Trainer saves (``checkpoint-N/`` folders
with the tokenizer in each), and reference losses computed by transformers directly, never by ckptmerge."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

CONTEXT = 32
EOS = "<|endoftext|>"
WORDS = ["the", "king", "doth", "speak", "and", "queen", "answers", "thee", "not", "so", "river", "runs",
         "under", "stone", "bridges", "quietly", "merchant", "sells", "silver", "rings"]


def sentences(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(4, 10))).capitalize() + "." for _ in range(n)]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def gpt2(vocab_size: int, n_embd: int = 32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=n_embd, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def train_run(root: Path, *, steps=(15, 40), with_tokenizer: bool = True) -> tuple[object, list[Path]]:
    """Train on seeded sentences; save ``root/checkpoint-S`` at each of ``steps``. Returns (tokenizer, folders)."""
    tokenizer = train_tokenizer(sentences(1, 400))
    ids = torch.tensor(tokenizer(" ".join(sentences(1, 400)))["input_ids"])
    model = gpt2(len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    folders = []
    for step in range(1, max(steps) + 1):
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (8,), generator=g)
        batch = torch.stack([ids[s:s + CONTEXT] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step in steps:
            folder = root / f"checkpoint-{step}"
            model.save_pretrained(folder)
            if with_tokenizer:
                tokenizer.save_pretrained(folder)
            folders.append(folder)
    return tokenizer, folders


def reference_loss(model, ids: list[int], context: int = CONTEXT) -> tuple[float, int]:
    """transformers' logits, cross-entropy against the next token, over consecutive windows of ``context`` inputs
    (every token after the first scored once): (nats/token, tokens)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            chunk = torch.tensor(ids[start:start + context + 1])[None]
            logits = model(input_ids=chunk[:, :-1]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits.double(), chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return total / count, count


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def merged_hf(folders: list[Path], coeffs: list[float]):
    """The weighted sum of checkpoints in fp64 with transformers' loader, loaded into a fresh model."""
    models = [load_hf(f) for f in folders]
    states = [m.state_dict() for m in models]
    merged = {k: sum(c * s[k].double() for c, s in zip(coeffs, states)).float() for k in states[0]}
    models[-1].load_state_dict(merged)
    return models[-1]


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    return loss * tokens / (n_bytes * math.log(2))
