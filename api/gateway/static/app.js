// The page: a thin client of the public /v1 API. Everything it shows comes from the API with
// the key the user entered (kept in localStorage); errors are shown as the API words them.

import { Api, ApiError, TERMINAL } from "./api.js";
import { Karaoke } from "./karaoke.js";
import { Waveform } from "./waveform.js";

const KEY_STORAGE = "heartcluster.apiKey";
const LOG_LIMIT = 300;
const $ = (id) => document.getElementById(id);

let api = null;
let listCursor = null;
// the job on show: its id, the abort of its event stream, its artifacts fetched so far
const view = { id: null, abort: null, blobs: new Map(), urls: [], metadata: null };

const player = $("player");
const karaoke = new Karaoke($("karaoke"), player);
const waveform = new Waveform($("wave"), $("selection"), $("playhead"), player, (start, end) => {
  $("inpaint-form").start_s.value = start.toFixed(2);
  $("inpaint-form").end_s.value = end.toFixed(2);
});

// ----- errors and actions ------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  if (error instanceof ApiError) {
    box.textContent = error.field ? `${error.message} (field: ${error.field})` : error.message;
    box.dataset.code = error.code;
  } else {
    box.textContent = error?.message ?? String(error);
    box.dataset.code = "client_error";
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// A user action: clears the last error, shows the next one.
function action(run) {
  return async (event) => {
    event?.preventDefault();
    clearError();
    try {
      await run(event);
    } catch (error) {
      showError(error);
    }
  };
}

function need() {
  if (!api) throw new Error("Enter your API key first.");
  return api;
}

// ----- API key -----------------------------------------------------------------------------

function useKey(key) {
  api = key ? new Api(key) : null;
  $("key-state").textContent = key ? `key …${key.slice(-4)}` : "no key";
  $("forget-key").hidden = !key;
}

$("key-form").addEventListener(
  "submit",
  action(async () => {
    const key = $("api-key").value.trim();
    await new Api(key).list({ limit: 1 }); // a wrong key is refused here, in the API's words
    localStorage.setItem(KEY_STORAGE, key);
    useKey(key);
    $("api-key").value = "";
    await refreshList();
  }),
);

$("forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  useKey(null);
  $("job-list").replaceChildren();
  closeJob();
});

// ----- a new song ------------------------------------------------------------------------

$("song-form").addEventListener(
  "submit",
  action(async (event) => {
    const form = event.target;
    const params = {
      tags: form.tags.value,
      lyrics: form.lyrics.value,
      duration_s: Number(form.duration_s.value),
      format: form.format.value,
    };
    if (form.seed.value !== "") params.seed = Number(form.seed.value);
    const job = await need().submit("generate", params);
    await refreshList();
    await openJob(job.id);
  }),
);

// ----- my jobs -----------------------------------------------------------------------------

function summary(job) {
  const params = job.params ?? {};
  if (params.tags) return params.tags;
  const source = params.source_job_id ?? params.upload_id ?? params.tokens_upload_id;
  return source ? `from ${source.slice(0, 8)}` : job.id.slice(0, 8);
}

function jobRow(job) {
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.jobId = job.id;
  button.classList.toggle("current", job.id === view.id);
  const cells = [
    [job.type, ""],
    [job.state, `state-${job.state}`],
    [summary(job), ""],
    [job.state === "running" ? `${Math.round(job.progress)}%` : "", ""],
  ];
  for (const [text, style] of cells) {
    const cell = document.createElement("span");
    cell.textContent = text;
    if (style) cell.className = style;
    button.append(cell);
  }
  button.addEventListener("click", action(() => openJob(job.id)));
  const item = document.createElement("li");
  item.append(button);
  return item;
}

function updateRow(job) {
  const button = $("job-list").querySelector(`button[data-job-id="${job.id}"]`);
  button?.parentElement.replaceWith(jobRow(job));
}

async function refreshList(more = false) {
  const page = await need().list({
    state: $("filter-state").value,
    type: $("filter-type").value,
    cursor: more ? listCursor : "",
  });
  if (!more) $("job-list").replaceChildren();
  for (const job of page.jobs) $("job-list").append(jobRow(job));
  listCursor = page.next_cursor;
  $("more").hidden = !listCursor;
}

$("filter-state").addEventListener("change", action(() => refreshList()));
$("filter-type").addEventListener("change", action(() => refreshList()));
$("refresh").addEventListener("click", action(() => refreshList()));
$("more").addEventListener("click", action(() => refreshList(true)));
$("open-form").addEventListener("submit", action(() => openJob($("open-id").value.trim())));

// ----- one job -----------------------------------------------------------------------------

function closeJob() {
  view.abort?.abort();
  for (const url of view.urls) URL.revokeObjectURL(url);
  Object.assign(view, { id: null, abort: null, blobs: new Map(), urls: [], metadata: null });
  player.removeAttribute("src");
  player.load();
  karaoke.clear();
  $("job").hidden = true;
}

async function openJob(id) {
  const job = await need().job(id); // another tenant's or unknown id: the API's 404 is shown
  closeJob();
  const abort = new AbortController();
  Object.assign(view, { id: job.id, abort });
  history.replaceState(null, "", `#job=${job.id}`);
  for (const row of $("job-list").querySelectorAll("button[data-job-id]")) {
    row.classList.toggle("current", row.dataset.jobId === job.id);
  }
  $("job").hidden = false;
  $("song").hidden = true;
  $("job-log").replaceChildren();
  $("transcribe-status").textContent = "";
  const onJob = (update) => {
    if (view.id !== job.id) return;
    render(update);
    log(update);
    updateRow(update);
  };
  onJob(job);
  const final = TERMINAL.has(job.state) ? job : await api.follow(job.id, onJob, abort.signal);
  if (final && view.id === job.id) await finished(final);
}

function render(job) {
  const section = $("job");
  Object.assign(section.dataset, { jobId: job.id, state: job.state, progress: job.progress });
  $("job-title").textContent = `${job.type} ${job.id}`;
  $("job-progress").value = job.progress;
  const parts = [job.state];
  if (job.stage) parts.push(job.stage);
  parts.push(`${job.progress.toFixed(0)}%`);
  if (job.frames_total) parts.push(`frames ${job.frames_done ?? 0}/${job.frames_total}`);
  $("job-status").textContent = parts.join(" · ");
  let message = job.message;
  if (job.error) message = `${job.error.code}: ${job.error.message}`;
  else if (job.state === "queued" && !message) {
    const waited = Math.max(0, Date.now() / 1000 - job.created_at);
    message = `waiting in the queue for a worker (${waited.toFixed(0)} s so far)`;
  }
  $("job-message").textContent = message ?? "";
  $("cancel").hidden = TERMINAL.has(job.state);
}

function log(job) {
  const item = document.createElement("li");
  Object.assign(item.dataset, { state: job.state, stage: job.stage, progress: job.progress });
  const time = new Date().toLocaleTimeString();
  item.textContent = `${time} ${job.state} ${job.stage} ${job.progress.toFixed(1)}%`;
  const list = $("job-log");
  list.append(item);
  while (list.children.length > LOG_LIMIT) list.firstElementChild.remove();
}

async function blobOf(id, name) {
  if (!view.blobs.has(name)) view.blobs.set(name, await need().artifact(id, name));
  return view.blobs.get(name);
}

async function objectUrl(id, name) {
  const url = URL.createObjectURL(await blobOf(id, name));
  view.urls.push(url);
  return url;
}

async function finished(job) {
  const audio = job.artifacts.find((name) => name.startsWith("audio."));
  if (job.state === "succeeded" && audio) await showSong(job, audio);
  if (job.type === "transcribe" && job.params.source_job_id) {
    $("job-message").textContent = "Open the song to hear the transcript with it:";
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "open the song";
    open.addEventListener("click", action(() => openJob(job.params.source_job_id)));
    $("job-message").append(" ", open);
  }
}

async function showSong(job, audioName) {
  const metadata = JSON.parse(await (await blobOf(job.id, "metadata.json")).text());
  const audioUrl = await objectUrl(job.id, audioName);
  const previewUrl = job.artifacts.includes("preview.png")
    ? await objectUrl(job.id, "preview.png")
    : null;
  if (view.id !== job.id) return;
  view.metadata = metadata;
  player.src = audioUrl;
  $("preview").hidden = !previewUrl;
  if (previewUrl) $("preview").src = previewUrl;
  waveform.reset(metadata.duration_s);
  const downloads = $("downloads");
  downloads.replaceChildren();
  for (const name of job.artifacts) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.artifact = name;
    button.textContent = `⬇ ${name}`;
    button.addEventListener("click", action(() => download(job.id, name)));
    downloads.append(button);
  }
  // inpaint and extend apply to songs with tokens (decode results have audio only)
  const hasTokens = job.artifacts.includes("tokens.npy");
  $("inpaint-form").hidden = !hasTokens;
  $("extend-form").hidden = !hasTokens;
  $("decode-form").hidden = !hasTokens;
  $("song").hidden = false;
  await showTranscript(job.id);
}

async function download(id, name) {
  const link = document.createElement("a");
  link.href = await objectUrl(id, name);
  link.download = `${id.slice(0, 8)}-${name}`;
  document.body.append(link);
  link.click();
  link.remove();
}

// The newest finished transcription of this song, if any.
async function showTranscript(songId) {
  const page = await need().list({ type: "transcribe", state: "succeeded", limit: 200 });
  const done = page.jobs.find((job) => job.params.source_job_id === songId);
  if (!done || view.id !== songId) return;
  const blob = await need().artifact(done.id, "transcript.json");
  if (view.id === songId) karaoke.show(JSON.parse(await blob.text()));
}

$("cancel").addEventListener(
  "click",
  action(async () => render(await need().cancel(view.id))),
);

// ----- from a finished song ----------------------------------------------------------------

async function submitChild(type, params) {
  const job = await need().submit(type, { source_job_id: view.id, ...params });
  await refreshList();
  return job;
}

function numbers(form, names) {
  return Object.fromEntries(names.map((name) => [name, Number(form[name].value)]));
}

$("extend-form").addEventListener(
  "submit",
  action(async (event) => {
    const job = await submitChild("extend", numbers(event.target, ["duration_s"]));
    await openJob(job.id);
  }),
);

$("inpaint-form").addEventListener(
  "submit",
  action(async (event) => {
    const job = await submitChild("inpaint", numbers(event.target, ["start_s", "end_s"]));
    await openJob(job.id);
  }),
);

$("decode-form").addEventListener(
  "submit",
  action(async (event) => {
    const params = { format: event.target.format.value };
    if (view.metadata?.seed !== undefined) params.seed = view.metadata.seed;
    const job = await submitChild("decode", params);
    await openJob(job.id);
  }),
);

$("transcribe-form").addEventListener(
  "submit",
  action(async (event) => {
    const language = event.target.language.value.trim();
    const songId = view.id;
    const job = await submitChild("transcribe", language ? { language } : {});
    const status = $("transcribe-status");
    const onJob = (update) => {
      if (view.id === songId) status.textContent = `${update.state} ${update.progress.toFixed(0)}%`;
    };
    const final = await need().follow(job.id, onJob, view.abort.signal);
    if (final?.state === "succeeded") await showTranscript(songId);
    else if (final?.error) throw new ApiError(0, final.error.code, final.error.message);
  }),
);

// ----- start -------------------------------------------------------------------------------

async function start() {
  useKey(localStorage.getItem(KEY_STORAGE));
  if (!api) return;
  await refreshList();
  const match = location.hash.match(/^#job=([0-9a-f]+)$/);
  if (match) await openJob(match[1]);
}

action(start)();
