"""``agentsim pd-bench``: live P/D vs co-located on vLLM engines (:func:`agentsim.live.pd.run_pd_bench`).

Kept apart from :mod:`agentsim.live.pd` so that registering the command imports nothing heavy
(the live driver, pandas, vLLM and Ray are imported when the command runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agentsim.errors import ConfigError


def _option(default: Any, name: str, help_text: str) -> Any:
    import typer

    return typer.Option(default, name, help=help_text)


def pd_bench_command(
    model: str = _option("tiny-weights", "--model", "Model directory for vLLM; 'tiny-weights' = agentsim's tiny "
                              "Llama with random weights of std 0.2 (made offline in the agentsim cache)."),
    prompt_tokens: str = _option("256,512,1024,1536", "--prompt-tokens", "Prompt lengths, comma-separated."),
    output_tokens: int = _option(32, "--output-tokens", "Output tokens per call (ignore_eos)."),
    repeats: int = _option(3, "--repeats", "Calls per prompt length (fresh prompts)."),
    seed: int = _option(0, "--seed", "Seed of the prompts and the engines."),
    kv_connector: str = _option("example", "--kv-connector", "example (vLLM's disk-based ExampleConnector) or nixl "
                                "(vLLM's NixlConnector over UCX; needs the nixl package)."),
    as_json: bool = _option(False, "--json", "Print every call and the summary as JSON instead of the table."),
) -> None:
    """Live P/D on vLLM engines: 1 prefill + 1 decode engine (ExampleConnector or NIXL) vs 1 co-located engine."""
    import json
    import sys

    from agentsim.live.pd import CONNECTORS, check_nixl, format_bench, make_pd_model, run_pd_bench

    try:
        lens = tuple(int(x) for x in prompt_tokens.split(",") if x.strip())
    except ValueError:
        raise ConfigError("--prompt-tokens", f"expected integers separated by commas, got {prompt_tokens!r}") from None
    if not lens or min(lens) < 2:
        raise ConfigError("--prompt-tokens", "give prompt lengths >= 2")
    if output_tokens < 2:
        raise ConfigError("--output-tokens", f"must be >= 2 (TPOT needs two tokens), got {output_tokens}")
    if repeats < 1:
        raise ConfigError("--repeats", f"must be >= 1, got {repeats}")
    if kv_connector not in CONNECTORS:
        raise ConfigError("--kv-connector", f"must be one of {', '.join(CONNECTORS)}, got {kv_connector!r}")
    if kv_connector == "nixl":
        check_nixl()
    if model == "tiny-weights":
        from agentsim.live.runner import default_model_cache

        model = str(make_pd_model(default_model_cache() / "tiny-llama-pd"))
    elif not Path(model).is_dir():
        raise ConfigError("--model", f"{model}: not a model directory")
    res = run_pd_bench(model, lens, output_tokens, repeats, seed, connector=kv_connector,
                       progress=None if as_json else (lambda line: print(line, file=sys.stderr, flush=True)))
    print(json.dumps(res, indent=1) if as_json else format_bench(res))
