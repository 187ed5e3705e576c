"""Registry of named policy components and bundles.

Components register under (decision, name) with a dataclass-like constructor whose keyword
parameters and defaults are listed by ``agentsim policies``. A *bundle* names one component per
decision; a spec may override any of them: ``{"name": "vllm", "route": "least-loaded",
"params": {"route": {...}}}``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from agentsim.errors import ConfigError
from agentsim.policies.base import PolicyBundle

DECISIONS = ("route", "order", "evict", "shape")


@dataclass
class Entry:
    decision: str
    name: str
    factory: Callable[..., Any]
    summary: str

    def params(self) -> dict[str, Any]:
        sig = inspect.signature(self.factory)
        return {
            n: (p.default if p.default is not inspect.Parameter.empty else None)
            for n, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }


@dataclass
class BundleEntry:
    name: str
    components: dict[str, str]
    summary: str
    params: dict[str, dict] = field(default_factory=dict)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``; the text lists exactly ``choices``
    (the tuple the component's code accepts), so the message can never fall behind the code."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ValueError unless ``lo <= value <= hi`` (either bound optional) and ``value`` is finite."""
    ok = value == value and abs(value) != float("inf")
    if lo is not None:
        ok = ok and value >= lo
    if hi is not None:
        ok = ok and value <= hi
    if not ok:
        span = (f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None
                else f">= {lo:g}" if lo is not None else f"<= {hi:g}" if hi is not None else "finite")
        raise ValueError(f"{name} must be {span}, got {value!r}")


_COMPONENTS: dict[tuple[str, str], Entry] = {}
_BUNDLES: dict[str, BundleEntry] = {}


def register(decision: str, name: str) -> Callable:
    """Class decorator: register a policy component for ``decision`` under ``name``."""
    if decision not in DECISIONS:
        raise ValueError(decision)

    def deco(cls: Callable) -> Callable:
        doc = (inspect.getdoc(cls) or "").strip().splitlines()
        _COMPONENTS[(decision, name)] = Entry(decision, name, cls, doc[0] if doc else "")
        return cls

    return deco


def register_bundle(name: str, summary: str, params: dict | None = None, **components: str) -> None:
    missing = [d for d in DECISIONS if d not in components]
    if missing:
        raise ValueError(f"bundle {name} lacks {missing}")
    _BUNDLES[name] = BundleEntry(name, components, summary, params or {})


def components() -> list[Entry]:
    _load_builtins()
    return sorted(_COMPONENTS.values(), key=lambda e: (DECISIONS.index(e.decision), e.name))


def bundles() -> list[BundleEntry]:
    _load_builtins()
    return [b for _, b in sorted(_BUNDLES.items())]


def make_component(decision: str, name: str, params: dict | None = None, where: str = "policy") -> Any:
    _load_builtins()
    entry = _COMPONENTS.get((decision, name))
    if entry is None:
        known = sorted(n for d, n in _COMPONENTS if d == decision)
        raise ConfigError(f"{where}.{decision}", f"unknown {decision} policy {name!r} (known: {', '.join(known)})")
    params = dict(params or {})
    allowed = entry.params()
    for k in params:
        if k not in allowed:
            raise ConfigError(f"{where}.params.{decision}.{k}",
                              f"unknown parameter for {decision} policy {name!r} (known: {', '.join(allowed) or 'none'})")
    for k, v in params.items():
        params[k] = _check_type(entry, k, v, f"{where}.params.{decision}.{k}")
    try:
        return entry.factory(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.params.{decision}", f"{name}: {e}") from None


# parameter annotations checked before a component is built (others, e.g. ``Any``, are the
# component's own business): the type a value must have, and what an error calls it
_ANNOTATED_TYPES = {"int": (int, "an integer"), "float": (float, "a finite number"), "bool": (bool, "true or false"),
                    "str": (str, "a string"), "list": (list, "an array")}


def _check_type(entry: Entry, key: str, value: Any, where: str) -> Any:
    """``value`` checked against parameter ``key``'s annotation (``int``, ``float | None`` ...); an
    int is accepted for a float; NaN and inf are refused. Raises ConfigError naming ``where``."""
    ann = inspect.signature(entry.factory).parameters[key].annotation
    parts = [p.strip() for p in str(ann).split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1 or kinds[0] not in _ANNOTATED_TYPES:
        return value
    t, word = _ANNOTATED_TYPES[kinds[0]]
    if value is None and optional:
        return value
    if t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, t) and (t is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(where, f"must be {word}{' or omitted' if optional else ''}, got {value!r}")
    return value


def make_bundle(spec: str | dict | None) -> PolicyBundle:
    """Build a bundle from a name (``"vllm"``) or a dict spec with overrides.

    Dict keys: ``name`` (a registered bundle, default ``vllm``), optionally ``route``/``order``/
    ``evict``/``shape`` (component names) and ``params`` ({decision: {param: value}}).
    """
    _load_builtins()
    if spec is None:
        spec = "vllm"
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError("policy", f"must be a name or a table, got {spec!r}")
    unknown = set(spec) - {"name", "params", *DECISIONS}
    if unknown:
        raise ConfigError(f"policy.{sorted(unknown)[0]}", "unknown field (known: name, route, order, evict, shape, params)")
    name = spec.get("name", "vllm")
    base = _BUNDLES.get(name)
    if base is None:
        if ("route", name) in _COMPONENTS or ("order", name) in _COMPONENTS or ("evict", name) in _COMPONENTS:
            base = _BUNDLES["vllm"]
            dec = next(d for d in DECISIONS if (d, name) in _COMPONENTS)
            spec = {**spec, dec: name}
        else:
            raise ConfigError("policy.name", f"unknown policy {name!r} (bundles: {', '.join(sorted(_BUNDLES))};"
                                             " or a component name, see `agentsim policies`)")
    params = spec.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError("policy.params", "must be a table {decision: {param: value}}")
    for d in params:
        if d not in DECISIONS:
            raise ConfigError(f"policy.params.{d}", f"unknown decision (known: {', '.join(DECISIONS)})")
        if params[d] is not None and not isinstance(params[d], dict):
            raise ConfigError(f"policy.params.{d}", f"must be a table {{param: value}}, got {params[d]!r}")
    comps = {}
    for d in DECISIONS:
        cname = spec.get(d, base.components[d])
        p = dict(base.params.get(d, {})) if cname == base.components[d] else {}
        p.update(params.get(d, {}) or {})
        comps[d] = make_component(d, cname, p)
    label = name if all(spec.get(d) in (None, base.components[d]) for d in DECISIONS) else \
        "+".join(spec.get(d, base.components[d]) for d in DECISIONS)
    return PolicyBundle(label, comps["route"], comps["order"], comps["evict"], comps["shape"], params)


_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from agentsim.policies import baseline  # noqa: F401  (registers on import)
        from agentsim.policies import distance, priority, retention, routing, topology  # noqa: F401
