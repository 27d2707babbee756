"""`HelperModules`: the modules an `nn.Module` uses but does not own, held where torch does not register them.

Why: a model keeps helpers built on demand or handed over from outside (the decoded field cache, the empty-space
macrocells, LPIPS, the CLIP loss). Assigned as attributes, torch would register them as submodules: their weights
would enter every checkpoint, `parameters()` (hence optimizers and DDP's all-reduce) and `.to()`. A plain object
attribute holding them is invisible to all of that, and says so by its type, instead of writes into `__dict__`.
"""

from __future__ import annotations

from typing import Any


class HelperModules:
    """Named helpers of a module (`holder.field_cache`, ...), never part of its state_dict, parameters or buffers.

    The owner moves them between devices itself when it needs to (they do not follow `.to()`)."""

    def __init__(self, **helpers: Any):
        for name, value in helpers.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        names = ", ".join(f"{name}={type(value).__name__}" for name, value in vars(self).items())
        return f"HelperModules({names})"
