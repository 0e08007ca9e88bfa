"""What the `model` field can name: the base model, or any adapter id under the adapter root.

GET /v1/models lists the base model first, then every adapter under the root in id order, in
pages (`limit`, `after`: the last id of the previous page; `has_more` says whether one follows),
from a listing of the root reused for `models_cache_s` (a root of many thousands of adapters is
listed once per interval, not per call; one listing at a time). A `model` that is neither the
base nor a valid adapter id is a 404 here; a valid id that the root lacks is the engines' 404
(`adapter_not_found`), so an adapter pushed a moment ago is served before the next listing.
"""

from __future__ import annotations

import asyncio
import time

import obstore

from lorafleet.common.adapter_root import S3Options, adapter_sizes, open_root
from lorafleet.common.contract import adapter_id_problem
from lorafleet.gateway.errors import ApiError

MAX_PAGE = 1000
DEFAULT_PAGE = 100
OWNER = "lorafleet"


class ModelCatalog:
    def __init__(self, base_name: str, adapters_root: str, cache_s: float) -> None:
        self.base_name = base_name
        self._store = open_root(adapters_root, S3Options.from_env()) if adapters_root else None
        self._cache_s = cache_s
        self._ids: list[str] = []
        self._listed_at = float("-inf")
        self._created = int(time.time())
        self._lock = asyncio.Lock()

    def adapter_of(self, model: str) -> str | None:
        """The adapter a `model` field names (None: the base model)."""
        if model == self.base_name:
            return None
        problem = adapter_id_problem(model)
        if problem:
            raise ApiError(404, f"the model {model!r} does not exist: it is not {self.base_name!r} (the base model) "
                           f"and not an adapter id ({problem}).", code="model_not_found", param="model")
        return model

    async def adapter_ids(self) -> list[str]:
        if self._store is None:
            return []
        async with self._lock:
            if time.monotonic() - self._listed_at > self._cache_s:
                objects = [obj async for batch in obstore.list(self._store) for obj in batch]
                self._ids = [adapter_id for adapter_id, _ in adapter_sizes(objects)]
                self._listed_at = time.monotonic()
        return self._ids

    def card(self, model_id: str) -> dict:
        card = {"id": model_id, "object": "model", "created": self._created, "owned_by": OWNER}
        if model_id != self.base_name:
            card["parent"] = self.base_name  # an adapter of the base model (vLLM's field for LoRA modules)
        return card

    async def page(self, after: str | None, limit: int) -> dict:
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(400, f"limit must be 1 to {MAX_PAGE}, got {limit}.", param="limit")
        try:
            ids = [self.base_name] + await self.adapter_ids()
        except Exception as exc:  # storage unreachable: the client may retry
            raise ApiError(503, f"the adapter root could not be listed: {type(exc).__name__}: {exc}"[:300],
                           code="unavailable") from None
        start = 0
        if after is not None:
            if after not in ids:
                raise ApiError(400, f"after {after!r} is not a model id of this listing.", param="after")
            start = ids.index(after) + 1
        chosen = ids[start:start + limit]
        return {"object": "list", "data": [self.card(i) for i in chosen], "has_more": start + limit < len(ids),
                "first_id": chosen[0] if chosen else None, "last_id": chosen[-1] if chosen else None}

    async def model(self, model_id: str) -> dict:
        if model_id == self.base_name or model_id in await self.adapter_ids():
            return self.card(model_id)
        raise ApiError(404, f"the model {model_id!r} does not exist.", code="model_not_found", param="model")
