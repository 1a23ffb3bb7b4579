"""What flows/machinery/ relies on inside Prefect (and Python) beyond the public API: each test names
the workaround and fails when a release moves the name it touches (flows/machinery/README.md).
Measured on Prefect 3.7.7; a failure here means: re-read the workaround against the new release,
re-measure it (its bench), then keep, adapt or drop it."""
import inspect

import pytest


def test_task_submission_replaces_the_context_serializer_task_runs_call_through_the_module():
    import prefect.tasks

    from m3po.flows.machinery import task_submission

    # Task.create_run(deferred=True) calls `serialize_context()` as a global of prefect.tasks: the
    # replacement is seen only while it is looked up there, by that name, with that argument
    assert "serialize_context()" in inspect.getsource(prefect.tasks.Task.create_run)
    assert prefect.tasks.serialize_context is task_submission._serialized_once or \
        prefect.tasks.serialize_context.__name__ == "_serialized_once"
    original = inspect.signature(task_submission._serialize_context)
    assert list(original.parameters) == ["asset_ctx_kwargs"]
    create_run = inspect.signature(prefect.tasks.Task.create_run).parameters
    assert {"client", "parameters", "deferred"} <= set(create_run)


def test_task_submission_reads_the_contexts_it_keys_the_serialized_copy_by():
    from prefect.context import EngineContext, SettingsContext, TagsContext, TaskRunContext
    from prefect.utilities.engine import emit_task_run_state_change_event

    for ctx in (EngineContext, SettingsContext, TagsContext, TaskRunContext):
        assert callable(ctx.get)
    assert "current_tags" in TagsContext.model_fields
    assert {"task_run", "initial_state", "validated_state"} <= set(
        inspect.signature(emit_task_run_state_change_event).parameters)


def test_busy_api_hooks_into_the_httpx_clients_prefect_builds():
    import httpx
    from prefect.client import base

    for cls, parent in ((base.PrefectHttpxAsyncClient, httpx.AsyncClient), (base.PrefectHttpxSyncClient, httpx.Client)):
        assert issubclass(cls, parent)
        params = inspect.signature(cls.__init__).parameters
        # `event_hooks` reaches httpx through **kwargs
        assert any(p.kind is p.VAR_KEYWORD for p in params.values())
        assert "event_hooks" in inspect.signature(parent.__init__).parameters


def test_deployment_submission_uses_the_bulk_endpoint_and_run_deployments_placeholder_key():
    from prefect.deployments import flow_runs
    from prefect.server.api import deployments

    paths = {r.path for r in deployments.router.routes}
    assert "/deployments/{id:uuid}/create_flow_run/bulk" in paths
    # the placeholder task runs are keyed as run_deployment keys its own (flows/machinery/deployment_submission.py)
    assert 'f"{__name__}.run_deployment.{slugify(deployment_name)}"' in inspect.getsource(flow_runs)
    assert flow_runs.__name__ == "prefect.deployments.flow_runs"


def test_api_server_starts_prefects_app_as_its_ephemeral_mode_does():
    from prefect.server.api import server

    assert callable(server.create_app)
    source = inspect.getsource(server)
    assert "PREFECT__SERVER_EPHEMERAL" in source and "PREFECT__SERVER_FINAL" in source
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS  # noqa: F401  (its budget)


def test_process_exit_runs_pythons_own_exit_steps():
    import atexit
    import threading

    assert callable(threading._shutdown)
    assert callable(atexit._run_exitfuncs)


def test_remote_shards_count_endpoint_and_filters():
    from prefect.client.schemas import filters
    from prefect.server.api import task_runs

    assert "/task_runs/count" in {r.path for r in task_runs.router.routes}
    assert {"id", "state"} <= set(filters.FlowRunFilter.model_fields)
    assert {"id", "state"} <= set(filters.TaskRunFilter.model_fields)


@pytest.mark.parametrize("name", ["PREFECT_API_DEFAULT_LIMIT", "PREFECT_CLIENT_MAX_RETRIES"])
def test_settings_the_machinery_reads(name):
    import prefect.settings

    assert hasattr(prefect.settings, name)
