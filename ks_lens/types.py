"""Type names shared across ks-lens.

``Model`` is the model every ks-lens function takes: a TransformerLens ``TransformerBridge`` (as
returned by :func:`ks_lens.load_model`). Importing TransformerLens is slow, so the real class is
used only by type checkers; at run time ``Model`` is ``Any`` (annotations are not evaluated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge as Model
else:
    Model = Any

__all__ = ["Model"]
