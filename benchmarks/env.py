"""The benchmark workspace: sample checkpoints under one temp dir and the daemon serving them.

Files are written with ``devmapd.samples.big`` (the same weights as .pt for the daemon and the
torch peers and as .safetensors for the safetensors peer). The daemon's model dir holds only the
.pt files; the safetensors copies sit beside it, unwatched.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Daemon, mem_available, start_daemon
from benchmarks.profiles import MiB, Profile


@dataclass
class Env:
    profile: Profile
    base: Path
    daemon: Daemon | None = None
    pss_model: str = "big"
    pss_bytes: int = 0
    daemons: list[Daemon] = field(default_factory=list)   # every daemon started, stopped at close

    @property
    def models(self) -> Path:
        return self.base / "serve" / "models"

    @property
    def peers(self) -> Path:
        return self.base / "peers"

    @property
    def socket(self) -> str:
        assert self.daemon is not None
        return self.daemon.socket

    @classmethod
    def create(cls, profile: Profile, tmp: str | None = None) -> Env:
        return cls(profile, Path(tempfile.mkdtemp(prefix="devmapd-bench-", dir=tmp or "/tmp")))

    def write_models(self) -> None:
        from devmapd import samples
        p = self.profile
        self.models.mkdir(parents=True, exist_ok=True)
        self.peers.mkdir(parents=True, exist_ok=True)
        for name, nbytes, count in (("big", p.big_bytes, p.big_tensors), ("small", p.small_bytes, p.small_tensors)):
            samples.big(self.models, nbytes, count, name=f"{name}.pt")
            samples.big(self.peers, nbytes, count, name=f"{name}.safetensors", fmt="safetensors")
        from benchmarks import ready
        ready.write_tf(self.models / "tf.pt", self.peers / "tf.safetensors",
                       p.tf_layers, p.tf_hidden, p.tf_vocab)
        try:   # the Hugging Face case needs the hf extra; without it that case reports the error
            import transformers  # noqa: F401
        except ImportError:
            pass
        else:
            ready.write_hf(self.base / "hfserve" / "minilm", p.hf_hidden, p.hf_layers, p.hf_vocab)
        # N processes each holding a private copy (the torch.load side) must fit in memory with
        # room to spare on a shared machine: shrink the model they hold if it would not.
        room = mem_available() // (p.pss_clients + 4)
        self.pss_bytes = p.pss_bytes if p.pss_bytes <= room else max(MiB, room // MiB * MiB)
        if self.pss_bytes == p.big_bytes:
            self.pss_model = "big"
        else:
            self.pss_model = "pss"
            samples.big(self.models, self.pss_bytes, p.big_tensors, name="pss.pt")

    def model_count(self) -> int:
        return len(list(self.models.glob("*.pt")))

    def start(self, *, gpus: list | None = None) -> Daemon:
        self.daemon = start_daemon(self.base / "serve", self.models, gpus)
        self.daemons.append(self.daemon)
        return self.daemon

    def close(self, keep: bool = False) -> None:
        for d in self.daemons:
            d.stop()
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)
