import pytest

from sparse_deploy.checkpoint import LayerRecord, Manifest, read_manifest, write_manifest
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
    with staged_output(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        with staged_output(tmp_path / "file", force=True):
            pass


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
