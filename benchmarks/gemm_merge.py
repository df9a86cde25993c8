"""Merge benchmarks/gemm.py result files from separate runs on one device type.

    python benchmarks/gemm_merge.py A.json B.json [...] --out DIR --tag=-name

For when the impls of one comparison could not be timed in one process (e.g. the
vLLM baselines on a machine where the qoq extension had not been built).  Each
impl's rows come from the first file that timed it.  An impl timed in more than
one file (put one in each run on purpose, e.g. fp8) is the cross-run anchor: the
summary states the spread of its later/first time ratios, so a reader can see how
far the two runs' machines and clocks agree.  Files from different device names
are refused.  Writes DIR/gemm-<device><tag>.json/.md/.png like gemm.py, with
"merged_from" ([{"date", "command", "vllm", "impls"}]) and "anchors" in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemm import device_slug, write_results  # noqa: E402


def merge(results: list[dict]) -> dict:
    devices = {r["device"] for r in results}
    if len(devices) != 1:
        raise SystemExit(f"gemm_merge: the files come from different devices {sorted(devices)}; refusing to merge")
    taken: dict[str, int] = {}
    rows, skipped, merged_from = [], [], []
    for i, res in enumerate(results):
        impls = sorted({r["impl"] for r in res["rows"]})
        merged_from.append({"date": res["date"], "command": res["command"], "vllm": res.get("vllm"),
                            "torch": res.get("torch"), "impls": impls})
        for impl in impls:
            taken.setdefault(impl, i)
        rows += [r for r in res["rows"] if taken[r["impl"]] == i]
        skipped += res.get("skipped", [])
    skipped = [s for s in skipped if s["impl"] not in taken]  # an impl some run did time
    anchors = {}
    for impl, src in taken.items():
        ref = {(r["M"], r["N"], r["K"]): r["us"] for r in results[src]["rows"] if r["impl"] == impl}
        for j, res in enumerate(results):
            if j == src:
                continue
            ratios = [r["us"] / ref[(r["M"], r["N"], r["K"])] for r in res["rows"]
                      if r["impl"] == impl and (r["M"], r["N"], r["K"]) in ref]
            if ratios:
                ratios.sort()
                anchors[f"{impl} file{j}/file{src}"] = {
                    "n": len(ratios), "min": round(ratios[0], 4), "median": round(ratios[len(ratios) // 2], 4),
                    "max": round(ratios[-1], 4)}
    return {"device": results[0]["device"], "date": max(r["date"] for r in results), "torch": results[0]["torch"],
            "vllm": next((r["vllm"] for r in results if r.get("vllm")), None),
            "command": " + ".join(m["command"] for m in merged_from), "rows": rows,
            "quant_rows": [q for r in results for q in r.get("quant_rows", [])],
            "skipped": skipped, "merged_from": merged_from, "anchors": anchors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="-merged")
    args = ap.parse_args(argv)
    results = []
    for f in args.files:
        try:
            results.append(json.load(open(f)))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"gemm_merge: cannot read {f}: {e}") from None
    res = merge(results)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gemm-{device_slug(res['device'])}{args.tag}")
    head = ["**Merged from separate runs** (each impl's rows from the first run that timed it):", ""]
    for i, m in enumerate(res["merged_from"]):
        head.append(f"- file{i}: {m['date']}, torch {m['torch']}, vLLM {m['vllm']}, impls "
                    f"{', '.join(m['impls'])}; `{m['command']}`")
    for name, a in res["anchors"].items():
        head.append(f"- cross-run anchor {name}: time ratio min {a['min']:.3f}, median {a['median']:.3f}, "
                    f"max {a['max']:.3f} over {a['n']} rows")
    head.append("")
    write_results(res, stem, "\n".join(head) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
