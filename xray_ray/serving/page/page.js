// The review page's only script: send one study to this Serve app's /predict and /explain and show the answer.
// Every string from a file or an answer is put in the page as text (textContent), never parsed as HTML; the page's
// Content-Security-Policy also forbids any other script and requires Trusted Types, so an HTML sink would throw.
// The token, when the service needs one, lives in the variable `token` only: no cookie, no storage.
"use strict";

(function () {
  // The API's routes sit beside this page (Serve may mount the app under a route prefix).
  const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";

  const ui = {};
  for (const id of ["model-info", "synthetic-note", "token-panel", "token-message", "token-form", "token-input",
    "drop-zone", "file-input", "status", "error", "error-file", "error-file-name", "error-reason", "error-code", "result", "result-heading",
    "film", "overlay", "viewer-caption", "heat-refused", "heat-rows", "heat-class", "heat-toggle", "opacity", "opacity-value",
    "file-name", "ood-warning", "ood-text", "reveal", "answer", "label", "confidence", "shown-anyway",
    "calibration-note", "bars", "model-version", "engine", "ood-score", "sha256", "download-json",
    "download-png"]) {
    ui[id.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = document.getElementById(id);
  }

  let token = null;   // the bearer token, in memory only
  let card = null;    // GET /model's card, when it could be read
  let retry = null;   // what to do again once a token is given
  let study = null;   // the file on show: {file, filmUrl, answer, overlays: Map(class -> {url, name}), shown}
  let generation = 0; // bumps with every new file, so a late answer for an old file is dropped

  class Refusal extends Error {
    constructor(status, code, reason) {
      super(reason);
      this.status = status;
      this.code = code;
      this.reason = reason;
    }
  }

  const percent = (p) => (100 * p).toFixed(1) + " %";

  function say(message, busy) {
    ui.status.textContent = message;
    ui.status.classList.toggle("busy", Boolean(busy));
    ui.dropZone.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // --- talking to the service ------------------------------------------------------------------------------------

  async function call(method, path, body) {
    const headers = { Accept: "application/json" };
    if (token !== null) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(base + path, { method, headers, body, cache: "no-store", credentials: "omit" });
    } catch (err) {
      throw new Refusal(0, "unreachable", "the service could not be reached (" + err.message + ")");
    }
    if (response.ok) return response.json();
    let code = "http_" + response.status;
    let reason = "the service answered HTTP " + response.status + " without a reason";
    try {
      const refusal = await response.json();
      if (refusal && typeof refusal.reason === "string") {
        reason = refusal.reason;
        code = String(refusal.error || code);
      }
    } catch (_) { /* not JSON: keep the status line's words */ }
    throw new Refusal(response.status, code, reason);
  }

  function askForToken(message) {
    ui.tokenMessage.textContent = message;
    ui.tokenPanel.hidden = false;
    ui.tokenInput.focus();
  }

  // Runs `action`; a 401 asks for the token (again) and remembers `action` for when it is given; any other refusal
  // is shown in words. The page stays usable either way.
  async function run(action, file) {
    hideError();
    try {
      await action();
    } catch (err) {
      say("", false);
      if (err instanceof Refusal && err.status === 401) {
        const refused = token !== null;
        token = null;
        retry = action;
        askForToken(refused ? "The token was refused (HTTP 401): enter it again."
          : "This service requires an access token: enter it to continue.");
        return;
      }
      showError(err, file);
    }
  }

  function showError(err, file) {
    ui.errorFile.hidden = !file;
    ui.errorFileName.textContent = file ? file.name : "";
    const refusal = err instanceof Refusal ? err : new Refusal(0, "page_error", String(err && err.message || err));
    const reason = refusal.reason.charAt(0).toUpperCase() + refusal.reason.slice(1);
    ui.errorReason.textContent = reason.endsWith(".") ? reason : reason + ".";
    ui.errorCode.textContent = refusal.status ? "Code " + refusal.code + ", HTTP " + refusal.status + "."
      : "Code " + refusal.code + ".";
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
    ui.errorFile.hidden = true;
    ui.errorFileName.textContent = "";
    ui.errorReason.textContent = "";
    ui.errorCode.textContent = "";
  }

  // --- the model ---------------------------------------------------------------------------------------------------

  async function loadModel() {
    card = (await call("GET", "model")).card || null;
    if (!card) return;
    const parts = ["Model " + String(card.version || "(no version)")];
    if (card.backbone) parts.push(String(card.backbone));
    if (Array.isArray(card.classes)) parts.push("classes: " + card.classes.map(String).join(", "));
    ui.modelInfo.textContent = parts.join(" · ");
    ui.syntheticNote.hidden = card.synthetic_data !== true;
    const calibration = card.calibration || {};
    const images = calibration.valid && calibration.valid.images;
    ui.calibrationNote.textContent = "Calibrated probabilities: calibrated on the validation images"
      + (images ? " (" + images + " images" + (calibration.method ? ", " + calibration.method : "") + ")" : "")
      + ". They add up to 100 %.";
  }

  ui.tokenForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const given = ui.tokenInput.value.trim();
    ui.tokenInput.value = "";
    if (!given) {
      askForToken("Enter the token first.");
      return;
    }
    token = given;
    try {
      await loadModel(); // the token's check: /model needs it as every route but /healthz does
    } catch (err) {
      if (err instanceof Refusal && err.status === 401) {
        token = null;
        askForToken("The token was refused (HTTP 401): enter it again.");
        return;
      }
      // any other failure leaves the card unknown; the token was not refused, so it is kept
    }
    ui.tokenPanel.hidden = true;
    say("Token accepted. It is kept in this page's memory only.", false);
    const again = retry;
    retry = null;
    if (again && again !== loadModel) await run(again);
    else ui.fileInput.focus();
  });

  // --- one study ---------------------------------------------------------------------------------------------------

  function forget() {
    if (!study) return;
    URL.revokeObjectURL(study.filmUrl);
    for (const overlay of study.overlays.values()) URL.revokeObjectURL(overlay.url);
    if (study.jsonUrl) URL.revokeObjectURL(study.jsonUrl);
    study = null;
  }

  function choose(file) {
    if (!file) return;
    forget();
    generation += 1;
    study = { file, filmUrl: URL.createObjectURL(file), answer: null, overlays: new Map(), shown: null,
      jsonUrl: null, generation };
    ui.result.hidden = true;
    const mine = study;
    run(() => predict(mine), file);
  }

  function upload(file) {
    const form = new FormData();
    form.append("file", file, file.name);
    return form;
  }

  async function predict(mine) {
    say("Asking the model about " + mine.file.name + " …", true);
    const answer = await call("POST", "predict", upload(mine.file));
    if (mine.generation !== generation) return; // another file was chosen meanwhile
    mine.answer = answer;
    show(mine);
    say("Answered.", false);
    ui.resultHeading.focus();
  }

  function bar(name, probability, predicted) {
    const item = document.createElement("li");
    item.className = predicted ? "bar predicted" : "bar";
    item.dataset.class = name;
    item.dataset.probability = String(probability);
    const label = document.createElement("span");
    label.className = "bar-name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = Math.max(0, Math.min(100, 100 * probability)).toFixed(2) + "%";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(probability);
    item.append(label, track, value);
    return item;
  }

  function show(mine) {
    const answer = mine.answer;
    const ood = answer.out_of_distribution === true;
    const classes = Object.keys(answer.probabilities || {});

    ui.fileName.textContent = mine.file.name;
    ui.film.hidden = false;
    ui.film.alt = "The uploaded film, " + mine.file.name;
    ui.film.src = mine.filmUrl;
    ui.overlay.hidden = true;
    ui.overlay.removeAttribute("src");
    ui.viewerCaption.textContent = "The uploaded film.";

    ui.label.textContent = String(answer.label);
    ui.confidence.textContent = "(" + percent(answer.confidence) + ", calibrated)";
    ui.bars.replaceChildren(...classes.map((name) => bar(name, Number(answer.probabilities[name]),
      name === answer.label)));
    ui.modelVersion.textContent = String(answer.model_version);
    ui.engine.textContent = String(answer.engine);
    ui.sha256.textContent = String(answer.sha256);
    const score = answer.ood_score === null || answer.ood_score === undefined ? "not available (no detector)"
      : Number(answer.ood_score).toFixed(2);
    const threshold = card && card.ood && typeof card.ood.threshold === "number" ? card.ood.threshold : null;
    ui.oodScore.textContent = score + (threshold === null ? "" : " (flagged above " + threshold.toFixed(2) + ")")
      + (ood ? ": out of distribution" : "");

    // Chester's rule: an out-of-distribution image gets a warning with its score, its class hidden until asked for,
    // and no heat map.
    ui.oodWarning.hidden = !ood;
    ui.oodText.textContent = "Out-of-distribution score " + score
      + (threshold === null ? "" : ", above the model's threshold of " + threshold.toFixed(2)) + ".";
    ui.reveal.hidden = false;
    ui.answer.hidden = ood;
    ui.shownAnyway.hidden = true;
    ui.heatRefused.hidden = !ood;
    ui.heatRows.hidden = ood; // its class menu would name the hidden class
    ui.heatToggle.disabled = ood;
    ui.heatClass.disabled = ood;
    ui.opacity.disabled = ood;
    ui.heatToggle.setAttribute("aria-pressed", "false");
    ui.heatToggle.textContent = "Show heat map";
    ui.heatClass.replaceChildren(...classes.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name + (name === answer.label ? " (predicted)" : "");
      option.selected = name === answer.label;
      return option;
    }));

    mine.jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(answer, null, 2) + "\n"],
      { type: "application/json" }));
    ui.downloadJson.href = mine.jsonUrl;
    ui.downloadJson.download = "xray-answer-" + String(answer.sha256).slice(0, 12) + ".json";
    ui.downloadPng.hidden = true;
    ui.downloadPng.removeAttribute("href");
    ui.result.hidden = false;
  }

  ui.film.addEventListener("error", () => {
    if (!study || !ui.film.getAttribute("src")) return;
    ui.film.hidden = true;
    ui.viewerCaption.textContent = "This browser cannot show this format (TIFF or DICOM): the heat map shows the "
      + "film as the model saw it.";
  });

  ui.reveal.addEventListener("click", () => {
    ui.answer.hidden = false;
    ui.shownAnyway.hidden = false;
    ui.reveal.hidden = true;
    ui.answer.focus();
  });

  // --- the heat map ------------------------------------------------------------------------------------------------

  async function explainClass(mine, name) {
    say("Computing the heat map of " + name + " …", true);
    const result = await call("POST", "explain?class=" + encodeURIComponent(name), upload(mine.file));
    const bytes = Uint8Array.from(atob(result.overlay_png_base64), (c) => c.charCodeAt(0));
    const overlay = { url: URL.createObjectURL(new Blob([bytes], { type: "image/png" })), name };
    if (mine.generation !== generation) {
      URL.revokeObjectURL(overlay.url);
      return null;
    }
    mine.overlays.set(name, overlay);
    say("", false);
    return overlay;
  }

  async function showHeatMap(mine, name) {
    if (mine.answer.out_of_distribution === true) return; // refused: the controls are disabled too
    const overlay = mine.overlays.get(name) || await explainClass(mine, name);
    if (!overlay || mine.generation !== generation) return;
    mine.shown = name;
    ui.overlay.src = overlay.url;
    ui.overlay.alt = "Heat map of " + name + " over the film";
    ui.overlay.hidden = false;
    ui.overlay.style.opacity = String(ui.opacity.value / 100);
    ui.viewerCaption.textContent = "Heat map of " + name + " (Grad-CAM) over the film, at " + ui.opacity.value
      + " % opacity.";
    ui.heatToggle.setAttribute("aria-pressed", "true");
    ui.heatToggle.textContent = "Hide heat map";
    ui.downloadPng.href = overlay.url;
    ui.downloadPng.download = "xray-heatmap-" + name.replace(/[^A-Za-z0-9_-]+/g, "_") + "-"
      + String(mine.answer.sha256).slice(0, 12) + ".png";
    ui.downloadPng.hidden = false;
  }

  function hideHeatMap() {
    if (study) study.shown = null;
    ui.overlay.hidden = true;
    ui.viewerCaption.textContent = ui.film.hidden ? "No preview of this format in the browser." : "The uploaded film.";
    ui.heatToggle.setAttribute("aria-pressed", "false");
    ui.heatToggle.textContent = "Show heat map";
  }

  ui.heatToggle.addEventListener("click", () => {
    if (!study || !study.answer) return;
    const mine = study;
    if (mine.shown) hideHeatMap();
    else run(() => showHeatMap(mine, ui.heatClass.value), mine.file);
  });

  ui.heatClass.addEventListener("change", () => {
    if (study && study.shown) {
      const mine = study;
      run(() => showHeatMap(mine, ui.heatClass.value), mine.file);
    }
  });

  ui.opacity.addEventListener("input", () => {
    ui.overlay.style.opacity = String(ui.opacity.value / 100);
    ui.opacityValue.textContent = ui.opacity.value + " %";
    if (study && study.shown) {
      ui.viewerCaption.textContent = "Heat map of " + study.shown + " (Grad-CAM) over the film, at "
        + ui.opacity.value + " % opacity.";
    }
  });

  // --- choosing a file ---------------------------------------------------------------------------------------------

  ui.fileInput.addEventListener("change", () => {
    choose(ui.fileInput.files[0]);
    ui.fileInput.value = ""; // choosing the same file again asks again
  });

  for (const type of ["dragenter", "dragover"]) {
    ui.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      ui.dropZone.classList.add("dragging");
    });
  }
  ui.dropZone.addEventListener("dragleave", () => ui.dropZone.classList.remove("dragging"));
  ui.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.dropZone.classList.remove("dragging");
    const files = event.dataTransfer ? event.dataTransfer.files : [];
    if (files.length > 1) say("Only the first of the " + files.length + " files dropped is used.", false);
    choose(files[0]);
  });
  // A file dropped beside the zone must not make the browser leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  run(loadModel);
})();
