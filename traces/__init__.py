"""agentsim.traces: workloads, real (traces) and synthetic (generators).

- ``canonical``: the canonical Parquet trace format (programs of LLM/tool steps, schema version 1)
- ``importers`` and ``mooncake``, ``azure``, ``tau2``, ``tracelab``, ``native``: streaming importers
- ``stats``: ``agentsim trace inspect`` (counts, lengths, tool time, token-accurate prefix reuse)
- ``export``: to agentsim JSONL, Mooncake JSONL and Azure CSV
- ``replay``: ``load_programs`` for ``workload.arrival = "trace"``
- ``record``: record generator programs as traces (``agentsim trace generate``)
- ``generators`` and ``shapes``: the seeded workload generators; ``source``: arrivals
- ``cli``: the ``agentsim trace`` commands
"""
