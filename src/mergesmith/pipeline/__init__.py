"""The merge pipeline: a YAML config (config.py) is planned tensor by tensor (params.py, plan.py), run on
worker threads (execute.py) by a backend (backends/) into an output folder (core/write.py); stages.py
runs multi-document configs, api.py is ``mergesmith.merge``, command.py the ``merge`` and ``plan``
commands. Named ``pipeline`` because ``mergesmith.merge`` is the public function."""
