"""The run's components built from its configuration, once per process: models, samplers, the
judge, the alignment encoder.

A worker serves many shards with one copy of each (`cached`), so every builder here is keyed by
what decides the component. `sampler_for` is the one way to get a sampler for (model, optional
LoRA adapter, backend): candidate sampling, evaluation and IPA's policy all call it, and each
backend applies an adapter in one way: merged into the weights in process (transformers), a
`LoRARequest` per call (vllm), or an adapter the server serves or loads (openai). Limit: the cache
lives as long as the process; `release_engines` (engines, before training),
`release_training_memory` (training, before an engine) and `forget` are how GPU memory is handed back.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from m3po_core.config import RunConfig
from m3po_core.stages.runner import device_slot, fingerprint
from m3po_core.store import RunStore

log = logging.getLogger("m3po.components")

_MODELS: dict[tuple, Any] = {}
STORE_REF = "store:"


def resolve_model(store: RunStore, ref: str) -> str:
    """A local path or hub name for a model reference. `store:_models/...` references name models
    built here, kept beside the runs: every worker resolves them to its own local copy, so cache
    keys (which contain the reference) agree across machines."""
    return store.local_dir(ref[len(STORE_REF):], shared=True) if ref.startswith(STORE_REF) else ref


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Build a component once per process under `key` (its first element names its kind)."""
    with device_slot():
        if key not in _MODELS:
            t0 = time.time()
            _MODELS[key] = build()
            log.info("loaded %s %s in this process (pid %d) in %.1fs", key[0], key[1], os.getpid(), time.time() - t0)
        return _MODELS[key]


def forget(kind: str, keep: tuple | None = None) -> int:
    """Drop this process's components of one kind (but `keep`); returns how many were dropped."""
    gone = [k for k in _MODELS if k[0] == kind and k != keep]
    for k in gone:
        del _MODELS[k]
    return len(gone)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -------------------------------------------------------------------------------------------------
# Models and samplers


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in the run's store."""

    rel: str                          # its directory in the store
    version: str                      # the cache key it was trained under: names its merged copy / served name
    label: str = "m3po"               # prefix of the name an OpenAI-compatible server loads it under
    served_name: str | None = None    # already served under this name (vllm serve --lora-modules NAME=DIR)


def vlm(cfg: RunConfig, store: RunStore, model_ref: str):
    """The base policy (model, processor) in this process."""
    from m3po_core.models import load_vlm

    return cached(("vlm", model_ref, cfg.model.device, cfg.model.dtype),
                  lambda: load_vlm(resolve_model(store, model_ref), cfg.model.device, cfg.model.dtype))


def processor_for(cfg: RunConfig, store: RunStore, model_ref: str):
    """The policy's processor, for texts that must become the tokens training feeds."""
    if cfg.sampling.backend == "transformers":
        return vlm(cfg, store, model_ref)[1]

    def build():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(resolve_model(store, model_ref))

    return cached(("processor", model_ref), build)


def vllm_engine(cfg: RunConfig, store: RunStore, model_ref: str):
    """One vLLM engine per process and base model, LoRA enabled so evaluation reuses it for the adapter."""
    from m3po_core.sampling.vllm_backend import VLLMSampler

    s = cfg.sampling

    def build():
        # vLLM refuses to start unless gpu_memory_utilization of the GPU is free: what a training in
        # this process left (trainer, optimizer, its model copy, the allocator's cache) goes first
        release_training_memory()
        return VLLMSampler(resolve_model(store, model_ref), tensor_parallel_size=s.tensor_parallel_size,
                           dtype=cfg.model.dtype, max_model_len=s.max_model_len,
                           gpu_memory_utilization=s.gpu_memory_utilization, enable_lora=True,
                           # vLLM accepts only these ranks as the engine's maximum
                           max_lora_rank=next(r for r in (8, 16, 32, 64, 128, 256, 320, 512)
                                              if r >= cfg.training.lora_r), seed=s.seed)

    return cached(("vllm", model_ref, cfg.model.dtype), build)


def _merged_vlm(cfg: RunConfig, store: RunStore, model_ref: str, adapter: Adapter):
    """Base + adapter with the LoRA weights merged in: one merged model per process (the previous
    adapter's is dropped when another is asked for)."""
    def build():
        from peft import PeftModel

        from m3po_core.models import load_vlm

        release_training_memory()  # a second copy of the weights: the training's must be gone first
        model, processor = load_vlm(resolve_model(store, model_ref), cfg.model.device, cfg.model.dtype)
        model = PeftModel.from_pretrained(model, store.local_dir(adapter.rel)).merge_and_unload()
        model.eval()
        return model, processor

    key = ("vlm+adapter", model_ref, adapter.version)
    forget("vlm+adapter", keep=key)
    return cached(key, build)


def sampler_for(cfg: RunConfig, store: RunStore, model_ref: str, adapter: Adapter | None = None,
                backend: str | None = None):
    """The sampler of `model_ref` (with `adapter` applied) through `backend` (default: the sampling
    backend). Its `sample` draws candidates and its `greedy` answers benchmarks."""
    from m3po_core.sampling import AdapterSampler

    backend = backend or cfg.sampling.backend
    s = cfg.sampling
    if backend == "vllm":
        engine = vllm_engine(cfg, store, model_ref)
        return engine if adapter is None else AdapterSampler(engine, store.local_dir(adapter.rel))
    if backend == "openai":
        from m3po_core.sampling.openai_backend import OpenAICompatibleSampler, load_lora_adapter

        if adapter is None:
            served = s.served_model or model_ref
            return cached(("openai-sampler", s.base_url, served),
                          lambda: OpenAICompatibleSampler(model=served, base_url=s.base_url,
                                                          api_key_env=s.api_key_env, concurrency=s.concurrency))
        served = adapter.served_name or load_lora_adapter(
            s.base_url, s.api_key_env, f"{adapter.label}-{store.run_id}-{adapter.version[:8]}",
            store.local_dir(adapter.rel))
        return OpenAICompatibleSampler(model=served, base_url=s.base_url, api_key_env=s.api_key_env,
                                       concurrency=s.concurrency)
    if backend != "transformers":
        raise ValueError(f"unknown sampling backend {backend!r}")
    from m3po_core.sampling.transformers_backend import TransformersSampler

    model, processor = vlm(cfg, store, model_ref) if adapter is None else _merged_vlm(cfg, store, model_ref, adapter)
    return TransformersSampler(model, processor)


def release_engines() -> None:
    """Shut down this process's vLLM engines (they reserve `gpu_memory_utilization` of the GPU);
    evaluation builds one again when it needs it."""
    engines = [k for k in _MODELS if k[0] == "vllm"]
    if not engines:
        return
    for k in engines:
        engine = _MODELS.pop(k)
        shutdown = getattr(getattr(engine, "llm", None), "llm_engine", None)
        if shutdown is not None and hasattr(shutdown, "engine_core"):
            shutdown.engine_core.shutdown()  # V1 runs the engine core in a process of its own
        del engine
    _collect_and_return_cache()
    log.info("released %d vLLM engine(s) before training", len(engines))


def release_training_memory() -> None:
    """The other direction: hand the GPU from a training in this process to the next vLLM engine.
    The LoRA-injected model copy holds reference cycles once PEFT and TRL have wrapped it, so only
    the cycle collector frees it, and the CUDA allocator keeps freed blocks cached in this process,
    where vLLM's start-up check counts them as used. `vllm_engine` calls this before every engine
    it builds (and `_merged_vlm` before its merged copy), `train_lora_dpo` when it returns. Limit:
    it frees only what nothing references any more; a model the caller still holds stays."""
    freed = _collect_and_return_cache()
    if freed is not None:
        log.info("released training memory: %.2f GiB still allocated by this process, %.2f GiB free on the GPU",
                 *freed)


def _collect_and_return_cache() -> tuple[float, float] | None:
    """gc, then the CUDA allocator's cached blocks back to the driver; (allocated, free) GiB when
    this process has a CUDA context. None is created here: it costs ~0.5 GiB, and vLLM starts its
    workers by spawn instead of fork once the parent has one."""
    import gc

    gc.collect()
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()   # the next stage's peak is its own
    free, _ = torch.cuda.mem_get_info()
    return torch.cuda.memory_allocated() / 2**30, free / 2**30


# -------------------------------------------------------------------------------------------------
# Scoring


def judge(cfg: RunConfig, store: RunStore):
    """The configured judge; a model judge caches its ratings beside the runs (or in the local
    cache for a remote store)."""
    from m3po_core.scoring.mas import make_judge

    cache = store.shared_path("_judge_cache") if store.is_local else \
        str(Path(os.environ.get("M3PO_CACHE", Path(tempfile.gettempdir()) / "m3po-cache")) / "judge")
    return cached(("judge", fingerprint(cfg.scoring)), lambda: make_judge(cfg.scoring, cache_dir=cache))


def clip_encoder(cfg: RunConfig, store: RunStore, clip_ref: str):
    """The alignment encoder of MAS (with `scoring.extra_encoders`, their ensemble)."""
    from m3po_core.scoring.clip import load_encoder

    device = "cuda" if cfg.model.device in ("auto", "cuda") and has_cuda() else "cpu"
    main = cached(("clip", clip_ref, cfg.scoring.clip.pretrained),
                  lambda: load_encoder(resolve_model(store, clip_ref), cfg.scoring.clip.pretrained, device))
    if not cfg.scoring.extra_encoders:
        return main
    from m3po_core.scoring.ensemble import EncoderEnsemble

    return EncoderEnsemble([main] + [cached(("clip", e.name, e.pretrained),
                                            lambda e=e: load_encoder(e.name, e.pretrained, device))
                                     for e in cfg.scoring.extra_encoders],
                           [cfg.scoring.cosine_mapping(n) for n in [cfg.scoring.clip.name,
                                                                    *(e.name for e in cfg.scoring.extra_encoders)]])
