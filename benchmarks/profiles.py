"""Sizes and repeat counts of the full run, ``--quick`` and the toy run of the smoke test."""
from __future__ import annotations

from dataclasses import asdict, dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Profile:
    name: str
    big_bytes: int            # the "1 GiB / ~200 tensors" model
    big_tensors: int
    small_tensors: int        # the "~4,000 small tensors" model
    small_bytes: int
    fetch_repeats: int        # fresh client processes per (method, model)
    pss_clients: int          # processes holding the model at once
    pss_bytes: int            # wanted size of the model they hold (capped by free memory)
    cold_repeats: int
    watch_repeats: int
    watch_bytes: int
    idle_models: int
    idle_model_bytes: int
    idle_window_s: float
    scale_points: tuple[int, ...]
    status_calls: int         # status requests timed per scale point
    tf_layers: int            # the transformer-shaped fp16 model: 16 tensors a layer + 4
    tf_hidden: int
    tf_vocab: int
    hf_hidden: int            # the Hugging Face BERT directory (all-MiniLM-L6-v2's shape in full)
    hf_layers: int
    hf_vocab: int
    ready_repeats: int        # fresh processes per method for time-to-model-ready
    ready_clients: int        # processes holding a ready model at once (PSS)

    def to_json(self) -> dict:
        return asdict(self)


FULL = Profile("full", big_bytes=GiB, big_tensors=200, small_tensors=4000, small_bytes=16 * MiB,
               fetch_repeats=7, pss_clients=8, pss_bytes=GiB, cold_repeats=5, watch_repeats=3,
               watch_bytes=64 * MiB, idle_models=50, idle_model_bytes=2 * MiB, idle_window_s=10.0,
               scale_points=(1, 10, 100, 1000), status_calls=50,
               tf_layers=18, tf_hidden=1024, tf_vocab=32000, hf_hidden=384, hf_layers=6, hf_vocab=30522,
               ready_repeats=5, ready_clients=4)
QUICK = Profile("quick", big_bytes=256 * MiB, big_tensors=200, small_tensors=4000, small_bytes=16 * MiB,
                fetch_repeats=3, pss_clients=8, pss_bytes=128 * MiB, cold_repeats=3, watch_repeats=2,
                watch_bytes=16 * MiB, idle_models=50, idle_model_bytes=256 << 10, idle_window_s=4.0,
                scale_points=(1, 10, 100), status_calls=20,
                tf_layers=8, tf_hidden=512, tf_vocab=8000, hf_hidden=384, hf_layers=6, hf_vocab=30522,
                ready_repeats=3, ready_clients=4)
# The smoke test: every code path, nothing measured worth reading.
TOY = Profile("toy", big_bytes=4 * MiB, big_tensors=20, small_tensors=200, small_bytes=MiB,
              fetch_repeats=1, pss_clients=2, pss_bytes=4 * MiB, cold_repeats=1, watch_repeats=1,
              watch_bytes=MiB, idle_models=3, idle_model_bytes=64 << 10, idle_window_s=0.5,
              scale_points=(1, 3), status_calls=3,
              tf_layers=2, tf_hidden=64, tf_vocab=500, hf_hidden=48, hf_layers=2, hf_vocab=500,
              ready_repeats=1, ready_clients=2)

PROFILES = {p.name: p for p in (FULL, QUICK, TOY)}
