// What both pages (viewer.js, model.js) say to the service the same way: the API key as a
// Bearer token, and JSON POSTs whose answer (JSON or problem+json) is read once. Loaded before
// the page's own script. Plain browser JavaScript, nothing fetched from elsewhere.
"use strict";

const attentionApi = (() => {
  function apiKey() {
    return document.getElementById("api-key").value.trim();
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // {response, data}: data is the parsed body, or null when it is not JSON.
  async function postJSON(path, body, signal) {
    const response = await fetch(path, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Accept: "application/json, application/problem+json",
        ...authHeaders(),
      },
      body: JSON.stringify(body),
      signal,
    });
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    return { response, data };
  }

  return { apiKey, authHeaders, postJSON };
})();
