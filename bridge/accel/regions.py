"""Compile a network's repeated blocks instead of the whole network ("regional" compilation).

torch.compile of a whole UNet traces its Python code from top to bottom on every start, compile
cache or not, and compiles one large graph on the first. Most of a UNet is a few kinds of block
repeated at a few sizes: the SD 2.1 UNet has 16 transformer blocks at 4 sizes and 22 residual
blocks at about 14, and TAESD repeats one block 22 times at 6 sizes. Compiling each block on its
own, Dynamo traces one block of a kind and size once and every block of the same kind and size
reuses it; what lies between the blocks (the first and last convolutions, the time embedding,
down- and upsampling, the skip connections) runs uncompiled. Inside the bridge the whole frame step
is replayed as one CUDA graph anyway, so the uncompiled glue costs no launch time, only the
fusions across block borders that the whole-network compile could make.

The network itself is left as it was: `compile_regions` returns a copy that is new only where it
must be, the compiled blocks and the modules above them. Every parameter, buffer, attention
processor and hook is the original's own object, so a live change (a LoRA scale, an IP-Adapter
picture, the feature bank's rings) reaches the copy as it reaches the original, and the copy
costs no memory for weights. Two consequences: the copied modules share their hooks and buffers
with the originals (a hook registered on the copy's root is also on the original's), and a child
swapped on an original module after the copy is made (say `unet.conv_in = ...`) does not reach the
copy. So a network's structure is final before it is accelerated, as it is in the bridge.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

# Block classes compiled on their own: diffusers' transformer and residual blocks (UNets,
# ControlNets, the full VAE) and TAESD's block.
REGION_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "AutoencoderTinyBlock")
# Each size of a block is one more compiled version of the same Python function, and Dynamo keeps
# one list of versions per function for the whole process: every UNet, ControlNet and VAE in it,
# and every shape a live change brings (a new batch size or resolution adds about 15 residual-block
# versions for an SD UNet). Past the limit a block runs uncompiled, with one warning, so the limit
# is set far above what a long run reaches; Dynamo's default, 8, is below one SD UNet's 14 sizes.
RECOMPILE_LIMIT = 512
# Dynamo's limit on all recompilations of one function together, raised with it.
ACCUMULATED_RECOMPILE_LIMIT = 4096


def compile_regions(
    model: nn.Module, classes: Collection[str] = REGION_CLASSES, **options: Any
) -> tuple[nn.Module, int]:
    """A copy of `model` whose blocks of the named classes run through torch.compile.

    `options` go to `torch.compile` for each block. Returns the copy and how many blocks it
    compiles; a model without such blocks comes back as it is, with 0.
    """
    _raise_recompile_limit()
    compiled = 0

    def visit(module: nn.Module) -> nn.Module:
        nonlocal compiled
        if type(module).__name__ in classes:
            block = copy.copy(module)
            block.compile(**options)
            compiled += 1
            return block
        changed = {}
        for name, child in module._modules.items():
            if child is None:
                continue
            replacement = visit(child)
            if replacement is not child:
                changed[name] = replacement
        if not changed:
            return module
        # A shallow copy shares the original's dictionaries, so the copy gets its own dictionary
        # of children before any child is swapped; everything else stays shared.
        parent = copy.copy(module)
        parent._modules = type(module._modules)(module._modules)
        parent._modules.update(changed)
        return parent

    return visit(model), compiled


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    # Named cache_size_limit before PyTorch 2.6.
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    name = "accumulated_recompile_limit"
    if hasattr(config, name):
        setattr(config, name, max(getattr(config, name), ACCUMULATED_RECOMPILE_LIMIT))
