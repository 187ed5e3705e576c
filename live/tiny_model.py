"""A tiny random Llama made offline, for vLLM on CPU in tests, benchmarks and calibration trials.

The directory holds ``config.json`` and a byte-level tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) and no weights: engines load it with
``load_format="dummy"`` (random weights). Byte-level tokenization gives one token per byte, so
token counts are predictable. Nothing is downloaded.

Only ``tokenizers`` and ``transformers`` are needed (both come with vLLM); they are imported
inside :func:`make_tiny_llama` so importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["make_tiny_llama", "make_default_tiny", "tiny_model_defaults", "TINY_MODEL_SHAPE", "TINY_SPECIAL_TOKENS",
           "CPU_HEAD_SIZES"]

#: The one tiny model of the documented CPU paths: ``agentsim live --model tiny`` (made in the cache),
#: ``python -m agentsim.live.tiny_model DIR`` (the README's calibration recipe and its sim-vs-live
#: comparison) — one shape, so a profile measured on one is the model the other serves.
TINY_MODEL_SHAPE: dict = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=64, max_position_embeddings=16384)
MARKER = ".agentsim-tiny-llama"

# ids 0..3; byte stand-ins follow, so the vocabulary is 260 tokens
TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# attention head sizes vLLM's CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    max_position_embeddings: int = 4096,
    dtype: str = "float32",
    with_weights: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama model directory to ``out_dir`` and return its path.

    The call is idempotent: a directory already holding the same ``config.json`` is left as is
    (a marker file records that the write completed). ``with_weights`` also saves random
    safetensors weights (seeded by ``seed``; needs torch) for loaders that want real files.
    Raises ``ValueError`` for a head size vLLM's CPU backend cannot run or inconsistent head counts.
    """
    if head_dim not in CPU_HEAD_SIZES:
        raise ValueError(f"head_dim {head_dim} is not one vLLM's CPU attention supports {CPU_HEAD_SIZES}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if min(hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads) < 1:
        raise ValueError("model sizes must be >= 1")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out = Path(out_dir)
    vocab: dict[str, int] = {t: i for i, t in enumerate(TINY_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)

    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
        torch_dtype=dtype,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    wanted = cfg.to_dict()
    marker = out / MARKER
    if marker.exists() and (out / "config.json").exists():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = None
        if have == {"config": _stable(wanted), "with_weights": with_weights, "seed": seed}:
            return out

    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    # BPE with no merges over the 256 byte stand-ins: exactly one token per byte, lossless.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf_tok.chat_template = _CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    cfg.save_pretrained(out)

    if with_weights:
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)  # transformers initialises from torch's global generator
        LlamaForCausalLM(cfg).save_pretrained(out)

    marker.write_text(json.dumps({"config": _stable(wanted), "with_weights": with_weights, "seed": seed}))
    return out


def _stable(d: dict) -> dict:
    """The config dict as JSON would round-trip it (so the idempotence check compares like with like)."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def make_default_tiny(out_dir: str | Path) -> Path:
    """:func:`make_tiny_llama` with :data:`TINY_MODEL_SHAPE` (no weights, float32)."""
    return make_tiny_llama(out_dir, **TINY_MODEL_SHAPE)


def tiny_model_defaults(model: str | Path) -> dict | None:
    """How vLLM must load ``model`` if it is a directory made by :func:`make_tiny_llama`, else None.

    Such a directory has no weights unless it was made ``with_weights``: ``{"load_format": "dummy"
    (random weights) or "auto", "dtype": the config's dtype}``. ``agentsim live`` and ``agentsim
    calibrate`` take these as their defaults for the model, so one tiny model directory is loaded
    the same way by both (the decision is made from what the directory holds, not from its name).
    """
    d = Path(model)
    marker = d / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        dtype = str(meta["config"].get("torch_dtype") or meta["config"].get("dtype") or "float32")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    with_weights = bool(meta.get("with_weights")) and any(d.glob("*.safetensors"))
    return {"load_format": "auto" if with_weights else "dummy", "dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    """``python -m agentsim.live.tiny_model DIR``: write the tiny model (:data:`TINY_MODEL_SHAPE`) to DIR.

    Exit 2 with one line if DIR exists and holds anything that is not this tiny model (nothing is
    overwritten); 0 otherwise (an up-to-date DIR is left as is).
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m agentsim.live.tiny_model DIR   (writes agentsim's tiny random Llama, no weights)",
              file=sys.stderr)
        return 2
    out = Path(args[0])
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        print(f"error: {out}: exists and is not an agentsim tiny model directory; nothing written", file=sys.stderr)
        return 2
    make_default_tiny(out)
    print(f"{out}: tiny random Llama ({', '.join(f'{k}={v}' for k, v in TINY_MODEL_SHAPE.items())}); "
          "vLLM loads it with load_format=dummy, dtype=float32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
