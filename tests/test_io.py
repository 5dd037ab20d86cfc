import json
import os
import stat

import pytest

from sparse_deploy.formats.checkpoint import LayerRecord, Manifest, read_manifest, write_manifest
from sparse_deploy.errors import InvalidInputError, OutputExistsError
from sparse_deploy.io import staged_output


def test_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_output(out) as stage:
        (stage / "model.bin").write_bytes(b"ok")
    assert (out / "model.bin").read_bytes() == b"ok"


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with staged_output(out):
            pass
    with pytest.raises(OutputExistsError, match="not written by sparse-deploy"):
        with staged_output(out, force=True):
            raise AssertionError("no work may start")
    (out / "export.json").write_text("{}")
    with staged_output(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        with staged_output(tmp_path / "file", force=True):
            pass


def test_outputs_that_cannot_become_a_folder_are_refused_up_front(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    for bad, match in ((".", "current folder"), (tmp_path.parent, "current folder"),
                       (tmp_path / "file" / "out", "is not a folder")):
        with pytest.raises(OutputExistsError, match=match):
            with staged_output(bad, force=True):
                raise AssertionError("no work may start")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_result_folder_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "result") as stage:
            (stage / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "result").stat().st_mode) == 0o755


def test_manifest_round_trip_and_corrupt_file(tmp_path):
    manifest = Manifest(
        model={"source": "x", "model_type": "opt"}, method="sparsegpt", sparsity=None, pattern="2:4",
        calibration={"source": "calib.txt", "nsamples": 4, "seqlen": 32, "seed": 0}, solver={"blocksize": 128},
        layers=(LayerRecord("model.layers.0.fc1", (8, 4), 0.5, "2:4", 0.01, 0.1),),
        totals={"sparsity": 0.5}, time_s=1.0, time_per_layer_s=(1.0,), peak_rss_bytes=10,
        versions={"torch": "x"}, tool_version="0.1.0",
    )
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path).layer("model.layers.0.fc1.weight").pattern == "2:4"
    assert read_manifest(tmp_path / "missing") is None
    (tmp_path / "sparse_deploy.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="re-run prune"):
        read_manifest(tmp_path)


def test_side_files_are_the_ones_a_model_needs(tmp_path):
    from sparse_deploy.hf import copy_side_files

    source, target = tmp_path / "source", tmp_path / "target"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "1_Pooling" / "config.json").write_text("{}")
    (source / "notes").mkdir()
    (source / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}, {"idx": 1, "path": "1_Pooling"}]))
    for name in ("tokenizer.json", "vocab.txt", "modeling_custom.py", "calib.txt", "README.md",
                 "pytorch_model.bin.index.json", "model.safetensors", "train_info.json"):
        (source / name).write_text(name)
    target.mkdir()
    (target / "tokenizer.json").write_text("written by save_pretrained")
    copy_side_files(str(source), target)
    assert sorted(p.name for p in target.iterdir()) == ["1_Pooling", "modules.json", "tokenizer.json", "vocab.txt"]
    # remote code travels only when trusted and named by auto_map (see test_bad_inputs)
    assert (target / "tokenizer.json").read_text() == "written by save_pretrained"
    assert (target / "1_Pooling" / "config.json").exists()


def test_export_info_reads_settings(tmp_path):
    from sparse_deploy.formats.export_info import read_export_info, write_export_info

    assert not read_export_info(tmp_path).present
    write_export_info(tmp_path, {"settings": {"encoding": "packed", "quantize": "int8", "opset": 18},
                                 "totals": {"weights": 3}})
    info = read_export_info(tmp_path)
    assert (info.encoding, info.quantize, info.ops, info.opset, info.packed) == ("packed", "int8", "standard", 18, True)
    assert info.summary() == {"encoding": "packed", "quantize": "int8", "ops": "standard", "totals": {"weights": 3}}


def test_export_info_reads_model_facts_and_files_without_them(tmp_path):
    from sparse_deploy.formats.export_info import context_of, read_export_info, write_export_info

    write_export_info(tmp_path, {"model": {"task": "text-generation-with-past", "kind": "decoder", "max_context": 512}})
    info = read_export_info(tmp_path)
    assert (info.kind, info.max_context) == ("decoder", 512)
    write_export_info(tmp_path, {"model": {"task": "feature-extraction"}})  # written before kind and max_context
    info = read_export_info(tmp_path)
    assert (info.kind, info.max_context) == ("encoder", None)
    assert context_of({"n_positions": 1024}) == 1024 and context_of({"max_position_embeddings": 0}) is None
