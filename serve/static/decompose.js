// The decomposition page: an uploaded image, a prompt drawn on it (points, a box, a painted mask) and typed (text),
// the layer from POST v1/decompose over a checkerboard; layers add up, and download as PNG, ZIP or OpenRaster.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const stage = $("stage");
  const state = {
    dataUrl: null, // the uploaded file as a data: URL (sent as the request's image)
    image: null, // HTMLImageElement of it
    name: "image",
    points: [], // [[x, y, label]] in image pixels
    box: null, // [x0, y0, x1, y1], half-open
    preview: null, // the box being dragged
    dragFrom: null,
    painting: false,
    lastPaint: null, // the brush's last position while painting
    painted: false,
    mask: null, // canvas: white strokes on transparent (sent as the mask PNG; read from its alpha)
    tinted: null, // canvas: the same strokes in blue (shown)
    layers: [], // {png, prompt, kind, model, seed, steps, summary}
    current: -1,
  };

  function tool() {
    return document.querySelector('input[name="tool"]:checked').value;
  }

  function redraw() {
    if (!state.image) return;
    RefLade.drawPrompt(stage, state.image, {
      points: state.points,
      box: state.box,
      box_preview: state.preview,
      mask: state.painted ? state.tinted : null,
    });
    $("prompt-summary").textContent = `Prompt: ${summary(currentPrompt(false)) || "none yet"}`;
  }

  /** Event position -> image pixels (the canvas is shown scaled). */
  function toImage(event) {
    const rect = stage.getBoundingClientRect();
    const x = ((event.clientX - rect.left) * stage.width) / rect.width;
    const y = ((event.clientY - rect.top) * stage.height) / rect.height;
    return [Math.min(Math.max(x, 0), stage.width), Math.min(Math.max(y, 0), stage.height)];
  }

  function boxOf(a, b) {
    const x0 = Math.floor(Math.min(a[0], b[0]));
    const y0 = Math.floor(Math.min(a[1], b[1]));
    const x1 = Math.min(stage.width, Math.ceil(Math.max(a[0], b[0])));
    const y1 = Math.min(stage.height, Math.ceil(Math.max(a[1], b[1])));
    return [x0, y0, x1, y1];
  }

  /** A brush stroke from the last position to `to` (a line, so a fast drag leaves no gaps). */
  function paintTo(to) {
    const from = state.lastPaint || to;
    const r = Number($("brush").value) * (stage.width / stage.getBoundingClientRect().width) * 0.5;
    for (const [canvas, color] of [[state.mask, "#fff"], [state.tinted, "#1e6eeb"]]) {
      const ctx = canvas.getContext("2d");
      ctx.strokeStyle = color;
      ctx.lineWidth = Math.max(1, 2 * r);
      ctx.lineCap = "round";
      ctx.beginPath();
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(to[0], to[1]);
      ctx.stroke();
    }
    state.lastPaint = to;
    state.painted = true;
  }

  stage.addEventListener("pointerdown", (event) => {
    if (!state.image || event.button !== 0) return;
    const pos = toImage(event);
    const t = tool();
    if (t === "pos" || t === "neg") {
      const x = Math.min(Math.floor(pos[0]), stage.width - 1);
      const y = Math.min(Math.floor(pos[1]), stage.height - 1);
      state.points.push([x, y, t === "neg" || event.shiftKey ? 0 : 1]);
    } else if (t === "box") {
      state.dragFrom = pos;
      stage.setPointerCapture(event.pointerId);
    } else if (t === "paint") {
      state.painting = true;
      state.lastPaint = null;
      stage.setPointerCapture(event.pointerId);
      paintTo(pos);
    }
    redraw();
  });

  stage.addEventListener("pointermove", (event) => {
    if (state.dragFrom) {
      state.preview = boxOf(state.dragFrom, toImage(event));
      redraw();
    } else if (state.painting) {
      paintTo(toImage(event));
      redraw();
    }
  });

  function endDrag(event) {
    if (state.dragFrom) {
      const box = boxOf(state.dragFrom, toImage(event));
      // A click without a drag is not a box.
      if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) state.box = box;
      state.dragFrom = null;
      state.preview = null;
    }
    state.painting = false;
    redraw();
  }
  stage.addEventListener("pointerup", endDrag);
  stage.addEventListener("pointercancel", endDrag);

  function clearPrompt() {
    state.points = [];
    state.box = null;
    state.painted = false;
    for (const c of [state.mask, state.tinted]) if (c) c.getContext("2d").clearRect(0, 0, c.width, c.height);
    $("text").value = "";
    redraw();
  }
  $("clear").addEventListener("click", clearPrompt);
  $("text").addEventListener("input", redraw);

  $("image-file").addEventListener("change", async () => {
    const file = $("image-file").files[0];
    if (!file) return;
    const dataUrl = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    let image;
    try {
      image = await RefLade.loadImage(dataUrl);
    } catch (err) {
      RefLade.status(`${file.name}: ${err.message}`, true);
      return;
    }
    Object.assign(state, { dataUrl, image, name: file.name.replace(/\.[^.]*$/, "") || "image", layers: [], current: -1 });
    stage.width = image.naturalWidth;
    stage.height = image.naturalHeight;
    state.mask = document.createElement("canvas");
    state.tinted = document.createElement("canvas");
    for (const c of [state.mask, state.tinted]) {
      c.width = stage.width;
      c.height = stage.height;
    }
    // One seed for every layer of the image: the ZIP and ORA, made again in one call, then match the layers.
    if (!$("seed").value.trim()) $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
    clearPrompt();
    showLayers();
    $("run").disabled = false;
    RefLade.status(`${file.name}: ${stage.width} x ${stage.height} px. Click points, drag a box, paint or type text.`);
  });

  /** The prompt as the API takes it; `withMask` adds the painted mask as a PNG data: URL. */
  function currentPrompt(withMask = true) {
    const prompt = {};
    if (state.points.length) prompt.points = state.points.map((p) => p.slice());
    if (state.box) prompt.box = state.box.slice();
    if (state.painted) prompt.mask = withMask ? state.mask.toDataURL("image/png") : "(painted)";
    const text = $("text").value.trim();
    if (text) prompt.text = text;
    return prompt;
  }

  function summary(prompt) {
    const parts = [];
    if (prompt.text) parts.push(`"${prompt.text}"`);
    if (prompt.box) parts.push(`box [${prompt.box.join(", ")}]`);
    if (prompt.points) {
      const pos = prompt.points.filter((p) => p[2] === 1).length;
      parts.push(`${pos} positive / ${prompt.points.length - pos} negative point(s)`);
    }
    if (prompt.mask) parts.push("mask");
    return parts.join(" + ");
  }

  function options() {
    const body = { kind: $("kind").value };
    const model = $("model").value.trim();
    if (model) body.model = model;
    const steps = $("steps").value.trim();
    if (steps) body.steps = Number(steps);
    const seed = $("seed").value.trim();
    if (seed) body.seed = Number(seed);
    return body;
  }

  $("run").addEventListener("click", async () => {
    const prompt = currentPrompt();
    if (!Object.keys(prompt).length) {
      RefLade.status("Give a prompt first: click a point, drag a box, paint a mask or type text.", true);
      return;
    }
    const body = { image: state.dataUrl, prompt, response: "json", ...options() };
    $("run").disabled = true;
    RefLade.status("Decomposing...");
    try {
      const doc = await (await RefLade.api("v1/decompose", { method: "POST", body })).json();
      state.layers.push({
        png: doc.layer_png,
        prompt,
        kind: doc.kind,
        model: doc.model,
        seed: doc.seed,
        steps: body.steps,
        summary: summary(prompt),
      });
      state.current = state.layers.length - 1;
      showLayers();
      RefLade.status(`Layer ${state.layers.length} from ${doc.model} in ${doc.timings.total_s.toFixed(2)} s (seed ${doc.seed}).`);
    } catch (err) {
      RefLade.status(err.message, true);
    } finally {
      $("run").disabled = false;
    }
  });

  function layerName(i) {
    return `${state.name}-layer-${String(i).padStart(2, "0")}-${state.layers[i].kind}`;
  }

  function showLayers() {
    const list = $("layers");
    list.replaceChildren();
    state.layers.forEach((layer, i) => {
      const li = document.createElement("li");
      li.classList.toggle("current", i === state.current);
      const box = document.createElement("div");
      box.className = "checker";
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${layer.png}`;
      img.alt = `layer ${i + 1}`;
      box.appendChild(img);
      box.addEventListener("click", () => {
        state.current = i;
        showLayers();
      });
      const text = document.createElement("p");
      text.textContent = `${i + 1}. ${layer.kind}, ${layer.summary}; ${layer.model}, seed ${layer.seed}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.addEventListener("click", () => {
        state.layers.splice(i, 1);
        state.current = Math.min(state.current, state.layers.length - 1);
        showLayers();
      });
      li.append(box, text, remove);
      list.appendChild(li);
    });
    const layer = state.layers[state.current];
    const result = $("result");
    result.hidden = !layer;
    if (layer) result.src = `data:image/png;base64,${layer.png}`;
    else result.removeAttribute("src");
    $("result-label").textContent = layer ? `${state.current + 1} of ${state.layers.length}: ${layer.kind}` : "";
    $("download-png").disabled = !layer;
    $("download-zip").disabled = $("download-ora").disabled = !state.layers.length;
  }

  $("download-png").addEventListener("click", () => {
    const layer = state.layers[state.current];
    if (layer) RefLade.download(RefLade.base64ToBlob(layer.png, "image/png"), `${layerName(state.current)}.png`);
  });

  async function downloadStack(format) {
    const layers = state.layers;
    // One request makes the stack again: one kind, model, seed and step count for every layer.
    const mixed = ["kind", "model", "seed", "steps"].filter((k) => new Set(layers.map((l) => l[k])).size > 1);
    if (mixed.length) {
      RefLade.status(`A ${format.toUpperCase()} is made in one call, so its layers share one ${mixed.join(", ")}; these differ: remove some, or download PNGs.`, true);
      return;
    }
    const body = {
      image: state.dataUrl,
      prompts: layers.map((l) => l.prompt),
      kind: layers[0].kind,
      model: layers[0].model,
      seed: layers[0].seed,
    };
    if (layers[0].steps) body.steps = layers[0].steps;
    RefLade.status(`Making the ${format.toUpperCase()} (${layers.length} layers)...`);
    try {
      const response = await RefLade.api("v1/decompose/layers", { method: "POST", body, query: { format } });
      RefLade.download(await response.blob(), `${state.name}-layers.${format}`);
      RefLade.status(`${state.name}-layers.${format}: ${layers.length} layers.`);
    } catch (err) {
      RefLade.status(err.message, true);
    }
  }
  $("download-zip").addEventListener("click", () => downloadStack("zip"));
  $("download-ora").addEventListener("click", () => downloadStack("ora"));

  RefLade.initToken($("token"));
  const models = $("models");
  if ($("token").value) RefLade.fillModels(models); // without a token, a service that wants one says 401
  $("token").addEventListener("change", () => RefLade.fillModels(models));
})();
