"""`m3po view`: a read-only web application over one run's store (a directory or `s3://`).

    /                      the run: configuration (secrets out), each stage's shards (failed ones with
                           their error), the report card with its plots, an experiment's tables
    /pairs                 pairs.parquet, paged, sorted and filtered (m3po_core/pair_query.py)
    /scatter               MAS against log P of the filtered pairs' chosen and rejected answers; a
                           point opens its prompt's pool
    /pool/{prompt_id}      the image and every candidate with its CLIP, judge aspects, MAS and log P
                           (IPA: every response of every round, its four conditions and feedback)
    /benchmarks[/{bench}]  the questions on which base and trained model disagree

Server-rendered HTML (Jinja2, autoescaped) and SVG: no script, no front-end build. Only GET routes;
an image is served by its prompt's or question's id, looked up in the run's own tables, never by a
path from the request. Pages send a Content-Security-Policy allowing only this origin.
Limit: one run per server; the pair index is built at start (a few seconds at 150K pairs).
"""
from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from m3po_core.errors import InputError
from m3po_core.pair_query import SORTABLE, PairFilter, PairIndex
from m3po_core.store import RunStore, open_url
from m3po_core.viewer import run_data

PAGE_SIZES = (25, 50, 100)
SCATTER_PAIRS = 1500  # pairs drawn on the scatter (two points each), an even sample of the filtered ones
THUMB = 112           # thumbnail edge, pixels
CSP = "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; base-uri 'none'"


def create_app(root: str, run_id: str):
    """The FastAPI application of one run. Raises InputError when the run has no pairs yet."""
    from fastapi.staticfiles import StaticFiles
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markdown_it import MarkdownIt

    store = RunStore(root, run_id)
    if not store.exists("config.json"):
        raise InputError(f"{store.url()}: no run {run_id!r} under {run_data.without_userinfo(root)}")
    index = PairIndex.build(store) if store.exists("pairs.parquet") else None
    env = Environment(loader=PackageLoader("m3po_core.viewer", "templates"), autoescape=select_autoescape(["html"]))
    env.globals.update(run_id=run_id, fmt=_fmt)
    markdown = MarkdownIt("js-default")  # raw HTML in the markdown is escaped, not passed through
    app = FastAPI(title=f"m3po view {run_id}", docs_url=None, redoc_url=None, openapi_url=None)
    from importlib.resources import files

    app.mount("/static", StaticFiles(directory=str(files("m3po_core.viewer") / "static")), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    # the log P the selection read (selection.logp: logp_mean or logp_sum), read once
    logp = (store.read_json("config.json").get("selection") or {}).get("logp", "logp_mean")

    def page(template: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**context))

    def need_pairs():
        if index is None:
            raise HTTPException(404, "this run has no pairs yet (its select step has not run)")
        return index

    def query_filter(request: Request) -> PairFilter:
        try:
            return PairFilter.from_mapping(dict(request.query_params))
        except InputError as e:
            raise HTTPException(400, str(e)) from None

    @app.get("/", response_class=HTMLResponse)
    def run_page():
        config = run_data.redacted(store.read_json("config.json"))
        stages = [run_data.stage_summary(*records) for records in run_data.stage_records(store)]
        text = store.read_bytes("report.md").decode() if store.exists("report.md") else ""
        report = markdown.render(text) if text else None
        # the report card shows its own plots (plots/x.png, served below); the rest are listed after it
        plots = sorted(p for p in (q.rsplit("/", 1)[-1] for q in store.fs.glob(store.path("plots/*.png")))
                       if f"plots/{p}" not in text)
        tables = (markdown.render(store.read_bytes("experiment/tables.md").decode())
                  if store.exists("experiment/tables.md") else None)
        done = {name: store.exists(name) for name in ("pairs.parquet", "adapter/_COMPLETE", "metrics.json", "report.md")}
        return page("run.html", config=config, stages=stages, report=report, plots=plots, tables=tables,
                    done=done, method=run_data.method(store), n_pairs=None if index is None else index.table.num_rows)

    @app.get("/pairs", response_class=HTMLResponse)
    def pairs_page(request: Request, sort: str = "prompt_id", desc: int = 0, page_no: int = 0, per_page: int = 50):
        ix, flt = need_pairs(), query_filter(request)
        if sort not in SORTABLE or per_page not in PAGE_SIZES:
            raise HTTPException(400, f"sort must be one of {', '.join(SORTABLE)}; per_page one of {PAGE_SIZES}")
        selected = ix.select(flt, sort, bool(desc))
        pages = max(1, math.ceil(selected.num_rows / per_page))
        page_no = min(max(page_no, 0), pages - 1)
        part = selected.slice(page_no * per_page, per_page)
        rows = ix.rows(part.column("row").to_pylist(), columns=["chosen", "rejected"])
        items = [{**meta, **full} for meta, full in zip(part.drop_columns(["row"]).to_pylist(), rows)]
        return page("pairs.html", items=items, flt=flt, params=flt.as_params(), sort=sort, desc=int(bool(desc)),
                    page_no=page_no, pages=pages, per_page=per_page, total=selected.num_rows,
                    all_pairs=ix.table.num_rows, strategies=ix.strategies, kinds=ix.kinds, sources=ix.sources,
                    sortable=SORTABLE, page_sizes=PAGE_SIZES)

    @app.get("/scatter", response_class=HTMLResponse)
    def scatter_page(request: Request):
        ix, flt = need_pairs(), query_filter(request)
        selected = ix.select(flt)
        step = max(1, math.ceil(selected.num_rows / SCATTER_PAIRS))
        sample = selected.take(list(range(0, selected.num_rows, step))).to_pylist()
        points = [{"prompt_id": p["prompt_id"], "role": role, "mas": p[f"mas_{role}"], "logp": p[f"logp_{role}"]}
                  for p in sample for role in ("chosen", "rejected")]
        return page("scatter.html", plot=scatter(points, "logp", "mas", labels=(f"log P ({logp})", "MAS")), flt=flt, params=flt.as_params(),
                    shown=len(sample), total=selected.num_rows, strategies=ix.strategies, kinds=ix.kinds,
                    sources=ix.sources)

    @app.get("/pool/{prompt_id}", response_class=HTMLResponse)
    def pool_page(prompt_id: str):
        ix = need_pairs()
        prompt = ix.prompt(prompt_id)
        if prompt is None:
            raise HTTPException(404, f"no prompt {prompt_id!r} in run {run_id!r}")
        pair = ix.pair_of(prompt_id)
        small = image_is_small(prompt["image"])
        if run_data.method(store) == "ipa":
            responses = run_data.ipa_responses(store, prompt_id)
            if pair is not None:  # its strategy names the round it came from (ipa-round-R)
                r = int(pair["strategy"].rsplit("-", 1)[1]) if pair["strategy"].rsplit("-", 1)[-1].isdigit() else None
                for x in responses:
                    x["role"] = ({pair["chosen_idx"]: "chosen", pair["rejected_idx"]: "rejected"}.get(x["resp_idx"], "")
                                 if x["round"] == r else "")
            return page("ipa_pool.html", prompt=prompt, pair=pair, responses=responses, small=small)
        candidates = run_data.pool(store, prompt_id, prompt["shard"], pair)
        points = [{"prompt_id": prompt_id, "role": c["role"] or "other", "mas": c["mas"], "logp": c[logp],
                   "cand_idx": c["cand_idx"]} for c in candidates]
        points.sort(key=lambda p: p["role"] != "other")  # the pair's two drawn last, on top
        return page("pool.html", prompt=prompt, pair=pair, candidates=candidates, small=small,
                    plot=scatter(points, "logp", "mas", link=False, labels=(f"log P ({logp})", "MAS")))

    @app.get("/benchmarks", response_class=HTMLResponse)
    def benchmarks_page():
        return page("benchmarks.html", benches=run_data.benchmarks(store), bench=None)

    @app.get("/benchmarks/{bench}", response_class=HTMLResponse)
    def benchmark_page(bench: str, page_no: int = 0, per_page: int = 50):
        benches = run_data.benchmarks(store)
        if bench not in benches or per_page not in PAGE_SIZES:
            raise HTTPException(404, f"no predictions of both models on {bench!r} in run {run_id!r}")
        both, differ = run_data.disagreements(store, bench)
        pages = max(1, math.ceil(len(differ) / per_page))
        page_no = min(max(page_no, 0), pages - 1)
        return page("benchmarks.html", benches=benches, bench=bench, both=both, n_differ=len(differ),
                    items=differ[page_no * per_page:(page_no + 1) * per_page], page_no=page_no, pages=pages,
                    per_page=per_page)

    def read_image(url: str) -> tuple[bytes, str]:
        """An image's bytes and MIME type (not cached: full images would fill memory)."""
        from PIL import Image

        with open_url(url) as f:
            data = f.read()
        return data, Image.MIME.get(Image.open(io.BytesIO(data)).format or "", "application/octet-stream")

    @lru_cache(maxsize=4096)  # ~4 kB each
    def thumbnail(url: str) -> tuple[bytes, str]:
        from PIL import Image

        with open_url(url) as f:
            im = Image.open(f)
            im.draft("RGB", (THUMB, THUMB))  # a JPEG is decoded at a reduced scale (DCT scaling): ~4x faster
            im.thumbnail((THUMB, THUMB))
            out = io.BytesIO()
            im.convert("RGB").save(out, "JPEG", quality=80)
        return out.getvalue(), "image/jpeg"

    def image_is_small(url: str) -> bool:
        """Under 224 pixels a side (the demo's worlds): shown enlarged without smoothing. Reads
        the image's header only."""
        from PIL import Image

        try:
            with open_url(url) as f:
                return max(Image.open(f).size) < 224
        except OSError:
            return False

    def send_image(url: str | None, thumb: int) -> Response:
        if not url:
            raise HTTPException(404, "no such image in this run")
        try:
            data, mime = thumbnail(url) if thumb else read_image(url)
        except OSError as e:
            raise HTTPException(404, f"the image cannot be read ({type(e).__name__})") from None
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    @app.get("/image/{prompt_id}")
    def prompt_image(prompt_id: str, thumb: int = 0):
        prompt = need_pairs().prompt(prompt_id)
        return send_image(prompt and prompt["image"], thumb)

    @app.get("/bench-image/{bench}/{row_id}")
    def bench_image(bench: str, row_id: str, thumb: int = 0):
        return send_image(bench_images(bench).get(row_id), thumb)

    @lru_cache(maxsize=16)
    def bench_images(bench: str) -> dict[str, str]:
        return run_data.benchmark_images(store, bench)

    @app.get("/plot/{name}")
    @app.get("/plots/{name}")             # the report card's own links (report.md: plots/x.png)
    def plot(name: str):
        return run_png("plots", name)

    @app.get("/experiment/{name}")        # the experiment tables' sweep plots (experiment/x_sweep.png)
    def experiment_plot(name: str):
        return run_png("experiment", name)

    def run_png(folder: str, name: str):
        """A PNG the run wrote in `folder`, by its listed name only (no path reaches outside the run)."""
        names = {p.rsplit("/", 1)[-1] for p in store.fs.glob(store.path(f"{folder}/*.png"))}
        if name not in names:
            raise HTTPException(404, f"no plot {name!r} in this run")
        return Response(store.read_bytes(f"{folder}/{name}"), media_type="image/png")

    return app


def scatter(points: list[dict[str, Any]], x: str, y: str, link: bool = True, width: int = 640,
            height: int = 420, labels: tuple[str, str] | None = None) -> dict[str, Any]:
    """Points placed in an SVG of `width` x `height` (axes from the data's range, 8 % margin), in
    the order given (later ones drawn on top)."""
    pad = 48
    xlabel, ylabel = labels or (x, y)
    xs = [p[x] for p in points if p[x] is not None and p[y] is not None]
    ys = [p[y] for p in points if p[x] is not None and p[y] is not None]
    if not xs:
        return {"points": [], "width": width, "height": height, "pad": pad, "xlabel": xlabel, "ylabel": ylabel,
                "ticks": {"x": [], "y": []}, "link": link}
    (x0, x1), (y0, y1) = _span(xs), _span(ys)
    placed = [{**p, "cx": pad + (p[x] - x0) / (x1 - x0) * (width - 2 * pad),
               "cy": height - pad - (p[y] - y0) / (y1 - y0) * (height - 2 * pad)}
              for p in points if p[x] is not None and p[y] is not None]
    ticks = {"x": [(pad + i / 4 * (width - 2 * pad), x0 + i / 4 * (x1 - x0)) for i in range(5)],
             "y": [(height - pad - i / 4 * (height - 2 * pad), y0 + i / 4 * (y1 - y0)) for i in range(5)]}
    return {"points": placed, "width": width, "height": height, "pad": pad, "xlabel": xlabel, "ylabel": ylabel,
            "ticks": ticks, "link": link}


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    margin = (hi - lo) * 0.08 or 0.5
    return lo - margin, hi + margin


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
