// transformers.js reads an artifact as its users would (Node, CPU):
//   node tfjs_client.mjs REQUEST OUT      (run with NODE_PATH or cwd where @huggingface/transformers is installed)
// REQUEST / OUT as in genai_client.py. The model loads by folder name from env.localModelPath,
// with the dtype config.json's transformers.js_config names.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const [requestPath, outPath, modulesDir] = process.argv.slice(2);
const require = createRequire(path.join(modulesDir, 'package.json'));
const tfjs = await import(require.resolve('@huggingface/transformers'));
const { AutoTokenizer, AutoModelForCausalLM, Tensor, env } = tfjs;

const req = JSON.parse(fs.readFileSync(requestPath, 'utf8'));
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(req.artifact)) + '/';
const id = path.basename(path.resolve(req.artifact));

const tok = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id, { device: 'cpu' });
const text_ids = req.texts.map((t) => Array.from(tok.encode(t)));
const chat_ids = [];
const greedy = [];
for (const messages of req.chats) {
  const enc = tok.apply_chat_template(messages, { add_generation_prompt: true, tokenize: true, return_tensor: false });
  const ids = Array.from(enc.input_ids ?? enc).map(Number);
  const input_ids = new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
  const attention_mask = new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
  const out = await model.generate({ input_ids, attention_mask, max_new_tokens: req.max_new_tokens, do_sample: false,
                                     eos_token_id: req.eos_token_ids });
  chat_ids.push(ids);
  greedy.push(Array.from(out.data).slice(ids.length).map(Number));
}
fs.writeFileSync(outPath, JSON.stringify({ client: 'transformers.js', version: tfjs.env.version, text_ids, chat_ids, greedy }));
