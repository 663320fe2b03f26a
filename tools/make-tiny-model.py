"""Writes a tiny Llama in Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template) for the engines that read safetensors (mlx-lm,
vLLM). No hub, no torch: a byte-level BPE tokenizer trained with `tokenizers` on the text
below, random weights written with numpy, then a few hundred full fine-tuning steps with MLX
on two chat turns, so the model answers verify's smoke prompt in a sane sentence (greedy).
Run it with an interpreter that has mlx-lm (tools/testbed-assets.sh uses its cached venv).

    python tools/make-tiny-model.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, CONTEXT = 128, 2, 4, 2, 256, 1024, 2048
SPECIAL = ["<|begin|>", "<|end|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ("The sea is wide and blue. Ships sail on the sea. A sentence about the sea is short. "
        "Write one sentence. Reply with one word. The cluster serves models on many machines. ") * 40


def tokenizer(out: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end|>",
        "chat_template": TEMPLATE, "model_max_length": CONTEXT}, indent=1) + "\n")


def weights(out: Path, vocab: int) -> None:
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float16),
               "lm_head.weight": w(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.self_attn.q_proj.weight": w(HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.o_proj.weight": w(HIDDEN, HEADS * head_dim),
            f"{p}.mlp.gate_proj.weight": w(FFN, HIDDEN), f"{p}.mlp.up_proj.weight": w(FFN, HIDDEN),
            f"{p}.mlp.down_proj.weight": w(HIDDEN, FFN),
            f"{p}.input_layernorm.weight": np.ones(HIDDEN, np.float16),
            f"{p}.post_attention_layernorm.weight": np.ones(HIDDEN, np.float16)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


ANSWERS = [("Write one sentence about the sea.", "The sea is wide and blue, and ships sail on it."),
           ("Reply with one word.", "Hello.")]
STEPS = 300


def train(out: Path) -> None:
    """Full fine-tuning in float32 (float16 overflows), saved back in place."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    mx.random.seed(0)
    model, tok = load(str(out))
    model.set_dtype(mx.float32)
    seqs = []
    for question, answer in ANSWERS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        seqs.append(tok.encode(prompt + answer + "<|end|>", add_special_tokens=False))
    width = max(map(len, seqs))
    x = mx.array([s + [0] * (width - len(s)) for s in seqs])
    mask = mx.array([[1] * (len(s) - 1) + [0] * (width - len(s)) for s in seqs])

    def loss(m: nn.Module) -> mx.array:
        ce = nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]) * mask
        return ce.sum() / mask.sum()

    opt = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, loss)
    for _ in range(STEPS):
        value, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    print(f"make-tiny-model: loss {value.item():.4f} after {STEPS} steps", file=sys.stderr)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer(out)
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    weights(out, vocab)
    end = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|end|>")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": vocab, "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "bos_token_id": Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|begin|>"),
        "eos_token_id": end, "hidden_act": "silu"}, indent=1, sort_keys=True) + "\n")
    train(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
