"""Shared fixtures: small configs and a constant-step-time profile for queueing checks."""

from __future__ import annotations

import dataclasses

import pytest

from agentsim.calibration.profile import StepTimeCoefficients
from agentsim.calibration.roofline import roofline_profile

ROOFLINE = "a100-80gb_llama-3-8b_tp1_roofline"


@pytest.fixture
def roofline():
    return roofline_profile()


def constant_profile(step_time: float, capacity_tokens: int = 1_000_000):
    """A profile whose every step takes exactly ``step_time`` seconds."""
    p = roofline_profile()
    return dataclasses.replace(
        p, name="constant", kv_capacity_tokens=capacity_tokens,
        coefficients=StepTimeCoefficients(const=step_time, per_prefill_token=0.0, per_prefill_attn_pair=0.0,
                                       per_decode_seq=0.0, per_decode_ctx_token=0.0))
