"""HF LLaMA -> GGUF conversion and llama.cpp quantization, checked against the torch model.

Tiny random LLaMA (hidden 256, FFN 512, 2 layers, 4 heads of 64, 2 KV heads, vocab 1000: every row
length is a multiple of 256, so llama.cpp's k-quants apply). Weights are drawn wider than HF's default
init (std 0.08) so logits are peaked and greedy decoding has no near-ties.
Measured on the dev machine: f32 GGUF vs torch max |Δlogit| ≈ 1e-5 with an f32 KV cache (asserted
< 1e-4), ≈ 7e-3 with llama.cpp's default f16 KV cache; f16 ≈ 1e-3; bf16 ≈ 7e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import gguf  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from minigpt4_local.backends.gguf_file import scan_gguf  # noqa: E402
from minigpt4_local.backends.llamacpp import LlamaCppDecoder  # noqa: E402
from minigpt4_local.errors import CheckpointError, ConfigError, ModelDirError, TokenizerError  # noqa: E402
from minigpt4_local.prompts import StopChecker  # noqa: E402
from minigpt4_local.quantize.gguf_convert import convert_hf_llama_to_gguf, hf_to_llamacpp_rows  # noqa: E402
from minigpt4_local.quantize.gguf_eval import (  # noqa: E402
    agreement,
    gguf_perplexity,
    llamacpp_greedy,
    top1_agreement,
    torch_greedy,
    torch_perplexity,
)
from minigpt4_local.quantize.gguf_quantize import load_imatrix, quantize_gguf  # noqa: E402
from minigpt4_local.quantize.safetensors_np import SafetensorsIndex  # noqa: E402
from minigpt4_local.sampling import SamplingOptions  # noqa: E402
from tests.support.tiny_tokenizer import make_tiny_bpe_tokenizer_json, make_tiny_sentencepiece  # noqa: E402

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.08,
    tie_word_embeddings=False,
)
ONE = dict(n_threads=1)  # one llama.cpp thread: spinning workers crawl on a busy 2-core CI runner
EXACT = dict(kv_type="f32", flash_attn=False, **ONE)  # keeps llama.cpp's whole forward in fp32


def _save_llama(out, vocab_size=1000, seed=0, dtype=None, shard=False, **overrides):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, **{**TINY, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    if dtype is not None:  # parameters only: casting buffers would also round the RoPE frequencies
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.save_pretrained(out, **({"max_shard_size": "1MB"} if shard else {}))
    for p in model.parameters():
        p.data = p.data.float()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(llm_dir, torch model, {out_type: gguf path})."""
    root = tmp_path_factory.mktemp("tiny_llama")
    llm_dir = root / "llm"
    model = _save_llama(llm_dir)
    make_tiny_sentencepiece(llm_dir, vocab_size=1000)
    paths = {
        t: convert_hf_llama_to_gguf(llm_dir, root / f"tiny-{t}.gguf", t).path for t in ("f32", "f16", "bf16")
    }
    return llm_dir, model, paths


def _stitched(model, rng):
    """A text + image-rows + text sequence: (parts for llama.cpp, (T, hidden) embeddings for torch)."""
    head, tail = [1, 45, 300, 12, 9], [999, 5, 77, 123, 600, 31]
    image = rng.normal(0, 0.08, size=(24, 256)).astype(np.float32)  # same scale as token embeddings
    table = model.get_input_embeddings().weight.detach().numpy()
    embeds = np.concatenate([table[head], image, table[tail]])
    return [head, image, tail], embeds


def _torch_logits(model, embeds):
    with torch.inference_mode():
        return model(inputs_embeds=torch.from_numpy(embeds)[None]).logits[0].numpy()


# ----- metadata ---------------------------------------------------------------------------------


def test_metadata_and_tokenizer_tables(tiny):
    _, _, paths = tiny
    reader = gguf.GGUFReader(paths["f16"])
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "llama"
    assert field["llama.context_length"] == 512
    assert field["llama.embedding_length"] == 256
    assert field["llama.block_count"] == 2
    assert field["llama.feed_forward_length"] == 512
    assert field["llama.attention.head_count"] == 4
    assert field["llama.attention.head_count_kv"] == 2
    assert field["llama.rope.dimension_count"] == 64
    assert field["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert field["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert field["tokenizer.ggml.model"] == "llama"
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert field["tokenizer.ggml.unknown_token_id"] == 0
    assert field["tokenizer.ggml.add_bos_token"] is True
    tokens = field["tokenizer.ggml.tokens"]
    types = field["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 1000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE
    # 1-D norms stay f32 in an f16 file; 2-D weights are f16
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == "F16"
    assert len(kinds) == 2 * 9 + 3


def test_qk_permutation_is_interleave_of_halves():
    # head dim 4: HF rows per head [r0, r1, i0, i1] -> llama.cpp [r0, i0, r1, i1]
    w = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)  # 2 heads x 4 rows
    out = hf_to_llamacpp_rows(w, n_head=2)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ----- numerics vs torch ------------------------------------------------------------------------


def test_f32_stitched_logits_match_torch(tiny):
    _, model, paths = tiny
    parts, embeds = _stitched(model, np.random.default_rng(0))
    ref = _torch_logits(model, embeds)
    with LlamaCppDecoder(paths["f32"], n_ctx=128, n_batch=16, **EXACT) as dec:
        got = dec.prefill(parts, all_logits=True)  # chunks of 16 split every part
    exact = float(np.abs(got - ref).max())
    with LlamaCppDecoder(paths["f32"], n_ctx=128, **ONE) as dec:
        default_kv = float(np.abs(dec.prefill(parts, all_logits=True) - ref).max())
    print(f"\nf32 GGUF vs torch, stitched {len(ref)} positions: max|Δlogit| {exact:.2e} (f32 KV), "
          f"{default_kv:.2e} (default f16 KV); logit scale {np.abs(ref).max():.2f}")  # fmt: skip
    assert got.shape == ref.shape
    assert exact < 1e-4
    assert default_kv < 3e-2


@pytest.mark.parametrize("out_type,dtype,tol", [("f16", "float16", 2e-2), ("bf16", "bfloat16", 0.15)])
def test_half_precision_weights_and_logits(tiny, out_type, dtype, tol):
    _, model, paths = tiny
    reader = gguf.GGUFReader(paths[out_type])
    stored = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    # Stored weights are exactly torch's own rounding of the fp32 weights (q rows permuted).
    for gguf_name, hf_name, heads in (
        ("token_embd.weight", "model.embed_tokens.weight", 0),
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 4),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", 0),
    ):
        expected = state[hf_name].to(getattr(torch, dtype)).float().numpy()
        expected = hf_to_llamacpp_rows(expected, heads) if heads else expected
        t = stored[gguf_name]
        np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), expected)
    # Logits: what remains is llama.cpp rounding activations to the weight type (measured 9e-3 / 9e-2).
    parts, embeds = _stitched(model, np.random.default_rng(1))
    ref = _torch_logits(model, embeds)
    with LlamaCppDecoder(paths[out_type], n_ctx=128, **EXACT) as dec:
        diff = float(np.abs(dec.prefill(parts, all_logits=True) - ref).max())
    print(f"\n{out_type} GGUF vs fp32 torch: max|Δlogit| {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff < tol


def test_f32_greedy_tokens_identical_to_torch(tiny):
    _, model, paths = tiny
    parts, embeds = _stitched(model, np.random.default_rng(2))
    reference = torch_greedy(model, embeds, 24)
    with LlamaCppDecoder(paths["f32"], n_ctx=128, **EXACT) as dec:
        got = llamacpp_greedy(dec, parts, 24)
    assert got == reference


def test_rope_base_of_the_checkpoint_is_written_and_used(tmp_path):
    # SmolLM2 uses rope base 100000, Vicuna 10000: a converter that ignored the config (or hard-coded
    # 10000) would still pass every test above. The base is written, and llama.cpp's logits match torch
    # only with the right one (with 10000 they are off by far more than the tolerance at later positions).
    llm_dir = tmp_path / "llm"
    model = _save_llama(llm_dir, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    make_tiny_sentencepiece(llm_dir, vocab_size=1000)
    path = convert_hf_llama_to_gguf(llm_dir, tmp_path / "rope.gguf", "f32").path
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["llama.rope.freq_base"] == pytest.approx(100000.0)
    parts, embeds = _stitched(model, np.random.default_rng(3))
    ref = _torch_logits(model, embeds)
    with LlamaCppDecoder(path, n_ctx=128, **EXACT) as dec:
        assert float(np.abs(dec.prefill(parts, all_logits=True) - ref).max()) < 1e-4


def test_decode_loop_stop_rules_on_a_tiny_gguf(tiny):
    # The decode loop's stop rules, without the SmolLM2 package: a stop sequence ends the answer and is
    # stripped; EOS ends it (and is stripped) only when stop_on_eos; max_new_tokens caps it.
    _, _, paths = tiny
    head = [1, 45, 300, 12, 9]
    greedy = SamplingOptions(max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
    no_stop = StopChecker([], eos_id=None, stop_on_eos=False)
    with LlamaCppDecoder(paths["f32"], n_ctx=128, **EXACT) as dec:

        def run(stop: StopChecker, options: SamplingOptions = greedy) -> list[int]:
            dec.reset()
            dec.prefill([head])
            return dec.generate(options, stop)

        free = run(no_stop)
        assert len(free) == 24  # nothing stops it before the cap
        seq = free[3:5]
        first = next(i for i in range(1, len(free)) if free[i - 1 : i + 1] == seq)
        assert run(StopChecker([seq], eos_id=None, stop_on_eos=False)) == free[: first - 1]
        eos = free[6]
        cut = free.index(eos)
        assert run(StopChecker([], eos_id=eos, stop_on_eos=True)) == free[:cut]
        assert run(StopChecker([], eos_id=eos, stop_on_eos=False)) == free  # EOS rule switched off
        short = SamplingOptions(max_new_tokens=5, do_sample=False, repetition_penalty=1.0)
        assert run(no_stop, short) == free[:5]


def test_quantized_agreement_and_perplexity(tiny, tmp_path):
    _, model, paths = tiny
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 1000, size=300).tolist()
    ref_ppl = torch_perplexity(model, ids, window=128, bos_id=1)
    f32_ppl = gguf_perplexity(paths["f32"], ids, window=128, bos_id=1, **EXACT)
    assert f32_ppl.n_scored == ref_ppl.n_scored == 300
    assert f32_ppl.ppl == pytest.approx(ref_ppl.ppl, rel=1e-4)
    parts, embeds = _stitched(model, rng)
    reference = torch_greedy(model, embeds, 32)
    # Teacher forcing: the stitched prompt followed by torch's own greedy continuation.
    forced_parts = [*parts, reference]
    forced_ref = _torch_logits(
        model, np.concatenate([embeds, model.get_input_embeddings().weight.detach().numpy()[reference]])
    )
    lines = [f"torch ppl {ref_ppl.ppl:.3f}, f32 GGUF {f32_ppl.ppl:.3f}"]
    results = []
    # A random model has small logit margins: Q4 noise flips many argmaxes (chance level is 0.001).
    for qtype, min_top1, max_ppl_rel in (("Q8_0", 0.9, 0.01), ("Q4_K_M", 0.3, 0.02)):
        q = quantize_gguf(paths["f16"], tmp_path / f"{qtype}.gguf", qtype, n_threads=1)
        ppl = gguf_perplexity(q.path, ids, window=128, bos_id=1, **ONE)
        with LlamaCppDecoder(q.path, n_ctx=128, **ONE) as dec:
            free = agreement(reference, llamacpp_greedy(dec, parts, 32))
            dec.reset()
            top1 = top1_agreement(forced_ref, dec.prefill(forced_parts, all_logits=True))
        lines.append(f"{qtype}: {q.dst_bytes} B {q.tensor_types}: ppl {ppl.ppl:.3f} ({ppl.ppl / ref_ppl.ppl - 1:+.2%}), "
                     f"teacher-forced top-1 agreement {top1:.3f}, free greedy {free.rate:.2f} (prefix {free.prefix}/32)")  # fmt: skip
        results.append((qtype, ppl.ppl / ref_ppl.ppl - 1, top1, max_ppl_rel, min_top1))
    print("\n" + "\n".join(lines))
    for qtype, ppl_rel, top1, max_ppl_rel, min_top1 in results:
        assert abs(ppl_rel) < max_ppl_rel, qtype
        assert top1 >= min_top1, qtype


# ----- vocabularies -----------------------------------------------------------------------------


def test_vicuna_style_extra_row_and_wrong_config_ids(tmp_path):
    """32001-style: one embedding row more than tokenizer pieces; config.json says bos 0 / eos 1."""
    llm_dir = tmp_path / "llm"
    _save_llama(llm_dir, vocab_size=1001, bos_token_id=0, eos_token_id=1)
    make_tiny_sentencepiece(llm_dir, vocab_size=1000)
    result = convert_hf_llama_to_gguf(llm_dir, tmp_path / "v.gguf", "f32")
    assert result.n_vocab == 1001 and result.n_placeholder_tokens == 1
    assert result.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    reader = gguf.GGUFReader(result.path)
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 1001
    assert reader.fields["tokenizer.ggml.token_type"].contents()[1000] == gguf.TokenType.UNUSED
    with LlamaCppDecoder(result.path, n_ctx=64, **ONE) as dec:  # stock llama.cpp accepts it
        assert (dec.n_vocab, dec.bos_id, dec.eos_id) == (1001, 1, 2)
        assert dec.tokenize("hello", add_bos=True)[0] == 1
        assert dec.detokenize([1000]) == ""  # the placeholder never renders as text


def test_sentencepiece_tokenization_matches(tiny):
    from minigpt4_local.tokenizer import load_tokenizer

    llm_dir, _, paths = tiny
    sp = load_tokenizer(llm_dir)
    texts = [
        "Give the following image: <Img>ImageContent</Img>.",
        "###Human: 12345 dogs###Assistant: ",
        "  a\n\nb  ",
    ]
    with LlamaCppDecoder(paths["f16"], n_ctx=64, **ONE) as dec:
        for text in texts:
            ids = dec.tokenize(text, special=False)
            assert ids == sp.encode(text)
            assert dec.detokenize(ids) == text


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_bpe_tokenizer_json(tmp_path, pre):
    from minigpt4_local.tokenizer import load_tokenizer

    llm_dir = tmp_path / "llm"
    _save_llama(llm_dir, vocab_size=768, tie_word_embeddings=True)  # 600 BPE pieces + padding rows
    make_tiny_bpe_tokenizer_json(llm_dir)
    if pre == "smollm":  # SmolLM2's pre-tokenizer: every digit alone, then GPT-2's byte-level split
        data = json.loads((llm_dir / "tokenizer.json").read_text())
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, data["pre_tokenizer"]],
        }
        (llm_dir / "tokenizer.json").write_text(json.dumps(data))
    result = convert_hf_llama_to_gguf(llm_dir, tmp_path / "b.gguf", "f32")
    assert result.tokenizer_model == "gpt2" and result.n_placeholder_tokens == 168
    header = scan_gguf(result.path)
    assert header.metadata["tokenizer.ggml.pre"] == pre
    assert header.metadata["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in header.tensors  # tied: llama.cpp reuses token_embd
    hf = load_tokenizer(llm_dir)
    texts = ["<|im_start|>user\nWhat is in 2024 the dog 12345?<|im_end|>", "the photo shows a cat ###"]
    with LlamaCppDecoder(result.path, n_ctx=64, **ONE) as dec:
        assert dec.bos_id == hf.bos_id and dec.eos_id == hf.eos_id
        for text in texts:
            ids = dec.tokenize(text)
            assert ids == hf.encode(text)
            assert dec.detokenize(ids, special=True) == text


# ----- streaming input formats ------------------------------------------------------------------


def test_sharded_bf16_checkpoint(tmp_path):
    llm_dir = tmp_path / "llm"
    model = _save_llama(llm_dir, seed=5, dtype=torch.bfloat16, shard=True)
    make_tiny_sentencepiece(llm_dir, vocab_size=1000)
    assert (llm_dir / "model.safetensors.index.json").is_file()
    assert SafetensorsIndex(llm_dir).dtype("model.embed_tokens.weight") == "BF16"  # numpy has no bf16
    progress = []
    result = convert_hf_llama_to_gguf(
        llm_dir, tmp_path / "s.gguf", "f32", progress=lambda i, n, name: progress.append(i)
    )
    assert progress == list(range(1, result.n_tensors + 1))
    ref = _torch_logits(model, model.get_input_embeddings().weight.detach().numpy()[[1, 50, 60, 70]])
    with LlamaCppDecoder(result.path, n_ctx=32, **EXACT) as dec:
        assert np.abs(dec.prefill([[1, 50, 60, 70]], all_logits=True) - ref).max() < 1e-4


# ----- quantizer --------------------------------------------------------------------------------


def _write_imatrix(path, header, rng):
    writer = gguf.GGUFWriter(path, "llama")
    weights = {}
    for name, info in header.tensors.items():
        if len(info.shape) == 2:
            sums = rng.uniform(0.01, 1.0, size=info.shape[0]).astype(np.float32)
            sums[: info.shape[0] // 8] *= 1000  # a few columns matter much more
            writer.add_tensor(name + ".in_sum2", sums * 10)
            writer.add_tensor(name + ".counts", np.array([10.0], dtype=np.float32))
            weights[name] = sums
    writer.add_array("imatrix.datasets", ["synthetic"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def test_imatrix_lowers_weighted_error(tiny, tmp_path):
    _, _, paths = tiny
    weights = _write_imatrix(tmp_path / "imatrix.gguf", scan_gguf(paths["f32"]), np.random.default_rng(0))
    loaded = load_imatrix(tmp_path / "imatrix.gguf")
    np.testing.assert_allclose(loaded["blk.0.attn_q.weight"], weights["blk.0.attn_q.weight"], rtol=1e-6)
    plain = quantize_gguf(paths["f32"], tmp_path / "plain.gguf", "q4_k_m")
    with_im = quantize_gguf(paths["f32"], tmp_path / "im.gguf", "Q4_K_M", imatrix=tmp_path / "imatrix.gguf")
    assert with_im.imatrix_entries == len(weights) and plain.imatrix_entries == 0
    readers = {p: gguf.GGUFReader(p) for p in (paths["f32"], plain.path, with_im.path)}

    def tensor(path, name):
        t = next(t for t in readers[path].tensors if t.name == name)
        return gguf.quants.dequantize(t.data, t.tensor_type)

    name = "blk.0.attn_q.weight"
    ref = tensor(paths["f32"], name)
    err_plain = float(((tensor(plain.path, name) - ref) ** 2 * weights[name]).sum())
    err_im = float(((tensor(with_im.path, name) - ref) ** 2 * weights[name]).sum())
    print(
        f"\nQ4_K {name}: importance-weighted squared error {err_plain:.1f} without, {err_im:.1f} with imatrix"
    )
    assert err_im < err_plain


# ----- errors -----------------------------------------------------------------------------------


def test_errors_are_one_line(tiny, tmp_path):
    llm_dir, _, paths = tiny
    with pytest.raises(ConfigError, match="unknown GGUF output type"):
        convert_hf_llama_to_gguf(llm_dir, tmp_path / "x.gguf", "q4")
    with pytest.raises(ConfigError, match="unknown quantization type 'Q9_Z'"):
        quantize_gguf(paths["f16"], tmp_path / "x.gguf", "Q9_Z")
    no_tok = tmp_path / "no_tok"
    _save_llama(no_tok)
    with pytest.raises(TokenizerError, match=r"no tokenizer\.model or tokenizer\.json"):
        convert_hf_llama_to_gguf(no_tok, tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="not found"):
        convert_hf_llama_to_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(paths["f16"].read_bytes()[:200_000])
    for call in (
        lambda: quantize_gguf(truncated, tmp_path / "y.gguf", "Q8_0"),
        lambda: LlamaCppDecoder(truncated),
    ):
        with pytest.raises(ModelDirError, match="truncated") as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# ----- `minigpt4 quantize gguf` -----------------------------------------------------------------


def test_cli_builds_bundle_part(tmp_path):
    from click.testing import CliRunner

    from minigpt4_local.bundle import Bundle
    from minigpt4_local.checkpoints.model_dir import save_model_dir
    from minigpt4_local.config import get_preset
    from minigpt4_local.model import MiniGPT4
    from minigpt4_local.quantize.cli import quantize_group

    torch.manual_seed(0)
    model = MiniGPT4(get_preset("tiny-vicuna-7b")).eval()  # vocab 1001 rows for 1000 pieces, like Vicuna v0
    save_model_dir(model, make_tiny_sentencepiece(tmp_path / "tok", vocab_size=1000), tmp_path / "md")
    text = tmp_path / "eval.txt"
    text.write_text("The photo shows a dog on the beach near the water. " * 20)
    args = ["gguf", str(tmp_path / "md"), "--out", str(tmp_path / "bundle"), "--type", "q8_0", "--eval", str(text),
            "--eval-window", "64", "--agreement-tokens", "6", "--keep-f16", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(quantize_group, args)
    assert result.exit_code == 0, result.output
    part = json.loads(result.stdout.strip().splitlines()[-1])
    bundle = Bundle.open(tmp_path / "bundle", verify=True)  # sizes, hashes and dims all agree
    assert bundle.part("llm") == part
    assert (part["quant_type"], part["source_type"], part["file"]) == ("Q8_0", "f32", "llm.gguf")
    assert (part["hidden"], part["vocab_size"], part["num_layers"], part["n_ctx"]) == (64, 1001, 2, 400)
    assert (part["bos_id"], part["eos_id"], part["tokenizer_model"]) == (1, 2, "llama")
    assert part["files"] == ["llm-f32.gguf", "llm.gguf"] and bundle.has_part("tokenizer")
    quality = part["quality"]
    print(f"\nCLI Q8_0 quality: {quality}")
    assert quality["ppl"] == pytest.approx(quality["ppl_reference"], rel=0.01)
    assert [a["n"] for a in quality["greedy_agreement"]] == [6, 6]
    with LlamaCppDecoder(bundle.part_path("llm"), n_ctx=part["n_ctx"], **ONE) as dec:
        assert dec.n_vocab == 1001 and dec.n_ctx == 400
    # A second run replaces the part (and drops the kept reference file).
    again = CliRunner().invoke(
        quantize_group, ["gguf", str(tmp_path / "md"), "-o", str(tmp_path / "bundle"), "-t", "Q4_0"]
    )
    assert again.exit_code == 0, again.output
    assert Bundle.open(tmp_path / "bundle").part("llm")["files"] == ["llm.gguf"]
    assert not (tmp_path / "bundle" / "llm-f32.gguf").exists()
    bad = CliRunner().invoke(
        quantize_group, ["gguf", str(tmp_path / "md"), "-o", str(tmp_path / "b2"), "-t", "Q9"]
    )
    assert bad.exit_code == 2 and "Q9" in bad.output
