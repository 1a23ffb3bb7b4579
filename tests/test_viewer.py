"""`m3po view` as a user meets it: the real command serving a finished run on loopback, driven by
headless Chromium (Debian's package) through Playwright; plain HTTP for what a browser hides."""
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from m3po_core.viewer.run_data import redacted
from viewer_server import get, serving

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# CI sets M3PO_REQUIRE_BROWSER=1 (.ci/run installs Debian's chromium): there a missing browser fails
needs_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("M3PO_REQUIRE_BROWSER") != "1",
                                   reason="no Chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def viewer(mined_run):
    root, run_id = mined_run
    with serving(root, run_id) as url:
        yield url, root, run_id


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


def images_loaded(page) -> tuple[int, int]:
    return tuple(page.evaluate("() => { const ims = Array.from(document.images);"
                               " return [ims.length, ims.filter(i => i.complete && i.naturalWidth > 0).length]; }"))


@needs_browser
def test_the_pairs_page_lists_the_runs_pairs_with_their_images(viewer, browser):
    url, root, run_id = viewer
    pairs = pq.read_table(Path(root) / run_id / "pairs.parquet")
    page = browser.new_page()
    page.goto(f"{url}/pairs?per_page=25")
    rows = page.locator("tr.pair")
    shown = [rows.nth(i).get_attribute("data-prompt") for i in range(rows.count())]
    assert shown == sorted(pairs.column("prompt_id").to_pylist())[:25]
    page.wait_for_load_state("networkidle")
    total, loaded = images_loaded(page)
    assert total == 25 and loaded == 25
    first = next(r for r in pairs.to_pylist() if r["prompt_id"] == shown[0])
    assert first["chosen"] in rows.nth(0).inner_text() and first["rejected"] in rows.nth(0).inner_text()


@needs_browser
def test_every_image_on_the_run_page_loads_and_the_report_plots_show_once(viewer, browser):
    """The report card links its plots as plots/x.png: they resolve on the run page, and are not shown twice."""
    url, root, run_id = viewer
    page = browser.new_page()
    page.goto(f"{url}/")
    page.wait_for_load_state("networkidle")
    total, loaded = images_loaded(page)
    plots = sorted(p.name for p in (Path(root) / run_id / "plots").glob("*.png"))
    assert plots and total == loaded == len(plots)
    sources = page.evaluate("() => Array.from(document.images).map(i => new URL(i.src).pathname)")
    assert sorted(s.rsplit("/", 1)[-1] for s in sources) == plots


@needs_browser
def test_filtering_and_paging_change_what_is_shown(viewer, browser):
    url, root, run_id = viewer
    index = pq.read_table(Path(root) / run_id / "pairs.parquet").to_pylist()
    page = browser.new_page()
    page.goto(f"{url}/pairs?per_page=25")
    first_page = page.locator("tr.pair").first.get_attribute("data-prompt")
    page.locator("a.next").first.click()
    assert "page_no=1" in page.url
    second = [page.locator("tr.pair").nth(i).get_attribute("data-prompt") for i in range(page.locator("tr.pair").count())]
    assert first_page not in second and second == sorted(r["prompt_id"] for r in index)[25:50]

    # a filter by MAS gap: what the table lists is exactly the pairs over it
    gaps = sorted(r["mas_chosen"] - r["mas_rejected"] for r in index)
    threshold = round(gaps[len(gaps) // 2], 3)
    page.goto(f"{url}/pairs?per_page=100")
    page.fill("input[name=min_mas_gap]", str(threshold))
    page.click("#apply")
    expect = sorted(r["prompt_id"] for r in index if r["mas_chosen"] - r["mas_rejected"] >= threshold)
    assert 0 < len(expect) < len(index)
    assert page.locator("#count").inner_text().startswith(f"{len(expect)} of {len(index)}")
    rows = page.locator("tr.pair")
    assert [rows.nth(i).get_attribute("data-prompt") for i in range(rows.count())] == expect[:100]

    # sorting by the M3P-Score, highest first
    page.goto(f"{url}/pairs?per_page=25&sort=m3p_score&desc=1")
    best = max(index, key=lambda r: (r["m3p_score"], -ord(r["prompt_id"][0])))
    assert float(page.locator("tr.pair").first.locator("td.num").nth(2).inner_text()) == pytest.approx(best["m3p_score"], abs=6e-4)


@needs_browser
def test_a_scatter_point_opens_its_prompts_pool_with_all_32_candidates(viewer, browser, mined_run):
    url, root, run_id = viewer
    page = browser.new_page()
    page.goto(f"{url}/scatter")
    points = page.locator("a.point")
    assert points.count() == 2 * pq.read_metadata(Path(root) / run_id / "pairs.parquet").num_rows
    top = points.last  # drawn last: on top of any point it overlaps
    prompt_id = top.get_attribute("data-prompt")
    top.click()
    page.wait_for_url(f"**/pool/{prompt_id}")
    cands = page.locator("tr.candidate")
    assert cands.count() == 32
    assert page.locator("tr.candidate.chosen").count() == 1 and page.locator("tr.candidate.rejected").count() == 1
    page.wait_for_load_state("networkidle")
    assert images_loaded(page) == (1, 1)
    pair = next(r for r in pq.read_table(Path(root) / run_id / "pairs.parquet").to_pylist() if r["prompt_id"] == prompt_id)
    assert page.locator("tr.candidate.chosen td").first.inner_text() == str(pair["chosen_idx"])
    assert pair["chosen"] in page.locator("tr.candidate.chosen").inner_text()


@needs_browser
def test_a_failed_shard_shows_its_error(mined_run, browser):
    root, _ = mined_run
    with serving(root, "broken") as url:
        page = browser.new_page()
        page.goto(url + "/")
        failed = page.locator("#stage-candidates table.failed")
        assert failed.locator("td").first.inner_text() == "1"
        from m3po_core.stages.prompts import read_prompts_shard
        from m3po_core.store import RunStore

        store = RunStore(root, "broken")
        error = store.shard_entry("candidates", 1)["error"]
        assert failed.locator("td.error").inner_text() == error
        assert read_prompts_shard(store, 1)[0]["image"] in error  # the unreadable image, by name
        assert "failed: 1" in page.locator("#stage-candidates .counts").inner_text()


def test_benchmarks_list_the_questions_the_two_models_answer_differently(viewer):
    url, root, run_id = viewer
    status, html = get(f"{url}/benchmarks/pope")
    assert status == 200
    from m3po_core.evaluation.yesno import parse_yes_no
    from m3po_core.store import RunStore

    store = RunStore(root, run_id)
    base = {r["row_id"]: r["prediction"] for r in store.read_stage("eval/predictions-base-pope").to_pylist()}
    trained = {r["row_id"]: r["prediction"] for r in store.read_stage("predictions/predictions-trained-pope").to_pylist()}
    differ = [k for k in trained if parse_yes_no(trained[k]) != parse_yes_no(base[k])]
    assert re.search(rf'<span id="n-differ">{len(differ)}</span> of {len(trained)} questions', html)


def test_the_viewer_is_read_only_and_serves_only_the_runs_own_files(viewer):
    url, root, run_id = viewer
    before = {p: p.stat().st_mtime_ns for p in Path(root, run_id).rglob("*")}
    for path in ("/image/..%2F..%2Fetc%2Fpasswd", "/plot/..%2Fconfig.json", "/plot/config.json",
                 "/bench-image/pope/nope", "/pool/no-such-prompt", "/static/..%2F..%2Fstore.py"):
        status, body = get(url + path)
        assert status == 404, (path, status)
        assert "root:" not in body
    status, body = get(f"{url}/pairs?min_mas_gap=wide")
    assert status == 400 and "min_mas_gap='wide' is not a number" in body
    req = urllib.request.Request(f"{url}/pairs", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert {p: p.stat().st_mtime_ns for p in Path(root, run_id).rglob("*")} == before


def test_no_secret_reaches_a_page(mined_run, tmp_path):
    root, _ = mined_run
    shutil.copytree(Path(root, "broken"), tmp_path / "leaky")
    cfg = json.loads((tmp_path / "leaky" / "config.json").read_text())
    cfg["sampling"]["base_url"] = "https://alice:sk-live-SECRET@judge.example/v1"
    cfg["extra"] = {"api_key": "sk-live-SECRET2", "api_key_env": "OPENAI_API_KEY"}
    (tmp_path / "leaky" / "config.json").write_text(json.dumps(cfg))
    with serving(str(tmp_path), "leaky") as url:
        status, html = get(url + "/")
    assert status == 200 and "judge.example/v1" in html and "OPENAI_API_KEY" in html
    assert "SECRET" not in html and "alice" not in html
    assert redacted({"a": {"password": "p", "token": "t", "n": 3}}) == {"a": {"password": "(hidden)", "token": "(hidden)", "n": 3}}


def test_a_run_on_s3_is_viewed_the_same(mined_run, s3_server):
    """The store on an S3-compatible server (moto on loopback): the pairs page and a pool read through s3fs."""
    import s3fs

    root, run_id = mined_run
    fs = s3fs.S3FileSystem()
    fs.put(str(Path(root, run_id)), f"m3po/viewer/{run_id}", recursive=True)
    with serving("s3://m3po/viewer", run_id) as url:
        status, html = get(f"{url}/pairs?per_page=25")
        assert status == 200 and html.count('<tr class="pair"') == 25
        prompt_id = re.search(r'data-prompt="([^"]+)"', html).group(1)
        status, html = get(f"{url}/pool/{prompt_id}")
        assert status == 200 and html.count('<tr class="candidate') == 32


def test_a_run_that_does_not_exist_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "view", "nope", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "no run 'nope'" in out.stderr
