"""Offline metrics, each a thin wrapper of a maintained library (scikit-learn, sacrebleu, rouge-score)."""

from __future__ import annotations

from collections.abc import Sequence


def classification_scores(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_labels`` classes (a class never predicted nor present counts as 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "macro_f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
    }


def generation_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (sacreBLEU defaults: 13a tokenizer, exp smoothing) and mean ROUGE-L F (best reference each).

    ``references[i]`` are all references of ``predictions[i]`` (any number, at least one). BLEU is reported on
    sacreBLEU's 0..100 scale, ROUGE-L F (rouge-score, Porter stemming) on 0..1.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions or any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    depth = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference position; a shorter list repeats its first reference
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)
    ]
    return {"bleu": float(bleu.score), "rougeL": sum(rouge) / len(rouge)}
