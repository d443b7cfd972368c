"""Checkpoints saved by transformers, untouched, compiled to sharded generation engines from transformers' own
modeling code (model=hf): the greedy tokens equal transformers' own generate, at every tp the heads allow."""
import functools
import json
from pathlib import Path

import pytest
import torch

import tpcompile
from tpcompile.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

V = 256
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=V - 1, pad_token_id=0)
# name -> (config class, overrides, tps): what each one exercises is in the comment; every one at tp 1, 2 and 4
# (4 heads, 2 kv heads: at tp=4 the kv heads are replicated)
ARCHS = {
    "llama3": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(  # llama3 rope, biases
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), (1, 2, 4)),
    "mistral": ("MistralConfig", dict(sliding_window=8, rope_parameters=dict(  # window < prompt + new, linear rope
        rope_type="linear", factor=2.0, rope_theta=10000.0)), (1, 2, 4)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, vocab_size=250), (1, 2, 4)),  # tied, 250 % 4 != 0
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters=dict(  # q/k norms, yarn rope
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0)), (1, 2, 4)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,  # alternating
                                    final_logit_softcapping=30.0, query_pre_attn_scalar=16), (1, 2, 4)),  # windows
    "phi3": ("Phi3Config", dict(eos_token_id=3), (1, 2, 4)),                   # fused qkv and gate_up
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25), (1, 2, 4)),             # partial rotary, parallel residual
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, vocab_size=250,  # Conv1D,
                                bos_token_id=1, eos_token_id=249), (1, 2, 4)),  # learned positions, tied, 250
    "olmo2": ("Olmo2Config", dict(), (1, 2, 4)),
    # beyond the nine the issue names, at tp=2
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, residual_multiplier=0.5,  # multipliers
                                      attention_multiplier=0.1, logits_scaling=4.0), (2,)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=8, use_bias=True), (2,)),  # LayerNorm, biases, window
    "cohere": ("CohereConfig", dict(logit_scale=0.5), (2,)),                  # parallel block, logit scale                                  # q/k norms over all heads
}
PROMPTS = [[5, 9, 11, 3, 7, 8, 1, 4, 4, 2, 9, 17, 33], [4, 2, 6]]  # 13 and 3 tokens
NEW = 12
GEN = dict(max_seq=32, max_batch=2, prefill_chunk=8)


def save_checkpoint(path: Path, arch: str) -> Path:
    """A random-weight checkpoint saved by transformers itself, in several safetensors files, with a tokenizer."""
    cls, over, _ = ARCHS[arch]
    base = {} if arch == "gpt2" else SIZES
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**base, **over})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # transformers zero-inits biases and ones-inits norms: make them non-trivial
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size="60KB")
    save_tokenizer(path, config.vocab_size)
    return path


def save_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` words w0 .. w{vocab-1} with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                                eos_token=f"w{vocab - 1}")
    fast.chat_template = "{% for m in messages %}w2 {{ m['content'] }} {% endfor %}w3"
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_checkpoint(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@functools.cache
def hf_greedy(path: Path) -> list[list[int]]:
    """transformers' own generate on the checkpoint it saved, one prompt at a time (no padding)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS]


@pytest.mark.parametrize("arch, tp", [(a, tp) for a, (_, _, tps) in ARCHS.items() for tp in tps])
def test_greedy_tokens_equal_transformers_generate(checkpoints, engines, arch, tp):
    art = tpcompile.compile_pretrained(checkpoints[arch], tp=tp, out_dir=engines, **GEN)
    eos = json.loads((checkpoints[arch] / "generation_config.json").read_text())["eos_token_id"]
    got = art.generate(PROMPTS, NEW, eos_token_id=eos)
    expected = hf_greedy(checkpoints[arch])
    assert got == expected, (arch, tp)
    assert sum(map(len, expected)) >= 2 * 10  # at least 10 new tokens per prompt were compared


def test_seeded_sampling_is_the_same_at_every_tp(checkpoints, engines):
    runs = [tpcompile.compile_pretrained(checkpoints["qwen2"], tp=tp, out_dir=engines, **GEN)
            .generate(PROMPTS, NEW, temperature=0.9, top_k=50, seed=7) for tp in (1, 2, 4)]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] != tpcompile.compile_pretrained(checkpoints["qwen2"], tp=1, out_dir=engines, **GEN).generate(
        PROMPTS, NEW)  # sampling, not greedy


def test_bfloat16_build_keeps_the_tables_transformers_keeps_in_float32(checkpoints, engines):
    """A bfloat16 build: the weights are bfloat16, RoPE's inv_freq stays float32 as transformers keeps it (the graph
    asserts that dtype), and the engine generates transformers' first greedy token of the same bfloat16 model."""
    from safetensors import safe_open
    art = tpcompile.compile_pretrained(checkpoints["llama3"], tp=2, dtype=torch.bfloat16, out_dir=engines, **GEN)
    with safe_open(art.path / "rank0.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "BF16"
    assert [d for n, d in dtypes.items() if n.endswith("inv_freq")] == ["F32"]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama3"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = int(model(torch.tensor([PROMPTS[0]])).logits[0, -1].argmax())
    assert art.generate([PROMPTS[0]], 1)[0] == [want]


def test_compile_a_held_transformers_model_for_generation(checkpoints, engines):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gpt_neox"], dtype=torch.float32)
    art = tpcompile.compile(model, tp=2, plan="auto", generate=True, out_dir=engines, **GEN)
    eos = model.generation_config.eos_token_id
    assert art.generate(PROMPTS, NEW, eos_token_id=eos) == hf_greedy(checkpoints["gpt_neox"])


def test_cli_generate_prints_text(run_cli, checkpoints, tmp_path):
    r = run_cli("generate", "model=hf", f"model.path={checkpoints['gemma2']}", "tp=2", "generation.prompt=w5 w9 w3",
                "generation.max_new_tokens=6", "generation.max_seq=32", "generation.prefill_chunk=8",
                "generation.max_batch=1", f"out_dir={tmp_path}/engines", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("w5 w9 w3") and len(first.split()) > 3 and "tokens in" in r.stdout, r.stdout
    r = run_cli("generate", "model=hf", f"model.path={checkpoints['gemma2']}", "tp=1", "generation.prompt=w5",
                "generation.chat=true", "generation.max_new_tokens=4", "generation.max_seq=32",
                "generation.prefill_chunk=8", "generation.max_batch=1", f"out_dir={tmp_path}/engines",
                f"hydra.run.dir={tmp_path}/run2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run2" / "generate.json").read_text())
    assert record["prompt_tokens"] == [2, 5, 3]  # w2 <content> w3: the checkpoint's chat template


REFUSED = {  # config class, overrides -> what the one-line message names
    "MixtralConfig": ({}, r"MixtralForCausalLM: a mixture of experts \(num_local_experts=8\)"),
    "T5Config": ({}, r"T5ForConditionalGeneration: an encoder-decoder"),
    "LlavaConfig": ({}, r"LlavaForConditionalGeneration: a model with a vision or audio tower"),
    "LlamaConfig": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
                    r"LlamaForCausalLM: rope_type 'dynamic' recomputes its frequencies"),
}


@pytest.mark.parametrize("cls", REFUSED)
def test_refusal_is_one_line_before_any_tensor_is_read(tmp_path, cls):
    over, message = REFUSED[cls]
    config = getattr(transformers, cls)(**over)
    config.architectures = [{"MixtralConfig": "MixtralForCausalLM", "T5Config": "T5ForConditionalGeneration",
                             "LlavaConfig": "LlavaForConditionalGeneration", "LlamaConfig": "LlamaForCausalLM"}[cls]]
    config.save_pretrained(tmp_path)  # no tensors at all: the refusal comes first
    with pytest.raises(CheckpointError, match=message) as err:
        tpcompile.compile_pretrained(tmp_path, tp=2, out_dir=tmp_path / "engines")
    assert "\n" not in str(err.value)


def test_text_in_text_out_with_the_checkpoints_tokenizer_and_stop_strings(checkpoints, engines):
    """Artifact.generate_text: the prompt through the checkpoint's tokenizer, transformers' greedy tokens decoded
    by it, cut before a stop string."""
    path = checkpoints["qwen3"]
    art = tpcompile.compile_pretrained(path, tp=2, out_dir=engines, **GEN)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok.encode("w5 w9 w7 w3")
    new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    want = tok.decode([t for t in new if t not in eos], skip_special_tokens=True)
    assert art.generate_text("w5 w9 w7 w3", 8) == want and want
    second = want.split()[1]
    assert art.generate_text("w5 w9 w7 w3", 8, stop=[second]) == want[:want.index(second)]
