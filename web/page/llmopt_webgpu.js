/*
 * llmopt's loader for WebGPU artifacts (a classic script: defines the global `llmopt`).
 *
 * An artifact folder holds manifest.json (the weights index: name, shape, dtype and shard of every
 * weight, in the order the library takes them), model.wasm (the model's host code linked with
 * TVM's web runtime; its WGSL kernels are inside), weights/*.safetensors and tokenizer.json. This
 * loader needs tvmjs (TVM's JS runtime, npm @mlc-ai/web-runtime, as web/tvmjs.bundle.js) and runs
 * the library's entry points:
 *   prefill(ids i32[1, n], pos i32[n], ...weights) -> (logits f32[1, 1 or n, vocab], k.0, v.0, ...)
 *   decode(ids i32[1, 1], pos i32[1], ...cache, ...weights) -> (logits f32[1, 1, vocab], ...cache)
 * where decode writes row `pos` of each cache buffer [1, capacity, ...] in place.
 *
 *   const model = await llmopt.load("..");          // the artifact folder's URL
 *   const {logits, cache} = await model.prefill([1, 17, 99]);
 *   const next = await model.decode(llmopt.argmax(logits), cache);
 */
(function (global) {
  "use strict";

  const MIN_CAPACITY = 256; // rows a cache buffer has beyond the prompt (doubled when full)
  const DTYPE_BYTES = { float32: 4, float16: 2, int32: 4, uint32: 4, int8: 1, uint8: 1, int16: 2, uint16: 2 };

  async function fetchBytes(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`fetching ${url} failed: HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  }

  /** The tensors of a safetensors file: {name: {dtype, shape, data (Uint8Array view)}}. */
  function parseSafetensors(bytes, url) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const headerLength = Number(view.getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
    const start = 8 + headerLength;
    const tensors = {};
    for (const [name, entry] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      const [begin, end] = entry.data_offsets;
      if (start + end > bytes.length) throw new Error(`${url}: tensor ${name} runs past the end of the file`);
      tensors[name] = { dtype: entry.dtype, shape: entry.shape, data: bytes.subarray(start + begin, start + end) };
    }
    return tensors;
  }

  /**
   * The bytes of weight `w`: its tensor in the shard, or rebuilt from its fill-bitmask encoding
   * (llmopt's runtime/weight_encoding.py): bit i of `mask` (low bit first) says whether unit i of
   * `unit_bits` bits is the next of `values` (packed at that width, low nibble first) or `fill`.
   */
  function weightBytes(w, tensors, url) {
    const e = w.encoding;
    if (!e) {
      if (!tensors[w.name]) throw new Error(`${url} has no tensor ${w.name}`);
      return tensors[w.name].data;
    }
    const mask = tensors[e.mask], values = tensors[e.values];
    if (!mask || !values) throw new Error(`${url} has no tensor ${e.mask} or ${e.values} (encoded ${w.name})`);
    const m = mask.data, v = values.data;
    const out = new Uint8Array((e.units * e.unit_bits) / 8);
    let next = 0;
    if (e.unit_bits === 4) {
      for (let i = 0; i < e.units; ++i) {
        const unit = (m[i >> 3] >> (i & 7)) & 1 ? (v[next >> 1] >> ((next++ & 1) * 4)) & 15 : e.fill;
        out[i >> 1] |= unit << ((i & 1) * 4);
      }
    } else {
      const width = e.unit_bits / 8;
      const fill = new Uint8Array(width);
      for (let b = 0; b < width; ++b) fill[b] = Number((BigInt(e.fill) >> BigInt(8 * b)) & 255n);
      for (let i = 0; i < e.units; ++i) {
        const kept = (m[i >> 3] >> (i & 7)) & 1;
        const from = kept ? v : fill, at = kept ? next++ * width : 0;
        for (let b = 0; b < width; ++b) out[i * width + b] = from[at + b];
      }
    }
    if (next !== e.kept) throw new Error(`${url}: encoded ${w.name} sets ${next} units, the manifest says ${e.kept}`);
    return out;
  }

  function argmax(values) {
    let best = 0;
    for (let i = 1; i < values.length; ++i) if (values[i] > values[best]) best = i;
    return best;
  }

  class Model {
    constructor(tvm, vm, manifest, weights, adapterInfo) {
      this.tvm = tvm;
      this.manifest = manifest;
      this.weights = weights;
      this.adapterInfo = adapterInfo;
      this.device = tvm.webgpu();
      this.vocab = manifest.model.vocab_size;
      this.cacheNames = [];
      const kv = manifest.kv_cache;
      for (let i = 0; i < kv.layers; ++i) for (const t of kv.tensors) this.cacheNames.push(t.replace("{i}", i));
      this.fPrefill = tvm.detachFromCurrentScope(vm.getFunction("prefill"));
      this.fDecode = tvm.detachFromCurrentScope(vm.getFunction("decode"));
    }

    /** An int32 tensor on the GPU holding `values` with `shape`. */
    int32Tensor(values, shape) {
      const tensor = this.tvm.empty(shape, "int32", this.device);
      tensor.copyFromRawBytes(new Uint8Array(Int32Array.from(values).buffer));
      return tensor;
    }

    /** The GPU tensor `tensor` (float32) as a Float32Array, after the queued work is done. */
    async read(tensor) {
      const cpu = this.tvm.empty(tensor.shape, tensor.dtype, this.tvm.cpu());
      cpu.copyFrom(tensor);
      await this.device.sync();
      return cpu.toArray();
    }

    /** A zeroed GPU buffer of `capacity` rows holding the first `length` rows of `tensor`. */
    cacheBuffer(tensor, length, capacity) {
      const rowShape = tensor.shape.slice(2);
      const buffer = this.tvm.detachFromCurrentScope(this.tvm.empty([1, capacity, ...rowShape], tensor.dtype, this.device));
      buffer.copyFromRawBytes(new Uint8Array(buffer.numStorageBytes()));
      if (length > 0) {
        const rows = tensor.shape[1] === length ? tensor : tensor.view([1, length, ...rowShape]);
        buffer.view([1, length, ...rowShape]).copyFrom(rows);
      }
      return buffer;
    }

    /** Run the prompt `ids` from position 0: the next token's logits and the KV cache. */
    async prefill(ids) {
      const tvm = this.tvm;
      tvm.beginScope();
      try {
        const n = ids.length;
        const out = this.fPrefill(this.int32Tensor(ids, [1, n]), this.int32Tensor([...Array(n).keys()], [n]),
                                  ...this.weights);
        const all = await this.read(out.get(0));
        const tensors = this.cacheNames.map((_, i) => this.cacheBuffer(out.get(i + 1), n, n + MIN_CAPACITY));
        // the last position's logits (the library may return only those)
        return { logits: all.slice(all.length - this.vocab), cache: { tensors, length: n } };
      } finally {
        tvm.endScope();
      }
    }

    /** Run one token after `cache`: its logits and the cache one row longer (same buffers). */
    async decode(token, cache) {
      const tvm = this.tvm;
      tvm.beginScope();
      try {
        let tensors = cache.tensors;
        const capacity = tensors[0].shape[1];
        if (cache.length >= capacity) { // full: double the buffers
          const grown = tensors.map((t) => this.cacheBuffer(t, cache.length, 2 * Math.max(capacity, MIN_CAPACITY / 2)));
          tensors.forEach((t) => t.dispose());
          tensors = grown;
        }
        const out = this.fDecode(this.int32Tensor([token], [1, 1]), this.int32Tensor([cache.length], [1]),
                                 ...tensors, ...this.weights);
        const logits = await this.read(out.get(0));
        return { logits, cache: { tensors, length: cache.length + 1 } };
      } finally {
        tvm.endScope();
      }
    }

    release(cache) {
      cache.tensors.forEach((t) => t.dispose());
    }
  }

  /**
   * Load the artifact at `baseUrl` (its folder): the runtime, the WebGPU device, the kernels and
   * the weights. `options.log` takes progress lines.
   */
  async function load(baseUrl, options = {}) {
    const log = options.log || (() => {});
    const tvmjs = global.tvmjs;
    if (!tvmjs) throw new Error("tvmjs is not loaded (web/tvmjs.bundle.js)");
    if (!global.navigator || !navigator.gpu) throw new Error("this browser has no WebGPU (navigator.gpu)");
    const base = baseUrl.endsWith("/") ? baseUrl : baseUrl + "/";
    const manifest = JSON.parse(new TextDecoder().decode(await fetchBytes(base + "manifest.json")));
    if (manifest.target.device !== "webgpu") {
      throw new Error(`${base} was built for target ${manifest.target.name}, not webgpu`);
    }
    const wasm = await fetchBytes(base + manifest.library);
    const tvm = await tvmjs.instantiate(wasm, tvmjs.createPolyfillWASI(), (line) => log(line));
    const gpu = await tvmjs.detectGPUDevice();
    const halfTensors = manifest.weights.some((w) => w.dtype === "float16") || manifest.kv_cache.dtype === "f16";
    if (halfTensors && !gpu.device.features.has("shader-f16")) {
      throw new Error(`${base} is an fp16 artifact, but this browser's WebGPU adapter has no shader-f16 feature ` +
                      "(f16 arithmetic in WGSL): run it on a GPU with shader-f16, or build with --dtype fp32");
    }
    const adapterInfo = gpu.adapterInfo ? { vendor: gpu.adapterInfo.vendor, architecture: gpu.adapterInfo.architecture,
                                            device: gpu.adapterInfo.device, description: gpu.adapterInfo.description } : {};
    tvm.initWebGPU(gpu.device);
    tvm.beginScope();
    const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(tvm.webgpu()));
    await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
    log(`kernels compiled; loading ${manifest.weights.length} weights`);

    const weights = new Array(manifest.weights.length);
    const byFile = new Map();
    manifest.weights.forEach((w, i) => {
      if (!byFile.has(w.file)) byFile.set(w.file, []);
      byFile.get(w.file).push(i);
    });
    for (const [file, indices] of byFile) {
      const tensors = parseSafetensors(await fetchBytes(base + file), base + file);
      for (const i of indices) {
        const w = manifest.weights[i];
        const stored = { data: weightBytes(w, tensors, base + file) };
        const count = w.shape.reduce((a, b) => a * b, 1);
        if (stored.data.length !== count * DTYPE_BYTES[w.dtype]) {
          throw new Error(`${base + file}: tensor ${w.name} has ${stored.data.length} bytes, the manifest says ${w.dtype}${JSON.stringify(w.shape)}`);
        }
        const tensor = tvm.detachFromCurrentScope(tvm.empty(w.shape, w.dtype, tvm.webgpu()));
        // WebGPU copies whole 4-byte words: pad a tensor whose size is not a multiple of 4
        const data = stored.data.length % 4 === 0 ? stored.data : (() => {
          const padded = new Uint8Array(stored.data.length + 4 - (stored.data.length % 4));
          padded.set(stored.data);
          return padded;
        })();
        if (data === stored.data) {
          tensor.copyFromRawBytes(data.slice());
        } else {
          tvm.lib.webGPUContext.copyRawBytesToBuffer(data, tensor.getDataPtr(), tensor.byteOffset, data.length);
        }
        weights[i] = tensor;
      }
    }
    await tvm.webgpu().sync();
    log("weights loaded");
    const model = new Model(tvm, vm, manifest, weights, adapterInfo);
    tvm.endScope();
    return model;
  }

  /** Prefill `ids`, then `steps` greedy decode steps: tokens, every step's logits and timings (ms). */
  async function generate(model, ids, steps) {
    const perf = global.performance;
    const t0 = perf.now();
    let { logits, cache } = await model.prefill(ids);
    const t1 = perf.now();
    const stepLogits = [logits];
    const tokens = [];
    for (let s = 0; s < steps; ++s) {
      const token = argmax(logits);
      tokens.push(token);
      if (s === steps - 1) break;
      ({ logits, cache } = await model.decode(token, cache));
      stepLogits.push(logits);
    }
    const t2 = perf.now();
    model.release(cache);
    return { tokens, logits: stepLogits, prefill_ms: t1 - t0, decode_ms: t2 - t1, decode_steps: Math.max(steps - 1, 0) };
  }

  global.llmopt = { load, generate, argmax, parseSafetensors };
})(typeof globalThis !== "undefined" ? globalThis : window);
