"""The `m3po` command's exit (flows/machinery/process_exit.py): Python's own exit steps all still happen,
in order, and the status comes through; only the C++ static destructors are skipped."""
import subprocess
import sys
import textwrap


def run(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_threads_are_joined_then_atexit_handlers_run_then_the_status_is_returned():
    done = run("""
        import atexit, logging, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from m3po.flows.machinery.process_exit import exit_now

        pool = ThreadPoolExecutor(2)           # never shut down: its idle workers must not hang the exit
        pool.submit(lambda: None).result()
        late = pool.submit(lambda: (time.sleep(0.3), print("pool task finished", flush=True)))
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
        atexit.register(lambda: print("atexit ran", flush=True))
        logging.basicConfig(stream=sys.stderr)
        logging.getLogger("x").warning("logged")
        print("buffered, not flushed", end="")
        exit_now(3)
    """)
    assert done.returncode == 3, done.stderr
    out = done.stdout
    assert out.index("pool task finished") < out.index("atexit ran"), out
    assert out.index("thread finished") < out.index("atexit ran"), out
    assert "buffered, not flushed" in done.stdout and "logged" in done.stderr


def test_none_is_status_zero_and_pyarrow_work_exits_cleanly():
    done = run("""
        import pyarrow as pa, pyarrow.parquet as pq, tempfile, os
        from m3po.flows.machinery.process_exit import exit_now

        path = os.path.join(tempfile.mkdtemp(), "t.parquet")
        pq.write_table(pa.table({"x": list(range(100_000))}), path, row_group_size=1000)
        assert pq.ParquetFile(path, pre_buffer=True).read().num_rows == 100_000
        print("read")
        exit_now(None)
    """)
    assert (done.returncode, done.stdout) == (0, "read\n"), done.stderr
