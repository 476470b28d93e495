"""The trained :class:`Probe`, the probe MLP it shares with training, and :class:`ProbeSet`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from ks_lens.errors import (
    ConfigError,
    LabelError,
    MetadataMismatchError,
    MissingKeyError,
    StoreError,
)
from ks_lens.hooks import ks_hook_name, parse_hook, same_hook_point
from ks_lens.io import load_artifact, save_artifact
from ks_lens.models import check_signature, model_device
from ks_lens.probes.config import ProbeConfig, probe_config_from_meta
from ks_lens.types import Model


class Probe(nn.Module):
    """A trained probe for one hook point. ``probe(x)`` returns raw logits ``[..., K]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        label_names: Sequence[str],
        hook_name: str,
        model: Mapping[str, Any],
        config: ProbeConfig,
        metrics: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.linears = nn.ModuleList()
        for w, b in weights:
            lin = nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(b)
            self.linears.append(lin)
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.label_names: tuple[str, ...] = tuple(label_names)
        # recorded in the HookedTransformer-style spelling; an alias and its canonical
        # TransformerLens name are the same hook point (see ks_lens.hooks)
        self.hook_name = ks_hook_name(hook_name)
        self.layer, self.hook_kind = parse_hook(self.hook_name)
        self.model_info: dict[str, Any] = dict(model)
        self.config = config
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.source: dict[str, Any] = dict(source or {})
        self.requires_grad_(False)
        self.eval()

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... k"]:
        """Raw label logits ``[..., n_labels]`` for activations ``x`` ``[..., d_model]``."""
        if x.shape[-1] != self.d_model:
            from ks_lens.utils import check_d_model

            check_d_model(x, self.d_model, "x", f"the probe (trained at {self.hook_name})")
        h = (x - self.mean) / self.std
        # the MLP of training, on a stack of one probe (nn.Linear keeps its weight as [out, in])
        params = []
        for lin in self.linears:
            assert isinstance(lin, nn.Linear)
            params.append((lin.weight.t()[None], lin.bias[None]))
        out = _stack_forward(h.reshape(1, -1, h.shape[-1]), params)
        return out.reshape(*h.shape[:-1], out.shape[-1])

    def predict_proba(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... k"]:
        """Per-label probabilities: sigmoid for BCE probes, softmax for CE probes."""
        logits = self(x)
        return torch.softmax(logits, -1) if self.config.loss == "ce" else torch.sigmoid(logits)

    def label_indices(self, names: Sequence[str]) -> list[int]:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise LabelError(
                f"unknown label(s) {unknown}; this probe knows {list(self.label_names)}"
            )
        return [self.label_names.index(n) for n in names]

    def __repr__(self) -> str:
        acc = self.metrics.get("val_accuracy")
        acc_s = f", val_acc={acc:.3f}" if isinstance(acc, float) else ""
        return (
            f"Probe({self.config.architecture}, hook={self.hook_name!r}, "
            f"labels={list(self.label_names)}, model={self.model_info.get('model')!r}{acc_s})"
        )

    # -- compatibility -----------------------------------------------------------------------
    def check_compatible(self, model: Model | None = None, hook_name: str | None = None) -> None:
        """Raise :class:`MetadataMismatchError` unless ``model``/``hook_name`` match the probe's."""
        if model is not None:
            check_signature(self.model_info, model, "probe")
        if hook_name is not None and not same_hook_point(hook_name, self.hook_name):
            raise MetadataMismatchError(
                f"probe was trained at {self.hook_name!r}, not {hook_name!r}; a probe is only valid at "
                "the hook point it was trained on"
            )

    # -- persistence -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"mean": self.mean, "std": self.std}
        for i, lin in enumerate(self.linears):
            assert isinstance(lin, nn.Linear)
            t[f"linears.{i}.weight"] = lin.weight
            t[f"linears.{i}.bias"] = lin.bias
        return t

    def save(self, directory: str | Path) -> Path:
        meta = {
            "label_names": list(self.label_names),
            "hook_name": self.hook_name,
            "layer": self.layer,
            "model": self.model_info,
            "config": asdict(self.config),
            "metrics": self.metrics,
            "source": self.source,
            "n_linears": len(self.linears),
        }
        return save_artifact(directory, self.state_tensors(), meta, artefact="probe")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        model: Model | None = None,
        hook_name: str | None = None,
        device: torch.device | str | None = None,
    ) -> Probe:
        tensors, meta = load_artifact(directory, artefact="probe")
        try:
            weights = [
                (tensors[f"linears.{i}.weight"].T, tensors[f"linears.{i}.bias"])
                for i in range(meta["n_linears"])
            ]
            probe = cls(
                weights,
                tensors["mean"],
                tensors["std"],
                label_names=meta["label_names"],
                hook_name=meta["hook_name"],
                model=meta["model"],
                config=probe_config_from_meta(meta["config"]),
                metrics=meta.get("metrics"),
                source=meta.get("source"),
            )
        except (KeyError, TypeError) as e:
            raise StoreError(
                f"probe at {directory} is missing field {e}; it is corrupt or from another version"
            ) from e
        except ConfigError as e:
            raise StoreError(f"probe at {directory} has an invalid configuration ({e})") from e
        probe.check_compatible(model, hook_name)
        if device is not None:
            probe = probe.to(device)
        elif model is not None:
            probe = probe.to(model_device(model))
        return probe


class ProbeSet(dict[int, Probe]):
    """Probes keyed by MODEL layer index, as :func:`train_probes` / :func:`load_probes` return them.

    A plain ``dict`` (iterate, ``.items()``, ``len``) that also takes negative layers, counted
    from the model's last layer like ``acts[-1]``: ``probes[-1]`` is the probe at layer
    ``n_layers - 1``. A missing layer raises ``KeyError`` naming the layers that are there.
    """

    def _resolve(self, layer: Any) -> Any:
        if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0 and self:
            n = next(iter(self.values())).model_info.get("n_layers")
            if isinstance(n, int):
                return n + layer
        return layer

    def __getitem__(self, layer: int) -> Probe:
        key = self._resolve(layer)
        if not dict.__contains__(self, key):
            shown = f"{layer} (= layer {key})" if key != layer else f"{layer}"
            raise MissingKeyError(
                f"no probe for layer {shown}; probes exist for layers {sorted(self)}"
            )
        return dict.__getitem__(self, key)

    def __contains__(self, layer: object) -> bool:
        return dict.__contains__(self, self._resolve(layer))

    def __repr__(self) -> str:
        if not self:
            return "ProbeSet({})"
        p = next(iter(self.values()))
        return (
            f"ProbeSet(layers={sorted(self)}, kind={p.hook_kind!r}, "
            f"probe={p.config.architecture!r}, "
            f"labels={list(p.label_names)}, model={p.model_info.get('model')!r})"
        )


def _stack_forward(
    x: Float[torch.Tensor, "probe n d_in"],
    params: Sequence[tuple[Float[torch.Tensor, "probe _ _"], Float[torch.Tensor, "probe _"]]],
) -> Float[torch.Tensor, "probe n k"]:
    """The probe MLP, for ``P`` probes at once: ``Linear -> ReLU -> ... -> Linear`` on
    (standardised) ``x`` ``[P, n, d]`` -> logits ``[P, n, K]``. ``params`` holds each linear
    layer's stacked ``(weight [P, in, out], bias [P, out])``. The one implementation of the
    probe function: training runs it on the stack, :meth:`Probe.forward` on a stack of one."""
    h = x
    for i, (w, b) in enumerate(params):
        h = torch.baddbmm(b.unsqueeze(1), h, w)
        if i < len(params) - 1:
            h = F.relu(h)
    return h
