"""Offline teacher cache: a class sampler's targets per sample and position, content-keyed and verifiable.

Re-exports are lazy (PEP 562) so `sekd-cache verify | ls | stats` start without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "TeacherCache": "store",
    "CacheError": "store",
    "data_signature": "store",
    "shard_of": "store",
    "build_cache": "build",
    "build_caches": "build",
    "CacheKind": "kinds",
    "cache_kind": "kinds",
    "parse_kind": "kinds",
    "worker_shards": "build",
    "rs_kd_draws": "draws",
    "sample_generator": "draws",
    "to_sparse": "draws",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sekd.stores.teacher_cache' has no attribute {name!r}")
    return getattr(import_module(f"sekd.stores.teacher_cache.{_EXPORTS[name]}"), name)
