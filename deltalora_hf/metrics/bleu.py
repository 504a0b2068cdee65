"""Corpus BLEU (Papineni et al., 2002) on lower-cased whitespace tokens, up to 4-grams, no smoothing.

``BLEU = BP * exp(mean_n log p_n)`` with clipped n-gram precisions ``p_n`` summed over the corpus and the
brevity penalty ``BP = min(1, exp(1 - r/c))`` (``r``: closest reference length per sentence). Local
``evaluate`` metric; it is a plain reimplementation, not sacreBLEU (no tokenizer rules).
"""

import math
from collections import Counter

import datasets
import evaluate


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions, references, max_order: int = 4) -> dict:
    matches, totals = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for prediction, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        hyp = prediction.lower().split()
        ref_tokens = [r.lower().split() for r in refs]
        pred_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_order + 1):
            counts = _ngrams(hyp, n)
            max_ref = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    if min(precisions) == 0:
        geo = 0.0
    else:
        geo = math.exp(sum(math.log(p) for p in precisions) / max_order)
    bp = 1.0 if pred_len > ref_len else (math.exp(1 - ref_len / pred_len) if pred_len else 0.0)
    return {"bleu": bp * geo, "precisions": precisions, "brevity_penalty": bp}


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU on lower-cased whitespace tokens (max order 4, no smoothing).",
            citation="Papineni et al. (2002). BLEU: a Method for Automatic Evaluation of Machine Translation.",
            inputs_description="predictions: list of str; references: list of str or list of list of str",
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
            ],
        )

    def _compute(self, predictions, references, max_order=4):
        return corpus_bleu(predictions, references, max_order)
