"""agentsim: simulate and drive LLM agent programs on multi-GPU, multi-node vLLM clusters.

The shared pieces live here: the workload model (:mod:`agentsim.workload`), the cluster spec
(:mod:`agentsim.cluster`), the metrics schema (:mod:`agentsim.metrics`) and the CLI.
"""

__version__ = "0.1.0"
