// Kiln end-to-end test with the official E2B JS SDK (node --test).
// Needs E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at a running `kiln serve`
// (tests/e2e/run.sh sets them).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError } from 'e2b'

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) throw new Error(`${name} not set: run tests/e2e/run.sh`)
}

test('create, run, files, kill with the JS SDK', async () => {
  const sbx = await Sandbox.create({ metadata: { suite: 'kiln-e2e-js' }, envs: { JS_VAR: 'from-js' } })
  try {
    assert.match(sbx.sandboxId, /^[a-z0-9]+$/)
    assert.equal(await sbx.isRunning(), true)

    const r = await sbx.commands.run('echo "hi $JS_VAR"; whoami; echo err >&2')
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'hi from-js\nuser\n')
    assert.equal(r.stderr, 'err\n')

    await assert.rejects(sbx.commands.run('exit 7'), (e) => e instanceof CommandExitError && e.exitCode === 7)

    const text = 'written from JS ✓\n'
    const info = await sbx.files.write('js/hello.txt', text)
    assert.equal(info.path, '/home/user/js/hello.txt')
    assert.equal(await sbx.files.read('/home/user/js/hello.txt'), text)
    const probe = await sbx.commands.run('cat /home/user/js/hello.txt; stat -c %U /home/user/js/hello.txt')
    assert.equal(probe.stdout, text + 'user\n')

    const bytes = new Uint8Array(256).map((_, i) => i)
    await sbx.files.write('/tmp/bytes.bin', bytes.buffer)
    const back = await sbx.files.read('/tmp/bytes.bin', { format: 'bytes' })
    assert.deepEqual(Array.from(back), Array.from(bytes))

    const entries = await sbx.files.list('/home/user/js')
    assert.deepEqual(entries.map((e) => e.name), ['hello.txt'])
  } finally {
    assert.equal(await sbx.kill(), true)
  }
  assert.equal(await sbx.isRunning(), false)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
})
