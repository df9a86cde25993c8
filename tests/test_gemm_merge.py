"""benchmarks/gemm_merge.py: merging gemm.py result files from separate runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gemm_merge  # noqa: E402


def _res(date, rows, vllm=None, device="NVIDIA H100 80GB HBM3", skipped=()):
    return {"device": device, "date": date, "torch": "2.11", "vllm": vllm, "command": f"run@{date}",
            "rows": [{"M": m, "N": 64, "K": 128, "impl": i, "us": us} for m, i, us in rows],
            "quant_rows": [], "skipped": list(skipped)}


def test_each_impl_from_the_first_run_that_timed_it_and_the_anchor_spread():
    a = _res("d1", [(1, "fp8", 10.0), (16, "fp8", 20.0), (1, "marlin_w4a16", 5.0)], vllm="0.26.0",
             skipped=[{"impl": "qoq_chn", "reason": "not built"}, {"impl": "int8_w8a8", "reason": "x"}])
    b = _res("d2", [(1, "fp8", 11.0), (16, "fp8", 19.0), (1, "qoq_chn", 4.0), (1, "marlin_w4a16", 9.0)])
    m = gemm_merge.merge([a, b])
    got = sorted((r["M"], r["impl"], r["us"]) for r in m["rows"])
    assert got == [(1, "fp8", 10.0), (1, "marlin_w4a16", 5.0), (1, "qoq_chn", 4.0), (16, "fp8", 20.0)]
    # the skip of an impl the second run timed is gone; the other stays
    assert [s["impl"] for s in m["skipped"]] == ["int8_w8a8"]
    assert m["vllm"] == "0.26.0" and m["date"] == "d2"
    fp8 = m["anchors"]["fp8 file1/file0"]
    assert fp8["n"] == 2 and fp8["min"] == pytest.approx(0.95) and fp8["max"] == pytest.approx(1.1)
    assert m["anchors"]["marlin_w4a16 file1/file0"]["max"] == pytest.approx(1.8)


def test_different_devices_are_refused(tmp_path):
    a = _res("d1", [(1, "fp8", 1.0)])
    b = _res("d2", [(1, "qoq_chn", 1.0)], device="NVIDIA A100-SXM4-80GB")
    with pytest.raises(SystemExit, match="different devices"):
        gemm_merge.merge([a, b])


def test_cli_writes_json_and_summary(tmp_path):
    files = []
    for i, res in enumerate([_res("d1", [(1, "fp8", 10.0), (1, "bf16", 12.0)]),
                             _res("d2", [(1, "fp8", 10.5), (1, "qoq_g128", 5.0)])]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(res))
    assert gemm_merge.main([str(f) for f in files] + ["--out", str(tmp_path / "o"), "--tag=-t"]) == 0
    out = json.loads((tmp_path / "o" / "gemm-h100-t.json").read_text())
    assert {r["impl"] for r in out["rows"]} == {"fp8", "bf16", "qoq_g128"}
    md = (tmp_path / "o" / "gemm-h100-t.md").read_text()
    assert "cross-run anchor fp8 file1/file0: time ratio min 1.050" in md
    assert "| 1 | 5.0 |" in md  # qoq_g128's time in the M = 1 row


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json"):
        gemm_merge.main([str(bad), "--out", str(tmp_path)])
