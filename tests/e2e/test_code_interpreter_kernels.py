"""The default code-interpreter template beyond Python basics, with the unmodified
`e2b-code-interpreter` SDK: JavaScript, TypeScript, Bash, R and Java kernels (spec A.5), env vars
in them (A.6), charts (A.9), streaming callbacks, contexts, per-run timeouts and
unknown languages.

Kiln's JavaScript and TypeScript kernels are tslab's `jslab` and `tslab` (E2B's
ijavascript fork is not published), made to report results, errors and counts like
E2B's by a script kiln-interpreter preloads into them; docs/compatibility.md lists
where they still differ (compile errors are `CompileError`). R is Debian's IRkernel
and Java PyPI's jjava (E2B: IRkernel and IJava); both start on first use.

Privilege tier: as the rest of the suite (a running `kiln serve`); the `ci_template`
fixture builds `templates/code-interpreter-v1` (layer-cache hits unless it changed).
"""

import time
from typing import Iterator, List

import pytest
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import Sandbox as CodeInterpreter
from e2b_code_interpreter.charts import ChartType


BUILD_TIMEOUT = 1500

# The first build installs the data stack from PyPI and tslab from npm.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 180)

SANDBOX_ENV = {"KILN_KERNEL_ENV": "from-create"}


@pytest.fixture(scope="module")
def ci(ci_template) -> Iterator[CodeInterpreter]:
    sbx = CodeInterpreter.create(template=ci_template, timeout=600, envs=SANDBOX_ENV)
    try:
        yield sbx
    finally:
        sbx.kill()


def test_python_and_javascript_contexts_start_with_the_sandbox(ci):
    """Spec A.5: the server starts a python and a javascript context, both in
    /home/user. Python is ready before the sandbox is; JavaScript (tslab compiles
    TypeScript, seconds of CPU) right after, in the background; listing the contexts
    waits for it, so the first list already has both."""
    # Listed at once: a list waits for the default contexts still starting.
    contexts = ci.list_code_contexts()
    assert sorted(c.language for c in contexts[:2]) == ["javascript", "python"], contexts
    assert all(c.cwd == "/home/user" for c in contexts[:2]), contexts
    # R and Java start on first use (a JVM kernel costs seconds and ~250 MB), and the
    # list does not pretend otherwise.
    assert not {"r", "java"} & {c.language for c in contexts}, contexts


def test_javascript_runs_in_its_own_default_context(ci):
    ex = ci.run_code("1+1", language="js")
    assert ex.error is None, ex.error
    assert ex.text == "2"

    ex = ci.run_code("console.log('Hello from JS')", language="javascript")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["Hello from JS\n"]
    assert ex.text is None

    # `js` and `javascript` are the same context: state carries over.
    assert ci.run_code("let kilnCounter = 41", language="js").error is None
    assert ci.run_code("kilnCounter + 1", language="javascript").text == "42"
    # Started in /home/user; a string result loses its quotes, as on E2B.
    assert ci.run_code("process.cwd()", language="js").text == "/home/user"


def test_javascript_top_level_await_and_es_imports(ci):
    ex = ci.run_code("await Promise.resolve('Hello World!')", language="js")
    assert ex.error is None, ex.error
    assert ex.text == "Hello World!"

    ci.files.write("/home/user/kiln-js.txt", "read by node")
    ex = ci.run_code(
        "import {readFileSync} from 'fs'\nreadFileSync('/home/user/kiln-js.txt', 'utf8')",
        language="js",
    )
    assert ex.error is None, ex.error
    assert ex.text == "read by node"


def test_javascript_errors_are_reported_and_the_next_cell_runs(ci):
    ex = ci.run_code("throw new RangeError('boom')", language="js")
    assert ex.error is not None
    assert (ex.error.name, ex.error.value) == ("RangeError", "boom")
    assert "RangeError: boom" in ex.error.traceback
    # Sent right after the failure (tslab on its own aborts such requests).
    ex = ci.run_code("2 + 2", language="js")
    assert ex.error is None, ex.error
    assert ex.text == "4"


def test_typescript_with_type_annotations_in_its_own_context(ci):
    ex = ci.run_code(
        "function greet(name: string): string { return `Hello, ${name}!` }\ngreet('Kiln')",
        language="ts",
    )
    assert ex.error is None, ex.error
    assert ex.text == "Hello, Kiln!"

    ex = ci.run_code("const n: number = 'one'", language="typescript")
    assert ex.error is not None
    assert "not assignable to type 'number'" in ex.error.value

    # Not the JavaScript context (spec A.5): its variables are not here.
    assert ci.run_code("let onlyInJs = 1", language="js").error is None
    ex = ci.run_code("onlyInJs", language="ts")
    assert ex.error is not None and "onlyInJs" in ex.error.value
    assert "typescript" in [c.language for c in ci.list_code_contexts()]


def test_bash_context(ci):
    ex = ci.run_code("echo $((1+2))", language="bash")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["3\n"]

    assert ci.run_code("pwd", language="bash").logs.stdout == ["/home/user\n"]
    assert ci.run_code("KILN_SHELL_VAR=7", language="bash").error is None
    assert ci.run_code("echo $KILN_SHELL_VAR", language="bash").logs.stdout == ["7\n"]


def test_env_vars_reach_javascript_and_bash(ci):
    # Sandbox-level (Sandbox.create(envs=...)) and per-run, which is gone afterwards.
    js = "process.env.KILN_KERNEL_ENV"
    assert ci.run_code(js, language="js").text == "from-create"
    ex = ci.run_code(js, language="js", envs={"KILN_KERNEL_ENV": "overwrite"})
    assert ex.text == "overwrite"
    assert ci.run_code(js, language="js").text == "from-create"
    ex = ci.run_code("process.env.KILN_RUN_ENV", language="js", envs={"KILN_RUN_ENV": "run"})
    assert ex.text == "run"
    assert ci.run_code("process.env.KILN_RUN_ENV", language="js").text is None

    bash = 'echo "${KILN_KERNEL_ENV:-unset} ${KILN_RUN_ENV:-unset}"'
    assert ci.run_code(bash, language="bash").logs.stdout == ["from-create unset\n"]
    ex = ci.run_code(bash, language="bash", envs={"KILN_RUN_ENV": "run"})
    assert ex.logs.stdout == ["from-create run\n"]
    assert ci.run_code(bash, language="bash").logs.stdout == ["from-create unset\n"]


def test_bar_chart_has_chart_data(ci):
    ex = ci.run_code(
        """
import matplotlib.pyplot as plt

authors = ['Author A', 'Author B', 'Author C', 'Author D']
sales = [100, 200, 300, 400]

plt.figure(figsize=(10, 6))
plt.bar(authors, sales, label='Books Sold', color='blue')
plt.xlabel('Authors')
plt.ylabel('Number of Books Sold')
plt.title('Book Sales by Authors')
plt.tight_layout()
plt.show()
"""
    )
    assert ex.error is None, ex.error
    charts = [r.chart for r in ex.results if r.chart]
    assert len(charts) == 1, [r.formats() for r in ex.results]
    chart = charts[0]
    assert chart.type == ChartType.BAR
    assert chart.title == "Book Sales by Authors"
    assert (chart.x_label, chart.y_label) == ("Authors", "Number of Books Sold")
    assert [bar.label for bar in chart.elements] == ["Author A", "Author B", "Author C", "Author D"]
    assert [bar.value for bar in chart.elements] == [100, 200, 300, 400]
    assert {bar.group for bar in chart.elements} == {"Books Sold"}


def test_callbacks_stream_stdout_stderr_and_results(ci):
    stdout: List = []
    stderr: List = []
    results: List = []
    seen_at: List[float] = []

    def on_stdout(msg):
        seen_at.append(time.monotonic())
        stdout.append(msg)

    ex = ci.run_code(
        "import sys, time\n"
        "print('first', flush=True)\n"
        "time.sleep(2)\n"
        "print('oops', file=sys.stderr, flush=True)\n"
        "42",
        on_stdout=on_stdout,
        on_stderr=stderr.append,
        on_result=results.append,
    )
    done = time.monotonic()
    assert ex.error is None, ex.error
    assert [(m.line, m.error) for m in stdout] == [("first\n", False)]
    assert [(m.line, m.error) for m in stderr] == [("oops\n", True)]
    assert [r.text for r in results] == ["42"] and results[0].is_main_result
    # Streamed: the first line arrived while the cell was still sleeping.
    assert done - seen_at[0] > 1.0, (seen_at, done)

    js_out: List = []
    ex = ci.run_code("console.log('from js')", language="js", on_stdout=js_out.append)
    assert [m.line for m in js_out] == ["from js\n"]


def test_contexts_are_independent_restartable_and_removable(ci):
    first = ci.create_code_context()
    second = ci.create_code_context()
    assert (first.language, first.cwd) == ("python", "/home/user")

    assert ci.run_code("x = 1", context=first).error is None
    ex = ci.run_code("x", context=second)
    assert ex.error is not None
    assert (ex.error.name, ex.error.value) == ("NameError", "name 'x' is not defined")

    listed = ci.list_code_contexts()
    ids = [c.id for c in listed]
    assert first.id in ids and listed[-1].id == second.id

    ci.restart_code_context(first)
    ex = ci.run_code("x", context=first)
    assert ex.error is not None and ex.error.name == "NameError"
    assert ci.run_code("1 + 1", context=first).text == "2"

    ci.remove_code_context(second)
    assert second.id not in [c.id for c in ci.list_code_contexts()]
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=second)

    # A context's working directory, for Python and for JavaScript.
    py_tmp = ci.create_code_context(cwd="/tmp")
    assert ci.run_code("import os; os.getcwd()", context=py_tmp).text == "/tmp"
    js_tmp = ci.create_code_context(cwd="/tmp", language="js")
    assert js_tmp.language == "javascript"
    assert ci.run_code("process.cwd()", context=js_tmp).text == "/tmp"


def test_timeout_interrupts_the_cell_and_the_context_keeps_working(ci):
    ctx = ci.create_code_context()
    assert ci.run_code("x = 41", context=ctx).error is None
    with pytest.raises(TimeoutException):
        ci.run_code("while True: pass", context=ctx, timeout=3)
    # Interrupted, not restarted: the state is still there.
    started = time.monotonic()
    ex = ci.run_code("x + 1", context=ctx, timeout=30)
    assert ex.error is None, ex.error
    assert ex.text == "42"
    assert time.monotonic() - started < 15


def test_unknown_language_is_a_clear_error(ci):
    with pytest.raises(SandboxException) as err:
        ci.run_code("print(1)", language="cobol")
    message = str(err.value)
    assert "500" in message and "'cobol'" in message, message
    assert "python3" in message, message  # the kernels that are installed
    with pytest.raises(SandboxException) as err:
        ci.create_code_context(language="cobol")
    assert "'cobol'" in str(err.value)


def r_text(ex) -> str:
    """The printed value of an R cell. IRkernel (E2B's R kernel too) sends values as
    display_data, so they are results but not the main one, and `execution.text` is None:
    E2B's own R tests read `results[0].text` as well."""
    assert ex.error is None, ex.error
    assert len(ex.results) == 1, ex.results
    return ex.results[0].text


def test_r_runs_in_its_own_default_context(ci):
    ex = ci.run_code("1+1", language="r")
    assert ex.error is None, ex.error
    assert ex.text is None
    assert [(r.text, r.is_main_result) for r in ex.results] == [("[1] 2", False)]

    ex = ci.run_code('print("Hello, World!")', language="R")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ['[1] "Hello, World!"\n']

    # `r` and `R` are one context, started in /home/user, listed once it exists.
    assert ci.run_code("kiln_x <- 41", language="r").error is None
    assert r_text(ci.run_code("kiln_x + 1", language="r")) == "[1] 42"
    assert r_text(ci.run_code("getwd()", language="r")) == '[1] "/home/user"'
    assert [c.language for c in ci.list_code_contexts()].count("r") == 1


def test_r_data_frame_and_plot(ci):
    ex = ci.run_code('data.frame(a = 1:2, b = c("x", "y"))', language="r")
    assert ex.error is None, ex.error
    result = ex.results[0]
    assert not result.is_main_result  # display_data, see r_text
    assert "<table" in result.html, result.formats()
    assert result.text.splitlines()[0].split() == ["a", "b"], result.text

    ex = ci.run_code("plot(1:10)", language="r")
    assert ex.error is None, ex.error
    assert any(r.png for r in ex.results), [r.formats() for r in ex.results]


def test_r_error_and_the_next_cell_runs(ci):
    ex = ci.run_code('stop("kiln boom")', language="r")
    assert ex.error is not None
    assert ex.error.name == "ERROR", ex.error
    assert "kiln boom" in ex.error.value, ex.error
    assert r_text(ci.run_code("2 * 21", language="r")) == "[1] 42"


def test_r_created_context_keeps_its_own_state(ci):
    ctx = ci.create_code_context(language="r")
    assert (ctx.language, ctx.cwd) == ("r", "/home/user")
    assert ci.run_code("kiln_y <- 5", context=ctx).error is None
    assert r_text(ci.run_code("kiln_y * 2", context=ctx)) == "[1] 10"
    # Not the default R context.
    assert r_text(ci.run_code('exists("kiln_y")', language="r")) == "[1] FALSE"
    assert ci.list_code_contexts()[-1].id == ctx.id

    tmp = ci.create_code_context(language="r", cwd="/tmp")
    assert r_text(ci.run_code("getwd()", context=tmp)) == '[1] "/tmp"'
    ci.remove_code_context(tmp)


def test_env_vars_reach_r(ci):
    # Spec A.6: R reads them with Sys.getenv, printed as a character vector.
    code = "Sys.getenv('KILN_KERNEL_ENV')"
    assert r_text(ci.run_code(code, language="r")) == '[1] "from-create"'
    ex = ci.run_code(code, language="r", envs={"KILN_KERNEL_ENV": "overwrite"})
    assert r_text(ex) == '[1] "overwrite"'
    assert r_text(ci.run_code(code, language="r")) == '[1] "from-create"'
    ex = ci.run_code("Sys.getenv('KILN_RUN_ENV', unset = 'unset')", language="r")
    assert r_text(ex) == '[1] "unset"'


def test_java_runs_in_its_own_default_context(ci):
    # The first Java cell starts the JVM kernel: seconds.
    ex = ci.run_code("int x = 41; x + 1", language="java")
    assert ex.error is None, ex.error
    assert ex.text == "42"

    ex = ci.run_code('System.out.println("hi");', language="java")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["hi\n"]
    assert ex.text is None

    # State carries over; a String result loses its quotes, as on E2B.
    assert ci.run_code("x * 2", language="java").text == "82"
    assert ci.run_code('"kiln"', language="java").text == "kiln"
    assert "java" in [c.language for c in ci.list_code_contexts()]


def test_java_errors(ci):
    ex = ci.run_code('int y = "s";', language="java")
    assert ex.error is not None
    assert ex.error.name == "CompilationException", ex.error
    assert "incompatible types" in ex.error.traceback, ex.error

    # jjava names every exception thrown by user code RuntimeException; the value has
    # the class and the message.
    ex = ci.run_code('throw new IllegalStateException("kiln boom");', language="java")
    assert ex.error is not None
    assert ex.error.name == "RuntimeException", ex.error
    assert ex.error.value == "java.lang.IllegalStateException, kiln boom", ex.error
    assert ci.run_code("1 + 1", language="java").text == "2"


def test_env_vars_reach_java(ci):
    # Spec A.6: Java sees them as system properties.
    code = 'System.getProperty("KILN_KERNEL_ENV")'
    assert ci.run_code(code, language="java").text == "from-create"
    ex = ci.run_code(code, language="java", envs={"KILN_KERNEL_ENV": "overwrite"})
    assert ex.text == "overwrite"
    assert ci.run_code(code, language="java").text == "from-create"


def test_java_created_context(ci):
    ctx = ci.create_code_context(language="java")
    assert ctx.language == "java"
    assert ci.run_code("String kiln = \"ctx\";", context=ctx).error is None
    assert ci.run_code("kiln + 1", context=ctx).text == "ctx1"


def test_r_and_java_cells_are_interrupted_on_timeout(ci):
    # IRkernel takes SIGINT; jjava asks for interrupt_request on its control socket.
    assert ci.run_code("kiln_keep <- 41", language="r").error is None
    with pytest.raises(TimeoutException):
        ci.run_code("repeat {}", language="r", timeout=3)
    assert r_text(ci.run_code("kiln_keep + 1", language="r", timeout=30)) == "[1] 42"

    assert ci.run_code("int kilnKeep = 41;", language="java").error is None
    with pytest.raises(TimeoutException):
        ci.run_code("while (true) { }", language="java", timeout=3)
    ex = ci.run_code("kilnKeep + 1", language="java", timeout=30)
    assert ex.error is None, ex.error
    assert ex.text == "42"
