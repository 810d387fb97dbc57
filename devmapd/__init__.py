"""devmapd: preloaded PyTorch checkpoints, shared zero-copy over a Unix socket."""
__version__ = "0.1.0"
