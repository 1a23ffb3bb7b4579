"""The terminal's progress line per stage (m3po_core/progress.py)."""
import io

from m3po_core import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_report_shards_rows_and_an_estimate_then_done():
    out = io.StringIO()
    reporter = progress.Reporter(out)  # not a terminal: plain lines
    reporter.begin("generate")
    reporter.shards(8)
    for _ in range(8):
        reporter.shard_done(rows=32)
    reporter.end()
    lines = out.getvalue().splitlines()
    # a line at each quarter (2, 4, 6 of 8), then the stage's last line
    assert [line.split()[1] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert "64 rows" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("generate") and "256 rows" in lines[-1] and lines[-1].endswith("done")
    assert "left" not in lines[-1]


def test_cached_shards_do_not_feed_the_estimate():
    out = io.StringIO()
    reporter = progress.Reporter(out)
    reporter.begin("score")
    reporter.shards(4)
    reporter.shard_done(rows=10, cached=True)
    reporter.shard_done(rows=10, cached=True)
    assert "left" not in out.getvalue()  # nothing computed yet: no estimate to give
    reporter.shard_done(rows=10)
    reporter.end()
    assert "3/4 shards" in out.getvalue() and "left" in out.getvalue()


def _screen(text: str) -> list[str]:
    """What a terminal shows of `text`: on each line, what follows its last clear-line, other
    control sequences dropped."""
    import re

    return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line.rsplit("\r\x1b[2K", 1)[-1]).rstrip()
            for line in text.split("\n")]


def test_a_terminal_gets_each_stage_on_one_line_redrawn_in_place_with_notes_above():
    out = _Terminal()
    reporter = progress.Reporter(out, refresh_seconds=60)  # rich's live display
    reporter.begin("train")
    reporter.steps(1, 3)
    reporter.note("judge projection: 10 requests")
    reporter.steps(3, 3)
    reporter.end()
    reporter.begin("evaluate")
    reporter.end()
    reporter.close()
    text = out.getvalue()
    assert text.count("train") > 2  # redrawn: 0, 1/3, 3/3 steps
    screen = [line for line in _screen(text) if line]
    assert screen[0] == "judge projection: 10 requests"
    assert screen[1].startswith("train") and "3/3 steps" in screen[1] and screen[1].endswith("done")
    assert screen[2].startswith("evaluate") and screen[2].endswith("done") and len(screen) == 3


def test_without_a_reporter_the_stages_print_nothing(capsys):
    progress.uninstall()
    progress.begin("generate")
    progress.shards(3)
    progress.shard_done(5)
    progress.end()
    assert capsys.readouterr() == ("", "")
