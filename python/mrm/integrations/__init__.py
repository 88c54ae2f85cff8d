"""Optional integrations with other frameworks; each is imported only when used.

* :mod:`mrm.integrations.ray` — the batch jobs of :mod:`mrm.batch` as Ray Data pipelines
  (install the ``mrm-fast[ray]`` extra).
"""
