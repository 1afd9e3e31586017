// What both pages share: the API token, calls to the service's API, files to download, prompts drawn on a canvas.
// Every URL is relative to the page, so the pages work under any route prefix of the service.
"use strict";

const RefLade = (() => {
  const TOKEN_KEY = "reflade.token";

  /** Fill the token field from localStorage and keep it there as the person types. */
  function initToken(input) {
    input.value = localStorage.getItem(TOKEN_KEY) || "";
    input.addEventListener("input", () => localStorage.setItem(TOKEN_KEY, input.value.trim()));
  }

  /** Keep a text field's value in localStorage under `key` (its last value comes back on the next visit). */
  function remember(input, key) {
    const saved = localStorage.getItem(key);
    if (saved !== null && !input.value) input.value = saved;
    input.addEventListener("input", () => localStorage.setItem(key, input.value.trim()));
  }

  /** An error the service answered: `status`, `code` and the service's message. */
  class ApiError extends Error {
    constructor(status, code, message) {
      super(`HTTP ${status} ${code}: ${message}`);
      this.status = status;
      this.code = code;
    }
  }

  /** Call the API: `path` relative to the page (`v1/decompose`), `body` sent as JSON; the Response, or ApiError. */
  async function api(path, { method = "GET", body = undefined, query = undefined } = {}) {
    const headers = {};
    const token = (localStorage.getItem(TOKEN_KEY) || "").trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let url = path;
    if (query) url += "?" + new URLSearchParams(query).toString();
    let response;
    try {
      response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, "unreachable", `the service did not answer (${err.message})`);
    }
    if (!response.ok) {
      let code = "http_error";
      let message = response.statusText;
      try {
        const doc = await response.json();
        code = doc.error.code;
        message = doc.error.message;
      } catch (_) {
        // not the service's JSON error: keep the status text
      }
      if (response.status === 401 || response.status === 403) message += " (enter an API token above)";
      throw new ApiError(response.status, code, message);
    }
    return response;
  }

  /** Show a message in the page's status line; errors in red. */
  function status(text, isError = false) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  function base64ToBlob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  /** Hand a Blob to the browser as a file download named `filename`. */
  function download(blob, filename) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the image could not be decoded by the browser"));
      img.src = src;
    });
  }

  /** A mask image (white and opaque inside) as a blue overlay canvas (transparent outside) of the same size. */
  function tint(maskSource, width, height) {
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    const ctx = c.getContext("2d");
    ctx.drawImage(maskSource, 0, 0, width, height);
    const data = ctx.getImageData(0, 0, width, height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const inside = Math.min(px[i], px[i + 3]) >= 128;
      px[i] = 30;
      px[i + 1] = 110;
      px[i + 2] = 235;
      px[i + 3] = inside ? 255 : 0;
    }
    ctx.putImageData(data, 0, 0);
    return c;
  }

  /** Draw an image and a prompt (points [[x, y, label]], box [x0, y0, x1, y1], mask overlay) on a canvas sized to
   *  the image: positive points green, negative red, the box orange, the mask (a blue overlay canvas) translucent. */
  function drawPrompt(canvas, image, { points = [], box = null, box_preview = null, mask = null } = {}) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    if (mask) {
      ctx.globalAlpha = 0.45;
      ctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
      ctx.globalAlpha = 1;
    }
    // Marks keep a readable size on screen whatever the image's size.
    const scale = canvas.width / Math.max(1, canvas.getBoundingClientRect().width || canvas.width);
    ctx.lineWidth = Math.max(1, 2 * scale);
    for (const b of [box, box_preview]) {
      if (!b) continue;
      ctx.strokeStyle = "#ff8c00";
      ctx.setLineDash(b === box_preview ? [6 * scale, 4 * scale] : []);
      ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    }
    ctx.setLineDash([]);
    for (const [x, y, label] of points) {
      ctx.beginPath();
      ctx.arc(x + 0.5, y + 0.5, Math.max(2, 5 * scale), 0, 2 * Math.PI);
      ctx.fillStyle = label === 1 ? "#1a7f37" : "#cf222e";
      ctx.fill();
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    }
  }

  /** Offer the service's known models (classical, the default, what it resolved) in a datalist. */
  async function fillModels(datalist) {
    let doc;
    try {
      doc = await (await api("v1/models")).json();
    } catch (_) {
      return null; // no token yet: the list stays as it is
    }
    const names = new Set(["classical", doc.default.reference, doc.default.version]);
    for (const [ref, exact] of Object.entries(doc.resolved || {})) names.add(ref).add(exact);
    datalist.replaceChildren();
    for (const name of names) {
      if (!name) continue;
      const option = document.createElement("option");
      option.value = name;
      datalist.appendChild(option);
    }
    return doc;
  }

  return { ApiError, api, base64ToBlob, download, drawPrompt, fillModels, initToken, loadImage, remember, status, tint };
})();
