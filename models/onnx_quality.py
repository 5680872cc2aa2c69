"""Load-time parity probe of an ONNX graph against the torch path on the same weights.

A fixed set of texts ships with the package (below): short queries and passages of a few hundred
characters, English and a few other languages. Both paths compute them at load and the figures
decide whether the graph is served:

- text_embedding: the minimum cosine between the two vectors of a text (per task adapter, if any);
- sparse_embedding: the minimum cosine of the two weight vectors, the minimum overlap of the top
  ``TOP_TERMS`` terms, and the largest relative L1 error of the weights;
- rerank: the minimum cosine of the score vectors of each query's documents (scores centred, so a
  constant shift does not count and an order change does) and the share of document pairs whose
  order agrees.

``min_cosine`` is the figure compared with the floor for every task (default 0.99 for int8,
``int8_quality_floor`` in ``infercore.json``). An fp32 graph must agree within ``FP32_FLOOR``: a
lower figure means the file does not compute these weights (a mismatched or broken export).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_INT8_FLOOR = 0.99
FP32_FLOOR = 0.999
TOP_TERMS = 20

QUALITY_QUERIES = (
    "how do solar panels work",
    "best way to store fresh basil",
    "symptoms of vitamin d deficiency",
    "what is the capital of australia",
    "wie funktioniert eine wärmepumpe",
    "comment faire une pâte à crêpes",
)

QUALITY_PASSAGES = (
    "Solar panels convert sunlight into electricity using photovoltaic cells. When photons hit the "
    "semiconductor material, usually silicon, they knock electrons loose, and the electric field built "
    "into the cell drives those electrons through a circuit as direct current. An inverter then turns "
    "the direct current into the alternating current that household appliances use.",
    "Fresh basil keeps best at room temperature like a bouquet of flowers: trim the stems, stand them in "
    "a glass of water and cover the leaves loosely with a plastic bag. In the refrigerator the leaves "
    "turn black within a day or two because the herb is sensitive to cold.",
    "Vitamin D deficiency often causes no symptoms at first. Over time it can lead to tiredness, bone "
    "pain, muscle weakness and aches, and mood changes. In children a severe deficiency causes rickets; "
    "in adults it contributes to osteomalacia and osteoporosis.",
    "Canberra is the capital city of Australia. Founded following the federation of the colonies as a "
    "compromise between the two largest cities, Sydney and Melbourne, it was purpose-built and is home "
    "to Parliament House, the High Court and many national institutions.",
    "Eine Wärmepumpe entzieht der Umgebung, etwa der Luft, dem Erdreich oder dem Grundwasser, Wärme und "
    "hebt sie mit Hilfe eines Kältemittelkreislaufs und eines Verdichters auf ein höheres "
    "Temperaturniveau, mit dem sich ein Gebäude heizen lässt.",
    "Pour une pâte à crêpes, mélangez 250 g de farine, quatre œufs et une pincée de sel, puis ajoutez "
    "progressivement un demi-litre de lait en fouettant pour éviter les grumeaux. Laissez reposer la "
    "pâte une heure avant de faire cuire les crêpes dans une poêle chaude et beurrée.",
    "The stock market closed higher on Friday as technology shares rallied after quarterly earnings beat "
    "expectations, while energy stocks fell on lower oil prices.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and release oxygen; it takes place mainly in the chloroplasts of leaf cells.",
)

# What int8 exports measure activations on to find the outlier channels (onnx_graph): other texts than
# the probe's, so the probe judges the split on texts it was not fitted to.
CALIBRATION_TEXTS = (
    "how long does it take to boil an egg",
    "train tickets from berlin to prague",
    "¿cuál es el río más largo de europa?",
    "The library opens at nine on weekdays and at ten on Saturdays; it is closed on Sundays and public "
    "holidays. Members can borrow up to twelve items at a time for three weeks and renew them online.",
    "A compiler translates source code written in a high-level language into machine code. It parses "
    "the program into a syntax tree, checks types, optimises an intermediate representation and finally "
    "allocates registers and emits instructions for the target processor.",
    "Der Vertrag kann von beiden Seiten mit einer Frist von drei Monaten zum Monatsende gekündigt werden. "
    "Die Kündigung bedarf der Schriftform; maßgeblich ist der Zugang beim Empfänger.",
    "Les glaciers des Alpes ont perdu plus de la moitié de leur volume depuis 1900, et la fonte s'est "
    "accélérée au cours des deux dernières décennies sous l'effet du réchauffement climatique.",
    "Patient reports intermittent chest pain radiating to the left arm, worse on exertion, with shortness "
    "of breath. ECG shows ST depression in leads V4 to V6; troponin pending.",
    "Q3 revenue rose 12 % year over year to $4.2 billion, driven by cloud subscriptions, while operating "
    "margin narrowed to 18 % on higher data-centre depreciation. Guidance for Q4 was left unchanged.",
)


@dataclass(frozen=True)
class QualityReport:
    """Parity of an ONNX graph with the torch path on ``QUALITY_QUERIES`` and ``QUALITY_PASSAGES``."""

    precision: str
    min_cosine: float
    texts: int
    # sparse only
    min_top_term_overlap: float | None = None
    max_weight_error: float | None = None
    # rerank only
    pair_order_agreement: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.as_dict().items() if k != "precision")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def dense_report(precision: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> QualityReport:
    cosines = [_cosine(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(reference, candidate)]
    return QualityReport(precision, min(cosines), len(cosines))


def sparse_report(precision: str, vocab: int, reference: Sequence[Any], candidate: Sequence[Any]) -> QualityReport:
    """``reference``/``candidate``: SparseVector rows (ids, weights; heaviest first)."""
    cosines, overlaps, errors = [], [], []
    for ref, cand in zip(reference, candidate):
        a, b = np.zeros(vocab), np.zeros(vocab)
        a[ref.ids] = ref.weights
        b[cand.ids] = cand.weights
        cosines.append(_cosine(a, b))
        top_a, top_b = set(ref.ids[:TOP_TERMS].tolist()), set(cand.ids[:TOP_TERMS].tolist())
        overlaps.append(len(top_a & top_b) / max(len(top_a), 1))
        errors.append(float(np.abs(a - b).sum() / max(np.abs(a).sum(), 1e-12)))
    return QualityReport(precision, min(cosines), len(cosines), min(overlaps), max(errors))


def rerank_report(precision: str, reference: Sequence[Sequence[float]],
                  candidate: Sequence[Sequence[float]]) -> QualityReport:
    """Per query, the scores of its documents (same order in both)."""
    cosines, agree, pairs = [], 0, 0
    for ref, cand in zip(reference, candidate):
        a, b = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        cosines.append(_cosine(a - a.mean(), b - b.mean()))
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                pairs += 1
                agree += np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])
    return QualityReport(precision, min(cosines), sum(len(r) for r in reference), pair_order_agreement=agree / pairs)


def measure(task: str, precision: str, vocab: int,
            reference: Callable[[list[Any]], list[Any]], candidate: Callable[[list[Any]], list[Any]],
            inputs: list[Any], groups: Sequence[int] = ()) -> QualityReport:
    """Run ``inputs`` through both paths and compare; rerank ``groups``: documents per query."""
    ref, cand = reference(inputs), candidate(inputs)
    if task == "sparse_embedding":
        return sparse_report(precision, vocab, ref, cand)
    if task == "rerank":
        split = np.cumsum(groups)[:-1]
        return rerank_report(precision, np.split(np.asarray(ref), split), np.split(np.asarray(cand), split))
    return dense_report(precision, ref, cand)
