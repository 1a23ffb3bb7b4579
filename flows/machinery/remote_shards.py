"""Shards on remote workers: `execution.shards: deployment` (a flow run per shard of the shard
deployment, on its work pool, or per `execution.shards_per_run` consecutive shards) and
`task_worker` (a background task run per shard, for `m3po worker`). Runs are followed under their
first shard; a run of several that did not complete is trusted only for the shards it reached.

Submission. deployment: the deployment is read once; each shard gets the placeholder task run that
makes its flow run a subflow of this one (one POST each, as `run_deployment` makes them: the UI
nests the shards under the stage, and cancelling the stage's flow run cancels them), and the flow
runs are created 100 per call through the server's bulk endpoint (POST
/deployments/{id}/create_flow_run/bulk; one call per shard on an API without it), each with an
idempotency key so that a batch refused in part is sent again safely. `run_deployment` itself
takes three calls per shard (read the deployment, the placeholder, the flow run). The
placeholders go one after the other: on the default SQLite server concurrent writes only queue for
its lock (and come back 503, to be retried), and they cannot be batched (no bulk endpoint; created
through events they may land after the flow runs that reference them). task_worker: what
`Task.delay` does per shard, over one client (one POST each; the parameters go to the
task-scheduling storage); `delay` itself opens a client, a connection and a CSRF-token request per call.

Poll. One call per poll reads the runs, among those still outstanding, that are in a final state
(COMPLETED, FAILED, CRASHED, CANCELLED): a filter on their ids and those state types. A further
page is read only when a page comes back full (more shards ended within one poll than the page
size: PREFECT_API_DEFAULT_LIMIT, 200 unless set, which is also the most a server returns; a server
set lower refuses larger pages, naming its limit, which the poll then takes). Ids, not a window of
end times: a run's end time is the timestamp of the state that ended it, stamped on the clock of
whoever proposed it (the shard's process; the worker that saw it crash, seconds later; a task
worker, whose states reach the database later through the server's event pipeline), so a window
drawn on this machine's clock can miss a run for good. Each poll reads the manifest records of
the shards it saw end all at once (their outcome), and reports them in one batch (the progress
artifact: one update per poll). Every 120 s one count call finds shards no worker has taken.
When no run has ended for `execution.lease_seconds` / 2, one read of the outstanding shards'
records takes the runs whose shards are all complete in the store as done (`complete_in_store`:
the server may record a task run's end late, or lose it).

Limit: the ids travel in the request body (about 40 bytes each); above 10,000 outstanding shards a
poll takes one call per 10,000.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable
from uuid import UUID

from prefect import get_run_logger
from prefect.client.schemas.objects import StateType

from m3po.flows.machinery.deployment_submission import create_flow_runs
from m3po_core.config import RunConfig
from m3po_core.errors import M3POError
from m3po_core.stages.runner import ShardResult
from m3po_core.store import COMPLETE, RunStore
from m3po.tasks import stage_tasks

FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
ID_CHUNK = 10_000   # ids per filter: well under the 32,766 bound parameters of SQLite and PostgreSQL
WARN_EVERY = 120.0  # seconds between "still waiting for a worker" checks

# The remote job of each fan-out stage: the ExecutionConfig field naming its deployment, and its
# background task. Other stages register theirs (tests/noop_stage.py).
REMOTE_JOBS: dict[str, tuple[str, Any]] = {
    "candidates": ("sample_deployment", stage_tasks.sample_shard_job),
    "scores": ("score_deployment", stage_tasks.score_shard_job),
}

Outcome = ShardResult | str
last_poll: "ShardPoll | None" = None  # the latest fan-out's poll, read by the bench and the tests


def remote_shards(cfg: RunConfig, store: RunStore, n_shards: int, ref_name: str, ref: str, stage: str,
                  on_finished: Callable[[dict[int, Outcome], int], None], page: int | None = None) -> dict[int, Outcome]:
    """Submit one run per shard, then poll until every one is final (or `shard_timeout_seconds`
    passed). `on_finished(batch, done)`: the shards seen ending in one poll, and how many have ended."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from m3po.flows.machinery.busy_api import RETRY_SOON_SYNC

    mode = cfg.execution.shards
    if not PREFECT_API_URL.value():
        raise M3POError(f"execution.shards={mode!r} hands shards to workers through a Prefect server: "
                        "set PREFECT_API_URL (on the ephemeral API no worker would ever take them)")
    if stage not in REMOTE_JOBS:
        raise M3POError(f"{stage}: no remote job for this stage (execution.shards={mode!r}); run it in_process")
    started = warned_at = time.time()
    # one tag for the whole fan-out: its runs found together in the UI (`fan-out:...`) and by the bench
    fan_tag = f"fan-out:{uuid.uuid4().hex[:12]}"
    jobs = shard_groups(n_shards, cfg.execution.shards_per_run if mode == "deployment" else 1)
    params = {first: {"config": cfg.to_dict(), "root": store.root, "run_id": store.run_id, "shard": first, ref_name: ref,
                      **({"shards": group} if len(group) > 1 else {})} for first, group in jobs.items()}
    # Tags are concurrency-limit names to a task run's engine: a task worker creates a lease service per
    # distinct set, which can deadlock a Prefect 3.7 task worker (flows/machinery/task_worker.py). So task runs
    # carry none (they are found by id, and under their flow run in the UI); flow runs carry the tags.
    tags = {first: [f"run:{store.run_id}", fan_tag, f"shard:{first}" if len(group) == 1 else f"shards:{first}-{group[-1]}"]
            if mode == "deployment" else [] for first, group in jobs.items()}
    outcomes: dict[int, Outcome] = {}
    global last_poll
    with get_client(sync_client=True, httpx_settings=RETRY_SOON_SYNC) as client:
        runs = submit(client, cfg, stage, list(params.values()), list(tags.values()), fan_tag)
        poll = last_poll = ShardPoll(client, "flow" if mode == "deployment" else "task", runs, page, jobs)
        poll.submitted_in = time.time() - started
        lease, checked_at, resubmitted, requeued = cfg.execution.lease_seconds, time.time(), {}, {}
        last_end = None  # when a run last ended: a stage idle for a lease with runs still scheduled is stalled

        def report(batch: dict[int, Outcome]) -> None:
            outcomes.update(batch)
            on_finished(batch, len(outcomes))

        def again(job: int, why: str, n: int, of: int, mark: bool = True) -> None:
            if mark:
                _mark_crashed(client, poll.kind, poll.runs[job], why)
            run_id = submit(client, cfg, stage, [params[job]], [tags[job]], f"{fan_tag}-again{n}")[job]
            poll.replace(job, run_id)
            get_run_logger().warning(f"{stage} {_named(jobs[job])}: {why}; submitted again as run {run_id} ({n} of {of})")

        while True:
            if lease and time.time() - checked_at > lease / 2:  # dead workers: their shards again
                checked_at = time.time()
                if last_end is None or checked_at - last_end > lease / 2:  # nothing ended: ask the store
                    stored = complete_in_store(store, stage, poll, started, lease / 2)
                    if stored:
                        get_run_logger().warning(
                            f"{stage}: {len(stored)} run(s) whose shards the store holds complete have no final "
                            "state on the server yet (its task-run recorder lags or lost their events): taken as done")
                        for job in stored:
                            poll.drop(job)
                        last_end = time.time()
                        report({s: r for results in stored.values() for s, r in results.items()})
                        if not poll.outstanding:
                            break
                lapsed, stalled = lapsed_shards(poll, store, stage, lease,
                                                None if last_end is None else time.time() - last_end)
                for job, why in lapsed.items():
                    n = resubmitted[job] = resubmitted.get(job, 0) + 1
                    if n > cfg.execution.lease_resubmits:
                        _mark_crashed(client, poll.kind, poll.runs[job], why)
                        poll.drop(job)
                        report({s: f"{why}; failed after {n - 1} resubmissions (execution.lease_resubmits)"
                                for s in jobs[job]})
                        continue
                    again(job, why, n, cfg.execution.lease_resubmits)
                for job, why in stalled.items():  # never failed for it: a worker may come later
                    if requeued.get(job, 0) < cfg.execution.lease_resubmits:
                        requeued[job] = requeued.get(job, 0) + 1
                        again(job, why, requeued[job], cfg.execution.lease_resubmits)
                if stalled:
                    last_end = time.time()  # the new runs get a lease's time
            ended = poll.finished()
            for job, run in list(ended.items()):  # a worker that could not start the run: not the shards' fault
                if run.state_type == StateType.CRASHED and resubmitted.get(job, 0) < cfg.execution.lease_resubmits \
                        and not reached_any(store, stage, jobs[job], run, lease):
                    n = resubmitted[job] = resubmitted.get(job, 0) + 1
                    message = run.state.message if run.state is not None else ""
                    again(job, f"its run {run.id} crashed before it started ({message[:300]})", n,
                          cfg.execution.lease_resubmits, mark=False)
                    del ended[job]
            if ended:
                last_end = time.time()
                report(ended_outcomes(store, stage, {job: (jobs[job], run) for job, run in ended.items()}, started, lease))
            if not poll.outstanding:
                break
            timeout = cfg.execution.shard_timeout_seconds
            if timeout is not None and time.time() - started > timeout:
                report({s: f"no result after {timeout:g}s (run {run_id} "
                           f"{run.state_type.value if run and run.state_type else 'without state'}): is a worker running?"
                        for job, (run_id, run) in sorted(poll.unfinished().items()) for s in jobs[job]})
                break
            if time.time() - warned_at > WARN_EVERY:  # say so when nothing takes the shards (no worker running?)
                _warn_waiting(cfg, stage, poll.waiting(), len(jobs), started)
                warned_at = time.time()
            time.sleep(cfg.execution.poll_seconds)
    get_run_logger().info(f"{stage}: {n_shards} shards in {len(jobs)} runs ({fan_tag}) submitted in "
                          f"{poll.submitted_in:.1f}s, read back in {poll.polls} polls and {poll.calls} API calls")
    return outcomes


def shard_groups(n_shards: int, per_run: int) -> dict[int, list[int]]:
    """The shards of each run, keyed by the run's first shard: consecutive runs of `per_run`."""
    return {first: list(range(first, min(n_shards, first + per_run))) for first in range(0, n_shards, per_run)}


def _named(group: list[int]) -> str:
    return f"shard {group[0]}" if len(group) == 1 else f"shards {group[0]}-{group[-1]}"


class ShardPoll:
    """The submitted runs of one fan-out (`kind` "flow" or "task"), read back in one call per poll
    whatever their number, each under its first shard (`jobs`: a run's shards, by its first; one
    each unless `execution.shards_per_run` groups them). `calls` counts the API calls it made,
    `polls` its polls."""

    def __init__(self, client, kind: str, runs: dict[int, UUID], page: int | None = None,
                 jobs: dict[int, list[int]] | None = None):
        from prefect.settings import PREFECT_API_DEFAULT_LIMIT

        self.client, self.kind = client, kind
        self.jobs = jobs or {job: [job] for job in runs}
        self.runs = dict(runs)  # every submitted run, by its first shard
        self.outstanding: dict[UUID, int] = {run_id: shard for shard, run_id in runs.items()}
        self.page = page or PREFECT_API_DEFAULT_LIMIT.value()
        self.polls = self.calls = 0  # polls; API calls of every kind
        self.count_calls = 0  # of those, the "still waiting" counts
        self.lease_calls = 0  # and the state reads of the lease checks (one per lease_seconds / 2)
        self.submitted_in = 0.0  # seconds the submission took (set by remote_shards)
        self.store_versions: dict[int, str] = {}  # shard -> its record's version when complete_in_store last read it
        self.store_entries: dict[int, dict[str, Any]] = {}  # and the record it read

    def _filter(self, ids: list[UUID], types: list[StateType] | None) -> dict[str, Any]:
        from prefect.client.schemas import filters as f

        if self.kind == "flow":
            state = f.FlowRunFilterState(type=f.FlowRunFilterStateType(any_=types)) if types else None
            return {"flow_run_filter": f.FlowRunFilter(id=f.FlowRunFilterId(any_=ids), state=state)}
        state = f.TaskRunFilterState(type=f.TaskRunFilterStateType(any_=types), name=None) if types else None
        return {"task_run_filter": f.TaskRunFilter(id=f.TaskRunFilterId(any_=ids), state=state)}

    def _read(self, types: list[StateType] | None) -> list:
        """The outstanding runs in one of `types` (any state: None), a page at a time."""
        read = self.client.read_flow_runs if self.kind == "flow" else self.client.read_task_runs
        ids, found = list(self.outstanding), []
        for start in range(0, len(ids), ID_CHUNK):
            left = ids[start:start + ID_CHUNK]
            while left:
                runs = self._page(read, self._filter(left, types))
                found += runs
                if len(runs) < self.page:
                    break
                seen = {r.id for r in runs}  # a full page: ask again for the ones it did not hold
                left = [i for i in left if i not in seen]
        return found

    def _page(self, read, flt: dict[str, Any]) -> list:
        """One page. A server whose page limit is below this client's PREFECT_API_DEFAULT_LIMIT
        refuses the request (422, naming its limit): ask again with that limit, and keep it."""
        from prefect.exceptions import PrefectHTTPStatusError

        try:
            self.calls += 1
            return read(**flt, limit=self.page)
        except PrefectHTTPStatusError as e:
            bound = re.search(r"less than or equal to (\d+)", e.response.text) if e.response.status_code == 422 else None
            if not bound or int(bound.group(1)) >= self.page:
                raise
            self.page = int(bound.group(1))
            self.calls += 1
            return read(**flt, limit=self.page)

    def finished(self) -> dict[int, Any]:
        """The shards whose runs have ended since the last poll: shard -> its run (final state type)."""
        self.polls += 1
        ended = {}
        for run in self._read(FINAL):
            shard = self.outstanding.pop(run.id, None)
            if shard is not None:
                ended[shard] = run
        return ended

    def replace(self, shard: int, run_id: UUID) -> None:
        """Follow a shard's new run (submitted again) instead of its old one."""
        self.drop(shard)
        self.runs[shard] = run_id
        self.outstanding[run_id] = shard

    def drop(self, shard: int) -> None:
        self.outstanding.pop(self.runs[shard], None)

    def unfinished(self) -> dict[int, tuple[UUID, Any]]:
        """Every outstanding shard: (run id, its run as read now, or None)."""
        runs = {run.id: run for run in self._read(None)}
        return {shard: (run_id, runs.get(run_id)) for run_id, shard in self.outstanding.items()}

    def waiting(self) -> int:
        """How many outstanding runs no worker has taken yet (scheduled, late included)."""
        ids, n = list(self.outstanding), 0
        for start in range(0, len(ids), ID_CHUNK):
            flt = self._filter(ids[start:start + ID_CHUNK], [StateType.SCHEDULED])
            if self.kind == "flow":
                n += self.client.count_flow_runs(**flt)
            else:  # the client has no count_task_runs
                body = {"task_runs": flt["task_run_filter"].model_dump(mode="json", exclude_unset=True)}
                n += int(self.client.request("POST", "/task_runs/count", json=body).json())
            self.calls += 1
            self.count_calls += 1
        return n


def complete_in_store(store: RunStore, stage: str, poll: ShardPoll, started: float,
                      slack: float) -> dict[int, dict[int, ShardResult]]:
    """Outstanding runs (by first shard) all of whose shards the store holds complete, written since
    the fan-out started: their shards' results. The store is the shards' truth; Prefect's server can
    record a task run's final state late or never (3.7's task-run recorder failed on its natural-key
    alias here, and 20 of 3,000 noop runs never ended on the server). One listing of the stage's
    records, then a read of those of outstanding shards whose listed version is new since the last check."""
    jobs = list(poll.outstanding.values())
    versions = store.manifest_versions(stage)
    changed = sorted(s for job in jobs for s in poll.jobs[job]
                     if s in versions and (versions[s] is None or poll.store_versions.get(s) != versions[s]))
    poll.store_entries.update(store.shard_entries(stage, changed))
    poll.store_versions.update({s: versions[s] for s in changed})
    entries = poll.store_entries
    out = {}
    for job in jobs:
        got = {s: entries.get(s) or {} for s in poll.jobs[job]}
        if all(e.get("state") == COMPLETE and e.get("finished_at", 0.0) >= started - slack for e in got.values()):
            out[job] = {s: _completed(stage, s, e, started) for s, e in got.items()}
    return out


def lapsed_shards(poll: ShardPoll, store: RunStore, stage: str, lease: float,
                  idle_for: float | None) -> tuple[dict[int, str], dict[int, str]]:
    """(lapsed, stalled): runs (by first shard) whose worker is gone, each with why. Lapsed: the run
    is still Running but the freshest lease its shards renew (m3po_core.stages.runner.shard_lease;
    a run of several shards renews the one it is on) is older than `lease` seconds, or it has run
    that long without writing one. Stalled: no run is running, none has ended for `idle_for` >
    `lease` seconds (None: none has ended yet, so no worker may be up yet), and these are still
    Scheduled or Pending: a task worker takes a run off the server's queue before it has a free slot
    for it, so a worker killed then leaves a run that no one else gets. One state read and one read
    of the running runs' leases."""
    before = poll.calls
    unfinished = {job: run for job, (_, run) in poll.unfinished().items() if run is not None}
    poll.lease_calls += poll.calls - before
    running = {job: run for job, run in unfinished.items()
               if run.state_type == StateType.RUNNING and run.start_time is not None}
    if not running:
        if idle_for is None or idle_for <= lease:
            return {}, {}
        return {}, {job: f"still {run.state_type.value.lower()} after {idle_for:.0f}s in which no shard of the stage "
                         "ran: the worker that took it is gone" for job, run in unfinished.items()
                    if run.state_type in (StateType.SCHEDULED, StateType.PENDING)}
    leases = store.leases(stage, sorted(s for job in running for s in poll.jobs[job]))
    now, out = time.time(), {}
    for job, run in running.items():
        started = run.start_time.timestamp()
        own = [r for s in poll.jobs[job] if (r := leases.get(s)) is not None
               and r.get("renewed_at", 0) >= started - lease / 2]  # this run's leases
        if own:
            record = max(own, key=lambda r: r["renewed_at"])
            age = now - record["renewed_at"]
            if age > lease:
                out[job] = (f"its lease was last renewed {age:.0f}s ago by {record.get('host')} pid "
                            f"{record.get('pid')} (execution.lease_seconds={lease:g}): its worker is gone")
        elif now - started > lease:
            out[job] = (f"running {now - started:.0f}s without a lease (execution.lease_seconds={lease:g}): "
                        "its worker is gone")
    return out, {}


def reached_any(store: RunStore, stage: str, group: list[int], run, lease: float | None) -> bool:
    """Whether a run that ended touched any of its shards (a record written or a lease renewed
    since it was created): a run crashed before reaching one was never run (the worker could not
    start it, e.g. "Failed to submit flow run to infrastructure" on a busy server)."""
    created = run.created or run.expected_start_time
    if created is None:
        return True  # cannot tell: not submitted again
    since = created.timestamp() - (lease or 10.0) / 2
    entries = store.shard_entries(stage, group)
    leases = store.leases(stage, group) if lease else {}
    return any(touched(entries.get(s), leases.get(s), since) for s in group)


def touched(entry: dict[str, Any] | None, lease_record: dict[str, Any] | None, since: float) -> bool:
    """Whether a run reached a shard after `since`: it wrote the shard's record (done, failed or
    running) or renewed its lease (a shard found cached renews its lease too)."""
    entry, lease_record = entry or {}, lease_record or {}
    return max(entry.get("finished_at", 0.0), entry.get("at", 0.0), lease_record.get("renewed_at", 0.0)) >= since


def ended_outcomes(store: RunStore, stage: str, ended: dict[int, tuple[list[int], Any]], started: float,
                   lease: float | None) -> dict[int, Outcome]:
    """Each shard's outcome, for runs that ended (by first shard: its shards and its run), from the
    shards' manifest records read at once (and, for a run of several shards that did not complete,
    their leases: which shards it reached)."""
    shards = sorted(s for group, _ in ended.values() for s in group)
    entries = store.shard_entries(stage, shards)
    partial = sorted(s for group, run in ended.values() if len(group) > 1 and run.state_type != StateType.COMPLETED
                     for s in group)
    leases = store.leases(stage, partial) if partial and lease else {}
    slack = (lease or 10.0) / 2  # the hosts' clocks agree within this
    return {s: _outcome(stage, s, entries.get(s), run, started, len(group) > 1, leases.get(s), slack)
            for group, run in ended.values() for s in group}


def _mark_crashed(client, kind: str, run_id: UUID, why: str) -> None:
    """The abandoned run shows as Crashed in the UI (best effort: the fan-out no longer follows it)."""
    from prefect.states import Crashed

    try:
        setter = client.set_flow_run_state if kind == "flow" else client.set_task_run_state
        setter(run_id, Crashed(message=why), force=True)
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning(f"run {run_id}: could not be marked crashed ({type(e).__name__}: {e})")


def _outcome(stage: str, shard: int, entry: dict[str, Any] | None, run, started: float, grouped: bool = False,
             lease_record: dict[str, Any] | None = None, slack: float = 5.0) -> Outcome:
    """A finished remote shard's result, or its error message (the manifest's, else the run's).
    The run's state type, not its state object: a task run's row can carry the type before the
    server has recorded the state itself (both come through the event pipeline). A run of several
    shards that did not complete vouches only for the shards it reached: those whose record it
    wrote, or whose lease it renewed (a shard found cached renews its lease too)."""
    entry = entry or {}
    reached = run.state_type == StateType.COMPLETED or not grouped
    if not reached and run.start_time is not None:
        reached = touched(entry, lease_record, run.start_time.timestamp() - slack)
    if entry.get("state") == COMPLETE and reached and (grouped or run.state_type == StateType.COMPLETED):
        return _completed(stage, shard, entry, started)
    message = f": {run.state.message}" if run.state is not None and run.state.message else ""
    if not reached:
        return f"run {run.id} ended {run.state_type.value} before it reached this shard{message}; a re-run computes it"
    return entry.get("error") or f"run {run.id} ended {run.state_type.value}{message}"


def _completed(stage: str, shard: int, entry: dict[str, Any], started: float) -> ShardResult:
    """A shard's result from its complete manifest record (cached: finished before the fan-out)."""
    return ShardResult(stage, shard, entry["rows"], entry.get("finished_at", 0.0) < started, entry.get("seconds", 0.0))


def _warn_waiting(cfg: RunConfig, stage: str, waiting: int, n_runs: int, started: float) -> None:
    if waiting:
        who = "an `m3po worker`" if cfg.execution.shards == "task_worker" else "a worker of the pool"
        get_run_logger().warning(f"{stage}: {waiting} of {n_runs} shard runs still waiting for {who} "
                                 f"after {time.time() - started:.0f}s")


# -- submission ----------------------------------------------------------------------------------

def submit(client, cfg: RunConfig, stage: str, params: list[dict[str, Any]], tags: list[list[str]],
           key: str) -> dict[int, UUID]:
    """One run per parameter set (a shard, or with `shards` a group of them): its first shard ->
    its flow run (deployment) or task run (task_worker) id. `key` names the fan-out (its flow runs'
    idempotency keys are `{key}-{shard}`)."""
    field, job = REMOTE_JOBS[stage]
    if cfg.execution.shards == "deployment":
        return create_flow_runs(client, getattr(cfg.execution, field), params, tags, key)
    from prefect.utilities.asyncutils import run_coro_as_sync

    from m3po.flows.machinery.task_submission import delay_all

    return run_coro_as_sync(delay_all(job, params, tags))
