"""The checkpoint engine: everything that understands a checkpoint file, and nothing else.

Owns the formats (torch zip, legacy, safetensors, Hugging Face directories, TorchScript
recognition), metadata-first inspection, the one-pass read into sealed memfd segments,
normalisation (prefixes, dtypes), diagnoses, the structure codec (``tree``), the manifest and
arena (``arena``) and ``map_location`` semantics (``mapping``).

May import: the standard library, torch, safetensors' format (by hand), and itself. Never the
daemon, the wire, devices, the service layer or the GPU package; the client imports the parts
it needs (``arena``, ``tree``, ``mapping``) without pulling the rest.
"""
