"""GPU residency: uploading sealed segments onto a CUDA device and sharing them with clients.

The only part of devmapd that calls CUDA. Imported lazily, only when a real GPU is in play, so
that CPU-only daemons and clients never pay for it.

May import: ``devmapd.engine`` and torch.
"""
