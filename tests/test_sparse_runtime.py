"""Packed exports on the native sparse kernels: the in-memory rewrite, kernels auto/sparse/dense, the custom-op
export, and the errors without the library. Tests that need the built library skip when it is absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

from sparse_deploy.config import ExportConfig
from sparse_deploy.errors import KernelsUnavailableError
from sparse_deploy.exporting import export
from sparse_deploy.formats.export_info import read_export_info
from sparse_deploy.runtime import DecoderRunner, ExportedModel, SessionConfig
from sparse_deploy.runtime import session as session_module
from sparse_deploy.runtime.kernel_choice import Choice, Timing, TimingTable, chooser, pattern_key
from sparse_deploy.runtime.sparse_ops import DOMAIN, OP_FP32, find_sites

_native, _why = session_module.native_kernels()
needs_kernels = pytest.mark.skipif(_native is None, reason=f"native sparse kernels unavailable: {_why}")


def prune_half(folder):
    """Magnitude-prune every decoder linear of a saved tiny model to 50% in place (row-wise, so every row keeps
    half its weights); embeddings and the LM head stay dense."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                W = module.weight
                cut = W.abs().kthvalue(W.shape[1] // 2, dim=1, keepdim=True).values
                W[W.abs() <= cut] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model_type, quantize, ops) -> exported folder of a 50%-pruned tiny decoder, built on first use."""
    root = tmp_path_factory.mktemp("sparse-runtime")
    cache = {}

    def get(model_type="llama", quantize="none", ops="standard"):
        key = (model_type, quantize, ops)
        if key not in cache:
            source = root / f"{model_type}-pruned"
            if not source.exists():
                prune_half(make_tiny(model_type, source))
            config = ExportConfig(encoding="packed", quantize=quantize, ops=ops)
            cache[key] = export(source, root / f"{model_type}-{quantize}-{ops}", config).output
        return cache[key]

    return get


def run_decoder(folder, kernels, steps=4):
    """Logits of a 12-token prefill (every position) and of ``steps`` decode steps through the KV cache, for a
    fixed token sequence (so that two runs see the same inputs whatever their argmax)."""
    model = ExportedModel(folder, SessionConfig(threads=1, kernels=kernels))
    runner = DecoderRunner(model)
    ids = np.random.default_rng(0).integers(100, 8000, size=(1, 12 + steps), dtype=np.int64)
    mask = np.ones((1, 12), np.int64)
    logits, past = runner.step(ids[:, :12], mask, runner.empty_past(1))
    collected = [logits[0]]
    for k in range(12, 12 + steps):
        mask = np.ones((1, k + 1), np.int64)
        logits, past = runner.step(ids[:, k : k + 1], mask, past)
        collected.append(logits[0])
    return model, np.concatenate(collected)


def test_sites_cover_every_pruned_linear(exported):
    import onnx

    model = onnx.load(str(exported() / "model.onnx"))
    sites = find_sites(model)
    assert len(sites) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(site.op == OP_FP32 and site.transpose for site in sites)
    assert all(0.45 < site.sparsity < 0.55 for site in sites)


def test_export_info_records_ops(exported):
    assert read_export_info(exported()).ops == "standard"


def test_dense_kernels_need_no_library(exported):
    model, logits = run_decoder(exported(), "dense")
    assert model.kernels.sparse == [] and np.isfinite(logits).all()


@needs_kernels
@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_sparse_kernels_equal_dense(exported, model_type):
    folder = exported(model_type)
    _, dense = run_decoder(folder, "dense")
    model, sparse = run_decoder(folder, "sparse")
    assert len(model.kernels.sparse) == {"llama": 14, "opt": 12}[model_type] and model.kernels.isa
    scale = np.abs(dense).max()
    assert np.abs(sparse - dense).max() <= 1e-5 * scale, np.abs(sparse - dense).max() / scale


def test_auto_follows_the_timing_table(tmp_path):
    """auto keeps a layer sparse exactly where the (cached) timing says the sparse op wins."""
    from sparse_deploy.runtime.sparse_ops import Site

    fast = Site("a", "a.out", OP_FP32, True, (64, 64), 1024)
    slow = Site("b", "b.out", OP_FP32, True, (64, 128), 4096)
    table = TimingTable("test machine", tmp_path / "table.json")
    table.entries[pattern_key(fast)] = Timing((2.0, 20.0), (1.0, 21.0))
    table.entries[pattern_key(slow)] = Timing((2.0, 20.0), (3.0, 10.0))
    choice = Choice("auto")
    keep = chooser("auto", choice, lambda site: pytest.fail("a cached pattern was timed again"), table)
    assert keep(fast) and not keep(slow)
    assert choice.sparse == ["a"] and choice.dense == ["b"]
    table.save()
    assert TimingTable("test machine", tmp_path / "table.json").entries == table.entries
    assert TimingTable("another machine", tmp_path / "table.json").entries == {}
    assert Timing((2.0, 20.0), (1.0, 30.0)).sparse_wins, "64 decode steps gain more than the prompt loses"
    assert not Timing((2.0, 20.0), (1.9, 30.0)).sparse_wins, "a prompt slower by more than the decode gain"
    forced = Choice("sparse")
    assert chooser("sparse", forced, lambda s: pytest.fail("sparse times nothing"), None)(slow)
    assert not chooser("dense", Choice("dense"), lambda s: pytest.fail("dense times nothing"), None)(fast)


@needs_kernels
def test_auto_is_sparse_or_dense_per_layer_and_exact(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_DEPLOY_CACHE", str(tmp_path))
    folder = exported()
    _, dense = run_decoder(folder, "dense")
    model, auto = run_decoder(folder, "auto")
    assert len(model.kernels.sparse) + len(model.kernels.dense) == 2 * 7
    assert model.kernels.timings and (tmp_path / "kernel-choice.json").exists()
    assert np.abs(auto - dense).max() <= 1e-5 * np.abs(dense).max()


def test_sparse_without_library_is_one_clear_error(exported, monkeypatch):
    monkeypatch.setattr(session_module, "native_kernels", lambda: (None, "built without a compiler"))
    with pytest.raises(KernelsUnavailableError, match="needs the native sparse kernels: built without a compiler"):
        ExportedModel(exported(), SessionConfig(kernels="sparse"))
    model = ExportedModel(exported(), SessionConfig(kernels="auto"))
    assert model.kernels.sparse == [] and "built without a compiler" in model.kernels.reason


@needs_kernels
def test_custom_op_export_round_trip(exported, monkeypatch):
    import onnx

    folder = exported(ops="custom")
    assert read_export_info(folder).ops == "custom"
    model = onnx.load(str(folder / "model.onnx"))
    assert sum(node.op_type == OP_FP32 and node.domain == DOMAIN for node in model.graph.node) == 2 * 7
    assert not any(".packed." in init.name for init in model.graph.initializer)
    _, dense = run_decoder(exported(), "dense")
    _, custom = run_decoder(folder, "auto")
    assert np.abs(custom - dense).max() <= 1e-5 * np.abs(dense).max()
    monkeypatch.setattr(session_module, "native_kernels", lambda: (None, "not built"))
    with pytest.raises(KernelsUnavailableError, match=r"--ops custom.*_sparse_ops\.so: not built"):
        ExportedModel(folder)


@needs_kernels
def test_int8_packed_runs_sparse_int8(exported):
    folder = exported(quantize="int8")
    model, sparse = run_decoder(folder, "sparse")
    assert len(model.kernels.sparse) == 2 * 7
    _, dense = run_decoder(folder, "dense")
    # both quantize activations dynamically (ORT: uint8 asymmetric per tensor; the op: int8 symmetric per row)
    rel = np.abs(sparse - dense).max() / np.abs(dense).max()
    assert rel < 0.05, rel


def test_cli_kernels_and_bench_say_what_ran(exported, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sparse_deploy.cli import app

    monkeypatch.setenv("SPARSE_DEPLOY_CACHE", str(tmp_path))
    out = CliRunner().invoke(app, ["kernels"])
    assert "library: " in out.output and "_sparse_ops.so" in out.output
    assert out.exit_code == (0 if _native is not None else 1)
    assert ("available: yes" if _native is not None else "available: no") in out.output
    monkeypatch.setattr(session_module, "native_kernels", lambda: (None, "no compiler here"))
    model = ExportedModel(exported(), SessionConfig(threads=1))
    from sparse_deploy.cli import _kernels_line

    assert _kernels_line(model.kernels.to_json()) == "sparse kernels: not used (no compiler here)"


def test_read_graph_leaves_large_tensors_in_the_file(exported):
    """The graph read from the wire format equals onnx.load's; tensors of min_bytes or more stay in the file and
    read back equal."""
    import onnx
    from onnx import numpy_helper

    from sparse_deploy.formats.onnx_file import read_graph, tensor_array

    path = exported("opt") / "model.onnx"
    full, lazy = onnx.load(str(path)), read_graph(path, min_bytes=1024)
    assert [n.name for n in lazy.graph.initializer] == [n.name for n in full.graph.initializer]
    assert lazy.graph.node == full.graph.node and lazy.opset_import == full.opset_import
    external = [t for t in lazy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 10 and lazy.ByteSize() < full.ByteSize() / 4
    for a, b in zip(full.graph.initializer, lazy.graph.initializer):
        x, y = numpy_helper.to_array(a), tensor_array(b, path.parent)
        assert x.dtype == y.dtype and np.array_equal(x, y), a.name


@pytest.mark.parametrize("k", [128, 100])
def test_pack_bits_equals_pack_rows(k):
    """The stored layout (bits over the flattened [N, K], values row-major) repacks to what pack_rows gives."""
    from sparse_deploy.formats.packed import Stored, pack
    from sparse_deploy.runtime.kernels import pack_bits, pack_rows

    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, k), dtype=np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    stored = Stored(pack(w, chunk_elems=16 * k), w.shape)  # three chunks
    got, want = pack_bits(stored.mask_bits(), stored.nonzeros(), w.shape), pack_rows(w)
    for a, b in zip(got.inputs(), want.inputs()):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_tied_head_transpose_becomes_fused_matmul():
    """MatMul(X, Transpose(E)) of a large initializer runs as FusedMatMul(X, E, transB=1): same output, and no
    Transpose left for ONNX Runtime to fold into a second copy of E."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sparse_deploy.runtime.sparse_ops import feed, rewrite

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 64), dtype=np.float32)  # 75 KB: above the 64 KB threshold
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "Et"], ["logits"])], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 300])],
        [numpy_helper.from_array(emb, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    done = rewrite(model, None, fuse_transposes=True)
    assert [n.op_type for n in done.model.graph.node] == ["Gather", "FusedMatMul"]
    options = ort.SessionOptions()
    fed = feed(done, options)
    session = ort.InferenceSession(done.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del fed
    ids = np.array([[3, 7, 299]], np.int64)
    assert np.allclose(session.run(None, {"ids": ids})[0], emb[ids] @ emb.T, atol=1e-4)


@needs_kernels
def test_sparse_session_uses_the_kernel_arrays_in_place(exported):
    """kernels=sparse: the packed weights reach the session as shared initializers (no copy by ONNX Runtime), and
    the proto given to ONNX Runtime holds no weight data."""
    model = ExportedModel(exported("opt"), SessionConfig(threads=1, kernels="sparse"))
    held = model.session._sparse_deploy_arrays
    assert sum(isinstance(a, np.ndarray) for a in held) == 3 * len(model.kernels.sparse) == 3 * 12


@needs_kernels
def test_c_program_runs_a_custom_op_export(exported, tmp_path):
    """A C app on the wheel's libonnxruntime.so, with the library registered, runs the model.onnx that
    ``export(..., ExportConfig(ops="custom"))`` wrote (a tiny 50%-pruned Llama: 14 sparse nodes, KV-cache inputs)
    and gets the logits of the runtime's dense path."""
    from test_native import build_c_runner, run_c

    exe = build_c_runner(tmp_path)
    folder = exported(ops="custom")
    model = ExportedModel(folder, SessionConfig(threads=1))
    ids = np.random.default_rng(1).integers(100, 8000, size=(1, 9), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(9)[None]}
    for i in model.session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, model.info.kv_heads, 0, model.info.head_dim), np.float32)
    feeds = {i.name: feeds[i.name] for i in model.session.get_inputs()}
    logits = run_c(exe, folder / "model.onnx", "logits", feeds, tmp_path)
    dense = ExportedModel(exported(), SessionConfig(threads=1, kernels="dense"))
    want = dense.session.run(["logits"], feeds)[0]
    assert logits.size == want.size and np.abs(logits - want.reshape(-1)).max() <= 1e-5 * np.abs(want).max()


def test_auto_needs_a_margin_agreeing_pairs_and_a_quiet_machine(tmp_path):
    """A sparse op 3% faster, faster only in its best run (the median pair says slower), or faster by the median
    pair but not by the upper quartile of the pairs (noisy) stays dense; the ratio and the flag survive the table."""
    assert Timing((2.0, 20.0), (1.5, 20.0), (0.75, 1.0)).sparse_wins
    assert not Timing((2.0, 20.0), (1.94, 20.0)).sparse_wins, "within the 5% margin"
    assert not Timing((2.0, 20.0), (1.5, 20.0), (1.02, 1.0)).sparse_wins, "the median pair says dense"
    assert not Timing((2.0, 20.0), (1.5, 20.0), (0.75, 1.0), noisy=True).sparse_wins
    table = TimingTable("m", tmp_path / "t.json")
    table.entries["k"] = Timing((2.0, 20.0), (1.5, 20.0), (0.75, 1.0), noisy=True)
    table.save()
    assert TimingTable("m", tmp_path / "t.json").entries == table.entries


@needs_kernels
def test_auto_times_an_encoder_at_prompt_size(tmp_path, monkeypatch):
    """An encoder runs each layer on all of its tokens at once: auto times its layers at M = PREFILL_M only (a
    decoder's M = 1 decode step never happens there), under table keys of their own."""
    from transformers import AutoModel

    from sparse_deploy.runtime import kernel_choice as kc

    source = make_tiny("bert", tmp_path / "bert")
    model = AutoModel.from_pretrained(source)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                W = module.weight
                W[W.abs() <= W.abs().kthvalue(W.shape[1] // 2, dim=1, keepdim=True).values] = 0
    model.save_pretrained(source)
    folder = export(source, tmp_path / "onnx", ExportConfig(encoding="packed")).output
    monkeypatch.setenv("SPARSE_DEPLOY_CACHE", str(tmp_path / "cache"))
    timed = []
    measure = kc.measure
    monkeypatch.setattr(kc, "measure", lambda site, native, threads, encoder=False: timed.append(encoder) or measure(
        site, native, threads, encoder))
    opened = ExportedModel(folder, SessionConfig(threads=1))
    assert timed and all(timed)
    assert opened.kernels.timings and all(key.startswith("encoder ") for key in opened.kernels.timings)
    assert all(t.dense_ms[0] == t.dense_ms[1] and t.sparse_ms[0] == t.sparse_ms[1]
               for t in opened.kernels.timings.values())
    assert opened.kernels.to_json()["timed_shapes"] == len(opened.kernels.timings)
    again = ExportedModel(folder, SessionConfig(threads=1))  # the timings now come from the cached table
    assert again.kernels.timed == 0 and again.kernels.sparse == opened.kernels.sparse
    assert len(timed) == opened.kernels.timed


def test_auto_judges_by_the_upper_quartile_of_the_pairs():
    """Timed pairs (fastest dense ms, fastest sparse ms, median and upper quartile of sparse / dense): sparse only
    where three pairs in four agree, at M = 1 and over the reference generation."""
    from sparse_deploy.runtime.kernel_choice import decode_favours_sparse, judge

    clear = (1.0, 0.7, 0.7, 0.8)
    assert decode_favours_sparse(clear) and judge(clear, (10.0, 11.0, 1.1, 1.2)).sparse_wins
    straddles = (1.0, 0.7, 0.7, 0.97)  # wide pairs: a quarter of them within the margin
    assert not decode_favours_sparse(straddles)
    assert judge(straddles, None).noisy and not judge(straddles, None).sparse_wins
    slower = (1.0, 0.99, 0.99, 1.0)
    assert not judge(slower, None).noisy and not judge(slower, None).sparse_wins
    # the generation wins by the medians (10 + 64 * 0.85 <= 0.95 * 74) but not by the quartiles (13 + 64 * 0.93)
    close = judge((1.0, 0.85, 0.85, 0.93), (10.0, 10.0, 1.0, 1.3))
    assert close.noisy and not close.sparse_wins


def test_a_truncated_packed_file_is_one_clear_error(exported, tmp_path):
    import shutil

    from sparse_deploy.errors import RuntimeSessionError

    folder = tmp_path / "truncated"
    shutil.copytree(exported(), folder)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeSessionError, match="could not decode the packed weights.*truncated protobuf"):
        ExportedModel(folder, SessionConfig(kernels="sparse", verify=False))


def test_weights_left_dense_go_through_a_removed_spill_file(exported, monkeypatch):
    """kernels=dense decodes every packed weight into a temporary file in the folder that ONNX Runtime maps; the
    file is gone once the session exists, and a folder it cannot write to falls back to handing arrays over."""
    from sparse_deploy.runtime import sparse_ops

    folder = exported()
    before = sorted(p.name for p in folder.iterdir())
    opened = []
    real_open = sparse_ops.Spill.open
    monkeypatch.setattr(sparse_ops.Spill, "open", classmethod(lambda cls, f: opened.append(real_open(f)) or opened[-1]))
    _, spilled = run_decoder(folder, "dense")
    assert opened and opened[0] is not None and not opened[0].path.exists()
    assert sorted(p.name for p in folder.iterdir()) == before
    monkeypatch.setattr(sparse_ops.Spill, "open", classmethod(lambda cls, f: None))
    _, in_memory = run_decoder(folder, "dense")
    assert np.array_equal(spilled, in_memory)
