"""Drive a local kiln-interpreter with the official E2B code-interpreter SDK (debug mode).

How to run (any user; no API server, no envd):

    python3 -m venv /tmp/ci-venv
    /tmp/ci-venv/bin/pip install ipykernel e2b-code-interpreter==2.9.1 matplotlib pandas \
        e2b_charts orjson pillow bash_kernel
    /tmp/ci-venv/bin/python -m bash_kernel.install --sys-prefix     # optional
    cargo build -p kiln-interpreter
    mkdir -p /tmp/ci-home
    PATH=/tmp/ci-venv/bin:$PATH target/x86_64-unknown-linux-gnu/debug/kiln-interpreter \
        --listen 127.0.0.1:49999 --default-cwd /tmp/ci-home --envd http://127.0.0.1:49983 &
    E2B_DEBUG=true /tmp/ci-venv/bin/python crates/kiln-interpreter/tests/sdk_smoke.py

With E2B_DEBUG=true, `Sandbox.create()` makes no API call and the SDK sends `/execute`
and `/contexts` to http://localhost:49999. This script also serves a fake envd `GET /envs`
on 127.0.0.1:49983 (sandbox-level env vars). It exits non-zero on the first failed check
and prints `N passed, 0 failed` at the end.
"""

import http.server
import json
import os
import sys
import threading
import time

os.environ.setdefault("E2B_DEBUG", "true")

from e2b import TimeoutException  # noqa: E402
from e2b_code_interpreter import Sandbox  # noqa: E402
from e2b_code_interpreter.charts import ChartType  # noqa: E402

PASSED = 0
SANDBOX_ENVS = {"TEST_ENV_VAR": "supertest", "E2B_SANDBOX": "true"}


def check(name, cond, detail=""):
    global PASSED
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        print(f"{PASSED} passed, 1 failed")
        sys.exit(1)
    PASSED += 1
    print(f"ok   {name}", flush=True)


class FakeEnvd(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(SANDBOX_ENVS).encode() if self.path == "/envs" else b"{}"
        self.send_response(200 if self.path == "/envs" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_fake_envd():
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 49983), FakeEnvd)
    except OSError as e:
        print(f"note: fake envd not started ({e}); sandbox env checks may fail")
        return
    threading.Thread(target=server.serve_forever, daemon=True).start()


def basics(sbx):
    sbx.run_code("x = 1")
    r = sbx.run_code("x + 1")
    check("state kept between runs", r.text == "2", repr(r.text))

    out = []
    r = sbx.run_code("print('Hello from e2b')", on_stdout=lambda m: out.append(m.line))
    check("stdout", r.logs.stdout == ["Hello from e2b\n"], repr(r.logs.stdout))
    check("on_stdout once", out == ["Hello from e2b\n"], repr(out))

    err = []
    r = sbx.run_code("import sys; print('oops', file=sys.stderr)", on_stderr=lambda m: err.append(m))
    check("stderr", r.logs.stderr == ["oops\n"], repr(r.logs.stderr))
    check("on_stderr error flag", len(err) == 1 and err[0].error, repr(err))

    r = sbx.run_code("1/0")
    check("error name", r.error is not None and r.error.name == "ZeroDivisionError", repr(r.error))
    check("error value", r.error.value == "division by zero", repr(r.error.value))
    check("error traceback", "ZeroDivisionError" in r.error.traceback and "\x1b[" not in r.error.traceback,
          repr(r.error.traceback))

    errors = []
    sbx.run_code("xyz", on_error=lambda e: errors.append(e))
    check("on_error", len(errors) == 1 and errors[0].value == "name 'xyz' is not defined", repr(errors))

    r = sbx.run_code("'/home/user'")
    check("text quotes stripped", r.text == "/home/user", repr(r.text))

    r = sbx.run_code("{'a': 1, 'b': [1, 2]}")
    check("dict gives json", r.results[0].json == {"a": 1, "b": [1, 2]}, repr(r.results[0].json))

    r = sbx.run_code("from IPython.display import display; display({'text/latex': r'$x$'}, raw=True)")
    check("latex only", r.results[0].formats() == ["latex"], repr(r.results[0].formats()))

    r = sbx.run_code("    a = 5\n    a * 2")
    check("indented code", r.text == "10", repr(r.text))


def rich(sbx):
    results = []
    code = """
import matplotlib.pyplot as plt
import numpy as np
x = np.linspace(0, 20, 100)
plt.plot(x, np.sin(x))
plt.show()
"""
    r = sbx.run_code(code, on_result=lambda res: results.append(res))
    check("plot gives png", len(r.results) == 1 and r.results[0].png, repr(r.results))
    check("plot extra empty", not r.results[0].extra, repr(r.results[0].extra))
    check("plot is not main", r.results[0].is_main_result is False)
    check("on_result streamed", len(results) == 1 and results[0].png)
    check("line chart", r.results[0].chart is not None and r.results[0].chart.type == ChartType.LINE,
          repr(r.results[0].chart))

    r = sbx.run_code(code + "\n1")
    check("plot then expression gives 2 results", len(r.results) == 2, repr(r.results))

    r = sbx.run_code("""
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.bar(['A', 'B', 'C', 'D'], [100, 200, 300, 400], label='Sales')
ax.set_title('Bars')
ax.set_xlabel('Letter')
ax.set_ylabel('Value')
plt.show()
""")
    chart = r.results[0].chart
    check("bar chart", chart is not None and chart.type == ChartType.BAR, repr(chart))
    check("bar values", [e.value for e in chart.elements] == [100, 200, 300, 400],
          repr([e.value for e in chart.elements]))
    check("bar title", chart.title == "Bars", repr(chart.title))

    r = sbx.run_code("""
import pandas as pd
pd.DataFrame({'a': [1, 2], 'b': ['x', 'y'], 't': pd.to_datetime(['2024-01-01', '2024-01-02'])})
""")
    res = r.results[0]
    check("dataframe html", res.html and "<table" in res.html, repr(res.html)[:80])
    check("dataframe data", res.data is not None and res.data["a"] == [1, 2]
          and res.data["t"][0].startswith("2024-01-01"), repr(res.data))

    r = sbx.run_code("from PIL import Image\nimg = Image.new('RGB', (8, 8), 'red')\nimg.show()")
    check("PIL show gives png", len(r.results) == 1 and r.results[0].png, repr(r.results))
    r = sbx.run_code("img")
    check("PIL image as last expression gives png", r.results and r.results[0].png, repr(r.results))
    r = sbx.run_code("import os, tempfile\nimg.save(os.path.join(tempfile.gettempdir(), 'kiln-smoke.png'))")
    check("PIL save gives png", len(r.results) == 1 and r.results[0].png, repr(r.results))


def contexts(sbx):
    sbx.run_code("shared = 42")
    ctx = sbx.create_code_context(cwd="/tmp")
    check("context listed last", sbx.list_code_contexts()[-1].id == ctx.id)
    check("context language", ctx.language == "python" and ctx.cwd == "/tmp", repr(ctx))
    r = sbx.run_code("shared", context=ctx)
    check("contexts independent", r.error is not None and r.error.name == "NameError", repr(r.error))
    r = sbx.run_code("import os; os.getcwd()", context=ctx)
    check("context cwd", r.text == "/tmp", repr(r.text))
    r = sbx.run_code("1", context=ctx)
    check("execution count", r.execution_count == 3, repr(r.execution_count))

    sbx.run_code("y = 5", context=ctx)
    sbx.restart_code_context(ctx)
    r = sbx.run_code("y", context=ctx)
    check("restart clears state", r.error is not None and r.error.value == "name 'y' is not defined",
          repr(r.error))

    sbx.remove_code_context(ctx)
    check("context removed", all(c.id != ctx.id for c in sbx.list_code_contexts()))
    try:
        sbx.run_code("1", context=ctx)
        check("removed context gives 404", False)
    except Exception as e:  # NotFoundException
        check("removed context gives 404", "not found" in str(e).lower(), repr(e))

    r = sbx.run_code("shared", language="python")
    check("language=python is the default context", r.text == "42", repr(r.text))

    try:
        sbx.run_code("1", language="cobol")
        check("unknown language rejected", False)
    except Exception as e:
        check("unknown language rejected", "cobol" in str(e), repr(e))


def envs(sbx):
    r = sbx.run_code("import os; os.environ.get('FOO')", envs={"FOO": "bar"})
    check("per-run env", r.text == "bar", repr(r.text))
    r = sbx.run_code("import os; os.environ.get('FOO')")
    check("per-run env gone after", r.text is None or r.text == "None", repr(r.text))

    r = sbx.run_code("import os; os.environ.get('TEST_ENV_VAR')")
    check("sandbox env from envd", r.text == "supertest", repr(r.text))
    r = sbx.run_code("import os; os.environ.get('TEST_ENV_VAR')", envs={"TEST_ENV_VAR": "overwrite"})
    check("per-run env overrides", r.text == "overwrite", repr(r.text))
    r = sbx.run_code("import os; os.environ.get('TEST_ENV_VAR')")
    check("sandbox env restored", r.text == "supertest", repr(r.text))


def timeouts(sbx):
    start = time.time()
    try:
        sbx.run_code("while True: pass", timeout=3)
        check("timeout raises", False)
    except TimeoutException:
        check("timeout raises", time.time() - start < 10)
    r = sbx.run_code("x = 7; x", timeout=20)
    check("context works after timeout", r.text == "7", repr(r.text))

    try:
        sbx.run_code("import time; time.sleep(300)", timeout=3)
    except TimeoutException:
        pass
    time.sleep(5)
    start = time.time()
    r = sbx.run_code("1 + 1", timeout=10)
    check("interrupt on disconnect", r.text == "2" and time.time() - start < 10, repr(r.text))


def bash(sbx):
    try:
        r = sbx.run_code("echo $FOO", language="bash", envs={"FOO": "bar"})
    except Exception as e:
        print(f"skip bash ({e})")
        return
    check("bash with env", r.logs.stdout == ["bar\n"], repr(r.logs.stdout))


def main():
    start_fake_envd()
    sbx = Sandbox.create()
    t = time.time()
    r = sbx.run_code("1")
    print(f"first run_code took {time.time() - t:.2f}s")
    check("first run", r.text == "1", repr(r.text))
    for part in (basics, rich, contexts, envs, timeouts, bash):
        part(sbx)
    print(f"{PASSED} passed, 0 failed")


if __name__ == "__main__":
    main()
