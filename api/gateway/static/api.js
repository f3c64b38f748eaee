// The public /v1 API as the page uses it: Bearer key on every request, the API's own error
// words, and Server-Sent Events read with fetch() (EventSource cannot send the Authorization
// header the gateway needs).

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// An error as the API worded it ({"error": {"code", "message", "field"}}).
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field ?? null;
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not the API's JSON (a proxy's page, a store's XML): say what came back
  }
  const error = body?.error;
  if (error?.message) return new ApiError(response.status, error.code, error.message, error.field);
  return new ApiError(response.status, "http_error", `HTTP ${response.status} ${response.statusText}`);
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  async fetch(path, options = {}) {
    const headers = { ...(options.headers ?? {}), Authorization: `Bearer ${this.key}` };
    const response = await fetch(path, { ...options, headers });
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async json(path, options = {}) {
    return (await this.fetch(path, options)).json();
  }

  submit(type, params) {
    return this.json("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ type, params }),
    });
  }

  job(id) {
    return this.json(`/v1/jobs/${encodeURIComponent(id)}`);
  }

  list({ state = "", type = "", cursor = "", limit = 50 } = {}) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (state) query.set("state", state);
    if (type) query.set("type", type);
    if (cursor) query.set("cursor", cursor);
    return this.json(`/v1/jobs?${query}`);
  }

  cancel(id) {
    return this.json(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  }

  // An artifact's bytes (the gateway streams them, or redirects to a presigned store URL).
  async artifact(id, name) {
    const path = `/v1/jobs/${encodeURIComponent(id)}/artifacts/${encodeURIComponent(name)}`;
    return (await this.fetch(path)).blob();
  }

  // The job's events ({event, job}) until the stream ends (after a terminal state).
  async *events(id, signal) {
    const response = await this.fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, {
      headers: { Accept: "text/event-stream" },
      signal,
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trim())
          .join("\n");
        if (data) yield JSON.parse(data); // comment-only blocks are keep-alives
      }
    }
  }

  // Calls onJob with every new state of the job until it ends; reconnects when the stream
  // drops early. Resolves with the final job; stops quietly when `signal` aborts.
  async follow(id, onJob, signal) {
    for (;;) {
      try {
        for await (const { job } of this.events(id, signal)) onJob(job);
      } catch (error) {
        if (signal.aborted) return null;
        if (error instanceof ApiError && error.status < 500) throw error;
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
      if (signal.aborted) return null;
      const job = await this.job(id);
      onJob(job);
      if (TERMINAL.has(job.state)) return job;
    }
  }
}
