"""Model folders for benchmarks: a Llama config of the paper's shapes plus a tokenizer of the same
vocabulary. No weights: the engine makes random ones on the GPU (EngineConfig.random_weights_seed)."""

from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    # Llama-2 7B / 13B shapes (MHA, vocab 32000), as in the S-LoRA paper.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    # Llama-7B's 32 layers around a tiny width: host work per step as at 7B, a trivial forward
    # (bench/host_step.py, on the CPU)
    "host": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=4),
    # small enough for a CPU smoke run of the harness itself
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
}
VOCAB = 32000


def make_model_folder(shape: str, out: Path) -> Path:
    """config.json + a word-level tokenizer with VOCAB tokens (detokenization costs what it costs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, max_position_embeddings=4096,
               rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", **SHAPES[shape])
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return out
