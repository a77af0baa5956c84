"""``imgrec bench``: the performance benchmark suite (search stage against exact search, end to end, cold start,
ingestion), written as a JSON report and a Markdown table with every figure beside its target.

Modules by responsibility: ``common`` (timing, memory, child processes), ``source`` (the lake of real photos whose
features seed everything), ``synth`` (synthetic lakes of N images made from real features), ``exact`` (brute-force
search in numpy), ``search`` (search stage + end to end, in one fresh process per N), ``e2e`` (uploads -> results with
thumbnails), ``cold`` (new process -> first result), ``ingest`` (images/s on real photos), ``report`` (targets,
JSON, Markdown) and ``runner`` (what runs in which order). Heavy modules are imported inside functions, so the CLI
stays fast to start.
"""
