"""The "restarted daemon" of test_sd_fdstore.py: take the fd store back and serve from it.

    python restore_child.py MODEL_DIR

Started through listen_exec.py with LISTEN_FDS, and NOTIFY_SOCKET pointing at the test's fake
systemd. Recovers the stored models, keeps those whose fingerprint matches the files now on
disk (FDSTOREREMOVE for the rest), rebuilds their tensors from the memfds without reading the
files, and prints a JSON report. Only the comparison reads the files, after the timing.
"""

import json
import sys
import time
from pathlib import Path

import torch

from devmapd.daemon import names
from devmapd.engine import arena
from devmapd.service import fdstore, systemd


def main() -> None:
    model_dir = Path(sys.argv[1])
    started = time.perf_counter()
    listened = systemd.listen_fds()
    recovery = fdstore.recover(listened)
    current = {}
    for name in recovery.models:
        try:
            current[name] = names.fingerprint(names.source_for(model_dir, name))
        except Exception:  # deleted (or no longer a valid name): not servable from the store
            current[name] = None
    kept = fdstore.reconcile(recovery, current, systemd.Notifier.from_env())
    built = {name: arena.build(arena.Manifest.from_json(m.manifest), m.fds) for name, m in kept.items()}
    serve_ms = (time.perf_counter() - started) * 1000

    equal = {}
    for name, obj in built.items():
        source = names.source_for(model_dir, name)
        reference = torch.load(source.path, weights_only=True)
        equal[name] = sorted(obj) == sorted(reference) and all(torch.equal(obj[k], reference[k]) for k in reference)
    print(json.dumps({
        "kept": sorted(kept),
        "generations": {n: m.generation for n, m in kept.items()},
        "extra": {n: m.extra for n, m in kept.items()},
        "equal": equal,
        "stale": sorted(recovery.stale),
        "problems": recovery.problems,
        "others": {k: len(v) for k, v in recovery.others.items()},
        "serve_ms": serve_ms,
    }))


if __name__ == "__main__":
    main()
