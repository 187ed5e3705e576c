"""Engine profiles: model dims, GPU, TP degree, step-time coefficients, KV capacity, provenance.

A profile is a small JSON file (format ``agentsim-profile``, version 1). The simulator predicts the
duration of one vLLM engine step from five batch features, each with a non-negative coefficient::

    step_time = const
              + per_prefill_token    * (prompt tokens computed in this step)
              + per_prefill_attn_pair* (sum over prefill chunks of query x key pairs, causal)
              + per_decode_seq       * (decode sequences in this step)
              + per_decode_ctx_token * (sum of the decode sequences' context lengths)

A prefill chunk of ``c`` tokens on top of ``k`` cached/computed tokens has
``c*k + c*(c+1)/2`` attention pairs. The features are physically meaningful (weights streamed
once per step; linear-layer FLOPs per token; attention FLOPs per pair; KV bytes read per decode
context token), so coefficients can be fitted from measurements (``agentsim calibrate fit``) or
derived from a roofline (the shipped default until measured profiles exist).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agentsim.errors import ConfigError

FORMAT = "agentsim-profile"
FORMAT_VERSION = 1
COEFFICIENTS = (
    "const",
    "per_prefill_token",
    "per_prefill_attn_pair",
    "per_decode_seq",
    "per_decode_ctx_token",
)


@dataclass(frozen=True, slots=True)
class ModelDims:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: float
    max_model_len: int

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class GPUSpec:
    name: str
    memory_gib: float
    hbm_GBps: float
    peak_tflops: float


@dataclass(frozen=True, slots=True)
class StepTimeCoefficients:
    const: float
    per_prefill_token: float
    per_prefill_attn_pair: float
    per_decode_seq: float
    per_decode_ctx_token: float

    def predict(
        self, num_prefill_tokens: int, prefill_attn_pairs: float, num_decode_seqs: int, decode_ctx_tokens: int
    ) -> float:
        """Seconds for one engine step with the given batch features."""
        return (
            self.const
            + self.per_prefill_token * num_prefill_tokens
            + self.per_prefill_attn_pair * prefill_attn_pairs
            + self.per_decode_seq * num_decode_seqs
            + self.per_decode_ctx_token * decode_ctx_tokens
        )


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What one engine step computes: the input of :meth:`Profile.step_time`.

    ``num_prefill_tokens``: prompt tokens computed this step (all prefill chunks);
    ``prefill_attn_pairs``: sum over chunks of ``c*k + c*(c+1)/2`` (chunk ``c`` over ``k`` computed tokens);
    ``num_decode_seqs``: sequences decoding one token; ``decode_ctx_tokens``: sum of their context lengths;
    ``num_prefill_seqs``: sequences with a prefill chunk this step;
    ``num_sampled``: sequences that sample a token at the end of this step (decodes + prefills that
    finish their prompt); ``-1`` means "every scheduled sequence".
    """

    num_prefill_tokens: int = 0
    prefill_attn_pairs: int = 0
    num_decode_seqs: int = 0
    decode_ctx_tokens: int = 0
    num_prefill_seqs: int = 0
    num_sampled: int = -1


@dataclass(frozen=True, slots=True)
class Links:
    nvlink_GBps: float
    pcie_GBps: float
    internode_GBps: float


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    gpu: GPUSpec
    model: ModelDims
    tp: int
    dtype_bytes: int
    coefficients: StepTimeCoefficients  # serialised as "step_time"
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    gpu_memory_utilization: float
    links: Links
    provenance: dict = field(default_factory=dict)
    fit_error: dict | None = None
    kv_block_size: int = 16  # block size the stated capacity in blocks refers to (vLLM's GPU default)
    source: str = ""  # where it was loaded from (not serialised)

    def step_time(self, batch: BatchShape) -> float:
        """Seconds for one engine step of shape ``batch`` (the one rule the engine model and
        calibration both use)."""
        return self.step_seconds(batch.num_prefill_tokens, batch.prefill_attn_pairs, batch.num_decode_seqs,
                                 batch.decode_ctx_tokens, batch.num_prefill_seqs, batch.num_sampled)

    def step_seconds(self, num_prefill_tokens: int, prefill_attn_pairs: float, num_decode_seqs: int,
                     decode_ctx_tokens: int, num_prefill_seqs: int = 0, num_sampled: int = -1) -> float:
        """:meth:`step_time` with the batch features as positional numbers (the simulator's hot path)."""
        return self.coefficients.predict(num_prefill_tokens, prefill_attn_pairs, num_decode_seqs,
                                                   decode_ctx_tokens)

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // self.kv_block_size

    @property
    def raw_points_path(self) -> Path | None:
        """The optional Parquet file of raw measured points (``provenance.raw_points``, relative to
        the profile file), or None."""
        rel = self.provenance.get("raw_points") if isinstance(self.provenance, dict) else None
        if not rel:
            return None
        base = Path(self.source).parent if self.source else Path(".")
        return base / rel

    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "gpu": asdict(self.gpu),
            "model": asdict(self.model),
            "tp": self.tp,
            "dtype_bytes": self.dtype_bytes,
            "step_time": asdict(self.coefficients),
            "kv": {
                "bytes_per_token": self.kv_bytes_per_token,
                "capacity_tokens": self.kv_capacity_tokens,
                "block_size": self.kv_block_size,
                "capacity_blocks": self.kv_capacity_blocks,
                "gpu_memory_utilization": self.gpu_memory_utilization,
            },
            "links": asdict(self.links),
            "provenance": self.provenance,
        }
        if self.fit_error is not None:
            d["fit_error"] = self.fit_error
        return d

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)


def _need(d: Any, key: str, where: str, kind: type | tuple = (int, float)) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ConfigError(where, f"missing field '{key}'")
    v = d[key]
    if kind in ((int, float), int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}.{key}", f"must be a number, got {v!r}")
    elif not isinstance(v, kind):
        raise ConfigError(f"{where}.{key}", f"must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def profile_from_dict(d: dict, source: str = "<dict>") -> Profile:
    """Validate and build a profile; errors name ``source`` and the field."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(source, f"not an agentsim profile (expected \"format\": \"{FORMAT}\")")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise ConfigError(f"{source}: format_version", f"unsupported version {version!r} (this agentsim reads {FORMAT_VERSION})")
    name = _need(d, "name", source, str)
    g = _need(d, "gpu", source, dict)
    gpu = GPUSpec(
        name=_need(g, "name", f"{source}: gpu", str),
        memory_gib=float(_need(g, "memory_gib", f"{source}: gpu")),
        hbm_GBps=float(_need(g, "hbm_GBps", f"{source}: gpu")),
        peak_tflops=float(_need(g, "peak_tflops", f"{source}: gpu")),
    )
    m = _need(d, "model", source, dict)
    mw = f"{source}: model"
    model = ModelDims(
        name=_need(m, "name", mw, str),
        **{k: int(_need(m, k, mw)) for k in (
            "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "vocab_size", "max_model_len")},
        num_params=float(_need(m, "num_params", mw)),
    )
    st = _need(d, "step_time", source, dict)
    coeffs = {}
    for k in COEFFICIENTS:
        v = float(_need(st, k, f"{source}: step_time"))
        if not v >= 0:
            raise ConfigError(f"{source}: step_time.{k}", f"coefficient must be >= 0, got {v}")
        coeffs[k] = v
    kv = _need(d, "kv", source, dict)
    kvw = f"{source}: kv"
    cap = int(_need(kv, "capacity_tokens", kvw))
    bpt = int(_need(kv, "bytes_per_token", kvw))
    util = float(_need(kv, "gpu_memory_utilization", kvw))
    if cap <= 0:
        raise ConfigError(f"{kvw}.capacity_tokens", f"must be > 0, got {cap}")
    if bpt <= 0:
        raise ConfigError(f"{kvw}.bytes_per_token", f"must be > 0, got {bpt}")
    if not 0 < util <= 1:
        raise ConfigError(f"{kvw}.gpu_memory_utilization", f"must be in (0, 1], got {util}")
    block_size = int(_need(kv, "block_size", kvw)) if "block_size" in kv else 16
    if block_size < 1:
        raise ConfigError(f"{kvw}.block_size", f"must be >= 1, got {block_size}")
    if "capacity_blocks" in kv and int(_need(kv, "capacity_blocks", kvw)) != cap // block_size:
        raise ConfigError(f"{kvw}.capacity_blocks",
                          f"{kv['capacity_blocks']} disagrees with capacity_tokens // block_size = {cap // block_size}")
    fit_error = d.get("fit_error")
    if fit_error is not None and not isinstance(fit_error, dict):
        raise ConfigError(f"{source}: fit_error", f"must be an object, got {fit_error!r}")
    ln = _need(d, "links", source, dict)
    links = Links(**{k: float(_need(ln, k, f"{source}: links")) for k in ("nvlink_GBps", "pcie_GBps", "internode_GBps")})
    tp = int(_need(d, "tp", source))
    if tp < 1:
        raise ConfigError(f"{source}: tp", f"must be >= 1, got {tp}")
    prov = _need(d, "provenance", source, dict)
    return Profile(
        name=name, gpu=gpu, model=model, tp=tp, dtype_bytes=int(d.get("dtype_bytes", 2)),
        coefficients=StepTimeCoefficients(**coeffs), kv_bytes_per_token=bpt, kv_capacity_tokens=cap,
        gpu_memory_utilization=util, links=links, provenance=prov, fit_error=fit_error,
        kv_block_size=block_size, source=source,
    )


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read profile ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg})") from None
    return profile_from_dict(d, str(path))


def shipped_profiles() -> dict[str, Path]:
    """Name -> path of every profile shipped in ``agentsim/calibration/profiles``."""
    out: dict[str, Path] = {}
    base = resources.files("agentsim.calibration") / "profiles"
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            out[entry.name[:-5]] = Path(str(entry))
    return out


def profile_key(gpu: str, model: str, tp: int) -> str:
    return f"{gpu}_{model}_tp{tp}".lower()


def resolve_profile(spec: str | None, gpu: str, model: str, tp: int) -> Profile:
    """A profile from an explicit path/name, or the shipped one for (gpu, model, tp)."""
    shipped = shipped_profiles()
    if spec:
        if spec in shipped:
            return load_profile(shipped[spec])
        p = Path(spec)
        if p.suffix == ".json" or p.exists():
            return load_profile(p)
        raise ConfigError("cluster.profile", f"unknown profile {spec!r} (shipped: {', '.join(shipped)})")
    key = profile_key(gpu, model, tp)
    if key in shipped:
        return load_profile(shipped[key])
    gpus = sorted({k.split("_")[0] for k in shipped})
    models = sorted({k.split("_")[1] for k in shipped})
    if gpu.lower() not in gpus:
        raise ConfigError("cluster.gpu", f"unknown GPU {gpu!r} (known: {', '.join(gpus)})")
    if model.lower() not in models:
        raise ConfigError("cluster.model", f"unknown model {model!r} (known: {', '.join(models)})")
    have = sorted(k for k in shipped if k.startswith(f"{gpu.lower()}_{model.lower()}_"))
    raise ConfigError("cluster.tp", f"no profile for {model} on {gpu} at TP {tp} (have: {', '.join(have)})")
