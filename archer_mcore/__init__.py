"""archer-mcore: an RLVR trainer on megatron-core (Archer, forking tokens, DAPO, GRPO)."""

from __future__ import annotations

import os
import sys
import warnings

__version__ = "0.1.0"

#: Third-party warnings known to be harmless for this project, each matched exactly by
#: category, message (a regex from the start of the message) and the warning's module.
#: Any other warning still shows. (category, message, module, why)
KNOWN_HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        UserWarning,
        r"Transformer Engine and Apex are not installed\. Falling back to ",
        r"megatron\.core\.",
        "megatron-core 0.16 without TE/Apex (every CPU run, `transformer_impl: local`) "
        "announces its torch fallbacks at import",
    ),
    (
        UserWarning,
        r"Apex is not installed\. Falling back to Torch Norm\Z",
        r"megatron\.core\.models\.",
        "the same for the norm of the local layer spec",
    ),
    (
        UserWarning,
        r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.\Z",
        r"megatron\.core\.transformer\.transformer_config\Z",
        "megatron-core 0.16's own TransformerConfig default (cuda_graph_scope='full') "
        "trips its own deprecation notice; CUDA graphs are not used",
    ),
    (
        UserWarning,
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed\. ",
        r"(megatron\.core\.optimizer\.optimizer|archer_mcore\.parallel\.cpu_compat)\Z",
        "megatron-core 0.16's distributed optimizer zero_grad probes `.grad` on its "
        "main-parameter shards, which are views (optimizer.py, _zero_grad_group_helper); "
        "on CPU the probe runs through the CPU layer's torch-function mode, so the warning "
        "names that module",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated\. "
        r"Please use `torch\.distributed\.(reduce_scatter_single|all_gather_single)` instead\.\Z",
        r"torch\.distributed\.c10d_logger\Z",
        "torch 2.13 renamed the collectives megatron-core 0.16 calls (the project calls neither)",
    ),
    (
        FutureWarning,
        r"`load_state_dict` is deprecated and will be removed in future versions\. "
        r"Please use `load` instead\.\Z",
        r"megatron\.core\.dist_checkpointing\.strategies\.torch\Z",
        "megatron-core 0.16's checkpoint loader (a resume) calls torch's old name",
    ),
    (
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor\.\Z",
        r"torch\.distributed\.checkpoint\.",
        "megatron-core 0.16's dist_checkpointing hands torch ShardedTensors on load",
    ),
    (
        FutureWarning,
        r"`past_key_values` is deprecated and will be removed in version [\d.]+ for "
        r"`Qwen[23]ForCausalLM\.forward`\. Use `cache` instead\.\Z",
        r"torch\.nn\.modules\.module\Z",
        "transformers 5.x renames the KV-cache argument of the local engine's forward; "
        "the old name still works",
    ),
)


def quiet_known_warnings() -> None:
    """Filter `KNOWN_HARMLESS_WARNINGS` and third-party progress bars, once at start-up
    (the `archer` command does; importing the package changes nothing).

    A user's own warning settings (`-W` or PYTHONWARNINGS) win: with any, no filter is
    added. transformers' progress bars (e.g. "Writing model shards" when the warm start
    saves its model) are off unless HF_HUB_DISABLE_PROGRESS_BARS is set.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if sys.warnoptions:
        return
    for category, message, module, _why in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
