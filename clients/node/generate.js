#!/usr/bin/env node
// A Node.js client of dsi.v1.GenerationService.
//
// Loads the repository's .proto files at run time (@grpc/proto-loader), so
// nothing is generated: protos/dsi/v1/ is the whole contract. Streams a
// Generate and prints the text as it arrives (statistics go to stderr), or,
// with --json, one JSON object with token_ids, text, finish_reason and stats,
// shaped like the output of `dsi generate --json`.
//
//   node generate.js --coordinator 127.0.0.1:50050 --prompt-ids 1,2,3 --max-new-tokens 50 --strategy dsi
//   node generate.js "def fibonacci(n):"            (a coordinator with a tokenizer)
//   node generate.js --info                          (GetInfo as JSON)
//
// Exit status: 0 on success, 1 when the call fails (the gRPC status is
// printed to stderr), 2 for bad command-line arguments.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: generate.js [options] [PROMPT]

Streams a generation from a dsi coordinator (dsi.v1.GenerationService/Generate).

  PROMPT                   prompt text (needs a coordinator with a tokenizer)
  --coordinator HOST:PORT  coordinator address (default: 127.0.0.1:50050)
  --prompt-ids 1,2,3       prompt as token ids (for synthetic models)
  --max-new-tokens N       tokens to generate (0 = server default)
  --strategy S             nonsi, si or dsi (default: the server's)
  --lookahead N            draft tokens per chunk (0 = server default)
  --tree WxD               draft a token tree: W candidates per position, D-token branches (e.g. 3x2)
  --temperature T          0 = greedy (default)
  --top-p P, --top-k K     sampling filters (0 = off)
  --seed N                 seed of the sampling (default: a fresh one, shown in the statistics)
  --stop STRING            stop string (repeatable)
  --timeout SECONDS        deadline of the call (default: none)
  --json                   print one JSON object instead of streaming text
  --info                   print GetInfo as JSON and exit
  --proto-dir DIR          root of the .proto files (default: the repository's protos/,
                           or $DSI_PROTO_DIR)
  --tls                    talk TLS, checking the certificate against the system's roots
  --tls-ca FILE            talk TLS, checking the certificate against this PEM CA bundle
  --tls-cert FILE          present this PEM certificate (mutual TLS), with --tls-key FILE
  --tls-server-name NAME   the name the coordinator's certificate must carry (default: its host)
  --auth-token-file FILE   send 'authorization: Bearer <token>' with the token in FILE
                           (default: $DSI_AUTH_TOKEN, if set)
  -h, --help               show this help`;

const STRATEGIES = { '': 'STRATEGY_UNSPECIFIED', nonsi: 'STRATEGY_NONSI', si: 'STRATEGY_SI', dsi: 'STRATEGY_DSI' };

class UsageError extends Error {}

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      coordinator: { type: 'string', default: '127.0.0.1:50050' },
      'prompt-ids': { type: 'string', default: '' },
      'max-new-tokens': { type: 'string', default: '0' },
      strategy: { type: 'string', default: '' },
      lookahead: { type: 'string', default: '0' },
      tree: { type: 'string', default: '' },
      temperature: { type: 'string', default: '0' },
      'top-p': { type: 'string', default: '0' },
      'top-k': { type: 'string', default: '0' },
      seed: { type: 'string', default: '' },
      stop: { type: 'string', multiple: true, default: [] },
      timeout: { type: 'string', default: '' },
      json: { type: 'boolean', default: false },
      info: { type: 'boolean', default: false },
      'proto-dir': { type: 'string', default: process.env.DSI_PROTO_DIR || path.resolve(__dirname, '..', '..', 'protos') },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string', default: '' },
      'tls-cert': { type: 'string', default: '' },
      'tls-key': { type: 'string', default: '' },
      'tls-server-name': { type: 'string', default: '' },
      'auth-token-file': { type: 'string', default: '' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (positionals.length > 1) throw new UsageError('give at most one PROMPT (quote it)');
  const count = (name) => {
    const v = values[name];
    if (!/^\d+$/.test(v)) throw new UsageError(`--${name} must be an integer >= 0, got ${JSON.stringify(v)}`);
    return Number(v);
  };
  const number = (name) => {
    const v = Number(values[name]);
    if (values[name] === '' || !Number.isFinite(v)) throw new UsageError(`--${name} must be a number`);
    return v;
  };
  const ids = values['prompt-ids']
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  if (!ids.every((s) => /^\d+$/.test(s))) {
    throw new UsageError(`--prompt-ids must be comma-separated integers, got ${JSON.stringify(values['prompt-ids'])}`);
  }
  if (!(values.strategy in STRATEGIES)) throw new UsageError('--strategy must be nonsi, si or dsi');
  let tree;
  if (values.tree === 'chain') tree = { width: 1, depth: 1 };
  else if (values.tree !== '') {
    const m = /^(\d+)(?:x(\d+))?$/.exec(values.tree);
    if (!m) throw new UsageError(`--tree must be 'chain', W or WxD (e.g. 3x2), got ${JSON.stringify(values.tree)}`);
    tree = { width: Number(m[1]), depth: m[2] === undefined ? 1 : Number(m[2]) };
  }
  if (values.seed !== '' && !/^\d+$/.test(values.seed)) throw new UsageError('--seed must be an integer >= 0');
  if (Boolean(values['tls-cert']) !== Boolean(values['tls-key'])) {
    throw new UsageError('--tls-cert and --tls-key go together: give both, or neither');
  }
  const read = (name) => {
    try {
      return fs.readFileSync(values[name]);
    } catch (err) {
      throw new UsageError(`--${name}: cannot read ${JSON.stringify(values[name])}: ${err.message}`);
    }
  };
  let token = process.env.DSI_AUTH_TOKEN || '';
  if (values['auth-token-file']) token = read('auth-token-file').toString('utf8').trim();
  const security = {
    tls: values.tls || Boolean(values['tls-ca'] || values['tls-cert'] || values['tls-server-name']),
    ca: values['tls-ca'] ? read('tls-ca') : null,
    cert: values['tls-cert'] ? read('tls-cert') : null,
    key: values['tls-key'] ? read('tls-key') : null,
    serverName: values['tls-server-name'],
    token,
  };
  const prompt = positionals[0] || '';
  if (!values.help && !values.info && !prompt && ids.length === 0) throw new UsageError('give a PROMPT or --prompt-ids');
  return {
    help: values.help,
    info: values.info,
    json: values.json,
    address: values.coordinator,
    protoDir: values['proto-dir'],
    security,
    timeout: values.timeout === '' ? null : number('timeout'),
    request: {
      prompt,
      prompt_token_ids: ids.map(Number),
      max_new_tokens: count('max-new-tokens'),
      temperature: number('temperature'),
      top_p: number('top-p'),
      top_k: count('top-k'),
      // uint64, as a decimal string (exact beyond 2**53); left unset, the server draws one
      seed: values.seed === '' ? undefined : values.seed,
      strategy: STRATEGIES[values.strategy],
      lookahead: count('lookahead'),
      stop: values.stop,
      tree, // unset: the server's default shape
    },
  };
}

/** The GenerationService client constructor, from the .proto files under protoDir. */
function loadService(protoDir) {
  const definition = protoLoader.loadSync('dsi/v1/generation.proto', {
    includeDirs: [protoDir],
    keepCase: true, // field names as in the .proto (and in `dsi generate --json`)
    longs: String,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).dsi.v1.GenerationService;
}

function finishName(reason) {
  return String(reason).replace(/^FINISH_REASON_/, '').toLowerCase();
}

function statsLine(r) {
  const s = r.stats;
  const rate = s.wall_seconds ? s.new_tokens / s.wall_seconds : 0;
  return (
    `-- ${s.new_tokens} tokens in ${s.wall_seconds.toFixed(3)}s (${rate.toFixed(1)} tok/s), ` +
    `first token ${(s.time_to_first_token_seconds * 1000).toFixed(0)} ms, ` +
    `acceptance ${s.acceptance_rate.toFixed(2)}, target passes ${s.target_forward_passes}, ` +
    `verifications ${s.verifications_started} (${s.verifications_cancelled} cancelled, ` +
    `${s.preemptions} preempted), seed ${s.seed}, finish: ${r.finish_reason}`
  );
}

function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

function deadline(timeout) {
  return timeout === null ? {} : { deadline: new Date(Date.now() + timeout * 1000) };
}

/** Channel credentials and options: plaintext by default, TLS (mutual with a certificate) on request. */
function channel(security) {
  if (!security || !security.tls) return { credentials: grpc.credentials.createInsecure(), options: {} };
  const options = {};
  if (security.serverName) options['grpc.ssl_target_name_override'] = security.serverName;
  return { credentials: grpc.credentials.createSsl(security.ca, security.key, security.cert), options };
}

/** Call metadata: the bearer token, if any. */
function metadata(security) {
  const md = new grpc.Metadata();
  if (security && security.token) md.set('authorization', `Bearer ${security.token}`);
  return md;
}

/** Streams one Generate; resolves with the collected result. */
function generate(client, request, options, onText) {
  return new Promise((resolve, reject) => {
    const result = { token_ids: [], text: '', finish_reason: 'unspecified', stats: {} };
    const call = client.Generate(request, metadata(options.security), deadline(options.timeout));
    const stop = () => call.cancel();
    process.once('SIGINT', stop);
    call.on('data', (msg) => {
      result.token_ids.push(...msg.token_ids);
      result.text += msg.text;
      if (onText && msg.text) onText(msg.text);
      if (msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
        result.finish_reason = finishName(msg.finish_reason);
        result.stats = msg.stats;
      }
    });
    call.on('error', (err) => {
      process.removeListener('SIGINT', stop);
      reject(err);
    });
    call.on('end', () => {
      process.removeListener('SIGINT', stop);
      resolve(result);
    });
  });
}

function getInfo(client, options) {
  return new Promise((resolve, reject) => {
    client.GetInfo({}, metadata(options.security), deadline(options.timeout), (err, info) =>
      err ? reject(err) : resolve(info),
    );
  });
}

async function main(argv) {
  let options;
  try {
    options = parseCommandLine(argv);
  } catch (err) {
    process.stderr.write(`generate.js: error: ${err.message}\n${USAGE}\n`);
    return 2;
  }
  if (options.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const Service = loadService(options.protoDir);
  const { credentials, options: channelOptions } = channel(options.security);
  const client = new Service(options.address, credentials, channelOptions);
  try {
    if (options.info) {
      process.stdout.write(`${JSON.stringify(await getInfo(client, options))}\n`);
      return 0;
    }
    const show = options.json ? null : (text) => process.stdout.write(text);
    const result = await generate(client, options.request, options, show);
    if (options.json) {
      process.stdout.write(`${JSON.stringify(result)}\n`);
    } else {
      process.stdout.write('\n');
      process.stderr.write(`${statsLine(result)}\n`);
    }
    return 0;
  } catch (err) {
    if (err.code === undefined) throw err;
    process.stderr.write(`generate.js: error: ${statusName(err.code)}: ${err.details}\n`);
    return 1;
  } finally {
    client.close();
  }
}

module.exports = { loadService, generate, parseCommandLine, channel, metadata };

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err) => {
      process.stderr.write(`generate.js: ${err.stack || err}\n`);
      process.exitCode = 1;
    },
  );
}
