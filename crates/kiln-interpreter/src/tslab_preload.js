// Preloaded by kiln-interpreter into JavaScript and TypeScript kernels (NODE_OPTIONS
// `--require`, see tslab.rs). In a tslab kernel (npm `tslab` 1.0.x: kernels `jslab` and
// `tslab`) it makes execution behave the way E2B's server expects (spec A.5, A.6):
//
// - the value of a cell's last expression is an `execute_result` (tslab prints it to
//   stdout), so `await Promise.resolve('x')` gives a result whose text is `'x'`;
// - `execute_input` is broadcast, and `silent` cells neither count nor publish output;
// - a failing cell reports `ename`/`evalue`/`traceback` (tslab prints the error to
//   stderr and replies with a bare `status: error`);
// - no request is aborted because an earlier cell failed (tslab aborts everything that
//   arrives within 200 ms of an error; our server sends one request at a time anyway).
//
// How: tslab's executor reports the last value and errors only through the `console`
// object it is created with (`log(value)`, `error(exception)`, `error(format, ...)` for
// compile diagnostics), so `createExecutor` is wrapped to pass one that records them;
// `ZmqServer.prototype.handleExecute` is replaced to turn the record into messages.
// Both are looked up by tslab at call time, after this file ran.
//
// In any other process (a program the user's code starts, another kernel) or a tslab
// whose modules look different, it changes nothing. A tslab installed in the kernel's
// working directory (tslab starts that one instead) runs unpatched.
"use strict";
(() => {
  const fs = require("fs");
  const path = require("path");
  const util = require("util");

  // Programs the kernel's code starts inherit its environment: drop our flag.
  const flag = `--require "${__filename}"`;
  const options = (process.env.NODE_OPTIONS || "").split(flag).join("").trim();
  if (options) process.env.NODE_OPTIONS = options;
  else delete process.env.NODE_OPTIONS;

  // `tslab kernel ...`: argv[1] is tslab's bin/tslab (often through a symlink).
  let bin;
  try {
    bin = fs.realpathSync(process.argv[1] || "");
  } catch (_) {
    return;
  }
  if (path.basename(bin) !== "tslab" || process.argv[2] !== "kernel") return;
  const dist = path.join(path.dirname(bin), "..", "dist");
  let jupyter;
  let executorModule;
  try {
    jupyter = require(path.join(dist, "jupyter.js"));
    executorModule = require(path.join(dist, "executor.js"));
  } catch (_) {
    return;
  }
  const server = jupyter.ZmqServer && jupyter.ZmqServer.prototype;
  const createExecutor = executorModule.createExecutor;
  if (!server || typeof server.handleExecute !== "function" || typeof createExecutor !== "function") {
    return;
  }

  // What the running cell produced, as tslab's executor reported it.
  const cell = { value: undefined, thrown: null, diagnostics: [] };
  const recorder = {
    // Called only with the last expression's value (when it is not null/undefined).
    log: (value) => {
      cell.value = value;
    },
    // One argument: a caught exception. More: a compile diagnostic as a format string.
    error: (...args) => {
      if (args.length === 1) {
        if (!cell.thrown) cell.thrown = { value: args[0] };
      } else {
        cell.diagnostics.push(util.format(...args));
      }
    },
  };
  const executors = new WeakSet();
  executorModule.createExecutor = function (rootDir, converters, _console) {
    const executor = createExecutor(rootDir, converters, recorder);
    executors.add(executor);
    return executor;
  };

  function describeError(record) {
    if (record.thrown) {
      const e = record.thrown.value;
      if (e && typeof e === "object" && "message" in e) {
        const name = String(e.name || (e.constructor && e.constructor.name) || "Error");
        const value = String(e.message);
        return { ename: name, evalue: value, traceback: [String(e.stack || `${name}: ${value}`)] };
      }
      const value = typeof e === "string" ? e : util.inspect(e);
      return { ename: "Error", evalue: value, traceback: [`Uncaught ${util.inspect(e)}`] };
    }
    if (record.diagnostics.length) {
      const text = record.diagnostics.join("\n");
      return { ename: "CompileError", evalue: text, traceback: [text] };
    }
    return { ename: "Error", evalue: "execution failed", traceback: [] };
  }

  const handleExecute = server.handleExecute;
  server.handleExecute = async function (sock, msg) {
    const handler = this.handler;
    if (!handler || !executors.has(handler.executor)) {
      return handleExecute.call(this, sock, msg);
    }
    const key = this.connInfo.key;
    const request = msg.content || {};
    const silent = !!request.silent;
    const send = (socket, type, content) => {
      const m = msg.createReply();
      m.header.msg_type = type;
      m.content = content;
      m.signAndSend(key, socket);
    };
    const publish = (type, content) => {
      if (!silent) send(this.iopub, type, content);
    };
    // Empty writes (a child process's empty stderr) would be empty stdout/stderr items.
    const writeStream = (name, text) => {
      if (text) publish("stream", { name, text });
    };
    const writeDisplay = (data, update) =>
      publish(update ? "update_display_data" : "display_data", data);
    const run = async () => {
      const count = silent ? handler.execCount : ++handler.execCount;
      try {
        // Output produced later (timers, promises) goes to the latest cell, as in tslab.
        process.stdout.write = handler.createWriteToIopub("stdout", writeStream);
        process.stderr.write = handler.createWriteToIopub("stderr", writeStream);
        jupyter.lastWriteDisplayData = writeDisplay;
        publish("execute_input", { code: request.code, execution_count: count });
        cell.value = undefined;
        cell.thrown = null;
        cell.diagnostics = [];
        let ok = false;
        try {
          ok = await handler.executor.execute(request.code);
        } catch (e) {
          cell.thrown = { value: e };
        }
        if (ok) {
          if (cell.value != null) {
            publish("execute_result", {
              execution_count: count,
              data: { "text/plain": util.inspect(cell.value) },
              metadata: {},
            });
          }
          return { status: "ok", execution_count: count, user_expressions: {} };
        }
        const error = describeError(cell);
        publish("error", error);
        return { status: "error", execution_count: count, ...error };
      } catch (e) {
        return { status: "error", execution_count: count, ...describeError({ thrown: { value: e }, diagnostics: [] }) };
      }
    };
    // The queue only orders requests: `run` never rejects, so nothing is aborted.
    const reply = await handler.execQueue.add(run);
    send(sock, "execute_reply", reply);
  };
})();
