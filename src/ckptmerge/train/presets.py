"""Model presets: HF causal LMs built from config, byte vocabulary (256)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptmerge.data.tokenizer import VOCAB_SIZE
from ckptmerge.errors import UnknownNameError

if TYPE_CHECKING:
    import torch

# name: (architecture, hidden, layers, heads, ffn, context)
PRESETS = {
    "tiny": ("llama", 128, 4, 4, 344, 128),     # ~0.82M parameters
    "small": ("llama", 192, 6, 6, 512, 256),    # ~2.7M
    "base": ("llama", 384, 6, 6, 1024, 256),    # ~10.7M
    "pythia-tiny": ("gpt_neox", 128, 4, 4, 512, 128),  # ~0.86M, Pythia-style (parallel residual, rotary, untied)
}


def preset_context(name: str) -> int:
    return _preset(name)[5]


def _preset(name: str) -> tuple:
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_config(name: str):
    arch, hidden, layers, heads, ffn, context = _preset(name)
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=ffn,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=context,
                                        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    return transformers.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      max_position_embeddings=context, rotary_pct=0.25, use_parallel_residual=True,
                                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)


def build_model(name: str, seed: int) -> torch.nn.Module:
    """A freshly initialized model of preset ``name``; the same seed gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(build_config(name), dtype=torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
