"""The bundle directory and its manifest (torch-free; hand-made files, no ONNX needed).

What is checked: the manifest a new bundle gets from a config; add_file/set_part/drop_part/save
round-trips; sha256 against hashlib; atomic saves; every refusal of `Bundle.open` (missing or broken
manifest, wrong format/version, missing/truncated/corrupted files, paths leaving the bundle, part
dims that disagree with the architecture, image settings that disagree) is a one-line ModelDirError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from minigpt4_local.bundle import BUNDLE_FORMAT, MANIFEST_NAME, Bundle, is_bundle, sha256_file
from minigpt4_local.config import get_preset
from minigpt4_local.errors import ModelDirError


def _vision_part(config, **overrides) -> dict:
    size, n_img, hidden = config.vision.image_size, config.num_image_tokens, config.llm.hidden_size
    part = {
        "file": "vision.onnx",
        "precision": "fp32",
        "inputs": [{"name": "pixel_values", "shape": ["batch", 3, size, size], "dtype": "float32"}],
        "outputs": [{"name": "image_embeds", "shape": ["batch", n_img, hidden], "dtype": "float32"}],
        "image_size": size,
        "n_img": n_img,
        "hidden": hidden,
    }
    part.update(overrides)
    return part


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """A saved bundle: vision.onnx (fake bytes), a tokenizer dir, a directory-shaped llm part."""
    config = get_preset("tiny-vicuna-7b")
    root = tmp_path / "bundle"
    bundle = Bundle.create(root, config)
    root.mkdir()
    (root / "vision.onnx").write_bytes(os.urandom(5000))
    (root / "llm-gptq").mkdir()
    (root / "llm-gptq" / "model.safetensors").write_bytes(b"w" * 3000)
    (root / "llm-gptq" / "sub").mkdir()
    (root / "llm-gptq" / "sub" / "config.json").write_text("{}")
    bundle.add_file("vision.onnx", role="vision")
    bundle.set_part("vision", _vision_part(config))
    added = bundle.add_file("llm-gptq", role="llm")
    assert added == ["llm-gptq/model.safetensors", "llm-gptq/sub/config.json"]
    bundle.set_part("llm", {"dir": "llm-gptq", "format": "gptq", "hidden": 64, "vocab_size": 1001})
    bundle.save()
    return root


def _edit(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    edit(manifest)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


def _refused(root: Path, pattern: str, verify: bool = True) -> str:
    with pytest.raises(ModelDirError, match=pattern) as info:
        Bundle.open(root, verify=verify)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_new_manifest_describes_the_model(tmp_path: Path) -> None:
    config = get_preset("tiny-llama2-7b")
    bundle = Bundle.create(tmp_path / "b", config)
    assert not (tmp_path / "b").exists(), "create writes nothing before save()"
    path = bundle.save()
    manifest = json.loads(path.read_text())
    assert manifest["format"] == BUNDLE_FORMAT and manifest["version"] == 1
    assert manifest["name"] == "tiny-llama2-7b"
    assert manifest["architecture"] == config.to_dict()
    assert manifest["image"] == {
        "size": 56,
        "mean": list(config.vision.image_mean),
        "std": list(config.vision.image_std),
        "resample": "bicubic",
    }
    assert manifest["prompt"]["template"] == "llama2"
    assert manifest["prompt"]["max_context"] == config.prompt.max_context
    assert manifest["generation"]["max_new_tokens"] == config.generation.max_new_tokens
    assert manifest["files"] == {} and manifest["parts"] == {}
    reopened = Bundle.open(tmp_path / "b")
    assert reopened.config.to_dict() == config.to_dict()
    assert reopened.image_size == 56 and reopened.image_std == config.vision.image_std
    assert is_bundle(tmp_path / "b") and not is_bundle(tmp_path)


def test_files_are_hashed_and_parts_listed(made: Path) -> None:
    bundle = Bundle.open(made)
    entry = bundle.files()["vision.onnx"]
    assert entry["sha256"] == hashlib.sha256((made / "vision.onnx").read_bytes()).hexdigest()
    assert entry["bytes"] == 5000 and entry["role"] == "vision"
    assert sha256_file(made / "vision.onnx") == entry["sha256"]
    assert bundle.part("vision")["files"] == ["vision.onnx"]
    assert bundle.part("llm")["files"] == ["llm-gptq/model.safetensors", "llm-gptq/sub/config.json"]
    assert set(bundle.files(role="llm")) == {"llm-gptq/model.safetensors", "llm-gptq/sub/config.json"}
    assert bundle.part_path("llm") == made / "llm-gptq"
    with pytest.raises(ModelDirError, match="has no tokenizer part"):
        bundle.part("tokenizer")


def test_save_is_atomic_and_readable(made: Path) -> None:
    bundle = Bundle.open(made)
    bundle.manifest["name"] = "renamed"
    bundle.save()
    assert [p.name for p in made.iterdir() if p.name.startswith(f".{MANIFEST_NAME}")] == []
    assert (made / MANIFEST_NAME).stat().st_mode & 0o044 == 0o044
    assert Bundle.open(made).name == "renamed"


def test_drop_part_removes_its_files(made: Path) -> None:
    bundle = Bundle.open(made)
    bundle.drop_part("llm")
    bundle.save()
    assert not (made / "llm-gptq" / "model.safetensors").exists()
    reopened = Bundle.open(made)
    assert not reopened.has_part("llm") and not reopened.files(role="llm")
    assert reopened.has_part("vision")


def test_create_reopens_same_model_and_refuses_another(made: Path) -> None:
    again = Bundle.create(made, get_preset("tiny-vicuna-7b"))
    assert again.has_part("vision") and again.has_part("llm")
    with pytest.raises(ModelDirError, match="holds a different model"):
        Bundle.create(made, get_preset("tiny-llama2-7b"))
    fresh = Bundle.create(made, get_preset("tiny-llama2-7b"), overwrite=True)
    assert fresh.manifest["parts"] == {} and not (made / "vision.onnx").exists()


def test_create_refuses_unrelated_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ModelDirError, match="is not empty and is not a bundle"):
        Bundle.create(tmp_path / "photos", get_preset("tiny-vicuna-7b"))
    (tmp_path / "empty").mkdir()
    assert Bundle.create(tmp_path / "empty", get_preset("tiny-vicuna-7b")).manifest["parts"] == {}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="not a directory"):
        Bundle.create(tmp_path / "file", get_preset("tiny-vicuna-7b"))


def test_missing_or_broken_manifest(tmp_path: Path, made: Path) -> None:
    _refused(tmp_path / "nowhere", "bundle not found")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", f"{MANIFEST_NAME} is missing")
    (made / MANIFEST_NAME).write_text("{not json")
    _refused(made, "not valid JSON")
    (made / MANIFEST_NAME).write_text("[1, 2]")
    _refused(made, "must hold a JSON object")


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda m: m.update(format="something/else"), "format is 'something/else'"),
        (lambda m: m.update(version=2), "version 2; this release reads 1"),
        (lambda m: m.pop("files"), "key 'files' is missing"),
        (lambda m: m["architecture"]["llm"].update(num_heads=5), "architecture: llm.num_heads"),
        (lambda m: m["image"].update(size=224), "image size 224 != architecture vision.image_size 56"),
        (lambda m: m["image"].update(mean=[0.5, 0.5, 0.5]), "image mean"),
        (lambda m: m["files"]["vision.onnx"].pop("sha256"), "needs sha256, bytes and role"),
        (lambda m: m["files"].update({"../outside": m["files"]["vision.onnx"]}), "points outside the bundle"),
        (
            lambda m: m["files"].update({"/etc/passwd": m["files"]["vision.onnx"]}),
            "points outside the bundle",
        ),
        (lambda m: m["parts"]["vision"].update(file="other.onnx"), "file other.onnx is not listed"),
    ],
    ids=[
        "format",
        "version",
        "no-files",
        "bad-arch",
        "image-size",
        "image-mean",
        "entry",
        "dotdot",
        "abs",
        "part",
    ],
)
def test_malformed_manifest_is_refused(made: Path, edit, pattern: str) -> None:
    _edit(made, edit)
    _refused(made, pattern, verify=False)


@pytest.mark.parametrize(
    ("part", "key", "value", "pattern"),
    [
        ("vision", "hidden", 128, "vision hidden 128 != architecture llm.hidden_size 64"),
        ("vision", "n_img", 32, "vision n_img 32 != the architecture's image tokens per image 4"),
        ("vision", "image_size", 224, "vision image_size 224 != architecture vision.image_size 56"),
        ("llm", "hidden", 4096, "llm hidden 4096 != architecture llm.hidden_size 64"),
        ("llm", "vocab_size", 32001, "llm vocab_size 32001 != architecture llm.vocab_size 1001"),
    ],
)
def test_part_dims_must_match_architecture(made: Path, part: str, key: str, value: int, pattern: str) -> None:
    _edit(made, lambda m: m["parts"][part].update({key: value}))
    _refused(made, pattern, verify=False)


def test_missing_truncated_and_corrupted_files(made: Path) -> None:
    graph = made / "vision.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:-1])
    _refused(made, r"vision\.onnx is truncated or changed \(4999 bytes, manifest says 5000\)", verify=False)
    graph.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    _refused(made, r"vision\.onnx fails its sha256 check")
    Bundle.open(made, verify=False)  # checksums skipped on request: sizes still match
    (made / "llm-gptq" / "sub" / "config.json").unlink()
    _refused(made, r"llm-gptq/sub/config\.json is missing", verify=False)


def test_add_file_refuses_paths_outside_or_missing(made: Path) -> None:
    bundle = Bundle.open(made)
    with pytest.raises(ModelDirError, match="points outside the bundle"):
        bundle.add_file("../x", role="other")
    with pytest.raises(ModelDirError, match="no such file"):
        bundle.add_file("nothing.bin", role="other")
    with pytest.raises(ModelDirError, match="is not listed"):
        bundle.set_part("extra", {"file": "vision.onnx"}, files=["unlisted.bin"])


def test_bundle_module_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, minigpt4_local.bundle; print(any(m.split('.')[0] == 'torch' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
