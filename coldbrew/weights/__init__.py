"""Model weights: an object store of content-addressed blobs, a node-local cache, zero-copy loading.

`coldbrew.weights.tensors` is not imported here because it needs numpy, which the gateway
should not pay for at start-up.
"""

from coldbrew.weights.cache import CacheEntry, NodeCache, default_cache_max_bytes
from coldbrew.weights.store import (FileEntry, Manifest, ObjectStore, TransferStats,
                                    default_store_uri, validate_model_name)

__all__ = [
    "CacheEntry",
    "FileEntry",
    "Manifest",
    "NodeCache",
    "ObjectStore",
    "TransferStats",
    "default_cache_max_bytes",
    "default_store_uri",
    "validate_model_name",
]
