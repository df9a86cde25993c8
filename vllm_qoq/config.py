"""The `qoq` QuantizationConfig: parsing, validation, and layer dispatch.

Two config.json schemas are accepted (docs/format.md):
  * ours (format_version present): everything the checkpoint needs, tensors in
    the natural layout of vllm_qoq/format.py;
  * SGLang's ``{"quant_method": "qoq", "wbits": 4, "group_size": -1|128}``,
    used by QServe model-zoo checkpoints: tensors in QServe's kernel layout
    (vllm_qoq/qserve_layout.py), converted to ours at load time.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import format as fmt
from .compat import (
    LinearBase,
    QuantizationConfig,
    UnquantizedLinearMethod,
    attention_layer_class,
    is_layer_skipped,
    register_quantization_config,
)

logger = logging.getLogger(__name__)

_OURS = {
    "quant_method",
    "format_version",
    "weight_bits",
    "group_size",
    "act_bits",
    "kv_cache_bits",
    "zero_point",
    "protective_range",
    "k_padding",
    "modules_to_not_convert",
    "recipe",
}
_SGLANG = {"quant_method", "wbits", "group_size", "modules_to_not_convert"}
_WHERE = "config.json quantization_config"


def _fail(msg: str) -> None:
    raise ValueError(f"qoq: {_WHERE}: {msg}")


@register_quantization_config(fmt.QUANT_METHOD)
class QoQConfig(QuantizationConfig):
    """QoQ W4A8 (per-channel or progressive g128) with an optional KV4/KV8 cache."""

    def __init__(
        self,
        group_size: int = -1,
        kv_cache_bits: int = 16,
        modules_to_not_convert: list[str] | None = None,
        layout: str = "qoq",
        protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
        recipe: dict | None = None,
        k_padding: str | None = fmt.K_PADDING,
    ) -> None:
        super().__init__()
        if group_size not in fmt.SUPPORTED_GROUP_SIZES:
            _fail(f"group_size {group_size} is not supported; use -1 (per-channel) or 128")
        if kv_cache_bits not in fmt.SUPPORTED_KV_BITS:
            _fail(f"kv_cache_bits {kv_cache_bits} is not supported; use 4, 8 or 16")
        self.group_size = group_size
        self.kv_cache_bits = kv_cache_bits
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.layout = layout
        self.protective_range = protective_range
        self.recipe = dict(recipe or {})
        # "zeros": g128 layers with K % 128 != 0 are stored zero-padded (format.py);
        # None: the checkpoint does not say so (older files; QServe layout).
        self.k_padding = k_padding

    def __repr__(self) -> str:
        return (
            f"QoQConfig(group_size={self.group_size}, kv_cache_bits={self.kv_cache_bits}, "
            f"layout={self.layout}, k_padding={self.k_padding}, modules_to_not_convert={self.modules_to_not_convert})"
        )

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # mma.sync int8 m16n8k32 / cp.async: Ampere and newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QoQConfig":
        if not isinstance(config, dict):
            _fail(f"expected a JSON object, got {type(config).__name__}")
        method = str(config.get("quant_method", "")).lower()
        if method != fmt.QUANT_METHOD:
            _fail(f"quant_method is {config.get('quant_method')!r}, expected 'qoq'")
        if "format_version" in config:
            return cls._from_ours(config)
        if "wbits" in config:
            return cls._from_sglang(config)
        _fail(
            "neither 'format_version' (vllm_qoq format) nor 'wbits' (SGLang/QServe schema) "
            "is present; convert the model with `python -m converters.quantize` or add the "
            "fields described in docs/format.md"
        )

    @classmethod
    def _from_ours(cls, config: dict[str, Any]) -> "QoQConfig":
        unknown = sorted(set(config) - _OURS)
        if unknown:
            _fail(
                f"unknown field(s) {unknown}; known fields are {sorted(_OURS)}. "
                "The checkpoint may come from a newer vllm_qoq: upgrade vllm_qoq"
            )
        version = config["format_version"]
        if version != fmt.FORMAT_VERSION:
            _fail(
                f"format_version {version} is not supported by this vllm_qoq "
                f"(supports {fmt.FORMAT_VERSION}); upgrade vllm_qoq or re-convert the model"
            )
        expect = {"weight_bits": 4, "act_bits": 8, "zero_point": "post_scale"}
        for key, want in expect.items():
            if config.get(key, want) != want:
                _fail(f"{key}={config[key]!r} is not supported (only {want!r})")
        gs = config.get("group_size", -1)
        pr = config.get("protective_range", fmt.DEFAULT_PROTECTIVE_RANGE)
        if not isinstance(pr, int) or not 1 <= pr <= 127:
            _fail(f"protective_range {pr!r} must be an integer in 1..127")
        k_padding = config.get("k_padding")
        if k_padding not in (None, fmt.K_PADDING):
            _fail(
                f"k_padding {k_padding!r} is not understood by this vllm_qoq (it reads "
                f"{fmt.K_PADDING!r}: g128 K zero-padded to a multiple of 128); upgrade vllm_qoq "
                "or re-convert the model"
            )
        return cls(
            group_size=gs,
            kv_cache_bits=config.get("kv_cache_bits", 16),
            modules_to_not_convert=cls._module_list(config),
            layout="qoq",
            protective_range=pr,
            recipe=config.get("recipe"),
            k_padding=k_padding,
        )

    @classmethod
    def _from_sglang(cls, config: dict[str, Any]) -> "QoQConfig":
        unknown = sorted(set(config) - _SGLANG)
        if unknown:
            _fail(f"unknown field(s) {unknown} for the SGLang/QServe schema {sorted(_SGLANG)}")
        if config["wbits"] != 4:
            _fail(f"wbits={config['wbits']!r} is not supported (only 4)")
        # QServe checkpoints are served with a 4-bit KV cache by QServe.
        return cls(
            group_size=config.get("group_size", -1),
            kv_cache_bits=4,
            modules_to_not_convert=cls._module_list(config),
            layout="qserve",
            protective_range=fmt.DEFAULT_PROTECTIVE_RANGE,
            k_padding=None,
        )

    @staticmethod
    def _module_list(config: dict[str, Any]) -> list[str]:
        mods = config.get("modules_to_not_convert") or []
        if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
            _fail(f"modules_to_not_convert must be a list of module names, got {mods!r}")
        return mods

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        # Tried before every built-in method for every model: claim only our own.
        if not isinstance(hf_quant_cfg, dict):
            return None
        if str(hf_quant_cfg.get("quant_method", "")).lower() != fmt.QUANT_METHOD:
            return None
        if user_quant not in (None, fmt.QUANT_METHOD):
            return None  # vLLM then reports the mismatch with the user's choice
        return fmt.QUANT_METHOD

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.modules_to_not_convert:
            self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(
                self.modules_to_not_convert
            )

    def is_skipped(self, prefix: str) -> bool:
        return is_layer_skipped(prefix, self.modules_to_not_convert, self.packed_modules_mapping)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if self.is_skipped(prefix):
                return UnquantizedLinearMethod()
            from .linear import QoQLinearMethod

            return QoQLinearMethod(self, prefix)
        if isinstance(layer, attention_layer_class()):
            from .attention import get_attention_quant_method

            return get_attention_quant_method(self, layer, prefix)  # KV4 guard; None
        return None
