"""Where the exported model refines its part maps: inside the ONNX graph, or in the runtime.

The exported graph (:mod:`src.deploy`) turns each image's part scores into component masks by the
mean-field refinement of :func:`src.segment.refine.refine` (a Gaussian blur and a colour guided
filter, three steps) and an argmax. This script measures the two places that refinement can run:

* **in the graph**: the refinement and the argmax exported alone, by the same exporter and with the
  same arithmetic as ``mode=export`` (``exported=True``: 3x3 inverses by cofactors, per-pixel
  products as broadcast sums), run by onnxruntime's CPU provider with ``--threads`` threads;
* **in the runtime**: the same refinement written with numpy alone (the only array library
  :mod:`src.inference` may use besides onnxruntime), as the runtime would run it between two
  graphs (the first giving the part scores, the second taking the masks).

Eager torch (``exported=False``, what ``mode=predict`` runs with a checkpoint) is the reference:
each placement's labels are compared with it (share of pixels with the same part, largest
probability difference). The inputs are normal demo widget images generated at the segmentation's working size and
part scores fitted on them (k-means of mean Lab colours of 14 px cells, the patch grid's size,
bilinearly upsampled as in the graph). Times are the median of ``--repeats`` interleaved rounds
(the three implementations take turns, so a shared machine's load falls on all alike).

    OMP_NUM_THREADS=2 python -m benchmarks.refine_placement --sizes 196 448 --batches 1 8 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_modules.io import open_image
from data_modules.sources.demo import generate_demo_dataset
from src.measure.timing import interleaved_rounds
from src.modes.export import onnx_export
from src.segment.features import color_grid
from src.segment.parts import fit_prototypes
from src.segment.refine import RefineSettings, refine

LABELS = {196: 4, 448: 5}  # part prototypes: the demo's widget (196 px) and the paper's k=5 (448 px)


# --------------------------------------------------------------------------- the refinement in numpy
def window_sums(x: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Sums over [i - r, i + r], clipped to the array, along ``axis``."""
    c = np.cumsum(x, axis)
    n = x.shape[axis]
    head = np.zeros_like(np.take(c, [0], axis)).repeat(radius + 1, axis)
    tail = np.take(c, [n - 1], axis).repeat(radius, axis)
    padded = np.concatenate([head, c, tail], axis)
    return np.take(padded, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis) - np.take(padded, np.arange(n), axis)


def box(x: np.ndarray, radius: int, count: np.ndarray) -> np.ndarray:
    return window_sums(window_sums(x, radius, -1), radius, -2) / count


def gaussian_blur(x: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """torchvision's ``gaussian_blur`` (reflect padding), as two 1-D passes."""
    half = (kernel - 1) / 2
    w = np.exp(-0.5 * (np.linspace(-half, half, kernel) / sigma) ** 2).astype(np.float32)
    w /= w.sum()
    p = kernel // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)], mode="reflect")
    h, wd = x.shape[-2:]
    rows = sum(w[i] * padded[..., i: i + h, :] for i in range(kernel))
    return sum(w[i] * rows[..., :, i: i + wd] for i in range(kernel))


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def refine_numpy(logits: np.ndarray, image: np.ndarray, s: RefineSettings) -> np.ndarray:
    """(B, K, H, W) scores, (B, 3, H, W) image in [0, 1] -> (B, K, H, W) probabilities, the steps of
    :func:`src.segment.refine.refine`."""
    shifted = logits - logits.max(1, keepdims=True)
    unary = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    q = np.exp(unary)
    side = max(image.shape[-2:])
    sigma = max(s.spatial_sigma * side, 0.5)
    kernel = 2 * int(3 * sigma) + 1
    radius = max(1, round(s.guided_radius * side))
    count = window_sums(window_sums(np.ones(image.shape[-2:], np.float32), radius, -1), radius, -2)
    guide = image[:, :, None]  # (B, 3, 1, H, W)
    mean_i = box(image, radius, count)[:, :, None]
    var = box(image[:, :, None] * image[:, None], radius, count) - mean_i * mean_i.transpose(0, 2, 1, 3, 4)
    var = var + s.guided_eps * np.eye(3, dtype=np.float32)[:, :, None, None]  # (B, 3, 3, H, W)
    inv = np.linalg.inv(var.transpose(0, 3, 4, 1, 2)).transpose(0, 3, 4, 1, 2).astype(np.float32)
    for _ in range(s.iterations):
        mean_p = box(q, radius, count)  # (B, K, H, W)
        cov = box(guide * q[:, None], radius, count) - mean_i * mean_p[:, None]  # (B, 3, K, H, W)
        a = (inv[:, :, :, None] * cov[:, None]).sum(2)  # (B, 3, K, H, W)
        b = mean_p - (a * mean_i).sum(1)
        guided = (box(a, radius, count) * guide).sum(1) + box(b, radius, count)
        q = softmax(unary + s.spatial_weight * gaussian_blur(q, kernel, sigma) + s.guided_weight * guided, 1)
    return q


# --------------------------------------------------------------------------- inputs and the graph
def inputs(size: int, batch: int, labels: int, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` demo widget images (B, 3, size, size) uint8 and part scores (B, K, size, size)."""
    generate_demo_dataset(folder, size=size, num_train=batch, num_test_good=1, num_test_defect=1)
    paths = sorted((folder / "widget" / "train" / "good").iterdir())[:batch]
    images = [np.asarray(open_image(p)).transpose(2, 0, 1) for p in paths]
    image = torch.from_numpy(np.stack(images))
    grid = color_grid(image.float() / 255, "lab", 14)  # (B, 3, h, w): the patch grid's resolution
    vectors = grid.flatten(2).transpose(1, 2)  # (B, P, 3)
    prototypes = fit_prototypes(vectors.reshape(-1, 3), labels, normalize=False)
    scores = prototypes.scores(vectors.reshape(-1, 3)).reshape(batch, -1, labels).transpose(1, 2)
    scores = scores.reshape(batch, labels, *grid.shape[-2:])
    scores = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)
    return image.numpy(), scores.float().numpy()


class RefineGraph(torch.nn.Module):
    def __init__(self, settings: RefineSettings) -> None:
        super().__init__()
        self.settings = settings

    def forward(self, scores: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = refine(scores, image.float() / 255, self.settings, exported=True)
        return q, q.argmax(1)


def export_graph(path: Path, scores: np.ndarray, image: np.ndarray, settings: RefineSettings) -> None:
    example = (torch.from_numpy(scores[:2]), torch.from_numpy(image[:2]))
    onnx_export(RefineGraph(settings).eval(), example, path, ["scores", "image"], ["probabilities", "labels"])


def graph_runner(session, scores: np.ndarray, image: np.ndarray):
    return lambda: tuple(session.run(None, {"scores": scores, "image": image}))


def numpy_runner(scores: np.ndarray, image: np.ndarray, settings: RefineSettings):
    def run() -> tuple[np.ndarray, np.ndarray]:
        q = refine_numpy(scores, image.astype(np.float32) / 255, settings)
        return q, q.argmax(1)
    return run


def torch_runner(scores: np.ndarray, image: np.ndarray, settings: RefineSettings):
    def run() -> tuple[np.ndarray, np.ndarray]:
        q = refine(torch.from_numpy(scores), torch.from_numpy(image).float() / 255, settings)
        return q.numpy(), q.argmax(1).numpy()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[196, 448])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    settings = RefineSettings()  # conf/segment/cluster.yaml's refine defaults
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            image, scores = inputs(size, max(args.batches), LABELS.get(size, 5), Path(tmp) / f"demo_{size}")
            path = Path(tmp) / f"refine_{size}.onnx"
            export_graph(path, scores, image, settings)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for batch in args.batches:
                s, im = scores[:batch], image[:batch]
                runs = {"in the graph (onnxruntime)": graph_runner(session, s, im),
                        "in the runtime (numpy)": numpy_runner(s, im, settings),
                        "eager torch (reference)": torch_runner(s, im, settings)}
                for run in runs.values():
                    run()  # warm-up
                times, results = interleaved_rounds(runs, args.repeats)
                q_ref, labels_ref = results["eager torch (reference)"]
                for name in runs:
                    q, labels = results[name]
                    rows.append((size, scores.shape[1], batch, name, statistics.median(times[name]), min(times[name]),
                                 float((labels == labels_ref).mean()), float(np.abs(q - q_ref).max())))
    print(f"{args.threads} threads (onnxruntime and torch; numpy's element-wise work runs on one), "
          f"load average {os.getloadavg()[0]:.1f}, {args.repeats} rounds\n")
    print("| working size | parts | batch | refinement | s/batch: median (min) | same label as eager | largest probability difference |")
    print("|---|---|---|---|---|---|---|")
    for size, k, batch, name, median, low, same, diff in rows:
        print(f"| {size} px | {k} | {batch} | {name} | {median:.3f} ({low:.3f}) | {same:.6f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
