"""agentsim.live: the simulator's programs and policy objects on a Ray cluster of real vLLM engines.

Modules: ``runner`` (``run_live(cfg, settings)``), ``driver`` (asyncio program driver, metrics),
``engine`` (the engine actor around vLLM's ``AsyncLLM``), ``scheduler`` (the vLLM ``Scheduler``
subclass hosting order/evict policies), ``cluster`` (local or existing Ray cluster), ``views``
(live ``CallView``/``EngineView``), ``tokens`` (segments -> token ids, vLLM block hashes), ``http``
(``--endpoints`` mode), ``compare`` (``agentsim compare``), ``cli``, ``tiny_model``, ``compat``
(version pins). vLLM and Ray are imported only inside functions: importing this package needs neither.
"""
