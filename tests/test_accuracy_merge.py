"""benchmarks/accuracy.py --merge: GPU result files fold into the table without losing rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402

METRIC = "wikitext2_ppl@2048 (first 40 windows)"


def _row(config, runtime, value):
    return {"model": "SmolLM2-135M", "config": config, "metric": METRIC, "value": value, "runtime": runtime}


def _doc(rows, cmd):
    return {"rows": rows, "runs": [{"date": "2026-11-21", "device": "cuda", "command": cmd}]}


def test_merge_replaces_same_key_keeps_others_and_writes_markdown(tmp_path):
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(_doc([_row("fp16", "gpu/vllm", 20.5), _row("RTN W4A8 g128, KV16", "gpu/vllm", 29.0)],
                                   "first")))
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_doc([_row("fp16", "gpu/fake-quant", 20.4)], "second")))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(_doc([_row("RTN W4A8 g128, KV16", "gpu/vllm", 28.9)], "third")))
    assert accuracy.main(["--merge", str(a), str(b), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    got = {(r["config"], r["runtime"]): r["value"] for r in doc["rows"]}
    assert got == {("fp16", "gpu/vllm"): 20.5, ("fp16", "gpu/fake-quant"): 20.4,
                   ("RTN W4A8 g128, KV16", "gpu/vllm"): 28.9}
    assert [r["command"] for r in doc["runs"]] == ["first", "second", "third"]
    md = out.with_suffix(".md").read_text()
    assert "| gpu/fake-quant | gpu/vllm |" in md
    assert "| SmolLM2-135M | fp16 | " + METRIC + " | 20.400 | 20.500 |" in md
    # merging the same file again adds no duplicate run and changes no row
    assert accuracy.main(["--merge", str(a), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["runs"] == doc["runs"]
    assert sorted(map(json.dumps, again["rows"])) == sorted(map(json.dumps, doc["rows"]))


def test_merge_refuses_a_file_that_is_not_an_accuracy_json(tmp_path):
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(_doc([_row("fp16", "gpu/vllm", 20.5)], "first")))
    before = out.read_text()
    bad = tmp_path / "gemm-h100.json"
    bad.write_text(json.dumps({"device": "H100", "rows": [{"M": 1, "N": 2, "K": 3, "impl": "fp8", "us": 1.0}]}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--merge", str(bad),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "nothing was merged" in proc.stderr
    assert out.read_text() == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
