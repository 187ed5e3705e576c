"""The policy registry: every bundle builds, bad parameters name their field, CLI errors, the policy report
helpers."""

from __future__ import annotations

import math

import pytest


def test_every_registered_bundle_builds_and_bad_parameters_name_their_field():
    from agentsim.errors import ConfigError
    from agentsim.policies.registry import bundles, make_bundle

    names = [b.name for b in bundles()]
    for required in ("autellix-plas", "autellix-atlas", "mlfq", "sjf-oracle", "kairos", "scalesim", "kvflow",
                     "hicache", "continuum", "continuum-static", "tokencake", "prefix-affinity", "llm-d", "hexgen",
                     "adaptorch", "topology-debate"):
        assert required in names
    for name in names:
        make_bundle(name)
    with pytest.raises(ConfigError) as e:
        make_bundle({"name": "autellix-plas", "params": {"order": {"beta": -1}}})
    assert e.value.where == "policy.params.order" and "beta" in e.value.message
    with pytest.raises(ConfigError) as e:
        make_bundle({"name": "scalesim", "params": {"evict": {"hold_level": 3}}})
    assert e.value.where == "policy.params.evict.hold_level"
    with pytest.raises(ConfigError) as e:
        make_bundle({"name": "vllm", "evict": "steps-to-execution", "params": {"evict": {"graph": "psychic"}}})
    assert e.value.where == "policy.params.evict"


def test_policy_config_errors_exit_2_with_one_line(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text('duration = 5.0\n[policy]\nname = "continuum"\n[policy.params.evict]\nttl = "forever"\n')
    r = subprocess.run([sys.executable, "-m", "agentsim", "simulate", "--config", str(cfg), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: policy.params.evict: continuum: ttl must be one of optimal, fixed, got 'forever'"]
    assert not (tmp_path / "out").exists()


def test_policy_report_sustainable_rate_and_success_table(tmp_path):
    import numpy as np

    from agentsim.errors import ConfigError
    from agentsim.experiments.policy_report import load_success, sustainable_rate

    rates = np.array([1.0, 2.0, 3.0])
    # crosses 0.2 between 2 (0.1) and 3 (0.4): log-linear -> 2 + ln(2)/ln(4) = 2.5
    assert sustainable_rate(rates, np.array([0.05, 0.1, 0.4]), 0.2) == (pytest.approx(2.5), False)
    assert sustainable_rate(rates, np.array([0.05, 0.1, 0.15]), 0.2) == (3.0, True)   # a lower bound
    assert math.isnan(sustainable_rate(rates, np.array([0.3, 0.4, 0.5]), 0.2)[0])
    good = tmp_path / "ok.toml"
    good.write_text("[success_rate]\nadaptorch = 0.5\n")
    assert load_success(str(good)) == {"adaptorch": 0.5}
    bad = tmp_path / "bad.toml"
    bad.write_text("[success_rate]\nadaptorch = 1.5\n")
    with pytest.raises(ConfigError) as e:
        load_success(str(bad))
    assert e.value.where.endswith("success_rate.adaptorch")
