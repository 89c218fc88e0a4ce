// Headless check of the proxy dashboard (used by tests/proxy/test_dashboard.py):
// node dashboard.js <playwright-core dir> <chromium> <proxy url> <token> <screenshot.png>
"use strict";
const [pwDir, chromium, url, token, shot] = process.argv.slice(2);
const { chromium: browserType } = require(pwDir);

(async () => {
  const browser = await browserType.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const out = {};
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
    await page.goto(url + "/dashboard");
    // A wrong token gets nothing.
    await page.fill("#token", "wrong-" + token);
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").textContent.includes("token"));
    out.wrong = await page.textContent("#status");
    out.hiddenAfterWrong = await page.isHidden("#live");
    // The right one: live numbers.
    await page.fill("#token", token);
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").textContent === "live");
    await page.waitForFunction(() => document.getElementById("requests").textContent !== "-");
    out.before = Number(await page.textContent("#requests"));
    out.statusCode = await page.evaluate(async ([token]) => {
      const r = await fetch("/v1/completions", {
        method: "POST",
        headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: "The capital of France is", max_tokens: 16, temperature: 0 }),
      });
      return r.status;
    }, [token]);
    await page.waitForFunction(
      (before) => Number(document.getElementById("requests").textContent) > before,
      out.before,
      { timeout: 20000 },
    );
    out.after = Number(await page.textContent("#requests"));
    out.rounds = await page.textContent("#rounds");
    out.generated = await page.textContent("#generated");
    out.pool = await page.textContent("#pool");
    out.recent = await page.textContent("#recent");
    // Admission: the conversations the proxy learnt from the engine, the queue's bounds, refusals.
    // (The reply is over, so its conversation is released by the next event at the latest.)
    await page.waitForFunction(() => document.getElementById("busy").textContent.startsWith("0 /"),
                               null, { timeout: 5000 });
    for (const id of ["busy", "waiting", "bound", "refused", "wait"]) {
      out[id] = await page.textContent("#" + id);
    }
    await page.screenshot({ path: shot, fullPage: true });
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
