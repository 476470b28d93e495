"""Token-level views of steered answers (circuitsvis), saved as standalone offline HTML.

:func:`token_probabilities` re-encodes question + answer without any instruction under the
unsteered model and reads a probe at every answer token. :func:`token_view_html` renders several
answers (e.g. unsteered vs steered) as circuitsvis ``colored_tokens_multi`` views, one label per
selectable colouring, with the circuitsvis JavaScript inlined (``local_src``), so the file opens
without internet access.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import torch
from jaxtyping import Float

from ks_lens._runtime.batching import record_activations
from ks_lens.io import atomic_write_bytes
from ks_lens.models import model_device
from ks_lens.models.chat import ChatPrompt, encode_chat
from ks_lens.probes import Probe
from ks_lens.types import Model


def token_probabilities(
    model: Model, question: str, answer: str, probe: Probe
) -> tuple[list[str], Float[torch.Tensor, "t k"]]:
    """Answer tokens and the probe's per-label probabilities at each of them."""
    tok = model.tokenizer
    head = encode_chat(tok, ChatPrompt(question))
    ans = list(tok(answer, add_special_tokens=False)["input_ids"])
    if not ans:
        return [], torch.empty(0, probe.n_labels)
    ids = torch.tensor([head + ans], device=model_device(model))

    def answer_part(act: torch.Tensor, name: str) -> torch.Tensor:
        return act[0, len(head) :]

    with (
        torch.no_grad(),
        record_activations(model, probe.hook_name, reduce=answer_part, stop=True) as rec,
    ):
        model(ids, logits_to_keep=1)
    x = rec[probe.hook_name]
    probs = probe.predict_proba(x.to(probe.mean.device, probe.mean.dtype)).cpu()
    return [tok.decode([t]) for t in ans], probs


def token_view_html(
    model: Model, question: str, answers: Mapping[str, str], probe: Probe, *, title: str = ""
) -> str:
    """One HTML page: for each named answer, its tokens coloured by the probe's label probabilities."""
    from circuitsvis.tokens import colored_tokens_multi

    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title or 'ks-lens token view')}</title></head><body>",
        f"<h2>{html.escape(title)}</h2>" if title else "",
        f"<p><b>Question:</b> {html.escape(question)}</p>",
        f"<p>Colour: probability of each label under <code>{html.escape(probe.hook_name)}</code> probe, read at "
        "every answer token of question + answer re-encoded without any instruction (unsteered model). "
        "Choose the label in each view.</p>",
    ]
    for name, answer in answers.items():
        tokens, probs = token_probabilities(model, question, answer, probe)
        parts.append(f"<h3>{html.escape(name)}</h3><p>{html.escape(answer)}</p>")
        if tokens:
            view = colored_tokens_multi(tokens, probs, labels=list(probe.label_names))
            parts.append(view.local_src)
        else:
            parts.append("<p><i>(empty answer)</i></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def save_token_view(path: str | Path, page: str) -> Path:
    path = Path(path)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
