"""devmapd benchmarks: every measurement against its peer, in the same run, printed as ratios.

    python -m benchmarks [--quick] [--json PATH] [--markdown PATH] [--only fetch,memory,...]

One module per measurement (``fetch``, ``memory``, ``coldload``, ``watch``, ``idle``, ``scale``);
each returns ``report.Row``s. ``common`` starts real daemons and runs measured work in fresh
processes forked from a forkserver that has imported torch once (so a "fresh client process" costs
a fork, not a 5 s interpreter start, and every peer is measured the same way). ``profiles`` holds the
sizes of the full, ``--quick`` and toy (smoke test) runs.
"""
