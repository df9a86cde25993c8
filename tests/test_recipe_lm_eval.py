"""The offline `wikitext_local` lm-eval task: documents, detokenization, metrics."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "vllm_qoq" / "lm_eval_tasks"
RAW = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _utils():
    spec = importlib.util.spec_from_file_location("wikitext_local_utils", TASKS / "wikitext_local" / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_articles_at_top_level_headings():
    u = _utils()
    text = " = A = \r\n a b .\r\n = = Sub = = \r\n c\r\n = B = \r\n d e\r\n"
    docs = u.split_articles(text)
    assert docs == [" = A = \n a b .\n = = Sub = = \n c\n", " = B = \n d e\n"]
    with pytest.raises(ValueError):
        u.split_articles("no headings here\n")


@pytest.mark.skipif(not RAW.is_file(), reason="../shared/data not present")
def test_wikitext_test_file_has_62_articles_and_all_words():
    pytest.importorskip("datasets")
    ds = _utils().load_documents(str(RAW))["test"]
    assert len(ds) == 62  # data README: 62 documents, 241,211 words
    assert sum(len(d["page"].split()) for d in ds) == 241211
    assert ds[0]["page"].startswith(" = Robert Boulter = \n")


def test_detokenize_and_metrics():
    u = _utils()
    doc = {"page": ' = T = \n He said " hi " ( 1 @,@ 000 ) , it \'s 5 @.@ 5 % . \n'}
    out = u.detokenize(doc)
    assert out == ' = T =\nHe said "hi" (1,000), it\'s 5.5 %.\n'
    r = u.process_results(doc, [-10.0])
    assert r["byte_perplexity"] == (-10.0, len(doc["page"].encode()))
    assert r["word_perplexity"][1] == len(__import__("re").split(r"\s+", doc["page"]))


@pytest.mark.skipif(not RAW.is_file(), reason="../shared/data not present")
def test_detokenizer_matches_lm_eval_builtin_on_every_article():
    ref = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    u = _utils()
    for d in u.load_documents(str(RAW))["test"]:
        assert u.detokenize(d) == ref.wikitext_detokenizer(d)


@pytest.mark.slow
def test_lm_eval_runs_the_task_on_a_tiny_model():
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from converters.tiny import tiny_llama_dir

    tm = TaskManager(include_path=str(TASKS))
    r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_llama_dir()},dtype=float32,max_length=256",
                                tasks=["wikitext_local"], limit=2, task_manager=tm, batch_size=1, device="cpu")
    res = r["results"]["wikitext_local"]
    assert res["bits_per_byte,none"] > 0 and res["word_perplexity,none"] > res["byte_perplexity,none"] > 1
