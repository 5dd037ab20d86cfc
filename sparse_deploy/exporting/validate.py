"""ONNX Runtime against torch on real tokens: the export checks itself and fails loudly with the numbers.

Decoders are compared on a prompt (empty KV cache) and on one more token decoded with the cache the prompt
produced, so the cache path is checked too; encoders on ``last_hidden_state``. The error is
max|ORT − torch| / max|torch|; it must stay within the tolerance of the export's quantization
(``config.DEFAULT_TOLERANCES``) and is reported together with the top-1 agreement (the fraction of positions whose
most likely next token is the same).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_deploy.errors import ExportMismatchError

DEFAULT_TEXT = (
    "The river rises in the hills to the north of the town and flows south through farmland before it reaches "
    "the sea. In the spring, melting snow swells it, and the old stone bridge near the market has been repaired "
    "many times. Most people who live here work in the small factories along its banks or in the shops that "
    "line the main street."
)
CACHE_INPUT = "past_key_values."
CACHE_OUTPUT = "present."
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class ParityReport:
    """How closely the ONNX model reproduces torch on ``positions`` token positions."""

    output: str  # "logits" or "last_hidden_state"
    positions: int
    max_abs_diff: float
    scale: float  # max |torch output|
    rel_diff: float  # max_abs_diff / scale
    tolerance: float | None  # None: reported, not enforced
    top1_agreement: float | None  # decoders: argmax agreement over the positions
    cache_checked: bool  # a decoding step fed with the model's own KV cache was compared
    input_source: str  # "tokenizer" or "random ids (no tokenizer)"
    executed_ops: dict[str, int]  # op types ONNX Runtime executed, from its profiler

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.rel_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def validation_ids(folder: Path, text: str | None, tokens: int, vocab_size: int, max_positions: int | None):
    """Token ids [1, T] of real text from the exported tokenizer; seeded random ids when there is none."""
    limit = min(tokens, (max_positions or tokens + 1) - 1)
    try:
        from transformers import AutoTokenizer

        from sparse_deploy.hf import has_no_vocabulary

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        if has_no_vocabulary(tokenizer):  # transformers 5 builds one from a folder without tokenizer files
            tokenizer = None
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    if tokenizer is not None:
        ids = tokenizer(text or DEFAULT_TEXT, add_special_tokens=True)["input_ids"][:limit]
        ids = [i for i in ids if 0 <= i < vocab_size]
        if len(ids) >= 2:
            return np.asarray([ids], dtype=np.int64), "tokenizer"
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, size=(1, limit), dtype=np.int64), "random ids (no tokenizer)"


def _session(path: Path, profile_dir: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
    options.log_severity_level = 3
    _register_if_needed(path, options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _register_if_needed(path: Path, options) -> None:
    """A custom-op export (``--ops custom``) runs with the native library registered."""
    import onnx

    from sparse_deploy.runtime.session import native_kernels
    from sparse_deploy.runtime.sparse_ops import uses_custom_ops

    if uses_custom_ops(onnx.load(str(path), load_external_data=False)):
        native, reason = native_kernels()
        if native is None:
            raise ExportMismatchError(f"the custom-op export cannot be checked: {reason}")
        native.register(options)


def _executed_ops(session) -> dict[str, int]:
    """Op types of the nodes ONNX Runtime ran, counted per node (its optimised graph, not the file's)."""
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    nodes = {(e["name"], e["args"]["op_name"]) for e in events
             if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return dict(sorted(Counter(op for _, op in nodes).items()))


def _feeds(session, ids: np.ndarray, past: Mapping[str, np.ndarray] | None, total: int) -> dict[str, np.ndarray]:
    """Inputs the graph declares: ids, an all-ones mask over past + new tokens, positions, an empty or given cache."""
    batch, length = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        name = arg.name
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, total), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(total - length, total, dtype=np.int64)[None].repeat(batch, 0)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(ids)
        elif name.startswith(CACHE_INPUT):
            if past is not None:
                feeds[name] = past[CACHE_OUTPUT + name[len(CACHE_INPUT):]]
            else:  # [batch, heads, 0, head_dim]: the static dims come from the graph
                dims = [d if isinstance(d, int) else 0 for d in arg.shape]
                dims[0] = batch
                feeds[name] = np.zeros(dims, _NUMPY_TYPES[arg.type])
        else:
            raise ExportMismatchError(f"the exported model has an input {name!r} the parity check cannot fill")
    return feeds


def _onnx_decoder_logits(session, ids: np.ndarray) -> np.ndarray:
    """Logits [T + 1, V]: the prompt ids[:, :-1] with an empty cache, then ids[:, -1] with the returned cache."""
    names = [out.name for out in session.get_outputs()]
    prompt = ids[:, :-1]
    first = dict(zip(names, session.run(None, _feeds(session, prompt, None, prompt.shape[1]))))
    step = dict(zip(names, session.run(None, _feeds(session, ids[:, -1:], first, ids.shape[1]))))
    return np.concatenate([first["logits"][0], step["logits"][0]], axis=0)


def check_parity(
    onnx_path: Path,
    torch_model,
    ids: np.ndarray,
    *,
    decoder: bool,
    tolerance: float | None,
    input_source: str,
    work_dir: Path | None = None,
) -> ParityReport:
    """Compare ONNX Runtime with ``torch_model`` on ``ids`` [1, T]; raise ExportMismatchError beyond ``tolerance``
    or when either side gives a non-finite value (whatever the tolerance). The profiler writes under ``work_dir``."""
    import torch

    with tempfile.TemporaryDirectory(prefix="sparse_deploy_profile_", dir=work_dir) as tmp:
        session = _session(onnx_path, tmp)
        with torch.no_grad():
            tensor = torch.from_numpy(ids)
            mask = torch.ones_like(tensor)
            if decoder:
                expected = torch_model(input_ids=tensor, attention_mask=mask).logits[0].float().numpy()
                got = _onnx_decoder_logits(session, ids)
            else:
                extra = {"token_type_ids": torch.zeros_like(tensor)} if "token_type_ids" in {
                    i.name for i in session.get_inputs()} else {}
                expected = torch_model(input_ids=tensor, attention_mask=mask, **extra).last_hidden_state[0].numpy()
                names = [o.name for o in session.get_outputs()]
                outputs = dict(zip(names, session.run(None, _feeds(session, ids, None, ids.shape[1]))))
                got = outputs["last_hidden_state"][0]
        executed = _executed_ops(session)
    for side, values in (("ONNX Runtime", got), ("torch", expected)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ExportMismatchError(f"{side} gives {bad} non-finite values (NaN or inf) in its "
                                      f"{'logits' if decoder else 'last_hidden_state'}; the model's weights or its "
                                      f"export are broken, so nothing was written")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))  # max over [T, V] or [T, hidden]
    scale = float(np.max(np.abs(expected)))
    report = ParityReport(
        output="logits" if decoder else "last_hidden_state",
        positions=int(expected.shape[0]),
        max_abs_diff=diff,
        scale=scale,
        rel_diff=diff / max(scale, np.finfo(np.float32).tiny),
        tolerance=tolerance,
        top1_agreement=float(np.mean(got.argmax(-1) == expected.argmax(-1))) if decoder else None,
        cache_checked=decoder,
        input_source=input_source,
        executed_ops=executed,
    )
    if not report.passed:
        raise ExportMismatchError(
            f"ONNX Runtime and torch disagree: max |Δ{report.output}| = {diff:.3g} against a scale of {scale:.3g} "
            f"(relative {report.rel_diff:.3g} > tolerance {tolerance:g}) over {report.positions} positions"
        )
    return report
