"""Behaviour datasets: labels with their instructions, tone-neutral questions, and splits.

A *behaviour dataset* is a list of behaviours (a label name and the instruction that elicits it,
given to the model as a system prompt) and a list of questions that can be answered in any of
those behaviours. The model's activations on "instruction + question" (or on its answer) are what
probes learn from.

Two *families* ship with ks-lens (:data:`SHIPPED`): ``load_dataset("tones")``, six tones
(helpful, expert, casual, cautious, empathetic, concise), and ``load_dataset("concepts")``, six
concepts woven into the answer (cooking, space, animals, sports, music, weather), both over the
same 600+ tone-neutral questions in 18 categories with the same splits. Users bring their own with
a behaviours JSON file and questions in JSONL or CSV (see ``docs/datasets.md`` and
``docs/tutorial-own-family.md``).

Splits are made **by question**: a question (with all its behaviour variants) belongs to exactly
one of ``train`` / ``evaluator`` / ``calibration`` / ``test``. The ``evaluator`` split trains the
held-out evaluation classifiers, which never see the steering probe's questions.

Where things live: :mod:`~ks_lens.datasets.labels` (behaviours, questions, label sets),
:mod:`~ks_lens.datasets.dataset` (:class:`BehaviourDataset`), :mod:`~ks_lens.datasets.loading`
(shipped families and files), :mod:`~ks_lens.datasets.splits` (splits by question), and, imported
from their own modules, :mod:`~ks_lens.datasets.gold_texts` (labelled gold texts) and
:mod:`~ks_lens.datasets.coverage` (which test questions answer which label combinations).
"""

from ks_lens.datasets.dataset import BehaviourDataset
from ks_lens.datasets.labels import (
    COMBINE_SEP,
    INSTRUCTION_JOINER,
    Behaviour,
    Question,
    base_labels,
    case_twin,
    join_instructions,
    label_name_problem,
    label_set,
    multi_hot,
)
from ks_lens.datasets.loading import (
    SHIPPED,
    family_file,
    load_behaviours,
    load_dataset,
    load_questions,
)
from ks_lens.datasets.splits import DEFAULT_FRACTIONS, SPLITS, Splits, make_splits

__all__ = [
    "COMBINE_SEP",
    "DEFAULT_FRACTIONS",
    "INSTRUCTION_JOINER",
    "SHIPPED",
    "SPLITS",
    "Behaviour",
    "BehaviourDataset",
    "Question",
    "Splits",
    "base_labels",
    "case_twin",
    "family_file",
    "join_instructions",
    "label_name_problem",
    "label_set",
    "load_behaviours",
    "load_dataset",
    "load_questions",
    "make_splits",
    "multi_hot",
]
