// The vote page: a dataset item decomposed by two models (GET v1/vote/pair), shown side by side without their names;
// the person picks the better layer or a tie, and POST v1/votes records it as a new version of votes/NAME.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const choices = ["pick-a", "pick-tie", "pick-b"];
  let pair = null; // the answer of v1/vote/pair being judged
  let busy = false;

  function enable(on) {
    for (const id of choices) $(id).disabled = !on;
  }

  async function showPrompt(doc) {
    const canvas = $("vote-stage");
    canvas.width = doc.width;
    canvas.height = doc.height;
    const image = await RefLade.loadImage(`data:image/png;base64,${doc.image_png}`);
    let mask = null;
    if (doc.prompt.mask_png) {
      const m = await RefLade.loadImage(`data:image/png;base64,${doc.prompt.mask_png}`);
      mask = RefLade.tint(m, doc.width, doc.height);
    }
    RefLade.drawPrompt(canvas, image, { points: doc.prompt.points, box: doc.prompt.box, mask });
  }

  async function nextPair() {
    if (busy) return;
    const query = { dataset: $("dataset").value.trim(), a: $("model-a").value.trim(), b: $("model-b").value.trim() };
    const missing = Object.entries({ dataset: "a dataset", a: "a model", b: "a second model" })
      .filter(([k]) => !query[k])
      .map(([, what]) => what);
    if (missing.length) {
      RefLade.status(`Give ${missing.join(", ")} first.`, true);
      return;
    }
    const promptType = $("prompt-type").value.trim();
    if (promptType) query.prompt_type = promptType;
    busy = true;
    enable(false);
    RefLade.status("Decomposing a new item with both models...");
    try {
      const doc = await (await RefLade.api("v1/vote/pair", { query })).json();
      pair = doc;
      $("description").textContent = doc.description;
      $("left").src = `data:image/png;base64,${doc.a.layer_png}`;
      $("right").src = `data:image/png;base64,${doc.b.layer_png}`;
      $("left-model").textContent = $("right-model").textContent = "";
      await showPrompt(doc);
      $("pair").hidden = false;
      enable(true);
      RefLade.status(`Item ${doc.item} of ${doc.dataset}:${doc.split}. Which layer is better?`);
    } catch (err) {
      RefLade.status(err.message, true);
    } finally {
      busy = false;
    }
  }

  async function vote(winner) {
    if (!pair || busy) return;
    const name = $("votes-name").value.trim();
    if (!name) {
      RefLade.status("Give a votes name (the registry's votes/NAME your votes go to).", true);
      return;
    }
    const judged = pair;
    const body = {
      name,
      item: judged.item,
      prompt: judged.prompt_type,
      model_a: judged.a.model,
      model_b: judged.b.model,
      winner,
    };
    busy = true;
    enable(false);
    try {
      const doc = await (await RefLade.api("v1/votes", { method: "POST", body })).json();
      // Only now the models are named.
      $("left-model").textContent = `(${judged.a.model})`;
      $("right-model").textContent = `(${judged.b.model})`;
      $("recorded").textContent = `Recorded in ${doc.ref} (${doc.n_votes} votes): left ${judged.a.model}, right ${judged.b.model}, winner ${winner}.`;
      RefLade.status(`Vote recorded: ${doc.ref}.`);
      pair = null;
    } catch (err) {
      RefLade.status(err.message, true);
      enable(true);
      return;
    } finally {
      busy = false;
    }
    if ($("auto-next").checked) nextPair();
  }

  $("next").addEventListener("click", nextPair);
  $("pick-a").addEventListener("click", () => vote("a"));
  $("pick-b").addEventListener("click", () => vote("b"));
  $("pick-tie").addEventListener("click", () => vote("tie"));
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement || !pair) return;
    const winner = { 1: "a", ArrowLeft: "a", 2: "b", ArrowRight: "b", 0: "tie", ArrowDown: "tie" }[event.key];
    if (winner) vote(winner);
  });

  RefLade.initToken($("token"));
  for (const [id, key] of [
    ["dataset", "reflade.vote.dataset"],
    ["model-a", "reflade.vote.a"],
    ["model-b", "reflade.vote.b"],
    ["prompt-type", "reflade.vote.prompt_type"],
    ["votes-name", "reflade.vote.name"],
  ]) {
    RefLade.remember($(id), key);
  }
  const models = $("models");
  if ($("token").value) RefLade.fillModels(models); // without a token, a service that wants one says 401
  $("token").addEventListener("change", () => RefLade.fillModels(models));
})();
