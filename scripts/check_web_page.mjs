// By-hand browser check of `ldm serve`'s web page (not run by CI: it needs Chromium and
// playwright-core). It loads the page in headless Chromium, generates an image with txt2img,
// then inpaints it with a painted mask, and checks both appear in the gallery with their
// infotext and that the progress bar moved.
//
//   apt-get install chromium; npm install playwright-core
//   ldm serve --port 7860 &
//   node scripts/check_web_page.mjs http://127.0.0.1:7860/
import { chromium } from "playwright-core";

const url = process.argv[2] || "http://127.0.0.1:7860/";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const fail = (message) => { console.error("FAIL: " + message); process.exit(1); };
try {
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForFunction(() => document.querySelectorAll("#sampler option").length > 0);
  await page.fill("#prompt", "a red apple");
  await page.fill("#steps", "100");
  await page.fill("#seed", "3");
  let progressSeen = 0;
  const watch = setInterval(async () => {
    const value = await page.$eval("#progress", (p) => p.value).catch(() => 0);
    progressSeen = Math.max(progressSeen, value);
  }, 100);
  await page.click("#generate");
  await page.waitForSelector("img.result", { timeout: 120000 });
  clearInterval(watch);
  const first = await page.$eval("figure", (f) => ({
    width: f.querySelector("img").naturalWidth,
    caption: f.querySelector("figcaption").textContent,
  }));
  if (first.width !== 64) fail(`image width ${first.width}`);
  if (!first.caption.includes("Seed: 3,")) fail(`caption ${first.caption}`);
  if (!(progressSeen > 0)) fail("the progress bar never moved");
  console.log("txt2img ok:", first.caption.split("\n").pop(), "| progress seen", progressSeen.toFixed(2));

  // Inpaint the generated image: upload it, paint the left half, generate.
  const png = Buffer.from((await page.$eval("img.result", (i) => i.src)).split(",")[1], "base64");
  await page.setInputFiles("#image", { name: "apple.png", mimeType: "image/png", buffer: png });
  await page.waitForSelector("#source", { state: "visible" });
  await page.fill("#brush", "64");
  const box = await page.locator("#overlay").boundingBox();
  for (let x = 8; x < box.width / 2; x += 16) {
    await page.mouse.move(box.x + x, box.y + 2);
    await page.mouse.down();
    for (let y = 2; y < box.height; y += 8) await page.mouse.move(box.x + x, box.y + y);
    await page.mouse.up();
  }
  await page.fill("#steps", "8");
  await page.fill("#strength", "1");
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelectorAll("img.result").length === 2, null, { timeout: 120000 });
  const caption = await page.$eval("figure figcaption", (c) => c.textContent);
  if (!caption.includes("Denoising strength: 1.0")) fail(`inpaint caption ${caption}`);
  // The painted (left) part is repainted, the rest kept: compare the halves with the source.
  const [left, right] = await page.evaluate(() => {
    const [edited, source] = [...document.querySelectorAll("img.result")];
    const pixels = (img) => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext("2d"); g.drawImage(img, 0, 0);
      return g.getImageData(0, 0, c.width, c.height);
    };
    const [a, b] = [pixels(edited), pixels(source)];
    const half = (fromX, toX) => {
      let total = 0, n = 0;
      for (let y = 0; y < a.height; y++) for (let x = fromX; x < toX; x++) for (let k = 0; k < 3; k++) {
        const i = (y * a.width + x) * 4 + k; total += Math.abs(a.data[i] - b.data[i]); n++;
      }
      return total / n;
    };
    return [half(0, a.width / 4), half(a.width * 3 / 4, a.width)];
  });
  if (!(left > 2 * right)) fail(`mask not applied: left diff ${left}, right diff ${right}`);
  console.log(`mask applied: mean difference ${left.toFixed(1)} where painted, ${right.toFixed(1)} elsewhere`);
  const error = await page.$eval("#error", (e) => e.textContent);
  if (error) fail(`page error ${error}`);
  console.log("inpaint ok:", caption.split("\n").pop());
} finally {
  await browser.close();
}
