"""Evaluations cached by what determines them, so a rerun of a sweep only scores what is new.

The key hashes the content of every checkpoint merged (``ckptmerge.io.fingerprint``), the merge
coefficients and the evaluation windows themselves (their token ids), so a renamed run still hits
and a changed checkpoint or data file misses. One JSON line per evaluation, appended as it finishes:
an interrupted sweep keeps what it scored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ckptmerge.evaluation.evaluator import EvalResult


def windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().numpy().tobytes() + str(tuple(windows.shape)).encode()).hexdigest()


def eval_key(fingerprints: Sequence[str], coeffs: Sequence[float], windows_sha: str) -> str:
    text = json.dumps({"checkpoints": list(fingerprints), "coeffs": [float.hex(float(c)) for c in coeffs],
                       "windows": windows_sha})
    return hashlib.sha256(text.encode()).hexdigest()


def result_fields(result: EvalResult) -> dict:
    """An EvalResult as plain JSON fields (a cache line, an Optuna user attribute)."""
    return {"data": result.data, "loss": result.loss, "stderr": result.stderr, "tokens": result.tokens,
            "window_losses": result.window_losses, "bytes": result.bytes, "window_tokens": result.window_tokens,
            "tokens_requested": result.tokens_requested}


def result_from_fields(row: dict) -> EvalResult:
    return EvalResult(row["data"], row["loss"], row["stderr"], row["tokens"], row["window_losses"],
                      row.get("bytes", 0), row.get("window_tokens", []), row.get("tokens_requested"))


class EvalCache:
    """``key -> EvalResult`` backed by a JSONL file (missing file: empty cache)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._results: dict[str, EvalResult] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write
                self._results[row["key"]] = result_from_fields(row)

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key: str) -> EvalResult | None:
        return self._results.get(key)

    def put(self, key: str, result: EvalResult, about: dict) -> None:
        self._results[key] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"key": key, **about, **result_fields(result)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
