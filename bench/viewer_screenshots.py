"""Screenshots of every page of `m3po view`, taken from a finished run (the demo's by default) in
headless Chromium (Debian's package) through Playwright: docs/usage.md's pictures.

    python bench/viewer_screenshots.py                          # ./m3po-runs/demo -> docs/screenshots/
    python bench/viewer_screenshots.py --root R --run-id ID --out DIR

Pages: the run, the pairs (filtered to one instruction kind, by M3P-Score), the scatter, the pool of
the first pair's prompt, and the POPE questions base and trained model answer differently.
Needs a finished run (`m3po run`) and Chromium (`apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=str(REPO / "m3po-runs"))
    p.add_argument("--run-id", default="demo")
    p.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "m3po.flows.cli", "view", args.run_id, "--root", args.root,
                               "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", server.stdout.readline())
        if not found:
            print("m3po view did not start (is there a finished run?)", file=sys.stderr)
            return 1
        url = found.group(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/pairs")
            kind = page.locator("select[name=kind] option").nth(1).inner_text()
            first = page.locator("tr.pair").first.get_attribute("data-prompt")
            shots = [("run", "/", False), ("pairs", f"/pairs?kind={kind}&sort=m3p_score&desc=1&per_page=25", False),
                     ("scatter", "/scatter", False), ("pool", f"/pool/{first}", False),
                     ("benchmarks", "/benchmarks/pope", False)]
            for name, path, full in shots:
                page.goto(url + path)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(out / f"{name}.png"), full_page=full)
                print(f"{name:<11} {url}{path} -> {out / (name + '.png')}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
