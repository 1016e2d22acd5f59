"""How large DELTA's feature term is before any update, with the trained model's BatchNorm in train vs eval mode.

    .venv/bin/python bench/delta_bn_mismatch.py [--dataset mnist-5k] [--attention RUN/delta_attention.json]

DELTA compares the feature maps of the model being trained with those of the frozen pretrained model, which runs in
eval mode (BatchNorm on its running statistics, as the reference's `model_source.eval()`). Before the first update the
two models hold the same weights, so the term is 0 only if the trained model's BatchNorm also uses the running
statistics; in train mode it normalises with the batch's own statistics, and on images far from the pretraining
distribution (32 px greyscale digits vs ImageNet) the features differ a lot. Prints the term (alpha = 1) both ways,
with the cross-entropy of the untrained head for scale. Attention: uniform over channels, or a run's measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mars_dist.constraints.delta import channel_count, feature_distance  # noqa: E402
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms  # noqa: E402
from mars_dist.data.splits import build_splits  # noqa: E402
from mars_dist.models.factory import build_model, resolve_data_config  # noqa: E402
from mars_dist.run.delta import Tap  # noqa: E402

LAYERS = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]  # Lite0's automatic choice (the last 4 stage outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--attention", default=None, help="a run's delta_attention.json (default: uniform)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    splits = build_splits(a.dataset, None, 20, 20, 0.1, 100, 0)
    model = build_model("tf_efficientnet_lite0", "bundled", len(splits.class_names), head_seed=0)
    source = build_model("tf_efficientnet_lite0", "bundled", len(splits.class_names), head_seed=0).eval()
    data = ImageClassificationDataset(splits.train, build_transforms(resolve_data_config(model, a.image_size),
                                                                     train=True), seed=0)
    x = torch.stack([data[i][0] for i in range(a.batch)])
    y = torch.tensor([data[i][1] for i in range(a.batch)])
    layers, source_tap, target_tap = LAYERS, Tap(source, LAYERS), Tap(model, LAYERS)
    with torch.no_grad():
        source(x)
        feats = source_tap.take()
        if a.attention:
            saved = json.loads(Path(a.attention).read_text())
            layers, attention = saved["layers"], [torch.tensor(v) for v in saved["attention"]]
            assert layers == LAYERS, layers
        else:
            attention = [torch.full((channel_count(f),), 1.0 / channel_count(f)) for f in feats]
        out = {}
        for mode in ("eval", "train"):  # eval first: a train-mode forward updates the running statistics
            model.train(mode == "train")
            logits = model(x)
            out[mode] = float(feature_distance(target_tap.take(), feats, attention))
            out["cross_entropy"] = float(F.cross_entropy(logits, y))
    print(json.dumps({"dataset": a.dataset, "image_size": a.image_size, "batch": a.batch,
                      "attention": a.attention or "uniform", "delta_term_alpha1_bn_eval": out["eval"],
                      "delta_term_alpha1_bn_train": out["train"],
                      "cross_entropy_untrained_head": out["cross_entropy"]}))


if __name__ == "__main__":
    main()
