"""Checkpoint formats: each module turns one kind of file into a ``Parsed`` structure.

A ``Parsed`` holds the checkpoint's object tree with META tensors (true shape, stride, offset and
dtype, no data) and one ``StorageRec`` per distinct storage saying where its bytes lie in which
file. Nothing in this package reads tensor data; ``checkpoint.read`` copies the bytes afterwards.

Modules: ``common`` (records, fd reader, file opening), ``detect`` (what a file is), ``pickles``
(weights-only unpickling into meta storages), ``torchzip``, ``legacy``, ``safetensors``,
``hfdir`` (Hugging Face directories), ``torchscript`` (recognition only).
"""
