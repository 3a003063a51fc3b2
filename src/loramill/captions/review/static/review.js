// The caption review page: every image with its auto caption, its edit (unsaved edits are
// drafts until Save) and the caption training will use, which the server makes with the merge
// stage's own rules. Plain JavaScript, no build step.
"use strict";

const token = document.body.dataset.token;
const $ = (selector, root = document) => root.querySelector(selector);
let state = null; // what the server last sent: images, edits, version of metadata.csv
const byImage = new Map(); // image -> its row of state.images
const cards = new Map(); // image -> its <li>
// image -> {prompt, mode} as the card shows it, or null for "no edit"; an empty prompt
// (but for exclude) is no edit too, and a draft equal to the saved edit is not unsaved
const drafts = new Map();
const previews = new Map(); // image -> training caption of its draft
const selected = new Set();
const pending = new Map(); // image -> preview timer

async function api(path, body) {
  const options = { headers: { "X-Loramill-Token": token } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    throw Object.assign(new Error(data.error || response.statusText), { status: response.status });
  }
  return data;
}

const tags = (text) => (text || "").split(",").map((t) => t.trim()).filter(Boolean);

function saved(image) {
  const edit = byImage.get(image).edit;
  return edit ? { prompt: edit.prompt, mode: edit.mode } : null;
}

function current(image) {
  return drafts.has(image) ? drafts.get(image) : saved(image);
}

// what an edit as shown means for the file: null when it trains the auto caption
function effective(edit) {
  return edit && (edit.prompt.trim() || edit.mode === "exclude") ? edit : null;
}

function unsaved(image) {
  return drafts.has(image) &&
    JSON.stringify(effective(drafts.get(image))) !== JSON.stringify(saved(image));
}

const unsavedImages = () => [...drafts.keys()].filter(unsaved);

function training(image) {
  return previews.has(image) ? previews.get(image) : byImage.get(image).training;
}

function editable(image) {
  const edit = byImage.get(image).edit;
  return !(edit && edit.sidecar);
}

// The text a tag or find-and-replace works on: the edit's, or the auto caption's for an image
// without one (the change then becomes a replace edit of it).
function workingText(image) {
  const edit = effective(current(image));
  return edit ? { ...edit } : { prompt: byImage.get(image).auto, mode: "replace" };
}

function setDraft(image, draft) {
  drafts.set(image, draft); // kept even when unchanged: it is what the card shows (its mode)
  if (unsaved(image)) {
    schedulePreview(image);
  } else {
    previews.delete(image);
  }
  renderCard(image);
  renderStatus();
}

const asked = new Map(); // image -> the draft its newest preview request was for

function schedulePreview(image) {
  clearTimeout(pending.get(image));
  pending.set(image, setTimeout(async () => {
    const draft = drafts.has(image) ? drafts.get(image) : undefined;
    if (draft === undefined) return;
    const edit = effective(draft) || { prompt: "", mode: "replace" };
    asked.set(image, draft);
    let caption;
    try {
      caption = (await api("/api/preview", { image, prompt: edit.prompt, mode: edit.mode })).training;
    } catch (error) {
      caption = `(${error.message})`;
    }
    // an answer for an older draft, arriving after a newer request or a save, is dropped
    if (asked.get(image) !== draft || drafts.get(image) !== draft) return;
    previews.set(image, caption);
    renderCard(image);
    renderTags();
    renderFilter();
  }, 200));
}

function problemsOf(image) {
  return state.problems.filter((p) => p.image === image).map((p) => `${p.edit}: ${p.problem}`);
}

function renderCard(image) {
  const card = cards.get(image);
  const row = byImage.get(image);
  const edit = current(image);
  card.classList.toggle("dirty", unsaved(image));
  card.classList.toggle("selected", selected.has(image));
  $(".select", card).checked = selected.has(image);
  const where = row.edit ? ` · edit: ${row.edit.origin}` : "";
  const bucket = row.bucket ? `${row.bucket[0]}×${row.bucket[1]}` : "";
  $(".meta", card).textContent = `${bucket}${where} ${problemsOf(image).join("; ")}`;
  card.classList.toggle("problem", problemsOf(image).length > 0);
  $(".auto", card).textContent = row.auto;
  const prompt = $(".prompt", card);
  if (document.activeElement !== prompt) prompt.value = edit ? edit.prompt : "";
  $(".mode", card).value = edit ? edit.mode : "replace";
  for (const option of card.querySelectorAll(".mode option:not([value=replace])")) {
    option.disabled = state.modes_need_column; // metadata.csv has no mode column to say it
  }
  for (const input of card.querySelectorAll(".prompt, .mode, .remove-edit, .new-tag")) {
    input.disabled = !editable(image);
  }
  const chips = $(".chips", card);
  chips.replaceChildren(...tags(workingText(image).prompt).map((tag) => {
    const chip = document.createElement("button");
    chip.className = "chip";
    chip.textContent = `${tag} ×`;
    chip.dataset.tag = tag;
    chip.disabled = !editable(image);
    chip.title = "remove this tag";
    return chip;
  }));
  const caption = training(image);
  $(".training", card).textContent = caption === null ? "excluded from training" : caption;
}

function matches(image, filter) {
  if (!filter) return true;
  const text = filter.toLowerCase();
  if (text.startsWith("tag:")) {
    const wanted = text.slice(4).trim();
    return tags(training(image)).some((tag) => tag.toLowerCase() === wanted);
  }
  const row = byImage.get(image);
  const edit = current(image);
  return [row.name, row.auto, edit && edit.prompt, training(image)]
    .some((field) => (field || "").toLowerCase().includes(text));
}

function shown() {
  return [...cards.keys()].filter((image) => !cards.get(image).hidden);
}

function renderFilter() {
  const filter = $("#filter").value.trim();
  for (const [image, card] of cards) card.hidden = !matches(image, filter);
  renderStatus();
}

function renderTags() {
  const counts = new Map();
  for (const image of byImage.keys()) {
    for (const tag of tags(training(image))) counts.set(tag, (counts.get(tag) || 0) + 1);
  }
  const sorted = [...counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  $("#tags").replaceChildren(...sorted.map(([tag, count]) => {
    const item = document.createElement("li");
    const link = document.createElement("button");
    link.className = "tag-filter";
    link.textContent = `${tag} (${count})`;
    link.onclick = () => { $("#filter").value = `tag:${tag}`; renderFilter(); };
    item.append(link);
    return item;
  }));
}

function renderLists() {
  const item = (text) => Object.assign(document.createElement("li"), { textContent: text });
  $("#problems").replaceChildren(...state.problems.map((p) => item(`${p.edit}: ${p.problem}`)));
  $("#quarantined").replaceChildren(
    ...state.quarantined.map((q) => item(`${q.source}: ${q.reason}`)));
}

function renderStatus(message) {
  const count = unsavedImages().length;
  const counts = `${byImage.size} images, ${shown().length} shown · ${count} unsaved edit${count === 1 ? "" : "s"}`;
  if (message !== undefined) $("#status").dataset.message = message;
  $("#status").textContent = [$("#status").dataset.message, counts].filter(Boolean).join(" · ");
  $("#selected-count").textContent = `${selected.size} selected`;
  document.title = `${count ? "* " : ""}Captions of ${state.dataset} · loramill`;
}

function buildCards() {
  // the same images as shown: keep the cards (focus, scroll and typing are not interrupted)
  if (state.images.map((row) => row.image).join("\n") === [...cards.keys()].join("\n")) return;
  const list = $("#images");
  list.replaceChildren();
  cards.clear();
  for (const row of state.images) {
    const card = $("#card").content.firstElementChild.cloneNode(true);
    card.dataset.image = row.image;
    $(".name", card).textContent = row.name;
    $(".thumb", card).src = `/thumbnail/${encodeURIComponent(row.image)}?token=${token}`;
    cards.set(row.image, card);
    list.append(card);
  }
}

function show(newState) {
  state = newState;
  byImage.clear();
  for (const row of state.images) byImage.set(row.image, row);
  for (const image of [...drafts.keys()]) if (!byImage.has(image)) drafts.delete(image);
  const lost = [...drafts.keys()].filter((image) => unsaved(image) && !editable(image));
  for (const image of lost) drafts.delete(image); // edited in captions/ meanwhile: not ours
  dropped = lost.length ? `${lost.length} unsaved edit(s) dropped: their images are now ` +
    `edited in captions/ (${lost.map((i) => byImage.get(i).name).join(", ")})` : "";
  for (const image of [...selected]) if (!byImage.has(image)) selected.delete(image);
  previews.clear();
  buildCards();
  for (const image of byImage.keys()) renderCard(image);
  for (const image of drafts.keys()) if (unsaved(image)) schedulePreview(image);
  renderTags();
  renderLists();
  renderFilter();
}

let dropped = ""; // what show() had to drop, said with the next status
let saving = false;

async function load(message) {
  show(await api("/api/state"));
  renderStatus([message, dropped].filter(Boolean).join("; "));
}

async function save() {
  if (saving) return; // one at a time: a second would name the version the first replaced
  const sent = new Map(unsavedImages().map((image) => [image, drafts.get(image)]));
  if (!sent.size) return renderStatus("nothing to save");
  const changes = Object.fromEntries([...sent].map(([image, draft]) => [image, effective(draft)]));
  saving = true;
  $("#save").disabled = true;
  try {
    const next = await api("/api/save", { version: state.version, changes });
    // what was typed while the save was on its way stays a draft
    for (const [image, draft] of sent) if (drafts.get(image) === draft) drafts.delete(image);
    show(next);
    renderStatus([`saved ${sent.size} edit${sent.size === 1 ? "" : "s"} to metadata.csv`, dropped]
      .filter(Boolean).join("; "));
  } catch (error) {
    $("#reload").hidden = false; // the file as it is now, the unsaved text kept
    renderStatus(`not saved: ${error.message}`);
  } finally {
    saving = false;
    $("#save").disabled = false;
  }
}

function targets() {
  const images = $("#scope").value === "all" ? [...byImage.keys()] : [...selected];
  return images.filter((image) => editable(image) && (current(image) || {}).mode !== "exclude");
}

function bulk(change) {
  let changed = 0;
  for (const image of targets()) {
    const edit = workingText(image);
    const prompt = change(edit.prompt);
    if (prompt !== edit.prompt) {
      setDraft(image, { ...edit, prompt });
      changed += 1;
    }
  }
  renderStatus(`${changed} caption${changed === 1 ? "" : "s"} changed (unsaved)`);
}

const withTag = (prompt, tag) =>
  tags(prompt).some((t) => t.toLowerCase() === tag.toLowerCase()) ? prompt : [...tags(prompt), tag].join(", ");
const withoutTag = (prompt, tag) =>
  tags(prompt).filter((t) => t.toLowerCase() !== tag.toLowerCase()).join(", ");

function cardOf(element) {
  const card = element.closest(".card");
  return card ? card.dataset.image : null;
}

function moveFocus(step) {
  const images = shown();
  const at = images.indexOf(cardOf(document.activeElement) || "");
  const next = images[Math.min(Math.max(at + step, 0), images.length - 1)];
  if (!next) return;
  const card = cards.get(next);
  card.scrollIntoView({ block: "nearest" });
  (editable(next) ? $(".prompt", card) : card).focus();
}

function wire() {
  const list = $("#images");
  list.addEventListener("input", (event) => {
    const image = cardOf(event.target);
    if (!image || !event.target.matches(".prompt, .mode")) return;
    const card = cards.get(image);
    setDraft(image, { prompt: $(".prompt", card).value, mode: $(".mode", card).value });
  });
  list.addEventListener("change", (event) => {
    const image = cardOf(event.target);
    if (image && event.target.matches(".select")) {
      event.target.checked ? selected.add(image) : selected.delete(image);
      renderCard(image);
      renderStatus();
    }
  });
  list.addEventListener("click", (event) => {
    const image = cardOf(event.target);
    if (!image) return;
    if (event.target.matches(".chip")) {
      const edit = workingText(image);
      setDraft(image, { ...edit, prompt: withoutTag(edit.prompt, event.target.dataset.tag) });
    } else if (event.target.matches(".remove-edit")) {
      setDraft(image, null);
    }
  });
  list.addEventListener("keydown", (event) => {
    const image = cardOf(event.target);
    if (image && event.key === "Enter" && !event.isComposing && event.target.matches(".new-tag")) {
      const tag = event.target.value.trim();
      const edit = workingText(image);
      if (tag) setDraft(image, { ...edit, prompt: withTag(edit.prompt, tag) });
      event.target.value = "";
    }
  });
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
      event.preventDefault();
      save();
    } else if (event.altKey && (event.key === "ArrowDown" || event.key === "ArrowUp")) {
      event.preventDefault();
      moveFocus(event.key === "ArrowDown" ? 1 : -1);
    }
  });
  $("#save").onclick = save;
  $("#reload").onclick = async () => {
    $("#reload").hidden = true;
    await load(`reloaded; ${unsavedImages().length} unsaved edit(s) kept, not saved yet`);
  };
  $("#filter").oninput = renderFilter;
  $("#select-shown").onclick = () => { shown().forEach((i) => selected.add(i)); shown().forEach(renderCard); renderStatus(); };
  $("#select-none").onclick = () => { selected.clear(); cards.forEach((_, i) => renderCard(i)); renderStatus(); };
  $("#replace-all").onclick = () => {
    const find = $("#find").value;
    if (find) bulk((prompt) => prompt.split(find).join($("#replace").value));
  };
  $("#add-tag").onclick = () => {
    const tag = $("#bulk-tag").value.trim();
    if (tag) bulk((prompt) => withTag(prompt, tag));
  };
  $("#remove-tag").onclick = () => {
    const tag = $("#bulk-tag").value.trim();
    if (tag) bulk((prompt) => withoutTag(prompt, tag));
  };
  window.addEventListener("beforeunload", (event) => {
    if (unsavedImages().length) event.preventDefault();
  });
}

wire();
load().catch((error) => { $("#status").textContent = `cannot load: ${error.message}`; });
