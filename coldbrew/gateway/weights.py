"""The gateway's side of model weights: resolve a spec's `weights` to a folder in the node cache.

Each function version is pinned to the manifest digest it saw when it was first
prepared. Pushing a new model under the same name therefore changes nothing for versions
already deployed, whose zygote and new instances keep the same files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from coldbrew.errors import InvalidSpec, ModelNotFound
from coldbrew.spec import Deployment
from coldbrew.weights.cache import NodeCache
from coldbrew.weights.store import Manifest, ObjectStore

logger = logging.getLogger("coldbrew.weights")


class WeightsResolver:
    """Pulls each deployment's weights into the node cache once and returns their folder."""

    def __init__(self, store_uri: str, cache: NodeCache) -> None:
        self.store_uri = store_uri
        self.cache = cache
        self._stores: dict[str, ObjectStore] = {}
        self._pinned: dict[tuple[str, int], tuple[ObjectStore, Manifest]] = {}
        self._lock = asyncio.Lock()

    def store(self, uri: str | None = None) -> ObjectStore:
        uri = uri or self.store_uri
        if uri not in self._stores:
            self._stores[uri] = ObjectStore(uri)
        return self._stores[uri]

    async def __call__(self, deployment: Deployment) -> str:
        store, manifest = await self._pin(deployment)
        started = time.perf_counter()
        downloads = len(self.cache.downloads)
        path: Path = await asyncio.to_thread(self.cache.ensure_manifest, store, manifest)
        if len(self.cache.downloads) > downloads:
            stats = self.cache.downloads[-1]
            logger.info("function=%s weights=%s digest=%s pulled %d bytes in %.2f s",
                        deployment.name, manifest.name, manifest.digest[:12], stats.bytes,
                        time.perf_counter() - started)
        return str(path)

    async def _pin(self, deployment: Deployment) -> tuple[ObjectStore, Manifest]:
        key = (deployment.name, deployment.version)
        async with self._lock:
            if key not in self._pinned:
                store, name = self._locate(deployment.spec.weights or "")
                try:
                    manifest = await asyncio.to_thread(store.manifest, name)
                except ModelNotFound:
                    raise InvalidSpec(
                        f"weights {deployment.spec.weights!r} of function {deployment.name!r} "
                        f"are not in the server's object store {store.uri}; push them there "
                        f"with 'coldbrew models push {name} PATH --store {store.uri}'",
                        field="weights") from None
                self._pinned[key] = (store, manifest)
            return self._pinned[key]

    def _locate(self, reference: str) -> tuple[ObjectStore, str]:
        # "name" is a model in the server's store; "s3://bucket/prefix/name" names the store.
        if "://" in reference:
            uri, name = reference.rsplit("/", 1)
            return self.store(uri), name
        return self.store(), reference

    def forget(self, deployment: Deployment) -> None:
        self._pinned.pop((deployment.name, deployment.version), None)
