"""benchmarks/lm_eval_table.py: argument checks, reading lm-eval's saved results, the table."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_eval_table as T  # noqa: E402


def _results(path: Path, word: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": {"wikitext_local": {
        "word_perplexity,none": word, "byte_perplexity,none": 2.0, "bits_per_byte,none": 1.0}}}))
    return path


def test_read_result_takes_the_newest_file_written_since_the_run_started(tmp_path):
    old = _results(tmp_path / "m" / "results_old.json", 99.0)
    os.utime(old, (time.time() - 100, time.time() - 100))
    start = time.time() - 10
    assert T.read_result(tmp_path)["word_perplexity"] == 99.0  # no start time: any file
    with pytest.raises(FileNotFoundError):
        T.read_result(tmp_path, start)  # only a stale file from an earlier run
    _results(tmp_path / "m" / "results_new.json", 33.5)
    got = T.read_result(tmp_path, start)
    assert got == {"word_perplexity": 33.5, "byte_perplexity": 2.0, "bits_per_byte": 1.0}


def test_unknown_config_and_bad_kv_bits_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        T.main(["--configs", "qoq-g64"])
    assert "unknown config 'qoq-g64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["--configs", "rtn-g128:3"])
    assert "KV bits must be 4, 8 or 16" in capsys.readouterr().err


def test_markdown_lists_rows_and_runs(tmp_path):
    doc = {"rows": [{"config": "fp16", "runtime": "gpu/vllm+lm-eval", "word_perplexity": 33.83,
                     "byte_perplexity": 1.93, "bits_per_byte": 0.95},
                    {"config": "QoQ W4A8 g128, KV4", "runtime": "gpu/vllm+lm-eval", "note": "failed"}],
           "runs": [{"date": "d", "device": "cuda", "versions": {}, "command": "c", "note": "n"}]}
    T.write_markdown(doc, tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    assert "| fp16 | 33.8300 | 1.9300 | 0.9500 | gpu/vllm+lm-eval |" in md
    assert "| QoQ W4A8 g128, KV4 | n/a | n/a | n/a | gpu/vllm+lm-eval |" in md
    assert "`c` — n" in md
