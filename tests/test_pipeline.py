"""The whole DAG as Prefect flows on the ephemeral API, a local directory as the store."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m3po_core.stages import base_models, evaluate as evaluate_step, prompts, sample, select, train as train_step
from m3po_core.stages import score as score_step
from m3po_core.config import load_config
from m3po_core.errors import M3POError
from m3po_core.selection import m3p_score
from m3po_core.store import RunStore

TINY = Path(__file__).parent / "tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store"))


SEEN_CONFIGS: dict[str, list] = {}  # step -> the configuration objects it was called with in finished_run


@pytest.fixture(scope="module")
def finished_run(root):
    """The tiny run, each step's plain function watched for the configuration object it gets."""
    from m3po.flows.pipeline import m3po_pipeline

    cfg = load_config(TINY)
    steps = [(prompts, "prepare_prompts"), (base_models, "ensure_base_model"), (base_models, "ensure_clip"),
             (sample, "sample_shard"), (score_step, "score_shard"), (select, "select"), (train_step, "train"),
             (evaluate_step, "evaluate")]
    with pytest.MonkeyPatch.context() as mp:
        for module, name in steps:
            def watched(step_cfg, *args, _fn=getattr(module, name), _name=name, **kwargs):
                SEEN_CONFIGS.setdefault(_name, []).append(step_cfg)
                return _fn(step_cfg, *args, **kwargs)
            mp.setattr(module, name, watched)
        result = m3po_pipeline(config=cfg, root=root, run_id="t1")
    return cfg, RunStore(root, "t1"), result


def test_the_configuration_is_parsed_once_and_every_step_gets_that_object(finished_run):
    """`m3po run` parses the YAML once and hands the pipeline that RunConfig; the subflows and tasks
    pass it on, so every step of every shard is called with the very same object (a step that got
    a copy, a re-parse or a dict would show here)."""
    cfg = finished_run[0]
    assert set(SEEN_CONFIGS) == {"prepare_prompts", "ensure_base_model", "ensure_clip", "sample_shard",
                                 "score_shard", "select", "train", "evaluate"}
    n_shards = finished_run[2]["info"]["n_prompts"] and len(finished_run[1].manifest("candidates"))
    assert len(SEEN_CONFIGS["sample_shard"]) == len(SEEN_CONFIGS["score_shard"]) == n_shards > 1
    assert all(seen is cfg for calls in SEEN_CONFIGS.values() for seen in calls)


def test_run_writes_every_table_and_the_report(finished_run):
    cfg, store, result = finished_run
    base = Path(store.path(""))
    cands = pq.read_table(base / "candidates" / "shard-00000.parquet")
    assert {"prompt_id", "cand_idx", "text", "logp_sum", "logp_mean", "n_tokens"} <= set(cands.column_names)
    scores = pq.read_table(base / "scores" / "shard-00000.parquet")
    assert {"prompt_id", "cand_idx", "clip", "judge", "mas"} <= set(scores.column_names)
    pairs = pq.read_table(base / "pairs.parquet")
    assert {"prompt_id", "chosen_idx", "rejected_idx", "mas_chosen", "mas_rejected", "logp_chosen",
            "logp_rejected", "m3p_score", "strategy"} <= set(pairs.column_names)
    metrics = json.loads((base / "metrics.json").read_text())
    for model in ("base", "trained"):
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(metrics[model]["pope"])
        assert "score" in metrics[model]["mme"]
        ift = metrics[model]["ift"]
        assert ift["n"] == len(store.read_table("eval/ift.parquet")) and ift["unrated"] == 0
        assert 0 <= ift["prompt_accuracy"] <= ift["rule_prompt_accuracy"] <= 1  # judge checks only take away
        assert {"yes_no_first", "max_words", "judge_accuracy"} <= set(ift["by_type"])
        # every public harness's rule, from the same predictions; the default rule is the headline figure
        for bench, keys in (("pope", {"accuracy", "f1", "yes_ratio"}), ("mme", {"score", "perception", "cognition"})):
            rules = metrics[model][bench]["rules"]
            assert set(rules) == {"default", "lmms-eval", "vlmevalkit", "llava"}
            assert all(keys <= set(r) for r in rules.values())
            headline = "accuracy" if bench == "pope" else "score"
            assert rules["default"][headline] == metrics[model][bench][headline]
    assert cands.num_rows == 8 * cfg.sampling.n
    manifest = store.manifest("candidates")
    assert [e["state"] for e in manifest] == ["complete"] * 3
    report = (base / "report.md").read_text()
    assert "| POPE accuracy |" in report and "MME score" in report and "| IFT prompt accuracy |" in report
    assert "under each public harness's scoring rule" in report
    assert all(f"| {rule} |" in report for rule in ("default", "lmms-eval", "vlmevalkit", "llava"))
    for plot in ("base_vs_trained", "mas_vs_logp", "pair_stats", "dpo_loss"):
        assert (base / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    assert (base / "adapter" / "adapter_config.json").exists()


def test_pairs_agree_with_equations_recomputed_from_the_run(finished_run):
    cfg, store, _ = finished_run
    table = select.candidates_with_scores(store, 3).to_pylist()
    pairs = store.read_table("pairs.parquet").to_pylist()
    assert pairs
    by_prompt = {}
    for r in table:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    a, d = cfg.selection.alpha, cfg.selection.delta
    for p in pairs:
        group = sorted(by_prompt[p["prompt_id"]], key=lambda r: r["cand_idx"])
        w = max(group, key=lambda r: (r["mas"], -r["cand_idx"]))                       # eq. 1
        worse = [r for r in group if r["mas"] < w["mas"]]
        s = {r["cand_idx"]: m3p_score(w["mas"], r["mas"], w["logp_mean"], r["logp_mean"], a, d) for r in worse}
        l = max(worse, key=lambda r: (s[r["cand_idx"]], -r["cand_idx"]))             # eq. 2-3
        assert (p["chosen_idx"], p["rejected_idx"]) == (w["cand_idx"], l["cand_idx"])
        assert p["m3p_score"] == pytest.approx(s[l["cand_idx"]])
        assert p["chosen"] == w["text"] and p["rejected"] == l["text"]
        assert p["chosen_token_ids"] == w["token_ids"]
    diagnostics = store.read_json("pairs_stats.json")["diagnostics"]           # what the selection did
    assert diagnostics["pools"] == len(pairs)
    assert diagnostics["median_distinct_answers"] >= 1 and 0 <= diagnostics["share_rejected_differs_from_alpha0"] <= 1
    assert "differs from alpha = 0's in" in (store.read_bytes("report.md").decode())


def test_cli_rerun_recomputes_nothing(finished_run, root):
    store = finished_run[1]
    stamp = {p: p.stat().st_mtime_ns for p in Path(store.path("")).rglob("*.parquet")}
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--config", str(TINY), "--root", root,
                          "--run-id", "t1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| POPE accuracy |" in out.stdout
    diagnostics = store.read_json("pairs_stats.json")["diagnostics"]   # what the selection did, printed too
    assert f"differs from alpha = 0's in {diagnostics['share_rejected_differs_from_alpha0']:.1%}" in out.stdout
    assert f"median {diagnostics['median_distinct_answers']:g} distinct answers" in out.stdout
    # the terminal: one progress line per stage (plain lines, not a terminal), no per-shard log lines
    lines = out.stderr.splitlines()
    for stage in ("generate", "score", "select", "train", "evaluate"):
        assert any(line.startswith(stage) and line.endswith("done") for line in lines), out.stderr[-2000:]
    assert any("3/3 shards" in line for line in lines if line.startswith("score"))
    assert not any("Finished in state" in line for line in lines)
    # ... while the full log is in a file in the run, whose path the end of the run prints
    log_path = Path(out.stdout.split("full log: ")[1].split()[0])
    assert log_path.parent == Path(store.path("logs")) and log_path.exists()
    log_text = log_path.read_text()
    assert "Beginning flow run 'm3po-t1'" in log_text and "task run 'sample-shard" in log_text
    info = store.read_json("report_info.json")
    assert info["computed_shards"] == {"candidates": 0, "scores": 0}
    assert {p: p.stat().st_mtime_ns for p in Path(store.path("")).rglob("*.parquet")} == stamp


def test_cli_names_a_bad_configuration_key(root):
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "run", "--config", str(TINY), "--root", root,
                          "--set", "sampling.temprature=2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "sampling.temprature" in out.stderr


def test_a_broken_image_fails_its_shard_only_and_a_rerun_recomputes_just_it(root, finished_run):
    from m3po.flows.pipeline import m3po_pipeline

    cfg = load_config(TINY)
    store = RunStore(root, "t2")
    n_shards = prompts.prepare_prompts(cfg, store)
    victim = prompts.read_prompts_shard(store, 1)[0]
    image_path = Path(victim["image"])
    good = image_path.read_bytes()
    image_path.write_bytes(b"not a png")
    with pytest.raises(M3POError) as err:
        m3po_pipeline(config=cfg.to_dict(), root=root, run_id="t2")
    msg = str(err.value)
    assert "shard 1" in msg and str(image_path) in msg
    entries = {e["shard"]: e for e in store.manifest("candidates")}
    assert entries[1]["state"] == "failed" and str(image_path) in entries[1]["error"]
    assert entries[0]["state"] == entries[2]["state"] == "complete"
    assert not Path(store.path(RunStore.shard_rel("candidates", 1))).exists()
    assert not list(Path(store.path("")).rglob(".tmp-*"))
    done = {i: entries[i]["finished_at"] for i in (0, 2)}

    status = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "status", "t2", "--root", root],
                            capture_output=True, text=True, timeout=120)
    assert "failed=1" in status.stdout and str(image_path) in status.stdout

    image_path.write_bytes(good)  # repair, re-run the failed: only shard 1 is sampled
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "rerun-failed", "t2", "--root", root],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert store.read_json("report_info.json")["computed_shards"]["candidates"] == 1
    entries = {e["shard"]: e for e in store.manifest("candidates")}
    assert all(entries[i]["state"] == "complete" for i in range(n_shards))
    assert {i: entries[i]["finished_at"] for i in (0, 2)} == done


def test_empty_instruction_is_named(root):
    from m3po_core.errors import InputError
    import pyarrow as pa
    from m3po_core import schema

    cfg = load_config(TINY)
    store = RunStore(root, "t3")
    prompts.prepare_prompts(cfg, store)
    rows = prompts.read_prompts_shard(store, 0)
    rows[2]["instruction"] = "  "
    store.publish_shard("prompts", 0, pa.Table.from_pylist(rows, schema.PROMPTS), schema.PROMPTS,
                        key=store.shard_entry("prompts", 0)["key"])
    with pytest.raises(InputError, match=r"prompts shard 0 row 2 .*empty instruction"):
        sample.sample_shard(cfg, store, 0, "unused-model")
    assert store.shard_entry("candidates", 0)["state"] == "failed"
    assert not Path(store.path(RunStore.shard_rel("candidates", 0))).exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_an_interrupted_run_loses_no_finished_shard(root, finished_run, sig):
    """Ctrl-C (SIGINT) or a killed worker (SIGKILL) in the middle of sampling: every shard the
    manifest calls complete is whole, nothing is left half-written, and `m3po rerun-failed`
    completes the run computing only the rest."""
    import signal
    import time

    run_id = f"interrupted-{sig.lower()}"
    store = RunStore(root, run_id)
    proc = subprocess.Popen([sys.executable, "-m", "m3po.flows.cli", "run", "--config", str(TINY), "--root", root,
                             "--run-id", run_id, "--set", "sampling.n=12"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if store.exists("candidates/_manifest") and any(e["state"] == "complete" for e in store.manifest("candidates")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(getattr(signal, sig))
    proc.wait(120)
    assert proc.returncode != 0

    assert not list(Path(store.path("")).rglob(".tmp-*"))
    entries = {e["shard"]: e for e in store.manifest("candidates")}
    complete = {s: e for s, e in entries.items() if e["state"] == "complete"}
    assert complete and not store.exists("pairs.parquet")       # stopped before selection
    for s, e in complete.items():
        assert store.shard_done("candidates", s, e["key"])          # whole: its bytes match the manifest
    if sig == "SIGINT":  # the interrupted shard says so (a SIGKILL leaves it "running": not complete either)
        assert all(e["state"] in ("complete", "failed") for e in entries.values()), entries

    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "rerun-failed", run_id, "--root", root],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    after = {e["shard"]: e for e in store.manifest("candidates")}
    assert all(e["state"] == "complete" for e in after.values()) and len(after) == 3
    assert {s: after[s]["finished_at"] for s in complete} == {s: e["finished_at"] for s, e in complete.items()}
    assert store.read_json("report_info.json")["computed_shards"]["candidates"] == 3 - len(complete)


def test_training_over_two_processes_keeps_the_global_batch(root, finished_run, tmp_path):
    """`training.num_processes: 2`: TRL under `accelerate launch` (two gloo ranks on this CPU) trains
    an adapter with as many optimizer steps as the single-process run: the global batch is kept."""
    import shutil

    cfg, store, _ = finished_run
    ddp_store = RunStore(root, "t1-ddp")
    shutil.copytree(store.path(""), ddp_store.path(""))
    shutil.rmtree(ddp_store.path("adapter"))
    ddp_cfg = load_config(TINY, ["training.num_processes=2"])
    model_ref = base_models.ensure_base_model(ddp_cfg, ddp_store)
    lines = []
    result = train_step.train(ddp_cfg, ddp_store, model_ref, log_fn=lines.append)
    assert result["num_processes"] == 2
    assert any("training on 2 processes" in l for l in lines) and any("DPO step" in l for l in lines)
    steps = lambda h: max(e["step"] for e in h if "loss" in e)
    single = store.read_json("train_log.json")["history"]
    assert steps(result["history"]) == steps(single)
    assert all(np.isfinite(e["loss"]) for e in result["history"] if "loss" in e)
    names = {p.name for p in Path(ddp_store.path("adapter")).iterdir()}
    assert {"_COMPLETE", "adapter_config.json", "adapter_model.safetensors"} <= names
    assert not any(n.startswith("m3po_") for n in names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_training_ranks_die_with_a_killed_run(root, finished_run, tmp_path):
    """The process that launched two-process training is SIGKILLed while the ranks train: the
    launcher and both ranks stop too (none is left holding a GPU)."""
    import shutil
    import signal
    import time

    from test_no_orphans import _alive, _children

    store = finished_run[1]
    ddp_store = RunStore(root, "t1-ddp-killed")
    shutil.copytree(store.path(""), ddp_store.path(""))
    shutil.rmtree(ddp_store.path("adapter"))
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        "from m3po_core.config import load_config\n"
        "from m3po_core.stages import base_models, train\n"
        "from m3po_core.store import RunStore\n"
        f"cfg = load_config({str(TINY)!r}, ['training.num_processes=2', 'training.epochs=50'])\n"
        f"store = RunStore({root!r}, 't1-ddp-killed')\n"
        "train.train(cfg, store, base_models.ensure_base_model(cfg, store), log_fn=print)\n")
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def tree(pid: int) -> set[int]:
        out, frontier = set(), {pid}
        while frontier:
            frontier = {c for p in frontier for c in _children(p)} - out
            out |= frontier
        return out

    def ranks(pids: set[int]) -> set[int]:
        cmd = lambda p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")  # noqa: E731
        found = set()
        for p in pids:
            try:
                if "m3po_core.distributed" in cmd(p):
                    found.add(p)
            except OSError:
                pass
        return found

    deadline, started = time.time() + 300, set()
    while time.time() < deadline and len(ranks(started)) < 3:   # the launcher and its two ranks
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        started |= tree(proc.pid)
        time.sleep(0.2)
    assert len(ranks(started)) >= 3, started
    time.sleep(2)
    started |= tree(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.time() + 90
    while time.time() < deadline and any(_alive(p) for p in started):
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)], "processes outlived the killed run"


def test_an_odd_global_batch_over_two_processes_is_refused():
    from m3po_core.errors import ConfigError

    with pytest.raises(ConfigError, match="training.batch_size"):
        load_config(TINY, ["training.num_processes=2", "training.batch_size=7"])


def test_the_run_is_watchable_in_the_ui_through_its_artifacts(finished_run):
    """What the Prefect UI shows of a run: the report with its plots inline, the metric and pair
    tables, and each sharded stage's progress at 100 %."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        def latest(key):
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert arts, key
            return max(arts, key=lambda a: a.created)

        report = latest("m3po-t1-report")
        assert report.type == "markdown" and "| POPE accuracy |" in report.data
        assert report.data.count("](data:image/png;base64,") == 4 and "](plots/" not in report.data
        assert {r["metric"] for r in json.loads(latest("m3po-t1-metrics").data)} >= {"POPE accuracy"}
        assert json.loads(latest("m3po-t1-pairs").data)[0]["pairs"] == finished_run[2]["pairs"]["pairs"]
        for stage in ("candidates", "scores"):
            progress = latest(f"t1-{stage}-progress")
            assert progress.type == "progress" and float(progress.data) == 100.0


def test_the_public_benchmark_path_scores_like_the_synthetic_one(root, finished_run, tmp_path):
    """The synthetic held-out sets written in the public releases' Parquet layout (images embedded)
    and evaluated through `evaluation.pope_path` / `mme_path`: the same predictions, the same numbers."""
    import pyarrow as pa

    cfg, store, _ = finished_run
    paths = {}
    for bench in ("pope", "mme"):
        qs = store.read_table(f"eval/{bench}.parquet").to_pylist()
        pq.write_table(pa.table({
            "question_id": [q["question_id"] for q in qs], "question": [q["instruction"] for q in qs],
            "answer": [q["answer"].capitalize() for q in qs], "category": [q["category"] for q in qs],
            "image": pa.array([{"bytes": Path(q["image"]).read_bytes(), "path": None} for q in qs],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}), tmp_path / f"{bench}.parquet")
        paths[bench] = str(tmp_path / f"{bench}.parquet")
    public_cfg = load_config(TINY, [f"evaluation.pope_path={paths['pope']}", f"evaluation.mme_path={paths['mme']}",
                                    "evaluation.answer_suffix=", "evaluation.benchmarks=[pope,mme]"])
    public_store = RunStore(root, "t1-public")
    model_ref = base_models.ensure_base_model(cfg, store)
    public = evaluate_step.evaluate_base(public_cfg, public_store, model_ref)["metrics"]
    synthetic = store.read_json("eval/base_metrics.json")["metrics"]
    assert public["pope"] == synthetic["pope"]
    assert public["mme"] == synthetic["mme"]


def test_evaluation_is_cached_per_shard_and_resumes_where_it_stopped(root, finished_run):
    """Predictions are shards with a manifest: a lost shard (an evaluation killed half-way) is the
    only one computed again, and the metrics come out the same."""
    import shutil

    cfg, store, _ = finished_run
    run = RunStore(root, "t1-evalshards")
    shutil.copytree(store.path(""), run.path(""))
    Path(run.path("metrics.json")).unlink()
    small = load_config(TINY, ["evaluation.shard_size=16"])
    model_ref = base_models.ensure_base_model(small, run)
    first = evaluate_step.evaluate(small, run, model_ref)
    stage = "predictions/predictions-trained-pope"
    entries = {e["shard"]: e for e in run.manifest(stage)}
    assert len(entries) >= 3 and all(e["state"] == "complete" for e in entries.values())

    Path(run.path(RunStore.shard_rel(stage, 1))).unlink()        # shard 1 lost, its record says running
    run.mark_shard(stage, 1, "running", entries[1]["key"])
    Path(run.path("metrics.json")).unlink()
    again = evaluate_step.evaluate(small, run, model_ref)
    after = {e["shard"]: e for e in run.manifest(stage)}
    assert after[1]["finished_at"] > entries[1]["finished_at"]
    assert all(after[s]["finished_at"] == entries[s]["finished_at"] for s in entries if s != 1)
    assert again["trained"] == first["trained"] and again["base"] == first["base"]


def test_shards_no_worker_takes_fail_the_stage_after_the_timeout(root, finished_run):
    """`execution.shards: task_worker` with no `m3po worker` running: the shards stay scheduled, and
    with `shard_timeout_seconds` the stage fails naming them instead of waiting for ever."""
    from m3po.flows.stage_flows import score

    cfg = load_config(TINY, ["execution.shards=task_worker", "execution.shard_timeout_seconds=3",
                             "execution.poll_seconds=0.5"])
    with pytest.raises(M3POError, match=r"scores: 1 of 1 shards failed \(shard 0: no result after 3s .*SCHEDULED"):
        score(cfg.to_dict(), root, "t-noworker", 1)


def test_evaluation_through_an_openai_compatible_server_with_the_adapter_loaded_at_run_time(root, finished_run):
    """`evaluation.backend: openai`: the base model and the trained adapter answer from the server (the
    real protocol on loopback, with vLLM's /v1/load_lora_adapter); the adapter is loaded once, under a
    name carrying the training key, from the run's adapter directory."""
    import shutil

    from openai_server import FakeOpenAIServer, Reply

    cfg, store, _ = finished_run
    run = RunStore(root, "t1-served")
    shutil.copytree(store.path(""), run.path(""))
    for f in ("metrics.json", "eval/base_metrics.json"):
        Path(run.path(f)).unlink()
    def respond(body: dict) -> list[Reply]:
        if body.get("top_logprobs"):  # the adapter check's probes: the adapter moves the first token
            top = [("token_id:4", -0.1), ("token_id:5", -2.5)] if body["model"] == "tiny-base" else \
                [("token_id:5", -0.2), ("token_id:4", -1.8)]
            return [Reply("x", tokens=top[:1], finish_reason="length", top_logprobs=[top])]
        return [Reply("no ." if body["model"] == "tiny-base" else "yes , there is .")]

    server = FakeOpenAIServer(respond)
    server.start()
    try:
        served = load_config(TINY, ["evaluation.backend=openai", f"sampling.base_url={server.base_url}",
                                    "sampling.served_model=tiny-base", "evaluation.benchmarks=[pope]"])
        model_ref = base_models.ensure_base_model(served, run)
        metrics = evaluate_step.evaluate(served, run, model_ref)
        assert metrics["base"]["pope"]["yes_ratio"] == 0.0 and metrics["trained"]["pope"]["yes_ratio"] == 1.0
        (name, path), = server.adapters.items()
        assert name.startswith("m3po-t1-served-") and Path(path, "adapter_config.json").exists()
        chats = [r.body for r in server.requests if r.path.endswith("/chat/completions")]
        probes = [b for b in chats if b.get("top_logprobs")]
        chats = [b for b in chats if not b.get("top_logprobs")]
        n_questions = len(run.read_table("eval/pope.parquet"))
        assert len(chats) == 2 * n_questions
        assert {b["model"] for b in chats} == {"tiny-base", name}
        # before the adapter answers, the first questions check through the server that it changes the model
        assert len(probes) == 2 * min(served.evaluation.adapter_check_probes, n_questions)
        assert {b["model"] for b in probes} == {"tiny-base", name} and all(b["max_tokens"] == 1 for b in probes)
        assert all(b["temperature"] == 0.0 and b["n"] == 1 for b in chats)
        # a re-evaluation (new metrics asked for) finds the adapter already served and goes on
        Path(run.path("metrics.json")).unlink()
        shutil.rmtree(run.path("predictions"))
        assert evaluate_step.evaluate(served, run, model_ref)["trained"]["pope"] == metrics["trained"]["pope"]
        assert len(server.adapters) == 1
    finally:
        server.stop()


def test_the_run_graph_in_prefect_is_the_dag(finished_run):
    """The pipeline's graph, read through the API the UI draws it from: every stage hangs off the one
    it waits for, and inside `generate` the sample shards wait for the prompts and the base model."""
    from prefect.client.orchestration import get_client

    from prefect_graph import flow_run_id, graph_edges

    with get_client(sync_client=True) as client:
        edges = graph_edges(client, flow_run_id(client, "m3po-t1"))
        # generate and score are subflows (their shards fan out inside), the rest tasks of the pipeline
        assert {("generate", "score"), ("score", "select-pairs"), ("select-pairs", "train-lora-dpo"),
                ("train-lora-dpo", "evaluate"), ("evaluate", "report")} <= edges, edges
        inner = graph_edges(client, flow_run_id(client, "generate-t1"))
        assert {("prepare-prompts", "sample-shard"), ("base-model", "sample-shard")} <= inner, inner
