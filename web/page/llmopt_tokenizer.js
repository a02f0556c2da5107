/**
 * llmopt's byte-level BPE tokenizer for the browser (and Node): reads a Hugging Face tokenizer.json
 * whose model is BPE with a ByteLevel pre-tokenizer and decoder (GPT-2, Llama 3, SmolLM, Qwen2 style)
 * and encodes / decodes as the `tokenizers` library does. Added (special) tokens are matched first
 * and never split; the rest is cut by GPT-2's pattern, mapped byte by byte onto GPT-2's printable
 * characters and merged by rank.
 *
 *   const tok = await llmoptTokenizer.load("../tokenizer.json");
 *   tok.encode("Hello world") -> [ids];  tok.decode(ids) -> "Hello world"
 */
"use strict";

const llmoptTokenizer = (() => {
  // GPT-2's pre-tokenization pattern (the ByteLevel pre-tokenizer with use_regex).
  const PATTERN = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

  /** GPT-2's byte -> printable character table, and its inverse. */
  function byteTables() {
    const bytes = [];
    for (let b = 33; b <= 126; b++) bytes.push(b);
    for (let b = 161; b <= 172; b++) bytes.push(b);
    for (let b = 174; b <= 255; b++) bytes.push(b);
    const chars = bytes.slice();
    let extra = 0;
    for (let b = 0; b < 256; b++) {
      if (!bytes.includes(b)) {
        bytes.push(b);
        chars.push(256 + extra++);
      }
    }
    const encoder = new Array(256);
    const decoder = new Map();
    bytes.forEach((b, i) => {
      encoder[b] = String.fromCodePoint(chars[i]);
      decoder.set(encoder[b], b);
    });
    return { encoder, decoder };
  }

  function escapeRegExp(text) {
    return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  }

  class Tokenizer {
    constructor(json) {
      const model = json.model || {};
      const pre = json.pre_tokenizer || {};
      if (model.type !== "BPE" || pre.type !== "ByteLevel") {
        throw new Error(`llmopt tokenizer: need a BPE model with a ByteLevel pre-tokenizer, got ${model.type} / ${pre.type}`);
      }
      this.addPrefixSpace = !!pre.add_prefix_space;
      this.vocab = new Map(Object.entries(model.vocab));
      this.tokens = new Map([...this.vocab].map(([token, id]) => [id, token]));
      this.ranks = new Map(model.merges.map((m, rank) => [Array.isArray(m) ? m.join(" ") : m, rank]));
      this.added = new Map((json.added_tokens || []).map((t) => [t.content, t.id]));
      for (const [content, id] of this.added) this.tokens.set(id, content);
      this.addedPattern = this.added.size
        ? new RegExp([...this.added.keys()].sort((a, b) => b.length - a.length).map(escapeRegExp).join("|"), "g")
        : null;
      ({ encoder: this.byteEncoder, decoder: this.byteDecoder } = byteTables());
      this.utf8 = new TextEncoder();
      this.cache = new Map();
    }

    /** The BPE pieces of one pre-token (already in GPT-2's characters). */
    bpe(word) {
      if (this.cache.has(word)) return this.cache.get(word);
      let parts = Array.from(word);
      while (parts.length > 1) {
        let best = -1;
        let bestRank = Infinity;
        for (let i = 0; i < parts.length - 1; i++) {
          const rank = this.ranks.get(parts[i] + " " + parts[i + 1]);
          if (rank !== undefined && rank < bestRank) {
            bestRank = rank;
            best = i;
          }
        }
        if (best < 0) break;
        const merged = parts[best] + parts[best + 1];
        const next = [];
        for (let i = 0; i < parts.length; i++) {  // merge every occurrence of the pair, left to right
          if (i < parts.length - 1 && parts[i] + " " + parts[i + 1] === parts[best] + " " + parts[best + 1]) {
            next.push(merged);
            i++;
          } else {
            next.push(parts[i]);
          }
        }
        parts = next;
      }
      this.cache.set(word, parts);
      return parts;
    }

    encodeOrdinary(text, ids) {
      if (this.addPrefixSpace && text.length && !text.startsWith(" ")) text = " " + text;
      for (const match of text.matchAll(PATTERN)) {
        const mapped = Array.from(this.utf8.encode(match[0]), (b) => this.byteEncoder[b]).join("");
        for (const piece of this.bpe(mapped)) {
          const id = this.vocab.get(piece);
          if (id === undefined) throw new Error(`llmopt tokenizer: no id for piece ${JSON.stringify(piece)}`);
          ids.push(id);
        }
      }
    }

    /** Token ids of `text` (no BOS added). */
    encode(text) {
      const ids = [];
      let last = 0;
      if (this.addedPattern) {
        for (const match of text.matchAll(this.addedPattern)) {
          if (match.index > last) this.encodeOrdinary(text.slice(last, match.index), ids);
          ids.push(this.added.get(match[0]));
          last = match.index + match[0].length;
        }
      }
      if (last < text.length) this.encodeOrdinary(text.slice(last), ids);
      return ids;
    }

    /** The text of `ids` (special tokens included, as written). */
    decode(ids) {
      const bytes = [];
      let text = "";
      const flush = () => {
        text += new TextDecoder().decode(new Uint8Array(bytes));
        bytes.length = 0;
      };
      for (const id of ids) {
        const token = this.tokens.get(id);
        if (token === undefined) continue;
        if (this.added.has(token)) {
          flush();
          text += token;
          continue;
        }
        for (const ch of token) bytes.push(this.byteDecoder.get(ch));
      }
      flush();
      return text;
    }
  }

  async function load(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`llmopt tokenizer: ${url}: HTTP ${response.status}`);
    return new Tokenizer(await response.json());
  }

  return { Tokenizer, load };
})();

if (typeof module !== "undefined") module.exports = llmoptTokenizer;
