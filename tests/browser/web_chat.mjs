// Drives the chat page in headless Chromium (playwright-core + Debian's chromium) through one
// scenario and prints what it saw as one JSON object; test_web_chat.py makes the assertions.
//
//   node tests/browser/web_chat.mjs '{"url": "...", "apiKey": "...", "scenario": "stream",
//                                     "screenshot": "artifacts/web-chat-stream.png"}'
//
// Scenarios: stream (send, watch tokens arrive), cancel (send, cancel after some tokens),
// reload (send, reload the page mid-turn, watch it resume).
import { chromium } from "playwright-core";

const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const options = JSON.parse(process.argv[2] ?? "{}");
const timeout = options.timeoutMs ?? 120_000;
const prompt = options.prompt ?? "Tell me about gRPC streaming.";

// Records every change of the last assistant bubble with a timestamp, and every status change.
function installObserver() {
  window.__bubbles = [];
  window.__statuses = [];
  const messages = document.getElementById("messages");
  const status = document.getElementById("status");
  const snapshot = () => {
    const bubbles = messages.querySelectorAll(".msg.assistant");
    const bubble = bubbles[bubbles.length - 1];
    if (!bubble) return;
    const text = bubble.textContent ?? "";
    const last = window.__bubbles[window.__bubbles.length - 1];
    if (last && last.length === text.length && last.finish === (bubble.dataset.finish ?? "")) return;
    window.__bubbles.push({
      t: performance.now(),
      length: text.length,
      lastSeq: Number(bubble.dataset.lastSeq ?? 0),
      finish: bubble.dataset.finish ?? "",
    });
  };
  new MutationObserver(snapshot).observe(messages, {
    subtree: true,
    childList: true,
    characterData: true,
    attributes: true,
  });
  new MutationObserver(() => {
    window.__statuses.push({
      t: performance.now(),
      state: status.dataset.state ?? "",
      queuePosition: status.dataset.queuePosition ?? "",
      text: status.textContent ?? "",
    });
  }).observe(status, { attributes: true, childList: true, characterData: true, subtree: true });
}

async function bubbleState(page) {
  return page.evaluate(() => {
    const bubbles = document.querySelectorAll(".msg.assistant");
    const bubble = bubbles[bubbles.length - 1];
    return {
      text: bubble?.textContent ?? null,
      turnId: bubble?.dataset.turnId ?? "",
      lastSeq: Number(bubble?.dataset.lastSeq ?? 0),
      finish: bubble?.dataset.finish ?? "",
      resumedAfter: bubble?.dataset.resumedAfter ?? null,
      status: document.getElementById("status")?.dataset.state ?? "",
      statusText: document.getElementById("status")?.textContent ?? "",
      active: sessionStorage.getItem("mesh.activeTurn"),
    };
  });
}

async function observations(page) {
  return page.evaluate(() => ({ bubbles: window.__bubbles, statuses: window.__statuses }));
}

async function openAndSend(page, trigger, beforeSend) {
  await page.goto(options.url, { waitUntil: "load" });
  await page.fill("#api-key", options.apiKey);
  await page.click("#save-key");
  if (options.maxTokens) {
    await page.click(".options summary");
    await page.fill("#max-tokens", String(options.maxTokens));
  }
  await page.evaluate(installObserver);
  if (trigger) await page.evaluate(installTrigger, trigger);
  beforeSend?.();
  await page.fill("#prompt", prompt);
  await page.click("#send");
}

// Acts inside the page the moment the bubble reaches `seq`: a round trip to the driver would
// let a fast model finish the turn first. The state at that moment is kept in sessionStorage,
// which survives the reload.
function installTrigger({ seq, action }) {
  const messages = document.getElementById("messages");
  let fired = false;
  new MutationObserver(() => {
    const bubbles = messages.querySelectorAll(".msg.assistant");
    const bubble = bubbles[bubbles.length - 1];
    if (fired || !bubble || bubble.dataset.finish) return;
    if (Number(bubble.dataset.lastSeq ?? 0) < seq) return;
    fired = true;
    const snapshot = {
      text: bubble.textContent ?? "",
      turnId: bubble.dataset.turnId ?? "",
      lastSeq: Number(bubble.dataset.lastSeq ?? 0),
      finish: bubble.dataset.finish ?? "",
    };
    sessionStorage.setItem("test.trigger", JSON.stringify(snapshot));
    if (action === "cancel") document.getElementById("cancel").click();
    else window.location.reload();
  }).observe(messages, { subtree: true, childList: true, characterData: true, attributes: true });
}

async function triggered(page) {
  return page.evaluate(() => JSON.parse(sessionStorage.getItem("test.trigger") ?? "null"));
}

async function waitForFinish(page) {
  await page.waitForSelector(".msg.assistant[data-finish]", { timeout });
}

const scenarios = {
  async stream(page) {
    await openAndSend(page);
    await waitForFinish(page);
    return { final: await bubbleState(page), seen: await observations(page) };
  },

  async cancel(page) {
    await openAndSend(page, { seq: options.cancelAfterSeq ?? 3, action: "cancel" });
    await waitForFinish(page);
    const atCancel = await triggered(page);
    const final = await bubbleState(page);
    // Anything still arriving after the finish would be a bug: look again a moment later.
    await page.waitForTimeout(options.settleMs ?? 1500);
    return { atCancel, final, later: await bubbleState(page), seen: await observations(page) };
  },

  async reload(page) {
    let reloaded;
    await openAndSend(page, { seq: options.reloadAfterSeq ?? 3, action: "reload" }, () => {
      // Registered after the first load, before the send that leads to the reload.
      reloaded = page.waitForEvent("load", { timeout });
    });
    await reloaded;
    await page.evaluate(installObserver);
    const afterReload = await bubbleState(page);
    await waitForFinish(page);
    return {
      beforeReload: await triggered(page),
      afterReload,
      final: await bubbleState(page),
      seen: await observations(page),
    };
  },
};

async function main() {
  const scenario = scenarios[options.scenario];
  if (!scenario) throw new Error(`unknown scenario ${options.scenario}`);
  // An https:// page with a certificate from the project CA: trust exactly that key (its SPKI
  // hash), not every certificate.
  const trust = options.spki ? [`--ignore-certificate-errors-spki-list=${options.spki}`] : [];
  const browser = await chromium.launch({
    executablePath: options.chromium ?? "/usr/bin/chromium",
    args: [...CHROMIUM_FLAGS, ...trust],
    timeout: 60_000,
  });
  const consoleErrors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
    // Page steps are quick; only the waits for tokens get the long timeout.
    page.setDefaultTimeout(15_000);
    page.on("console", (message) => {
      if (message.type() === "error") consoleErrors.push(message.text());
    });
    page.on("pageerror", (error) => consoleErrors.push(String(error)));
    let result;
    try {
      result = await scenario(page);
    } finally {
      if (options.screenshot) await page.screenshot({ path: options.screenshot, fullPage: true });
    }
    process.stdout.write(`${JSON.stringify({ ok: true, browser: browser.version(), consoleErrors, ...result })}\n`);
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  process.stdout.write(`${JSON.stringify({ ok: false, error: String(error?.stack ?? error) })}\n`);
  process.exit(1);
});
