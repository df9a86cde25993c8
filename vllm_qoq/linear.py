"""QoQLinearMethod: W4A8 linear layers on vLLM's weight-loader-v2 parameters.

Parameters are declared in the on-disk layout (vllm_qoq/format.py) with typed
vLLM parameter classes, so tensor-parallel slicing and merged q/k/v and
gate/up loading are vLLM's own:
  qweight   PackedvLLMParameter   [N, K/2] uint8, packed along K (input_dim=1)
  scales/szeros/s1_scales         ChannelQuantScaleParameter [N] (replicated in
                                  row-parallel layers, sliced in column-parallel)
  s2_scales/s2_zeros              GroupQuantScaleParameter [N, K/128]
g128 layers whose K is not a multiple of 128 are stored with K zero-padded to
Kp = ceil(K/128)*128 (format.py): the parameters get the padded shapes and
apply() pads the activations with zeros to Kp (exactly the unpadded product).
Only unsplit K can be padded: a row-parallel layer split over tensor-parallel
ranks needs a per-rank K that is a multiple of 128.
QServe-layout checkpoints (SGLang schema) declare QServe's names and shapes and
are converted to ours in process_weights_after_loading, which then hands the
tensors to ops.prepare_weights for any kernel-specific reordering.

apply(): per-token INT8 quantization of x, then the W4A8 GEMM (torch ops in the
`qoq` namespace, vllm_qoq/ops.py).
"""

from __future__ import annotations

import logging

import torch

from . import format as fmt
from . import ops
from .compat import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    LinearMethodBase,
    PackedvLLMParameter,
    is_dummy_load,
    register_weight_loader_v2,
)

logger = logging.getLogger(__name__)
_warned_no_kernels = False


def _warn_reference_on_gpu() -> None:
    global _warned_no_kernels
    if not _warned_no_kernels:
        _warned_no_kernels = True
        logger.warning(
            "vllm_qoq: the CUDA extension vllm_qoq._C is not available (%s); qoq layers run "
            "the PyTorch reference ops on the GPU, which is correct but slow. Reinstall "
            "vllm_qoq with a CUDA build of torch and nvcc to get the kernels.",
            ops.extension_error(),
        )


def _tracking_loader(loader):
    """Wrap a weight-loader-v2 callable to record the shard ids a parameter received."""

    def load(param, loaded_weight, *args, **kwargs):
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        if not hasattr(param, "qoq_loaded_shards"):
            param.qoq_loaded_shards = set()
        param.qoq_loaded_shards.add(shard)
        return loader(param, loaded_weight, *args, **kwargs)

    return load


@register_weight_loader_v2
class QoQLinearMethod(LinearMethodBase):
    def __init__(self, quant_config, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.prefix = prefix

    # -- parameters ------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        where = self.prefix or type(layer).__name__
        if params_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"qoq: {where}: activation dtype {params_dtype} is not supported; "
                "run the model with --dtype bfloat16 (or float16)"
            )
        gs = self.quant_config.group_size
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        self._check_k(k, input_size, gs, where)
        kp = fmt.padded_k(k, gs)
        loader = extra_weight_attrs.get("weight_loader")
        # Track which shards each parameter received, so that a checkpoint missing
        # a tensor is refused by name (vLLM does not check quantized layers).
        layer.qoq_dummy_load = is_dummy_load()  # random/uninitialised tensors: no content checks
        layer.qoq_check_loaded = loader is not None and not layer.qoq_dummy_load
        layer.qoq_num_shards = len(output_partition_sizes)
        if loader is not None:
            loader = _tracking_loader(loader)
        layer.qoq_group_size = gs
        layer.qoq_out_features = n
        layer.qoq_in_features = k
        layer.qoq_k_pad = kp - k  # zero columns apply() appends to the activations

        if self.quant_config.layout == "qserve":
            self._create_qserve(layer, n, k, input_size, gs, loader, where)
            return

        layer.register_parameter("qweight", self._packed(n, kp, torch.uint8, loader))
        if gs == -1:
            for name in ("scales", "szeros"):
                layer.register_parameter(name, self._channel(n, loader))
        else:
            layer.register_parameter("s1_scales", self._channel(n, loader))
            for name in ("s2_scales", "s2_zeros"):
                layer.register_parameter(
                    name,
                    GroupQuantScaleParameter(
                        data=torch.empty(n, kp // fmt.GROUP_SIZE_G128, dtype=torch.uint8),
                        input_dim=1,
                        output_dim=0,
                        weight_loader=loader,
                    ),
                )

    def _check_k(self, k: int, input_size: int, gs: int, where: str) -> None:
        """Refuse (naming the layer and the fix) a per-rank K this checkpoint cannot serve."""
        if gs == -1:
            fmt.check_k(k, gs, f"qoq: {where}, per tensor-parallel rank")
            return
        if k % fmt.GROUP_SIZE_G128 == 0:
            return
        if k != input_size:
            raise ValueError(
                f"qoq: {where}: row-parallel layer with K={input_size} split over tensor-parallel "
                f"ranks into K={k} per rank, not a multiple of 128: a g128 checkpoint can only be "
                "split along K in multiples of 128 (K is padded to 128 as a whole, not per rank); "
                "serve it with --tensor-parallel-size 1 (or one that splits K into multiples of "
                "128), or convert the model with --group-size -1 (per-channel)"
            )
        if self.quant_config.layout == "qserve":
            raise ValueError(
                f"qoq: {where}: K={k} is not a multiple of 128, which a QServe-layout g128 "
                "checkpoint cannot hold; quantize the float model with `python -m "
                "converters.quantize --group-size 128` instead"
            )
        if self.quant_config.k_padding != fmt.K_PADDING:
            raise ValueError(
                f"qoq: {where}: K={k} is not a multiple of 128 and the checkpoint's "
                f"quantization_config does not say \"k_padding\": \"{fmt.K_PADDING}\", so its g128 "
                "tensors cannot be read as the zero-padded layout this vllm_qoq serves; re-convert "
                "the model with this vllm_qoq (`python -m converters.quantize --group-size 128`)"
            )

    @staticmethod
    def _packed(n: int, k: int, dtype: torch.dtype, loader) -> PackedvLLMParameter:
        """[N, K/2] 4-bit codes packed along K (row-parallel slices the packed K)."""
        return PackedvLLMParameter(
            data=torch.empty(n, k // 2, dtype=dtype),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=2,
            weight_loader=loader,
        )

    @staticmethod
    def _channel(n: int, loader) -> ChannelQuantScaleParameter:
        return ChannelQuantScaleParameter(
            data=torch.empty(n, dtype=torch.float16), output_dim=0, weight_loader=loader
        )

    def _create_qserve(self, layer, n, k, input_size, gs, loader, where) -> None:
        if k != input_size:
            raise ValueError(
                f"qoq: {where}: a QServe-layout checkpoint cannot be split along K for "
                "tensor parallelism (its fragment order spans K); convert it first with "
                "`python -m converters.importers.qserve` to vllm_qoq's format"
            )
        if n % 32 or k % 32:
            raise ValueError(f"qoq: {where}: QServe layout needs N, K multiples of 32 (N={n}, K={k})")
        layer.register_parameter("qweight", self._packed(n, k, torch.int8, loader))
        layer.register_parameter("s1_scales", self._channel(n, loader))
        if gs == -1:
            layer.register_parameter("s1_szeros", self._channel(n, loader))
        else:
            for name in ("s2_scales", "s2_zeros"):
                layer.register_parameter(
                    name,
                    GroupQuantScaleParameter(
                        data=torch.empty(k // fmt.GROUP_SIZE_G128, n, dtype=torch.int8),
                        input_dim=0,
                        output_dim=1,
                        weight_loader=loader,
                    ),
                )

    # -- after loading -----------------------------------------------------------
    def _check_loaded(self, layer: torch.nn.Module, names, where: str) -> None:
        if not getattr(layer, "qoq_check_loaded", False):
            return
        missing = []
        for name in names:
            shards = getattr(getattr(layer, name), "qoq_loaded_shards", set())
            if None not in shards and len(shards) < layer.qoq_num_shards:
                missing.append(name)
        if missing:
            raise ValueError(
                f"qoq: {where}: tensor(s) {', '.join(where + '.' + m for m in missing)} were not "
                "found in the checkpoint (for a merged layer: in one of its q/k/v or gate/up "
                "parts); the checkpoint is incomplete or truncated — re-run the converter"
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        gs = layer.qoq_group_size
        where = self.prefix or type(layer).__name__
        names = [n for n, _ in layer.named_parameters(recurse=False) if n != "bias"]
        self._check_loaded(layer, names, where)
        if self.quant_config.layout == "qserve":
            from . import qserve_layout

            names = ("qweight", "s1_scales") + (("s1_szeros",) if gs == -1 else ("s2_scales", "s2_zeros"))
            raw = {name: getattr(layer, name).data for name in names}
            tensors = qserve_layout.to_ours(raw, gs, where)
            for name in names:
                delattr(layer, name)
        else:
            tensors = {name: getattr(layer, name).data for name in fmt.tensor_names(gs)}
        fmt.validate_layer(tensors, gs, where, k=layer.qoq_in_features,
                           check_padding=not layer.qoq_dummy_load)
        if tensors["qweight"].device.type == "cuda" and not ops.has_cuda_kernels():
            _warn_reference_on_gpu()
        tensors = ops.prepare_weights(tensors, gs)
        for name, t in tensors.items():
            if hasattr(layer, name):
                delattr(layer, name)
            layer.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
        layer.qoq_check_loaded = False  # processed: the plain parameters carry no shard record

    # -- forward -------------------------------------------------------------------
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.qoq_k_pad:  # g128 with K % 128 != 0: zero columns quantize to 0
            x2 = torch.nn.functional.pad(x2, (0, layer.qoq_k_pad))
        qx, sx, qsum = ops.quantize_per_token(x2)
        if layer.qoq_group_size == -1:
            y = ops.w4a8_chn_gemm(
                qx, sx, qsum, layer.qweight, layer.scales, layer.szeros, bias, x.dtype
            )
        else:
            y = ops.w4a8_g128_gemm(
                qx, sx, layer.qweight, layer.s1_scales, layer.s2_scales, layer.s2_zeros,
                bias, x.dtype,
            )
        return y.reshape(*shape[:-1], y.shape[-1])
