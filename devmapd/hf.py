"""``devmapd.hf.from_pretrained``: a served Hugging Face model, ready to run, zero-copy.

Needs the optional extra ``devmapd[hf]`` (transformers); ``import devmapd`` never imports this.

The daemon ships the directory's small JSON side files (``config.json``,
``generation_config.json``) with the fetch, so the client needs no read access to the model
directory. The model is built from that config without initialising its weights
(transformers' ``no_init_weights``: the parameters are allocated but never written, so their
pages are never touched), then its parameters and buffers BECOME the served tensors
(``devmapd.engine.assign``: assign, no copy), with transformers' base-model prefix rule and its
weight tying, and put in eval mode. Non-persistent buffers (position ids, rotary tables) are
computed by the model's own ``__init__``, as transformers does.
"""
from __future__ import annotations

import warnings
from typing import Any

from devmapd import client as _client

__all__ = ["from_pretrained", "TooOldDaemon"]


class TooOldDaemon(_client.DevmapdError):
    """The daemon does not ship a served directory's config.json with a fetch."""
    code = "too_old"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("devmapd.hf needs transformers: pip install 'devmapd[hf]'") from None
    return transformers


def side_files(reply: dict) -> dict[str, Any]:
    """The side files a fetch reply carries (``{"config.json": {...}, ...}``), else {}."""
    files = reply.get("side_files")
    return files if isinstance(files, dict) else {}


def _resolve_class(tf: Any, model_class: Any, config: Any) -> Any:
    cls = tf.AutoModel if model_class is None else model_class
    mapping = getattr(cls, "_model_mapping", None)   # an Auto* class: pick the concrete one
    if mapping is not None:
        try:
            cls = mapping[type(config)]
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model class for a {type(config).__name__}; "
                             "pass model_class= explicitly") from None
    return cls


def _match_prefix(sd: dict, expected: set[str], prefix: str) -> dict:
    """transformers' base-model prefix rule: a head model loads a base checkpoint (keys gain
    ``prefix.``) and a base model loads a head checkpoint (its ``prefix.`` keys, heads dropped)."""
    if not prefix:
        return sd
    dot = prefix + "."
    model_has = any(k.startswith(dot) for k in expected)
    ckpt_has = any(k.startswith(dot) for k in sd)
    if ckpt_has and not model_has:
        return {k[len(dot):] if k.startswith(dot) else k: v for k, v in sd.items()}
    if model_has and not ckpt_has:
        return {dot + k if dot + k in expected else k: v for k, v in sd.items()}
    return sd


def from_pretrained(name: str, *, model_class: Any = None, socket: str | None = None,
                    **kwargs: Any) -> Any:
    """The served Hugging Face model ``name`` (a directory the daemon serves), ready to run.

    ``model_class`` is a transformers model class or Auto class (default ``AutoModel``, as
    ``transformers.AutoModel.from_pretrained``); ``kwargs`` override config attributes, as
    ``from_pretrained``'s do. The weights are the daemon's, shared (copy-on-write) with every
    other process holding the model. Raises TooOldDaemon when the daemon sends no config.json,
    devmapd.engine.assign.AssignError when the checkpoint does not fit the class (missing
    weights are an error here: transformers would initialise them randomly).
    """
    tf = _transformers()
    from devmapd.engine import assign

    shown = repr(str(name))
    obj, reply = _client._shared_client(socket).fetch_with_reply(name)
    files = side_files(reply)
    config_dict = files.get("config.json")
    if not isinstance(config_dict, dict):
        raise TooOldDaemon(f"the devmapd daemon did not send config.json with {shown}: either it "
                           "is too old to ship a served directory's side files (upgrade the "
                           "daemon), or the model is not a Hugging Face directory with a "
                           "config.json. Build the model yourself and use devmapd.load_into")
    model_type = config_dict.get("model_type")
    try:
        config_cls = tf.CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"config.json of {shown} names model_type {model_type!r}, which this "
                         f"transformers ({tf.__version__}) does not know") from None
    config = config_cls.from_dict(dict(config_dict), **kwargs)
    cls = _resolve_class(tf, model_class, config)

    from transformers.initialization import no_init_weights
    with no_init_weights():
        model = cls(config)

    sd = assign.strip_prefixes(assign.state_dict_of(obj, f"devmapd model {shown}"))
    expected = set(model.state_dict(keep_vars=True))
    sd = _match_prefix(dict(sd), expected, getattr(cls, "base_model_prefix", ""))
    unexpected = sorted(set(sd) - expected)
    for k in unexpected:
        del sd[k]
    assign.assign_state_dict(model, sd, strict=False, what=f"devmapd model {shown}",
                             check_meta=False)
    model.tie_weights()
    # A missing weight is fine only when tying made it one of the loaded ones.
    loaded = {id(model.get_parameter_or_buffer(k)) for k in sd}
    missing = sorted(k for k in expected - set(sd)
                     if id(model.get_parameter_or_buffer(k)) not in loaded)
    if unexpected:
        warnings.warn(f"devmapd model {shown}: {len(unexpected)} served tensor(s) not used by "
                      f"{cls.__name__} (e.g. {unexpected[0]}); a head the class lacks",
                      UserWarning, stacklevel=2)
    if missing:
        shown_keys = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise assign.AssignError(
            f"devmapd model {shown} has no weights for {len(missing)} tensor(s) of "
            f"{cls.__name__}: {shown_keys}. Pass the model_class the checkpoint was saved from "
            f"(config.json says {config_dict.get('architectures')!r})")
    gen = files.get("generation_config.json")
    if isinstance(gen, dict) and getattr(model, "generation_config", None) is not None:
        model.generation_config = tf.GenerationConfig.from_dict(dict(gen))
    model.eval()
    return model
