"""Adapter store: object storage -> validated adapters in host memory, one per GPU node.

    ids.py      adapter id syntax (shared with ingest)
    source.py   reading an adapter's files (local or S3, via obstore), sizes checked first
    cache.py    the core: byte-budgeted LRU, single-flight loads, negative cache
    store.py    AdapterStore: in-process, get(id) -> LoraWeights
    shm.py      SharedMemoryStore: canonical files in the node's shared host-memory folder
    server.py   the store process (run_adapter_store) and its TCP protocol (protocol.py)
    client.py   AdapterStoreClient: what engines use

Nothing is imported here, so `lorafleet.common.ids` stays cheap for ingest (no torch).
"""
