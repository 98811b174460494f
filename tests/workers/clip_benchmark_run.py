"""Run clip_benchmark's own CLI once per argv list: python clip_benchmark_run.py '[[...], ...]'.

One compatibility shim: clip-benchmark 1.6.2's ``accuracy`` ends in ``float(<1-element 1-d
array>)``, which NumPy >= 2.4 refuses (TypeError). The replacement counts the same top-k hits
and returns them as Python floats; everything else (open_clip model and transform loading, the
webdataset reader, tokenizer, classifier, logits) is clip_benchmark's.
"""

from __future__ import annotations

import json
import sys

import torch
from clip_benchmark.cli import main
from clip_benchmark.metrics import zeroshot_classification


def top_k_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Fraction of rows whose target is among the k largest logits, for each k."""
    pred = output.topk(max(topk), 1, True, True)[1].t()  # [k, N], as clip_benchmark ranks
    hits = pred.eq(target.view(1, -1).expand_as(pred))
    return [hits[:k].any(dim=0).sum().item() / len(target) for k in topk]


zeroshot_classification.accuracy = top_k_accuracy

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["clip_benchmark", *argv]
        main()
