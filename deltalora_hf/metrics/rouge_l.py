"""ROUGE-L F-measure (Lin, 2004) on whitespace tokens, lower-cased (local ``evaluate`` metric).

Per pair: LCS length ``l`` of prediction and reference, ``P = l/len(pred)``, ``R = l/len(ref)``,
``F = 2PR/(P+R)``; the result is the mean F over pairs. With several references a pair scores its best one.
"""

import datasets
import evaluate


def _lcs(a, b) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f(prediction: str, reference: str) -> float:
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure on lower-cased whitespace tokens.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str or list of list of str",
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
            ],
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"rougeL": float("nan")}
        scores = []
        for prediction, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else refs
            scores.append(max(rouge_l_f(prediction, ref) for ref in refs))
        return {"rougeL": sum(scores) / len(scores)}
