"""converters/ppl.py: windows, datasets and the PyTorch fake-quant reference runtime."""

import math

import pytest
import torch
from safetensors.torch import load_file

from converters import ppl, quantize
from converters.tiny import tiny_llama_dir
from vllm_qoq import format as fmt


class _CharTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_token_windows_are_consecutive_and_drop_the_tail():
    w = ppl.token_windows(_CharTok(), "abcdefghij", seqlen=3)
    assert w == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert len(ppl.token_windows(_CharTok(), "abcdefghij", seqlen=3, max_windows=2)) == 2
    with pytest.raises(ValueError):
        ppl.token_windows(_CharTok(), "ab", seqlen=3)


def test_datasets():
    assert ppl.load_text("sotu").count("\n\n") > 10
    assert ppl.load_text("wikitext2").startswith(" = Robert Boulter = ")
    with pytest.raises(FileNotFoundError):
        ppl.load_text("no-such-dataset")


def test_reference_runtime_dequantizes_a_qoq_checkpoint(tmp_path):
    tiny = tiny_llama_dir()
    out = tmp_path / "q"
    assert quantize.main(["--model", str(tiny), "--out", str(out), "--group-size", "128"]) == 0
    sd = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"
    m = ppl.load_reference_model(str(out), act_quant=False)
    w = dict(m.named_modules())[p].weight
    assert torch.equal(w, fmt.dequantize_weight({n: sd[f"{p}.{n}"] for n in fmt.G128_TENSORS}, 128))
    windows = [list(range(5, 69)), list(range(100, 164))]
    nll_w4, n = ppl.reference_nll(m, windows)
    nll_w4a8, _ = ppl.reference_nll(ppl.load_reference_model(str(out), act_quant=True), windows)
    nll_fp, _ = ppl.reference_nll(ppl.load_reference_model(str(tiny)), windows)
    assert n == 126 and all(math.isfinite(x) for x in (nll_w4, nll_w4a8, nll_fp))
    assert nll_w4a8 != nll_w4  # the INT8 activation quantizer is in the loop
    assert abs(nll_w4a8 - nll_w4) < 0.05 * abs(nll_w4)
