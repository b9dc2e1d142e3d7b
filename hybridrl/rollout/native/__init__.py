"""The native rollout engine: pure PyTorch, CPU and GPU, the reference every other backend is checked against.

engine.py (NativeEngine, the async RolloutEngine) -> scheduler.py (continuous batching) ->
runner.py (model + paged KV pool + CUDA graphs) -> model.py / attention.py / sampler.py;
loader.py maps Hugging Face weight names; kv_cache.py sizes and manages the pool; server.py serves it over HTTP.
"""
