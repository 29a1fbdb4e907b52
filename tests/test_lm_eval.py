"""lm-eval on the in-memory model equals lm-eval's own run on a saved folder (tiny task in tests/lm_eval_tasks)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

from bpe_model import sentences, train_run  # noqa: E402
from ckptmerge.cli.main import main  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
TASK = "ckptmerge_tiny"


def lm_eval_reference(folder: Path) -> dict:
    """lm-eval's own HF path: ``model="hf"`` loading ``folder`` from disk, never through ckptmerge."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},tokenizer={folder}", tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(TASKS)), device="cpu", batch_size=8,
                                  log_samples=False)
    return {k.split(",")[0]: v for k, v in out["results"][TASK].items() if isinstance(v, float)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    import os

    os.environ["CKPTMERGE_CACHE"] = str(root / "cache")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    _, folders = train_run(root / "run")
    (root / "heldout.txt").write_text(" ".join(sentences(7, 20)))
    return root, folders


def test_eval_lm_eval_matches_lm_evals_own_run(run, monkeypatch, capsys):
    root, folders = run
    monkeypatch.chdir(TASKS)  # the task's data_files path is relative
    out = root / "r.json"
    code = main(["eval", str(folders[-1]), "--data", str(root / "heldout.txt"), "--device", "cpu", "--lm-eval", TASK,
                 "--lm-eval-include", str(TASKS), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    ours = json.loads(out.read_text())[str(folders[-1])]["lm-eval"][TASK]
    want = lm_eval_reference(folders[-1])
    assert ours["acc"] == pytest.approx(want["acc"]) and ours["acc_norm"] == pytest.approx(want["acc_norm"])


def test_search_on_a_task_metric_scores_the_merged_weights(run, tmp_path, monkeypatch):
    import ckptmerge as cm
    from ckptmerge.search.run import search
    from ckptmerge.search.study import SearchConfig

    root, folders = run
    monkeypatch.chdir(TASKS)
    refs = cm.discover(root / "run").checkpoints
    cfg = SearchConfig(space="pair", data=str(root / "heldout.txt"), trials=3, sampler="random",
                       objective=f"lm-eval:{TASK}:acc", lm_eval_include=[str(TASKS)])
    result = search(refs, cfg, n_tokens=4096)
    trial = result.trials[-1]
    cm.merge(refs, trial["weights"], tmp_path / "merged", allow_unnormalized=True, progress=False)
    assert trial["task_score"] == pytest.approx(lm_eval_reference(tmp_path / "merged")["acc"])
    assert result.best_loss == -max(t["task_score"] for t in result.trials)
