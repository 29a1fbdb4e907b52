"""Online averagers against torch.optim.swa_utils.AveragedModel, offline merges, and uninterrupted runs."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ckptmerge import compute_coeffs, discover, merge, open_checkpoint, select_last
from ckptmerge.errors import ConfigError
from ckptmerge.online import EMA, LAWA, PMA, SWA, parse_average_spec


class Net(torch.nn.Module):
    """Small model with a tied weight, a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.hidden = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(6))
        self.register_buffer("counter", torch.zeros(1, dtype=torch.int64))

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.embed(x)) * self.scale))


def trajectory(steps: int, seed: int = 0):
    """Yield (step, model) after each SGD step of a deterministic little run."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(1, steps + 1):
        x = torch.randint(0, 11, (8, 5))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, dims=1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.scale.mul_(0.99)
            model.counter += 1
        yield step, model


def assert_params_equal(ours: dict, model: torch.nn.Module, atol=1e-6):
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.detach().float(), rtol=1e-6, atol=atol, msg=name)


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_equals_averaged_model(decay):
    ema = EMA(decay)
    reference = None
    for step, model in trajectory(15):
        if reference is None:
            reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        reference.update_parameters(model)
        ema.update(model, step)
    assert_params_equal(ema.averaged_state_dict(), reference.module)


def test_swa_equals_averaged_model_from_start_step():
    swa = SWA(start_step=6)
    reference = None
    for step, model in trajectory(15):
        if step >= 6:
            reference = reference or AveragedModel(model)
            reference.update_parameters(model)
        swa.update(model, step)
    assert swa.n_averaged == 10
    assert_params_equal(swa.averaged_state_dict(), reference.module)


def test_ema_half_life_equals_per_gap_decay_and_is_exact_for_irregular_spacing():
    by_half_life, by_decay = EMA(half_life=3.0), EMA(0.5 ** (1 / 3))
    irregular = EMA(half_life=3.0)
    expected = None
    last = None
    for step, model in trajectory(12):
        by_half_life.update(model, step)
        by_decay.update(model, step)
        if step in (1, 2, 6, 7, 12):  # gaps 1, 4, 1, 5
            irregular.update(model, step)
            current = {k: v.detach().double().clone() for k, v in model.named_parameters()}
            if expected is None:
                expected = current
            else:
                beta = 0.5 ** ((step - last) / 3.0)
                expected = {k: beta * expected[k] + (1 - beta) * current[k] for k in expected}
            last = step
    a, b = by_half_life.averaged_state_dict(), by_decay.averaged_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    got = irregular.averaged_state_dict()
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-6, atol=1e-7)


def test_tied_weights_once_float_buffers_averaged_int_buffers_copied():
    ema = EMA(0.5)
    for step, model in trajectory(3):
        ema.update(model, step)
    state = ema.averaged_state_dict()
    assert "embed.weight" in state and "head.weight" not in state
    assert torch.equal(state["counter"], torch.tensor([3]))
    assert state["scale"].dtype == torch.float32 and not torch.equal(state["scale"], model.scale)


def test_repeated_updates_in_one_step_are_ignored():
    a, b = EMA(0.7), EMA(0.7)
    for step, model in trajectory(6):
        for _ in range(3):  # e.g. called once per micro-batch under gradient accumulation
            a.update(model, step)
        b.update(model, step)
    assert a.n_averaged == b.n_averaged == 6
    for k, v in a.averaged_state_dict().items():
        assert torch.equal(v, b.averaged_state_dict()[k])


def test_swapped_puts_average_in_and_restores_training_weights():
    ema = EMA(0.5)
    for step, model in trajectory(5):
        ema.update(model, step)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model) as swapped:
        assert torch.equal(swapped.embed.weight, ema.averaged_state_dict()["embed.weight"])
        assert swapped.head.weight.data_ptr() == swapped.embed.weight.data_ptr()  # still tied
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("rule,schedule,params", [("lawa", "sma", {}), ("pma", "wma", {}), ("pma", "ema", {"alpha": 0.3})])
def test_snapshot_averagers_equal_offline_merge_of_saved_checkpoints(tmp_path, rule, schedule, params):
    every, n = 3, 4
    online = LAWA(n=n, every=every) if rule == "lawa" else PMA(schedule, n, every=every, **params)
    for step, model in trajectory(20):
        online.update(model, step)
        if step % every == 0:
            folder = tmp_path / "run" / f"step-{step:06d}"
            folder.mkdir(parents=True)
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
            save_file(state, folder / "model.safetensors")
    refs = select_last(discover(tmp_path / "run").checkpoints, n, every_steps=every)
    assert [r.step for r in refs] == [9, 12, 15, 18]
    merge(refs, compute_coeffs(schedule, refs, **params), tmp_path / "offline", progress=False)
    reader = open_checkpoint(tmp_path / "offline")
    averaged = online.averaged_state_dict()
    assert set(averaged) == set(reader.keys())
    for name in reader.keys():
        assert torch.equal(averaged[name], reader.get(name)), name  # bit-identical: one merge path


@pytest.mark.parametrize("make", [lambda: EMA(half_life=4), lambda: SWA(start_step=3), lambda: LAWA(n=3, every=2),
                                  lambda: PMA("ema", 3, every=2, alpha=0.4)])
def test_interrupted_and_resumed_average_equals_uninterrupted(tmp_path, make):
    full = make()
    for step, model in trajectory(14):
        full.update(model, step)
    first = make()
    for step, model in trajectory(7):  # killed mid-window (LAWA: between snapshots 6 and 8)
        first.update(model, step)
    torch.save(first.state_dict(), tmp_path / "avg.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "avg.pt", weights_only=True))
    for step, model in trajectory(14):  # the training run resumes on the same trajectory
        if step > 7:
            resumed.update(model, step)
    for k, v in full.averaged_state_dict().items():
        assert torch.equal(v, resumed.averaged_state_dict()[k]), k


@pytest.mark.parametrize("make, old", [(lambda: EMA(half_life=4), {"half_life": "half_life_steps"}),
                                       (lambda: LAWA(n=3, every=2), {"n": "k"})])
def test_state_saved_under_earlier_parameter_names_resumes(tmp_path, make, old):
    """A run that saved its averager state before ``half_life_steps`` / ``k`` were renamed resumes exactly."""
    full = make()
    for step, model in trajectory(12):
        full.update(model, step)
    first = make()
    for step, model in trajectory(6):
        first.update(model, step)
    state = first.state_dict()
    state["params"] = {old.get(k, k): v for k, v in state["params"].items()}  # as the earlier release wrote it
    resumed = make()
    resumed.load_state_dict(state)
    for step, model in trajectory(12):
        if step > 6:
            resumed.update(model, step)
    for k, v in full.averaged_state_dict().items():
        assert torch.equal(v, resumed.averaged_state_dict()[k]), k


def test_save_writes_a_folder_that_eval_and_merge_read(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ckptmerge.evaluation.evaluator import load_model

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ema = EMA(0.5)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        ema.update(model, step, tokens_seen=step * 100)
    ema.save(tmp_path / "avg", model)
    meta = json.loads((tmp_path / "avg" / "ckptmerge.json").read_text())
    assert meta["step"] == 3 and meta["averaged"]["kind"] == "ema"
    loaded = load_model(tmp_path / "avg")
    torch.testing.assert_close(loaded.model.embed_tokens.weight, ema.averaged_state_dict()["model.embed_tokens.weight"])
    assert open_checkpoint(tmp_path / "avg").keys()


def test_spec_parsing():
    assert isinstance(parse_average_spec("ema:half_life=500"), EMA)
    lawa = parse_average_spec("lawa:n=5,every=200")
    assert (lawa.n, lawa.every) == (5, 200)
    from ckptmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="takes"):
        parse_average_spec("lawa:alpha=1")
    with pytest.raises(ConfigError, match="unknown kind"):
        parse_average_spec("polyak")


def test_old_keyword_names_still_work_with_a_notice():
    with pytest.warns(DeprecationWarning, match=r"lawa:k=5,every=200'.*k= is deprecated; use n="):
        lawa = parse_average_spec("lawa:k=5,every=200")
    assert (lawa.n, lawa.every, lawa.params()) == (5, 200, {"every": 200, "n": 5})
    with pytest.warns(DeprecationWarning, match=r"LAWA\(k=\) is deprecated; use LAWA\(n=\)"):
        assert LAWA(k=3).n == 3
    with pytest.warns(DeprecationWarning, match=r"EMA\(half_life_steps=\) is deprecated; use EMA\(half_life=\)"):
        old = EMA(half_life_steps=4.0)
    assert old.params() == EMA(half_life=4.0).params()
    with pytest.raises(ValueError, match="not both half_life and its old name half_life_steps"):
        EMA(half_life=4.0, half_life_steps=4.0)


def test_single_process_dcp_save_loads_with_dcp_and_unknown_format_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from ckptmerge.errors import ConfigError

    ema = EMA(0.5)
    for step, model in trajectory(4):
        ema.update(model, step)
    ema.save(tmp_path / "avg", model, format="dcp")
    state = {k: torch.zeros_like(v) for k, v in Net().state_dict().items()}
    dcp.load(state, checkpoint_id=tmp_path / "avg")
    for name, value in ema.averaged_state_dict().items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    assert json.loads((tmp_path / "avg" / "ckptmerge.json").read_text())["step"] == 4
    with pytest.raises(ConfigError, match="unknown save format"):
        ema.save(tmp_path / "other", model, format="npz")
    assert not (tmp_path / "other").exists()


def anytime_reference(history: list[tuple[int, dict]], fraction: float) -> dict:
    """fp64 anytime EMA (arXiv 2602.03702): each step r decays the average by 2^(-1/(f r)); an update after a gap
    s -> t applies the gap's steps' decays in turn, giving the new weights the rest of the mass."""
    (first_step, average), rest = history[0], history[1:]
    last = first_step
    for step, current in rest:
        beta = 1.0
        for r in range(last + 1, step + 1):
            beta *= 2.0 ** (-1.0 / (fraction * r))
        average = {k: beta * average[k] + (1.0 - beta) * current[k] for k in average}
        last = step
    return average


@pytest.mark.parametrize("fraction", [0.05, 0.3])
@pytest.mark.parametrize("steps_kept", ["every step", "irregular"])
def test_anytime_ema_online_equals_offline_profile_and_fp64(tmp_path, fraction, steps_kept):
    kept = set(range(1, 31)) if steps_kept == "every step" else {1, 2, 3, 5, 9, 10, 17, 24, 30}
    online, history = EMA(half_life_fraction=fraction), []
    for step, model in trajectory(30):
        if step not in kept:
            continue
        online.update(model, step)
        history.append((step, {k: v.detach().double().clone() for k, v in model.named_parameters()}))
        folder = tmp_path / "run" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
        save_file(state, folder / "model.safetensors")
    refs = discover(tmp_path / "run").checkpoints
    assert [r.step for r in refs] == sorted(kept)
    merge(refs, compute_coeffs("ema", refs, half_life_fraction=fraction), tmp_path / "offline", accum_dtype="float64",
          progress=False)
    reader, averaged = open_checkpoint(tmp_path / "offline"), online.averaged_state_dict()
    expected = anytime_reference(history, fraction)
    for name in expected:
        torch.testing.assert_close(averaged[name].double(), expected[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reader.get(name).double(), averaged[name].double(), rtol=1e-6, atol=1e-6)


def test_anytime_ema_spec_and_resume():
    ema = parse_average_spec("ema:half_life_fraction=0.05")
    assert ema.half_life_fraction == 0.05
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_average_spec("ema:half_life_fraction=0.05,decay=0.9")
    first, resumed, whole = EMA(half_life_fraction=0.1), EMA(half_life_fraction=0.1), EMA(half_life_fraction=0.1)
    for step, model in trajectory(12):
        whole.update(model, step)
        (first if step <= 7 else resumed).update(model, step)
        if step == 7:
            resumed.load_state_dict(first.state_dict())
    for name, value in whole.averaged_state_dict().items():
        assert torch.equal(value, resumed.averaged_state_dict()[name]), name
