"""Verification of an exported vision graph against the torch model (numbers measured, never assumed).

Contract: torch fp32 (CPU) vs onnxruntime (CPUExecutionProvider) on `verification_pixels(n, ...)`: seeded
pseudo-random images in the normalised range. `verify_graph(path, pixels, ref, per_image_runs)` feeds them
as the runtime will (one batch; int8 one image per run, see `backends.onnx_vision.PRECISION_MAX_BATCH`)
and returns `compare_outputs`: max_abs, max_rel (= max_abs / max|ref|), per-image cosine (flattened
embeddings), minimum per-token cosine, plus the batch-vs-single consistency. `torch_reference(model,
pixels)` is the (N, n_img, hidden) fp32 embedding the graph must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .onnx_graph import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    from minigpt4_local.model import MiniGPT4


def verification_pixels(
    n: int, image_size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """(n, 3, S, S) float32: seeded pseudo-images in [0, 1] (smooth blobs + fine noise), normalised."""
    rng = np.random.default_rng(seed)
    cells = max(2, image_size // 14)
    coarse = rng.uniform(0.0, 1.0, (n, 3, cells, cells))
    reps = -(-image_size // cells)
    smooth = np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3)[:, :, :image_size, :image_size]
    raw = np.clip(smooth + rng.normal(0.0, 0.15, smooth.shape), 0.0, 1.0)
    mean_ = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std_ = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    return ((raw - mean_) / std_).astype(np.float32)


def compare_outputs(out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Error of `out` vs `ref`, both (B, n_img, hidden): abs, relative to max|ref|, cosines."""
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(out64 - ref64)
    ref_max = float(np.abs(ref64).max())
    flat_o, flat_r = out64.reshape(len(out64), -1), ref64.reshape(len(ref64), -1)
    image_cos = (flat_o * flat_r).sum(1) / (np.linalg.norm(flat_o, axis=1) * np.linalg.norm(flat_r, axis=1))
    token_cos = (out64 * ref64).sum(-1) / (np.linalg.norm(out64, axis=-1) * np.linalg.norm(ref64, axis=-1))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(diff.max() / ref_max) if ref_max else float(diff.max()),
        "ref_max_abs": ref_max,
        "mean_cosine": float(image_cos.mean()),
        "min_cosine": float(image_cos.min()),
        "min_token_cosine": float(token_cos.min()),
        "per_image": [
            {
                "max_abs": float(diff[i].max()),
                "max_rel": float(diff[i].max() / ref_max) if ref_max else float(diff[i].max()),
                "cosine": float(image_cos[i]),
            }
            for i in range(len(out64))
        ],
    }


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def verify_graph(
    path: Path, pixels: np.ndarray, ref: np.ndarray, per_image_runs: bool = False
) -> dict[str, Any]:
    """Run the graph on `pixels` in one batch and one image at a time; compare with `ref`.

    The recorded errors come from the way the runtime feeds this precision: one batch, or one image
    per run (`per_image_runs`, int8: its activation scale spans the whole batch).
    """
    import onnxruntime as ort

    session = _cpu_session(path)
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]  # (N, n_img, hidden)
    singles = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + 1]})[0] for i in range(len(pixels))]
    )
    if batched.shape != ref.shape:
        raise RuntimeError(f"exported graph returned {batched.shape}, torch {ref.shape}")
    result = {"runs": "one image per run" if per_image_runs else f"one batch of {len(pixels)}"}
    result.update(compare_outputs(singles if per_image_runs else batched, ref))
    result["batch_vs_single_max_abs"] = float(np.abs(batched - singles).max())
    result["runtime"] = f"onnxruntime {ort.__version__} CPUExecutionProvider"
    return result


def torch_reference(model: MiniGPT4, pixels: np.ndarray) -> np.ndarray:
    """The torch fp32 CPU embeddings the ONNX graph must reproduce: (N, n_img, hidden)."""
    import torch

    with torch.inference_mode():
        return model.encode_image(torch.from_numpy(pixels)).float().numpy()
