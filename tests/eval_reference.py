"""Independent references for evaluation tests: the evaluator's window rule rebuilt, and transformers' own loss."""

import torch
import transformers


def reference_windows(ids: torch.Tensor, n_windows: int, context: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping windows of context + 1 ids (the evaluator's rule, rebuilt here)."""
    starts = torch.linspace(0, len(ids) - context - 1, n_windows).round().long()
    assert int(starts.diff().min()) >= context
    return torch.stack([ids[s:s + context + 1] for s in starts])


def transformers_losses(config, weights: dict, windows: torch.Tensor) -> torch.Tensor:
    """transformers' own loss of a fresh Llama holding ``weights``, one window at a time (fp64 out)."""
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.eval()
    with torch.no_grad():
        return torch.tensor([float(model(input_ids=w[None], labels=w[None].clone()).loss) for w in windows],
                            dtype=torch.float64)
