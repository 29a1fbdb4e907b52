"""Models and data at URLs for evaluation: the config and tokenizer mirrored to the cache, the weights read by
byte ranges straight into the model, a data file fetched once per version.

    model = load_remote_model(Url("s3", "bucket/run/checkpoint-400"), device="cpu", dtype="float32")
    local_data("s3://bucket/data/held.jsonl")   # the cached local copy's path, as a string
    local_tokenizer("s3://bucket/tok")          # --tokenizer URL: the cached copy of its tokenizer files
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckptmerge.errors import ModelLoadError
from ckptmerge.evaluation.devices import resolve_device, resolve_dtype
from ckptmerge.evaluation.loading import build_model, load_weights
from ckptmerge.io.remote import Url, as_location, is_url
from ckptmerge.io.remote_cache import cached_object, cached_sidecars, cached_tokenizer


def load_remote_model(url: Url, *, device: str | torch.device | None = "cpu", dtype: str | torch.dtype = "float32",
                      model_config=None, model_factory: str | None = None, key_map: Sequence[str] = ()) -> torch.nn.Module:
    """The model at ``url`` in eval mode: built from its ``config.json`` (or ``--model-config`` /
    ``--model-factory``), its weights read by range requests (``io/remote_safetensors.py``)."""
    local = cached_sidecars(url)
    if model_factory or model_config:
        model = build_model(model_config=model_config, model_factory=model_factory)
    elif (local / "config.json").is_file():
        model = build_model(model_config=local)
    else:
        raise ModelLoadError(f"{url}: no config.json, so the architecture is unknown; pass --model-config DIR "
                             "(an HF config folder) or --model-factory package.module:function")
    load_weights(model, url, key_map=key_map)
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval()


def tokenizer_home(model_path):
    """Where to look for a model's tokenizer: the cached sidecars of a URL, else the path itself."""
    return cached_sidecars(as_location(model_path)) if is_url(model_path) else model_path


def local_data(name: str) -> str:
    """A data argument usable by ``data/sources.py``: a URL's cached copy, anything else as it is."""
    return str(cached_object(as_location(name))) if is_url(name) else name


def local_tokenizer(name):
    """A ``--tokenizer`` argument usable by ``data/text_tokenizer.py``: a URL's cached copy, anything else as it is."""
    return cached_tokenizer(as_location(name)) if is_url(name) else name
