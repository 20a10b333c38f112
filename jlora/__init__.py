"""jlora: LoRA for JAX and Flax as a parameter-tree transform.

params = jlora.init(params, config, key)        # adds lora_a / lora_b beside kernels
y = jlora.apply(model, params, config, x)       # factored: base(x) + s·x·A·B
adapters, base = jlora.split(params, config)    # train `adapters` only
merged = jlora.merge(params, config)            # W + s·A·B for inference
"""

from jlora.apply import apply, intercept
from jlora.config import LoraConfig
from jlora.merge import merge, unmerge
from jlora.optim import loraplus, optimizer
from jlora.spec import KernelSpec, adapter_spec, kernel_specs
from jlora.summary import Summary, summary
from jlora.transform import init
from jlora.tree import join, labels, split, trainable_mask

__all__ = [
    "KernelSpec",
    "LoraConfig",
    "Summary",
    "adapter_spec",
    "apply",
    "init",
    "intercept",
    "join",
    "kernel_specs",
    "labels",
    "loraplus",
    "merge",
    "optimizer",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
]
__version__ = "0.1.0"
from jlora import interpret as interpret  # LoRA on any function: jlora.interpret.lora
