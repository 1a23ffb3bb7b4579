"""The project's GPU path at LLaVA-1.5-7B shapes, in one command: sample, train, hand over, check, run the DAG.

    python bench/gpu_check.py --out gpu_check.json              # one GPU, ends within --budget (480 s)
    python bench/gpu_check.py --tiny --out /tmp/check.json      # every step on the CPU at toy shapes (tests)

What cannot be downloaded is built: the exact `llava-hf/llava-1.5-7b-hf` configuration with random
weights (7,063,427,072 parameters) and a word-level tokenizer of 32,064 entries; everything else is
the project's own code: `save_vlm`/`load_vlm`, `TransformersSampler` (shared-prefix decoding),
`train_lora_dpo` at the config's settings and at `auto` (m3po_core/train_memory.py),
`release_training_memory`, `check_adapter_changes_model` (a trained adapter passes, one with its
LoRA B zeroed is refused), and `m3po run` end to end on the built model (`--dag`, on by default).

Each step reports its wall time, its peak allocated memory and its result; a failed step is recorded
(its traceback's tail) and the next runs. Sampling reports generated tokens/s, the prefill and the
mean decode step, and the step's bandwidth floor (weights + the keys and values a step reads, at
--bandwidth TB/s) with the measured step's ratio to it; training, seconds per optimizer step
(the first step included), peak memory and the measured memory per pair. The extrapolations: a
150,000-prompt run at 32 candidates of 150 tokens, and one epoch of 150,000 pairs. Random weights
never emit EOS: every candidate runs to max_new_tokens, so the figures are cost, not quality.
Writes one JSON file (--out) and ends with a short table. No figure here is asserted by a test.
Rehearse with --tiny; on the GPU machine, bench/gpu_bundle.py's bundle runs it with nothing installed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RUN_PROMPTS, RUN_N, RUN_TOKENS, EPOCH_PAIRS = 150_000, 32, 150, 150_000
SHAPES = {
    # the published llava-hf/llava-1.5-7b-hf configuration
    "full": dict(text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5),
                 vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
                 dtype="bfloat16", sample=[(8, 32, 128), (16, 32, 128)], pairs=32, answer=150),
    "tiny": dict(text=dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                           rms_norm_eps=1e-5),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu"),
                 dtype="float32", sample=[(2, 4, 8), (3, 4, 8)], pairs=24, answer=12),
}


def log(msg: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


START = time.time()


def build_llava(shape: dict, device: str):
    """A LLaVA-1.5-shaped model with random weights and a word-level tokenizer of vocab_size entries."""
    from transformers import LlavaForConditionalGeneration

    from m3po_core.data import synthetic as world
    from m3po_core.models import build_tokenizer, llava_parts, set_special_tokens

    words = list(world.vocabulary())
    fill = shape["text"]["vocab_size"] - len(build_tokenizer(words))   # the world's words, specials, chat words
    tokenizer = build_tokenizer(words + [f"w{i}" for i in range(fill)])
    config, processor = llava_parts(tokenizer, shape["text"], shape["vision"])
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, shape["dtype"]))
    set_special_tokens(model, tokenizer)
    return model.eval(), processor


def world_prompts(count: int):
    """(images, instructions) of `count` synthetic-world prompts, one per scene."""
    from m3po_core.data import synthetic as world
    from m3po_core.data import synthetic_prompts

    scenes = world.make_scenes(0, "train", count)
    rows = synthetic_prompts.make_prompts(scenes, 0, per_scene=1)[:count]
    images = {s.scene_id: world.render(s, 64) for s in scenes}
    return [images[r["scene_id"]] for r in rows], [r["instruction"] for r in rows]


class Check:
    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.shape = SHAPES["tiny" if args.tiny else "full"]
        self.device = "cpu" if args.tiny else "cuda"
        self.work = Path(args.work)
        self.model_dir = self.work / "llava15-shaped"
        self.record = {"check": {"argv": sys.argv, "tiny": args.tiny, "budget_s": args.budget,
                                 "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, "steps": []}

    # -- bookkeeping ------------------------------------------------------------------------------
    def cuda(self) -> bool:
        return self.device == "cuda"

    def step(self, name: str, fn, estimate_s: float = 0.0):
        left = self.args.budget - (time.time() - START)
        row = {"step": name, "status": "skipped", "wall_s": 0.0, "error": None, "result": None}
        self.record["steps"].append(row)
        if name in self.args.skip:
            row["error"] = "--skip"
            return None
        if estimate_s > left:
            row["error"] = f"estimated {estimate_s:.0f} s, {left:.0f} s of the budget left"
            log(f"== {name}: skipped ({row['error']})")
            return None
        if self.cuda():
            torch.cuda.reset_peak_memory_stats()
        log(f"== {name}: start")
        t0 = time.time()
        try:
            row["result"] = fn()
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 (recorded, and the next step runs)
            row["status"], row["error"] = "error", f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc().splitlines()[-25:]
            log("\n".join(row["traceback"]))
        row["wall_s"] = round(time.time() - t0, 2)
        if self.cuda():
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        log(f"== {name}: {row['status']} in {row['wall_s']} s"
            + (f", peak {row['peak_allocated_gib']} GiB" if self.cuda() else ""))
        self.save()
        return row["result"]

    def save(self) -> None:
        self.record["check"]["elapsed_s"] = round(time.time() - START, 1)
        out = Path(self.args.out)
        partial = out.with_name(out.name + ".partial")  # after each step, whole: a killed check keeps its last steps
        partial.write_text(json.dumps(self.record, indent=1))
        partial.replace(out)

    def load(self):
        from m3po_core.models import load_vlm

        return load_vlm(str(self.model_dir), self.device, self.shape["dtype"])

    def prompts(self, count: int):
        return world_prompts(count)

    # -- steps ------------------------------------------------------------------------------------
    def env(self) -> dict:
        import importlib.metadata as md

        out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "device": self.device,
               "versions": {}, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
        for name in ("transformers", "trl", "peft", "accelerate", "datasets", "prefect", "open_clip_torch", "pyarrow"):
            try:
                out["versions"][name] = md.version(name)
            except md.PackageNotFoundError:
                out["versions"][name] = None
        if self.cuda():
            props = torch.cuda.get_device_properties(0)
            out.update(gpu=props.name, gpu_total_gib=round(props.total_memory / 2**30, 2))
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t = time.time()
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
            out["bf16_matmul_tflops"] = round(20 * 2 * 8192**3 / (time.time() - t) / 1e12, 1)
            big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            t = time.time()
            for _ in range(20):
                big.clone()
            torch.cuda.synchronize()
            out["copy_tb_s"] = round(20 * 2 * 2**30 / (time.time() - t) / 1e12, 2)  # read + write
            del a, big
        return out

    def build(self) -> dict:
        from m3po_core.models import save_vlm

        t = time.time()
        model, processor = build_llava(self.shape, self.device)
        params = sum(p.numel() for p in model.parameters())
        built = time.time() - t
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        t = time.time()
        save_vlm(model, processor, str(self.model_dir))
        saved = time.time() - t
        del model
        t = time.time()
        model, processor = self.load()
        prompt = processor(images=self.prompts(1)[0], text=["USER: <image>\nx ASSISTANT:"], return_tensors="pt")
        return {"parameters": params, "build_s": round(built, 2), "save_s": round(saved, 2),
                "load_s": round(time.time() - t, 2), "tokenizer_entries": len(processor.tokenizer),
                "image_tokens": int((prompt["input_ids"] == model.config.image_token_id).sum()),
                "disk_gib": round(sum(f.stat().st_size for f in self.model_dir.iterdir()) / 2**30, 3)}

    def sample(self, prompts: int, n: int, tokens: int, seeding: str) -> dict:
        from m3po_core.sampling import SamplingParams, prompt_seed
        from m3po_core.sampling.prefix_decode import bytes_per_prompt, kv_bytes_per_position
        from m3po_core.sampling.transformers_backend import TransformersSampler

        model, processor = self.model
        images, instructions = self.prompts(prompts)
        sampler = TransformersSampler(model, processor)
        seed = 7 if seeding == "batch" else [prompt_seed(0, f"g{i}") for i in range(prompts)]
        params = SamplingParams(n=n, temperature=0.9, top_p=0.95, max_new_tokens=tokens)
        sampler.sample(images[:1], instructions[:1], SamplingParams(n=2, max_new_tokens=2), 0)  # warm-up
        self.sync()
        t = time.time()
        out = sampler.sample(images, instructions, params, seed)
        self.sync()
        wall = time.time() - t
        timing = sampler.last_timings
        generated = sum(c.n_tokens for row in out for c in row)
        prompt_len = timing[0]["prompt_len"]
        steps = sum(x["steps"] for x in timing)
        decode_s = sum(x["decode_s"] for x in timing)
        step_ms = 1000 * decode_s / max(steps - len(timing), 1)
        kv = kv_bytes_per_position(model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        # one step reads the weights, each prompt's keys and values once, each candidate's own (on average half)
        step_bytes = weights + kv * prompts * (prompt_len + n * tokens / 2)
        floor_ms = 1000 * step_bytes / (self.args.bandwidth * 1e12)
        rate = generated / wall
        result = {"prompts": prompts, "n": n, "max_new_tokens": tokens, "seeding": seeding, "calls": len(timing),
                  "prompt_len": prompt_len, "generated_tokens": generated, "wall_s": round(wall, 3),
                  "tokens_per_s": round(rate, 1), "prefill_s": round(sum(x["prefill_s"] for x in timing), 3),
                  "decode_step_ms": round(step_ms, 3), "floor_step_ms": round(floor_ms, 5),
                  "step_over_floor": round(step_ms / floor_ms, 2),
                  "finite_logp": sum(c.logp_sum == c.logp_sum and abs(c.logp_sum) != float("inf")
                                     for row in out for c in row),
                  "candidates": prompts * n, "distinct_answers": len({tuple(c.token_ids) for row in out for c in row}),
                  "planned_bytes_per_prompt": bytes_per_prompt(model, prompt_len, n, tokens),
                  f"hours_{RUN_PROMPTS}_prompts": round(RUN_PROMPTS * RUN_N * RUN_TOKENS / rate / 3600, 1)}
        log(f"sample {prompts}x{n}x{tokens} ({seeding}): {rate:.0f} tok/s, prefill {result['prefill_s']} s, "
            f"step {step_ms:.1f} ms (floor {floor_ms:.1f} ms, x{result['step_over_floor']})")
        return result

    def sync(self) -> None:
        if self.cuda():
            torch.cuda.synchronize()

    def pairs(self, count: int):
        from m3po_core.training import pairs_dataset

        model, processor = self.model
        images, instructions = self.prompts(count)
        vocab, eos = len(processor.tokenizer), processor.tokenizer.eos_token_id
        g = torch.Generator().manual_seed(0)
        rows = []
        for _ in range(count):
            ids = [torch.randint(10, vocab, (self.shape["answer"] - 1,), generator=g).tolist() + [eos] for _ in "cr"]
            rows.append({"chosen": "a", "rejected": "b", "chosen_token_ids": ids[0], "rejected_token_ids": ids[1]})
        return pairs_dataset(images, instructions, rows)

    def train(self, label: str, per_device, checkpointing) -> dict:
        from m3po_core.components import release_training_memory
        from m3po_core.config import TrainingConfig, batch_split
        from m3po_core.train_memory import resolve
        from m3po_core.training import train_lora_dpo

        self.model = None
        release_training_memory()
        model, processor = self.load()
        self.model = (model, processor)
        dataset = self.pairs(self.shape["pairs"])
        cfg = TrainingConfig(batch_size=8, learning_rate=5e-5 if not self.tiny else 5e-3, lora_r=16, lora_alpha=32,
                             per_device_batch_size=per_device, gradient_checkpointing=checkpointing)
        longest = 600 + self.shape["answer"] if not self.tiny else 60
        cfg, choice = resolve(cfg, model, longest)
        before = torch.cuda.memory_allocated() / 2**30 if self.cuda() else None
        out_dir = self.work / f"adapter-{label}"
        self.sync()
        t = time.time()
        history = train_lora_dpo(model, processor, dataset, cfg, str(out_dir), log_fn=log)
        self.sync()
        wall = time.time() - t
        per, accumulation = batch_split(cfg)
        optimizer_steps = max(int(h.get("step", 0)) for h in history)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda() else None
        result = {"per_device_batch_size": per, "gradient_accumulation_steps": accumulation,
                  "gradient_checkpointing": cfg.gradient_checkpointing, "choice": choice.reason,
                  "optimizer_steps": optimizer_steps, "s_per_step": round(wall / max(optimizer_steps, 1), 3),
                  "losses": [round(h["loss"], 5) for h in history if "loss" in h],
                  f"epoch_{EPOCH_PAIRS}_pairs_hours": round(EPOCH_PAIRS / 8 * wall / max(optimizer_steps, 1) / 3600, 1),
                  "adapter": str(out_dir)}
        if self.cuda():
            result.update(peak_allocated_gib=round(peak, 2), weights_allocated_gib=round(before, 2),
                          measured_pair_gib=round((peak - before) / per, 2), estimated_pair_gib=round(choice.pair_gib, 2),
                          free_gib=choice.free_gib)
        return result

    def handover(self) -> dict:
        from m3po_core.components import release_training_memory

        held = torch.cuda.memory_allocated() / 2**30 if self.cuda() else None
        self.model = None
        release_training_memory()
        after = torch.cuda.memory_allocated() / 2**30 if self.cuda() else None
        return {"allocated_gib_before": held and round(held, 3), "allocated_gib_after": after and round(after, 3)}

    def adapter_check(self, adapter: str) -> dict:
        from peft import PeftModel

        from m3po_core.errors import AdapterNoOp
        from m3po_core.evaluation.adapter_check import check_adapter_changes_model
        from m3po_core.sampling.transformers_backend import TransformersSampler

        images, instructions = self.prompts(4)
        base, processor = self.load()
        adapted = PeftModel.from_pretrained(self.load()[0], adapter).merge_and_unload()
        change = check_adapter_changes_model(TransformersSampler(base, processor), TransformersSampler(adapted, processor),
                                             images, instructions, min_change=1e-4, backend="transformers",
                                             adapter_dir=adapter, log_fn=log)
        del adapted
        zeroed = PeftModel.from_pretrained(self.load()[0], adapter)
        for name, p in zeroed.named_parameters():
            if "lora_B" in name:
                p.data.zero_()
        zeroed = zeroed.merge_and_unload()
        try:
            check_adapter_changes_model(TransformersSampler(base, processor), TransformersSampler(zeroed, processor),
                                        images, instructions, min_change=1e-4, backend="transformers",
                                        adapter_dir="zeroed-B", log_fn=log)
            refused = False
        except AdapterNoOp:
            refused = True
        if not refused:
            raise AssertionError("an adapter with zeroed LoRA B was not refused")
        return {"trained_adapter_change": round(change, 4), "zeroed_B_refused": refused}

    def dag(self) -> dict:
        """`m3po run` end to end on the built model (sample, score, select, train, evaluate, report)."""
        root = self.work / "runs"
        cmd = [sys.executable, "-m", "m3po.flows.cli", "run", "--root", str(root), "--run-id", "gpu-dag",
               "--config", str(ROOT / "configs" / "demo.yaml"),
               "--set", f"model.name={self.model_dir}", "--set", f"model.dtype={self.shape['dtype']}",
               "--set", f"model.device={self.device}",
               "--set", "data.world.n_train_scenes=8", "--set", "data.world.n_eval_scenes=4",
               "--set", "data.world.prompts_per_scene=2", "--set", "data.shard_size=8",
               "--set", "sampling.n=4", "--set", "sampling.max_new_tokens=16", "--set", "sampling.batch_prompts=8",
               "--set", "scoring.clip.train_steps=10", "--set", "training.batch_size=8",
               "--set", "training.per_device_batch_size=auto", "--set", "training.gradient_checkpointing=auto",
               "--set", "evaluation.benchmarks=[pope,mme]", "--set", "evaluation.max_new_tokens=8"]
        t = time.time()
        env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=max(self.args.budget - (time.time() - START), 60))
        tail = (proc.stdout + proc.stderr).splitlines()[-30:]
        if proc.returncode != 0:
            raise RuntimeError(f"m3po run exited {proc.returncode}:\n" + "\n".join(tail))
        run = root / "gpu-dag"
        metrics = json.loads((run / "metrics.json").read_text())
        train_log = json.loads((run / "train_log.json").read_text())
        return {"wall_s": round(time.time() - t, 1), "report": (run / "report.md").is_file(),
                "pairs": train_log.get("pairs"), "per_device_batch_size": train_log.get("per_device_batch_size"),
                "gradient_checkpointing": train_log.get("gradient_checkpointing"),
                "metrics_keys": sorted(metrics)[:10], "tail": tail[-5:]}

    # -- the whole check --------------------------------------------------------------------------
    def step_names(self) -> list[str]:
        p, n, _ = self.shape["sample"][-1]
        return ["env", "build", *(f"sample_{q}x{m}" for q, m, _ in self.shape["sample"]),
                f"sample_{p}x{n}_candidate_seeds", "train_config", "train_auto", "handover", "adapter_check", "dag"]

    def run(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = None
        self.record["env"] = self.step("env", self.env)
        self.step("build", self.build, 30)
        if self.model_dir.is_dir():
            self.model = self.load()
        for prompts, n, tokens in self.shape["sample"]:
            self.step(f"sample_{prompts}x{n}", lambda: self.sample(prompts, n, tokens, "batch"), 30)
        p, n, tokens = self.shape["sample"][-1]
        self.step(f"sample_{p}x{n}_candidate_seeds", lambda: self.sample(p, n, tokens, "candidate"), 30)
        self.step("train_config", lambda: self.train("config", 2, True), 60)      # configs/llava15-7b.yaml before auto
        trained = self.step("train_auto", lambda: self.train("auto", "auto", "auto"), 60)
        self.step("handover", self.handover)
        if trained:
            self.step("adapter_check", lambda: self.adapter_check(trained["adapter"]), 30)
        if self.args.dag:
            self.step("dag", self.dag, 90)
        self.save()
        self.table()
        return 0 if all(s["status"] == "ok" or s["error"] == "--skip" for s in self.record["steps"]) else 1

    def table(self) -> None:
        print("\nstep                          status   wall s  peak GiB  figures")
        for s in self.record["steps"]:
            r = s["result"] or {}
            figures = ""
            if "tokens_per_s" in r:
                figures = (f"{r['tokens_per_s']:.0f} tok/s, prefill {r['prefill_s']} s, step {r['decode_step_ms']} ms "
                           f"= x{r['step_over_floor']} the floor; {r[f'hours_{RUN_PROMPTS}_prompts']} h for 150K prompts")
            elif "s_per_step" in r:
                figures = (f"{r['per_device_batch_size']} x {r['gradient_accumulation_steps']}, checkpointing "
                           f"{'on' if r['gradient_checkpointing'] else 'off'}: {r['s_per_step']} s/step, "
                           f"{r[f'epoch_{EPOCH_PAIRS}_pairs_hours']} h an epoch")
            elif s["error"]:
                figures = s["error"][:70]
            print(f"{s['step']:<29} {s['status']:<7} {s['wall_s']:>7} {str(s.get('peak_allocated_gib', '-')):>9}  {figures}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--work", default="gpu-check-work", help="built model, adapters and the DAG's run go here")
    p.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (what the test suite runs)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; a step that would not fit is skipped")
    p.add_argument("--bandwidth", type=float, default=4.8, help="the card's memory bandwidth in TB/s (H200: 4.8)")
    p.add_argument("--no-dag", dest="dag", action="store_false", help="skip `m3po run` end to end")
    p.add_argument("--skip", default="", type=lambda v: set(filter(None, v.split(","))),
                   help="steps to leave out, e.g. build,train_config for a rerun on the same --work (the built "
                        "model is reused)")
    args = p.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --tiny to rehearse on the CPU)", file=sys.stderr)
        return 2
    check = Check(args)
    if unknown := sorted(args.skip - set(check.step_names())):
        print(f"gpu_check: --skip {','.join(unknown)}: no such step; the steps are {', '.join(check.step_names())}",
              file=sys.stderr)
        return 2
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
