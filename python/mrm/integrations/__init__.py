"""Optional integrations with other frameworks; each is imported only when used.

* :mod:`mrm.integrations.ray` — the batch jobs of :mod:`mrm.batch` as Ray Data pipelines
  (install the ``mrm-fast[ray]`` extra), and ``embed`` (backbone actors writing the embedding cache).
* :mod:`mrm.integrations.trl` — :class:`PersonalizedReward`, a ``reward_funcs`` entry for TRL's
  GRPOTrainer / RLOOTrainer / OnlineDPO (install ``mrm-fast[trl]``).
"""
