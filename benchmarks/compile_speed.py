"""``module.compile_experts=true`` on this machine: the tiny model's eager forward against the
same weights with every patch and global expert compiled by inductor (``src.models.acceleration``).

    python benchmarks/compile_speed.py [--iterations 20] [--batch 3]

Prints the first compiled call's time (the compilation), the largest map difference and the
mean time per forward of each.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=3)
    args = parser.parse_args()
    from src.models.acceleration import accelerate
    from tests.conftest import random_masks, tiny_model

    torch.manual_seed(0)
    eager = tiny_model(top_k=2).eval()
    compiled = accelerate(copy.deepcopy(eager), compile_experts=True)
    image = torch.rand(args.batch, 3, 56, 56)
    masks, counts = random_masks(args.batch, 56, [i % 3 for i in range(args.batch)])
    with torch.no_grad():
        expected = eager(image, None, masks, counts)
        start = time.perf_counter()
        got = compiled(image, None, masks, counts)
        first = time.perf_counter() - start
        diff = max((getattr(got, n) - getattr(expected, n)).abs().max().item()
                   for n in ("map_patch", "map_global", "map_component"))
        times = {}
        for _ in range(2):  # interleaved rounds
            for name, model in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                for _ in range(args.iterations):
                    model(image, None, masks, counts)
                times.setdefault(name, []).append((time.perf_counter() - start) / args.iterations)
    eager_s, compiled_s = min(times["eager"]), min(times["compiled"])
    print(f"compile (first call) {first:.1f} s; largest map difference {diff:.1e}; eager {1e3 * eager_s:.1f} ms, "
          f"compiled {1e3 * compiled_s:.1f} ms per forward of {args.batch} images ({eager_s / compiled_s:.2f}x), "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
