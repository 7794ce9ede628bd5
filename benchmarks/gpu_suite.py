"""The GPU path, end to end in one run: synthesize a MiniGPT-4, build it with this project's tools, measure.

Usage (see benchmarks/RESULTS.md "GPU suite" for the bare-GPU-machine recipe, gpu_suite.sh for installs):
    python benchmarks/gpu_suite.py [--shape 7b] --out DIR [--budget-s 570] [--steps a,b,...]
    python benchmarks/gpu_suite.py --cpu --shape mid --out DIR      # the CPU rehearsal (CI)

Contract:
- Steps, in order (`--steps` picks a subset; `synth` runs first whenever a later step needs the model and
  the work folder has none for this shape/seed/device):
    synth            sources in the original formats → `convert` → fp16 ONNX + Q4_K_M GGUF + GPTQ 4-bit
                     (gpu_suite_synth.py); cached in `--work` (a stamp names shape, seed and device)
    vision           torch eager (CUDA: the original's fp16 mixed layout) vs ONNX Runtime (CUDA EP, IO
                     binding), batch 1 and 8; cosine of both against torch fp32 on the CPU
    decode           our stitched llama.cpp runtime vs llama-cpp-python's `Llama`, same GGUF, full
                     offload (bench_decode.py); greedy ids GPU vs CPU on a stitched prompt
    describe-bundle  describe 128 tokens through the torch-free bundle at 2,048 context, with the peak
                     GPU memory (NVML; RSS on the CPU) against the 6.5 GB goal (7B) and, when the build
                     has it, the `minigpt4 info --memory` prediction
    engine           the engine's continuous batching at parallel 1/8/32 (tok/s); greedy ids vs parallel 1
    describe-torch   describe 128 tokens through the torch model (CUDA: fp16)
    gptq             GPTQ 4-bit decode tok/s with the kernel GPTQModel picks; one layer vs its RTN weights
    ref-bundle, ref-torch, ref-gptq   the CPU references of the greedy paths above (first ids equal)
- Device outputs (greedy ids) are kept in WORK/outputs.json with the model, so a later run (another
  call on the same warm machine) can run the ref-* steps alone.
- Every step runs in its own worker process (a crash, a CUDA error or an out-of-memory kill is recorded
  as that step's error and the suite goes on); its wall time is printed as it ends. With `--budget-s`,
  a step whose estimate no longer fits the remaining time is skipped (recorded as such), and a running
  worker is killed when the budget is spent.
- Output: one table (steps with status and seconds, measurements, checks with their tolerance) and ONE
  JSON line on stdout; with `--out DIR` both are also written to DIR/gpu_suite.txt and
  DIR/gpu_suite.json. `--install-log FILE` (JSON lines {"step", "seconds", "ok", "note"} written by
  gpu_suite.sh) adds the install timings to both. Exit status 0 when every step that ran succeeded
  and every check passed, 1 otherwise (skipped steps do not fail the run).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STEP_ORDER = ("synth", "vision", "decode", "describe-bundle", "engine", "describe-torch", "gptq",
              "ref-bundle", "ref-torch", "ref-gptq")  # fmt: skip
# Rough wall-time estimates per shape (seconds), used only to skip what no longer fits the budget.
ESTIMATES = {
    "7b": {"synth": 330, "vision": 45, "decode": 45, "describe-bundle": 40, "engine": 60, "describe-torch": 60,
           "gptq": 180, "ref-bundle": 40, "ref-torch": 90, "ref-gptq": 120},
    "mid": {"synth": 40, "vision": 15, "decode": 10, "describe-bundle": 10, "engine": 15, "describe-torch": 20,
            "gptq": 30, "ref-bundle": 10, "ref-torch": 15, "ref-gptq": 30},
}  # fmt: skip
SETTINGS = {  # per device: timing repeats and token counts
    "cuda": {"repeats": 5, "new_tokens": 128, "describe_tokens": 128, "engine_tokens": 64, "ref_tokens": 16},
    # The CPU rehearsal keeps every step but few repeats and tokens (CI: 2 cores, well under 2 minutes).
    "cpu": {"repeats": 1, "new_tokens": 16, "describe_tokens": 32, "engine_tokens": 8, "ref_tokens": 8},
}
SYNTH_VERSION = 1  # bump when gpu_suite_synth writes something else
LLAMA_READY_ENV = "GPU_SUITE_LLAMA_READY"
NEEDS_LLAMA_CPP = frozenset({"decode", "describe-bundle", "engine", "ref-bundle"})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- workers ----------------------------------------------------------------------------------------


def _worker(step: str, ctx_file: Path, result_file: Path) -> int:
    sys.path.insert(0, str(HERE))
    ctx = json.loads(ctx_file.read_text())
    if step == "synth":
        import gpu_suite_synth

        paths = gpu_suite_synth.synthesize(
            ctx["shape"],
            Path(ctx["work"]),
            ctx["device"],
            ctx["seed"],
            log,
            before_llama_cpp=wait_for_llama_cpp,
        )
        rows = [{"what": f"synth: {k}", "path": ctx["device"], "value": v, "unit": "s", "note": ""}
                for k, v in paths.seconds.items()]  # fmt: skip
        rows += [
            {"what": f"size: {k}", "path": "", "value": v, "unit": "MB", "note": ""}
            for k, v in paths.sizes_mb.items()
        ]
        result = {"rows": rows, "metrics": {"seconds": paths.seconds, "sizes_mb": paths.sizes_mb}}
    else:
        import gpu_suite_steps

        result = gpu_suite_steps.STEPS[step](ctx)
    result_file.write_text(json.dumps(result, default=str))
    return 0


def wait_for_llama_cpp(timeout: float = 1800.0) -> None:
    """Block until gpu_suite.sh's background llama-cpp-python build has finished (no-op without one).

    The wrapper names a marker file in GPU_SUITE_LLAMA_READY and writes "ok" or "failed" into it when
    the build + install is over; a failed build is an error of whatever step needs llama.cpp."""
    marker = os.environ.get(LLAMA_READY_ENV)
    if not marker:
        return
    path, start = Path(marker), time.monotonic()
    while not path.is_file() or not path.read_text().strip():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"llama-cpp-python build not finished after {timeout:.0f} s")
        time.sleep(1.0)
    if path.read_text().strip() != "ok":
        raise RuntimeError(
            "the llama-cpp-python build failed (see .gpu-suite/install-llama-cpp-python-build.log)"
        )


def _pump(stream: Any, tail: deque, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line.rstrip())
        sys.stderr.write(f"{prefix}{line}")
    stream.close()


def run_worker(step: str, ctx: dict[str, Any], scratch: Path, timeout: float | None) -> dict[str, Any]:
    """Run one step in a fresh process; returns its result, or {"error": ...}."""
    ctx_file, result_file = scratch / f"{step}.ctx.json", scratch / f"{step}.result.json"
    ctx_file.write_text(json.dumps(ctx))
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step, "--ctx", str(ctx_file),
           "--result", str(result_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    tail: deque = deque(maxlen=25)
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail, f"  [{step}] "), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        return {"error": f"killed after {timeout:.0f} s (budget)"}
    reader.join(5)
    if code == 0 and result_file.is_file():
        return json.loads(result_file.read_text())
    lines = [t for t in tail if t.strip()]
    errors = [t for t in lines if "Error" in t or "error" in t]
    reason = (errors or lines or [f"exit status {code}"])[-1].strip()
    return {"error": f"exit {code}: {reason[:300]}"}


# ----- environment ---------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    for dist in (
        "torch",
        "transformers",
        "onnxruntime-gpu",
        "onnxruntime",
        "llama_cpp_python",
        "gptqmodel",
        "gguf",
    ):
        version = _version(dist)
        if version:
            env[dist] = version
    if device == "cuda" and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, check=False)
        env["gpu"] = done.stdout.strip().splitlines()[0] if done.stdout.strip() else done.stderr.strip()[:200]
    return env


# ----- table ---------------------------------------------------------------------------------------------


def render_table(report: dict[str, Any]) -> str:
    out = [f"gpu_suite: shape {report['shape']}, device {report['device']}"
           + (f" ({report['environment'].get('gpu')})" if report["environment"].get("gpu") else "")
           + f", {report['elapsed_s']:.0f} s"]  # fmt: skip
    out.append("")
    out.append(f"{'step':<18}{'status':<10}{'seconds':>9}  note")
    for item in report["installs"]:
        status = "ok" if item.get("ok") else "FAILED"
        out.append(
            f"{'install ' + item['step']:<18}{status:<10}{item.get('seconds', 0):>9.1f}  {item.get('note', '')}"
        )
    for name, step in report["steps"].items():
        note = step.get("error") or step.get("reason") or ""
        out.append(f"{name:<18}{step['status']:<10}{step.get('seconds', 0):>9.1f}  {note}")
    out.append("")
    out.append(f"{'measurement':<34}{'path':<52}{'value':>12} {'unit':<6} note")
    for row in report["rows"]:
        value = row["value"]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        out.append(f"{row['what']:<34}{row['path']:<52}{text:>12} {row['unit']:<6} {row['note']}")
    out.append("")
    out.append(f"{'check':<64}{'value':<28}{'tolerance':<30} ok")
    for check in report["checks"]:
        out.append(
            f"{check['name']:<64}{check['value']!s:<28}{check['tolerance']:<30} {'yes' if check['ok'] else 'NO'}"
        )
    out.append("")
    out.append(f"all steps that ran succeeded and all checks passed: {'yes' if report['ok'] else 'NO'}")
    return "\n".join(out)


# ----- driver ----------------------------------------------------------------------------------------------


def _read_installs(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    items = []
    for line in path.read_text().splitlines():
        try:
            items.append(json.loads(line))
        except ValueError:
            continue
    return items


def _stamp(args: argparse.Namespace) -> dict[str, Any]:
    return {"shape": args.shape, "seed": args.seed, "device": args.device, "version": SYNTH_VERSION}


def _synth_cached(work: Path, stamp: dict[str, Any]) -> bool:
    path = work / "synth.json"
    try:
        return json.loads(path.read_text()) == stamp and (work / "bundle" / "minigpt4.json").is_file()
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="Run every step on the CPU (the rehearsal).")
    parser.add_argument(
        "--shape", choices=["mid", "7b"], help="Model shape (default: 7b on a GPU, mid with --cpu)."
    )
    parser.add_argument("--steps", default=",".join(STEP_ORDER), help="Comma-separated steps to run.")
    parser.add_argument("--out", type=Path, help="Folder for gpu_suite.txt and gpu_suite.json.")
    parser.add_argument(
        "--work", type=Path, help="Work folder (synthesized model; default .gpu-suite/work-SHAPE-DEVICE)."
    )
    parser.add_argument("--budget-s", type=float, default=0.0, help="Wall-time budget in seconds (0 = none).")
    parser.add_argument("--install-log", type=Path, help="JSON lines of install timings (from gpu_suite.sh).")
    parser.add_argument(
        "--fresh", action="store_true", help="Synthesize again even if the work folder has a model."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores).")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--gptq-kernel", default="auto")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.ctx, args.result)

    start = time.monotonic()
    args.device = "cpu" if args.cpu else "cuda"
    args.shape = args.shape or ("mid" if args.cpu else "7b")
    if args.device == "cuda" and not shutil.which("nvidia-smi"):
        parser.error("no NVIDIA GPU here (nvidia-smi not found): use --cpu for the CPU rehearsal")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_ORDER]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEP_ORDER)}")
    work = (args.work or Path(".gpu-suite") / f"work-{args.shape}-{args.device}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "steps"
    scratch.mkdir(exist_ok=True)
    settings = dict(SETTINGS[args.device])
    if args.repeats:
        settings["repeats"] = args.repeats
    ctx: dict[str, Any] = {"device": args.device, "shape": args.shape, "seed": args.seed, "work": str(work),
                           "model_dir": str(work / "model"), "bundle": str(work / "bundle"), "threads": args.threads,
                           "gptq_kernel": args.gptq_kernel, "outputs": {}, **settings}  # fmt: skip
    stamp = _stamp(args)
    need_model = any(s != "synth" for s in steps)
    if "synth" not in steps and need_model:  # reused when cached (reported as such), else built
        steps.insert(0, "synth")
    ordered = [s for s in STEP_ORDER if s in steps]

    report: dict[str, Any] = {"suite": "gpu_suite", "shape": args.shape, "device": args.device,
                              "budget_s": args.budget_s, "environment": environment(args.device),
                              "installs": [], "steps": {}, "rows": [],
                              "checks": [], "metrics": {}, "settings": settings}  # fmt: skip
    # Device outputs (greedy ids) of earlier runs on the same synthesized model, so that a second call
    # can run the ref-* steps alone; dropped whenever the model is (re)built.
    outputs_file = work / "outputs.json"
    if "synth" in ordered and not args.fresh and _synth_cached(work, stamp) and outputs_file.is_file():
        ctx["outputs"] = json.loads(outputs_file.read_text())
    synth_failed = False
    for step in ordered:
        elapsed = time.monotonic() - start
        remaining = args.budget_s - elapsed if args.budget_s else None
        estimate = ESTIMATES[args.shape][step]
        if step == "synth" and not args.fresh and _synth_cached(work, stamp):
            report["steps"][step] = {"status": "cached", "seconds": 0.0, "reason": f"reused {work}"}
            log(f"== synth: reusing {work}")
            continue
        if synth_failed:
            report["steps"][step] = {"status": "skipped", "seconds": 0.0, "reason": "no model (synth failed)"}
            continue
        if remaining is not None and remaining < estimate:
            report["steps"][step] = {"status": "skipped", "seconds": 0.0,
                                     "reason": f"budget: {remaining:.0f} s left, step needs ~{estimate} s"}  # fmt: skip
            log(f"== {step}: skipped ({remaining:.0f} s left of the budget, needs ~{estimate} s)")
            continue
        log(f"== {step} (at {elapsed:.0f} s)")
        tick = time.monotonic()
        if step in NEEDS_LLAMA_CPP and os.environ.get(LLAMA_READY_ENV):
            try:
                wait_for_llama_cpp(remaining or 1800.0)
            except RuntimeError as exc:
                report["steps"][step] = {"status": "error", "seconds": 0.0, "error": str(exc)}
                continue
        if step == "synth":
            (work / "synth.json").unlink(missing_ok=True)
            outputs_file.unlink(missing_ok=True)
        result = run_worker(step, ctx, scratch, remaining)
        seconds = round(time.monotonic() - tick, 1)
        if "error" in result:
            report["steps"][step] = {"status": "error", "seconds": seconds, "error": result["error"]}
            log(f"== {step}: ERROR after {seconds} s: {result['error']}")
            synth_failed = step == "synth"
            continue
        if step == "synth":
            (work / "synth.json").write_text(json.dumps(stamp))
        report["steps"][step] = {"status": "ok", "seconds": seconds}
        for row in result.get("rows", []):
            report["rows"].append({**row, "step": step})
        report["checks"].extend({**c, "step": step} for c in result.get("checks", []))
        report["metrics"][step] = result.get("metrics", {})
        ctx["outputs"].update(result.get("outputs", {}))
        outputs_file.write_text(json.dumps(ctx["outputs"]))
        log(f"== {step}: ok in {seconds} s")

    report["installs"] = _read_installs(args.install_log)  # at the end: a background build logs late
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    ran = [s for s in report["steps"].values() if s["status"] not in ("skipped", "cached")]
    report["ok"] = all(s["status"] == "ok" for s in ran) and all(c["ok"] for c in report["checks"])
    table = render_table(report)
    line = json.dumps(report, separators=(",", ":"), default=str)
    print(table)
    print(line)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_suite.txt").write_text(table + "\n")
        (args.out / "gpu_suite.json").write_text(line + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
