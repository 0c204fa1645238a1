"""A bag-of-words reference for mmguard-mini: TF-IDF (1-2 grams) + logistic regression, text only.

Usage: python scripts/text_baseline.py TRAIN.jsonl TEST.jsonl
Trains on the trainable items of TRAIN (prompt text for prompt classification, prompt + response for
response classification; images ignored) and prints P/R/F1/FPR on TEST per task and modality. It puts
the mini's numbers in context: a model that cannot read images cannot beat what the text alone allows.
"""

from __future__ import annotations

import sys

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from mmguard.data.schema import Example, read_examples
from mmguard.eval.metrics import binary_metrics


def _text(e: Example) -> str:
    return e.text if e.task == "response" else e.prompt_text


def main() -> None:
    train = [e for e in read_examples(sys.argv[1]) if e.trainable and e.split == "train"]
    test = list(read_examples(sys.argv[2]))
    print("| Task | slice | n | unsafe | P | R | F1 | FPR |")
    print("|---|---|---|---|---|---|---|---|")
    for task in ("prompt", "response"):
        a = [e for e in train if e.task == task]
        b = [e for e in test if e.task == task]
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        clf = LogisticRegression(C=10, max_iter=2000, class_weight="balanced")
        clf.fit(vec.fit_transform([_text(e) for e in a]), [e.label == "unsafe" for e in a])
        x_test = vec.transform([_text(e) for e in b])
        pred, score = clf.predict(x_test), clf.predict_proba(x_test)[:, 1]
        for name, idx in (("all", range(len(b))),
                          ("text", [i for i, e in enumerate(b) if e.modality == "text"]),
                          ("image+text", [i for i, e in enumerate(b) if e.modality == "image+text"])):  # fmt: skip
            m = binary_metrics([int(b[i].label == "unsafe") for i in idx], [int(pred[i]) for i in idx],
                               [float(score[i]) for i in idx])  # fmt: skip
            print(f"| {task} | {name} | {m.n} | {m.positives} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} "
                  f"| {m.fpr:.3f} |")

if __name__ == "__main__":
    main()
