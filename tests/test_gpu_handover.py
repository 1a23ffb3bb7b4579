"""GPU memory discipline of training, on the CPU (issue 15): after a training in this process the
trainer's tensors and its model copy are gone before the next vLLM engine is built (the order of
calls, recorded around the real functions), and the global batch TRL trains with is
per_device_batch_size x num_processes x gradient_accumulation_steps.

Real tiny trainings throughout; the one stand-in is the vLLM engine itself (vLLM does not run on
a CPU), recorded where `components.vllm_engine` constructs it. Automatic garbage collection is
off while a training runs, so only the explicit collections under test free reference cycles.
"""
import gc
import weakref
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import trl

from m3po_core import components, schema
from m3po_core.config import ConfigError, TrainingConfig, batch_split, load_config
from m3po_core.models import completion_ids
from m3po_core.stages.runner import stage_config
from m3po_core.training import dpo_config, pairs_dataset, train_lora_dpo

TINY = Path(__file__).parent / "tiny.yaml"
ANSWERS = [("yes", "no"), ("red cube", "blue"), ("no", "yes there is"), ("two", "three red"), ("yes", "no"),
           ("blue sphere", "red")]


def pairs_for(processor):
    return [{"prompt_id": f"p{i}", "chosen": c, "rejected": r,
             "chosen_token_ids": completion_ids(processor, c, add_eos=True),
             "rejected_token_ids": completion_ids(processor, r, add_eos=True)} for i, (c, r) in enumerate(ANSWERS)]


@contextmanager
def no_automatic_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Recorder:
    """Records the trainer TRL builds through a subclass of the real DPOTrainer: its arguments, and
    weak references to what it owns (itself, its optimizer and the optimizer's state tensors) and
    to the model copy it trained (the PEFT model and its LoRA parameters)."""

    def __init__(self, monkeypatch):
        self.args, self.trainer_refs, self.model_refs, self.checkpointing = [], [], [], []
        recorder = self

        class RecordingDPOTrainer(trl.DPOTrainer):
            def train(self, *a, **k):
                recorder.args.append(self.args)
                out = super().train(*a, **k)
                recorder.checkpointing.append(self.model.is_gradient_checkpointing)
                state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
                lora = [p for n, p in self.model.named_parameters() if "lora_" in n]
                recorder.trainer_refs += [weakref.ref(o) for o in (self, self.optimizer, *state)]
                recorder.model_refs += [weakref.ref(o) for o in (self.model, *lora)]
                return out

        monkeypatch.setattr(trl, "DPOTrainer", RecordingDPOTrainer)

    def alive(self, refs=None) -> int:
        return sum(r() is not None for r in (self.trainer_refs + self.model_refs if refs is None else refs))


def train_tiny(monkeypatch, tmp_path, world_batch, **training):
    """One real LoRA-DPO training of a fresh tiny LLaVA; (history, recorder, the model's weakref,
    trainer references alive on return, model alive after the caller drops it, without a collection)."""
    from m3po_core.data import synthetic as world
    from m3po_core.models import build_tiny_llava

    images, instructions = world_batch
    rec = Recorder(monkeypatch)
    with no_automatic_gc():
        model, processor = build_tiny_llava(world.vocabulary(), seed=0)
        dataset = pairs_dataset(images, instructions, pairs_for(processor))
        cfg = TrainingConfig(learning_rate=1e-2, epochs=2, **training)
        history = train_lora_dpo(model, processor, dataset, cfg, str(tmp_path))
        trainer_alive = rec.alive(rec.trainer_refs)
        model_ref = weakref.ref(model)
        del model
        gc.collect()  # what `components.release_training_memory` runs before the next engine
    return history, rec, model_ref, trainer_alive


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


# ------------------------------------------------------------------------------ the hand-over


def test_training_memory_is_released_before_the_next_engine_is_built(monkeypatch, tmp_path, tiny_vlm, world_batch):
    """The train stage, then evaluation's sampler on the vllm backend, in one process: at the moment
    the engine is constructed, the trainer, its optimizer state, its PEFT model and the model copy's
    LoRA parameters are all gone, and the release ran just before it."""
    from m3po_core.models import save_vlm
    from m3po_core.sampling import vllm_backend
    from m3po_core.stages import train as train_stage
    from m3po_core.store import RunStore

    model, processor = tiny_vlm
    images, instructions = world_batch
    save_vlm(model, processor, str(tmp_path / "model"))
    rows = []
    for i, (p, q) in enumerate(zip(pairs_for(processor), instructions)):
        images[i].save(tmp_path / f"img{i}.png")
        rows.append({**p, "image": str(tmp_path / f"img{i}.png"), "instruction": q, "chosen_idx": 0,
                     "rejected_idx": 1, "mas_chosen": 1.0, "mas_rejected": 0.0, "logp_chosen": -1.0,
                     "logp_rejected": -2.0, "m3p_score": 1.0, "strategy": "m3po"})
    store = RunStore(str(tmp_path), "r")
    store.write_table("pairs.parquet", pa.Table.from_pylist(rows, schema=schema.PAIRS), schema.PAIRS)
    store.write_json("pairs_stats.json", {"sha256": "test", "pairs": len(rows)})
    cfg = load_config(TINY, ["model.device=cpu", "training.batch_size=4", "training.per_device_batch_size=2"])

    events, rec = [], Recorder(monkeypatch)
    real_release = components.release_training_memory

    def recording_release():
        real_release()
        events.append(("release", rec.alive()))

    class EngineStandIn:  # vLLM's engine does not run on a CPU: record when it would be built
        name = "vllm-stand-in"

        def __init__(self, model, **kwargs):
            events.append(("engine", rec.alive()))

    monkeypatch.setattr(components, "_MODELS", {})   # this test's engines only
    monkeypatch.setattr(components, "release_training_memory", recording_release)
    monkeypatch.setattr(vllm_backend, "VLLMSampler", EngineStandIn)
    with no_automatic_gc():
        result = train_stage.train(cfg, store, str(tmp_path / "model"))
        assert rec.model_refs and any(kind == "release" for kind, _ in events)   # train_lora_dpo released on return
        adapter = components.Adapter("adapter", result["key"])
        sampler = components.sampler_for(cfg, store, str(tmp_path / "model"), adapter, backend="vllm")
    assert sampler.name == "vllm-stand-in+lora"
    assert events[-2:] == [("release", 0), ("engine", 0)]   # released, nothing of the training left, then built
    assert (result["per_device_batch_size"], result["gradient_accumulation_steps"]) == (2, 2)
    assert len(losses(result["history"])) == 2                # 6 pairs / a global batch of 4
    # a second sampler reuses the engine: it is built once
    components.sampler_for(cfg, store, str(tmp_path / "model"), None, backend="vllm")
    assert [kind for kind, _ in events].count("engine") == 1


def test_no_reference_to_the_trained_model_remains(monkeypatch, tmp_path, world_batch):
    """train_lora_dpo drops its trainer (optimizer state and all) before it returns, with no automatic
    collection to help; the model copy dies as soon as the caller drops it and gc runs (it holds
    reference cycles, so only a collection frees it: the release before an engine runs one)."""
    history, rec, model_ref, trainer_alive = train_tiny(monkeypatch, tmp_path, world_batch, batch_size=2)
    assert len(rec.trainer_refs) > 10 and trainer_alive == 0
    assert model_ref() is None and rec.alive() == 0
    assert all(isinstance(v, (int, float, str)) for h in history for v in h.values())  # plain values only


def test_release_creates_no_cuda_context():
    """A process that never used CUDA gets no context from the release (vLLM would then spawn)."""
    before = torch.cuda.is_initialized()
    components.release_training_memory()
    assert torch.cuda.is_initialized() == before


# ------------------------------------------------------------------------------ the global batch


@pytest.fixture(scope="module")
def trainings(world_batch, tmp_path_factory):
    """Real tiny trainings at a global batch of 2: per-device 2 without accumulation, per-device 1
    with 2 accumulation steps, and per-device 2 with gradient checkpointing."""
    out = {}
    for name, kw in {"plain": {}, "accumulated": {"per_device_batch_size": 1},
                     "checkpointed": {"gradient_checkpointing": True}}.items():
        with pytest.MonkeyPatch.context() as mp:   # each recorder wraps the real DPOTrainer
            out[name] = train_tiny(mp, tmp_path_factory.mktemp(name), world_batch, batch_size=2, **kw)
    return out


@pytest.mark.parametrize("name, per_device, steps", [("plain", 2, 1), ("accumulated", 1, 2), ("checkpointed", 2, 1)])
def test_the_global_batch_trl_trains_with(trainings, name, per_device, steps):
    history, rec, _, _ = trainings[name]
    (args,) = rec.args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (per_device, steps)
    assert args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps == 2
    assert len(losses(history)) == 6                    # 6 pairs x 2 epochs / a global batch of 2
    # the same optimizer steps on the same data: accumulation and checkpointing change memory only
    assert losses(history) == pytest.approx(losses(trainings["plain"][0]), abs=1e-5)


def test_gradient_checkpointing_is_on_only_when_set(trainings):
    (plain,), (checkpointed,) = trainings["plain"][1].args, trainings["checkpointed"][1].args
    assert not plain.gradient_checkpointing and trainings["plain"][1].checkpointing == [False]
    assert checkpointed.gradient_checkpointing and trainings["checkpointed"][1].checkpointing == [True]
    assert checkpointed.gradient_checkpointing_kwargs == {"use_reentrant": False}


@pytest.mark.parametrize("batch, processes, per_device, want", [
    (8, 1, None, (8, 1)),      # the demo: as before the setting existed
    (8, 1, 2, (2, 4)),         # configs/llava15-7b.yaml
    (8, 1, 1, (1, 8)),         # configs/llava15-13b.yaml
    (8, 2, None, (4, 1)),
    (8, 2, 2, (2, 2)),
    (8, 4, 1, (1, 2)),
])
def test_batch_split_and_the_dpo_config_built_from_it(tmp_path, batch, processes, per_device, want):
    cfg = TrainingConfig(batch_size=batch, num_processes=processes, per_device_batch_size=per_device)
    assert batch_split(cfg) == want
    args = dpo_config(cfg, str(tmp_path), max_length=None, on_gpu=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == want
    assert args.per_device_train_batch_size * processes * args.gradient_accumulation_steps == batch


@pytest.mark.parametrize("overrides, keys", [
    (["training.per_device_batch_size=3"], ["training.batch_size", "training.per_device_batch_size"]),
    (["training.num_processes=2", "training.per_device_batch_size=3"], ["training.num_processes"]),
    (["training.per_device_batch_size=0"], ["training.per_device_batch_size"]),
    (["training.num_processes=3"], ["training.batch_size"]),
])
def test_a_batch_that_does_not_divide_is_refused_by_key(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["training.batch_size=8", *overrides])
    assert all(k in str(e.value) for k in keys)
    t = TrainingConfig(batch_size=8, per_device_batch_size=3)   # built in Python, never validated
    with pytest.raises(ConfigError, match="training.per_device_batch_size"):
        dpo_config(t, str(tmp_path), max_length=None, on_gpu=False)


def test_the_train_key_ignores_checkpointing_but_not_the_per_device_batch():
    base = load_config(TINY)
    key = stage_config(base, "train")
    assert "training.gradient_checkpointing" not in key and "training.per_device_batch_size" in key
    assert stage_config(load_config(TINY, ["training.gradient_checkpointing=true"]), "train") == key
    assert stage_config(load_config(TINY, ["training.per_device_batch_size=2"]), "train") != key
