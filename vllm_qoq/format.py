"""THE description of vllm_qoq's on-disk format (format_version 1).

Everything that packs, unpacks, converts or checks checkpoint tensors goes
through this module, so the layout is written down exactly once.  The prose
version with examples is docs/format.md; keep the two in step.

Checkpoint = a Hugging Face model directory (config.json, tokenizer files) whose
weights are safetensors.  config.json carries ``quantization_config``:

    {"quant_method": "qoq", "format_version": 1,
     "weight_bits": 4, "group_size": -1 | 128, "act_bits": 8,
     "kv_cache_bits": 4 | 8 | 16,
     "zero_point": "post_scale",          # per-channel: szeros = z * s (fp16)
     "protective_range": 119 | 120,       # g128 only: level-1 INT8 bound P
     "k_padding": "zeros",                # g128 only: K stored padded to 128
     "modules_to_not_convert": ["lm_head", ...],
     "recipe": {...}}                     # what the converter applied (info)

Per quantized linear ``<prefix>`` with weight W [N, K] (N = output channels):

``<prefix>.qweight``   uint8 [N, K/2]
    4-bit codes u in [0, 15] in natural channel order, packed along K:
    byte [n, j] = u[n, 2j] | (u[n, 2j+1] << 4)   (even k in the low nibble).
    Column-parallel slicing along N and row-parallel slicing along K (by an
    even number of channels) are plain tensor slices, so vLLM can shard and
    merge (q/k/v, gate/up) these without knowing about the packing.

per-channel (group_size == -1):
``<prefix>.scales``  fp16 [N]    s[n]
``<prefix>.szeros``  fp16 [N]    post-scale zero: W_hat[n, k] = s[n] * u[n, k] - szeros[n]

progressive g128 (group_size == 128), QServe's two-level scheme, stored with
K zero-padded to Kp = ceil(K/128)*128 (Kp = K when K % 128 == 0):
``<prefix>.qweight``   uint8 [N, Kp/2]    (the codes of the padded weight)
``<prefix>.s1_scales`` fp16  [N]          level-1 per-channel scale s1[n]
``<prefix>.s2_scales`` uint8 [N, Kp/128]  level-2 integer scale, 1..16
``<prefix>.s2_zeros``  uint8 [N, Kp/128]  level-2 integer zero z, 0..15
    q8[n, k] = s2[n, g] * (u[n, k] - z[n, g]) in [-128, 127], g = k // 128
    W_hat[n, k] = s1[n] * q8[n, k]
    The padding columns K..Kp-1 are weight 0, stored as the code u = z of their
    group (q8 = 0 exactly); the layer is W_hat[:, :K].  The runtime pads the
    activations with zeros to Kp, so the product is exactly the unpadded one.
    quantization_config says "k_padding": "zeros" (written for every g128
    checkpoint; a reader refuses other values, and refuses a g128 layer with
    K % 128 != 0 in a checkpoint that does not say it).

Optional ``<prefix>.bias`` stays in the activation dtype.  Every other tensor
(embeddings, norms, lm_head, anything in modules_to_not_convert) is stored as in
the unquantized model.  Kernel-specific reordering never reaches the disk; it
happens in the linear method's process_weights_after_loading.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1
QUANT_METHOD = "qoq"
GROUP_SIZE_G128 = 128
SUPPORTED_GROUP_SIZES = (-1, GROUP_SIZE_G128)
SUPPORTED_KV_BITS = (4, 8, 16)
# The level-1 INT8 bound of progressive quantization (qoq.md §1): 119 keeps
# every group inside INT8 with the pre-scale zero (the paper), 120 with the
# post-scale zero (newer deepcompressor).  Our format stores integer zeros.
DEFAULT_PROTECTIVE_RANGE = 119
# g128 stores K zero-padded to a multiple of 128; quantization_config["k_padding"]
# names that convention ("zeros"), the only one this version writes and reads.
K_PADDING = "zeros"

# Names of the per-layer tensors, by variant (the weight first).
CHANNEL_TENSORS = ("qweight", "scales", "szeros")
G128_TENSORS = ("qweight", "s1_scales", "s2_scales", "s2_zeros")


def tensor_names(group_size: int) -> tuple[str, ...]:
    """The tensor suffixes one quantized linear holds for this variant."""
    if group_size == -1:
        return CHANNEL_TENSORS
    if group_size == GROUP_SIZE_G128:
        return G128_TENSORS
    raise ValueError(f"unsupported group_size {group_size}; use -1 or 128")


def module_matches(prefix: str, names: list[str]) -> bool:
    """True when `prefix` equals one of `names` or ends with "." + one of them."""
    return any(prefix == n or prefix.endswith("." + n) for n in names)


def padded_k(k: int, group_size: int) -> int:
    """The stored input size: K rounded up to a multiple of 128 for g128, K for per-channel."""
    if group_size == GROUP_SIZE_G128:
        return -(-k // GROUP_SIZE_G128) * GROUP_SIZE_G128
    return k


def pad_k(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """t [..., K] with zero columns appended up to padded_k(K) (t itself when none are needed)."""
    k = t.shape[-1]
    kp = padded_k(k, group_size)
    if kp == k:
        return t
    return torch.nn.functional.pad(t, (0, kp - k))


def check_k(k: int, group_size: int, where: str = "") -> None:
    """Raise a clear error (naming `where`) when an input size K cannot use the variant.

    Per-channel needs an even K (two codes per byte); g128 takes any K >= 1
    (stored zero-padded to a multiple of 128).
    """
    at = f"{where}: " if where else ""
    if group_size == -1:
        if k % 2:
            raise ValueError(
                f"{at}input size K={k} is odd: 4-bit codes are packed two per byte; "
                "use --group-size 128 or leave this layer unquantized (modules_to_not_convert)"
            )
    elif group_size == GROUP_SIZE_G128:
        if k < 1:
            raise ValueError(f"{at}input size K={k} must be positive")
    else:
        raise ValueError(f"{at}unsupported group_size {group_size}; use -1 or 128")


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Pack codes u (integer tensor [..., K], values 0..15, K even) into uint8 [..., K/2]."""
    if u.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({u.shape[-1]})")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("4-bit codes must lie in 0..15")
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K/2] -> uint8 codes [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit weights must be uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize_weight(
    tensors: dict[str, torch.Tensor], group_size: int, k: int | None = None
) -> torch.Tensor:
    """W_hat in float32 from one layer's on-disk tensors (names without prefix).

    [N, K] for the layer's input size k; without k, [N, stored K] (for g128 the
    padded Kp, whose padding columns are 0).
    """
    if group_size == -1:
        u = unpack_int4(tensors["qweight"]).to(torch.float32)
        s = tensors["scales"].to(torch.float32).reshape(-1, 1)
        sz = tensors["szeros"].to(torch.float32).reshape(-1, 1)
        w = s * u - sz
    else:
        q8 = int8_weight_g128(tensors["qweight"], tensors["s2_scales"], tensors["s2_zeros"])
        w = tensors["s1_scales"].to(torch.float32).reshape(-1, 1) * q8.to(torch.float32)
    if k is None:
        return w
    if padded_k(k, group_size) != w.shape[1]:
        raise ValueError(
            f"a layer with input size K={k} stores {padded_k(k, group_size)} codes per row "
            f"for group_size {group_size}, these tensors hold {w.shape[1]}"
        )
    return w[:, :k]


def int8_weight_g128(
    qweight: torch.Tensor, s2_scales: torch.Tensor, s2_zeros: torch.Tensor
) -> torch.Tensor:
    """q8 = s2 * (u - z) as int8 [N, K] (exact; the format guarantees the range)."""
    u = unpack_int4(qweight).to(torch.int16)
    n, k = u.shape
    g = k // GROUP_SIZE_G128
    s2 = s2_scales.to(torch.int16).reshape(n, g, 1)
    z = s2_zeros.to(torch.int16).reshape(n, g, 1)
    q8 = (s2 * (u.reshape(n, g, GROUP_SIZE_G128) - z)).reshape(n, k)
    return q8.to(torch.int8)


def validate_layer(
    tensors: dict[str, torch.Tensor],
    group_size: int,
    where: str,
    k: int | None = None,
    check_padding: bool = True,
) -> None:
    """Check one layer's tensors against the format; raise naming `where` and the problem.

    k: the layer's input size when known (the model's K); then the stored shapes
    must be those of K (padded for g128) and, with check_padding, g128 padding
    columns must hold the zero code u = z (not for dummy weights).
    """
    names = tensor_names(group_size)
    missing = [t for t in names if t not in tensors]
    if missing:
        raise ValueError(
            f"{where}: missing tensor(s) {', '.join(missing)} for group_size {group_size}; "
            "the checkpoint is incomplete or was written for the other group size — "
            "re-run the converter"
        )
    qw = tensors["qweight"]
    if qw.dtype != torch.uint8 or qw.dim() != 2:
        raise ValueError(f"{where}.qweight must be uint8 [N, K/2], got {qw.dtype} {tuple(qw.shape)}")
    n, ks = qw.shape[0], qw.shape[1] * 2
    if k is not None:
        kp = padded_k(k, group_size)
        if ks != kp:
            padded = f" (K={k} padded to a multiple of 128)" if kp != k else ""
            raise ValueError(
                f"{where}.qweight: expected uint8 [{n}, {kp // 2}] for input size K={k}{padded}, "
                f"got {tuple(qw.shape)}; the checkpoint does not belong to this model or was "
                "written by another vllm_qoq — re-run the converter"
            )
    if group_size == GROUP_SIZE_G128 and ks % GROUP_SIZE_G128:
        raise ValueError(
            f"{where}.qweight holds K={ks} codes per row, not a multiple of 128: g128 layers are "
            "stored with K zero-padded to a multiple of 128 (docs/format.md); re-run the converter"
        )
    check_k(ks, group_size, where)
    if group_size == -1:
        expect = {"scales": ((n,), torch.float16), "szeros": ((n,), torch.float16)}
    else:
        g = ks // GROUP_SIZE_G128
        expect = {
            "s1_scales": ((n,), torch.float16),
            "s2_scales": ((n, g), torch.uint8),
            "s2_zeros": ((n, g), torch.uint8),
        }
    for name, (shape, dtype) in expect.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"{where}.{name}: expected {dtype} {shape} for a [N={n}, K={ks}] layer, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if group_size == GROUP_SIZE_G128 and k is not None and k < ks and check_padding:
        # only the last group holds padding: unpack just its 64 bytes per row
        last = unpack_int4(qw[:, (ks - GROUP_SIZE_G128) // 2 :])[:, k - (ks - GROUP_SIZE_G128) :]
        z = tensors["s2_zeros"][:, -1:]
        if not bool((last == z).all()):
            raise ValueError(
                f"{where}.qweight: the padding columns {k}..{ks - 1} must hold the zero code "
                "u = s2_zeros of the last group (weight 0); re-run the converter"
            )
