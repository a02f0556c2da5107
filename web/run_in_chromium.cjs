#!/usr/bin/env node
/*
 * Run an llmopt WebGPU artifact in headless Chromium and print what its page computed, as JSON.
 *
 *   node web/run_in_chromium.cjs --artifact DIR (--ids 1,17,99 | --prompt TEXT) --steps 8 [--logits] [--timeout 600] [--verbose]
 *        [--chromium /usr/bin/chromium] [--screenshot out.png]
 *
 * Serves DIR on 127.0.0.1 (a free port), opens DIR/web/index.html in Chromium with WebGPU on
 * SwiftShader's adapter (a CPU implementation of Vulkan: no GPU needed, so timings are a CPU
 * floor), waits for the page's window.llmoptResult and prints it with the browser's log lines.
 * Exits 1 if the page reports an error or does not finish in time.
 */
"use strict";
const fs = require("fs");
const http = require("http");
const os = require("os");
const path = require("path");
const puppeteer = require("puppeteer-core");

const FLAGS = [
  "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan",
  "--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync",
];
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".json": "application/json",
                ".wasm": "application/wasm", ".safetensors": "application/octet-stream" };

function parseArgs(argv) {
  const args = { steps: "8", timeout: "600", chromium: process.env.LLMOPT_CHROMIUM || "/usr/bin/chromium" };
  for (let i = 0; i < argv.length; ++i) {
    const key = argv[i].replace(/^--/, "");
    if (key === "logits" || key === "verbose") args[key] = true;
    else args[key] = argv[++i];
  }
  if (!args.artifact || !(args.ids || args.prompt)) {
    throw new Error("usage: run_in_chromium.cjs --artifact DIR (--ids 1,2,3 | --prompt TEXT) [--steps N] [--logits]");
  }
  return args;
}

function serve(root) {
  const server = http.createServer((req, res) => {
    const rel = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const file = path.join(root, path.normalize(rel).replace(/^([/\\])+/, ""));
    if (!file.startsWith(root) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404);
      res.end("not found");
      return;
    }
    res.writeHead(200, { "Content-Type": TYPES[path.extname(file)] || "application/octet-stream",
                         "Content-Length": fs.statSync(file).size });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const root = path.resolve(args.artifact);
  const server = await serve(root);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "llmopt-chromium-"));
  const lines = [];
  let browser;
  try {
    browser = await puppeteer.launch({ executablePath: args.chromium, headless: true,
                                       protocolTimeout: (Number(args.timeout) + 60) * 1000,
                                       args: [...FLAGS, `--user-data-dir=${profile}`] });
    const page = await browser.newPage();
    page.on("console", (msg) => {
      lines.push(`console.${msg.type()}: ${msg.text()}`);
      if (args.verbose) process.stderr.write(`${lines[lines.length - 1]}\n`);
    });
    page.on("pageerror", (err) => lines.push(`pageerror: ${err.message}`));
    const query = new URLSearchParams({ ...(args.prompt ? { prompt: args.prompt } : { ids: args.ids }), steps: args.steps,
                                        ...(args.logits ? { logits: "1" } : {}) });
    const url = `http://127.0.0.1:${server.address().port}/web/index.html?${query}`;
    await page.goto(url);
    await page.waitForFunction("window.llmoptResult !== undefined", { timeout: Number(args.timeout) * 1000,
                                                                       polling: 200 });
    const result = await page.evaluate("window.llmoptResult");
    const log = await page.evaluate("document.getElementById('log').textContent");
    if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
    process.stdout.write(JSON.stringify({ ...result, page_log: log, console: lines }) + "\n");
    if (result.error) process.exitCode = 1;
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err && err.stack || err), console: lines }) + "\n");
    process.exitCode = 1;
  } finally {
    if (browser) await browser.close();
    server.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main();
