"""Does mode=predict give each image the test's score and decision? A table from the files.

    python benchmarks/predict_against_test.py --scores <run>/scores.csv \
        --predictions <out1>/predictions/predictions.csv [<out2>/predictions/predictions.csv ...]

``--scores``: the ``scores.csv`` of ``mode=test evaluation.protocol=inductive``; each predictions
file: a ``mode=predict`` run over some of the same test images. Images are matched by the last
four parts of their path (``<class>/test/<type>/<name>``), so runs from other folders compare.
Prints per predictions file: normal and anomalous images flagged, image AUROC, how often the
class (chosen or given) is the test's, the largest score difference and the decisions that agree.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from sklearn.metrics import roc_auc_score


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {"/".join(Path(r["path"]).parts[-4:]): r for r in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    test = rows(args.scores)
    print("| predictions | normal flagged | anomalous flagged | image AUROC | class as the test's | "
          "largest score difference | same decision |")
    print("|---|---|---|---|---|---|---|")
    for path in args.predictions:
        predicted = rows(path)
        missing = sorted(set(predicted) - set(test))
        if missing:
            raise SystemExit(f"{path}: {len(missing)} image(s) are not in {args.scores}, e.g. {missing[0]}")
        labels = {k: int(test[k]["label"]) for k in predicted}
        flagged = {k: r["anomalous"] == "True" for k, r in predicted.items()}
        normal = [k for k in predicted if labels[k] == 0]
        anomalous = [k for k in predicted if labels[k] == 1]
        auroc = roc_auc_score([labels[k] for k in predicted], [float(r["score"]) for r in predicted.values()])
        same_class = sum(r["class"] == test[k]["class"] for k, r in predicted.items())
        diff = max(abs(float(r["score"]) - float(test[k]["score"])) for k, r in predicted.items())
        same = sum(r["anomalous"] == test[k]["anomalous"] for k, r in predicted.items())
        print(f"| {path} | {sum(flagged[k] for k in normal)} of {len(normal)} | "
              f"{sum(flagged[k] for k in anomalous)} of {len(anomalous)} | {auroc:.3f} | {same_class} of "
              f"{len(predicted)} | {diff:.1e} | {same} of {len(predicted)} |")


if __name__ == "__main__":
    main()
