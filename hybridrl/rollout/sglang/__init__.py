"""`rollout.name=sglang`: a real SGLang server (launched or attached), driven over its HTTP API.

    engine.py     SGLangEngine, the RolloutEngine protocol over HTTP: generate, update_weights, sleep, close
    transport.py  how one weight sync travels: TensorTransport (CUDA IPC / CPU bytes), DiskTransport,
                  NcclTransport (disaggregated: the trainer broadcasts from rank 0); one per engine
    launch.py     start `python -m sglang.launch_server` as a child process group, wait for /health, stop it
    client.py     the pooled, timed, retried aiohttp client (4xx raise at once, 5xx and dropped sockets retry)
    compat.py     which SGLang versions we drive (>=0.4.8,<0.6) and what moved between them

The same engine drives `hybridrl serve` (our native engine behind SGLang's HTTP subset), which the
CPU tests use. Nothing here imports the `sglang` package at import time: only a real server's
tensor or NCCL push does, inside the call that needs it.
"""
