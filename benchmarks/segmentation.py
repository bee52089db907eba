"""CPU time per image of the segmentation routes (``mode=segment``), on demo widget images.

    python benchmarks/segmentation.py --setting demo-color demo-backbone vits-448 vitb-448 sam-vitb-1024

Each setting fits part prototypes on ``--fit-images`` images, then segments ``--images`` more
and reports the mean wall and process CPU time per segmented image (features, scores,
refinement; SAM: proposals too) and per fitted image. Weights are random (timing does not depend
on them). Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from data_modules.sources.demo import _widget
from src.models.backbone import DinoV2Backbone
from src.segment.cluster import ClusterSegmenter
from src.segment.features import BackboneFeatures, ColorFeatures

TINY = {"embed_dim": 64, "num_heads": 2, "init_values": 1.0}  # the demo model's backbone (conf/model/tiny.yaml)
SETTINGS = {
    "demo-color": dict(route="cluster", size=196, features="color"),
    "demo-backbone": dict(route="cluster", size=196, features="vit_base_patch14_reg4_dinov2", arch=TINY),
    "vits-448": dict(route="cluster", size=448, features="vit_small_patch14_reg4_dinov2"),
    "vitb-448": dict(route="cluster", size=448, features="vit_base_patch14_reg4_dinov2"),
    "sam-vitb-1024": dict(route="sam", size=1024, features="color", points_per_side=8),
}


def widget_images(count: int, size: int) -> list[torch.Tensor]:
    images = []
    for i in range(count):
        img, _, _ = _widget(np.random.default_rng(i), 192, "good")
        tensor = torch.from_numpy(img).permute(2, 0, 1).float()[None]
        images.append(F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1))
    return images


def build(setting: dict):
    if setting["features"] == "color":
        features = ColorFeatures()
    else:
        backbone = DinoV2Backbone(setting["features"], weights="random", arch_overrides=setting.get("arch"))
        features = BackboneFeatures(backbone, list(range(2, 10)))
    if setting["route"] == "cluster":
        return ClusterSegmenter(features)
    from src.segment.sam import SamSegmenter, build_sam

    return SamSegmenter(build_sam("vit_b"), features, points_per_side=setting["points_per_side"],
                        pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, min_mask_area=0.0)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", nargs="+", default=["demo-color", "demo-backbone"], choices=sorted(SETTINGS))
    parser.add_argument("--fit-images", type=int, default=2)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.setting:
        setting = SETTINGS[name]
        torch.manual_seed(0)
        segmenter = build(setting)
        images = widget_images(args.fit_images + args.images, setting["size"])
        with torch.inference_mode():
            prototypes, fit_wall, fit_cpu = timed(lambda: segmenter.fit(images[: args.fit_images], args.k))
            walls, cpus = [], []
            for image in images[args.fit_images :]:
                _, wall, cpu = timed(lambda: segmenter.segment(prototypes, image))
                walls.append(wall)
                cpus.append(cpu)
        print(json.dumps({
            "setting": name, **{k: v for k, v in setting.items() if k != "arch"}, "threads": args.threads,
            "fit_wall_s_per_image": round(fit_wall / args.fit_images, 3),
            "fit_cpu_s_per_image": round(fit_cpu / args.fit_images, 3),
            "segment_wall_s_per_image": round(float(np.mean(walls)), 3),
            "segment_cpu_s_per_image": round(float(np.mean(cpus)), 3),
        }), flush=True)


if __name__ == "__main__":
    main()
