"""Tiny end-to-end training runs on CPU: loss goes down, only the chosen parameters change, exports load,
the feature cache trains the same model, kill-and-resume equals an uninterrupted run, and 2 DDP processes
(gloo) equal 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from minigpt4_local.checkpoints.minigpt4_proj import load_projection
from minigpt4_local.checkpoints.model_dir import load_model_dir
from minigpt4_local.config import CLIP_MEAN, CLIP_STD
from minigpt4_local.errors import CheckpointError, ConfigError
from minigpt4_local.image import preprocess
from minigpt4_local.tokenizer import load_tokenizer
from minigpt4_local.train.config import load_train_config
from minigpt4_local.train.distributed import setup
from minigpt4_local.train.layout import LayoutSpec
from minigpt4_local.train.trainer import StepModule, Trainer, _reset_projection, logged_losses, prepare_batch
from tests.support.train_data import (
    CAPTIONS,
    COLORS,
    make_tiny_model_dir,
    tiny_config,
    toy_image,
    write_cc_sbu_align,
    write_wds_shards,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_wds_shards(root / "wds", shards=4, per_shard=12, corrupt={"00100003"})
    write_cc_sbu_align(root / "cc", 16, corrupt=[5])
    return root


@pytest.fixture(scope="module")
def model_dir(work: Path) -> Path:
    return make_tiny_model_dir(work)


def shards(work: Path) -> str:
    return f"{work}/wds/shard-{{000..003}}.tar"


def train(config: dict, resume: str | None = None) -> Trainer:
    trainer = Trainer(load_train_config(config), setup("cpu"), echo=lambda _m: None)
    trainer.result = trainer.run(resume)
    return trainer


def eval_loss(
    model,
    model_dir: Path,
    captions_by_color: dict[str, str],
    template: str = "",
    instruction: str | None = None,
    end_sym: str = "\n",
) -> float:
    """Mean token loss of the toy captions on fresh images (not in the training data)."""
    tok = load_tokenizer(model_dir / "llm")
    spec = LayoutSpec(
        bos_id=1,
        pad_id=0,
        num_image_tokens=model.config.num_image_tokens,
        end_sym=end_sym,
        max_txt_len=160,
        template=template,
        max_length=400,
    )
    images = [toy_image(c, 999_000 + i) for i, c in enumerate(COLORS)]
    pixels = torch.from_numpy(preprocess(images, 56, CLIP_MEAN, CLIP_STD))
    batch = {"pixels": pixels, "features": None, "turns": [[(None, captions_by_color[c])] for c in COLORS]}
    prepared = prepare_batch(batch, instruction, tok, spec, torch.device("cpu"))
    with torch.no_grad():
        loss_sum, count = StepModule(model, [], False, None)(
            prepared.pixels, None, prepared.ids, prepared.labels, prepared.attention
        )
    return float(loss_sum) / int(count)


STAGE1_CAPTIONS = {c: t.lower().replace(".", "").replace("!", "").strip() for c, t in CAPTIONS.items()}


# ----- stage 1 ---------------------------------------------------------------------------------------------


def test_stage1_tiny_run_learns_and_freezes_everything_else(work: Path, model_dir: Path) -> None:
    out = work / "s1"
    cfg = tiny_config(
        1,
        model_dir,
        shards(work),
        out,
        optim={"iters_per_epoch": 15, "epochs": 2, "init_lr": 0.1, "min_lr": 0.01, "warmup_lr": 0.01},
    )
    trainer = train(cfg)
    losses = trainer.result.losses
    assert len(losses) == 30 and logged_losses(out) == pytest.approx(losses, abs=0, rel=0)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)

    source = load_model_dir(model_dir)
    initial = load_model_dir(model_dir)
    _reset_projection(initial, 42)  # stage 1 starts from a fresh projection drawn with the run's seed
    before = eval_loss(initial, model_dir, STAGE1_CAPTIONS)
    after = eval_loss(trainer.model, model_dir, STAGE1_CAPTIONS)
    assert after < before - 1.0, (before, after)

    # Only llama_proj trained; every other tensor is bit-identical to the model directory.
    trained = dict(trainer.model.named_parameters())
    assert trainer.names == ["llama_proj.weight", "llama_proj.bias"]
    for name, param in source.named_parameters():
        if name.startswith("llama_proj."):
            assert not torch.equal(param, trained[name])
        else:
            assert torch.equal(param, trained[name]), name
    assert trainer.result.skipped.get("image", 0) >= 1  # the corrupt sample was met and counted

    # Exports: the original's checkpoint layout and a loadable model directory.
    ckpt = torch.load(out / "checkpoint_1.pth", weights_only=True)
    assert set(ckpt["model"]) == {"llama_proj.weight", "llama_proj.bias"} and ckpt["epoch"] == 1
    proj = load_projection(out / "checkpoint_1.pth", 32, 64)
    assert torch.equal(proj["llama_proj.weight"], trained["llama_proj.weight"].detach())
    assert (out / "checkpoint_0.pth").is_file() and (out / "checkpoint_last.pth").is_file()
    exported = load_model_dir(out / "model")
    for name, param in exported.state_dict().items():
        assert torch.equal(param, trainer.model.state_dict()[name]), name
    from minigpt4_local.loader import LoadOptions, load_pipeline

    pipeline = load_pipeline(out / "model", LoadOptions(device="cpu"))  # what `minigpt4 describe` loads
    answer = pipeline.describe(
        toy_image("red", 1), "What is it?", pipeline.sampling(greedy=True, max_new_tokens=3)
    )
    assert len(answer.token_ids) <= 3


def test_trainable_qformer_changes_only_the_qformer(work: Path, model_dir: Path) -> None:
    out = work / "qf"
    cfg = tiny_config(
        1,
        model_dir,
        shards(work),
        out,
        model={"trainable": ["qformer"], "init_projection": "model"},
        optim={"iters_per_epoch": 3, "init_lr": 0.01, "min_lr": 0.001},
    )
    trainer = train(cfg)
    source = load_model_dir(model_dir)
    trained = dict(trainer.model.named_parameters())
    changed = {n for n, p in source.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and all(n.startswith(("qformer.", "query_tokens")) for n in changed)
    assert "query_tokens" in changed
    assert (
        trainer.model.qformer.training
        and not trainer.model.vision_model.training
        and not trainer.model.llm.training
    )
    exported = load_model_dir(out / "model")
    assert torch.equal(exported.query_tokens, trained["query_tokens"].detach())
    with pytest.raises(ConfigError, match="frozen vision side"):
        train(
            {
                **cfg,
                "output": {"dir": str(work / "qf2"), "cache_features": str(work / "c"), "progress": False},
            }
        )


def test_feature_cache_trains_the_same_projection(work: Path, model_dir: Path) -> None:
    clean = f"{work}/clean/shard-{{000..003}}.tar"
    write_wds_shards(work / "clean", shards=4, per_shard=6)  # no corrupt record: the streams are identical
    opts = {"iters_per_epoch": 6}
    no_export = {"export_model_dir": False, "progress": False}
    plain = train(tiny_config(1, model_dir, clean, work / "nocache", optim=opts, output=no_export))
    cache = work / "cache"
    cached_cfg = tiny_config(
        1, model_dir, clean, work / "cached", optim=opts, output={"cache_features": str(cache), **no_export}
    )
    cached = train(cached_cfg)
    files = sorted((cache / "toy").glob("*.safetensors"))
    assert len(files) == 4 and (cache / "cache.json").is_file()
    for a, b in zip(plain.trainable, cached.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).detach().abs().max())
    assert cached.result.losses == pytest.approx(plain.result.losses, abs=1e-5)
    # A second run reuses the cache files untouched.
    stamps = [f.stat().st_mtime_ns for f in files]
    train({**cached_cfg, "output": {"dir": str(work / "cached2"), "cache_features": str(cache), **no_export}})
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # Another model's features are refused.
    other = make_tiny_model_dir(work, seed=1)
    with pytest.raises(ConfigError, match="other vision weights"):
        train(tiny_config(1, other, clean, work / "cached3", output={"cache_features": str(cache)}))


def test_refuses_to_overwrite_a_run(work: Path, model_dir: Path) -> None:
    out = work / "once"
    cfg = tiny_config(
        1, model_dir, shards(work), out, optim={"iters_per_epoch": 1}, output={"export_model_dir": False}
    )
    train(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    with pytest.raises(CheckpointError, match="no training state"):
        train({**cfg, "output": {"dir": str(work / "fresh")}}, resume="latest")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_amp_precisions(work: Path, model_dir: Path, precision: str) -> None:
    out = work / f"amp-{precision}"
    cfg = tiny_config(
        1,
        model_dir,
        shards(work),
        out,
        optim={"iters_per_epoch": 2, "precision": precision},
        output={"export_model_dir": False},
    )
    trainer = train(cfg)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer.result.losses)
    assert trainer.model.llama_proj.weight.dtype == torch.float32  # fp32 master weights
    assert trainer.model.llm.model.embed_tokens.weight.dtype == half  # frozen decoder in half precision
    assert trainer.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == half  # the original's layout
    initial = load_model_dir(model_dir)
    _reset_projection(initial, 42)
    assert not torch.equal(initial.llama_proj.weight, trainer.model.llama_proj.weight)
    scaler = torch.load(out / "train_state.pt", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")  # GradScaler only for fp16


def test_full_llm_training_exports_the_decoder(work: Path, model_dir: Path) -> None:
    out = work / "llm"
    cfg = tiny_config(
        1,
        model_dir,
        shards(work),
        out,
        model={"trainable": ["llm"], "init_projection": "model"},
        optim={"iters_per_epoch": 2, "init_lr": 1e-3, "min_lr": 1e-4, "warmup_lr": 1e-4},
    )
    trainer = train(cfg)
    source = load_model_dir(model_dir)
    trained = dict(trainer.model.named_parameters())
    changed = {n for n, p in source.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and all(n.startswith("llm.") for n in changed)
    exported = load_model_dir(out / "model")
    for name, param in exported.state_dict().items():
        assert torch.equal(param, trainer.model.state_dict()[name]), name


# ----- stage 2 -----------------------------------------------------------------------------------------------


def test_stage2_tiny_run_on_cc_sbu_align(work: Path, model_dir: Path) -> None:
    out = work / "s2"
    cfg = tiny_config(
        2,
        model_dir,
        work / "cc",
        out,
        optim={"iters_per_epoch": 40, "init_lr": 0.1, "min_lr": 0.01, "warmup_lr": 0.01},
    )
    trainer = train(cfg)
    losses = trainer.result.losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.7, losses
    template = "###Human: {} ###Assistant: "
    instruction = "<Img><ImageHere></Img> Describe this image in detail."
    before = eval_loss(load_model_dir(model_dir), model_dir, CAPTIONS, template, instruction, "###")
    after = eval_loss(trainer.model, model_dir, CAPTIONS, template, instruction, "###")
    assert after < before - 1.0, (before, after)
    assert trainer.result.skipped.get("image", 0) >= 1  # image/5.jpg is corrupt
    source = load_model_dir(model_dir)
    trained = dict(trainer.model.named_parameters())
    assert all(
        torch.equal(p, trained[n]) for n, p in source.named_parameters() if not n.startswith("llama_proj.")
    )


def test_gradient_accumulation_equals_the_big_batch(work: Path, model_dir: Path) -> None:
    folder = write_cc_sbu_align(work / "cc_accum", 16)

    def config(out: str, batch: int, accum: int) -> dict:
        return tiny_config(
            2,
            model_dir,
            folder,
            work / out,
            data={"batch_size": batch},
            optim={"iters_per_epoch": 4, "accum_steps": accum},
            output={"export_model_dir": False},
        )

    big = train(config("big", 4, 1))
    accumulated = train(config("accum", 2, 2))
    for a, b in zip(big.trainable, accumulated.trainable, strict=True):
        assert float((a - b).detach().abs().max()) < 1e-5
    assert accumulated.result.losses == pytest.approx(big.result.losses, abs=1e-5)


# ----- kill and resume ------------------------------------------------------------------------------------------

# The killed run trains in a subprocess, the uninterrupted and the resumed runs in this process (one torch
# thread, the module fixture above). The subprocess must pin the same thread count: torch's default (all
# cores) selects kernels that round differently on some CPUs (an Intel Xeon: ~7e-7 after six steps), and
# the assertion below is bit-exact because every setting that selects kernels is the same in both.
KILL_DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import minigpt4_local.train.trainer as trainer
    from minigpt4_local.train.config import load_train_config

    kill_at = int(sys.argv[2])
    original = trainer.save_train_state

    def save_then_die(path, state):
        original(path, state)
        if state["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.save_train_state = save_then_die
    trainer.run_training(load_train_config(json.loads(open(sys.argv[1]).read())), echo=lambda m: None)
    """
)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(work: Path, model_dir: Path) -> None:
    def config(out: str) -> dict:
        return tiny_config(
            1,
            model_dir,
            shards(work),
            work / out,
            optim={"iters_per_epoch": 10, "checkpoint_every": 3},
            output={"export_model_dir": False},
        )

    whole = train(config("whole"))
    path = work / "killed.json"
    path.write_text(json.dumps(config("killed")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, str(path), "6"], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(logged_losses(work / "killed")) == 6
    resumed = train(config("killed"), resume="latest")
    for a, b in zip(whole.trainable, resumed.trainable, strict=True):
        assert torch.equal(a, b), float((a - b).abs().max())
    assert logged_losses(work / "killed") == logged_losses(work / "whole")
    assert torch.load(work / "killed" / "train_state.pt", weights_only=True)["step"] == 10


# ----- DDP ------------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, config: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from minigpt4_local.train.trainer import run_training

    result = run_training(load_train_config(config), echo=lambda _m: None)
    if rank == 0:
        queue.put(result.losses)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(work: Path, model_dir: Path) -> None:
    import torch.multiprocessing as mp

    folder = write_cc_sbu_align(work / "cc16", 16)

    def config(out: str, batch: int) -> dict:
        return tiny_config(
            2,
            model_dir,
            folder,
            work / out,
            data={"batch_size": batch},
            optim={"iters_per_epoch": 6},
            output={"export_model_dir": False},
        )

    single = train(config("ddp1", 4))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), config("ddp2", 2), queue),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    losses = queue.get()
    state = torch.load(work / "ddp2" / "train_state.pt", weights_only=True)
    for name, param in zip(single.names, single.trainable, strict=True):
        diff = float((state["trainable"][name] - param.detach()).abs().max())
        assert diff < 1e-5, (name, diff)
    assert losses == pytest.approx(single.result.losses, abs=1e-5)
    assert len(state["rng"]) == 2 and len(state["data"]) == 2  # every rank's position, written by rank 0
