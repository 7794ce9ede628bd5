"""Captioning throughput on Ray: images/s with 1 and 2 actors, and across two Ray nodes on one machine.

Contract: `python benchmarks/bench_ray.py [--n 60] [--actors 1,2] [--parallel 4] [--threads 1]
[--batch-size 8] [--repeat 1] [--no-nodes] [--no-engine]`. Renders `--n` held-out demo scenes (PNG), then describes them
greedily with the demo bundle:
- `engine`: the engine in this process, no Ray (`parallel` slots, `threads` llama.cpp threads): the
  single-process baseline;
- `ray, N actors`: `run_describe_job` on a local Ray runtime with one CPU per actor, N from `--actors`;
- `ray, 2 nodes x 1 actor`: two Ray nodes (raylets with their own object stores, `ray.cluster_utils.
  Cluster`) on this machine, one actor on each: the multi-node path (items and results cross node
  boundaries through the object store), without a real network.
Per configuration (the median of `--repeat` runs, which alternate between configurations so that a change
in machine load hits them all): wall time (Ray start-up excluded, actor start-up and model loading
included), the steady rate (images after the first result batch / time from the first to the last batch),
and the scaling of the steady rate against 1 actor. Ends with one JSON line. Every run's answers are
checked equal to the first run's (greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from minigpt4_local.loader import LoadOptions
from minigpt4_local.train.demo.recipe import SCENE_RENDER_SIZE
from minigpt4_local.train.demo.scenes import make_scene, scene_seeds


def write_scenes(folder: Path, n: int) -> list[Path]:
    paths = []
    for seed in scene_seeds("heldout", n):
        path = folder / f"{seed}.png"
        make_scene(seed, SCENE_RENDER_SIZE).image.save(path, format="PNG")
        paths.append(path)
    return paths


def run_engine(paths: list[Path], parallel: int, threads: int, batch: int) -> dict[str, Any]:
    """The engine in this process; 'steady' excludes the first `batch` answers, like the Ray runs."""
    from minigpt4_local.engine import Engine
    from minigpt4_local.image import load_image
    from minigpt4_local.prompts import image_prompt

    start = time.perf_counter()
    engine = Engine.open("demo", LoadOptions(threads=threads), parallel=parallel)
    done: list[float] = []
    try:
        options = engine.sampling(greedy=True)
        prompt = image_prompt(engine.config.prompt, "Describe this image in detail.")
        finish = lambda _job: done.append(time.perf_counter())  # noqa: E731
        jobs = [(p, engine.submit(prompt, [load_image(p)], options, on_done=finish)) for p in paths]
        answers = {str(p.resolve()): job.result().text for p, job in jobs}
    finally:
        engine.close()
    end = time.perf_counter()
    done.sort()
    first = done[min(batch, len(done)) - 1]
    return {
        "config": f"engine, no Ray (parallel {parallel})",
        "wall_s": end - start,
        "startup_s": first - start,
        "steady_ips": (len(done) - batch) / (done[-1] - first) if len(done) > batch else float("nan"),
        "answers": answers,
    }


def run_ray(paths: list[Path], label: str, actors: int, parallel: int, threads: int, batch: int) -> dict:
    from minigpt4_local.distributed import read_results, run_describe_job

    arrivals: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_describe_job(
            paths,
            out,
            model="demo",
            greedy=True,
            load_options=LoadOptions(threads=threads),
            actors=actors,
            parallel=parallel,
            batch_size=batch,
            progress=lambda _s, rows: arrivals.append((time.perf_counter(), rows.num_rows)),
        )
        end = time.perf_counter()
        rows = read_results(out)
    answers = {r["id"]: r["answer"] for r in rows}
    first, rest = arrivals[0][0], sum(n for _, n in arrivals[1:])
    return {
        "config": label,
        "wall_s": end - start,
        "startup_s": first - start,  # to the first result batch: actor start, model load, one batch
        "steady_ips": rest / (arrivals[-1][0] - first) if len(arrivals) > 1 else float("nan"),
        "answers": answers,
        "actor_processes": len({r["worker"] for r in rows}),
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median steady rate, plus every run's rate."""
    ordered = sorted(runs, key=lambda r: r["steady_ips"])
    return {**ordered[(len(ordered) - 1) // 2], "steady_ips_all": [round(r["steady_ips"], 3) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    parser.add_argument("--no-nodes", action="store_true", help="skip the two-node run")
    parser.add_argument("--no-engine", action="store_true", help="skip the no-Ray baseline")
    args = parser.parse_args()
    counts = [int(a) for a in args.actors.split(",") if a.strip()]

    import ray

    from minigpt4_local.distributed import connect

    rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scenes(Path(tmp), args.n)
        t0 = time.perf_counter()
        connect("local", num_cpus=max(counts))
        ray_init_s = time.perf_counter() - t0
        for _ in range(args.repeat):
            runs: list[dict] = []
            if not args.no_engine:
                runs.append(run_engine(paths, args.parallel, args.threads, args.batch_size))
            for actors in counts:
                label = f"ray, {actors} actor{'s' if actors > 1 else ''}"
                runs.append(run_ray(paths, label, actors, args.parallel, args.threads, args.batch_size))
            rounds.append(runs)
        ray.shutdown()
        if not args.no_nodes:
            from ray.cluster_utils import Cluster

            cluster = Cluster(
                initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
            )
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            connect()  # already initialised: only quiets Ray Data
            nodes = len([n for n in ray.nodes() if n["Alive"]])
            for runs in rounds:
                label = f"ray, {nodes} nodes x 1 actor"
                runs.append(run_ray(paths, label, 2, args.parallel, args.threads, args.batch_size))
            ray.shutdown()
            cluster.shutdown()

    runs = [median_run([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    reference = rounds[0][0]["answers"]
    for run in (r for rs in rounds for r in rs):
        assert run["answers"] == reference, f"{run['config']}: answers differ from {rounds[0][0]['config']}"
    one = next((r for r in runs if r["config"] == "ray, 1 actor"), None)
    print(
        f"{args.n} held-out demo scenes, greedy, {args.threads} llama.cpp thread(s) per actor, "
        f"{args.parallel} engine slots, batch {args.batch_size}; Ray start-up {ray_init_s:.1f} s (not counted)"
    )
    print(f"{'configuration':<32}{'wall s':>8}{'to 1st batch s':>16}{'steady img/s':>14}{'x 1 actor':>11}")
    for run in runs:
        scale = run["steady_ips"] / one["steady_ips"] if one else float("nan")
        run["scaling"] = round(scale, 3)
        print(
            f"{run['config']:<32}{run['wall_s']:>8.1f}{run['startup_s']:>16.1f}{run['steady_ips']:>14.3f}{scale:>11.2f}"
        )
    print("answers: identical across all runs")
    line = {
        "bench": "ray",
        "n": args.n,
        "parallel": args.parallel,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "ray_init_s": round(ray_init_s, 2),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "runs": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "answers"}
            for r in runs
        ],
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
