// What both pages (viewer.js, model.js) do the same way: the API key, kept in the tab's session
// and sent as a Bearer token, and JSON POSTs whose answer (JSON or problem+json) is read once.
// Loaded before the page's own script. Plain browser JavaScript, nothing fetched from elsewhere.
"use strict";

const attentionApi = (() => {
  const KEY_STORAGE = "attention-viewer.api-key"; // one key for both pages

  function apiKey() {
    return document.getElementById("api-key").value.trim();
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // The key field starts with the key kept in this tab's session and keeps each edit there;
  // onChange runs after each edit.
  function keepKeyInSession(onChange = () => {}) {
    const field = document.getElementById("api-key");
    field.value = sessionStorage.getItem(KEY_STORAGE) || "";
    field.addEventListener("input", () => {
      const key = apiKey();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      onChange();
    });
    document.getElementById("key-form").addEventListener("submit", (e) => e.preventDefault());
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

  return { apiKey, authHeaders, keepKeyInSession, postJSON };
})();
