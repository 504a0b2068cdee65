"""F1 score for classification (local ``evaluate`` metric).

``average="macro"`` (default) is the unweighted mean of the per-class F1 over every class that occurs in the
references or the predictions; ``"micro"`` equals accuracy for single-label data; ``"binary"`` is the F1 of
``pos_label``. A class with no true positive has F1 0.
"""

from collections import Counter

import datasets
import evaluate


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score (harmonic mean of precision and recall), macro/micro/binary.",
            citation="",
            inputs_description="predictions: list of int; references: list of int; average: macro|micro|binary",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", pos_label=1):
        tp, fp, fn = Counter(), Counter(), Counter()
        for p, r in zip(predictions, references):
            if p == r:
                tp[r] += 1
            else:
                fp[p] += 1
                fn[r] += 1
        if average == "binary":
            return {"f1": _f1(tp[pos_label], fp[pos_label], fn[pos_label])}
        if average == "micro":
            return {"f1": _f1(sum(tp.values()), sum(fp.values()), sum(fn.values()))}
        if average != "macro":
            raise ValueError(f"average must be 'macro', 'micro' or 'binary', got {average!r}")
        labels = set(predictions) | set(references)
        if not labels:
            return {"f1": float("nan")}
        return {"f1": sum(_f1(tp[c], fp[c], fn[c]) for c in labels) / len(labels)}
