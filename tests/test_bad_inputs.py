"""Every bad input gives its error, names the file / tensor / fix, and leaves nothing behind."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import make_state, tree_digest, write_checkpoint, write_series
from safetensors.torch import save_file

from ckptmerge import compute_coeffs, discover, merge
from ckptmerge.errors import (
    CheckpointFormatError,
    NonFiniteTensorError,
    OutputExistsError,
    PlanMismatchError,
    UnsafeCheckpointError,
)
from ckptmerge.io.dispatch import open_checkpoint


def assert_nothing_written(tmp_path, out_name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((out_name, f".{out_name}"))]
    assert leftovers == [], leftovers


def merge_all(run_dir, out, **kw):
    refs = discover(run_dir).checkpoints
    return merge(refs, compute_coeffs("sma", refs), out, progress=False, **kw)


def test_missing_and_extra_keys_are_listed_in_one_error(tmp_path):
    a, b = make_state(0), make_state(1)
    del a["layers.0.attn.bias"]
    b["extra.weight"] = torch.zeros(2)
    write_series(tmp_path / "run", [a, make_state(2), b])
    with pytest.raises(PlanMismatchError) as err:
        merge_all(tmp_path / "run", tmp_path / "out")
    msg = str(err.value)
    assert "step-000100" in msg and "layers.0.attn.bias" in msg
    assert "extra.weight" in msg and "lacks" in msg
    assert_nothing_written(tmp_path)


def test_shape_and_dtype_mismatches_name_tensor_and_checkpoints(tmp_path):
    a, b = make_state(0), make_state(1)
    a["layers.1.mlp.weight"] = torch.zeros(4, 8)
    b["embed.weight"] = b["embed.weight"].bfloat16()
    write_series(tmp_path / "run", [a, b])
    with pytest.raises(PlanMismatchError) as err:
        merge_all(tmp_path / "run", tmp_path / "out")
    msg = str(err.value)
    assert "layers.1.mlp.weight" in msg and "(4, 8)" in msg and "step-000100" in msg
    assert "embed.weight" in msg and "--out-dtype" in msg
    assert_nothing_written(tmp_path)


def test_mixed_float_dtypes_merge_when_output_dtype_is_chosen(tmp_path):
    a, b = make_state(0), make_state(1)
    b = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in b.items()}
    write_series(tmp_path / "run", [a, b])
    merge_all(tmp_path / "run", tmp_path / "out", dtype=torch.float32)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_int_vs_float_mismatch_is_rejected(tmp_path):
    a, b = make_state(0), make_state(1)
    a["buffers.position_ids"] = a["buffers.position_ids"].float()
    write_series(tmp_path / "run", [a, b])
    with pytest.raises(PlanMismatchError, match="buffers.position_ids"):
        merge_all(tmp_path / "run", tmp_path / "out", dtype=torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_names_checkpoint_and_tensor(tmp_path, bad):
    states = [make_state(i) for i in range(3)]
    states[1]["layers.1.mlp.weight"][3, 2] = bad
    write_series(tmp_path / "run", states)
    with pytest.raises(NonFiniteTensorError) as err:
        merge_all(tmp_path / "run", tmp_path / "out", chunk_bytes=64)
    assert "step-000200" in str(err.value) and "layers.1.mlp.weight" in str(err.value)
    assert "--allow-nonfinite" in str(err.value)
    assert_nothing_written(tmp_path)
    merge_all(tmp_path / "run", tmp_path / "out", allow_nonfinite=True)  # the flag lets it through
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_existing_output_needs_force_and_is_replaced_atomically(tmp_path, series):
    run_dir, _, _ = series
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        merge_all(run_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    merge_all(run_dir, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "merge.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_output_inside_or_equal_to_an_input_is_refused(tmp_path, series):
    run_dir, _, paths = series
    before = tree_digest(run_dir)
    for dest in (paths[-1], paths[-1] / "merged", run_dir):
        with pytest.raises(OutputExistsError, match="overlaps input"):
            merge_all(run_dir, dest, force=True)
    assert tree_digest(run_dir) == before


def test_interrupted_merge_leaves_nothing_and_inputs_untouched(tmp_path, series, monkeypatch):
    run_dir, _, _ = series
    before = tree_digest(run_dir)
    import ckptmerge.io.safetensors_writer as writer_mod

    real_write = writer_mod.StreamingSafetensorsWriter.write_rows
    calls = {"n": 0}

    def dying_write(self, name, start_row, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-merge (on a merge worker's thread)
        return real_write(self, name, start_row, chunk)

    monkeypatch.setattr(writer_mod.StreamingSafetensorsWriter, "write_rows", dying_write)
    with pytest.raises(KeyboardInterrupt):
        merge_all(run_dir, tmp_path / "out")
    assert_nothing_written(tmp_path)
    assert tree_digest(run_dir) == before


def test_successful_merge_never_modifies_inputs(tmp_path, series):
    run_dir, _, _ = series
    before = tree_digest(run_dir)
    merge_all(run_dir, tmp_path / "out")
    assert tree_digest(run_dir) == before


def test_arbitrary_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2)}, "hook": Payload()}, f)
    with pytest.raises(UnsafeCheckpointError) as err:
        open_checkpoint(path)
    assert str(path) in str(err.value) and "safetensors" in str(err.value)
    assert not marker.exists()


class MarkerOnLoad:
    """Leaves a marker file whenever it is constructed: a real unpickle would construct it."""

    def __init__(self, marker: str):
        self.marker = marker
        Path(marker).write_text("ran")

    def __reduce__(self):
        return (MarkerOnLoad, (self.marker,))


def test_training_checkpoint_with_foreign_objects_reads_weights_without_running_them(tmp_path):
    import argparse
    import datetime

    marker = tmp_path / "constructed"
    path = tmp_path / "megatron.pt"
    weights = {"w": torch.arange(4.0)}
    torch.save({"model": weights, "args": argparse.Namespace(lr=1.0), "t": datetime.timedelta(seconds=3),
                "obj": MarkerOnLoad(str(marker))}, path)
    marker.unlink()  # written by the construction above, in this process
    reader = open_checkpoint(path)
    assert reader.keys() == ["w"] and torch.equal(reader.get("w"), weights["w"])
    assert not marker.exists()


def test_torch_saved_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil_zip.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "hook": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="not allowed"):
        open_checkpoint(path)
    assert not marker.exists()


def test_tampered_dcp_metadata_is_refused_and_never_executed(tmp_path):
    write_checkpoint(tmp_path / "dcp", make_state(0), "dcp")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError, match="not allowed"):
        open_checkpoint(tmp_path / "dcp")
    assert not marker.exists()


def test_truncated_and_unknown_files_get_format_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        open_checkpoint(path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointFormatError, match="not a checkpoint"):
        open_checkpoint(tmp_path / "notes.txt")


def test_dcp_reader_skips_optimizer_entries(tmp_path):
    path = write_checkpoint(tmp_path / "dcp", make_state(0), "dcp")
    reader = open_checkpoint(path)
    assert "embed.weight" in reader.keys() and not any("optimizer" in k for k in reader.keys())
    assert any(k.startswith("optimizer") for k in reader.skipped_keys)


def test_dcp_with_a_missing_shard_file_is_a_format_error(tmp_path):
    path = write_checkpoint(tmp_path / "dcp", make_state(0), "dcp")
    for data_file in path.glob("*.distcp"):
        data_file.unlink()
    reader = open_checkpoint(path)  # metadata alone still opens
    with pytest.raises(CheckpointFormatError, match="embed.weight"):
        reader.get("embed.weight")
