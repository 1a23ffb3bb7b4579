"""A flow run's graph as the Prefect UI draws it, read through the API (for the DAG tests)."""
import re


def graph_edges(client, flow_run_id) -> set[tuple[str, str]]:
    """(upstream, downstream) labels of a flow run's graph as the Prefect UI draws it (graph-v2): a
    subflow's label is "flow / run", and each run name's suffix (`-t1`, `-0a1`, `-00003`) is cut, so
    a mapped task is one name."""
    graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": flow_run_id}).json()
    label = {node_id: re.sub(r"-(t1|[0-9a-f]{3}|\d{5})$", "", node["label"].split(" / ")[-1]) for node_id, node in graph["nodes"]}
    return {(label[parent["id"]], label[node_id]) for node_id, node in graph["nodes"] for parent in node["parents"]}


def flow_run_id(client, name: str):
    """The id of a flow run by its name (the first, if a name repeats)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])), limit=1)
    assert runs, f"no flow run named {name}"
    return runs[0].id
