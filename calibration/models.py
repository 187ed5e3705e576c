"""Dimensions of the models agentsim ships profiles for (from their Hugging Face ``config.json``)."""

from __future__ import annotations

from agentsim.calibration.profile import ModelDims

LLAMA3_8B = ModelDims(
    name="llama-3-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=14336, vocab_size=128256, num_params=8.03e9, max_model_len=8192,
)
LLAMA3_70B = ModelDims(
    name="llama-3-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
    intermediate_size=28672, vocab_size=128256, num_params=70.55e9, max_model_len=8192,
)
# Qwen2.5 (instruct) native context is 32k tokens (128k only with YaRN rope scaling).
QWEN25_7B = ModelDims(
    name="qwen2.5-7b", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
    intermediate_size=18944, vocab_size=152064, num_params=7.62e9, max_model_len=32768,
)
QWEN25_14B = ModelDims(
    name="qwen2.5-14b", num_layers=48, hidden_size=5120, num_heads=40, num_kv_heads=8, head_dim=128,
    intermediate_size=13824, vocab_size=152064, num_params=14.77e9, max_model_len=32768,
)

MODELS = {m.name: m for m in (LLAMA3_8B, LLAMA3_70B, QWEN25_7B, QWEN25_14B)}


def model_dims_from_hf_config(cfg: dict, name: str, max_model_len: int | None = None) -> ModelDims:
    """Model dimensions from a Hugging Face ``config.json`` dict (Llama/Qwen/Mistral-style decoders).

    ``num_params`` is counted from the dims (embeddings, attention, gated MLP, norms, LM head).
    """
    from agentsim.errors import ConfigError

    def need(key: str) -> int:
        if key not in cfg:
            raise ConfigError(f"config.json: {key}", "missing (not a decoder-only transformer config?)")
        return int(cfg[key])

    layers, hidden = need("num_hidden_layers"), need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter, vocab = need("intermediate_size"), need("vocab_size")
    attn = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * inter
    emb = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    params = layers * (attn + mlp + 2 * hidden) + emb + hidden
    return ModelDims(
        name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, num_params=float(params),
        max_model_len=int(max_model_len or cfg.get("max_position_embeddings") or 2048),
    )
