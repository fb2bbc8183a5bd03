// End-to-end: the chat page and the dashboard in headless Chromium against a real server.
//
// Run with `node --test tests/browser/` after `cargo build` (scripts/test does both).
// CHATFLOW_BIN overrides the server binary, CHROMIUM the browser, and SCREENSHOT_DIR, when
// set, receives chat.png and dashboard.png.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import path from "node:path";
import os from "node:os";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.CHATFLOW_BIN || path.join(ROOT, "target/debug/chatflow");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOT_DIR;
const WAIT = { timeout: 15000 };

/** Starts `chatflow serve` and resolves once it prints its address. */
// The server stores into its embedded SQLite default, in a directory of its own.
const DATA = fs.mkdtempSync(path.join(os.tmpdir(), "chatflow-browser-"));

function startServer(listen = "127.0.0.1:0") {
  return new Promise((resolve, reject) => {
    const store = `sqlite:${path.join(DATA, "chatflow.db")}`;
    const proc = spawn(BIN, ["serve", "--listen", listen, "--reactors", "2", "--node-id", "browser-test", "--store", store], {
      stdio: ["ignore", "pipe", "inherit"],
      env: { ...process.env, RUST_LOG: "warn" },
    });
    proc.on("error", reject);
    proc.on("exit", (code) => reject(new Error(`server exited early with ${code}`)));
    createInterface({ input: proc.stdout }).on("line", (line) => {
      const m = line.match(/^listening on (\S+)/);
      if (m) resolve({ proc, addr: m[1] });
    });
  });
}

function stopServer(server) {
  return new Promise((resolve) => {
    if (server.proc.exitCode !== null) return resolve();
    server.proc.removeAllListeners("exit");
    server.proc.on("exit", () => resolve());
    server.proc.kill("SIGTERM");
  });
}

let browser;
let server;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // No sandbox as root; no background traffic on this closed network.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server) await stopServer(server);
  fs.rmSync(DATA, { recursive: true, force: true });
});

async function joinRoom(addr, name, userId, room) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  await page.goto(`http://${addr}/`);
  await page.fill("#username", name);
  await page.fill("#user-id", String(userId));
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#status.connected", WAIT);
  return page;
}

test("two people in a room see each other's messages and presence", { timeout: 60000 }, async () => {
  const alice = await joinRoom(server.addr, "alice", 101, "e2e");
  const bob = await joinRoom(server.addr, "bob", 102, "e2e");
  await alice.fill("#text", "hello from alice");
  await alice.press("#text", "Enter");
  await bob.waitForSelector("#log .msg:has-text('hello from alice')", WAIT);
  await alice.waitForSelector("#log .msg.mine:not(.pending):has-text('hello from alice')", WAIT);
  await bob.fill("#text", "hi alice");
  await bob.press("#text", "Enter");
  await alice.waitForSelector("#log .msg:has-text('hi alice')", WAIT);
  for (const page of [alice, bob]) {
    await page.waitForFunction((want) => {
      const names = [...document.querySelectorAll("#presence li")].map((li) => li.textContent).sort().join(",");
      return names === want;
    }, "alice,bob", WAIT);
  }
  if (SHOTS) await alice.screenshot({ path: path.join(SHOTS, "chat.png") });
  // Leaving updates the other side's presence.
  await bob.click("#leave");
  await alice.waitForFunction((want) => {
    const names = [...document.querySelectorAll("#presence li")].map((li) => li.textContent).sort().join(",");
    return names === want;
  }, "alice", WAIT);
  await alice.close();
  await bob.close();
});

test("a rejected message shows which field failed and why", { timeout: 60000 }, async () => {
  const page = await joinRoom(server.addr, "carol", 103, "e2e-errors");
  await page.fill("#text", "x".repeat(501));
  await page.press("#text", "Enter");
  await page.waitForSelector("#errors:has-text('VALIDATION_FAILED')", WAIT);
  const text = await page.textContent("#errors");
  assert.match(text, /message: must be at most 500 characters/);
  assert.equal(await page.locator("#log .msg.pending").count(), 0, "the refused line is withdrawn");
  // A valid message clears the error and is delivered.
  await page.fill("#text", "short and fine");
  await page.press("#text", "Enter");
  await page.waitForSelector("#log .msg.mine:not(.pending):has-text('short and fine')", WAIT);
  assert.equal((await page.textContent("#errors")).trim(), "");
  await page.close();
});

test("the dashboard's counters move with traffic", { timeout: 60000 }, async () => {
  const dash = await browser.newPage({ viewport: { width: 1200, height: 760 } });
  await dash.goto(`http://${server.addr}/dashboard`);
  await dash.waitForFunction(() => document.querySelector("[data-testid=acks]").dataset.total !== undefined, null, WAIT);
  const before = Number(await dash.getAttribute("[data-testid=acks]", "data-total"));
  const page = await joinRoom(server.addr, "dave", 104, "e2e-dash");
  for (let i = 0; i < 20; i++) {
    await page.fill("#text", `load ${i}`);
    await page.press("#text", "Enter");
  }
  await page.waitForSelector("#log .msg.mine:not(.pending):has-text('load 19')", WAIT);
  await dash.waitForFunction((min) => Number(document.querySelector("[data-testid=acks]").dataset.total) >= min,
    before + 21, WAIT);
  await dash.waitForFunction(() => document.querySelector("#bus").textContent.includes("local up"), null, WAIT);
  assert.notEqual(await dash.textContent("[data-testid=websockets]"), "–");
  if (SHOTS) {
    // A steady trickle for a few seconds, so the charts show something alive.
    await page.evaluate(() => {
      let i = 0;
      const t = setInterval(() => { send(`tick ${i++}`, "TEXT"); if (i > 300) clearInterval(t); }, 20);
    });
    await dash.waitForTimeout(5000);
    await dash.screenshot({ path: path.join(SHOTS, "dashboard.png") });
  }
  await page.close();
  await dash.close();
});

test("a dropped connection is retried with backoff and said on screen", { timeout: 60000 }, async () => {
  const own = await startServer();
  const page = await joinRoom(own.addr, "erin", 105, "e2e-drop");
  await stopServer(own);
  await page.waitForSelector("#status.reconnecting", WAIT);
  assert.match(await page.textContent("#log"), /Connection lost \(code \d+\)\. Reconnecting in/);
  const again = await startServer(own.addr);
  try {
    await page.waitForSelector("#status.connected", { timeout: 30000 });
    await page.waitForSelector("#log .note:has-text('Reconnected.')", WAIT);
    await page.fill("#text", "back again");
    await page.press("#text", "Enter");
    await page.waitForSelector("#log .msg.mine:not(.pending):has-text('back again')", WAIT);
  } finally {
    await page.close();
    await stopServer(again);
  }
});

test("leaving and joining again at once leaves one clean connection", { timeout: 60000 }, async () => {
  const page = await joinRoom(server.addr, "frank", 106, "e2e-rejoin");
  await page.click("#leave");
  await page.click("#join");
  await page.waitForSelector("#status.connected", WAIT);
  await page.fill("#text", "after rejoin");
  await page.press("#text", "Enter");
  await page.waitForSelector("#log .msg.mine:not(.pending):has-text('after rejoin')", WAIT);
  await page.waitForTimeout(500);
  assert.doesNotMatch(await page.textContent("#log"), /Connection lost/);
  const r = await fetch(`http://${server.addr}/api/rooms/e2e-rejoin/presence`);
  assert.equal((await r.json()).count, 1, "one user, one connection");
  await page.close();
});

test("a page that joins later shows the room's stored history", { timeout: 60000 }, async () => {
  const early = await joinRoom(server.addr, "grace", 107, "e2e-history");
  for (const text of ["first stored line", "second stored line"]) {
    await early.fill("#text", text);
    await early.press("#text", "Enter");
    await early.waitForSelector(`#log .msg.mine:not(.pending):has-text('${text}')`, WAIT);
  }
  await early.close();
  const late = await joinRoom(server.addr, "heidi", 108, "e2e-history");
  await late.waitForSelector("#log .msg.history:has-text('first stored line')", WAIT);
  await late.waitForSelector("#log .msg.history:has-text('second stored line')", WAIT);
  const order = await late.$$eval("#log .msg.history", (els) => els.map((e) => e.textContent));
  const first = order.findIndex((t) => t.includes("first stored line"));
  const second = order.findIndex((t) => t.includes("second stored line"));
  assert.ok(first >= 0 && second > first, `history is oldest first: ${order.join(" | ")}`);
  await late.close();
});
