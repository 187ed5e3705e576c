"""Model dimensions: the models agentsim ships profiles for (from their Hugging Face ``config.json``)
and any dense decoder read from a user's ``config.json`` (``cluster.model = "path/to/config.json"``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


# Keys that mark a mixture-of-experts config (Mixtral, Qwen2/3-MoE, DeepSeek, DBRX, ...): such a
# model's step time depends on expert routing, which the dense step-time model cannot price.
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
            "num_experts_per_tok", "moe_num_experts", "ffn_config")


def model_dims_from_hf_config(cfg: dict, name: str, max_model_len: int | None = None,
                              source: str = "config.json") -> ModelDims:
    """Model dimensions from a Hugging Face ``config.json`` dict (dense Llama / Qwen / Mistral-style
    decoders: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``
    (default: the attention heads), ``head_dim`` (default ``hidden_size / num_attention_heads``),
    ``intermediate_size`` (SwiGLU width), ``vocab_size``, ``tie_word_embeddings``,
    ``max_position_embeddings``).

    ``num_params`` is counted from the dims (embeddings, QKV/O, gated MLP, norms, LM head unless
    tied). Raises :class:`ConfigError` naming ``source`` and the key for a missing or non-positive
    key, query heads not a multiple of KV heads, or a mixture-of-experts config.
    """
    from agentsim.errors import ConfigError

    if not isinstance(cfg, dict):
        raise ConfigError(source, "not a JSON object (a Hugging Face config.json is one)")
    for key in MOE_KEYS:
        v = cfg.get(key)
        if v not in (None, 0, False, 1) or (key == "ffn_config" and v):
            raise ConfigError(f"{source}: {key}", f"mixture-of-experts model ({key} = {v!r}); agentsim prices "
                                                  "dense decoders only")

    def need(key: str, default: int | None = None) -> int:
        v = cfg.get(key)
        if v is None:
            if default is not None:
                return default
            raise ConfigError(f"{source}: {key}", "missing (not a dense decoder-only transformer config?)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise ConfigError(f"{source}: {key}", f"must be a positive integer, got {v!r}")
        return int(v)

    layers, hidden = need("num_hidden_layers"), need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = need("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_key_value_heads",
                          f"{kv_heads} does not divide num_attention_heads {heads}")
    head_dim = need("head_dim", hidden // heads)
    inter, vocab = need("intermediate_size"), need("vocab_size")
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConfigError(f"{source}: tie_word_embeddings", f"must be true or false, got {tied!r}")
    attn = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * inter
    emb = vocab * hidden * (1 if tied else 2)
    params = layers * (attn + mlp + 2 * hidden) + emb + hidden
    return ModelDims(
        name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, num_params=float(params),
        max_model_len=int(max_model_len or need("max_position_embeddings", 2048)),
    )


def _config_name(cfg: dict, path: Path) -> str:
    """A model name for a config file: the last part of its ``_name_or_path``, else its folder."""
    raw = cfg.get("_name_or_path") if isinstance(cfg, dict) else None
    base = str(raw).rstrip("/").split("/")[-1] if raw else (path.parent.name or path.stem)
    return re.sub(r"[^a-z0-9.]+", "-", base.lower()).strip("-") or "model"


def load_hf_config(path: str | Path) -> ModelDims:
    """:class:`ModelDims` from the path of a Hugging Face ``config.json`` (or a folder holding one).

    Raises :class:`ConfigError` naming the file (and line for malformed JSON, key for a bad field)."""
    from agentsim.errors import ConfigError

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read model config ({e.strerror})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}", f"malformed JSON ({e.msg})") from None
    return model_dims_from_hf_config(cfg, _config_name(cfg, p), source=str(p))


def same_dims(a: ModelDims, b: ModelDims) -> bool:
    """True when two models have the same architecture dims (names, parameter rounding and context
    length aside): a config.json of a shipped model then uses that model's measured profiles."""
    keys = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and abs(a.num_params / b.num_params - 1) < 0.01


def resolve_model(spec: str, field: str = "cluster.model") -> ModelDims:
    """A shipped model by name (``llama-3-8b``, case-insensitive), or the dims read from the path
    of a Hugging Face ``config.json``; a config whose dims equal a shipped model's returns that
    shipped model (so its measured profiles apply). Raises :class:`ConfigError` naming ``field``
    for an unknown name, or the file and key for a bad config."""
    from agentsim.errors import ConfigError

    if spec.lower() in MODELS:
        return MODELS[spec.lower()]
    p = Path(spec).expanduser()
    if p.suffix == ".json" or p.is_dir() or p.exists():
        dims = load_hf_config(p)
        for m in MODELS.values():
            if same_dims(dims, m):
                return m
        return dims
    raise ConfigError(field, f"unknown model {spec!r} (shipped: {', '.join(MODELS)}; or the path of a "
                             "Hugging Face config.json)")
