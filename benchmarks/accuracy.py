"""Accuracy table: GPTQ-style perplexity of SmolLM2-135M under RTN and QoQ, per runtime.

    python benchmarks/accuracy.py [--runtimes vllm reference] [--windows 8] [--seqlen 2048]
        [--dataset wikitext2] [--configs fp16 rtn-chn qoq-chn ...] [--device cpu|cuda]
        [--calib-samples 128 --calib-seqlen 1024 --clip-steps 80] [--kv-bits 4 16]
        [--out benchmarks/results/accuracy.json]

Configs (each converted once and cached under .cache/accuracy/):
  fp16          the unquantized model
  rtn-chn       RTN W4A8 per-channel              (converters.quantize --recipe rtn)
  rtn-g128      RTN W4A8 progressive g128
  qoq-chn       QoQ W4A8 per-channel              (converters.recipe, the full recipe)
  qoq-g128      QoQ W4A8 g128
  qoq-*-nosa    ... without SmoothAttention
  qoq-*-search  ... SmoothAttention α searched per KV head (--smooth-attention-search)
  qoq-*-rotv    ... + a per-head Hadamard on v_proj/o_proj (--rotate-v-heads)
  qoq-*[-...]-v4o  ... with o_proj smoothing scored with V KV4-quantized
                (--kv4-aware-smoothing; not the default: it measured worse)
  qoq-*[-...]-fprop  ... each layer calibrated on float activations and KV
                (--float-propagation; the recipe before 2026-11-22)
Default --configs: fp16 rtn-chn rtn-g128 qoq-chn qoq-g128 qoq-chn-nosa qoq-g128-nosa.
Each quantized config is measured with KV16 and, with --kv-bits 4, KV4 (the same
weights; only config.json's kv_cache_bits differs).  Runtimes:
  vllm       vLLM with the vllm_qoq plugin (CUDA kernels on a GPU; the plugin's
             reference ops on vLLM's CPU backend) — the runtime users get;
  reference  PyTorch fake-quant (dequantized weights + reference per-token INT8
             activations; KV cache not quantized) — the math the runtime must match.
g128 quantizes every linear of SmolLM2: K that is not a multiple of 128 (hidden
576) is stored zero-padded to one (576 -> 640; docs/format.md).  A config that
cannot be built is recorded with value null and the converter's error.  Rows are
merged into --out (replacing rows with the same model/config/metric/runtime), so
a subset of --configs / --kv-bits / --runtimes can be (re)measured at a time, and
a markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "fp16": ("fp16", None),
    "rtn-chn": ("RTN W4A8 per-channel", ["-m", "converters.quantize", "--recipe", "rtn", "--group-size", "-1"]),
    "rtn-g128": ("RTN W4A8 g128", ["-m", "converters.quantize", "--recipe", "rtn", "--group-size", "128"]),
}
# QoQ: the default recipe and its variants.  "-v4o": o_proj smoothing scored with V
# KV4-quantized (--kv4-aware-smoothing); "-fprop": each layer calibrated on float
# activations/KV (--float-propagation; the recipe before 2026-11-22).
_QOQ_VARIANTS = [
    ("", "", []),
    ("-nosa", ", no SmoothAttention", ["--no-smooth-attention"]),
    ("-search", ", α searched", ["--smooth-attention-search"]),
    ("-rotv", ", V heads rotated", ["--rotate-v-heads"]),
]
for _gname, _glabel, _gs in (("chn", "per-channel", "-1"), ("g128", "g128", "128")):
    for _suffix, _label, _flags in _QOQ_VARIANTS:
        for _v4o in (False, True):
            for _fprop in (False, True):
                CONFIGS[f"qoq-{_gname}{_suffix}" + ("-v4o" if _v4o else "") + ("-fprop" if _fprop else "")] = (
                    f"QoQ W4A8 {_glabel}{_label}" + (", KV4-aware o_proj smoothing" if _v4o else "")
                    + (", float propagation" if _fprop else ""),
                    ["-m", "converters.recipe.cli", "--group-size", _gs, *_flags]
                    + (["--kv4-aware-smoothing"] if _v4o else []) + (["--float-propagation"] if _fprop else []),
                )
MAIN_CONFIGS = ["fp16", "rtn-chn", "rtn-g128", "qoq-chn", "qoq-g128", "qoq-chn-nosa", "qoq-g128-nosa"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "vllm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def build(name: str, src: Path, cache: Path, args) -> tuple[Path | None, str | None]:
    """Converted checkpoint for config `name` (cached), or (None, reason)."""
    label, cmd = CONFIGS[name]
    if cmd is None:
        return src, None
    out = cache / f"smollm2-{name}"
    extra = []
    if "converters.recipe.cli" in cmd:
        extra = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
                 "--clip-steps", str(args.clip_steps), "--device", args.device]
    full = [sys.executable, *cmd, "--model", str(src), "--out", str(out), "--overwrite", *extra]
    # the cached checkpoint is reused only if it came from the same command and converter code
    stamp = cache / f"smollm2-{name}.stamp"
    key = json.dumps({"cmd": full[1:], "code": converter_digest()})
    if (out / "config.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        return out, None
    for old in (out, out.with_name(out.name + "-kv4"), out.with_name(out.name + "-kv8")):
        shutil.rmtree(old, ignore_errors=True)  # incl. with_kv_bits' hard-linked siblings
    print("+", " ".join(full), flush=True)
    log = cache / f"{name}.log"
    with open(log, "w") as fh:
        rc = subprocess.run(full, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-600:]
        reason = next((ln for ln in tail.splitlines() if ln.startswith("error:")), tail.splitlines()[-1])
        return None, reason
    stamp.write_text(key)
    return out, None


def converter_digest() -> str:
    """Hash of the converter and format sources: a recipe change invalidates cached checkpoints."""
    h = hashlib.sha256()
    for f in sorted([*(ROOT / "converters").rglob("*.py"), ROOT / "vllm_qoq" / "format.py"]):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def with_kv_bits(ckpt: Path, bits: int) -> Path:
    """A sibling of ckpt whose config.json says kv_cache_bits = bits (weights hard-linked)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc is None or qc.get("kv_cache_bits", 16) == bits:
        return ckpt
    out = ckpt.with_name(ckpt.name + f"-kv{bits}")
    if not out.exists():
        tmp = ckpt.with_name(ckpt.name + f"-kv{bits}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in ckpt.iterdir():
            if f.name != "config.json":
                os.link(f, tmp / f.name)
        qc["kv_cache_bits"] = bits
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        os.rename(tmp, out)
    return out


def measure_all(ckpts: list[Path], runtime: str, args) -> dict[str, dict]:
    """Perplexity of every checkpoint, one process per runtime (model -> result)."""
    res_file = ROOT / ".cache" / "accuracy" / f"last_ppl_{runtime}_{os.getpid()}.json"  # parallel runs
    cmd = [sys.executable, "-m", "converters.ppl", "--model", *map(str, ckpts), "--runtime", runtime,
           "--dataset", args.dataset, "--seqlen", str(args.seqlen), "--max-windows", str(args.windows),
           "--device", args.device, "--out", str(res_file)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    print("+", " ".join(cmd), flush=True)
    res_file.unlink(missing_ok=True)
    log = ROOT / ".cache" / "accuracy" / f"ppl_{runtime}_{os.getpid()}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    got = json.loads(res_file.read_text()) if res_file.is_file() else []
    got = got if isinstance(got, list) else [got]
    out = {r["model"]: r for r in got}
    if proc.returncode != 0:
        print(f"ppl ({runtime}) failed with rc {proc.returncode}; see {log}", flush=True)
    return out


NOTES = [
    "wikitext2 = ../shared/data/wikitext-2-raw/wiki.test.raw, a reconstructed copy without blank lines: "
    "compare these numbers with each other, not with published WikiText-2 perplexities.",
    "SmolLM2-135M has hidden size 576, not a multiple of 128: g128 stores K zero-padded to 640 for "
    "q/k/v/gate/up/o (docs/format.md); down_proj (K=1536) needs no padding.",
    "runtime cpu-reference/vllm = vLLM 0.28 CPU backend with the vllm_qoq plugin (reference W4A8 ops; "
    "KV4 rows use the plugin's KV4 attention backend, reference ops on CPU); cpu-reference/fake-quant = "
    "PyTorch with dequantized weights + reference per-token INT8 activations (KV cache unquantized).",
    "QoQ calibration on CPU: 32 x 512 tokens of the SOTU 1934-2000 text, 20 clip steps (the paper: "
    "128 x 1024, 80 steps; use those on a GPU).",
    "Configs were renamed as the default recipe changed on 2026-11-22; each row carries the label of what "
    "it measured: runs dated 2026-11-21 and the 2026-11-22 GPU runs before 00:55 used float propagation "
    "('float propagation' rows; the 00:0x run naming qoq-g128 measured qoq-g128-search-fprop, the 00:3x runs "
    "naming qoq-g128 / qoq-chn measured qoq-*-v4o-fprop), and the runs naming qoq-*-qprop measured today's "
    "default recipe (quantized propagation).",
    "runtime gpu/vllm = vLLM 0.26 on an H100 with the plugin's CUDA kernels (W4A8 GEMMs; KV4 rows use "
    "the KV4 backend: fused decode, gather + FlashAttention prefill); QoQ calibrated on the GPU with "
    "128 x 1024 tokens and 80 clip steps; 40 windows.",
]


def target_lines(rows: list[dict]) -> list[str]:
    """../shared/docs/targets.md's accuracy targets, checked on every machine's rows."""
    out = []
    for prefix in sorted({r["runtime"].split("/")[0] for r in rows}):
        for metric in sorted({r["metric"] for r in rows if r["runtime"].startswith(prefix + "/")}):
            v = {(r["config"], r["runtime"].split("/", 1)[1]): r["value"] for r in rows
                 if r["runtime"].startswith(prefix + "/") and r["metric"] == metric and r.get("value") is not None}
            got = lambda cfg, rt="vllm": v.get((cfg, rt))  # noqa: E731
            items = []
            devs = [abs(v[(c, "vllm")] / v[(c, "fake-quant")] - 1) for c, rt in v
                    if rt == "fake-quant" and (c, "vllm") in v]
            if devs:
                items.append(f"runtime vs its fake-quant reference: max {100 * max(devs):.2f}% over {len(devs)} "
                             f"configs (target ≤ 0.5%: {'met' if max(devs) <= 0.005 else 'NOT met'})")
            fp = got("fp16")
            for var, name in (("per-channel", "per-channel"), ("g128", "g128")):
                rtn, qoq = got(f"RTN W4A8 {var}, KV4"), got(f"QoQ W4A8 {var}, KV4")
                if None not in (fp, rtn, qoq) and rtn > fp:
                    closed = (rtn - qoq) / (rtn - fp)
                    items.append(f"QoQ {name} closes {100 * closed:.1f}% of the RTN-W4A8KV4 → fp16 gap "
                                 f"({rtn:.2f} → {qoq:.2f}, fp16 {fp:.2f}; target ≥ 50%: "
                                 f"{'met' if closed >= 0.5 else 'NOT met'})")
            chn, g = got("QoQ W4A8 per-channel, KV4"), got("QoQ W4A8 g128, KV4")
            if None not in (chn, g):
                items.append(f"QoQ g128 KV4 {g:.2f} vs per-channel {chn:.2f} (target g128 better: "
                             f"{'met' if g < chn else 'NOT met'})")
            sa, nosa = chn, got("QoQ W4A8 per-channel, no SmoothAttention, KV4")
            if None not in (sa, nosa):
                items.append(f"KV4 with SmoothAttention {sa:.2f} vs without {nosa:.2f} (target with < without: "
                             f"{'met' if sa < nosa else 'NOT met'})")
            for var in ("per-channel", "g128"):
                base = got(f"QoQ W4A8 {var}, KV4")
                for label in ("float propagation", "α searched, float propagation",
                              "KV4-aware o_proj smoothing, float propagation"):
                    alt = got(f"QoQ W4A8 {var}, {label}, KV4")
                    if None not in (base, alt):
                        items.append(f"variant ({var}, KV4) with {label}: {alt:.2f} vs the default recipe's "
                                     f"{base:.2f} (not a target; the variants are opt-in)")
            if items:
                out += ["", f"Against the targets ({prefix}, {metric}):", ""] + [f"- {i}" for i in items]
    return out


def write_markdown(rows: list[dict], meta: dict, path: Path, runs: list[dict] | None = None) -> None:
    """One line per (model, config, metric), one column per runtime; then every run."""
    lines = ["# Accuracy (GPTQ-style perplexity, lower is better)", "",
             "Generated by `benchmarks/accuracy.py` from the rows in accuracy.json.", ""]
    if not runs:
        for k in ("date", "device", "versions", "dataset", "calibration"):
            if k in meta:
                lines.append(f"- {k}: {meta[k]}")
    lines += [f"- {n}" for n in NOTES]
    runtimes = sorted({r["runtime"] for r in rows})
    keys = []
    for r in rows:
        k = (r["model"], r["config"], r["metric"])
        if k not in keys:
            keys.append(k)
    order = ["fp16", "RTN", "QoQ"]
    keys.sort(key=lambda k: (k[0], k[2], next((i for i, o in enumerate(order) if k[1].startswith(o)), 9),
                             "g128" in k[1], "no Smooth" in k[1], "V heads" in k[1], "KV4" in k[1]))
    lines += ["", "| model | config | metric | " + " | ".join(runtimes) + " |",
              "|---|---|---|" + "---|" * len(runtimes)]
    for k in keys:
        cells = []
        for rt in runtimes:
            r = next((r for r in rows if (r["model"], r["config"], r["metric"]) == k and r["runtime"] == rt), None)
            if r is None:
                cells.append("")
            elif r["value"] is None:
                note = r.get("note", "")
                cells.append("n/a" + (f" ({note[:60]})" if note else ""))
            else:
                cells.append(f"{r['value']:.3f}")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    lines += target_lines(rows)
    if runs:
        lines += ["", "Runs (rows come from these; a runtime column's prefix names the machine):", ""]
        for r in runs:
            note = f" — {r['note']}" if r.get("note") else ""
            lines.append(f"- {r.get('date')}, {r.get('device')}, {r.get('versions')}, calibration "
                         f"{r.get('calibration')}: `{r.get('command')}`{note}")
    path.write_text("\n".join(lines) + "\n")


def row_key(r: dict) -> tuple:
    return (r["model"], r["config"], r["metric"], r["runtime"])


def merge(out: Path, sources: list[Path]) -> None:
    """Rows of each source replace --out's rows with the same key; their runs are appended."""
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": [], "runs": []}
    for src in sources:
        try:
            other = json.loads(src.read_text())
            rows, runs = other["rows"], other.get("runs", [])
            keys = {row_key(r) for r in rows}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {src} is not an accuracy JSON from benchmarks/accuracy.py ({e}); "
                             "nothing was merged") from None
        doc["rows"] = [r for r in doc["rows"] if row_key(r) not in keys] + rows
        doc["runs"] = doc.get("runs", []) + [r for r in runs if r not in doc.get("runs", [])]
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=MAIN_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--runtimes", nargs="*", default=["vllm", "reference"], choices=["vllm", "reference"])
    p.add_argument("--kv-bits", nargs="*", type=int, default=[16], choices=[4, 8, 16])
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--clip-steps", type=int, default=20)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--markdown-only", action="store_true", help="only rewrite the markdown from --out")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="merge the rows and runs of other accuracy JSONs (e.g. GPU runs written "
                        "under the device's $OUT) into --out, then rewrite its markdown; measures nothing")
    p.add_argument("--skip-existing", action="store_true",
                   help="do not re-measure rows that --out already holds with a value")
    p.add_argument("--runtime-label", default=None,
                   help="runtime column prefix (default: cpu-reference on CPU, gpu on CUDA)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    args = p.parse_args(argv)

    from converters.models import smollm2_hf_dir

    if args.merge:
        merge(Path(args.out), [Path(f) for f in args.merge])
    if args.markdown_only or args.merge:
        doc = json.loads(Path(args.out).read_text())
        write_markdown(doc["rows"], doc["runs"][-1] if doc.get("runs") else {}, Path(args.out).with_suffix(".md"),
                       doc.get("runs"))
        return 0

    cache = ROOT / ".cache" / "accuracy"
    cache.mkdir(parents=True, exist_ok=True)
    src = smollm2_hf_dir()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": [], "runs": []}
    prefix = args.runtime_label or ("cpu-reference" if args.device == "cpu" else "gpu")
    metric = f"{args.dataset}_ppl@{args.seqlen} (first {args.windows} windows)"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{args.device}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "dataset": args.dataset,
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen,
                        "clip_steps": args.clip_steps,
                        "text": "shared/data/sotu/sotu_calib_1934_2000.jsonl"},
    }
    plan = []  # (row, checkpoint or None, runtime)
    have = {(r["model"], r["config"], r["metric"], r["runtime"]) for r in doc["rows"]
            if r.get("value") is not None}  # measured rows (--skip-existing)
    for name in args.configs:
        ckpt, reason = build(name, src, cache, args)
        label = CONFIGS[name][0]
        for kv in (args.kv_bits if name != "fp16" else [16]):
            cfg_label = label if name == "fp16" else f"{label}, KV{kv}"
            for rt in args.runtimes:
                if rt == "reference" and kv != 16:
                    continue  # the fake-quant reference does not quantize the KV cache
                row = {"model": "SmolLM2-135M", "config": cfg_label, "metric": metric, "value": None,
                       "runtime": f"{prefix}/{'vllm' if rt == 'vllm' else 'fake-quant'}"}
                if args.skip_existing and (row["model"], row["config"], row["metric"], row["runtime"]) in have:
                    continue
                if ckpt is None:
                    row["note"] = reason
                    plan.append((row, None, rt))
                else:
                    plan.append((row, with_kv_bits(ckpt, kv), rt))

    def save(rows):
        for row in rows:
            key = (row["model"], row["config"], row["metric"], row["runtime"])
            doc["rows"] = [r for r in doc["rows"] if (r["model"], r["config"], r["metric"], r["runtime"]) != key]
            doc["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")

    save([row for row, ck, _ in plan if ck is None])
    for rt in args.runtimes:  # reference first in the list order given; one process each
        todo = [(row, ck) for row, ck, r in plan if r == rt and ck is not None]
        if not todo:
            continue
        results = measure_all([ck for _, ck in todo], rt, args)
        for row, ck in todo:
            res = results.get(str(ck))
            if res is None:
                row["note"] = "measurement failed (see .cache/accuracy/ppl_*.log)"
            else:
                row.update(value=res["ppl"], tokens=res["tokens"], seconds=res["seconds"])
            print(json.dumps(row), flush=True)
        save([row for row, _ in todo])
    doc["runs"].append(meta)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc["rows"], meta, out.with_suffix(".md"), doc.get("runs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
