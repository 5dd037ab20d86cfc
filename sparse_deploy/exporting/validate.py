"""The exported folder run through ``runtime/`` (the path users run) against torch on real tokens: the export checks
itself and fails loudly with the numbers.

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
    from sparse_deploy.errors import ModelLoadError
    from sparse_deploy.hf import load_tokenizer

    limit = min(tokens, (max_positions or tokens + 1) - 1)
    try:
        tokenizer = load_tokenizer(str(folder))
    except ModelLoadError:  # no tokenizer files (or none that load)
        tokenizer = None
    if tokenizer is not None:
        ids = tokenizer(text or DEFAULT_TEXT, add_special_tokens=True)["input_ids"][:limit]
        ids = [i for i in ids if 0 <= i < vocab_size]
        if len(ids) >= 2:
            return np.asarray([ids], dtype=np.int64), "tokenizer"
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, size=(1, limit), dtype=np.int64), "random ids (no tokenizer)"


def _executed_ops(session) -> dict[str, int]:
    """Op types of the nodes ONNX Runtime ran, counted per node (its optimised graph, not the file's)."""
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    nodes = {(e["name"], e["args"]["op_name"]) for e in events
             if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return dict(sorted(Counter(op for _, op in nodes).items()))


def _runtime_output(model, ids: np.ndarray, decoder: bool) -> np.ndarray:
    """What ``runtime/`` computes for ids [1, T]. Decoders: logits [T, V] of the prompt ids[:, :-1] with an empty
    cache, then of ids[:, -1] with the cache the prompt returned. Encoders: last_hidden_state [T, hidden]."""
    from sparse_deploy.runtime import DecoderRunner, hidden_states

    if not decoder:
        return hidden_states(model, ids, np.ones_like(ids))[0]
    runner = DecoderRunner(model)
    prompt = ids[:, :-1]
    first, past = runner.step(prompt, np.ones_like(prompt), runner.empty_past(1))
    step, _ = runner.step(ids[:, -1:], np.ones_like(ids), past)
    return np.concatenate([first[0], step[0]], axis=0)


def check_parity(
    folder: Path,
    torch_model,
    ids: np.ndarray,
    *,
    decoder: bool,
    tolerance: float | None,
    input_source: str,
    work_dir: Path | None = None,
) -> ParityReport:
    """Compare the exported ``folder``, opened and run by ``runtime/`` as users open it (packed weights decoded by
    the runtime, dense kernels), with ``torch_model`` on ``ids`` [1, T]; raise ExportMismatchError beyond
    ``tolerance`` or when either side gives a non-finite value (whatever the tolerance). ``folder`` holds model.onnx,
    config.json and an export.json with at least the model and settings sections. The profiler writes under
    ``work_dir``."""
    import torch

    from sparse_deploy.runtime import ExportedModel, SessionConfig

    with tempfile.TemporaryDirectory(prefix="sparse_deploy_profile_", dir=work_dir) as tmp:
        model = ExportedModel(folder, SessionConfig(verify=False, kernels="dense",
                                                    profile=str(Path(tmp) / "ort_profile")))
        got = _runtime_output(model, ids, decoder)
        with torch.no_grad():
            tensor = torch.from_numpy(ids)
            mask = torch.ones_like(tensor)
            if decoder:
                expected = torch_model(input_ids=tensor, attention_mask=mask).logits[0].float().numpy()
            else:
                extra = {"token_type_ids": torch.zeros_like(tensor)} if "token_type_ids" in model.input_names() else {}
                expected = torch_model(input_ids=tensor, attention_mask=mask, **extra).last_hidden_state[0].numpy()
        executed = _executed_ops(model.session)
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
