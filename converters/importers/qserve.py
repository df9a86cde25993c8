"""Import a QServe model-zoo checkpoint ("...-QServe", "...-QServe-g128") into our format.

    python -m converters.importers.qserve --model QSERVE_DIR --out OUT
        [--group-size -1|128]  (default: inferred from the tensors)
        [--kv-bits 4|8|16]     (default 4: QServe serves these with a 4-bit KV cache)
        [--weights FILE]       (default: QSERVE_DIR/pytorch_model.bin or *.safetensors)
        [--overwrite]

QServe's layout (qoq.md §6, vllm_qoq/qserve_layout.py): qweight in the kernel's
fragment order, s1_scales [N] (+ s1_szeros [N] per-channel), g128 s2_scales /
s2_zeros int8 [K/128, N] with columns permuted in blocks of 32 and zeros stored
as (-z*s2) mod 256.  Its config.json is the base model's, so the group size is
not recorded there: it is taken from --group-size or inferred (s2_* present ->
128, s1_szeros -> -1).

There is no float weight to compare with, so the import is verified by
reconstruction invariants that a wrong layout breaks:
  * g128: every level-2 zero is a multiple of its scale, z <= 15, s2 in 1..16,
    q8 = s2*(u - z) inside INT8, and the level-1 values reach the protective
    range in (almost) every output channel: a level-1 scale s1 = max|W|/P
    makes max_k |q8[n, k]| ≈ P.  Pairing codes with the scales of another
    column (the 2025 deepcompressor s2 column order, for one) breaks the last
    check and the import is refused with a message.
  * per-channel: scales positive and finite, codes spanning the 4-bit range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vllm_qoq import format as fmt
from vllm_qoq import qserve_layout

from .. import io
from .common import ImportError_, linear_prefixes, load_state_dict, norms_are_ones, write_ours

QSERVE_SUFFIXES = ("qweight", "s1_scales", "s1_szeros", "s2_scales", "s2_zeros")
PEAK_MIN = 96  # a row's max |q8| must reach this (P = 119/120, minus slack for s2/2 and GPTQ)
PEAK_ROWS = 0.9  # ... in at least this fraction of the rows


def infer_group_size(sd: dict, prefixes: list[str]) -> int:
    has_s2 = [f"{p}.s2_scales" in sd for p in prefixes]
    has_sz = [f"{p}.s1_szeros" in sd for p in prefixes]
    if all(has_s2):
        return fmt.GROUP_SIZE_G128
    if all(has_sz) and not any(has_s2):
        return -1
    raise ImportError_(
        "cannot infer the group size: the layers do not consistently hold s2_scales (g128) "
        "or s1_szeros (per-channel); pass --group-size"
    )


def check_g128_layer(ours: dict[str, torch.Tensor], where: str) -> dict:
    """Invariants of a correctly imported g128 layer; raises ImportError_ if broken."""
    u = fmt.unpack_int4(ours["qweight"]).to(torch.int32)
    n, k = u.shape
    s2 = ours["s2_scales"].to(torch.int32).repeat_interleave(fmt.GROUP_SIZE_G128, dim=1)
    z = ours["s2_zeros"].to(torch.int32).repeat_interleave(fmt.GROUP_SIZE_G128, dim=1)
    q8 = s2 * (u - z)
    lo, hi = int(q8.min()), int(q8.max())
    peak = q8.abs().amax(dim=1)
    frac = float((peak >= PEAK_MIN).float().mean())
    if lo < -128 or hi > 127:
        raise ImportError_(
            f"{where}: reconstructed level-1 values leave INT8 ([{lo}, {hi}]): the codes and the "
            "level-2 scales/zeros do not belong together (wrong s2 column order or not a QServe "
            "g128 checkpoint); refusing to import"
        )
    if frac < PEAK_ROWS:
        raise ImportError_(
            f"{where}: only {frac:.0%} of the output channels reach the protective range "
            f"(max|q8| >= {PEAK_MIN}; median {int(peak.median())}): the level-2 scales are "
            "paired with the wrong channels — e.g. a checkpoint exported with the 2025 "
            "deepcompressor s2 column order, which QServe's kernels do not use either; "
            "re-export it in QServe's layout or convert the float model with "
            "`python -m converters.quantize --recipe qoq`"
        )
    return {"q8_min": lo, "q8_max": hi, "rows_at_range": frac}


def check_channel_layer(ours: dict[str, torch.Tensor], where: str) -> dict:
    s = ours["scales"].float()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ImportError_(f"{where}: s1_scales must be positive and finite")
    if not bool(torch.isfinite(ours["szeros"].float()).all()):
        raise ImportError_(f"{where}: s1_szeros must be finite")
    u = fmt.unpack_int4(ours["qweight"])
    span = (u.amax(dim=1).int() - u.amin(dim=1).int()).float()
    frac = float((span >= 12).float().mean())
    if frac < PEAK_ROWS:
        raise ImportError_(
            f"{where}: only {frac:.0%} of the rows use the 4-bit range: not QServe per-channel "
            "codes (or a different packing); refusing to import"
        )
    return {"rows_full_span": frac}


def import_qserve(
    model_dir,
    out_dir,
    group_size: int | None = None,
    kv_bits: int = 4,
    weights=None,
    overwrite: bool = False,
) -> Path:
    src = Path(model_dir)
    config = io.read_config(src)
    archs = config.get("architectures") or [None]
    if archs[0] not in io.SUPPORTED_ARCHITECTURES:
        raise ImportError_(f"{src / 'config.json'}: architecture {archs[0]!r} is not supported")
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") not in (None, "qoq"):
        raise ImportError_(f"{src}: quant_method {qc.get('quant_method')!r} is not a QServe checkpoint")
    if "format_version" in qc:
        raise ImportError_(f"{src}: already in vllm_qoq's format; nothing to import")
    io.check_output(out_dir, src, overwrite)
    sd = load_state_dict(Path(weights) if weights else src)
    prefixes = linear_prefixes(n for n in sd if n.endswith(".qweight"))
    if not prefixes:
        raise ImportError_(f"{src}: no '*.qweight' tensors: not a QServe checkpoint")
    inferred = infer_group_size(sd, prefixes)
    if group_size is None:
        group_size = qc.get("group_size", inferred)
    if group_size != inferred:
        raise ImportError_(
            f"{src}: --group-size {group_size} contradicts the tensors, which are "
            f"{'g128' if inferred == 128 else 'per-channel'}"
        )
    quantized, checks = {}, {}
    for p in prefixes:
        t = {s: sd[f"{p}.{s}"] for s in QSERVE_SUFFIXES if f"{p}.{s}" in sd}
        k = 2 * t["qweight"].shape[-1] if "qweight" in t else 0
        if group_size == fmt.GROUP_SIZE_G128 and k % fmt.GROUP_SIZE_G128:
            raise ImportError_(
                f"{p}: K={k} is not a multiple of 128, which QServe's g128 layout (s2 tensors "
                "[K/128, N]) cannot hold: not a QServe g128 checkpoint; quantize the float model "
                "with `python -m converters.quantize --group-size 128` instead"
            )
        try:
            ours = qserve_layout.to_ours(t, group_size, p)
        except (KeyError, ValueError) as e:
            raise ImportError_(f"{p}: {e}") from None
        fmt.validate_layer(ours, group_size, p)
        checks[p] = check_g128_layer(ours, p) if group_size == 128 else check_channel_layer(ours, p)
        quantized[p] = ours
    used = {f"{p}.{s}" for p in prefixes for s in QSERVE_SUFFIXES}
    floats = {n: t for n, t in sd.items() if n not in used}
    recipe = {
        "name": "qserve-import",
        "rotation": norms_are_ones(sd),  # QServe checkpoints are rotated: all-ones norms
        "source_layout": "qserve",
    }
    return write_ours(out_dir, src, config, quantized, floats, group_size, kv_bits, recipe,
                      overwrite, report={"group_size": group_size, "layers": checks})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.importers.qserve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="QServe checkpoint directory (config.json + pytorch_model.bin)")
    p.add_argument("--out", required=True)
    p.add_argument("--group-size", type=int, choices=fmt.SUPPORTED_GROUP_SIZES, default=None)
    p.add_argument("--kv-bits", type=int, choices=fmt.SUPPORTED_KV_BITS, default=4)
    p.add_argument("--weights", default=None, help="weights file if not in --model")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    return io.run_cli(
        lambda: import_qserve(a.model, a.out, a.group_size, a.kv_bits, a.weights, a.overwrite)
    )


if __name__ == "__main__":
    sys.exit(main())
