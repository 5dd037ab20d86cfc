"""What the benchmark scripts share: where the checkout and the shared data are, the OPT-125m-shaped test
checkpoint, and the tests' reference SparseGPT. A script imports it as ``common`` (Python puts the script's own
folder first on ``sys.path``); it is the one place that edits ``sys.path``: the checkout first, so that a script
measures this checkout's ``sparse_deploy``, and the tests folder for ``reference_sparsegpt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPARSE_DEPLOY_SHARED", ROOT.parent / "shared"))
for _folder in (ROOT / "tests", ROOT):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from sparse_deploy.config import SparsitySpec  # noqa: E402


def spec_of(text: str) -> SparsitySpec:
    return SparsitySpec.pattern(text) if ":" in text else SparsitySpec.unstructured(float(text))


def make_checkpoint(spec: SparsitySpec, folder: Path) -> Path:
    """OPT-125m shape, random weights, decoder-block Linear weights magnitude-pruned to ``spec``."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from sparse_deploy.pruning import magnitude

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig.from_pretrained(SHARED / "tokenizers" / "opt")).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(magnitude(module.weight, None, spec).weight)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt").save_pretrained(folder)
    return folder
